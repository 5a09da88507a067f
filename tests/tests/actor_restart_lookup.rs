//! A restarted actor is found from every node, not only through its creator's handles: the directory names its new
//! node, and a lookup (by name, or by a handle's next call) that still sees the dead node waits (bounded) for the
//! move to be recorded.
//!
//! These tests keep every byte between the nodes on QUIC (`OXRAY_LOCAL_LINKS=0`, inherited by the node processes),
//! so that the QUIC path of one-way messages (call and result batches) is covered across real processes too: the
//! other multi-process tests run with the default, local links between nodes of one host.

use std::time::{Duration, Instant};

use oxray::{ActorOptions, Strategy};
use oxray_tests::harness::{TestCluster, on, wait_until};
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

fn quic_only() {
    // SAFETY: set before any thread of this test process reads the environment (nextest runs one test per process).
    unsafe { std::env::set_var("OXRAY_LOCAL_LINKS", "0") };
}

#[test]
fn a_restarted_actor_is_found_by_name_from_another_node() {
    quic_only();
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

#[test]
fn a_handle_kept_on_another_node_follows_the_restarted_actor() {
    quic_only();
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "3000"]);
    let doomed = cluster.add_node(1, &[]);
    let b = cluster.add_node(1, &[]);
    let _c = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let doomed_id = cluster.node_id(doomed).to_string();
    let b_id = cluster.node_id(b).to_string();
    // Unnamed: only the directory entry written for restartable actors can lead other nodes to its next home.
    let rec = Recorder::remote_with(
        &ActorOptions::new()
            .max_restarts(1)
            .strategy(Strategy::NodeAffinity {
                node: u128::from_str_radix(&doomed_id, 16).unwrap(),
                soft: true,
            }),
        7,
    )
    .unwrap();
    let relay = Relay::remote_with(
        &ActorOptions::new().strategy(Strategy::NodeAffinity {
            node: u128::from_str_radix(&b_id, 16).unwrap(),
            soft: false,
        }),
        rec.clone(),
    )
    .unwrap();
    // One that cannot restart, reached the same way: after the kill its calls must fail, not hang.
    let mortal = Recorder::remote_with(
        &ActorOptions::new().strategy(Strategy::NodeAffinity {
            node: u128::from_str_radix(&doomed_id, 16).unwrap(),
            soft: false,
        }),
        9,
    )
    .unwrap();
    let mortal_relay = Relay::remote_with(
        &ActorOptions::new().strategy(Strategy::NodeAffinity {
            node: u128::from_str_radix(&b_id, 16).unwrap(),
            soft: false,
        }),
        mortal,
    )
    .unwrap();
    assert_eq!(
        mortal_relay
            .relay(1)
            .get_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap()
            .0,
        2
    );
    let first = relay
        .relay(1)
        .get_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap();
    assert_eq!(first, (2, doomed_id.clone()));

    cluster.kill(doomed);
    assert!(
        wait_until(Duration::from_secs(30), || rec
            .node()
            .get_timeout(Duration::from_secs(5))
            .is_ok_and(|n| n != doomed_id)),
        "actor not restarted"
    );
    let new_home = rec.node().get().unwrap();

    // The relay's handle was made before the restart, on another node than the creator's.
    let (n, at) = relay
        .relay(2)
        .get_timeout(Duration::from_secs(30))
        .unwrap()
        .unwrap_or_else(|e| panic!("the kept handle did not reach the new incarnation: {e}"));
    assert_eq!(at, new_home);
    assert_eq!(n, 2, "fresh state: the constructor's 7, then 2");
    assert_eq!(rec.seen().get().unwrap(), vec![7, 2]);

    let started = Instant::now();
    let err = mortal_relay
        .relay(2)
        .get_timeout(Duration::from_secs(30))
        .unwrap()
        .expect_err("a call to an actor whose node died cannot succeed");
    assert!(err.contains("died"), "unclear error: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the failure took {:?}",
        started.elapsed()
    );
}
