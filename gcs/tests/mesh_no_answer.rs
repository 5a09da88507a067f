//! A member that never answers over the mesh (a replica restarted under a new node id leaves its old node
//! silent) must make the client's member table suspect, even though the client's attempt deadline, not the
//! mesh's, is what ends each call. Otherwise a client whose table names the old node keeps timing out there,
//! redirected by the other members' leader hints, until the periodic refresh: longer than a call's deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use oxray_gcs::client::{ClientConfig, GcsClient, GcsError};
use oxray_gcs::mesh::{MemberTable, MeshConnector};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Handler, Mesh, MeshConfig, Message, NodeId, Responder};
use parking_lot::Mutex;

/// Accepts requests and never answers them (each responder is kept, so none is answered on drop either).
#[derive(Default)]
struct Silent {
    held: Mutex<Vec<Responder>>,
}

impl Handler for Silent {
    fn on_request(&self, _msg: Message, reply: Responder) {
        self.held.lock().push(reply);
    }
}

struct NoRequests;
impl Handler for NoRequests {
    fn on_request(&self, _msg: Message, reply: Responder) {
        reply.error("client serves nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_calls_make_the_member_table_suspect() {
    let ca = ClusterCa::generate().unwrap();
    let silent_node = NodeId(0x77_0001);
    let silent = Mesh::bind(
        MeshConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            ca.issue(silent_node).unwrap(),
        ),
        Arc::new(Silent::default()),
    )
    .await
    .unwrap();
    let client_mesh = Mesh::bind(
        MeshConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            ca.issue(NodeId(0x77_ffff)).unwrap(),
        ),
        Arc::new(NoRequests),
    )
    .await
    .unwrap();
    client_mesh.add_peer(silent_node, silent.local_addr());

    // A write (batched path) and a read (plain path), each against a fresh table.
    for write in [true, false] {
        let table = MemberTable::new(1, BTreeMap::from([(1, silent_node)]));
        // The mesh's own deadline is far beyond the call's, as in a node (2 s there against 1 s attempts).
        let connector =
            MeshConnector::with_table(client_mesh.clone(), table.clone(), Duration::from_secs(30));
        let client = GcsClient::new(
            connector,
            vec![1],
            1,
            ClientConfig {
                attempt_timeout: Duration::from_millis(200),
                call_timeout: Duration::from_millis(500),
                ..ClientConfig::default()
            },
        );
        let res = if write {
            client.put("k", Bytes::new()).await.map(drop)
        } else {
            client.get("k").await.map(drop)
        };
        assert!(
            matches!(res, Err(GcsError::Timeout { .. })),
            "write {write}: {res:?}"
        );
        // `suspect_stale` leaves a permit, so this returns at once if it was called during the call.
        tokio::time::timeout(Duration::from_secs(1), table.stale())
            .await
            .unwrap_or_else(|_| panic!("write {write}: the table was never suspected"));
    }
    // Not `shutdown`: it would wait for the silent node's held requests until their deadlines.
    drop((client_mesh, silent));
}
