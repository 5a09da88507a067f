//! Three GCS members in one process, each with its own QUIC endpoint: a follower cut off while the leader
//! compacts its log must catch up through a snapshot bigger than the transport's message limit, which
//! therefore has to travel as a stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxray_gcs::client::{ClientConfig, GcsClient};
use oxray_gcs::mesh::{GcsService, MeshConnector, MeshPeers, STREAM_THRESHOLD};
use oxray_gcs::server::{GcsServer, ServerConfig};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Handler, Limits, Mesh, MeshConfig, Message, NodeId, Responder};

struct NoRequests;
impl Handler for NoRequests {
    fn on_request(&self, _msg: Message, reply: Responder) {
        reply.error("client serves nothing");
    }
}

fn node_of(m: u64) -> NodeId {
    NodeId(0x5a_0000 + u128::from(m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_through_a_streamed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let ids = [1u64, 2, 3];
    let members: BTreeMap<u64, NodeId> = ids.iter().map(|&m| (m, node_of(m))).collect();
    // Messages are capped just above the streaming threshold, so only a stream can carry the snapshot.
    let limits = Limits {
        max_message_bytes: STREAM_THRESHOLD + (64 << 10),
        ..Limits::default()
    };
    let mut services = Vec::new();
    let mut meshes = Vec::new();
    for &m in &ids {
        let service = GcsService::new(members.clone());
        let mut cfg = MeshConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            ca.issue(node_of(m)).unwrap(),
        );
        cfg.limits = limits.clone();
        meshes.push(Mesh::bind(cfg, service.clone()).await.unwrap());
        services.push(service);
    }
    let mut servers = Vec::new();
    for (i, &m) in ids.iter().enumerate() {
        for (j, &o) in ids.iter().enumerate() {
            if i != j {
                meshes[i].add_peer(node_of(o), meshes[j].local_addr());
            }
        }
        let peers = MeshPeers::new(members.clone());
        peers.attach(meshes[i].clone());
        let mut cfg = ServerConfig::new(m, ids.to_vec(), 1, dir.path().join(format!("m{m}")));
        cfg.tick = Duration::from_millis(10);
        cfg.replica.snapshot_entries = 4;
        cfg.replica.max_batch_bytes = 1 << 20;
        let s = GcsServer::start(cfg, peers).unwrap();
        services[i].attach(s.clone());
        servers.push(s);
    }
    let mut ccfg = MeshConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        ca.issue(NodeId(0x5a_ffff)).unwrap(),
    );
    ccfg.limits = limits;
    let client_mesh = Mesh::bind(ccfg, Arc::new(NoRequests)).await.unwrap();
    for (j, &o) in ids.iter().enumerate() {
        client_mesh.add_peer(node_of(o), meshes[j].local_addr());
    }
    let client = GcsClient::new(
        MeshConnector::new(client_mesh.clone(), members, Duration::from_secs(2)),
        ids.to_vec(),
        1,
        ClientConfig::default(),
    );
    client.put("big/start", Bytes::new()).await.unwrap();

    // Cut member 3 off: it neither hears Raft nor answers clients, but keeps running.
    let lagging = services[2].detach().unwrap();
    let value = Bytes::from(vec![0xab; 900 << 10]);
    for i in 0..14 {
        client.put(format!("big/{i}"), value.clone()).await.unwrap();
    }
    let target = client.get("big/13").await.unwrap().unwrap().mod_revision;
    let leader_status = {
        let mut best = None;
        for s in &servers[..2] {
            let st = s.status().await.remove(0);
            if st.is_leader {
                best = Some(st);
            }
        }
        best.expect("member 1 or 2 leads")
    };
    assert!(
        leader_status.snapshot_index > 2,
        "leader compacted its log: {leader_status:?}"
    );
    assert!(lagging.status().await[0].revision < target);

    // Reconnect it: the log it needs is gone, so it must install the (~12 MiB) snapshot.
    services[2].attach(lagging.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = lagging.status().await.remove(0);
        if st.revision >= target {
            assert!(st.snapshot_index >= leader_status.snapshot_index.min(st.applied));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follower never caught up: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in &servers {
        s.shutdown();
    }
    client_mesh.shutdown().await;
    for m in &meshes {
        m.shutdown().await;
    }
}
