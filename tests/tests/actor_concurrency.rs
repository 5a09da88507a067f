//! `ActorOptions::max_concurrency` for an actor hosted by another node process: the option travels with the
//! creation, and the hosting node overlaps calls (threaded and async), while a `&mut self` call still runs alone
//! and a default actor keeps one caller's order.

use std::collections::HashSet;
use std::time::Duration;

use oxray::{ActorOptions, ObjectRef};
use oxray_tests::harness::TestCluster;
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

/// Long enough for a loaded 2-core machine; a call that can never finish (a barrier nobody else reaches) fails the
/// test here instead of hanging it.
const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn remote_actors_run_calls_concurrently_when_asked() {
    link();
    // The head offers no CPUs and the driver none, so the actors land on the worker.
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "3000"]);
    let worker = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");

    // Threaded: four plain `&self` calls meet at a barrier of four, on four threads of the worker.
    let m = Meeting::remote_with(&ActorOptions::new().max_concurrency(4), 4).unwrap();
    assert_eq!(m.node().get().unwrap(), cluster.node_id(worker));
    let refs: Vec<ObjectRef<String>> = (0..4).map(|_| m.meet()).collect();
    let threads: HashSet<String> = refs
        .iter()
        .map(|r| r.get_timeout(DEADLINE).expect("4 remote calls met"))
        .collect();
    assert_eq!(threads.len(), 4, "ran on {threads:?}");

    // A `&mut self` call sees every call made before it finished and none running, also across the network.
    for round in 1..=3u64 {
        let before: Vec<_> = (0..20).map(|_| m.bump()).collect();
        let snap = m.snapshot();
        let after: Vec<_> = (0..5).map(|_| m.bump()).collect();
        assert_eq!(snap.get_timeout(DEADLINE).unwrap(), (round * 25 - 5, 0));
        oxray::get_all(&before).unwrap();
        oxray::get_all(&after).unwrap();
    }

    // Async: five calls interleave on the actor's thread and meet at a tokio barrier.
    let g = Gather::remote_with(&ActorOptions::new().max_concurrency(5), 5).unwrap();
    let refs: Vec<ObjectRef<u64>> = (0..5).map(|_| g.meet()).collect();
    let mut before: Vec<u64> = refs
        .iter()
        .map(|r| r.get_timeout(DEADLINE).expect("5 async remote calls met"))
        .collect();
    before.sort();
    assert_eq!(before, vec![0, 1, 2, 3, 4]);

    // By default a remote actor runs one caller's calls one at a time, in submission order.
    let rec = Recorder::remote(0).unwrap();
    let lens: Vec<_> = (1..=200).map(|i| rec.record(i)).collect();
    assert_eq!(
        oxray::get_all(&lens).unwrap(),
        (2..=201).collect::<Vec<usize>>()
    );
    assert_eq!(rec.seen().get().unwrap(), (0..=200).collect::<Vec<u64>>());
}
