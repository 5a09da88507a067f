//! A node enforces the resources of the tasks other nodes send it: a custom resource it has one of is held by one
//! task at a time, although placement (from the driver's view) sends every task at once and the node has CPUs to
//! spare.

use std::time::Duration;

use oxray::TaskOptions;
use oxray_tests::harness::TestCluster;
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
