//! Authentication: peers without a certificate, with a certificate from another CA, joining with a good or a
//! bad token. Each refusal names its cause, and the refusing node keeps serving its other peers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use oxray_transport::tls::{ClusterCa, JoinAuthority, JoinToken, NodeIdentity};
use oxray_transport::{Limits, Mesh, MeshConfig, NodeId, TransportError, join, testing};

/// Dials `addr` with a raw quinn client and tries one request; returns the error text.
async fn raw_attempt(
    cfg: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    server: NodeId,
) -> String {
    let ep = quinn::Endpoint::client(localhost()).unwrap();
    let result = async {
        let conn = ep
            .connect_with(cfg, addr, &testing::server_name(server))?
            .await?;
        let (mut s, mut r) = conn.open_bi().await?;
        s.write_all(b"hello").await?;
        s.finish()?;
        r.read_to_end(1 << 20).await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(SECOND, result).await {
        Ok(Ok(())) => "accepted".into(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => "timed out".into(),
    }
}

#[tokio::test]
async fn peer_without_certificate_is_refused_in_the_handshake() {
    let (ca, a, b) = pair(Limits::default()).await;
    let ident = ca.issue(NodeId::random()).unwrap();
    let cfg = testing::anonymous_client_config(&ident, &Limits::default()).unwrap();
    let err = raw_attempt(cfg, b.mesh.local_addr(), b.mesh.node_id()).await;
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // b still serves a.
    a.mesh
        .request(b.mesh.node_id(), ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused_both_ways() {
    let (ca, a, b) = pair(Limits::default()).await;
    let other_ca = ClusterCa::generate().unwrap();
    let stranger = node(&other_ca, Limits::default()).await;
    // We dial a node whose certificate our CA did not sign.
    a.mesh
        .add_peer(stranger.mesh.node_id(), stranger.mesh.local_addr());
    match a
        .mesh
        .request(stranger.mesh.node_id(), ECHO, Bytes::new(), SECOND)
        .await
    {
        Err(TransportError::NotAuthorized { why }) => {
            assert!(why.contains("not signed by this cluster"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    // A node of another cluster that knows our CA dials us with its own certificate: we refuse it.
    let foreign = other_ca.issue(NodeId::random()).unwrap();
    let ours = ca.issue(NodeId::random()).unwrap();
    let cfg = testing::foreign_client_config(&foreign, &ours, &Limits::default()).unwrap();
    let err = raw_attempt(cfg, b.mesh.local_addr(), b.mesh.node_id()).await;
    assert!(
        err.contains("UnknownCA") || err.contains("error 48"),
        "{err}"
    );
    a.mesh
        .request(b.mesh.node_id(), ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();
}

#[tokio::test]
async fn certificate_of_another_node_is_refused() {
    // b presents a valid certificate, but for a different id than the one a dials.
    let (_ca, a, b) = pair(Limits::default()).await;
    let impostor_id = NodeId::random();
    a.mesh.add_peer(impostor_id, b.mesh.local_addr());
    match a
        .mesh
        .request(impostor_id, ECHO, Bytes::new(), SECOND)
        .await
    {
        Err(TransportError::NotAuthorized { why }) => {
            assert!(why.contains("belongs to another node"), "{why}")
        }
        other => panic!("{other:?}"),
    }
}

async fn head(ca: &ClusterCa, token: &JoinToken) -> Mesh {
    let mut cfg = MeshConfig::new(localhost(), ca.issue(NodeId::random()).unwrap());
    cfg.join_secret = Some(JoinAuthority {
        ca: ca.clone(),
        token: token.clone(),
    });
    Mesh::bind(cfg, Arc::new(TestHandler::default()))
        .await
        .unwrap()
}

#[tokio::test]
async fn join_with_token_then_talk_to_the_head() {
    let ca = ClusterCa::generate().unwrap();
    let token = ca.join_token();
    let head = head(&ca, &token).await;
    let id = NodeId::random();
    let parsed: JoinToken = token.to_string().parse().unwrap();
    let ident = join(head.local_addr(), &parsed, id).await.unwrap();
    assert_eq!(ident.node_id(), id);
    // The identity survives a save/load round trip, with the key file private.
    let dir = tempfile::tempdir().unwrap();
    ident.save(dir.path()).unwrap();
    let ident = NodeIdentity::load(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let joined = Mesh::bind(
        MeshConfig::new(localhost(), ident),
        Arc::new(TestHandler::default()),
    )
    .await
    .unwrap();
    joined.add_peer(head.node_id(), head.local_addr());
    let reply = joined
        .request(head.node_id(), ECHO, Bytes::from_static(b"hi"), SECOND)
        .await
        .unwrap();
    assert_eq!(reply.body(), b"hi");
    // And the head reaches the new node over the same connection.
    let reply = head
        .request(id, ECHO, Bytes::from_static(b"yo"), SECOND)
        .await
        .unwrap();
    assert_eq!(reply.body(), b"yo");
}

#[tokio::test]
async fn bad_join_tokens_are_refused_with_reasons() {
    let ca = ClusterCa::generate().unwrap();
    let token = ca.join_token();
    let head = head(&ca, &token).await;
    // Right CA, wrong secret.
    let wrong_secret = ca.join_token();
    match join(head.local_addr(), &wrong_secret, NodeId::random()).await {
        Err(TransportError::NotAuthorized { why }) => {
            assert!(why.contains("bad join token"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    // A token pinning another CA: the new node refuses the head.
    let foreign = ClusterCa::generate().unwrap().join_token();
    match join(head.local_addr(), &foreign, NodeId::random()).await {
        Err(TransportError::NotAuthorized { why }) => {
            assert!(why.contains("pinned by the join token"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    // A node that is not a head does not serve joins.
    let (_, plain, _) = pair(Limits::default()).await;
    assert!(matches!(
        join(plain.mesh.local_addr(), &token, NodeId::random()).await,
        Err(TransportError::NotAuthorized { .. })
    ));
    // A head refuses mesh traffic from a peer without certificate (client auth is optional there for joins).
    let ident = ca.issue(NodeId::random()).unwrap();
    let cfg = testing::anonymous_client_config(&ident, &Limits::default()).unwrap();
    let err = raw_attempt(cfg, head.local_addr(), head.node_id()).await;
    assert!(err.contains("client certificate required"), "{err}");
    // The head still issues certificates to the right token.
    join(head.local_addr(), &token, NodeId::random())
        .await
        .unwrap();
}

#[tokio::test]
async fn ca_survives_save_and_load() {
    let ca = ClusterCa::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    ca.save(dir.path()).unwrap();
    let loaded = ClusterCa::load(dir.path()).unwrap();
    assert_eq!(loaded.fingerprint(), ca.fingerprint());
    // A node issued by the loaded CA talks to a node issued by the original.
    let a = node(&ca, Limits::default()).await;
    let b = node(&loaded, Limits::default()).await;
    a.mesh.add_peer(b.mesh.node_id(), b.mesh.local_addr());
    a.mesh
        .request(b.mesh.node_id(), ECHO, Bytes::new(), Duration::from_secs(5))
        .await
        .unwrap();
}
