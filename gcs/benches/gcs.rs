//! End-to-end GCS figures: a 3-member cluster in one process (one shard, three replicas, each with its own
//! directory and **real fsync**), clients in the same process. Two setups:
//! - **mesh** (what the issue's targets mean by "3 replicas on loopback"): every member and the client have
//!   their own QUIC endpoint on loopback (`oxray-transport`, mutual TLS), so every Raft message and every
//!   call crosses a real socket;
//! - **in-process**: members and clients connected by [`LocalNet`] (no sockets): consensus, batching,
//!   storage and the async client, without the network.
//!
//! Failover: the leader's server is stopped (mesh) or cut off (in-process) and the time until a write
//! succeeds through a new leader is measured; the old leader then rejoins (mesh: restarted from its files).
//!
//! `cargo bench -p oxray-gcs --bench gcs` runs every figure in mesh mode, then the write rows again in
//! process, and prints a table whose rows name their mode. `--json` prints one JSON object: `writes_per_s`
//! and `write_p99_ms` (each `{"c1","c64","c1024"}`), `reads_per_s`, `watch_latency_ms_p50` and `failover_ms`
//! (`{"p50","p99","trials"}`) from the mesh; `writes_per_s_in_process` and `write_p99_ms_in_process` from the
//! in-process cluster; `mode` says which mode each key comes from and `setup` describes both.
//! `-- --mesh` runs the mesh only, `-- --in-process` the in-process cluster only (all keys then come from
//! it, and `mode` says so). `OXRAY_BENCH_SECS` sets the seconds per write/read phase (default 2);
//! `OXRAY_BENCH_TRIALS` the failover trials (default 5). Timings are printed, never asserted.
//! The mesh stands for replicas on three hosts, so its Raft messages stay on QUIC: `OXRAY_LOCAL_LINKS=1` lets
//! them take local links (Unix sockets) as replicas on one host would.
//! `OXRAY_BENCH_ONLY_C=1024` runs only the write phase at that concurrency in one mode (mesh unless
//! `--in-process`) and prints its row (for profiling one load level with `perf record`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxray_gcs::client::{ClientConfig, Connector, GcsClient};
use oxray_gcs::mesh::{GcsService, MeshConnector, MeshPeers};
use oxray_gcs::server::{GcsServer, LocalNet, PeerNetwork, ServerConfig};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Handler, Mesh, MeshConfig, Message, NodeId, Responder};
use parking_lot::Mutex;

const MEMBERS: [u64; 3] = [1, 2, 3];

struct MeshParts {
    services: Vec<Arc<GcsService>>,
    peers: Vec<Arc<MeshPeers>>,
    meshes: Vec<Mesh>,
    client_mesh: Mesh,
    connector: Arc<MeshConnector>,
}

struct Cluster {
    net: Arc<LocalNet>,
    mesh: Option<MeshParts>,
    servers: Mutex<Vec<GcsServer>>,
    dir: tempfile::TempDir,
}

struct NoRequests;
impl Handler for NoRequests {
    fn on_request(&self, _msg: Message, reply: Responder) {
        reply.error("client serves nothing");
    }
}

/// Whether the mesh members' one-way messages may take local links (off unless `OXRAY_LOCAL_LINKS=1`).
fn local_links() -> bool {
    std::env::var("OXRAY_LOCAL_LINKS").is_ok_and(|v| v == "1")
}

fn node_of(m: u64) -> NodeId {
    NodeId(0xbe_0000 + u128::from(m))
}

fn server_cfg(dir: &std::path::Path, m: u64) -> ServerConfig {
    ServerConfig::new(m, MEMBERS.to_vec(), 1, dir.join(format!("m{m}")))
}

async fn cluster(use_mesh: bool) -> Cluster {
    // Under target/ rather than /tmp so the figures come from the same disk as the build (not a tmpfs).
    let base = std::env::var("CARGO_TARGET_TMPDIR")
        .unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let dir = tempfile::tempdir_in(base).unwrap();
    let net = LocalNet::new();
    let mut servers = Vec::new();
    let mut mesh = None;
    if use_mesh {
        let ca = ClusterCa::generate().unwrap();
        let members: BTreeMap<u64, NodeId> = MEMBERS.iter().map(|&m| (m, node_of(m))).collect();
        let (mut services, mut peers, mut meshes) = (Vec::new(), Vec::new(), Vec::new());
        for &m in &MEMBERS {
            let service = GcsService::new(members.clone());
            let mut cfg = MeshConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                ca.issue(node_of(m)).unwrap(),
            );
            cfg.local_links = local_links();
            meshes.push(Mesh::bind(cfg, service.clone()).await.unwrap());
            services.push(service);
        }
        for (i, &m) in MEMBERS.iter().enumerate() {
            for (j, &o) in MEMBERS.iter().enumerate() {
                if i != j {
                    meshes[i].add_peer(node_of(o), meshes[j].local_addr());
                }
            }
            let p = MeshPeers::new(members.clone());
            p.attach(meshes[i].clone());
            let s = GcsServer::start(server_cfg(dir.path(), m), p.clone()).unwrap();
            services[i].attach(s.clone());
            servers.push(s);
            peers.push(p);
        }
        let mut cfg = MeshConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            ca.issue(NodeId(0xbe_ffff)).unwrap(),
        );
        cfg.local_links = local_links();
        let client_mesh = Mesh::bind(cfg, Arc::new(NoRequests)).await.unwrap();
        for (j, &o) in MEMBERS.iter().enumerate() {
            client_mesh.add_peer(node_of(o), meshes[j].local_addr());
        }
        let connector = MeshConnector::new(client_mesh.clone(), members, Duration::from_secs(1));
        mesh = Some(MeshParts {
            services,
            peers,
            meshes,
            client_mesh,
            connector,
        });
    } else {
        for &m in &MEMBERS {
            let s = GcsServer::start(server_cfg(dir.path(), m), net.clone()).unwrap();
            net.add(m, s.clone());
            servers.push(s);
        }
    }
    Cluster {
        net,
        mesh,
        servers: Mutex::new(servers),
        dir,
    }
}

impl Cluster {
    fn connector(&self) -> Arc<dyn Connector> {
        match &self.mesh {
            Some(m) => m.connector.clone(),
            None => self.net.clone(),
        }
    }

    /// Cuts the leader off (LocalNet) or stops its server (mesh).
    fn fail(&self, member: u64) {
        match &self.mesh {
            None => self.net.isolate(member),
            Some(m) => {
                if let Some(s) = m.services[member as usize - 1].detach() {
                    s.shutdown();
                }
            }
        }
    }

    /// Brings a failed member back (mesh: a fresh server over the same files).
    fn recover(&self, member: u64) {
        match &self.mesh {
            None => self.net.heal(),
            Some(m) => {
                let i = member as usize - 1;
                let p: Arc<dyn PeerNetwork> = m.peers[i].clone();
                let s = GcsServer::start(server_cfg(self.dir.path(), member), p).unwrap();
                m.services[i].attach(s.clone());
                self.servers.lock()[i] = s;
            }
        }
    }

    async fn shutdown(&self) {
        let servers = self.servers.lock().clone();
        for s in &servers {
            s.shutdown();
        }
        if let Some(m) = &self.mesh {
            m.client_mesh.shutdown().await;
            for x in &m.meshes {
                x.shutdown().await;
            }
        }
    }
}

fn client(c: &Cluster) -> GcsClient {
    GcsClient::new(c.connector(), MEMBERS.to_vec(), 1, ClientConfig::default())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Runs `conc` concurrent writers for `secs`; returns (writes/s, p99 ms).
async fn writes(c: &Cluster, conc: usize, secs: f64) -> (f64, f64) {
    // One client per 64 tasks keeps each client's in-flight seqs well inside the shard's dedup window.
    let clients: Vec<GcsClient> = (0..conc.div_ceil(64)).map(|_| client(c)).collect();
    let value = Bytes::from(vec![7u8; 100]);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for t in 0..conc {
        let cl = clients[t / 64].clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < end {
                let t0 = Instant::now();
                cl.put(format!("bench/{t}/{i}"), value.clone())
                    .await
                    .unwrap();
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                i += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    (lat.len() as f64 / elapsed, pct(&lat, 0.99))
}

async fn reads(c: &Cluster, conc: usize, secs: f64) -> f64 {
    let cl = client(c);
    cl.put("bench/read", Bytes::from_static(b"v"))
        .await
        .unwrap();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let cl = cl.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                cl.get("bench/read").await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Time from a put's invocation to its event arriving at a watcher, median over `n` writes.
async fn watch_latency(c: &Cluster, n: usize) -> f64 {
    let cl = client(c);
    let (_, rev) = cl.scan_prefix("wl/").await.unwrap();
    let mut w = cl.watch("wl/", rev).unwrap();
    let mut lat = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        cl.put(format!("wl/{i}"), Bytes::new()).await.unwrap();
        let e = w
            .next_timeout(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(e.key.ends_with(i.to_string().as_bytes()));
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    pct(&lat, 0.5)
}

async fn leader(c: &Cluster) -> u64 {
    loop {
        let servers = c.servers.lock().clone();
        for s in &servers {
            if s.status().await.first().is_some_and(|st| st.is_leader) {
                return s.member();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Isolates the leader and measures until a write succeeds through a new one.
async fn failover(c: &Cluster, trials: usize) -> Vec<f64> {
    let cl = GcsClient::new(
        c.connector(),
        MEMBERS.to_vec(),
        1,
        ClientConfig {
            backoff_max: Duration::from_millis(20),
            attempt_timeout: Duration::from_millis(200),
            ..ClientConfig::default()
        },
    );
    let mut out = Vec::new();
    for t in 0..trials {
        cl.put("fo/warm", Bytes::new()).await.unwrap();
        let old = leader(c).await;
        let t0 = Instant::now();
        c.fail(old);
        cl.put(format!("fo/{t}"), Bytes::new()).await.unwrap();
        out.push(t0.elapsed().as_secs_f64() * 1e3);
        c.recover(old);
        // Let the old leader rejoin as a follower before the next trial.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out
}

const MESH_SETUP: &str = "mesh: 3 replicas x 1 shard in one process, each on its own QUIC endpoint on loopback (mTLS), real fsync";
const LOCAL_SETUP: &str = "in-process: 3 replicas x 1 shard, LocalNet (no sockets), real fsync";

fn mode_name(use_mesh: bool) -> &'static str {
    if use_mesh { "mesh" } else { "in-process" }
}

/// Every figure of one mode.
struct Full {
    writes: Vec<(f64, f64)>,
    reads: f64,
    watch: f64,
    failover: Vec<f64>,
}

async fn full(use_mesh: bool, secs: f64, trials: usize) -> Full {
    let c = cluster(use_mesh).await;
    leader(&c).await;
    let mut writes_rows = Vec::new();
    for conc in [1usize, 64, 1024] {
        writes_rows.push(writes(&c, conc, secs).await);
    }
    let r = reads(&c, 64, secs).await;
    let wl = watch_latency(&c, 200).await;
    let mut fo = failover(&c, trials).await;
    fo.sort_by(f64::total_cmp);
    c.shutdown().await;
    Full {
        writes: writes_rows,
        reads: r,
        watch: wl,
        failover: fo,
    }
}

async fn write_rows(use_mesh: bool, secs: f64) -> Vec<(f64, f64)> {
    let c = cluster(use_mesh).await;
    leader(&c).await;
    let mut rows = Vec::new();
    for conc in [1usize, 64, 1024] {
        rows.push(writes(&c, conc, secs).await);
    }
    c.shutdown().await;
    rows
}

fn by_conc(rows: &[(f64, f64)], pick: impl Fn(&(f64, f64)) -> f64) -> serde_json::Value {
    serde_json::json!({"c1": pick(&rows[0]), "c64": pick(&rows[1]), "c1024": pick(&rows[2])})
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let only_mesh = std::env::args().any(|a| a == "--mesh");
    let only_local = std::env::args().any(|a| a == "--in-process");
    // The headline figures come from the mesh unless only the in-process cluster was asked for.
    let use_mesh = !only_local;
    let secs: f64 = std::env::var("OXRAY_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let trials: usize = std::env::var("OXRAY_BENCH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let only: Option<usize> = std::env::var("OXRAY_BENCH_ONLY_C")
        .ok()
        .and_then(|s| s.parse().ok());
    let setup = if use_mesh { MESH_SETUP } else { LOCAL_SETUP };
    let mode = mode_name(use_mesh);
    rt.block_on(async {
        if let Some(conc) = only {
            let c = cluster(use_mesh).await;
            leader(&c).await;
            let (tput, p99) = writes(&c, conc, secs).await;
            if json {
                let v = serde_json::json!({
                    "setup": setup,
                    "mode": {"writes_per_s": mode, "write_p99_ms": mode},
                    "writes_per_s": {format!("c{conc}"): tput},
                    "write_p99_ms": {format!("c{conc}"): p99},
                });
                println!("{v}");
            } else {
                println!("[{mode}] writes c{conc:<5} {tput:>10.0} /s   p99 {p99:>8.2} ms");
            }
            c.shutdown().await;
            return;
        }
        let f = full(use_mesh, secs, trials).await;
        // The in-process write rows as extra keys, for comparison with the network's cost.
        let extra = if use_mesh && !only_mesh {
            Some(write_rows(false, secs).await)
        } else {
            None
        };
        let fo = &f.failover;
        if json {
            let mut v = serde_json::json!({
                "setup": setup,
                "mode": {
                    "writes_per_s": mode,
                    "write_p99_ms": mode,
                    "reads_per_s": mode,
                    "watch_latency_ms_p50": mode,
                    "failover_ms": mode,
                },
                "writes_per_s": by_conc(&f.writes, |r| r.0),
                "write_p99_ms": by_conc(&f.writes, |r| r.1),
                "reads_per_s": f.reads,
                "watch_latency_ms_p50": f.watch,
                "failover_ms": {"p50": pct(fo, 0.5), "p99": pct(fo, 0.99), "trials": fo.len()},
            });
            if let Some(rows) = &extra {
                v["setup_in_process"] = LOCAL_SETUP.into();
                v["mode"]["writes_per_s_in_process"] = "in-process".into();
                v["mode"]["write_p99_ms_in_process"] = "in-process".into();
                v["writes_per_s_in_process"] = by_conc(rows, |r| r.0);
                v["write_p99_ms_in_process"] = by_conc(rows, |r| r.1);
            }
            println!("{v}");
        } else {
            println!("gcs: {setup}");
            for (conc, (tput, p99)) in [1, 64, 1024].iter().zip(&f.writes) {
                println!("[{mode}] writes c{conc:<5} {tput:>10.0} /s   p99 {p99:>8.2} ms");
            }
            println!("[{mode}] reads  c64    {:>10.0} /s", f.reads);
            println!("[{mode}] watch latency p50 {:.2} ms", f.watch);
            println!(
                "[{mode}] failover p50 {:.0} ms, p99 {:.0} ms over {} trials",
                pct(fo, 0.5),
                pct(fo, 0.99),
                fo.len()
            );
            if let Some(rows) = &extra {
                println!("gcs: {LOCAL_SETUP}");
                for (conc, (tput, p99)) in [1, 64, 1024].iter().zip(rows) {
                    println!("[in-process] writes c{conc:<5} {tput:>10.0} /s   p99 {p99:>8.2} ms");
                }
            }
        }
    });
}
