//! Shared fixtures for the transport integration tests: a CA, meshes on loopback, a few handlers.
//!
//! Not a test itself; each test file includes it with `mod common;`.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use oxray_transport::tls::ClusterCa;
use oxray_transport::{
    Handler, IncomingStream, Limits, Mesh, MeshConfig, Message, NodeId, Responder,
};

pub const ECHO: u16 = 1;
pub const FAIL: u16 = 2;
pub const SLOW: u16 = 3;
pub const DROP: u16 = 4;
pub const BIG_REPLY: u16 = 5;

/// Echoes requests; kind FAIL answers an error, SLOW answers after 300 ms, DROP drops the responder,
/// BIG_REPLY answers with 8 KiB whatever the request.
/// Counts one-way messages and checksums streams (reply body = payload length ++ crc of payload).
#[derive(Default)]
pub struct TestHandler {
    pub oneways: AtomicUsize,
    pub oneway_bytes: AtomicUsize,
    pub lost: AtomicUsize,
    pub requests: AtomicUsize,
    /// The first four bytes (little-endian) of each one-way body of at least four bytes, in arrival order.
    pub oneway_seqs: std::sync::Mutex<Vec<u32>>,
}

impl Handler for TestHandler {
    fn on_request(&self, msg: Message, reply: Responder) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match msg.kind() {
            FAIL => reply.error("told to fail"),
            SLOW => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    reply.send(SLOW, msg.into_body());
                });
            }
            DROP => drop(reply),
            BIG_REPLY => reply.send(BIG_REPLY, Bytes::from(vec![0u8; 8192])),
            k => reply.send(k, msg.into_body()),
        }
    }

    fn on_oneway(&self, msg: Message) {
        if let Some(seq) = msg.body().get(..4) {
            let seq = u32::from_le_bytes([seq[0], seq[1], seq[2], seq[3]]);
            self.oneway_seqs.lock().unwrap().push(seq);
        }
        self.oneway_bytes
            .fetch_add(msg.body().len(), Ordering::Relaxed);
        self.oneways.fetch_add(1, Ordering::Relaxed);
    }

    fn on_stream(&self, _header: Message, mut incoming: IncomingStream) {
        tokio::spawn(async move {
            let len = incoming.len() as usize;
            let mut buf = vec![0u8; len];
            match incoming.read_into(&mut buf).await {
                Ok(()) => {
                    let mut out = (len as u64).to_le_bytes().to_vec();
                    out.extend_from_slice(&checksum(&buf).to_le_bytes());
                    incoming.reply(0, Bytes::from(out));
                }
                Err(e) => incoming.error(e),
            }
        });
    }

    fn on_peer_lost(&self, _node: NodeId) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }
}

/// FNV-1a over 8-byte words: fast enough for a GiB in release, and sensitive to order and content.
pub fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0100_0000_01b3);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Waits until `node` has received `n` one-way messages; fails the test if that takes longer than `within`.
pub async fn wait_for_oneways(node: &Node, n: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while node.handler.oneways.load(Ordering::Relaxed) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "one-way messages lost"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub struct Node {
    pub mesh: Mesh,
    pub handler: Arc<TestHandler>,
}

pub async fn node(ca: &ClusterCa, limits: Limits) -> Node {
    node_with(ca, limits, true).await
}

/// A node whose one-way messages to local peers take local links or not.
pub async fn node_with(ca: &ClusterCa, limits: Limits, local_links: bool) -> Node {
    let handler = Arc::new(TestHandler::default());
    let mut cfg = MeshConfig::new(localhost(), ca.issue(NodeId::random()).unwrap());
    cfg.limits = limits;
    cfg.local_links = local_links;
    let mesh = Mesh::bind(cfg, handler.clone()).await.unwrap();
    Node { mesh, handler }
}

/// Two nodes that know each other.
pub async fn pair(limits: Limits) -> (ClusterCa, Node, Node) {
    let ca = ClusterCa::generate().unwrap();
    let a = node(&ca, limits.clone()).await;
    let b = node(&ca, limits).await;
    a.mesh.add_peer(b.mesh.node_id(), b.mesh.local_addr());
    b.mesh.add_peer(a.mesh.node_id(), a.mesh.local_addr());
    (ca, a, b)
}

pub fn rkyv_body<T>(value: &T) -> Bytes
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    Bytes::from_owner(rkyv::to_bytes::<rkyv::rancor::Error>(value).unwrap())
}

pub const SECOND: Duration = Duration::from_secs(5);
