//! Refs nested in an argument outlive the call: the callee that keeps them is registered with the owner as a
//! borrower, so the owner keeps the objects after dropping its own refs, and frees them once the borrower lets go.
//!
//! These tests turn off carrying (`OXRAY_CARRY_MAX=0`, inherited by the node processes): a tiny value's refs would
//! otherwise carry the value, and nothing would be kept by id. The last test checks carrying itself.

use std::time::{Duration, Instant};

use oxray::{ActorOptions, ObjectRef, Strategy};
use oxray_tests::harness::{TestCluster, on};
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

/// Tiny values are kept by id like any other (see the module's comment).
fn by_id_only() {
    // SAFETY: set before any thread of this test process reads the environment (nextest runs one test per process).
    unsafe { std::env::set_var("OXRAY_CARRY_MAX", "0") };
}

/// How many of `ids` the driver's node still holds.
fn held(ids: &[String]) -> usize {
    let state = oxray::node_state().unwrap();
    state.objects.iter().filter(|o| ids.contains(&o.id)).count()
}

#[test]
fn an_actor_keeping_nested_refs_keeps_their_objects_alive() {
    by_id_only();
    link();
    // The head offers no CPUs and the driver none, so the actor lands on the worker.
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "3000"]);
    let worker = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let keeper = Keeper::remote().unwrap();

    // Small values (inline in the owner's table) and one large value (in the owner's object store).
    let mut refs: Vec<ObjectRef<Vec<u64>>> =
        (1..=10u64).map(|i| oxray::put(&vec![i]).unwrap()).collect();
    refs.push(oxray::put(&vec![1u64; 200_000]).unwrap());
    let expected: u64 = (1..=10u64).sum::<u64>() + 200_000;
    let ids: Vec<String> = refs.iter().map(|r| r.id().to_string()).collect();
    assert_eq!(held(&ids), ids.len());
    assert_eq!(keeper.keep(refs.clone()).get().unwrap(), 11);

    // The driver lets go of every ref; the actor on the worker still holds them, and can read them.
    drop(refs);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        held(&ids),
        ids.len(),
        "the owner dropped objects a borrower holds"
    );
    assert_eq!(keeper.total().get().unwrap(), Ok(expected));

    // Once the borrower drops them, the owner frees them.
    assert_eq!(keeper.clear().get().unwrap(), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&ids) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} objects still held after the borrower let go",
            held(&ids)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        keeper.total().get().unwrap(),
        Ok(0),
        "nothing is kept any more"
    );
    let _ = cluster.node_id(worker);
}

#[test]
fn a_dead_borrower_lets_go_of_what_it_borrowed() {
    by_id_only();
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "1500"]);
    let worker = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let keeper = Keeper::remote().unwrap();
    let refs: Vec<ObjectRef<Vec<u64>>> =
        (1..=5u64).map(|i| oxray::put(&vec![i]).unwrap()).collect();
    let ids: Vec<String> = refs.iter().map(|r| r.id().to_string()).collect();
    assert_eq!(keeper.keep(refs.clone()).get().unwrap(), 5);
    drop(refs);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        held(&ids),
        ids.len(),
        "the borrower's refs keep the objects"
    );

    // The borrower's node dies without a word: once it is declared dead, the owner frees what it borrowed.
    cluster.kill(worker);
    let deadline = Instant::now() + Duration::from_secs(20);
    while held(&ids) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} objects still held for a dead borrower",
            held(&ids)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_ref_passed_on_by_a_third_node_outlives_that_node_letting_go() {
    // Every BORROW notice is held back 800 ms (inherited by the node processes): without the ack, the middle
    // node's release reaches the owner long before the keeper's borrow does, and the owner frees the objects.
    // SAFETY: set before any thread of this test process reads the environment (nextest runs one test per process).
    unsafe { std::env::set_var("OXRAY_TEST_BORROW_DELAY_MS", "800") };
    by_id_only();
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "5000"]);
    let a = cluster.add_node(1, &[]);
    let b = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let node = |i: usize| u128::from_str_radix(cluster.node_id(i), 16).unwrap();
    let keeper = Keeper::remote_with(&ActorOptions::new().strategy(Strategy::NodeAffinity {
        node: node(b),
        soft: false,
    }))
    .unwrap();
    let refs: Vec<ObjectRef<Vec<u64>>> = (1..=5u64)
        .map(|i| oxray::put(&vec![i; 3]).unwrap())
        .collect();
    let ids: Vec<String> = refs.iter().map(|r| r.id().to_string()).collect();
    let passed =
        pass_on::remote_with(&on(cluster.node_id(a)), refs.clone(), keeper.clone()).unwrap();
    // The driver keeps nothing but the call's own argument, which goes with the call's result.
    drop(refs);
    assert_eq!(passed.get_timeout(Duration::from_secs(30)).unwrap(), 5);
    drop(passed);
    // Long enough for every held-back notice to land, and for a wrongly freed object to be gone.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        held(&ids),
        ids.len(),
        "the owner freed objects the keeper holds"
    );
    assert_eq!(keeper.total().get().unwrap(), Ok(3 * 15));
}

#[test]
fn a_release_that_overtakes_its_borrow_notice_frees_the_object() {
    // BORROW notices held back 800 ms: the borrower's UNBORROW reaches the owner first.
    // SAFETY: set before any thread of this test process reads the environment (nextest runs one test per process).
    unsafe { std::env::set_var("OXRAY_TEST_BORROW_DELAY_MS", "800") };
    by_id_only();
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "5000"]);
    let _worker = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let refs: Vec<ObjectRef<u64>> = (1..=4u64).map(|i| oxray::put(&i).unwrap()).collect();
    let ids: Vec<String> = refs.iter().map(|r| r.id().to_string()).collect();
    // Read and dropped within one task: its release leaves at once, its borrow notice 800 ms later.
    assert_eq!(sum_refs::remote(refs.clone()).unwrap().get().unwrap(), 10);
    drop(refs);
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&ids) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} objects still held: a late borrow notice outlived its release",
            held(&ids)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tiny_values_travel_with_their_refs() {
    link();
    let mut cluster = TestCluster::start(NODE, 0, &["--dead-after-ms", "3000"]);
    let worker = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");
    let on_worker = on(cluster.node_id(worker));

    // Refs put on the worker come back carrying their values: the worker keeps nothing for them.
    let made: Vec<ObjectRef<u64>> = make_refs::remote_with(&on_worker, 5)
        .unwrap()
        .get()
        .unwrap();
    let worker_objects = || {
        let s = oxray::node::cluster_state(&cluster.address, &cluster.token).unwrap();
        let id = cluster.node_id(worker).to_string();
        s.nodes
            .iter()
            .filter(|n| n.node.id == id)
            .map(|n| n.objects.len())
            .sum::<usize>()
    };
    assert_eq!(worker_objects(), 0, "the worker kept tiny objects by id");
    // Killing the worker loses nothing: the values are here.
    cluster.kill(worker);
    assert_eq!(oxray::get_all(&made).unwrap(), vec![0, 10, 20, 30, 40]);

    // Refs put here travel to another node nested in an argument, and one as a direct argument.
    let other = cluster.add_node(1, &[]);
    let on_other = on(cluster.node_id(other));
    let mine: Vec<ObjectRef<u64>> = (1..=10u64).map(|i| oxray::put(&i).unwrap()).collect();
    assert_eq!(
        held(&mine.iter().map(|r| r.id().to_string()).collect::<Vec<_>>()),
        0
    );
    assert_eq!(
        sum_refs::remote_with(&on_other, mine.clone())
            .unwrap()
            .get()
            .unwrap(),
        55
    );
    assert_eq!(
        add::remote_with(&on_other, 1, oxray::put(&41i64).unwrap())
            .unwrap()
            .get()
            .unwrap(),
        42
    );
    // And the ones made on the dead worker go on from here to the other node.
    assert_eq!(
        sum_refs::remote_with(&on_other, made)
            .unwrap()
            .get()
            .unwrap(),
        100
    );
}
