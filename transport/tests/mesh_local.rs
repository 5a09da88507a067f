//! Local links (one-way messages between nodes of one host on a Unix socket): only the two ends of the QUIC
//! connection can use one, a node whose link cannot be proven uses QUIC, and a node that shut down takes none.
#![cfg(target_os = "linux")]

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use oxray_transport::frame::{self, FrameType, Header};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Limits, Mesh, MeshConfig, NodeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECOND: Duration = Duration::from_secs(1);

/// Where `node` listens for local links (Linux's abstract namespace).
fn link_name(node: NodeId) -> SocketAddr {
    SocketAddr::from_abstract_name(format!("oxray/mesh/{:032x}", node.0)).unwrap()
}

async fn connect(name: &SocketAddr) -> tokio::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect_addr(name).unwrap();
    s.set_nonblocking(true).unwrap();
    tokio::net::UnixStream::from_std(s).unwrap()
}

/// A one-way frame from `from` to `to`, as a link carries it.
fn oneway_frame(from: NodeId, to: NodeId, body: &[u8]) -> Vec<u8> {
    let header = Header::plain(FrameType::Oneway, ECHO, 1, from, to);
    let mut f = frame::encode_head(&header, body.len());
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn a_dialler_without_the_connections_secret_is_refused() {
    let (_ca, a, b) = pair(Limits::default()).await;
    let (a_id, b_id) = (a.mesh.node_id(), b.mesh.node_id());
    // b holds a connection to a, so a forger claiming to be a names a connection that exists.
    a.mesh
        .request(b_id, ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();

    for claim in [a_id, NodeId::random()] {
        let mut s = connect(&link_name(b_id)).await;
        let mut hello = b"OXL1".to_vec();
        hello.extend_from_slice(&claim.0.to_le_bytes());
        hello.extend_from_slice(&[0x5a; 32]);
        // A frame right behind the hello, not waiting for an answer: it must not be delivered either.
        hello.extend_from_slice(&oneway_frame(claim, b_id, b"forged"));
        s.write_all(&hello).await.unwrap();
        let mut answer = Vec::new();
        // The listener closes without a word (a reset, since it left the frame unread, reads as an error).
        let read = tokio::time::timeout(5 * SECOND, s.read_to_end(&mut answer))
            .await
            .expect("the listener neither answered nor closed");
        assert!(
            answer.is_empty(),
            "the listener answered a forged hello ({read:?})"
        );
    }
    assert_eq!(b.handler.oneways.load(Ordering::Relaxed), 0);

    // The real a still gets its link.
    a.mesh
        .send(b_id, ECHO, Bytes::from_static(b"real"))
        .await
        .unwrap();
    assert!(a.mesh.has_local_link(b_id));
    wait_for_oneways(&b, 1, 5 * SECOND).await;
    assert_eq!(b.handler.oneway_bytes.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_listener_that_fails_its_proof_gets_nothing_and_the_node_uses_quic() {
    let ca = ClusterCa::generate().unwrap();
    let b_id = NodeId::random();
    // The impostor takes b's name before b starts.
    let impostor = std::os::unix::net::UnixListener::bind_addr(&link_name(b_id)).unwrap();
    impostor.set_nonblocking(true).unwrap();
    let impostor = tokio::net::UnixListener::from_std(impostor).unwrap();
    let handler = Arc::new(TestHandler::default());
    let b = Mesh::bind(
        MeshConfig::new(localhost(), ca.issue(b_id).unwrap()),
        handler.clone(),
    )
    .await
    .unwrap();
    let b = Node { mesh: b, handler };
    let a = node(&ca, Limits::default()).await;
    a.mesh.add_peer(b_id, b.mesh.local_addr());

    // The impostor answers every hello with a made-up proof and keeps whatever comes after.
    let seen = tokio::spawn(async move {
        let (mut s, _) = impostor.accept().await.unwrap();
        let mut hello = [0u8; 52];
        s.read_exact(&mut hello).await.unwrap();
        let mut answer = b"OXL1".to_vec();
        answer.extend_from_slice(&[0xa5; 32]);
        s.write_all(&answer).await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        rest
    });
    for i in 0..10u32 {
        a.mesh
            .send(b_id, ECHO, Bytes::from(i.to_le_bytes().to_vec()))
            .await
            .unwrap();
    }
    assert!(!a.mesh.has_local_link(b_id));
    wait_for_oneways(&b, 10, 5 * SECOND).await;
    assert_eq!(
        *b.handler.oneway_seqs.lock().unwrap(),
        (0..10).collect::<Vec<_>>()
    );
    let rest = tokio::time::timeout(5 * SECOND, seen)
        .await
        .expect("the dialler kept the impostor's link open")
        .unwrap();
    assert!(
        rest.is_empty(),
        "the dialler wrote {} bytes to a listener that failed its proof",
        rest.len()
    );
}

#[tokio::test]
async fn a_node_that_shut_down_takes_no_more_messages() {
    // Once b is gone, a re-dials it for the next message: a short handshake timeout keeps the test short.
    let (_ca, a, b) = pair(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let b_id = b.mesh.node_id();
    a.mesh
        .send(b_id, ECHO, Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert!(a.mesh.has_local_link(b_id));
    wait_for_oneways(&b, 1, 5 * SECOND).await;
    b.mesh.shutdown().await;
    // The link closes with b's shutdown: sends fail instead of vanishing into it.
    let deadline = tokio::time::Instant::now() + 5 * SECOND;
    loop {
        let sent = a.mesh.send(b_id, ECHO, Bytes::from_static(b"after")).await;
        if sent.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sends to a node that shut down keep succeeding"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.handler.oneways.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn silent_local_diallers_are_bounded() {
    let (_ca, _a, b) = pair(Limits::default()).await;
    let name = link_name(b.mesh.node_id());
    // 64 connections that never say hello each hold a handshake until its timeout (5 s)...
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(connect(&name).await);
    }
    // ...give the listener a moment to take them all...
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...and the next one is closed at once instead of holding a task too.
    let mut extra = connect(&name).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(2 * SECOND, extra.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "a dialler beyond the bound was kept: {read:?}"
    );
    drop(silent);
}
