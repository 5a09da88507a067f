//! Pulling objects between nodes over the real mTLS QUIC mesh on loopback (in one process, one endpoint per node):
//! large checksummed transfer, deduplication of concurrent pulls, a source killed mid-transfer, corrupted chunks.
//!
//! The large transfer is 256 MiB in release builds (1 GiB with `OXRAY_SOAK=1`: about 10-20 s on a busy 2-core
//! machine, too slow for the default suite) and 64 MiB in debug builds (debug copies bytes too slowly).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use oxray_objstore::transfer::{kind, wire};
use oxray_objstore::{
    NodeId, ObjectId, ObjectStore, PullError, StoreConfig, Transfer, TransferConfig,
};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Handler, IncomingStream, Limits, Mesh, MeshConfig, Message, Responder};

const MIB: usize = 1 << 20;

/// A node: store + transfer driver + mesh, with counters of what it served.
struct Node {
    transfer: Transfer,
    mesh: Mesh,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    pulls_served: AtomicUsize,
}

/// Behaviour of a node's handler, to inject faults.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Honest,
    /// Streams chunks with one byte flipped (the header carries the checksum of the true bytes).
    Corrupt,
}

struct TestHandler {
    transfer: Transfer,
    counts: Arc<Counts>,
    mode: Mode,
    mesh: std::sync::OnceLock<Mesh>,
}

impl Handler for TestHandler {
    fn on_request(&self, msg: Message, reply: Responder) {
        self.counts.pulls_served.fetch_add(1, Ordering::Relaxed);
        if self.mode == Mode::Honest {
            self.transfer.on_request(msg, reply);
            return;
        }
        // A faulty source: sends the right header with wrong bytes.
        let store = self.transfer.store().clone();
        let Some(mesh) = self.mesh.get().cloned() else {
            return reply.error("no mesh");
        };
        tokio::spawn(async move {
            let Ok(req) = msg.archived::<wire::PullRequest>() else {
                return reply.error("bad request");
            };
            let (id, fetch, offset, len) = (
                ObjectId(req.id.to_native()),
                req.fetch.to_native(),
                req.offset.to_native(),
                req.len.to_native(),
            );
            let Ok(bytes) = store.get_bytes(id) else {
                return reply.error("not here");
            };
            let chunk = bytes.slice(offset as usize..(offset + len) as usize);
            let crc = crc32fast::hash(&chunk);
            let mut bad = chunk.to_vec();
            bad[0] ^= 0xff;
            let header = wire::ChunkHeader {
                id: id.0,
                fetch,
                offset,
                len,
                crc,
            };
            let header =
                Bytes::from_owner(rkyv::to_bytes::<rkyv::rancor::Error>(&header).expect("header"));
            match mesh
                .send_stream(msg.source(), kind::CHUNK, header, Bytes::from(bad))
                .await
            {
                Ok(_) => reply.send(kind::OK, Bytes::new()),
                Err(e) => reply.error(e),
            }
        });
    }

    fn on_stream(&self, header: Message, incoming: IncomingStream) {
        self.transfer.on_stream(header, incoming);
    }

    fn on_peer_lost(&self, node: NodeId) {
        self.transfer.on_peer_lost(node);
    }
}

fn config() -> TransferConfig {
    let mut cfg = TransferConfig {
        chunk_bytes: 4 * MIB as u64,
        ..TransferConfig::default()
    };
    cfg.pull.stall_timeout = Duration::from_secs(5);
    cfg
}

async fn node(ca: &ClusterCa, limit: usize, mode: Mode) -> Node {
    let store = ObjectStore::new(StoreConfig::with_limit(limit));
    let transfer = Transfer::new(store, config());
    let counts = Arc::new(Counts::default());
    let handler = Arc::new(TestHandler {
        transfer: transfer.clone(),
        counts: Arc::clone(&counts),
        mode,
        mesh: std::sync::OnceLock::new(),
    });
    let mut cfg = MeshConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        ca.issue(NodeId::random()).expect("identity"),
    );
    cfg.limits = Limits {
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let mesh = Mesh::bind(cfg, handler.clone()).await.expect("bind");
    let _ = handler.mesh.set(mesh.clone());
    transfer.attach(mesh.clone());
    Node {
        transfer,
        mesh,
        counts,
    }
}

fn connect(nodes: &[&Node]) {
    for a in nodes {
        for b in nodes {
            if a.mesh.node_id() != b.mesh.node_id() {
                a.mesh.add_peer(b.mesh.node_id(), b.mesh.local_addr());
            }
        }
    }
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// Puts `data` as object `id` on every node given.
fn seed(nodes: &[&Node], id: ObjectId, data: &Vec<u8>) -> u64 {
    for n in nodes {
        n.transfer.store().put(id, data).expect("put");
    }
    nodes[0]
        .transfer
        .store()
        .get_bytes(id)
        .expect("bytes")
        .len() as u64
}

fn assert_intact(node: &Node, id: ObjectId, data: &[u8]) {
    let view = node
        .transfer
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
async fn large_object_arrives_intact() {
    let len = match (
        cfg!(debug_assertions),
        std::env::var_os("OXRAY_SOAK").is_some(),
    ) {
        (_, true) => 1024 * MIB,
        (true, false) => 64 * MIB,
        (false, false) => 256 * MIB,
    };
    let ca = ClusterCa::generate().expect("ca");
    let a = node(&ca, 2 * len, Mode::Honest).await;
    let b = node(&ca, 2 * len, Mode::Honest).await;
    connect(&[&a, &b]);
    let id = ObjectId::random();
    let data = payload(len, 1);
    let size = seed(&[&b], id, &data);
    let start = std::time::Instant::now();
    a.transfer
        .pull(id, size, &[b.mesh.node_id()])
        .await
        .expect("pull");
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "pulled {} MiB in {secs:.2} s ({:.2} GB/s)",
        len / MIB,
        size as f64 / secs / 1e9
    );
    assert_intact(&a, id, &data);
    // A secondary copy; pulling again is a no-op.
    a.transfer
        .pull(id, size, &[b.mesh.node_id()])
        .await
        .expect("already local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_object_are_deduplicated() {
    let ca = ClusterCa::generate().expect("ca");
    let a = node(&ca, 256 * MIB, Mode::Honest).await;
    let b = node(&ca, 256 * MIB, Mode::Honest).await;
    connect(&[&a, &b]);
    let id = ObjectId::random();
    let data = payload(20 * MIB, 2);
    let size = seed(&[&b], id, &data);
    let sources = [b.mesh.node_id()];
    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let t = a.transfer.clone();
            tokio::spawn(async move { t.pull(id, size, &sources).await })
        })
        .collect();
    for p in pulls {
        p.await.expect("join").expect("pull");
    }
    let chunks = size.div_ceil(4 * MIB as u64) as usize;
    assert_eq!(
        b.counts.pulls_served.load(Ordering::Relaxed),
        chunks,
        "each chunk fetched exactly once"
    );
    assert_intact(&a, id, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_copy_is_asked_only_once_the_others_failed() {
    let ca = ClusterCa::generate().expect("ca");
    let a = node(&ca, 64 * MIB, Mode::Honest).await;
    let owner = node(&ca, 64 * MIB, Mode::Honest).await;
    let copy = node(&ca, 64 * MIB, Mode::Honest).await;
    let empty = node(&ca, 64 * MIB, Mode::Honest).await;
    connect(&[&a, &owner, &copy, &empty]);
    let sources = [copy.mesh.node_id()];
    let fallback = [owner.mesh.node_id()];

    // Every object, whatever its id's rotation, comes from the copy while it works.
    for i in 0..4u8 {
        let id = ObjectId::random();
        let data = payload(3 * MIB, i);
        let size = seed(&[&owner, &copy], id, &data);
        a.transfer
            .pull_with_fallback(id, size, &sources, &fallback)
            .await
            .expect("pull");
        assert_intact(&a, id, &data);
    }
    assert_eq!(owner.counts.pulls_served.load(Ordering::Relaxed), 0);
    assert_eq!(copy.counts.pulls_served.load(Ordering::Relaxed), 4);

    // A source without the object fails (twice, its attempts), then the fallback serves it.
    let id = ObjectId::random();
    let data = payload(3 * MIB, 9);
    let size = seed(&[&owner], id, &data);
    a.transfer
        .pull_with_fallback(id, size, &[empty.mesh.node_id()], &fallback)
        .await
        .expect("pull from the fallback");
    assert_intact(&a, id, &data);
    assert_eq!(owner.counts.pulls_served.load(Ordering::Relaxed), 1);
    let stats = a.transfer.stats();
    assert_eq!((stats.pulled, stats.failed, stats.active), (5, 0, 0));
    assert_eq!(stats.pulled_bytes, 5 * size);
    assert_eq!(
        stats.fetches,
        4 + 3,
        "two attempts on the empty source, one on the fallback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_killed_mid_transfer_fails_over_to_another_copy() {
    let ca = ClusterCa::generate().expect("ca");
    let a = node(&ca, 256 * MIB, Mode::Honest).await;
    let b = node(&ca, 256 * MIB, Mode::Honest).await;
    let c = node(&ca, 256 * MIB, Mode::Honest).await;
    connect(&[&a, &b, &c]);
    // An even id: with sources [b, c] the core tries b first.
    let id = ObjectId(ObjectId::random().0 & !1);
    let data = payload(48 * MIB, 3);
    let size = seed(&[&b, &c], id, &data);

    let pull = {
        let t = a.transfer.clone();
        let sources = [b.mesh.node_id(), c.mesh.node_id()];
        tokio::spawn(async move { t.pull(id, size, &sources).await })
    };
    // Kill b as soon as it has started serving.
    while b.counts.pulls_served.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    b.mesh.shutdown().await;
    drop(b);
    tokio::time::timeout(Duration::from_secs(60), pull)
        .await
        .expect("no hang")
        .expect("join")
        .expect("pull via c");
    assert!(
        c.counts.pulls_served.load(Ordering::Relaxed) > 0,
        "c must have served the rest"
    );
    assert_intact(&a, id, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_copy_left_is_object_lost_not_a_hang() {
    let ca = ClusterCa::generate().expect("ca");
    let a = node(&ca, 64 * MIB, Mode::Honest).await;
    let b = node(&ca, 64 * MIB, Mode::Honest).await;
    connect(&[&a, &b]);
    let id = ObjectId::random();
    let size = seed(&[&b], id, &payload(MIB, 4));
    let dead = b.mesh.node_id();
    b.mesh.shutdown().await;
    drop(b);
    let result = tokio::time::timeout(Duration::from_secs(60), a.transfer.pull(id, size, &[dead]))
        .await
        .expect("no hang");
    assert!(
        matches!(result, Err(PullError::ObjectLost { .. })),
        "{result:?}"
    );
    // No source at all: lost at once. A node that lacks the object: lost too.
    assert!(matches!(
        a.transfer.pull(ObjectId(7), 10, &[]).await,
        Err(PullError::ObjectLost { .. })
    ));
    let c = node(&ca, 64 * MIB, Mode::Honest).await;
    connect(&[&a, &c]);
    assert!(matches!(
        a.transfer.pull(ObjectId(8), 10, &[c.mesh.node_id()]).await,
        Err(PullError::ObjectLost { .. })
    ));
    assert!(!a.transfer.store().contains(id));
    // A wrong size (too big or too small) is refused by the source: never a padded or truncated copy.
    let x = ObjectId::random();
    let real = seed(&[&c], x, &payload(3 * MIB, 6));
    for wrong in [real + 16, real - 16] {
        let r = a.transfer.pull(x, wrong, &[c.mesh.node_id()]).await;
        assert!(matches!(r, Err(PullError::ObjectLost { .. })), "{r:?}");
        assert!(!a.transfer.store().contains(x));
    }
    a.transfer
        .pull(x, real, &[c.mesh.node_id()])
        .await
        .expect("right size");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunks_are_rejected() {
    let ca = ClusterCa::generate().expect("ca");
    let a = node(&ca, 64 * MIB, Mode::Honest).await;
    let bad = node(&ca, 64 * MIB, Mode::Corrupt).await;
    let good = node(&ca, 64 * MIB, Mode::Honest).await;
    connect(&[&a, &bad, &good]);
    let id = ObjectId(ObjectId::random().0 & !1);
    let data = payload(10 * MIB, 5);
    let size = seed(&[&bad, &good], id, &data);

    // Only the corrupting source: every chunk is rejected, the pull ends as lost.
    let only_bad = a.transfer.pull(id, size, &[bad.mesh.node_id()]).await;
    assert!(
        matches!(only_bad, Err(PullError::ObjectLost { .. })),
        "{only_bad:?}"
    );
    assert!(
        !a.transfer.store().contains(id),
        "corrupted data must never be stored"
    );

    // Corrupting source first, honest one second: the honest copy wins, the content is intact.
    a.transfer
        .pull(id, size, &[bad.mesh.node_id(), good.mesh.node_id()])
        .await
        .expect("pull via the honest copy");
    assert!(bad.counts.pulls_served.load(Ordering::Relaxed) >= 2);
    assert_intact(&a, id, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_protocol_input_is_an_error_for_the_peer_not_a_panic() {
    let ca = ClusterCa::generate().expect("ca");
    let a = node(&ca, 64 * MIB, Mode::Honest).await;
    let b = node(&ca, 64 * MIB, Mode::Honest).await;
    connect(&[&a, &b]);
    let to = b.mesh.node_id();
    let garbage = Bytes::from_static(&[0xff; 40]);
    let deadline = Duration::from_secs(5);

    // Garbage pull request; a pull of an object b lacks; an out-of-range chunk.
    assert!(
        a.mesh
            .request(to, kind::PULL, garbage.clone(), deadline)
            .await
            .is_err()
    );
    let ask = |id: u128, offset: u64, len: u64, total: u64| {
        let req = wire::PullRequest {
            id,
            fetch: 1,
            offset,
            len,
            total,
        };
        Bytes::from_owner(rkyv::to_bytes::<rkyv::rancor::Error>(&req).expect("ser"))
    };
    assert!(
        a.mesh
            .request(to, kind::PULL, ask(99, 0, 10, 10), deadline)
            .await
            .is_err()
    );
    let id = ObjectId::random();
    let size = seed(&[&b], id, &payload(MIB, 7));
    assert!(
        a.mesh
            .request(to, kind::PULL, ask(id.0, size - 1, 2, size), deadline)
            .await
            .is_err()
    );
    assert!(
        a.mesh
            .request(to, kind::PULL, ask(id.0, u64::MAX, 2, size), deadline)
            .await
            .is_err()
    );

    // Garbage chunk header; a well-formed chunk nobody asked for.
    let payload_bytes = Bytes::from(vec![1u8; 1000]);
    assert!(
        a.mesh
            .send_stream(to, kind::CHUNK, garbage, payload_bytes.clone())
            .await
            .is_err()
    );
    let header = wire::ChunkHeader {
        id: id.0,
        fetch: 1,
        offset: 0,
        len: 1000,
        crc: crc32fast::hash(&payload_bytes),
    };
    let header = Bytes::from_owner(rkyv::to_bytes::<rkyv::rancor::Error>(&header).expect("ser"));
    assert!(
        a.mesh
            .send_stream(to, kind::CHUNK, header, payload_bytes)
            .await
            .is_err()
    );

    // b is unharmed and still serves a proper pull.
    a.transfer
        .pull(id, size, &[to])
        .await
        .expect("pull after bad input");
    assert_intact(&a, id, &payload(MIB, 7));
}
