//! A node enforces the resources of the tasks other nodes send it: a custom resource it has one of is held by one
//! task at a time, although placement (from the driver's view) sends every task at once and the node has CPUs to
//! spare.

use std::time::Duration;

use oxray::{ActorOptions, TaskOptions};
use oxray_tests::harness::{TestCluster, wait_until};
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

#[test]
fn a_node_runs_tasks_needing_its_one_slot_one_at_a_time() {
    link();
    let mut cluster = TestCluster::start(NODE, 1, &["--dead-after-ms", "3000"]);
    cluster.add_node(4, &["--resources", r#"{"slot": 1}"#]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");

    let opts = TaskOptions::new().num_cpus(0.5).resource("slot", 1.0);
    let refs: Vec<_> = (0..4)
        .map(|_| span::remote_with(&opts, 150).unwrap())
        .collect();
    let mut spans: Vec<(u64, u64)> = refs
        .into_iter()
        .map(|r| r.get_timeout(Duration::from_secs(60)).unwrap())
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "tasks needing the node's one slot overlapped: {spans:?}"
        );
    }
}

/// An actor holding a node's one "slot" takes it from that node's queue, and the node's heartbeats say it is
/// taken: a task needing a slot goes to the other node with one free and runs at once. (When heartbeats carried
/// free CPUs only, the driver saw both slots free and could send the task where it waited for the actor to die.)
#[test]
fn a_slot_held_by_an_actor_sends_tasks_needing_one_elsewhere() {
    link();
    let mut cluster = TestCluster::start(NODE, 1, &["--dead-after-ms", "3000"]);
    cluster.add_node(2, &["--resources", r#"{"slot": 1}"#]);
    cluster.add_node(2, &["--resources", r#"{"slot": 1}"#]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");

    let holder = Recorder::remote_with(&ActorOptions::new().resource("slot", 1.0), 0).unwrap();
    let held_on = holder
        .node()
        .get_timeout(Duration::from_secs(30))
        .expect("the actor starts");
    // Past a few heartbeats (250 ms apart), the driver's view holds what the nodes reported, not its own guesses.
    std::thread::sleep(Duration::from_millis(1200));
    let opts = TaskOptions::new().num_cpus(0.5).resource("slot", 1.0);
    for i in 0..4 {
        let ran_on = where_am_i::remote_with(&opts, 0)
            .unwrap()
            .get_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("task {i} needing a slot did not run: {e}"));
        assert_ne!(
            ran_on, held_on,
            "task {i} ran beside the actor holding that node's slot"
        );
    }
    // Once the actor is gone, its node's slot is free again.
    oxray::kill(&holder);
    assert!(
        wait_until(Duration::from_secs(10), || {
            (0..2).any(|_| {
                where_am_i::remote_with(&opts, 0)
                    .unwrap()
                    .get_timeout(Duration::from_secs(5))
                    .is_ok_and(|n| n == held_on)
            })
        }),
        "the killed actor's slot was never used again"
    );
}
