//! The `oxray` command: start nodes, inspect and stop a cluster, run the microbenchmark.
//!
//! `status` and `list` ask the head, which gathers every node's report. The cluster is found through
//! `--address`/`--token`, else `OXRAY_ADDRESS`/`OXRAY_TOKEN`, else `<data dir>/cluster.json` written by `start --head`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use oxray::node::{self, StartArgs};

#[derive(Debug, Parser)]
#[command(
    name = "oxray",
    version,
    about = "oxray: typed remote tasks and actors over a secure QUIC mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Target {
    /// The head's address (HOST:PORT).
    #[arg(long, env = "OXRAY_ADDRESS")]
    address: Option<String>,
    /// The cluster token printed by `start --head`.
    #[arg(long, env = "OXRAY_TOKEN")]
    token: Option<String>,
    /// Where `start --head` wrote cluster.json (default: $OXRAY_DATA_DIR or ~/.oxray).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum What {
    Nodes,
    Actors,
    Tasks,
    Objects,
    PlacementGroups,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run this process as a cluster node (`--head` to start a cluster, `--address` to join one).
    Start(StartArgs),
    /// Nodes, resources used and total, pending and infeasible demand.
    Status(Target),
    /// List nodes, actors, tasks, objects or placement groups.
    List {
        /// What to list.
        what: What,
        #[command(flatten)]
        target: Target,
    },
    /// Stop every node of the cluster.
    Stop(Target),
    /// Ray's microbenchmark rows: by default with the driver (this process) and a node in separate processes.
    Microbenchmark(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Run everything in this process instead of starting a separate node process.
    #[arg(long)]
    embedded: bool,
    /// Print one JSON object keyed by Ray's result names, each `[mean, std]`.
    #[arg(long)]
    json: bool,
    /// Trials per row after one warm-up.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Scale the work per trial (1.0 = Ray's amounts; smaller is quicker and noisier).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Only rows whose key contains this (also read from TESTS_TO_RUN, as in Ray).
    #[arg(long, env = "TESTS_TO_RUN")]
    filter: Option<String>,
    /// CPUs of the node process (default: all cores).
    #[arg(long)]
    num_cpus: Option<usize>,
}

fn locate(t: &Target) -> Result<(String, String)> {
    if let (Some(a), Some(tok)) = (&t.address, &t.token) {
        return Ok((a.clone(), tok.clone()));
    }
    let dir = t.data_dir.clone().unwrap_or_else(node::default_data_dir);
    let found = node::read_cluster_address(&dir)?;
    Ok((
        t.address.clone().unwrap_or(found.address),
        t.token.clone().unwrap_or(found.token),
    ))
}

/// The GCS part of `oxray status`: one row per replica, as each member reports itself.
fn print_gcs(gcs: oxray::Result<Vec<node::GcsMemberStatus>>) {
    let members = match gcs {
        Ok(m) => m,
        Err(e) => {
            println!("gcs: status unavailable: {e}");
            return;
        }
    };
    let up = members.iter().filter(|m| m.error.is_none()).count();
    let leader = members
        .iter()
        .find(|m| m.shards.iter().any(|s| s.is_leader))
        .map(|m| format!("member {}", m.member))
        .unwrap_or_else(|| "none".into());
    // The voters as the best-informed answering member applied them (learners are catching up and do not vote).
    let voters = members
        .iter()
        .filter_map(|m| m.shards.first())
        .max_by_key(|s| s.applied)
        .map(|s| s.voters.len())
        .unwrap_or(members.len());
    println!(
        "gcs: {} replicas ({voters} voting), {up} answering (a majority is {}), leader {leader}",
        members.len(),
        voters / 2 + 1
    );
    table(
        &["MEMBER", "NODE", "STATE", "TERM", "APPLIED", "REVISION"],
        members
            .iter()
            .map(|m| {
                let s = m.shards.first();
                let num = |f: fn(&node::GcsShardStatus) -> u64| {
                    s.map(|s| f(s).to_string()).unwrap_or_else(|| "-".into())
                };
                let unclaimed = m.node.chars().all(|c| c == '0');
                vec![
                    m.member.to_string(),
                    if unclaimed {
                        "-".into()
                    } else {
                        m.node.chars().take(12).collect()
                    },
                    match (&m.error, s) {
                        _ if unclaimed => "UNCLAIMED (start a node with --gcs)".into(),
                        (Some(e), _) => format!("DOWN ({e})"),
                        (None, Some(s)) if s.is_leader => "LEADER".into(),
                        (None, Some(s)) if s.learners.contains(&m.member) => {
                            "LEARNER (catching up)".into()
                        }
                        (None, _) => "FOLLOWER".into(),
                    },
                    num(|s| s.term),
                    num(|s| s.applied),
                    num(|s| s.revision),
                ]
            })
            .collect(),
    );
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn alive(yes: bool) -> String {
    if yes { "ALIVE".into() } else { "DEAD".into() }
}

/// Prints `items` as a JSON array for scripts, or as a table for people.
fn emit<T: serde::Serialize>(
    json: bool,
    items: &[T],
    headers: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else {
        table(headers, items.iter().map(row).collect());
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // `{:#}` prints the cause chain on one line, without a backtrace: the message names the cause and the fix.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Start(args) => {
            node::init_logging();
            node::run_start(args).context("cannot start the node")?;
        }
        Command::Status(t) => {
            let (addr, tok) = locate(&t)?;
            let (s, gcs) = node::cluster_and_gcs_state(&addr, &tok)?;
            if t.json {
                // The cluster state's fields, plus `gcs`: each replica's report, or why it is unavailable.
                let mut v = serde_json::to_value(&s)?;
                v["gcs"] = match &gcs {
                    Ok(members) => serde_json::to_value(members)?,
                    Err(e) => serde_json::json!({ "error": e.to_string() }),
                };
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let alive: Vec<_> = s.members.iter().filter(|m| m.alive).collect();
            let total: f64 = alive.iter().map(|m| m.cpus).sum();
            let free: f64 = alive.iter().map(|m| m.free_cpus).sum();
            let queued: usize = s.nodes.iter().map(|n| n.node.queued).sum();
            let infeasible: usize = s.nodes.iter().map(|n| n.node.infeasible).sum();
            println!("cluster at {addr}");
            println!(
                "nodes: {} alive, {} dead",
                alive.len(),
                s.members.len() - alive.len()
            );
            println!("resources: {:.1}/{:.1} CPU used", total - free, total);
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            let (used, limit, spilled) = s.nodes.iter().fold((0, 0, 0), |(u, l, sp), n| {
                (
                    u + n.node.store.used,
                    l + n.node.store.limit,
                    sp + n.node.store.spilled,
                )
            });
            println!(
                "object store: {:.2}/{:.2} GiB used, {spilled} objects spilled",
                gib(used),
                gib(limit)
            );
            println!("demand: {queued} queued, {infeasible} infeasible");
            println!();
            table(
                &["NODE", "ADDRESS", "STATE", "CPUS", "FREE", "QUEUED", "ROLE"],
                s.members
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.address.clone(),
                            if !m.alive {
                                "DEAD".into()
                            } else if !m.reachable {
                                "UNREACHABLE".into()
                            } else {
                                "ALIVE".into()
                            },
                            format!("{}", m.cpus),
                            format!("{}", m.free_cpus),
                            m.queued.to_string(),
                            if m.head {
                                "head".into()
                            } else if m.cpus == 0.0 {
                                "driver".into()
                            } else {
                                "worker".into()
                            },
                        ]
                    })
                    .collect(),
            );
            println!();
            print_gcs(gcs);
        }
        Command::List { what, target } => {
            let (addr, tok) = locate(&target)?;
            let s = node::cluster_state(&addr, &tok)?;
            let json = target.json;
            match what {
                What::Nodes => emit(
                    json,
                    &s.members,
                    &["NODE", "ADDRESS", "STATE", "CPUS"],
                    |m| {
                        vec![
                            m.id.clone(),
                            m.address.clone(),
                            alive(m.alive),
                            format!("{}", m.cpus),
                        ]
                    },
                )?,
                What::Actors => {
                    let actors: Vec<_> = s.nodes.iter().flat_map(|n| n.actors.clone()).collect();
                    emit(
                        json,
                        &actors,
                        &["ACTOR", "CLASS", "NAME", "NODE", "STATE", "CALLS"],
                        |a| {
                            let name = a.name.clone().unwrap_or_default();
                            vec![
                                a.id.clone(),
                                a.class.clone(),
                                name,
                                a.node.clone(),
                                a.state.clone(),
                                a.calls.to_string(),
                            ]
                        },
                    )?
                }
                What::Tasks => {
                    let tasks: Vec<_> = s.nodes.iter().flat_map(|n| n.tasks.clone()).collect();
                    emit(json, &tasks, &["TASK", "NAME", "STATE", "NODE"], |t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.state.clone(),
                            t.owner.clone(),
                        ]
                    })?
                }
                What::Objects => {
                    let objects: Vec<_> = s.nodes.iter().flat_map(|n| n.objects.clone()).collect();
                    emit(
                        json,
                        &objects,
                        &["OBJECT", "READY", "SIZE", "WHERE", "OWNER"],
                        |o| {
                            vec![
                                o.id.clone(),
                                o.ready.to_string(),
                                o.size.to_string(),
                                o.location.clone(),
                                o.owner.clone(),
                            ]
                        },
                    )?
                }
                What::PlacementGroups => {
                    let bundles: Vec<_> = s.nodes.iter().flat_map(|n| n.bundles.clone()).collect();
                    emit(json, &bundles, &["GROUP", "BUNDLE", "CPUS", "NODE"], |b| {
                        vec![
                            b.group.clone(),
                            b.index.to_string(),
                            format!("{}", b.cpus),
                            b.node.clone(),
                        ]
                    })?
                }
            }
        }
        Command::Microbenchmark(b) => microbenchmark(b)?,
        Command::Stop(t) => {
            let (addr, tok) = locate(&t)?;
            node::stop_cluster(&addr, &tok)?;
            println!("stop sent to the cluster at {addr}");
        }
    }
    Ok(())
}

/// Kills the node process when the benchmark ends, however it ends.
struct Child(std::process::Child);
impl Drop for Child {
    /// Asks the node to stop with SIGTERM first, so a profiler wrapping it (`valgrind --trace-children=yes`)
    /// writes its data, then kills it if it is still there after a few seconds.
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < until {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn microbenchmark(b: BenchArgs) -> Result<()> {
    use std::io::BufRead;
    let cpus = b.num_cpus.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let mut _node = None;
    let mode;
    if b.embedded {
        oxray::init_with(oxray::Config {
            num_cpus: cpus,
            ..oxray::Config::default()
        })?;
        mode = "embedded (driver and node in one process)".to_string();
    } else {
        let dir = std::env::temp_dir().join(format!("oxray-bench-{}", std::process::id()));
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "start",
                "--head",
                "--num-cpus",
                &cpus.to_string(),
                "--data-dir",
            ])
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot start the node process")?;
        let out = child.stdout.take().context("no stdout from the node")?;
        let guard = Child(child);
        let mut address = None;
        let mut token = None;
        let mut lines = std::io::BufReader::new(out).lines();
        for line in lines.by_ref() {
            let line = line?;
            if let Some(a) = line.strip_prefix("address: ") {
                address = Some(a.trim().to_string());
            }
            if let Some(t) = line.strip_prefix("token: ") {
                token = Some(t.trim().to_string());
            }
            if address.is_some() && token.is_some() {
                break;
            }
        }
        // Keep reading what the node prints, so it never writes into a closed pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let (address, token) = (
            address.context("node printed no address")?,
            token.context("node printed no token")?,
        );
        oxray::connect(&address, &token)?;
        _node = Some(guard);
        let links = if oxray::Config::default().local_links {
            "call and result batches on a local link"
        } else {
            "all traffic on QUIC"
        };
        mode = format!(
            "driver and node in separate processes (node: {cpus} CPUs at {address}; {links})"
        );
    }
    let cfg = oxray::bench::BenchConfig {
        trials: b.trials,
        filter: b.filter.clone(),
        scale: b.scale,
        ..Default::default()
    };
    if !b.json {
        println!(
            "oxray microbenchmark: {mode}; {} trials per row, scale {}",
            b.trials, b.scale
        );
    }
    let json = b.json;
    let rows = oxray::bench::run(&cfg, |r| {
        if !json {
            let what = if r.unit == "GB/s" { "" } else { " per second" };
            println!("{}{} {:.2} +- {:.2}", r.name, what, r.mean, r.std);
        }
    })?;
    if b.json {
        let obj: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| (r.key.to_string(), serde_json::json!([r.mean, r.std])))
            .collect();
        println!("{}", serde_json::Value::Object(obj));
    }
    Ok(())
}
