//! Large values move between nodes with the objstore's `Transfer`: the owner answers a fetch with where copies are,
//! and the reader pulls the value into its own store from one of them, moving on to another copy if one dies.
//!
//! Every blob here is owned by node B (a task there `put` it), so every read elsewhere is a fetch from B's table.

use std::time::{Duration, Instant};

use oxray_tests::harness::{TestCluster, on};
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

/// Far above the 4 MiB a reply carries: these take the pull path.
const BLOB: u64 = 32 << 20;

/// (pulled, failed, fetches, active) on `node`, read by a task there.
fn stats_on(node: &str) -> (u64, u64, u64, u64) {
    transfer_stats::remote_with(&on(node))
        .unwrap()
        .get_timeout(Duration::from_secs(30))
        .unwrap()
}

#[test]
fn a_large_value_is_pulled_intact_by_the_driver_and_by_a_task() {
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "3000"]);
    let b = cluster.add_node(1, &[]);
    let c = cluster.add_node(2, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let (b_id, c_id) = (
        cluster.node_id(b).to_string(),
        cluster.node_id(c).to_string(),
    );

    let (blob, sum) = make_blob::remote_with(&on(&b_id), BLOB, 7)
        .unwrap()
        .get()
        .unwrap();
    let before = oxray::node_state().unwrap().node.transfer;
    let started = Instant::now();
    let view = blob.view().unwrap();
    eprintln!(
        "driver read {} MiB from B in {:?}",
        BLOB >> 20,
        started.elapsed()
    );
    assert_eq!(checksum(&view), sum, "the driver's copy differs");
    let after = oxray::node_state().unwrap().node.transfer;
    assert_eq!(
        after.pulled,
        before.pulled + 1,
        "the driver did not pull it"
    );
    assert!(after.pulled_bytes >= before.pulled_bytes + BLOB);
    drop(view);

    let (c_before, ..) = stats_on(&c_id);
    let (c_sum, ran_on) = blob_sum::remote_with(&on(&c_id), &blob)
        .unwrap()
        .get_timeout(Duration::from_secs(60))
        .unwrap();
    assert_eq!(ran_on, c_id);
    assert_eq!(c_sum, sum, "C's copy differs");
    let (c_after, failed, ..) = stats_on(&c_id);
    assert_eq!(c_after, c_before + 1, "C did not pull it");
    assert_eq!(failed, 0);

    // Both pulled copies were reported to the owner, which has them freed once the object is gone.
    let stored = || -> (usize, usize) {
        let s = oxray::node::cluster_state(&cluster.address, &cluster.token).unwrap();
        let on_c = s.nodes.iter().filter(|n| n.node.id == c_id);
        (
            oxray::node_state().unwrap().node.store.objects,
            on_c.map(|n| n.node.store.objects).sum(),
        )
    };
    assert_eq!(stored(), (1, 1), "a pulled copy is not in its node's store");
    drop(blob);
    let deadline = Instant::now() + Duration::from_secs(15);
    while stored() != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "copies left (driver, C) after the object went: {:?}",
            stored()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// B owns a blob; D pulls it (and tells B it holds a copy); D is killed. Returns the cluster, the blob's ref and
/// checksum, and the ids of B and C.
fn blob_with_a_dead_copy_holder() -> (TestCluster, oxray::ObjectRef<Vec<u8>>, u64, String, String) {
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "1500"]);
    let b = cluster.add_node(1, &[]);
    let c = cluster.add_node(2, &[]);
    let d = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let (b_id, c_id, d_id) = (
        cluster.node_id(b).to_string(),
        cluster.node_id(c).to_string(),
        cluster.node_id(d).to_string(),
    );
    let (blob, sum) = make_blob::remote_with(&on(&b_id), BLOB, 11)
        .unwrap()
        .get()
        .unwrap();
    let (d_sum, _) = blob_sum::remote_with(&on(&d_id), &blob)
        .unwrap()
        .get_timeout(Duration::from_secs(60))
        .unwrap();
    assert_eq!(d_sum, sum);
    // D's copy notice to B left before D's result came back; give B a moment to read it.
    std::thread::sleep(Duration::from_millis(200));
    cluster.kill(d);
    (cluster, blob, sum, b_id, c_id)
}

#[test]
fn a_read_moves_on_from_a_killed_copy_holder_to_another_copy() {
    let (_cluster, blob, sum, _b_id, c_id) = blob_with_a_dead_copy_holder();
    // B names D's copy first (the owner's own copy is the fallback): C tries the dead node, then B, once D is
    // declared dead (about 2 s), not after connection timeouts.
    let (c_sum, _) = blob_sum::remote_with(&on(&c_id), &blob)
        .unwrap()
        .get_timeout(Duration::from_secs(15))
        .unwrap();
    assert_eq!(c_sum, sum, "C's copy differs");
    let (pulled, failed, fetches, _) = stats_on(&c_id);
    assert_eq!((pulled, failed), (1, 0), "C did not pull the blob");
    assert!(
        fetches >= 2,
        "C asked {fetches} copies: it never tried the dead holder's"
    );
}

#[test]
fn with_no_copy_left_a_read_fails_instead_of_hanging() {
    let (mut cluster, blob, _, _b_id, c_id) = blob_with_a_dead_copy_holder();
    let read = blob_sum::remote_with(&on(&c_id), &blob).unwrap();
    // Once C's pull is under way (stuck on the dead holder), the owner goes too: no copy is left.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats_on(&c_id).3 == 0 {
        assert!(Instant::now() < deadline, "C never started pulling");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.kill(1);
    let started = Instant::now();
    // Both holders are declared dead within about 2 s (1.5 s without heartbeats): the pull must end by then, not
    // wait out connection timeouts.
    let err = read
        .get_timeout(Duration::from_secs(15))
        .expect_err("read a blob no node holds");
    eprintln!("read failed after {:?}: {err}", started.elapsed());
    let text = err.to_string().to_lowercase();
    assert!(
        text.contains("lost") || text.contains("died"),
        "not a lost-object error: {err}"
    );
    assert!(!matches!(err, oxray::Error::GetTimeout(_)), "{err}");
    let (pulled, failed, ..) = stats_on(&c_id);
    assert_eq!((pulled, failed), (0, 1), "C's pull did not end as lost");
}
