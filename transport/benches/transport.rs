//! End-to-end transport benchmark: the oxray mesh against the fastest plain use of quinn doing the same
//! exchange, in the same process, on the same tokio runtime, with the same QUIC and TLS settings.
//!
//! `cargo bench -p oxray-transport --bench transport` prints human rows; `-- --json` prints one JSON object whose
//! keys each hold `{"oxray": x, "quinn": y}`. `-- --quick` shortens every phase (for smoke runs).
//! The runtime is chosen with `OXRAY_BENCH_RUNTIME=current_thread` (default: client and server tasks share one
//! thread, which measures the protocol rather than thread wake-ups) or `OXRAY_BENCH_RUNTIME=multi_thread:N`.
//!
//! Raw quinn baselines, both measured in every run, and each row's `quinn` figure is the better of the two
//! (lower latency, higher rate), so the ratio is against the fastest direct use of quinn we know for the job:
//! - stream per request: a fresh bidirectional stream per request (write, finish, read to end), the idiomatic
//!   pattern for independent request/response pairs;
//! - pipelined: requests written back to back on one long-lived stream as `[len u32][id u64][body]`, one
//!   writer task batching whatever is queued, one reader task matching replies by id (the same shape as
//!   oxray's lanes, minus envelope, validation and dispatch).
//!
//! Streams copy into a pre-faulted buffer exactly like the mesh's receiver. This is a measurement program,
//! not a test: it asserts nothing about speed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use bytes::Bytes;
use oxray_transport::tls::ClusterCa;
use oxray_transport::{
    Handler, IncomingStream, Limits, Mesh, MeshConfig, Message, NodeId, Responder, testing,
};
use parking_lot::Mutex;

const KIND_ECHO: u16 = 1;
const TAG_ECHO: u8 = 0;
const TAG_STREAM: u8 = 1;
const TAG_PIPE: u8 = 2;

/// A pool of pre-faulted receive buffers: both receivers write payloads "once into a pre-allocated buffer".
#[derive(Default)]
struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut pool = self.0.lock();
        match pool.iter().position(|b| b.len() >= len) {
            Some(i) => pool.swap_remove(i),
            None => vec![1u8; len], // filled, so pages are faulted in before timing matters
        }
    }
    fn give(&self, b: Vec<u8>) {
        self.0.lock().push(b);
    }
}

struct Bench {
    buffers: Arc<Buffers>,
}

impl Handler for Bench {
    fn on_request(&self, msg: Message, reply: Responder) {
        reply.send(KIND_ECHO, msg.into_body());
    }
    fn on_stream(&self, _header: Message, mut incoming: IncomingStream) {
        let buffers = self.buffers.clone();
        tokio::spawn(async move {
            let mut buf = buffers.take(incoming.len() as usize);
            let r = incoming.read_into(&mut buf).await;
            buffers.give(buf);
            match r {
                Ok(()) => incoming.reply(0, Bytes::from_static(b"stored")),
                Err(e) => incoming.error(e),
            }
        });
    }
}

/// Raw quinn server: one task per stream; echo or swallow a payload into a pre-faulted buffer.
async fn quinn_server(endpoint: quinn::Endpoint, buffers: Arc<Buffers>) {
    while let Some(incoming) = endpoint.accept().await {
        let buffers = buffers.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let buffers = buffers.clone();
                tokio::spawn(async move {
                    let mut tag = [0u8; 9];
                    if recv.read_exact(&mut tag[..1]).await.is_err() {
                        return;
                    }
                    if tag[0] == TAG_PIPE {
                        pipe_server(send, recv).await;
                        return;
                    }
                    if tag[0] == TAG_ECHO {
                        let Ok(body) = recv.read_to_end(1 << 20).await else {
                            return;
                        };
                        let _ = send.write_all(&body).await;
                    } else {
                        if recv.read_exact(&mut tag[1..]).await.is_err() {
                            return;
                        }
                        let len =
                            u64::from_le_bytes(tag[1..].try_into().unwrap_or([0; 8])) as usize;
                        let mut buf = buffers.take(len);
                        let mut off = 0;
                        while let Ok(Some(chunk)) = recv.read_chunk(len - off, true).await {
                            buf[off..off + chunk.bytes.len()].copy_from_slice(&chunk.bytes);
                            off += chunk.bytes.len();
                            if off == len {
                                break;
                            }
                        }
                        buffers.give(buf);
                        let _ = send.write_all(b"stored").await;
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}

/// Splits `[len u32][id u64][body]` frames off the front of `acc`; returns (id, frame range) pairs and bytes used.
fn pipe_frames(acc: &[u8]) -> (Vec<(u64, std::ops::Range<usize>)>, usize) {
    let mut out = Vec::new();
    let mut off = 0;
    while acc.len() - off >= 12 {
        let len = u32::from_le_bytes(acc[off..off + 4].try_into().expect("4 bytes")) as usize;
        if acc.len() - off < 12 + len {
            break;
        }
        let id = u64::from_le_bytes(acc[off + 4..off + 12].try_into().expect("8 bytes"));
        out.push((id, off..off + 12 + len));
        off += 12 + len;
    }
    (out, off)
}

/// Pipelined raw quinn, server side: echoes every frame of each chunk with one write.
async fn pipe_server(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut acc: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
        acc.extend_from_slice(&chunk.bytes);
        let (frames, used) = pipe_frames(&acc);
        let mut out: Vec<Bytes> = frames
            .into_iter()
            .map(|(_, r)| Bytes::copy_from_slice(&acc[r]))
            .collect();
        acc.drain(..used);
        if send.write_all_chunks(&mut out).await.is_err() {
            return;
        }
    }
}

type PipeWaiters = Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Bytes>>>>;

/// Pipelined raw quinn, client side: one stream, a batching writer task and a reader task matching by id.
#[derive(Clone)]
struct Pipe {
    tx: flume::Sender<Bytes>,
    waiting: PipeWaiters,
    next: Arc<AtomicU64>,
}

impl Pipe {
    async fn open(conn: &quinn::Connection) -> Pipe {
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(&[TAG_PIPE]).await.expect("tag");
        let waiting: PipeWaiters = Arc::default();
        let (tx, rx) = flume::unbounded::<Bytes>();
        tokio::spawn(async move {
            while let Ok(first) = rx.recv_async().await {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                if send.write_all_chunks(&mut batch).await.is_err() {
                    return;
                }
            }
        });
        let w = waiting.clone();
        tokio::spawn(async move {
            let mut acc: Vec<u8> = Vec::new();
            while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                acc.extend_from_slice(&chunk.bytes);
                let (frames, used) = pipe_frames(&acc);
                for (id, r) in frames {
                    let body = Bytes::copy_from_slice(&acc[r.start + 12..r.end]);
                    if let Some(t) = w.lock().remove(&id) {
                        let _ = t.send(body);
                    }
                }
                acc.drain(..used);
            }
        });
        Pipe {
            tx,
            waiting,
            next: Arc::default(),
        }
    }

    async fn call(&self, body: &Bytes) -> usize {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut f = Vec::with_capacity(12 + body.len());
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&id.to_le_bytes());
        f.extend_from_slice(body);
        let (otx, orx) = tokio::sync::oneshot::channel();
        self.waiting.lock().insert(id, otx);
        self.tx.send(Bytes::from(f)).expect("pipe writer");
        // A deadline, as oxray's requests have one.
        tokio::time::timeout(Duration::from_secs(10), orx)
            .await
            .expect("pipe deadline")
            .expect("pipe reply")
            .len()
    }
}

async fn quinn_request(conn: &quinn::Connection, body: &Bytes) -> usize {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all_chunks(&mut [Bytes::from_static(&[TAG_ECHO]), body.clone()])
        .await
        .expect("write");
    send.finish().expect("finish");
    recv.read_to_end(1 << 20).await.expect("read").len()
}

async fn quinn_stream(conn: &quinn::Connection, payload: &Bytes) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let mut head = vec![TAG_STREAM];
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    send.write_all_chunks(&mut [Bytes::from(head), payload.clone()])
        .await
        .expect("write");
    send.finish().expect("finish");
    recv.read_to_end(64).await.expect("read");
}

/// Default limits, with QUIC windows overridable for tuning experiments (both sides of both contenders):
/// OXRAY_BENCH_STREAM_WINDOW, OXRAY_BENCH_CONN_WINDOW, OXRAY_BENCH_SEND_WINDOW, OXRAY_BENCH_SOCKET_BUFFER (bytes).
fn bench_limits() -> Limits {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let mut l = Limits::default();
    if let Some(v) = env("OXRAY_BENCH_STREAM_WINDOW") {
        l.stream_receive_window = v;
    }
    if let Some(v) = env("OXRAY_BENCH_CONN_WINDOW") {
        l.connection_receive_window = v;
    }
    if let Some(v) = env("OXRAY_BENCH_SEND_WINDOW") {
        l.send_window = v;
    }
    if let Some(v) = env("OXRAY_BENCH_SOCKET_BUFFER") {
        l.socket_buffer_bytes = v as usize;
    }
    l
}

struct Setup {
    a: Mesh,
    b_id: NodeId,
    conn: quinn::Connection,
    pipe: Pipe,
    _endpoints: (quinn::Endpoint, quinn::Endpoint, Mesh),
}

async fn setup(buffers: Arc<Buffers>) -> Setup {
    let ca = ClusterCa::generate().expect("ca");
    let limits = bench_limits();
    let local = "127.0.0.1:0".parse().expect("addr");
    let handler = Arc::new(Bench {
        buffers: buffers.clone(),
    });
    let mut cfg = MeshConfig::new(local, ca.issue(NodeId::random()).expect("id"));
    cfg.limits = limits.clone();
    let a = Mesh::bind(cfg, handler.clone()).await.expect("bind");
    let mut cfg = MeshConfig::new(local, ca.issue(NodeId::random()).expect("id"));
    cfg.limits = limits.clone();
    let b = Mesh::bind(cfg, handler).await.expect("bind");
    a.add_peer(b.node_id(), b.local_addr());

    let server_id = ca.issue(NodeId::random()).expect("id");
    let server_cfg = testing::server_config(&server_id, &limits).expect("server cfg");
    let socket = testing::bind_socket(local, &limits).expect("socket");
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .expect("server endpoint");
    tokio::spawn(quinn_server(server.clone(), buffers));
    let client_id = ca.issue(NodeId::random()).expect("id");
    let socket = testing::bind_socket(local, &limits).expect("socket");
    let mut client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .expect("client");
    client.set_default_client_config(
        testing::client_config(&client_id, &limits).expect("client cfg"),
    );
    let conn = client
        .connect(
            server.local_addr().expect("addr"),
            &testing::server_name(server_id.node_id()),
        )
        .expect("connect")
        .await
        .expect("handshake");
    let pipe = Pipe::open(&conn).await;
    Setup {
        a,
        b_id: b.node_id(),
        pipe,
        conn,
        _endpoints: (server, client, b),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Round-trip p50 and p99 of oxray, quinn stream-per-request and quinn pipelined, in µs.
async fn rtt(s: &Setup, n: usize) -> [(f64, f64); 3] {
    let body = Bytes::from(vec![7u8; 64]);
    let deadline = Duration::from_secs(5);
    let mut ox = Vec::with_capacity(n);
    let mut qu = Vec::with_capacity(n);
    let mut qp = Vec::with_capacity(n);
    // Interleave rounds so that both see the same machine state.
    for round in 0..4 {
        for i in 0..n / 4 + 200 {
            let t = Instant::now();
            s.a.request(s.b_id, KIND_ECHO, body.clone(), deadline)
                .await
                .expect("request");
            if i >= 200 {
                ox.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        for i in 0..n / 4 + 200 {
            let t = Instant::now();
            quinn_request(&s.conn, &body).await;
            if i >= 200 {
                qu.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        for i in 0..n / 4 + 200 {
            let t = Instant::now();
            s.pipe.call(&body).await;
            if i >= 200 {
                qp.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let _ = round;
    }
    [ox, qu, qp].map(|mut v| {
        v.sort_by(f64::total_cmp);
        (percentile(&v, 0.5), percentile(&v, 0.99))
    })
}

async fn rps_oxray(s: &Setup, inflight: usize, dur: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(vec![7u8; 64]);
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (mesh, to, stop, count, body) = (
            s.a.clone(),
            s.b_id,
            stop.clone(),
            count.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                mesh.request(to, KIND_ECHO, body.clone(), Duration::from_secs(10))
                    .await
                    .expect("request");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    measure(stop, count, tasks, dur).await
}

async fn rps_pipe(s: &Setup, inflight: usize, dur: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(vec![7u8; 64]);
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (pipe, stop, count, body) = (s.pipe.clone(), stop.clone(), count.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                pipe.call(&body).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    measure(stop, count, tasks, dur).await
}

async fn rps_quinn(s: &Setup, inflight: usize, dur: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let size = std::env::var("OXRAY_BENCH_QUINN_BODY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let body = Bytes::from(vec![7u8; size]);
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (conn, stop, count, body) = (s.conn.clone(), stop.clone(), count.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                quinn_request(&conn, &body).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    measure(stop, count, tasks, dur).await
}

async fn measure(
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dur: Duration,
) -> f64 {
    // Warm up a fifth of the time, then count.
    tokio::time::sleep(dur / 5).await;
    let start_count = count.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    let done = count.load(Ordering::Relaxed) - start_count;
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("task");
    }
    done as f64 / secs
}

async fn stream_gbps(s: &Setup, size: usize, reps: usize) -> (f64, f64) {
    let payload = Bytes::from(vec![3u8; size]);
    // One untimed round each: fault in the receive buffers and warm the connections.
    s.a.send_stream(s.b_id, 0, Bytes::new(), payload.clone())
        .await
        .expect("stream");
    quinn_stream(&s.conn, &payload).await;
    let (mut ox, mut qu) = (0.0f64, 0.0f64);
    // Alternate and keep the best of each: loopback throughput is noisy and the best run is the least disturbed.
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            s.a.send_stream(s.b_id, 0, Bytes::new(), payload.clone())
                .await
                .expect("stream");
        }
        ox = ox.max((size * reps) as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        for _ in 0..reps {
            quinn_stream(&s.conn, &payload).await;
        }
        qu = qu.max((size * reps) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    (ox, qu)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let rt_spec = std::env::var("OXRAY_BENCH_RUNTIME").unwrap_or_else(|_| "current_thread".into());
    let runtime = match rt_spec.strip_prefix("multi_thread") {
        Some(n) => {
            let workers = n.trim_start_matches(':').parse().unwrap_or(2);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
        }
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
    .expect("runtime");
    let rt_desc = match rt_spec.strip_prefix("multi_thread") {
        Some(n) => format!(
            "tokio multi_thread, {} workers, client and server in one process",
            n.trim_start_matches(':').parse().unwrap_or(2)
        ),
        None => "tokio current_thread, client and server on one thread in one process".to_string(),
    };

    let rows = runtime.block_on(async {
        let buffers = Arc::new(Buffers::default());
        let s = setup(buffers).await;
        let (n, dur) = if quick {
            (2_000, Duration::from_millis(300))
        } else {
            (20_000, Duration::from_millis(750))
        };
        // OXRAY_BENCH_ONLY=rtt,rps,stream runs a subset (for profiling); all by default.
        let only = std::env::var("OXRAY_BENCH_ONLY").unwrap_or_default();
        let want = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);
        let mut rows = Vec::new();
        // Each quinn pattern's own figure per row, for the record: (row, per stream, pipelined).
        let mut patterns: Vec<(&str, f64, f64)> = Vec::new();
        if want("rtt") {
            let [(ox50, ox99), (qs50, qs99), (qp50, qp99)] = rtt(&s, n).await;
            rows.extend([
                ("rtt_p50_us", ox50, qs50.min(qp50)),
                ("rtt_p99_us", ox99, qs99.min(qp99)),
            ]);
            patterns.extend([("rtt_p50_us", qs50, qp50), ("rtt_p99_us", qs99, qp99)]);
        }
        if want("rps") {
            // Alternate short rounds and keep each side's best: on a shared machine, load from other processes
            // comes and goes, and the best round is the one least disturbed by it.
            let rounds = if quick { 1 } else { 4 };
            let levels = [
                ("rps_inflight_1", 1),
                ("rps_inflight_16", 16),
                ("rps_inflight_256", 256),
            ];
            // OXRAY_BENCH_INFLIGHT=256 runs one level only (for profiling).
            let level: Option<usize> = std::env::var("OXRAY_BENCH_INFLIGHT")
                .ok()
                .and_then(|v| v.parse().ok());
            for (name, k) in levels
                .into_iter()
                .filter(|(_, k)| level.is_none_or(|l| l == *k))
            {
                let (mut ox, mut qs, mut qp) = (0.0f64, 0.0f64, 0.0f64);
                // OXRAY_BENCH_SIDE=oxray|quinn|pipe measures one side only (for profiling).
                let side = std::env::var("OXRAY_BENCH_SIDE").unwrap_or_default();
                let run = |who: &str| side.is_empty() || side == who;
                for _ in 0..rounds {
                    if run("oxray") {
                        ox = ox.max(rps_oxray(&s, k, dur).await);
                    }
                    if run("quinn") {
                        qs = qs.max(rps_quinn(&s, k, dur).await);
                    }
                    if run("pipe") {
                        qp = qp.max(rps_pipe(&s, k, dur).await);
                    }
                }
                rows.push((name, ox, qs.max(qp)));
                patterns.push((name, qs, qp));
            }
        }
        if want("stream") {
            let (ox, qu) = stream_gbps(&s, 1 << 20, if quick { 16 } else { 256 }).await;
            rows.push(("stream_gbps_1mib", ox, qu));
            let (ox, qu) = stream_gbps(&s, if quick { 64 << 20 } else { 1 << 30 }, 1).await;
            rows.push(("stream_gbps_1gib", ox, qu));
        }
        (rows, patterns)
    });
    let (rows, patterns) = rows;

    if json {
        let mut obj = serde_json::Map::new();
        obj.insert(
            "runtime".into(),
            serde_json::json!({ "oxray": rt_desc, "quinn": rt_desc }),
        );
        for (name, ox, qu) in &rows {
            obj.insert(
                (*name).into(),
                serde_json::json!({ "oxray": ox, "quinn": qu }),
            );
        }
        // Each raw quinn pattern's own figure behind the `quinn` column (which is the better of the two).
        let mut pat = serde_json::Map::new();
        for (name, per_stream, pipelined) in &patterns {
            pat.insert(
                (*name).into(),
                serde_json::json!({ "stream_per_request": per_stream, "pipelined": pipelined }),
            );
        }
        obj.insert("quinn_patterns".into(), serde_json::Value::Object(pat));
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!(
            "runtime: {rt_desc}{}",
            if quick {
                " (quick mode: 1gib row uses 64 MiB)"
            } else {
                ""
            }
        );
        println!(
            "{:<20} {:>14} {:>14} {:>8}",
            "metric", "oxray", "raw quinn", "ratio"
        );
        for (name, ox, qu) in &rows {
            println!("{name:<20} {ox:>14.2} {qu:>14.2} {:>8.3}", ox / qu);
        }
        println!("\nraw quinn by pattern (the column above is the better of the two):");
        println!("{:<20} {:>14} {:>14}", "metric", "per request", "pipelined");
        for (name, per_stream, pipelined) in &patterns {
            println!("{name:<20} {per_stream:>14.2} {pipelined:>14.2}");
        }
    }
}
