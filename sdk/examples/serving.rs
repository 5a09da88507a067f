//! Model serving on oxray: replica actors holding a small MLP, many concurrent clients, and
//! request batching, with throughput and latency percentiles under load.
//!
//! ```text
//! model = put(Mlp::random(...))                  # stored once; every replica reads the same object
//! replicas = [ModelServer.remote(model) for _ in range(R)]
//! clients (threads) ──request──► micro-batcher threads ──predict_batch(rows)──► a replica actor
//!                    ◄──answer──   (split the batch's outputs back to each waiting client)
//! ```
//!
//! Batching: a batcher thread takes the first waiting request, then everything else already queued
//! (or, with `--max-wait-us`, keeps collecting until that much time has passed), up to
//! `--max-batch` rows, and sends the whole batch as one actor call.
//! One batcher per replica, all pulling from one queue, so a free replica takes the next batch.
//! The run measures two phases with the same clients: unbatched (each request is its own call)
//! and batched, so the effect of batching shows in one run on one machine.
//!
//! Every 64th answer is checked against the model run locally on the client's thread: batching
//! must not mix up whose row is whose.
//!
//! ```text
//! cargo run --release --example serving                         # 32 clients, 2 replicas, 3 s per phase
//! cargo run --release --example serving -- --clients 64 --max-batch 64 --json
//! cargo run --release --example serving -- --quick
//! ```
//!
//! On a cluster, start nodes with this binary (`-- start --head`, `-- start --address A --token T`)
//! and run the driver with `OXRAY_ADDRESS`/`OXRAY_TOKEN` set; the replicas spread over the nodes.
//!
//! Measured (2-core VM under load, release, defaults: 64-256-256-10 model, 32 clients, 2
//! replicas, 3 s per phase). Embedded: unbatched ~18–38k req/s, p50 ~0.7–0.9 ms, p99 2–8 ms;
//! batched ~79–90k req/s, p50 ~0.3–0.4 ms, p99 ~1–1.5 ms (mean batch ~10). Three-process
//! loopback cluster: unbatched ~1.9k req/s (every request crosses QUIC), batched ~35k req/s,
//! p50 0.8 ms, p99 2.8 ms. Numbers swing with the machine's load; compare phases of one run.
//!
//! What this is not: an HTTP front end (clients are threads in the driver) or a benchmark of oxray
//! alone (the figures include the model's compute).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use oxray::{ActorHandle, ActorOptions, Strategy};
use oxray_apps::serving::{MAX_BATCH, Mlp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Most client threads.
const MAX_CLIENTS: usize = 4096;
/// Most replica actors.
const MAX_REPLICAS: usize = 256;
/// Requests waiting for a batcher; clients block beyond this (backpressure, not unbounded memory).
const QUEUE_CAPACITY: usize = 8192;
/// How often a client checks an answer against the local model.
const CHECK_EVERY: u64 = 64;
/// Seconds per phase in a `--quick` run.
const QUICK_SECONDS: f64 = 0.5;

/// Model serving under load: replicas, concurrent clients, batching.
#[derive(Debug, Parser)]
#[command(name = "serving")]
struct Args {
    /// Concurrent client threads (each sends one request, waits for the answer, repeats).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Replica actors holding the model.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Largest batch a batcher sends in one call.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Longest a batcher waits for more requests after the first, in microseconds. 0 (the
    /// default) sends whatever is queued at once: batches then grow with the load by themselves,
    /// and with closed-loop clients any wait only idles the replica (measured: 500 µs cost 60% of
    /// the throughput here).
    #[arg(long, default_value_t = 0)]
    max_wait_us: u64,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Layer sizes of the model, input first.
    #[arg(long, value_delimiter = ',', default_value = "64,256,256,10")]
    layers: Vec<u32>,
    /// Print each phase's figures as one JSON line too.
    #[arg(long)]
    json: bool,
    /// A smoke run: half a second per phase.
    #[arg(long)]
    quick: bool,
}

/// A serving replica: one model, answering batches.
#[derive(Debug)]
pub struct ModelServer {
    model: Mlp,
}

#[oxray::actor]
impl ModelServer {
    /// A replica of `model`.
    pub fn new(model: Mlp) -> Self {
        ModelServer { model }
    }

    /// Outputs for `batch` rows stored row-major in `rows`; `batch * output_dim` values back.
    pub fn predict_batch(&self, rows: Vec<f32>, batch: u32) -> Result<Vec<f32>, String> {
        self.model
            .forward_batch(&rows, batch as usize)
            .map_err(|e| e.to_string())
    }
}

/// One client request: its input row and where to send the answer.
struct Request {
    row: Vec<f32>,
    reply: flume::Sender<Result<Vec<f32>, String>>,
}

/// Figures of one phase.
#[derive(Debug, serde::Serialize)]
struct Phase {
    phase: &'static str,
    clients: usize,
    replicas: usize,
    max_batch: usize,
    requests: u64,
    seconds: f64,
    throughput_rps: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    mean_batch: f64,
    checked: u64,
}

fn main() {
    oxray::run_node_if_requested();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.clients == 0 || args.clients > MAX_CLIENTS {
        bail!("--clients must be in 1..={MAX_CLIENTS}");
    }
    if args.replicas == 0 || args.replicas > MAX_REPLICAS {
        bail!("--replicas must be in 1..={MAX_REPLICAS}");
    }
    if args.max_batch == 0 || args.max_batch > MAX_BATCH {
        bail!("--max-batch must be in 1..={MAX_BATCH}");
    }
    let seconds = if args.quick {
        QUICK_SECONDS
    } else {
        args.seconds
    };
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        bail!("--seconds must be in (0, 3600]");
    }
    let model = Mlp::random(&args.layers, 1).context("bad --layers")?;
    oxray::init().context("starting oxray")?;
    println!(
        "model {:?} ({} multiply-adds per row), {} replicas, {} clients",
        model.sizes(),
        model.flops_per_row(),
        args.replicas,
        args.clients
    );
    // The model goes into the object store once; each replica is built from the same object.
    let stored = oxray::put(&model)?;
    let opts = ActorOptions::new()
        .num_cpus(0.05)
        .strategy(Strategy::Spread);
    let replicas: Vec<ActorHandle<ModelServer>> = (0..args.replicas)
        .map(|_| ModelServer::remote_with(&opts, &stored))
        .collect::<oxray::Result<_>>()?;
    let model = Arc::new(model);
    let mut phases = Vec::new();
    for (name, max_batch) in [("unbatched", 1), ("batched", args.max_batch)] {
        let p = phase(&args, name, max_batch, seconds, &replicas, &model)?;
        println!(
            "{:<10} {:>9.0} req/s  p50 {:>8.1} us  p99 {:>8.1} us  max {:>9.1} us  mean batch {:>5.1}  ({} requests, {} checked)",
            p.phase,
            p.throughput_rps,
            p.p50_us,
            p.p99_us,
            p.max_us,
            p.mean_batch,
            p.requests,
            p.checked
        );
        if args.json {
            println!("{}", serde_json::to_string(&p)?);
        }
        phases.push(p);
    }
    if let [a, b] = &phases[..] {
        println!(
            "batching: {:.2}x the throughput of one call per request",
            b.throughput_rps / a.throughput_rps.max(1e-9)
        );
    }
    for r in &replicas {
        oxray::kill(r);
    }
    oxray::shutdown();
    Ok(())
}

/// Runs the clients against batchers for `seconds` and measures.
fn phase(
    args: &Args,
    name: &'static str,
    max_batch: usize,
    seconds: f64,
    replicas: &[ActorHandle<ModelServer>],
    model: &Arc<Mlp>,
) -> anyhow::Result<Phase> {
    let (tx, rx) = flume::bounded::<Request>(QUEUE_CAPACITY);
    let max_wait = Duration::from_micros(args.max_wait_us);
    let batchers: Vec<_> = replicas
        .iter()
        .map(|replica| {
            let rx = rx.clone();
            let replica = replica.clone();
            let dim = model.input_dim();
            let out = model.output_dim();
            thread::spawn(move || batcher(rx, replica, max_batch, max_wait, dim, out))
        })
        .collect();
    drop(rx);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let tx = tx.clone();
            let stop = stop.clone();
            let model = model.clone();
            thread::spawn(move || client(c as u64, tx, stop, model))
        })
        .collect();
    drop(tx);
    let start = Instant::now();
    thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut checked = 0;
    for c in clients {
        let (lat, ch) = c
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        latencies.extend(lat);
        checked += ch;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (mut calls, mut rows) = (0u64, 0u64);
    for b in batchers {
        let (c, r) = b
            .join()
            .map_err(|_| anyhow::anyhow!("a batcher thread panicked"))?;
        calls += c;
        rows += r;
    }
    if latencies.is_empty() {
        bail!("no request completed in {seconds}s");
    }
    latencies.sort_unstable();
    let pct = |q: f64| {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[i.min(latencies.len() - 1)].as_secs_f64() * 1e6
    };
    Ok(Phase {
        phase: name,
        clients: args.clients,
        replicas: replicas.len(),
        max_batch,
        requests: latencies.len() as u64,
        seconds: elapsed,
        throughput_rps: latencies.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: pct(1.0),
        mean_batch: rows as f64 / calls.max(1) as f64,
        checked,
    })
}

/// A client: request, wait, record the latency, repeat until told to stop. Returns the latencies
/// and how many answers it checked against the local model.
fn client(
    id: u64,
    tx: flume::Sender<Request>,
    stop: Arc<AtomicBool>,
    model: Arc<Mlp>,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let mut rng = StdRng::seed_from_u64(id);
    let mut latencies = Vec::new();
    let mut checked = 0;
    let (reply_tx, reply_rx) = flume::bounded(1);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let row: Vec<f32> = (0..model.input_dim())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let check = n.is_multiple_of(CHECK_EVERY).then(|| row.clone());
        let t = Instant::now();
        tx.send(Request {
            row,
            reply: reply_tx.clone(),
        })
        .map_err(|_| anyhow::anyhow!("every batcher stopped"))?;
        let answer = reply_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("a batcher dropped a request"))?
            .map_err(|e| anyhow::anyhow!("replica: {e}"))?;
        latencies.push(t.elapsed());
        if let Some(row) = check {
            let want = model.forward(&row)?;
            if answer != want {
                bail!("client {id}: request {n} got another row's answer");
            }
            checked += 1;
        }
        n += 1;
    }
    Ok((latencies, checked))
}

/// A micro-batcher in front of one replica: collects up to `max_batch` requests (waiting at most
/// `max_wait` after the first), sends them as one call, and hands each client its row of the
/// answer. Returns (calls made, rows sent). Ends when every client has gone.
fn batcher(
    rx: flume::Receiver<Request>,
    replica: ActorHandle<ModelServer>,
    max_batch: usize,
    max_wait: Duration,
    dim: usize,
    out: usize,
) -> (u64, u64) {
    let (mut calls, mut rows) = (0u64, 0u64);
    let mut batch: Vec<Request> = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let deadline = Instant::now() + max_wait;
        while batch.len() < max_batch {
            let next = if max_wait.is_zero() {
                rx.try_recv().ok()
            } else {
                rx.recv_deadline(deadline).ok()
            };
            match next {
                Some(r) => batch.push(r),
                None => break,
            }
        }
        let mut flat = Vec::with_capacity(batch.len() * dim);
        for r in &batch {
            flat.extend_from_slice(&r.row);
        }
        let n = batch.len();
        let answer = match replica.predict_batch(flat, n as u32).get() {
            Ok(a) => a,
            Err(e) => Err(e.to_string()),
        };
        calls += 1;
        rows += n as u64;
        match answer {
            Ok(values) if values.len() == n * out => {
                for (r, chunk) in batch.drain(..).zip(values.chunks_exact(out)) {
                    // A client that gave up is no error for the others.
                    let _ = r.reply.send(Ok(chunk.to_vec()));
                }
            }
            Ok(values) => {
                let why = format!("expected {} outputs, got {}", n * out, values.len());
                for r in batch.drain(..) {
                    let _ = r.reply.send(Err(why.clone()));
                }
            }
            Err(e) => {
                for r in batch.drain(..) {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }
    (calls, rows)
}
