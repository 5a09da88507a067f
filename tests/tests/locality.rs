//! Locality end to end: a task that reads a large object runs on the node that holds a copy of it, unless hard
//! constraints (here, resources) rule that node out.
//!
//! The driver (this process, no CPUs) owns every object. A producer pinned to node B computes an 8 MiB vector; B
//! keeps a copy, the driver gets the primary. Readers submitted with the default strategy must then run on B, every
//! time (three CPU nodes: chance alone would pass five rounds once in 243).

use std::time::Duration;

use oxray::{ActorOptions, TaskOptions};
use oxray_tests::harness::{TestCluster, on, wait_until};
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

/// 8 MiB of f32: far above the inline threshold (100 KiB) and the policy's locality floor (1 MiB).
const FLOATS: u64 = 2 << 20;

#[test]
fn readers_of_a_large_object_run_where_it_is() {
    link();
    // B has 2 CPUs so that a load report taken while its producer ran still shows room for a reader; C alone fits a
    // 3-CPU reader.
    let mut cluster = TestCluster::start(NODE, 1, &["--dead-after-ms", "3000"]);
    let b = cluster.add_node(2, &[]);
    let c = cluster.add_node(3, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let b_id = cluster.node_id(b).to_string();
    let c_id = cluster.node_id(c).to_string();
    let expected: f64 = (0..FLOATS).map(|i| i as f32 as f64).sum();

    for round in 0..5 {
        // Submitted while the producer still runs: the owner waits for the value, then places the reader.
        let big = make_vec::remote_with(&on(&b_id), FLOATS).unwrap();
        let (sum, ran_on) = sum_where::remote(&big)
            .unwrap()
            .get_timeout(Duration::from_secs(60))
            .unwrap();
        assert_eq!(sum, expected);
        assert_eq!(
            ran_on, b_id,
            "round {round}: reader of a pending ref ran elsewhere"
        );

        // Submitted once the value is known.
        let big = make_vec::remote_with(&on(&b_id), FLOATS).unwrap();
        assert_eq!(big.view().unwrap().len(), FLOATS as usize);
        let (_, ran_on) = sum_where::remote(&big).unwrap().get().unwrap();
        assert_eq!(
            ran_on, b_id,
            "round {round}: reader of a ready ref ran elsewhere"
        );

        // A reader that only fits on C runs on C: locality never overrides resources.
        let (sum, ran_on) = sum_where::remote_with(&TaskOptions::new().num_cpus(3.0), &big)
            .unwrap()
            .get_timeout(Duration::from_secs(60))
            .unwrap();
        assert_eq!(sum, expected);
        assert_eq!(
            ran_on, c_id,
            "round {round}: 3-CPU reader ran off the only node that fits"
        );
    }

    // Actor creation honours locality too (actors hold no CPU while they run, so every node fits).
    let big = make_vec::remote_with(&on(&b_id), FLOATS).unwrap();
    assert_eq!(big.view().unwrap().len(), FLOATS as usize);
    for _ in 0..3 {
        let h = Holder::remote_with(&ActorOptions::new(), &big).unwrap();
        assert_eq!(h.size().get().unwrap(), FLOATS as usize);
        assert_eq!(
            h.node().get().unwrap(),
            b_id,
            "actor built from a large ref placed elsewhere"
        );
    }

    // B holds its copy while the driver holds the ref, and drops it once the driver drops the ref.
    let copies_on_b = || -> usize {
        let s = oxray::node::cluster_state(&cluster.address, &cluster.token).unwrap();
        s.nodes
            .iter()
            .filter(|n| n.node.id == b_id)
            .map(|n| n.node.store.objects)
            .sum()
    };
    assert!(
        copies_on_b() >= 1,
        "B kept no copy of the value it computed"
    );
    drop(big);
    let mut left = usize::MAX;
    let freed = wait_until(Duration::from_secs(15), || {
        left = copies_on_b();
        left == 0
    });
    assert!(
        freed,
        "{left} copies left in B's store after every ref was dropped"
    );
}
