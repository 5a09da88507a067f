//! Object-store benchmark: memcpy bandwidth (the physical bound), large `put` bandwidth, `get` latency by size, and
//! small put/get rates, all measured in the same run on the same machine.
//!
//! Run: `cargo bench -p oxray-objstore --bench objstore` (human rows) or `... -- --json` (one JSON object with
//! `memcpy_gbps`, `put_gbps`, `get_us`, `small_put_per_s`, `small_get_per_s`, `transfer_gbps`).
//! `OXRAY_BENCH_QUICK=1` skips the 1 GiB size (for a smoke run on a small machine).
//!
//! Method: each figure is the median of several timed repetitions after one untimed warm-up. `put` is measured in
//! steady state (a put-then-free cycle, timed together, so each put reuses the store's warm pooled buffer); the first
//! put into a fresh store (page faults included) is printed as a separate row. `get` is the time to obtain a pinned
//! view and read its length — it is independent of size because nothing is copied.
//!
//! Transfer: two nodes in this process, each with its own mTLS QUIC endpoint on loopback, on a 2-worker tokio
//! runtime: `oxray` pulls a 1 GiB object (256 MiB with `OXRAY_BENCH_QUICK`) through [`Transfer`] (chunked, checksummed,
//! into the final buffer, validated on first read — the read is not timed); `quinn` sends the same bytes over one
//! raw quinn stream with the same TLS and transport settings into a pre-allocated buffer. Best of 3 each.

use std::hint::black_box;
use std::time::Instant;

use std::sync::Arc;

use bytes::Bytes;
use oxray_objstore::{
    NodeId, ObjectId, ObjectStore, StoreConfig, Transfer, TransferConfig, TransferHandler,
};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Limits, Mesh, MeshConfig, testing};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const GIB: usize = 1024 * MIB;

/// Median of `reps` timings of `f`, each run `inner` times; returns seconds per single call.
fn time_per_call(reps: usize, inner: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..inner {
                f();
            }
            start.elapsed().as_secs_f64() / inner as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Repetitions for a size: enough total bytes to be stable, without running for minutes at 1 GiB.
fn plan(size: usize) -> (usize, usize) {
    match size {
        s if s <= 64 * KIB => (7, 20_000),
        s if s <= 4 * MIB => (7, 200),
        s if s <= 256 * MIB => (5, 3),
        _ => (3, 1),
    }
}

fn label(size: usize) -> &'static str {
    match size {
        KIB => "1KiB",
        MIB => "1MiB",
        s if s == 100 * MIB => "100MiB",
        _ => "1GiB",
    }
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let quick = std::env::var_os("OXRAY_BENCH_QUICK").is_some();
    let mut sizes = vec![KIB, MIB, 100 * MIB, GIB];
    if quick {
        sizes.pop();
    }

    let mut cfg = StoreConfig::with_limit(3 * GIB);
    cfg.buffer_pool_limit = 3 * GIB / 2;
    let store = ObjectStore::new(cfg);

    let mut memcpy = Vec::new();
    let mut put = Vec::new();
    let mut get = Vec::new();
    let mut cold_put = None;
    let mut next_id = 0u128;
    let mut fresh = || {
        next_id += 1;
        ObjectId(next_id)
    };

    for &size in &sizes {
        let (reps, inner) = plan(size);
        let src = vec![0xa5u8; size];

        // memcpy between two warm buffers: the physical bound of a put.
        let mut dst = vec![0u8; size];
        let t = time_per_call(reps, inner, || {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        });
        drop(dst);
        memcpy.push((size, gbps(size, t)));

        // First put into the store at this size: fresh pages, faults included (printed, not in the JSON).
        if size >= 100 * MIB {
            let id = fresh();
            let start = Instant::now();
            store.put(id, &src).expect("cold put");
            let secs = start.elapsed().as_secs_f64();
            store.free(id);
            if size == *sizes.last().unwrap_or(&size) {
                cold_put = Some((size, gbps(size, secs)));
            }
        }

        // Steady-state put: serialize straight into the store's pooled buffer, then free it, so every put reuses
        // the same warm pages (as the memcpy above reuses one destination). The free is inside the timer.
        let t = time_per_call(reps, inner, || {
            let id = fresh();
            store.put(id, black_box(&src)).expect("put");
            store.free(id);
        });
        put.push((size, gbps(size, t)));

        // get: a pinned view, whatever the size.
        let id = fresh();
        store.put(id, &src).expect("put");
        let t = time_per_call(7, 20_000, || {
            let view = store.get::<Vec<u8>>(id).expect("get");
            black_box(view.len());
        });
        store.free(id);
        get.push((size, t * 1e6));
    }

    // Small objects: one put or get per call, like Ray's "single client put/get calls (Plasma Store)".
    let small: Vec<u8> = vec![7; 64];
    let n = 200_000;
    let ids: Vec<ObjectId> = (0..n).map(|_| fresh()).collect();
    let start = Instant::now();
    for &id in &ids {
        store.put(id, &small).expect("small put");
    }
    let small_put_per_s = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for &id in &ids {
        let view = store.get::<Vec<u8>>(id).expect("small get");
        black_box(view.len());
    }
    let small_get_per_s = n as f64 / start.elapsed().as_secs_f64();
    for &id in &ids {
        store.free(id);
    }

    drop(store);
    let transfer_len = if quick { 256 * MIB } else { GIB };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let oxray_gbps = rt.block_on(oxray_transfer(transfer_len));
    let quinn_gbps = rt.block_on(quinn_transfer(transfer_len));

    if json {
        let map = |rows: &[(usize, f64)]| {
            let fields: Vec<String> = rows
                .iter()
                .map(|(s, v)| format!("\"{}\":{:.4}", label(*s), v))
                .collect();
            format!("{{{}}}", fields.join(","))
        };
        println!(
            "{{\"memcpy_gbps\":{},\"put_gbps\":{},\"get_us\":{},\"small_put_per_s\":{:.0},\"small_get_per_s\":{:.0},\"transfer_gbps\":{{\"oxray\":{:.4},\"quinn\":{:.4}}}}}",
            map(&memcpy),
            map(&put),
            map(&get),
            small_put_per_s,
            small_get_per_s,
            oxray_gbps,
            quinn_gbps
        );
        return;
    }
    println!(
        "oxray-objstore benchmark (single process, {} threads available)",
        available()
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>12}",
        "row", "1KiB", "1MiB", "100MiB", "1GiB"
    );
    let row = |name: &str, rows: &[(usize, f64)], unit: &str| {
        let cells: Vec<String> = rows.iter().map(|(_, v)| format!("{v:>12.3}")).collect();
        println!("{:<34} {} {unit}", name, cells.join(" "));
    };
    row("memcpy (warm buffers)", &memcpy, "GB/s");
    row("put+free (steady, pooled buffer)", &put, "GB/s");
    row("get (pinned view)", &get, "us");
    for ((s, p), (_, m)) in put.iter().zip(&memcpy) {
        println!("  put/memcpy at {:>6}: {:>5.1}%", label(*s), 100.0 * p / m);
    }
    if let Some((s, v)) = cold_put {
        println!("first put of {} into fresh pages: {v:.3} GB/s", label(s));
    }
    println!("small put (64 B value): {small_put_per_s:>12.0} /s   (Ray: ~2,600 /s)");
    println!("small get (64 B value): {small_get_per_s:>12.0} /s   (Ray: ~21,000 /s)");
    println!(
        "transfer of {} MiB between two nodes (loopback, mTLS QUIC): oxray pull {oxray_gbps:.3} GB/s, raw quinn stream {quinn_gbps:.3} GB/s ({:.0}%)",
        transfer_len / MIB,
        100.0 * oxray_gbps / quinn_gbps
    );
}

fn available() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A node for the transfer rows: store, transfer driver and mesh.
async fn transfer_node(ca: &ClusterCa, limit: usize) -> (Transfer, Mesh) {
    let mut cfg = StoreConfig::with_limit(limit);
    cfg.buffer_pool_limit = limit / 2;
    let transfer = Transfer::new(ObjectStore::new(cfg), TransferConfig::default());
    let identity = ca.issue(NodeId::random()).expect("identity");
    let mesh = Mesh::bind(
        MeshConfig::new("127.0.0.1:0".parse().expect("addr"), identity),
        TransferHandler::new(transfer.clone()),
    )
    .await
    .expect("bind");
    transfer.attach(mesh.clone());
    (transfer, mesh)
}

/// Pulls a `len`-byte object from one node to another through the mesh; best of 3, GB/s.
async fn oxray_transfer(len: usize) -> f64 {
    let ca = ClusterCa::generate().expect("ca");
    let (a, a_mesh) = transfer_node(&ca, 2 * len + 64 * MIB).await;
    let (b, b_mesh) = transfer_node(&ca, len + 64 * MIB).await;
    a_mesh.add_peer(b_mesh.node_id(), b_mesh.local_addr());
    b_mesh.add_peer(a_mesh.node_id(), a_mesh.local_addr());
    let id = ObjectId(1);
    b.store()
        .put(id, &vec![0x5au8; len])
        .expect("put source object");
    let size = b.store().get_bytes(id).expect("bytes").len() as u64;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        a.pull(id, size, &[b_mesh.node_id()]).await.expect("pull");
        best = best.min(start.elapsed().as_secs_f64());
        assert_eq!(a.store().get::<Vec<u8>>(id).expect("pulled").len(), len);
        a.store().free(id);
    }
    a_mesh.shutdown().await;
    b_mesh.shutdown().await;
    gbps(size as usize, best)
}

/// Sends `len` bytes over one raw quinn stream (same TLS and transport settings as the mesh); best of 3, GB/s.
async fn quinn_transfer(len: usize) -> f64 {
    let ca = ClusterCa::generate().expect("ca");
    let (server_id, client_id) = (NodeId::random(), NodeId::random());
    let limits = Limits::default();
    let server_identity = ca.issue(server_id).expect("identity");
    let client_identity = ca.issue(client_id).expect("identity");
    let runtime = Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(testing::server_config(&server_identity, &limits).expect("server config")),
        testing::bind_socket("127.0.0.1:0".parse().expect("addr"), &limits).expect("socket"),
        runtime.clone(),
    )
    .expect("server endpoint");
    let mut client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        testing::bind_socket("127.0.0.1:0".parse().expect("addr"), &limits).expect("socket"),
        runtime,
    )
    .expect("client endpoint");
    client.set_default_client_config(
        testing::client_config(&client_identity, &limits).expect("client config"),
    );
    let addr = server.local_addr().expect("addr");
    let receiver = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake");
        // Pre-faulted destination, as the store's pooled buffers are.
        let mut buf = vec![1u8; len];
        for _ in 0..3 {
            let mut recv = conn.accept_uni().await.expect("stream");
            let mut off = 0;
            while let Some(chunk) = recv.read_chunk(len - off, true).await.expect("read") {
                buf[off..off + chunk.bytes.len()].copy_from_slice(&chunk.bytes);
                off += chunk.bytes.len();
            }
            assert_eq!(off, len);
        }
        black_box(&buf);
        conn
    });
    let conn = client
        .connect(addr, &testing::server_name(server_id))
        .expect("connect")
        .await
        .expect("handshake");
    let payload = Bytes::from(vec![0x5au8; len]);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut send = conn.open_uni().await.expect("open");
        send.write_chunk(payload.clone()).await.expect("write");
        send.finish().expect("finish");
        send.stopped().await.ok();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let server_conn = receiver.await.expect("receiver");
    server_conn.close(0u32.into(), b"done");
    conn.close(0u32.into(), b"done");
    gbps(len, best)
}
