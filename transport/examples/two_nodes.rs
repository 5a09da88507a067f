//! Demo: two meshes in one process exchange a request over authenticated QUIC on loopback.
//!
//! Run with `cargo run -p oxray-transport --example two_nodes`. Not a benchmark (see `benches/transport.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Handler, Mesh, MeshConfig, Message, NodeId, Responder};

/// Replies with the request body upper-cased.
struct Shout;

impl Handler for Shout {
    fn on_request(&self, msg: Message, reply: Responder) {
        reply.send(msg.kind(), Bytes::from(msg.body().to_ascii_uppercase()));
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let ca = ClusterCa::generate()?;
    let bind = "127.0.0.1:0".parse()?;
    let a = Mesh::bind(
        MeshConfig::new(bind, ca.issue(NodeId::random())?),
        Arc::new(Shout),
    )
    .await?;
    let b = Mesh::bind(
        MeshConfig::new(bind, ca.issue(NodeId::random())?),
        Arc::new(Shout),
    )
    .await?;
    a.add_peer(b.node_id(), b.local_addr());
    println!("node a = {} at {}", a.node_id(), a.local_addr());
    println!("node b = {} at {}", b.node_id(), b.local_addr());

    let started = Instant::now();
    let reply = a
        .request(
            b.node_id(),
            1,
            Bytes::from_static(b"hello from a"),
            Duration::from_secs(5),
        )
        .await?;
    println!(
        "b answered {:?} in {:?} (first request: includes the mTLS handshake)",
        String::from_utf8_lossy(reply.body()),
        started.elapsed()
    );
    let started = Instant::now();
    let reply = a
        .request(
            b.node_id(),
            1,
            Bytes::from_static(b"again"),
            Duration::from_secs(5),
        )
        .await?;
    println!(
        "b answered {:?} in {:?} (connection reused)",
        String::from_utf8_lossy(reply.body()),
        started.elapsed()
    );

    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
