//! Request/response, one-way and the local short-cut between real meshes on loopback.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use oxray_transport::{Limits, TransportError};

#[tokio::test]
async fn request_response_round_trips_an_archive() {
    let (_ca, a, b) = pair(Limits::default()).await;
    let body = rkyv_body(&(42u64, "hello".to_string()));
    let reply = a
        .mesh
        .request(b.mesh.node_id(), ECHO, body, SECOND)
        .await
        .unwrap();
    assert_eq!(reply.kind(), ECHO);
    assert_eq!(reply.source(), b.mesh.node_id());
    assert_eq!(
        reply.body().as_ptr() as usize % 16,
        0,
        "body must be 16-byte aligned"
    );
    let v = reply.archived::<(u64, String)>().unwrap();
    assert_eq!(v.0, 42);
    assert_eq!(v.1.as_str(), "hello");
    // The reverse direction reuses the same connection.
    let reply = b
        .mesh
        .request(a.mesh.node_id(), ECHO, Bytes::from_static(b"back"), SECOND)
        .await
        .unwrap();
    assert_eq!(reply.body(), b"back");
    assert_eq!(a.mesh.connected_peers(), vec![b.mesh.node_id()]);
}

#[tokio::test]
async fn handler_errors_timeouts_and_drops_are_reported() {
    let (_ca, a, b) = pair(Limits::default()).await;
    let to = b.mesh.node_id();
    match a.mesh.request(to, FAIL, Bytes::new(), SECOND).await {
        Err(TransportError::RemoteError(m)) => assert_eq!(m, "told to fail"),
        other => panic!("{other:?}"),
    }
    match a
        .mesh
        .request(to, SLOW, Bytes::new(), Duration::from_millis(50))
        .await
    {
        Err(TransportError::Timeout) => {}
        other => panic!("{other:?}"),
    }
    match a.mesh.request(to, DROP, Bytes::new(), SECOND).await {
        Err(TransportError::RemoteError(m)) => assert!(m.contains("dropped"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A slow handler within its deadline still answers.
    assert!(a.mesh.request(to, SLOW, Bytes::new(), SECOND).await.is_ok());
}

/// One-way messages to a peer arrive in the order they were sent, even when a small one follows a large one (on
/// a stream each, the small one overtook the large one; the SDK relies on the order, e.g. a borrow's release
/// must not pass the borrow). Both ways a one-way message can take: a local link (the default between nodes
/// of one host) and QUIC.
#[tokio::test]
async fn oneway_messages_arrive_in_order_on_a_local_link() {
    oneway_messages_arrive_in_order(true).await;
}

#[tokio::test]
async fn oneway_messages_arrive_in_order_over_quic() {
    oneway_messages_arrive_in_order(false).await;
}

async fn oneway_messages_arrive_in_order(local_links: bool) {
    let ca = oxray_transport::tls::ClusterCa::generate().unwrap();
    let a = node_with(&ca, Limits::default(), local_links).await;
    let b = node(&ca, Limits::default()).await;
    a.mesh.add_peer(b.mesh.node_id(), b.mesh.local_addr());
    const N: u32 = 200;
    for i in 0..N {
        // Over the local link's one-write bound (64 KiB) and under it, alternately.
        let len = if i % 2 == 0 { 256 * 1024 } else { 8 };
        let mut body = vec![0u8; len];
        body[..4].copy_from_slice(&i.to_le_bytes());
        a.mesh
            .send(b.mesh.node_id(), ECHO, Bytes::from(body))
            .await
            .unwrap();
    }
    assert_eq!(a.mesh.has_local_link(b.mesh.node_id()), local_links);
    wait_for_oneways(&b, N as usize, 5 * SECOND).await;
    let seqs = b.handler.oneway_seqs.lock().unwrap().clone();
    assert_eq!(
        seqs,
        (0..N).collect::<Vec<_>>(),
        "one-way messages reordered"
    );
    assert_eq!(
        b.handler.oneway_bytes.load(Ordering::Relaxed),
        (N as usize / 2) * (256 * 1024 + 8)
    );
}

#[tokio::test]
async fn oneway_messages_arrive() {
    let (_ca, a, b) = pair(Limits::default()).await;
    for i in 0..100u32 {
        a.mesh
            .send(b.mesh.node_id(), ECHO, Bytes::from(vec![0u8; i as usize]))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + SECOND;
    while b.handler.oneways.load(Ordering::Relaxed) < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "one-way messages lost"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        b.handler.oneway_bytes.load(Ordering::Relaxed),
        (0..100).sum::<usize>()
    );
}

#[tokio::test]
async fn local_short_cut_has_the_same_semantics() {
    let (_ca, a, _b) = pair(Limits::default()).await;
    let me = a.mesh.node_id();
    // Deliberately misaligned body: the local path must still hand the handler an aligned one.
    let raw = Bytes::from(vec![7u8; 33]).slice(1..);
    let reply = a.mesh.request(me, ECHO, raw, SECOND).await.unwrap();
    assert_eq!(reply.body(), &[7u8; 32][..]);
    assert_eq!(reply.body().as_ptr() as usize % 16, 0);
    assert_eq!(reply.source(), me);
    assert!(matches!(
        a.mesh.request(me, FAIL, Bytes::new(), SECOND).await,
        Err(TransportError::RemoteError(_))
    ));
    assert!(matches!(
        a.mesh
            .request(me, SLOW, Bytes::new(), Duration::from_millis(20))
            .await,
        Err(TransportError::Timeout)
    ));
    a.mesh
        .send(me, ECHO, Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(a.handler.oneways.load(Ordering::Relaxed), 1);
    // Nothing went over the network.
    assert!(a.mesh.connected_peers().is_empty());
}

#[tokio::test]
async fn unknown_peer_is_an_error() {
    let (_ca, a, _b) = pair(Limits::default()).await;
    let stranger = oxray_transport::NodeId::random();
    assert!(matches!(
        a.mesh.request(stranger, ECHO, Bytes::new(), SECOND).await,
        Err(TransportError::PeerUnknown(n)) if n == stranger
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests() {
    concurrent_requests(Limits::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_each_on_its_own_stream() {
    concurrent_requests(Limits {
        lane_body_limit: 0,
        ..Limits::default()
    })
    .await;
}

#[tokio::test]
async fn lane_replies_overtake_and_reach_their_own_requesters() {
    let (_ca, a, b) = pair(Limits::default()).await;
    let to = b.mesh.node_id();
    // A slow request first, then fast ones on the same lane: they are answered while it is still pending.
    let slow = {
        let mesh = a.mesh.clone();
        tokio::spawn(async move {
            mesh.request(to, SLOW, Bytes::from_static(b"slow"), SECOND)
                .await
        })
    };
    let started = std::time::Instant::now();
    for i in 0..20u64 {
        let reply = a
            .mesh
            .request(to, ECHO, Bytes::from(i.to_le_bytes().to_vec()), SECOND)
            .await
            .unwrap();
        assert_eq!(reply.body(), i.to_le_bytes());
    }
    assert!(
        !slow.is_finished(),
        "the slow reply should still be pending"
    );
    assert!(started.elapsed() < Duration::from_millis(250));
    assert_eq!(slow.await.unwrap().unwrap().body(), b"slow");
    // A body above the lane limit travels on its own stream, beside the lane.
    let big = Bytes::from(vec![5u8; Limits::default().lane_body_limit + 1]);
    let reply = a.mesh.request(to, ECHO, big.clone(), SECOND).await.unwrap();
    assert_eq!(reply.body(), &big[..]);
}

async fn concurrent_requests(limits: Limits) {
    let (_ca, a, b) = pair(limits).await;
    let to = b.mesh.node_id();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let mesh = a.mesh.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                let v = t * 1000 + i;
                let reply = mesh
                    .request(to, ECHO, Bytes::from(v.to_le_bytes().to_vec()), SECOND)
                    .await
                    .unwrap();
                assert_eq!(reply.body(), v.to_le_bytes());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.handler.requests.load(Ordering::Relaxed), 64 * 50);
}

#[tokio::test]
async fn inflight_limit_answers_busy() {
    let limits = Limits {
        max_inflight_per_peer: 4,
        ..Limits::default()
    };
    let (_ca, a, b) = pair(limits).await;
    let to = b.mesh.node_id();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mesh = a.mesh.clone();
        slow.push(tokio::spawn(async move {
            mesh.request(to, SLOW, Bytes::new(), SECOND).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    match a.mesh.request(to, ECHO, Bytes::new(), SECOND).await {
        Err(e @ TransportError::Busy { .. }) => assert!(e.is_retryable()),
        other => panic!("expected Busy, got {other:?}"),
    }
    for t in slow {
        t.await.unwrap().unwrap();
    }
    // Slots are released: the next request goes through.
    a.mesh
        .request(to, ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();
}

#[tokio::test]
async fn oversized_request_is_refused_by_the_sender() {
    let limits = Limits {
        max_message_bytes: 1024,
        ..Limits::default()
    };
    let (_ca, a, b) = pair(limits).await;
    match a
        .mesh
        .request(b.mesh.node_id(), ECHO, Bytes::from(vec![0u8; 1025]), SECOND)
        .await
    {
        Err(TransportError::MessageTooLarge {
            size: 1025,
            limit: 1024,
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn shutdown_drains_inflight_requests() {
    let (_ca, a, b) = pair(Limits::default()).await;
    let to = b.mesh.node_id();
    let mesh = a.mesh.clone();
    let pending = tokio::spawn(async move {
        mesh.request(to, SLOW, Bytes::from_static(b"drain"), SECOND)
            .await
    });
    // Wait until b's handler holds the request (not a fixed sleep: a loaded machine may be slow to deliver it).
    let deadline = tokio::time::Instant::now() + SECOND;
    while b.handler.requests.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // b shuts down while serving the slow request: the request still completes.
    b.mesh.shutdown().await;
    let reply = pending.await.unwrap().unwrap();
    assert_eq!(reply.body(), b"drain");
    // Afterwards b is closed.
    assert!(matches!(
        b.mesh.request(to, ECHO, Bytes::new(), SECOND).await,
        Err(TransportError::Closed)
    ));
    assert!(
        a.mesh
            .request(to, ECHO, Bytes::new(), Duration::from_millis(500))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn inconsistent_limits_are_refused_at_bind() {
    let ca = oxray_transport::tls::ClusterCa::generate().unwrap();
    let limits = Limits {
        keep_alive: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let mut cfg = oxray_transport::MeshConfig::new(
        localhost(),
        ca.issue(oxray_transport::NodeId::random()).unwrap(),
    );
    cfg.limits = limits;
    let handler = std::sync::Arc::new(TestHandler::default());
    match oxray_transport::Mesh::bind(cfg, handler).await {
        Err(TransportError::Config { why }) => assert!(why.contains("keep_alive"), "{why}"),
        other => panic!("{other:?}"),
    }
}
