//! Scaling benchmark: how throughput of CPU-bound tasks and the wall time of an evolution-strategies-like job change
//! with the number of node processes (each offering one CPU), with one driver process submitting the work.
//!
//! Usage: `cargo bench -p oxray-tests --bench scaling [-- --json] [--quick] [--nodes 1,2,4,8] [--tasks N]
//! [--work-ms F] [--population N] [--steps N] [--es-work-ms F] [--es-spread]`. With `--json` it prints one JSON object
//! (`{"nodes":[...], "tasks_per_s":[...], "es_wall_s":[...], ...}`) and nothing else on stdout.
//!
//! - Tasks: N tasks, each a fixed amount of CPU work (iterations calibrated here to about `--work-ms`, 1 ms by
//!   default), submitted at once and gathered; tasks/s and the number of distinct nodes they ran on.
//! - ES: one actor per node (pinned with node affinity); per step the driver puts the
//!   parameters once, every actor evaluates its share of a fixed population (each evaluation a fixed CPU job plus
//!   a real fitness on the perturbed parameters), and the driver combines the scores into the update. The total
//!   work is the same for every node count, so ideal scaling halves the wall time when the nodes double.
//!
//! What it is not: a statement about more cores than the machine has. Node processes beyond the core count share
//! the same cores, so the curve flattens at the core count; the output says so. It runs unchanged on a bigger
//! machine (`--nodes 1,2,4,8,16`). Processes and layout are as in `common/mod.rs`: this binary is also the node
//! executable, so the functions and the actor below exist on every node.

mod common;

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{Flags, param_u64};
use oxray::{ActorOptions, Strategy};
use serde_json::json;

const USAGE: &str = "usage: scaling [--json] [--quick] [--nodes 1,2,4,8] [--tasks N] [--work-ms F] \
                     [--population N] [--steps N] [--es-work-ms F] [--es-spread]";

/// Dimension of the ES parameter vector.
const ES_DIM: u64 = 1_000;
/// Noise scale of the ES perturbations.
const ES_SIGMA: f32 = 0.05;
/// ES learning rate.
const ES_LR: f32 = 0.02;

/// A task doing `iters` rounds of fixed CPU work; returns the tag of the node it ran on.
#[oxray::remote]
pub fn burn_task(iters: u64, seed: u64) -> u64 {
    common::burn(iters, seed);
    common::node_tag()
}

/// Deterministic Gaussian-ish noise for perturbation `seed` (sum of uniforms; no global RNG, so the driver
/// regenerates exactly what a worker used).
fn noise(seed: u64, dim: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..dim)
        .map(|_| (next() + next() + next() + next() - 2.0) * 1.7)
        .collect()
}

/// The objective: negative squared distance to a fixed target (maximum 0).
fn fitness(theta: &[f32]) -> f32 {
    -theta
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let target = (i % 7) as f32 / 7.0;
            (t - target) * (t - target)
        })
        .sum::<f32>()
}

/// An ES worker: evaluates perturbations of the parameters it is given.
#[derive(Debug, Default)]
pub struct EsWorker {
    evaluations: u64,
}

#[oxray::actor]
impl EsWorker {
    /// A fresh worker.
    pub fn new() -> Self {
        EsWorker::default()
    }
    /// Scores `theta + sigma * noise(seed)` for each seed, each evaluation costing `iters` rounds of CPU work
    /// (the stand-in for a rollout).
    pub fn evaluate(
        &mut self,
        theta: Vec<f32>,
        seeds: Vec<u64>,
        iters: u64,
        sigma: f32,
    ) -> Vec<f32> {
        seeds
            .iter()
            .map(|&s| {
                self.evaluations += 1;
                common::burn(iters, s);
                let eps = noise(s, theta.len());
                let candidate: Vec<f32> =
                    theta.iter().zip(&eps).map(|(t, e)| t + sigma * e).collect();
                fitness(&candidate)
            })
            .collect()
    }
    /// The tag of the node hosting this worker.
    pub fn node(&self) -> u64 {
        common::node_tag()
    }
}

fn main() -> ExitCode {
    oxray_tests::link();
    // Started as `<this binary> start ...`: run as a cluster node and never return.
    oxray::run_node_if_requested();
    let run = match common::child_role() {
        Some(role) => child_main(&role),
        None => orchestrate(),
    };
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The driver: joins the cluster, runs the task round and the ES job, reports.
fn child_main(role: &str) -> Result<()> {
    if role != "scale" {
        bail!("unknown driver role {role:?}");
    }
    let p = common::child_params()?;
    let nodes = param_u64(&p, "nodes")?;
    let tasks = param_u64(&p, "tasks")?;
    let iters = param_u64(&p, "iters")?;
    let population = param_u64(&p, "population")?;
    let steps = param_u64(&p, "steps")?;
    let es_iters = param_u64(&p, "es_iters")?;
    let spread = p["es_spread"].as_bool().unwrap_or(false);
    oxray::init().context("oxray::init")?;

    // Warm-up: a few tasks per node, so connections and the resource view exist before timing.
    let warm = (0..nodes * 4)
        .map(|i| burn_task::remote(iters, i))
        .collect::<oxray::Result<Vec<_>>>()?;
    oxray::get_all(&warm)?;

    let cpu0 = common::system_cpu_secs(&p);
    let t = Instant::now();
    let refs = (0..tasks)
        .map(|i| burn_task::remote(iters, i))
        .collect::<oxray::Result<Vec<_>>>()?;
    let tags = oxray::get_all(&refs)?;
    let task_secs = t.elapsed().as_secs_f64();
    let task_cpu = common::system_cpu_secs(&p) - cpu0;
    let task_nodes: HashSet<u64> = tags.into_iter().collect();

    // ES: one worker per node, pinned by node affinity. `--es-spread` asks for `Strategy::Spread` with
    // `num_cpus(1.0)` instead, which is what a Ray user would write. That did not spread before actors held their
    // CPUs in the node's queue (two workers on two 1-CPU nodes landed on one node); it does now (`es_nodes_used`
    // says so), but pinning stays the default and keeps the measurement about scaling, not placement.
    let t_setup = Instant::now();
    let workers = if spread {
        let opts = ActorOptions::new().num_cpus(1.0).strategy(Strategy::Spread);
        (0..nodes)
            .map(|_| EsWorker::remote_with(&opts))
            .collect::<oxray::Result<Vec<_>>>()?
    } else {
        let targets = cpu_nodes()?;
        if targets.len() as u64 != nodes {
            bail!(
                "the head lists {} nodes with CPUs, expected {nodes}",
                targets.len()
            );
        }
        targets
            .iter()
            .map(|&node| {
                let opts = ActorOptions::new()
                    .num_cpus(1.0)
                    .strategy(Strategy::NodeAffinity { node, soft: false });
                EsWorker::remote_with(&opts)
            })
            .collect::<oxray::Result<Vec<_>>>()?
    };
    let placed: Vec<_> = workers.iter().map(|w| w.node()).collect();
    let es_nodes: HashSet<u64> = oxray::get_all(&placed)?.into_iter().collect();
    let setup_secs = t_setup.elapsed().as_secs_f64();

    let dim = ES_DIM as usize;
    let mut theta = vec![0.0f32; dim];
    let fitness_start = fitness(&theta);
    let cpu0 = common::system_cpu_secs(&p);
    let t = Instant::now();
    for step in 0..steps {
        let theta_ref = oxray::put(&theta)?;
        let seeds: Vec<u64> = (0..population).map(|j| step * population + j).collect();
        // Round-robin shares: equal work per worker up to one evaluation.
        let calls: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(w, worker)| {
                let mine: Vec<u64> = seeds
                    .iter()
                    .skip(w)
                    .step_by(workers.len())
                    .copied()
                    .collect();
                (
                    mine.clone(),
                    worker.evaluate(&theta_ref, mine, es_iters, ES_SIGMA),
                )
            })
            .collect();
        let mut scored: Vec<(u64, f32)> = Vec::with_capacity(seeds.len());
        for (mine, r) in calls {
            let scores = r.get()?;
            if scores.len() != mine.len() {
                bail!(
                    "a worker returned {} scores for {} seeds",
                    scores.len(),
                    mine.len()
                );
            }
            scored.extend(mine.into_iter().zip(scores));
        }
        // Standardised scores weight the noise directions: the ES gradient estimate.
        let n = scored.len().max(1) as f32;
        let mean = scored.iter().map(|(_, s)| s).sum::<f32>() / n;
        let std = (scored.iter().map(|(_, s)| (s - mean).powi(2)).sum::<f32>() / n)
            .sqrt()
            .max(1e-6);
        let mut grad = vec![0.0f32; dim];
        for (seed, s) in &scored {
            let w = (s - mean) / std;
            for (g, e) in grad.iter_mut().zip(noise(*seed, dim)) {
                *g += w * e;
            }
        }
        for (t, g) in theta.iter_mut().zip(grad) {
            *t += ES_LR / (n * ES_SIGMA) * g;
        }
    }
    let es_secs = t.elapsed().as_secs_f64();
    let es_cpu = common::system_cpu_secs(&p) - cpu0;
    let fitness_end = fitness(&theta);

    common::child_write(&json!({
        "tasks_per_s": tasks as f64 / task_secs,
        "task_secs": task_secs,
        "task_nodes_used": task_nodes.len(),
        "task_cpu_s": task_cpu,
        "task_cores_busy": task_cpu / task_secs,
        "task_cpu_ms_per_task": task_cpu * 1e3 / tasks as f64,
        "es_cpu_s": es_cpu,
        "es_cores_busy": es_cpu / es_secs,
        "es_wall_s": es_secs,
        "es_setup_s": setup_secs,
        "es_nodes_used": es_nodes.len(),
        "es_fitness_start": fitness_start,
        "es_fitness_end": fitness_end,
    }))
}

/// The ids (short form, as `oxray status` prints them) of the alive nodes that offer CPUs, from the head.
fn cpu_nodes() -> Result<Vec<u128>> {
    let address = std::env::var("OXRAY_ADDRESS").context("driver started without OXRAY_ADDRESS")?;
    let token = std::env::var("OXRAY_TOKEN").context("driver started without OXRAY_TOKEN")?;
    let state =
        oxray::node::cluster_state(&address, &token).context("cannot read the cluster state")?;
    state
        .members
        .iter()
        .filter(|m| m.alive && m.cpus > 0.0)
        .map(|m| {
            u128::from_str_radix(&m.id, 16)
                .with_context(|| format!("node id {:?} is not hex", m.id))
        })
        .collect()
}

fn parse_nodes(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--nodes wants a list like 1,2,4,8, got {s:?}"))?;
    if v.is_empty() || v.contains(&0) {
        bail!("--nodes wants positive counts, got {s:?}");
    }
    Ok(v)
}

fn orchestrate() -> Result<()> {
    let flags = Flags::parse(
        &[
            "--json",
            "--quick",
            "--nodes",
            "--tasks",
            "--work-ms",
            "--population",
            "--steps",
            "--es-work-ms",
            "--es-spread",
        ],
        USAGE,
    )?;
    let json_out = flags.has("--json");
    let quick = flags.has("--quick");
    let nodes =
        parse_nodes(
            flags
                .value("--nodes")
                .unwrap_or(if quick { "1,2" } else { "1,2,4,8" }),
        )?;
    let tasks: u64 = flags.number("--tasks", if quick { 300 } else { 2_000 })?;
    let work_ms: f64 = flags.number("--work-ms", 1.0)?;
    let population: u64 = flags.number("--population", if quick { 16 } else { 96 })?;
    let steps: u64 = flags.number("--steps", if quick { 2 } else { 5 })?;
    let es_work_ms: f64 = flags.number("--es-work-ms", 2.0)?;
    let es_spread = flags.has("--es-spread");
    if tasks == 0
        || population == 0
        || steps == 0
        || !work_ms.is_finite()
        || work_ms <= 0.0
        || !es_work_ms.is_finite()
        || es_work_ms <= 0.0
    {
        bail!("sizes must be positive\n{USAGE}");
    }
    let cores = common::cores();
    let iters = common::calibrate_burn(Duration::from_secs_f64(work_ms / 1e3));
    let es_iters = common::calibrate_burn(Duration::from_secs_f64(es_work_ms / 1e3));
    let load_before = common::load_average();
    if !json_out {
        println!(
            "oxray scaling benchmark: {cores} cores, load average {} at start",
            load_before.map_or("unknown".into(), |l| format!("{l:.2}"))
        );
        println!(
            "  layout per point: 1 driver process (0 CPUs) + N node processes (a head and N-1 workers, --num-cpus 1 each)"
        );
        println!(
            "  tasks: {tasks} tasks of {work_ms} ms CPU each ({iters} iterations, calibrated here); \
             ES: {steps} steps x {population} evaluations of {es_work_ms} ms ({es_iters} iterations), one actor per node ({})",
            if es_spread {
                "placed by Strategy::Spread"
            } else {
                "pinned by node affinity"
            }
        );
    }

    let mut rows = Vec::new();
    for &n in &nodes {
        let mut params = json!({
            "nodes": n,
            "tasks": tasks,
            "iters": iters,
            "population": population,
            "steps": steps,
            "es_iters": es_iters,
            "es_spread": es_spread,
        });
        let cpu_before = common::children_cpu_secs();
        let t = Instant::now();
        let cluster = common::start_cluster(1, n - 1, 1)?;
        let start_secs = t.elapsed().as_secs_f64();
        // The node processes, so the driver can count the CPU they spend in each phase.
        params["node_pids"] = json!(common::child_pids());
        let mut r = common::run_driver("scale", &params, Some(&cluster))?;
        // Killing and reaping the nodes makes their CPU time visible in this process's children counters.
        drop(cluster);
        let point_secs = t.elapsed().as_secs_f64();
        let cpu = common::children_cpu_secs()
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        r["point_s"] = json!(point_secs);
        r["cpu_s"] = json!(cpu);
        r["cores_used"] = json!(cpu.map(|c| c / point_secs));
        if !json_out {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {n:>3} nodes: tasks ran on {} node(s), ES workers on {} node(s) (fitness {:.1} -> {:.1}); \
                 cluster start {start_secs:.2} s, {point_secs:.1} s in all",
                f("task_nodes_used"),
                f("es_nodes_used"),
                f("es_fitness_start"),
                f("es_fitness_end"),
            );
        }
        rows.push((n, r));
    }
    let load_after = common::load_average();

    let col =
        |k: &str| -> Vec<serde_json::Value> { rows.iter().map(|(_, r)| r[k].clone()).collect() };
    let ideal_tasks = 1e3 / work_ms;
    let out = json!({
        "nodes": nodes,
        "tasks_per_s": col("tasks_per_s"),
        "es_wall_s": col("es_wall_s"),
        "task_nodes_used": col("task_nodes_used"),
        "es_nodes_used": col("es_nodes_used"),
        "es_setup_s": col("es_setup_s"),
        "cores_used": col("cores_used"),
        "task_cores_busy": col("task_cores_busy"),
        "task_cpu_ms_per_task": col("task_cpu_ms_per_task"),
        "es_cores_busy": col("es_cores_busy"),
        "cpu_s": col("cpu_s"),
        "config": {
            "cores": cores,
            "load_average_start": load_before,
            "load_average_end": load_after,
            "processes": "1 driver (0 CPUs) + N node processes, --num-cpus 1 each, QUIC with mutual TLS on loopback; call and result batches on local links unless OXRAY_LOCAL_LINKS=0",
            "tasks": tasks,
            "work_ms": work_ms,
            "work_iters": iters,
            "es_population": population,
            "es_steps": steps,
            "es_work_ms": es_work_ms,
            "es_work_iters": es_iters,
            "es_placement": if es_spread { "Strategy::Spread" } else { "NodeAffinity, one per node" },
            "ideal_tasks_per_s_per_node": ideal_tasks,
        },
    });
    if json_out {
        println!("{out}");
        return Ok(());
    }
    println!();
    println!(
        "{:>6} {:>10} {:>10} {:>11} {:>12} {:>10} {:>10} {:>11}",
        "nodes",
        "tasks/s",
        "vs 1 node",
        "cores busy",
        "CPU ms/task",
        "ES wall s",
        "vs 1 node",
        "cores busy"
    );
    let base = rows.first().map(|(_, r)| {
        (
            r["tasks_per_s"].as_f64().unwrap_or(f64::NAN),
            r["es_wall_s"].as_f64().unwrap_or(f64::NAN),
        )
    });
    for (n, r) in &rows {
        let tp = r["tasks_per_s"].as_f64().unwrap_or(f64::NAN);
        let es = r["es_wall_s"].as_f64().unwrap_or(f64::NAN);
        let (bt, be) = base.unwrap_or((f64::NAN, f64::NAN));
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{n:>6} {tp:>10.0} {:>9.2}x {:>11.2} {:>12.2} {es:>10.2} {:>9.2}x {:>11.2}",
            tp / bt,
            f("task_cores_busy"),
            f("task_cpu_ms_per_task"),
            be / es,
            f("es_cores_busy"),
        );
    }
    println!(
        "  ideal: {ideal_tasks:.0} tasks/s per node (one {work_ms} ms task per CPU at a time); \
         ES ideal wall time halves when the nodes double"
    );
    println!(
        "  this machine has {cores} cores: node processes beyond {cores} share them, so both curves flatten at {cores} nodes \
         (more nodes than cores measure overhead, not capacity)"
    );
    println!(
        "  cores busy = CPU seconds of the driver and all node processes during the phase / its wall time; \
         CPU ms/task = the same CPU per task (work plus every overhead)"
    );
    println!(
        "  the machine is shared: when other work runs (see the load average), more node processes also win a larger \
         share of the cores from it, so read tasks/s beside cores busy"
    );
    println!(
        "  load average at end: {}",
        load_after.map_or("unknown".into(), |l| format!("{l:.2}"))
    );
    Ok(())
}
