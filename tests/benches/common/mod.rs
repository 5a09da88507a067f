//! Plumbing shared by the end-to-end benchmarks (`scheduler`, `scaling`): command-line flags, child driver
//! processes, clusters of node processes, percentiles.
//!
//! How the processes are laid out: the benchmark binary is three things at once.
//! - Run by `cargo bench` it is the *orchestrator*: it starts no oxray runtime of its own.
//! - Started as `<bench exe> start --head|--address ...` it is a *cluster node* (`oxray::run_node_if_requested`),
//!   so every node has this binary's functions and actors compiled in. The node executable is therefore
//!   `std::env::current_exe()`, the bench binary itself (in `target/release/deps/`), not `oxray-test-node`.
//! - Started with `OXRAY_BENCH_CHILD=<role>` it is a *driver*: it calls `oxray::init()` (embedded, or joining the
//!   cluster named by `OXRAY_ADDRESS`/`OXRAY_TOKEN`), measures, and writes one JSON object to the file named by
//!   `OXRAY_BENCH_OUT`.
//!
//! One oxray runtime per process is why the modes run in separate driver processes. This is benchmark code, not a
//! library: a failure to start a process ends the run with an error message.

#![allow(dead_code)] // each bench binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use oxray_tests::harness::TestCluster;

/// Env var that turns the bench binary into a driver child; its value names the role.
pub const CHILD_ROLE: &str = "OXRAY_BENCH_CHILD";
/// Env var naming the file a driver child writes its JSON result to.
pub const CHILD_OUT: &str = "OXRAY_BENCH_OUT";
/// Env var carrying the driver's parameters as JSON.
pub const CHILD_PARAMS: &str = "OXRAY_BENCH_PARAMS";

/// Upper bound on one driver child's run: a hung cluster ends the benchmark with an error instead of a hang.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Command-line flags: `--name value` pairs and bare switches; `--bench` (added by `cargo bench`) is ignored.
#[derive(Debug)]
pub struct Flags {
    args: Vec<String>,
}

impl Flags {
    /// Parses this process's arguments, rejecting any flag not in `known` (switches and valued flags alike).
    pub fn parse(known: &[&str], usage: &str) -> Result<Flags> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        for a in &args {
            if a.starts_with("--") && a != "--bench" && !known.contains(&a.as_str()) {
                bail!("unknown flag {a}\n{usage}");
            }
        }
        Ok(Flags { args })
    }

    /// Whether the switch is present.
    pub fn has(&self, name: &str) -> bool {
        self.args.iter().any(|a| a == name)
    }

    /// The value after `name`, if any.
    pub fn value(&self, name: &str) -> Option<&str> {
        let i = self.args.iter().position(|a| a == name)?;
        self.args.get(i + 1).map(String::as_str)
    }

    /// The value after `name` parsed as a number (underscores allowed), or `default`.
    pub fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .replace('_', "")
                .parse()
                .map_err(|_| anyhow::anyhow!("{name} wants a number, got {v:?}")),
        }
    }
}

/// The machine as the benchmark reports it.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The 1-minute load average (Linux), to state how busy the machine was.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The node executable: this benchmark binary, which becomes a node when started as `<exe> start ...`.
pub fn node_exe() -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the benchmark executable")?;
    exe.to_str()
        .map(str::to_string)
        .context("the benchmark executable's path is not UTF-8")
}

/// Starts a head with `head_cpus` CPUs and `workers` more nodes with `worker_cpus` each (all real processes on
/// loopback). Dropping the returned cluster kills them.
pub fn start_cluster(head_cpus: u32, workers: usize, worker_cpus: u32) -> Result<TestCluster> {
    let exe = node_exe()?;
    // The harness panics with a message when a node does not come up; turn that into an error.
    std::panic::catch_unwind(move || {
        let mut c = TestCluster::start(&exe, head_cpus, &[]);
        for _ in 0..workers {
            c.add_node(worker_cpus, &[]);
        }
        c
    })
    .map_err(|_| anyhow::anyhow!("the cluster's node processes did not start"))
}

/// A driver child process; killed if dropped before it finishes.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs this binary as a driver child with `role` and `params`, joined to `cluster` (or embedded when `None`),
/// and returns the JSON it wrote. The child's stdout is discarded (it reports through the file) and its stderr
/// is passed through, so warnings stay visible.
pub fn run_driver(
    role: &str,
    params: &serde_json::Value,
    cluster: Option<&TestCluster>,
) -> Result<serde_json::Value> {
    let out_dir = tempfile::tempdir().context("cannot create a temp dir")?;
    let out_path: PathBuf = out_dir.path().join("result.json");
    let mut cmd = Command::new(node_exe()?);
    cmd.env(CHILD_ROLE, role)
        .env(CHILD_OUT, &out_path)
        .env(CHILD_PARAMS, params.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    match cluster {
        Some(c) => {
            cmd.env("OXRAY_ADDRESS", &c.address)
                .env("OXRAY_TOKEN", &c.token);
        }
        None => {
            // Embedded: make sure an inherited cluster address does not turn it into a driver.
            cmd.env_remove("OXRAY_ADDRESS").env_remove("OXRAY_TOKEN");
        }
    }
    let child = cmd.spawn().context("cannot start a driver process")?;
    let mut guard = ChildGuard(Some(child));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        let Some(c) = guard.0.as_mut() else {
            bail!("driver process handle lost");
        };
        if let Some(s) = c.try_wait().context("cannot wait for the driver")? {
            guard.0 = None;
            break s;
        }
        if Instant::now() > deadline {
            bail!("driver {role} ran longer than {CHILD_TIMEOUT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!("driver {role} failed: {status}");
    }
    read_json(&out_path)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the driver wrote no result to {}", path.display()))?;
    serde_json::from_str(&text).context("the driver's result is not JSON")
}

/// In a driver child: this child's role, if the process was started as one.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ROLE).ok()
}

/// In a driver child: its parameters.
pub fn child_params() -> Result<serde_json::Value> {
    let text = std::env::var(CHILD_PARAMS).context("driver started without parameters")?;
    serde_json::from_str(&text).context("driver parameters are not JSON")
}

/// In a driver child: writes the result where the orchestrator reads it.
pub fn child_write(result: &serde_json::Value) -> Result<()> {
    let path = std::env::var(CHILD_OUT).context("driver started without an output path")?;
    std::fs::write(&path, result.to_string()).with_context(|| format!("cannot write {path}"))
}

/// Reads a `u64` parameter.
pub fn param_u64(p: &serde_json::Value, key: &str) -> Result<u64> {
    p[key]
        .as_u64()
        .with_context(|| format!("parameter {key} missing or not an integer"))
}

/// The `q`-quantile (0..=1) of `sorted` by nearest rank; 0 for an empty slice.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Mean and population standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// A fixed amount of CPU work: `iters` rounds of an integer mix the optimiser cannot remove. Returns the mix so
/// callers can pass it on.
pub fn burn(iters: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    for i in 0..iters {
        // xorshift64 plus a counter: cheap, serial (no vectorising away), and data-dependent.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    std::hint::black_box(x)
}

/// Iterations of [`burn`] that take about `target` of CPU on this machine, calibrated on this thread (minimum
/// of several runs, so a busy machine inflates the figure less).
pub fn calibrate_burn(target: Duration) -> u64 {
    let probe = 200_000u64;
    let mut best = f64::MAX;
    for s in 0..15 {
        let t = Instant::now();
        burn(probe, s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let per_iter = best / probe as f64;
    ((target.as_secs_f64() / per_iter.max(1e-12)) as u64).max(1)
}

/// CPU seconds (user + system) used so far by this process's children that have exited and been waited for
/// (`cutime` + `cstime` of `/proc/self/stat`; Linux reports them in USER_HZ = 100 ticks per second). The nodes
/// and drivers are such children once their cluster is dropped, so a difference across one measurement point is
/// the CPU the point's processes got. `None` where `/proc` is unavailable.
pub fn children_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; the fields after its closing parenthesis are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")" come field 3 (state) onwards: cutime is field 16, cstime field 17, i.e. indexes 13 and 14 here.
    let cutime: f64 = fields.get(13)?.parse().ok()?;
    let cstime: f64 = fields.get(14)?.parse().ok()?;
    Some((cutime + cstime) / 100.0)
}

/// A tag for the node this process is (stable within the process), so a driver can count the nodes its tasks
/// ran on. Computed once per process: the node snapshot is not free.
pub fn node_tag() -> u64 {
    static TAG: OnceLock<u64> = OnceLock::new();
    *TAG.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let id = oxray::node_state().map(|s| s.node.id).unwrap_or_default();
        // DefaultHasher::new() has fixed keys: the same id hashes the same in every process.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        h.finish()
    })
}

/// Process ids of this process's live children (from `/proc/self/task/*/children`; empty where unavailable).
/// Called right after a cluster starts and before its driver is spawned, these are the cluster's node processes.
pub fn child_pids() -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// CPU seconds (user + system, all threads) used so far by process `pid` (`"self"` for this one), from
/// `/proc/<pid>/stat` in USER_HZ = 100 ticks per second. `None` if the process is gone or `/proc` is absent.
pub fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")" the fields start at field 3 (state): utime is field 14, stime field 15, i.e. indexes 11 and 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// In a driver child: CPU seconds used so far by the driver itself plus the node processes listed in the
/// parameter `node_pids` (absent in embedded runs). Differences across a phase give the CPU the whole system
/// spent on it, which stays meaningful on a machine shared with other work, unlike wall time alone.
pub fn system_cpu_secs(params: &serde_json::Value) -> f64 {
    let nodes: f64 = params["node_pids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_u64)
                .filter_map(|p| proc_cpu_secs(&p.to_string()))
                .sum()
        })
        .unwrap_or(0.0);
    nodes + proc_cpu_secs("self").unwrap_or(0.0)
}
