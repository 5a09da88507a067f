//! Pulling objects from other node *processes*: each source is this test binary re-run as a child that binds its
//! own mesh endpoint on loopback, stores an object and serves it. Checks a large transfer end to end (256 MiB in
//! release builds, 1 GiB with `OXRAY_SOAK=1`, 64 MiB in debug), failover when a source is killed with SIGKILL
//! mid-transfer, and `ObjectLost` when the only source is dead.
//!
//! The child is the ignored test `child_node`, started with `OXRAY_OBJSTORE_CHILD` set; it prints one line
//! `READY <node id hex> <addr> <object size>` and serves until killed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oxray_objstore::{
    NodeId, ObjectId, ObjectStore, PullError, StoreConfig, Transfer, TransferConfig,
    TransferHandler,
};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Limits, Mesh, MeshConfig};

const MIB: usize = 1 << 20;
const CHILD_ENV: &str = "OXRAY_OBJSTORE_CHILD";

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(9) as u8 ^ seed)
        .collect()
}

fn mesh_config(ca: &ClusterCa) -> MeshConfig {
    let mut cfg = MeshConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        ca.issue(NodeId::random()).expect("identity"),
    );
    cfg.limits = Limits {
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    cfg
}

async fn local_node(ca: &ClusterCa, limit: usize) -> (Transfer, Mesh) {
    let mut cfg = TransferConfig::default();
    cfg.pull.stall_timeout = Duration::from_secs(3);
    let transfer = Transfer::new(ObjectStore::new(StoreConfig::with_limit(limit)), cfg);
    let mesh = Mesh::bind(mesh_config(ca), TransferHandler::new(transfer.clone()))
        .await
        .expect("bind");
    transfer.attach(mesh.clone());
    (transfer, mesh)
}

/// A child node process, killed (SIGKILL) when dropped.
struct ChildNode {
    child: Child,
    id: NodeId,
    addr: std::net::SocketAddr,
    size: u64,
}

impl ChildNode {
    fn spawn(ca_dir: &Path, object: ObjectId, len: usize, seed: u8) -> ChildNode {
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "child_node",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                CHILD_ENV,
                format!("{}|{:x}|{len}|{seed}", ca_dir.display(), object.0),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child node");
        // Owned by the guard at once, so a failure below still kills and reaps it.
        let unknown = "0.0.0.0:0".parse().expect("addr");
        let mut node = ChildNode {
            child,
            id: NodeId(0),
            addr: unknown,
            size: 0,
        };
        let stdout = node.child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = lines
                .next()
                .expect("child exited before READY")
                .expect("read child stdout");
            // libtest may print "test child_node ... " on the same line first.
            if let Some(at) = line.find("READY ") {
                let parts: Vec<&str> = line[at + "READY ".len()..].split_whitespace().collect();
                node.id = NodeId(u128::from_str_radix(parts[0], 16).expect("node id"));
                node.addr = parts[1].parse().expect("addr");
                node.size = parts[2].parse().expect("size");
                // Keep draining the child's stdout so it never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return node;
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The child process's body: store an object, serve it until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run only as a child process by the other tests"]
async fn child_node() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let ca = ClusterCa::load(Path::new(parts[0])).expect("load ca");
    let object = ObjectId(u128::from_str_radix(parts[1], 16).expect("object id"));
    let len: usize = parts[2].parse().expect("len");
    let seed: u8 = parts[3].parse().expect("seed");
    let (transfer, mesh) = local_node(&ca, 2 * len + 64 * MIB).await;
    transfer
        .store()
        .put(object, &payload(len, seed))
        .expect("put");
    let size = transfer.store().get_bytes(object).expect("bytes").len();
    println!(
        "READY {:032x} {} {size}",
        mesh.node_id().0,
        mesh.local_addr()
    );
    // Serve until the parent kills us.
    tokio::time::sleep(Duration::from_secs(600)).await;
}

fn ca_dir() -> (ClusterCa, tempfile::TempDir) {
    let ca = ClusterCa::generate().expect("ca");
    let dir = tempfile::tempdir().expect("tempdir");
    ca.save(dir.path()).expect("save ca");
    (ca, dir)
}

fn assert_intact(transfer: &Transfer, id: ObjectId, data: &[u8]) {
    let view = transfer
        .store()
        .get::<Vec<u8>>(id)
        .expect("pulled object readable (validated)");
    assert_eq!(view.len(), data.len());
    assert_eq!(
        crc32fast::hash(view.as_slice()),
        crc32fast::hash(data),
        "content differs after transfer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_object_from_another_process() {
    let len = match (
        cfg!(debug_assertions),
        std::env::var_os("OXRAY_SOAK").is_some(),
    ) {
        (_, true) => 1024 * MIB,
        (true, false) => 64 * MIB,
        (false, false) => 256 * MIB,
    };
    let (ca, dir) = ca_dir();
    let id = ObjectId::random();
    let source = ChildNode::spawn(dir.path(), id, len, 11);
    let (a, mesh) = local_node(&ca, len + 256 * MIB).await;
    mesh.add_peer(source.id, source.addr);
    let start = std::time::Instant::now();
    a.pull(id, source.size, &[source.id]).await.expect("pull");
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "pulled {} MiB across processes in {secs:.2} s ({:.2} GB/s)",
        len / MIB,
        source.size as f64 / secs / 1e9
    );
    assert_intact(&a, id, &payload(len, 11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_process_killed_mid_transfer() {
    let len = if cfg!(debug_assertions) {
        48 * MIB
    } else {
        256 * MIB
    };
    let (ca, dir) = ca_dir();
    // An even id: with sources [b, c] the pull core tries b first.
    let id = ObjectId(ObjectId::random().0 & !1);
    let mut b = ChildNode::spawn(dir.path(), id, len, 12);
    let c = ChildNode::spawn(dir.path(), id, len, 12);
    let (a, mesh) = local_node(&ca, len + 256 * MIB).await;
    mesh.add_peer(b.id, b.addr);
    mesh.add_peer(c.id, c.addr);
    let pull = {
        let (a, sources, size) = (a.clone(), [b.id, c.id], b.size);
        tokio::spawn(async move { a.pull(id, size, &sources).await })
    };
    // Let the transfer from b get going, then kill -9 it.
    tokio::time::sleep(Duration::from_millis(40)).await;
    b.kill();
    let result = tokio::time::timeout(Duration::from_secs(120), pull)
        .await
        .expect("no hang")
        .expect("join");
    result.expect("the pull fails over to c");
    assert_intact(&a, id, &payload(len, 12));

    // Now the only source is dead: the object is lost, promptly.
    let other = ObjectId::random();
    let start = std::time::Instant::now();
    let lost = tokio::time::timeout(Duration::from_secs(60), a.pull(other, 1000, &[b.id]))
        .await
        .expect("no hang");
    assert!(
        matches!(lost, Err(PullError::ObjectLost { .. })),
        "{lost:?}"
    );
    eprintln!("ObjectLost after {:.2} s", start.elapsed().as_secs_f64());
}
