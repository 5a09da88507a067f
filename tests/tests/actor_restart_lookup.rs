//! A restarted actor is found by name from every node, not only through its creator's handles: the directory
//! names its new node, and a lookup that still sees the dead node waits (bounded) for the move to be recorded.

use std::time::{Duration, Instant};

use oxray::{ActorOptions, Strategy, TaskOptions};
use oxray_tests::harness::TestCluster;
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn on(node: &str) -> TaskOptions {
    TaskOptions::new().strategy(Strategy::NodeAffinity {
        node: u128::from_str_radix(node, 16).unwrap(),
        soft: false,
    })
}

#[test]
fn a_restarted_actor_is_found_by_name_from_another_node() {
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "3000"]);
    let doomed = cluster.add_node(1, &[]);
    let b = cluster.add_node(1, &[]);
    let c = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let doomed_id = cluster.node_id(doomed).to_string();
    let phoenix = Recorder::remote_with(
        &ActorOptions::new()
            .name("phoenix")
            .max_restarts(1)
            .strategy(Strategy::NodeAffinity {
                node: u128::from_str_radix(&doomed_id, 16).unwrap(),
                soft: true,
            }),
        7,
    )
    .unwrap();
    assert_eq!(phoenix.node().get().unwrap(), doomed_id);
    let b_id = cluster.node_id(b).to_string();
    let (n, at) = record_named::remote_with(&on(&b_id), "phoenix".to_string(), 1)
        .unwrap()
        .get_timeout(Duration::from_secs(30))
        .unwrap();
    assert_eq!((n, at.as_str()), (2, doomed_id.as_str()));

    cluster.kill(doomed);
    // The creator restarts the actor elsewhere once the node is declared dead (3 s of silence).
    assert!(
        wait_until(Duration::from_secs(30), || phoenix
            .node()
            .get_timeout(Duration::from_secs(5))
            .is_ok_and(|n| n != doomed_id)),
        "actor not restarted"
    );
    let new_home = phoenix.node().get().unwrap();

    // From both survivors, the name leads to the new incarnation (fresh state: the constructor's 7 only).
    for node in [b, c] {
        let id = cluster.node_id(node).to_string();
        let (n, at) = record_named::remote_with(&on(&id), "phoenix".to_string(), 2)
            .unwrap()
            .get_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("lookup from {id} failed: {e}"));
        assert_eq!(at, new_home, "looked up from {id}");
        assert!(n >= 2, "looked up from {id}: {n}");
    }
    assert_eq!(phoenix.seen().get().unwrap(), vec![7, 2, 2]);
}
