//! The head restarts on the same address and data dir: nodes and the driver register again, and what lives in the
//! GCS (the user KV, the named-actor directory) and on the other nodes (actors) is still there.

use std::time::Duration;

use oxray::ActorOptions;
use oxray_tests::harness::{TestCluster, wait_until};
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

#[test]
fn nodes_and_state_survive_a_head_restart() {
    link();
    // The head has no CPUs, so the actor lands on the worker and outlives the head's process.
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "3000"]);
    let worker = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    oxray::kv::put("survives/head", b"yes").unwrap();
    let rec = Recorder::remote_with(&ActorOptions::new().name("steady").detached(), 1).unwrap();
    assert_eq!(rec.node().get().unwrap(), cluster.node_id(worker));
    assert_eq!(rec.record(2).get().unwrap(), 2);

    cluster.restart_head();

    // Both the worker and this driver find the new head and register again.
    let back = wait_until(Duration::from_secs(20), || {
        oxray::node::cluster_state(&cluster.address, &cluster.token)
            .map(|s| s.members.iter().filter(|m| m.alive).count() == 3)
            .unwrap_or(false)
    });
    assert!(back, "nodes did not register with the restarted head");
    // The GCS came back from its log; the actor on the worker never stopped.
    assert_eq!(
        oxray::kv::get("survives/head").unwrap().as_deref(),
        Some(&b"yes"[..])
    );
    let again = oxray::get_actor::<Recorder>("steady").expect("named actor lost");
    assert_eq!(again.record(3).get().unwrap(), 3);
    assert_eq!(rec.seen().get().unwrap(), vec![1, 2, 3]);
    // New work is placed on the worker again.
    assert_eq!(
        add::remote(20, 22)
            .unwrap()
            .get_timeout(Duration::from_secs(20))
            .unwrap(),
        42
    );
}
