//! Large objects go through the node's object store: bounded memory, spilling, zero-copy views, freeing on drop.
//!
//! Each test runs in its own process (nextest), so each installs its own runtime with its own store limit.

use oxray::{Config, Error, StoreConfig};

const MIB: usize = 1 << 20;

fn init(limit: usize) {
    oxray::init_with(Config {
        num_cpus: 2,
        object_store: StoreConfig::with_limit(limit),
        ..Default::default()
    })
    .unwrap();
}

fn store() -> oxray::state::StoreSummary {
    oxray::node_state().unwrap().node.store
}

fn filled(mib: usize, seed: u8) -> Vec<u8> {
    (0..mib * MIB)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[oxray::remote]
fn make_bytes(mib: u64, seed: u8) -> Vec<u8> {
    filled(mib as usize, seed)
}

#[oxray::remote]
fn checksum(data: Vec<u8>) -> u64 {
    data.iter().map(|b| *b as u64).sum()
}

#[test]
fn a_large_put_lives_in_the_store_and_views_share_its_buffer() {
    init(256 * MIB);
    let small = oxray::put(&vec![1u8; 1000]).unwrap();
    assert_eq!(store().objects, 0, "a small value went to the store");
    let data = filled(8, 1);
    let big = oxray::put(&data).unwrap();
    let s = store();
    assert_eq!(s.objects, 1);
    assert!(s.used >= 8 * MIB, "store charged {} bytes", s.used);
    let listed = oxray::node_state().unwrap().objects;
    let row = listed
        .iter()
        .find(|o| o.id == big.id().to_string())
        .unwrap();
    assert_eq!(row.location, "store");
    // Two views read the same store buffer: no copy, no deserialization.
    let (a, b) = (big.view().unwrap(), big.view().unwrap());
    assert_eq!(a.bytes().as_ptr(), b.bytes().as_ptr());
    assert_eq!(a.len(), 8 * MIB);
    assert_eq!(big.get().unwrap(), data);
    drop((a, b));
    // The last ref gone, the store forgets the object.
    drop(big);
    assert_eq!(store().objects, 0, "object not freed with its last ref");
    assert_eq!(small.get().unwrap().len(), 1000);
}

#[test]
fn objects_spill_past_the_limit_and_come_back_intact() {
    init(24 * MIB);
    let refs: Vec<_> = (0..12u8)
        .map(|i| oxray::put(&filled(4, i)).unwrap())
        .collect();
    let s = store();
    assert_eq!(s.objects, 12);
    assert!(
        s.spilled > 0,
        "48 MiB under a 24 MiB limit but nothing spilled"
    );
    assert!(s.used <= 24 * MIB, "memory {} over the limit", s.used);
    let spilled = oxray::node_state()
        .unwrap()
        .objects
        .iter()
        .filter(|o| o.location == "spilled")
        .count();
    assert!(spilled > 0);
    // Reading every object back restores the spilled ones; contents are intact.
    for (i, r) in refs.iter().enumerate() {
        assert!(
            r.get().unwrap() == filled(4, i as u8),
            "object {i} corrupted"
        );
    }
    drop(refs);
    assert_eq!(store().objects, 0);
}

#[test]
fn a_put_larger_than_the_store_fails_at_once_and_loses_nothing() {
    init(32 * MIB);
    let kept = oxray::put(&filled(4, 9)).unwrap();
    match oxray::put(&vec![7u8; 64 * MIB]) {
        Err(Error::ObjectStoreFull(msg)) => assert!(!msg.is_empty()),
        other => panic!("expected ObjectStoreFull, got {other:?}"),
    }
    // What was there before is still there, and the store still takes puts that fit.
    assert!(kept.get().unwrap() == filled(4, 9));
    assert_eq!(
        oxray::put(&filled(2, 3)).unwrap().view().unwrap().len(),
        2 * MIB
    );
}

#[test]
fn large_results_and_large_arguments_go_through_the_store() {
    init(256 * MIB);
    // A large result is adopted by the owner's store.
    let r = make_bytes::remote(4, 5).unwrap();
    let expected: u64 = filled(4, 5).iter().map(|b| *b as u64).sum();
    assert_eq!(r.view().unwrap().len(), 4 * MIB);
    assert!(store().objects >= 1);
    // Passed on as a ref, and as a large value (put into the store behind the caller's back, like Ray does).
    assert_eq!(checksum::remote(&r).unwrap().get().unwrap(), expected);
    assert_eq!(
        checksum::remote(filled(4, 5)).unwrap().get().unwrap(),
        expected
    );
    drop(r);
    // Everything freed once no ref and no task holds it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store().objects > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(store().objects, 0, "objects left in the store");
}
