//! The functions and actors of `oxray microbenchmark`, compiled into every oxray binary so that any node can run
//! them, and the row definitions: the same rows, meaning and names as `ray microbenchmark`.
//!
//! Each row runs a fixed amount of work per trial and reports operations per second (or GB/s for the two
//! "gigabytes" rows) as mean and standard deviation over trials, like Ray's `timeit`.

use std::time::Instant;

use crate::{ActorOptions, ObjectRef, Result};

/// An empty task: the unit of task overhead.
#[crate::remote]
pub fn small_value() -> u64 {
    0
}

/// Puts `n` small objects from inside a task (the multi-client put row).
#[crate::remote]
pub fn put_small_many(n: u32) -> u32 {
    for _ in 0..n {
        let _ = crate::put(&0u64);
    }
    n
}

/// Puts `n` objects of `bytes` bytes from inside a task (the multi-client put gigabytes row).
#[crate::remote]
pub fn put_large_many(n: u32, bytes: u64) -> u64 {
    let data = vec![1u8; bytes as usize];
    for _ in 0..n {
        let _ = crate::put(&data);
    }
    bytes * n as u64
}

/// Puts `n` small objects and returns the refs (the "object containing 10k refs" row, as in Ray's script).
#[crate::remote]
pub fn create_object_containing_refs(n: u64) -> Vec<ObjectRef<u64>> {
    (0..n).filter_map(|_| crate::put(&1u64).ok()).collect()
}

/// Fails unless all `n` refs the 10k-refs rows asked for came back.
fn all_refs_back(refs: &[ObjectRef<u64>], n: u64) -> Result<()> {
    if refs.len() as u64 != n {
        return Err(crate::Error::Cluster(format!(
            "{} refs came back, not {n}",
            refs.len()
        )));
    }
    Ok(())
}

/// Submits `n` empty tasks and waits for all of them (the multi-client task row's client).
#[crate::remote]
pub fn submit_many(n: u32) -> u32 {
    let refs: Vec<ObjectRef<u64>> = (0..n).filter_map(|_| small_value::remote().ok()).collect();
    crate::get_all(&refs).map(|v| v.len() as u32).unwrap_or(0)
}

/// The server side of the actor rows.
#[derive(Debug, Default)]
pub struct BenchActor {
    calls: u64,
    shared_calls: std::sync::atomic::AtomicU64,
}

#[crate::actor]
impl BenchActor {
    /// A fresh actor.
    pub fn new() -> Self {
        BenchActor::default()
    }
    /// An empty method.
    pub fn small_value(&mut self) -> u64 {
        self.calls += 1;
        0
    }
    /// An empty method on a shared reference: with `max_concurrency` above 1, calls to it overlap (the
    /// "concurrent" row, like Ray's threaded actor).
    pub fn small_value_shared(&self) -> u64 {
        self.shared_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        0
    }
    /// An empty method taking an argument.
    pub fn small_value_arg(&mut self, x: u64) -> u64 {
        self.calls += 1;
        x
    }
    /// An empty method taking a vector argument (passed as a ref by the caller).
    pub fn small_value_batch(&mut self, v: Vec<u8>) -> u64 {
        self.calls += 1;
        v.len() as u64
    }
    /// An empty async method.
    pub async fn small_value_async(&mut self) -> u64 {
        self.calls += 1;
        0
    }
    /// An empty async method taking an argument.
    pub async fn small_value_arg_async(&mut self, x: u64) -> u64 {
        self.calls += 1;
        x
    }
}

/// The client side of the actor rows: an actor that calls other actors.
#[derive(Debug)]
pub struct BenchClient {
    servers: Vec<String>,
}

#[crate::actor]
impl BenchClient {
    /// A client of the named servers.
    pub fn new(servers: Vec<String>) -> Self {
        BenchClient { servers }
    }
    /// Makes `n` calls spread over the servers, all in flight at once, and waits for them.
    pub fn call_servers(&mut self, n: u32, use_async: bool) -> u32 {
        let handles: Vec<_> = self
            .servers
            .iter()
            .filter_map(|s| crate::get_actor::<BenchActor>(s).ok())
            .collect();
        if handles.is_empty() {
            return 0;
        }
        let refs: Vec<ObjectRef<u64>> = (0..n as usize)
            .map(|i| {
                let h = &handles[i % handles.len()];
                if use_async {
                    h.small_value_async()
                } else {
                    h.small_value()
                }
            })
            .collect();
        crate::get_all(&refs).map(|v| v.len() as u32).unwrap_or(0)
    }
    /// Makes `n` calls to the first server, each with a put object as its argument.
    pub fn call_with_arg(&mut self, n: u32) -> u32 {
        let Some(h) = self
            .servers
            .first()
            .and_then(|s| crate::get_actor::<BenchActor>(s).ok())
        else {
            return 0;
        };
        let Ok(arg) = crate::put(&vec![0u8; 64]) else {
            return 0;
        };
        let refs: Vec<ObjectRef<u64>> = (0..n).map(|_| h.small_value_batch(&arg)).collect();
        crate::get_all(&refs).map(|v| v.len() as u32).unwrap_or(0)
    }
}

/// One benchmark row's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Ray's printed name.
    pub name: &'static str,
    /// Ray's JSON key.
    pub key: &'static str,
    /// Mean operations per second (GB/s for the gigabytes rows).
    pub mean: f64,
    /// Standard deviation over trials.
    pub std: f64,
    /// Unit of `mean`.
    pub unit: &'static str,
}

/// How to run the rows.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Trials per row (after one warm-up).
    pub trials: usize,
    /// Only rows whose key contains this (Ray's `TESTS_TO_RUN`).
    pub filter: Option<String>,
    /// Scale of the per-trial work (1.0 = Ray's amounts).
    pub scale: f64,
    /// Actors per "n" in the 1:n and n:n rows.
    pub n: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        BenchConfig {
            trials: 5,
            filter: None,
            scale: 1.0,
            n: (cpus / 2).max(1),
        }
    }
}

fn stats(samples: &[f64]) -> (f64, f64) {
    let n = samples.len().max(1) as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Runs `trial` (which returns the number of operations done) `trials` times after a warm-up; ops/s mean and std.
fn timeit(trials: usize, mut trial: impl FnMut() -> Result<f64>) -> Result<(f64, f64)> {
    trial()?;
    let mut rates = Vec::with_capacity(trials);
    for _ in 0..trials {
        let t = Instant::now();
        let ops = trial()?;
        rates.push(ops / t.elapsed().as_secs_f64());
    }
    Ok(stats(&rates))
}

/// Runs every selected row; `report` is called after each row (for progress output).
pub fn run(cfg: &BenchConfig, mut report: impl FnMut(&Row)) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let scaled = |n: f64| ((n * cfg.scale).round() as usize).max(1);
    let want = |key: &str| cfg.filter.as_deref().is_none_or(|f| key.contains(f));
    let mut push = |name: &'static str, key: &'static str, unit: &'static str, r: (f64, f64)| {
        let row = Row {
            name,
            key,
            mean: r.0,
            std: r.1,
            unit,
        };
        report(&row);
        rows.push(row);
    };
    let t = cfg.trials;

    if want("single_client_get_calls_Plasma_Store") {
        let value = crate::put(&0u64)?;
        let n = scaled(10_000.0);
        let r = timeit(t, || {
            for _ in 0..n {
                value.get()?;
            }
            Ok(n as f64)
        })?;
        push(
            "single client get calls (Plasma Store)",
            "single_client_get_calls_Plasma_Store",
            "ops/s",
            r,
        );
    }
    if want("single_client_put_calls_Plasma_Store") {
        let n = scaled(10_000.0);
        let r = timeit(t, || {
            for _ in 0..n {
                crate::put(&0u64)?;
            }
            Ok(n as f64)
        })?;
        push(
            "single client put calls (Plasma Store)",
            "single_client_put_calls_Plasma_Store",
            "ops/s",
            r,
        );
    }
    if want("multi_client_put_calls_Plasma_Store") {
        let per = scaled(100.0) as u32;
        let r = timeit(t, || {
            let refs: Vec<_> = (0..10)
                .map(|_| put_small_many::remote(per))
                .collect::<Result<_>>()?;
            crate::get_all(&refs)?;
            Ok(10.0 * per as f64)
        })?;
        push(
            "multi client put calls (Plasma Store)",
            "multi_client_put_calls_Plasma_Store",
            "ops/s",
            r,
        );
    }
    if want("gigabytes") {
        // The bound of the two gigabytes rows, measured in the same run: copying the same amount between two
        // buffers whose pages are already mapped.
        let bytes = scaled(800.0 * 1024.0 * 1024.0);
        let src = vec![1u8; bytes];
        let mut dst = vec![2u8; bytes];
        let r = timeit(t, || {
            dst.copy_from_slice(&src);
            std::hint::black_box(&mut dst);
            Ok(bytes as f64 / 1e9)
        })?;
        push(
            "memcpy gigabytes (reference, not a Ray row)",
            "memcpy_gigabytes",
            "GB/s",
            r,
        );
    }
    if want("single_client_put_gigabytes") {
        let bytes = scaled(800.0 * 1024.0 * 1024.0);
        // Touched pages (not calloc's shared zero page), so the figure is comparable with the memcpy row.
        let data = vec![1u8; bytes];
        let r = timeit(t, || {
            crate::put(&data)?;
            Ok(bytes as f64 / 1e9)
        })?;
        push(
            "single client put gigabytes",
            "single_client_put_gigabytes",
            "GB/s",
            r,
        );
    }
    // The rows counted in rounds (a batch of 1,000 tasks, a list of 10,000 refs, a wait over 1,000 refs) keep
    // Ray's round size at every scale; the scale sets how many rounds a trial runs.
    let rounds = scaled(4.0);
    if want("single_client_tasks_and_get_batch") {
        let r = timeit(t, || {
            for _ in 0..rounds {
                let refs: Vec<_> = (0..1000)
                    .map(|_| small_value::remote())
                    .collect::<Result<_>>()?;
                crate::get_all(&refs)?;
            }
            Ok(rounds as f64)
        })?;
        push(
            "single client tasks and get batch",
            "single_client_tasks_and_get_batch",
            "batches/s",
            r,
        );
    }
    if want("multi_client_put_gigabytes") {
        let bytes = scaled(80.0 * 1024.0 * 1024.0) as u64;
        let r = timeit(t, || {
            let refs: Vec<_> = (0..10)
                .map(|_| put_large_many::remote(10, bytes))
                .collect::<Result<_>>()?;
            let total: u64 = crate::get_all(&refs)?.iter().sum();
            Ok(total as f64 / 1e9)
        })?;
        push(
            "multi client put gigabytes",
            "multi_client_put_gigabytes",
            "GB/s",
            r,
        );
    }
    if want("single_client_get_object_containing_10k_refs") {
        // As in Ray's script: a task on the node puts 10,000 small objects and returns their refs, once; each round
        // is one `get` of that same object, which decodes the 10,000 refs (handles that fetch only if used).
        let n = 10_000;
        let object = create_object_containing_refs::remote(n)?;
        let gets = scaled(40.0);
        let r = timeit(t, || {
            for _ in 0..gets {
                all_refs_back(&object.get()?, n)?;
            }
            Ok(gets as f64)
        })?;
        push(
            "single client get object containing 10k refs",
            "single_client_get_object_containing_10k_refs",
            "ops/s",
            r,
        );
    }
    if want("single_client_create_and_get_object_containing_10k_refs") {
        // Not a Ray row: the row above with the object made anew each round (10,000 puts in a task on the node,
        // then the get), which earlier notes reported under the Ray row's name.
        let n = 10_000;
        let r = timeit(t, || {
            for _ in 0..rounds {
                all_refs_back(&create_object_containing_refs::remote(n)?.get()?, n)?;
            }
            Ok(rounds as f64)
        })?;
        push(
            "single client create and get object containing 10k refs (not a Ray row)",
            "single_client_create_and_get_object_containing_10k_refs",
            "ops/s",
            r,
        );
    }
    if want("single_client_wait_1k_refs") {
        let r = timeit(t, || {
            for _ in 0..rounds {
                let mut refs: Vec<_> = (0..1000)
                    .map(|_| small_value::remote())
                    .collect::<Result<_>>()?;
                while !refs.is_empty() {
                    let (_ready, rest) = crate::wait(&refs, 1, None);
                    refs = rest;
                }
            }
            Ok(rounds as f64)
        })?;
        push(
            "single client wait 1k refs",
            "single_client_wait_1k_refs",
            "rounds/s",
            r,
        );
    }
    if want("single_client_tasks_sync") {
        let n = scaled(1000.0);
        let r = timeit(t, || {
            for _ in 0..n {
                small_value::remote()?.get()?;
            }
            Ok(n as f64)
        })?;
        push(
            "single client tasks sync",
            "single_client_tasks_sync",
            "ops/s",
            r,
        );
    }
    if want("single_client_tasks_async") {
        let n = scaled(10_000.0);
        let r = timeit(t, || {
            let refs: Vec<_> = (0..n)
                .map(|_| small_value::remote())
                .collect::<Result<_>>()?;
            crate::get_all(&refs)?;
            Ok(n as f64)
        })?;
        push(
            "single client tasks async",
            "single_client_tasks_async",
            "ops/s",
            r,
        );
    }
    if want("multi_client_tasks_async") {
        let per = scaled(10_000.0) as u32;
        let r = timeit(t, || {
            let refs: Vec<_> = (0..4)
                .map(|_| submit_many::remote(per))
                .collect::<Result<_>>()?;
            let done: u32 = crate::get_all(&refs)?.iter().sum();
            Ok(done as f64)
        })?;
        push(
            "multi client tasks async",
            "multi_client_tasks_async",
            "ops/s",
            r,
        );
    }
    let actor_rows: [(&str, &str, bool); 2] = [
        ("1:1 actor calls sync", "1_1_actor_calls_sync", false),
        (
            "1:1 async-actor calls sync",
            "1_1_async_actor_calls_sync",
            true,
        ),
    ];
    for (name, key, is_async) in actor_rows {
        if want(key) {
            let a = BenchActor::remote()?;
            let n = scaled(2000.0);
            let r = timeit(t, || {
                for _ in 0..n {
                    if is_async {
                        a.small_value_async().get()?
                    } else {
                        a.small_value().get()?
                    };
                }
                Ok(n as f64)
            })?;
            push(name, key, "ops/s", r);
        }
    }
    let async_rows: [(&str, &str, u8); 4] = [
        ("1:1 actor calls async", "1_1_actor_calls_async", 0),
        (
            "1:1 actor calls concurrent",
            "1_1_actor_calls_concurrent",
            1,
        ),
        (
            "1:1 async-actor calls async",
            "1_1_async_actor_calls_async",
            2,
        ),
        (
            "1:1 async-actor calls with args async",
            "1_1_async_actor_calls_with_args_async",
            3,
        ),
    ];
    for (name, key, mode) in async_rows {
        if want(key) {
            let opts = if mode == 1 {
                ActorOptions::new().max_concurrency(16)
            } else {
                ActorOptions::new()
            };
            let a = BenchActor::remote_with(&opts)?;
            let n = scaled(10_000.0);
            let r = timeit(t, || {
                let refs: Vec<ObjectRef<u64>> = (0..n)
                    .map(|i| match mode {
                        2 => a.small_value_async(),
                        3 => a.small_value_arg_async(i as u64),
                        1 => a.small_value_shared(),
                        _ => a.small_value(),
                    })
                    .collect();
                crate::get_all(&refs)?;
                Ok(n as f64)
            })?;
            push(name, key, "ops/s", r);
        }
    }
    let fan_rows: [(&str, &str, bool, bool); 4] = [
        (
            "1:n actor calls async",
            "1_n_actor_calls_async",
            false,
            false,
        ),
        (
            "n:n actor calls async",
            "n_n_actor_calls_async",
            true,
            false,
        ),
        (
            "1:n async-actor calls async",
            "1_n_async_actor_calls_async",
            false,
            true,
        ),
        (
            "n:n async-actor calls async",
            "n_n_async_actor_calls_async",
            true,
            true,
        ),
    ];
    for (name, key, many_clients, is_async) in fan_rows {
        if want(key) {
            let tag = crate::object::rand_u128();
            let servers: Vec<String> = (0..cfg.n).map(|i| format!("bench-{tag:x}-{i}")).collect();
            let _actors: Vec<_> = servers
                .iter()
                .map(|s| BenchActor::remote_with(&ActorOptions::new().name(s)))
                .collect::<Result<_>>()?;
            let clients: Vec<_> = if many_clients {
                (0..4)
                    .map(|_| BenchClient::remote(servers.clone()))
                    .collect::<Result<_>>()?
            } else {
                vec![BenchClient::remote(servers.clone())?]
            };
            let per = if many_clients {
                scaled(5000.0)
            } else {
                scaled(5000.0) * cfg.n
            } as u32;
            let r = timeit(t, || {
                let refs: Vec<_> = clients
                    .iter()
                    .map(|c| c.call_servers(per, is_async))
                    .collect();
                let done: u32 = crate::get_all(&refs)?.iter().sum();
                Ok(done as f64)
            })?;
            push(name, key, "ops/s", r);
        }
    }
    if want("placement_group_create_removal") {
        let n = scaled(100.0);
        let bundle = crate::Resources {
            num_cpus: 0.001,
            ..Default::default()
        };
        let r = timeit(t, || {
            let groups: Vec<_> = (0..n)
                .map(|_| {
                    crate::pg::placement_group(
                        vec![bundle.clone()],
                        crate::pg::PlacementStrategy::Pack,
                    )
                })
                .collect::<Result<_>>()?;
            for g in &groups {
                if !g.wait(std::time::Duration::from_secs(60)) {
                    return Err(crate::Error::Infeasible(
                        "a placement group was not reserved within 60 s".into(),
                    ));
                }
            }
            for g in &groups {
                crate::pg::remove_placement_group(g)?;
            }
            Ok(n as f64)
        })?;
        push(
            "placement group create/removal",
            "placement_group_create_removal",
            "ops/s",
            r,
        );
    }
    if want("n_n_actor_calls_with_arg_async") {
        let tag = crate::object::rand_u128();
        let servers: Vec<String> = (0..cfg.n)
            .map(|i| format!("bench-arg-{tag:x}-{i}"))
            .collect();
        let _actors: Vec<_> = servers
            .iter()
            .map(|s| BenchActor::remote_with(&ActorOptions::new().name(s)))
            .collect::<Result<_>>()?;
        let clients: Vec<_> = servers
            .iter()
            .map(|s| BenchClient::remote(vec![s.clone()]))
            .collect::<Result<Vec<_>>>()?;
        let per = scaled(1000.0) as u32;
        let r = timeit(t, || {
            let refs: Vec<_> = clients.iter().map(|c| c.call_with_arg(per)).collect();
            let done: u32 = crate::get_all(&refs)?.iter().sum();
            Ok(done as f64)
        })?;
        push(
            "n:n actor calls with arg async",
            "n_n_actor_calls_with_arg_async",
            "ops/s",
            r,
        );
    }
    Ok(rows)
}
