//! Connection loss and recovery: a peer restarts (gracefully, or silently behind a relay that swallows its
//! goodbye) and requests flow again without anyone calling `add_peer` twice.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use oxray_transport::{Limits, Mesh, MeshConfig};
use tokio::net::UdpSocket;

#[tokio::test]
async fn peer_restart_on_the_same_address() {
    let (ca, a, b) = pair(Limits::default()).await;
    let to = b.mesh.node_id();
    a.mesh
        .request(to, ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();
    a.mesh
        .send(to, ECHO, Bytes::from_static(b"oneway"))
        .await
        .unwrap();
    let addr = b.mesh.local_addr();
    let ident = ca.issue(to).unwrap();
    b.mesh.shutdown().await;
    drop(b);
    // a notices the loss.
    let deadline = tokio::time::Instant::now() + SECOND;
    while a.handler.lost.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "peer loss not reported"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b2 = rebind(MeshConfig::new(addr, ident)).await;
    let reply = a
        .mesh
        .request(to, ECHO, Bytes::from_static(b"again"), SECOND)
        .await
        .unwrap();
    assert_eq!(reply.body(), b"again");
    // One-way messages, which share a stream per connection, move to the new connection too.
    a.mesh
        .send(to, ECHO, Bytes::from_static(b"oneway again"))
        .await
        .unwrap();
    drop(b2);
}

/// Binds a restarted node on its predecessor's address. In-process, the old endpoint's socket is released by
/// a background task a moment after the last handle goes; a real restart gets it back when the process exits.
async fn rebind(cfg: MeshConfig) -> Mesh {
    let deadline = tokio::time::Instant::now() + SECOND;
    loop {
        let attempt = MeshConfig {
            bind: cfg.bind,
            identity: cfg.identity.clone(),
            limits: cfg.limits.clone(),
            join_secret: None,
            local_links: cfg.local_links,
        };
        match Mesh::bind(attempt, Arc::new(TestHandler::default())).await {
            Ok(m) => return m,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A one-client UDP relay that can swallow everything (a crashed host or a cut link).
struct Relay {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
}

async fn relay(target: SocketAddr) -> Relay {
    let socket = Arc::new(UdpSocket::bind(localhost()).await.unwrap());
    let addr = socket.local_addr().unwrap();
    let blackhole = Arc::new(AtomicBool::new(false));
    let hole = blackhole.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut client: Option<SocketAddr> = None;
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if hole.load(Ordering::Relaxed) {
                continue;
            }
            let dest = if from == target {
                client
            } else {
                client = Some(from);
                Some(target)
            };
            if let Some(dest) = dest {
                let _ = socket.send_to(&buf[..n], dest).await;
            }
        }
    });
    Relay { addr, blackhole }
}

#[tokio::test]
async fn silent_restart_is_detected_by_stateless_reset() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // Idle timeout far beyond the test's patience: only the stateless reset (keyed by the node identity, so the
    // restarted node can send one for its predecessor's connections) can end the stale connection in time.
    let limits = Limits {
        idle_timeout: Duration::from_secs(30),
        keep_alive: Duration::from_secs(10),
        ..Limits::default()
    };
    let ca = oxray_transport::tls::ClusterCa::generate().unwrap();
    let a = node(&ca, limits.clone()).await;
    // b's identity is kept, as a restarting node reloads it from disk.
    let b_ident = ca.issue(oxray_transport::NodeId::random()).unwrap();
    let mut cfg = MeshConfig::new(localhost(), b_ident.clone());
    cfg.limits = limits.clone();
    let b = Mesh::bind(cfg, Arc::new(TestHandler::default()))
        .await
        .unwrap();
    let to = b.node_id();
    let b_addr = b.local_addr();
    let r = relay(b_addr).await;
    a.mesh.add_peer(to, r.addr);
    a.mesh
        .request(to, ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();

    // b dies without a word reaching a.
    r.blackhole.store(true, Ordering::Relaxed);
    b.shutdown().await;
    drop(b);
    let mut cfg = MeshConfig::new(b_addr, b_ident);
    cfg.limits = limits;
    let _b2 = rebind(cfg).await;
    r.blackhole.store(false, Ordering::Relaxed);

    // The first request may be lost with the old connection; within a few seconds requests work again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match a
            .mesh
            .request(
                to,
                ECHO,
                Bytes::from_static(b"back"),
                Duration::from_millis(500),
            )
            .await
        {
            Ok(reply) => {
                assert_eq!(reply.body(), b"back");
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                assert!(tokio::time::Instant::now() < deadline, "no recovery: {e}");
            }
        }
    }
    assert_eq!(a.handler.lost.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn peer_restarted_on_a_new_address_is_reached_once_announced() {
    // Idle timeout far beyond the test's patience: only dropping the stale connection when the peer's new
    // address is recorded lets requests through in time.
    let limits = Limits {
        idle_timeout: Duration::from_secs(30),
        keep_alive: Duration::from_secs(10),
        ..Limits::default()
    };
    let ca = oxray_transport::tls::ClusterCa::generate().unwrap();
    let a = node(&ca, limits.clone()).await;
    let b_ident = ca.issue(oxray_transport::NodeId::random()).unwrap();
    let mut cfg = MeshConfig::new(localhost(), b_ident.clone());
    cfg.limits = limits.clone();
    let b = Mesh::bind(cfg, Arc::new(TestHandler::default()))
        .await
        .unwrap();
    let to = b.node_id();
    let r = relay(b.local_addr()).await;
    a.mesh.add_peer(to, r.addr);
    a.mesh
        .request(to, ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();

    // b dies without a word reaching a, and comes back with its identity on another port.
    r.blackhole.store(true, Ordering::Relaxed);
    b.shutdown().await;
    drop(b);
    let mut cfg = MeshConfig::new(localhost(), b_ident);
    cfg.limits = limits;
    let b2 = rebind(cfg).await;
    a.mesh.add_peer(to, b2.local_addr());
    let reply = a
        .mesh
        .request(to, ECHO, Bytes::from_static(b"moved"), SECOND)
        .await
        .expect("the stale connection was kept");
    assert_eq!(reply.body(), b"moved");
    // Recording the same address again keeps the new connection.
    a.mesh.add_peer(to, b2.local_addr());
    a.mesh
        .request(to, ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();
}
