//! The store under a small memory limit: eviction, spilling and restore, pinning, and the errors when nothing can
//! be freed. Contents are checked after every step; speed is not (that is the benchmark's job).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use oxray_objstore::{FailureReason, ObjectId, ObjectStore, ObjectStoreError, StoreConfig};
use proptest::prelude::*;

const KIB: usize = 1024;

fn store(limit: usize, spill: bool) -> (ObjectStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = StoreConfig::with_limit(limit);
    cfg.buffer_pool_limit = limit / 4;
    cfg.spill_dir = spill.then(|| dir.path().join("spill"));
    (ObjectStore::new(cfg), dir)
}

/// Deterministic contents for object `seed` of `len` bytes.
fn contents(seed: u128, len: usize) -> Vec<u8> {
    let seed = (seed as u32).wrapping_mul(7);
    (0..len as u32)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed) as u8)
        .collect()
}

fn check(store: &ObjectStore, id: ObjectId, len: usize) {
    let view = store.get::<Vec<u8>>(id).expect("get");
    assert_eq!(view.len(), len);
    assert!(
        view.as_slice() == contents(id.0, len).as_slice(),
        "contents of {id} changed"
    );
}

#[test]
fn primaries_spill_and_restore_transparently() {
    let (store, dir) = store(1024 * KIB, true);
    let ids: Vec<ObjectId> = (1..=8).map(ObjectId).collect();
    for &id in &ids {
        store
            .put(id, &contents(id.0, 300 * KIB))
            .expect("put spills older objects");
        let stats = store.stats();
        assert!(stats.used + stats.pooled <= stats.limit, "{stats:?}");
    }
    let stats = store.stats();
    assert!(
        stats.spilled >= 5,
        "8 x 300 KiB in 1 MiB must spill: {stats:?}"
    );
    assert!(
        std::fs::read_dir(dir.path().join("spill"))
            .expect("spill dir")
            .count()
            >= 5
    );
    for &id in &ids {
        check(&store, id, 300 * KIB);
    }
    // Freeing removes spill files too.
    for &id in &ids {
        assert!(store.free(id));
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("spill"))
            .expect("spill dir")
            .count(),
        0
    );
    assert_eq!(store.stats().used, 0);
}

#[test]
fn secondary_copies_are_dropped_before_primaries_spill() {
    let (store, _dir) = store(1024 * KIB, true);
    let secondary = ObjectId(1);
    let archive =
        rkyv::to_bytes::<rkyv::rancor::Error>(&contents(1, 400 * KIB)).expect("serialize");
    store
        .put_secondary(secondary, Bytes::from_owner(archive))
        .expect("adopt");
    store
        .put(ObjectId(2), &contents(2, 400 * KIB))
        .expect("put");
    store
        .put(ObjectId(3), &contents(3, 400 * KIB))
        .expect("put evicts the secondary");
    assert!(
        !store.contains(secondary),
        "secondary copy should have been dropped"
    );
    assert_eq!(store.stats().spilled, 0, "no primary needed spilling");
    assert!(matches!(
        store.get::<Vec<u8>>(secondary),
        Err(ObjectStoreError::NotFound(_))
    ));
    check(&store, ObjectId(2), 400 * KIB);
    check(&store, ObjectId(3), 400 * KIB);
}

#[test]
fn full_when_everything_is_pinned() {
    let (store, _dir) = store(1024 * KIB, true);
    let guards: Vec<_> = (1..=3)
        .map(|i| {
            store
                .put(ObjectId(i), &contents(i, 300 * KIB))
                .expect("put");
            store.get::<Vec<u8>>(ObjectId(i)).expect("pin")
        })
        .collect();
    let err = store
        .put(ObjectId(9), &contents(9, 300 * KIB))
        .expect_err("everything is pinned");
    let ObjectStoreError::ObjectStoreFull(report) = &err else {
        panic!("wrong error: {err}")
    };
    assert_eq!(report.pinned_count, 3);
    assert!(report.pinned_bytes >= 900 * KIB);
    assert!(err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("pinned") && text.contains("3 objects"),
        "{text}"
    );
    // A get_bytes handle pins too.
    drop(guards);
    let handle = store.get_bytes(ObjectId(1)).expect("bytes");
    store
        .put(ObjectId(9), &contents(9, 300 * KIB))
        .expect("unpinned objects spill");
    assert_eq!(
        handle.len(),
        store.get_bytes(ObjectId(1)).expect("bytes").len()
    );
    check(&store, ObjectId(2), 300 * KIB);
}

#[test]
fn without_spilling_primaries_hold_memory_and_the_error_says_so() {
    let (store, _dir) = store(1024 * KIB, false);
    store
        .put(ObjectId(1), &contents(1, 600 * KIB))
        .expect("put");
    let err = store
        .put(ObjectId(2), &contents(2, 600 * KIB))
        .expect_err("no room, no spilling");
    let ObjectStoreError::ObjectStoreFull(report) = err else {
        panic!("wrong error")
    };
    assert_eq!((report.primary_count, report.pinned_count), (1, 0));
    check(&store, ObjectId(1), 600 * KIB);
}

#[test]
fn too_large_fails_at_once() {
    let (store, _dir) = store(1024 * KIB, true);
    store
        .put(ObjectId(1), &contents(1, 100 * KIB))
        .expect("put");
    let err = store
        .put(ObjectId(2), &contents(2, 2048 * KIB))
        .expect_err("larger than the store");
    assert!(
        matches!(err, ObjectStoreError::TooLarge { limit, .. } if limit == 1024 * KIB),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(
        store.stats().spilled,
        0,
        "nothing was evicted for a hopeless put"
    );
    let big = Bytes::from_owner(
        rkyv::to_bytes::<rkyv::rancor::Error>(&vec![0u8; 2048 * KIB]).expect("ser"),
    );
    assert!(matches!(
        store.put_aligned(ObjectId(3), big),
        Err(ObjectStoreError::TooLarge { .. })
    ));
}

#[test]
fn corrupted_spill_file_is_detected() {
    let (store, dir) = store(1024 * KIB, true);
    store
        .put(ObjectId(1), &contents(1, 600 * KIB))
        .expect("put");
    store
        .put(ObjectId(2), &contents(2, 600 * KIB))
        .expect("put spills 1");
    let path = dir
        .path()
        .join("spill")
        .join(format!("{}.obj", ObjectId(1)));
    let mut raw = std::fs::read(&path).expect("spill file exists");
    let last = raw.len() - 1;
    raw[last] ^= 0x40;
    std::fs::write(&path, raw).expect("corrupt");
    let err = store
        .get::<Vec<u8>>(ObjectId(1))
        .expect_err("corruption must be detected");
    assert!(
        matches!(err, ObjectStoreError::SpillCorrupt { .. }),
        "{err}"
    );
    check(&store, ObjectId(2), 600 * KIB);
}

#[test]
fn puts_are_immutable_and_alignment_is_checked() {
    let (store, _dir) = store(1024 * KIB, true);
    store.put(ObjectId(1), &7u64).expect("put");
    assert!(matches!(
        store.put(ObjectId(1), &8u64),
        Err(ObjectStoreError::AlreadyExists(_))
    ));
    assert_eq!(*store.get::<u64>(ObjectId(1)).expect("get"), 7);

    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&[1u64, 2, 3]).expect("ser");
    let mut shifted = Vec::with_capacity(archive.len() + 1);
    shifted.push(0u8);
    shifted.extend_from_slice(&archive);
    let misaligned = Bytes::from(shifted).slice(1..);
    // The allocator aligns the Vec to at least 8, so one byte in is never 16-aligned.
    assert!(matches!(
        store.put_aligned(ObjectId(2), misaligned),
        Err(ObjectStoreError::Misaligned { .. })
    ));
    store
        .put_aligned(ObjectId(3), Bytes::from_owner(archive))
        .expect("aligned archive is adopted");
    assert_eq!(store.get::<[u64; 3]>(ObjectId(3)).expect("get")[2], 3);
}

#[test]
fn bytes_from_elsewhere_are_validated_per_type() {
    let (store, _dir) = store(1024 * KIB, true);
    // Garbage claiming to be a Vec<u64>: the relative pointer points far outside the buffer.
    let mut garbage = rkyv::util::AlignedVec::<16>::new();
    garbage.extend_from_slice(&[0xff; 64]);
    store
        .put_secondary(ObjectId(1), Bytes::from_owner(garbage))
        .expect("adopt");
    let err = store
        .get::<Vec<u64>>(ObjectId(1))
        .expect_err("invalid archive");
    assert!(matches!(err, ObjectStoreError::Invalid { .. }), "{err}");
    assert_eq!(store.stats().pinned, 0, "a failed get must not leave a pin");
    assert_eq!(
        store
            .get_bytes(ObjectId(1))
            .expect("raw bytes stay readable")
            .len(),
        64
    );

    // A local put read back as a different type is validated, not trusted.
    store.put(ObjectId(2), &vec![0xffu8; 10]).expect("put");
    assert!(matches!(
        store.get::<String>(ObjectId(2)),
        Err(ObjectStoreError::Invalid { .. })
    ));
    assert_eq!(
        store.get::<Vec<u8>>(ObjectId(2)).expect("right type").len(),
        10
    );
}

#[tokio::test]
async fn wait_sees_puts_failures_and_timeouts() {
    let (store, _dir) = store(1024 * KIB, true);
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait(ObjectId(1), Duration::from_secs(10)).await })
    };
    tokio::task::yield_now().await;
    store.put(ObjectId(1), &1u32).expect("put");
    waiter.await.expect("join").expect("object arrived");

    let err = store
        .wait(ObjectId(2), Duration::from_millis(20))
        .await
        .expect_err("never put");
    assert!(matches!(err, ObjectStoreError::Timeout { .. }));

    let failing = {
        let store = store.clone();
        tokio::spawn(async move { store.wait(ObjectId(3), Duration::from_secs(10)).await })
    };
    tokio::task::yield_now().await;
    store.mark_failed(ObjectId(3), FailureReason::OwnerDied);
    assert!(matches!(
        failing.await.expect("join"),
        Err(ObjectStoreError::OwnerDied(_))
    ));
    assert!(matches!(
        store.get::<u32>(ObjectId(3)),
        Err(ObjectStoreError::OwnerDied(_))
    ));
    store.mark_failed(ObjectId(4), FailureReason::ObjectLost);
    assert!(matches!(
        store.wait(ObjectId(4), Duration::from_secs(1)).await,
        Err(ObjectStoreError::ObjectLost(_))
    ));
}

#[test]
fn concurrent_puts_gets_and_frees_keep_contents_intact() {
    let (store, _dir) = store(2048 * KIB, true);
    std::thread::scope(|s| {
        for t in 0..4u128 {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..40u128 {
                    let id = ObjectId(t * 1000 + i);
                    let len = 50 * KIB + (i as usize % 7) * 20 * KIB;
                    store.put(id, &contents(id.0, len)).expect("put");
                    check(&store, id, len);
                    if i >= 3 {
                        let old = ObjectId(t * 1000 + i - 3);
                        check(&store, old, 50 * KIB + ((i - 3) as usize % 7) * 20 * KIB);
                        assert!(store.free(old));
                    }
                }
            });
        }
    });
    let stats = store.stats();
    assert_eq!(stats.objects, 12);
    assert_eq!(stats.pinned, 0);
}

#[derive(Clone, Debug)]
enum Op {
    Put(u8, usize),
    Get(u8),
    Free(u8),
    Pin(u8),
    Unpin(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, 1usize..400).prop_map(|(i, k)| Op::Put(i, k * KIB)),
        3 => (0u8..12).prop_map(Op::Get),
        1 => (0u8..12).prop_map(Op::Free),
        2 => (0u8..12).prop_map(Op::Pin),
        2 => (0usize..8).prop_map(Op::Unpin),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any sequence of put/get/free/pin under a 1 MiB limit: contents are always intact, the limit always holds,
    /// and a put fails only when pinned memory really leaves no room.
    #[test]
    fn contents_survive_eviction_and_spilling(ops in proptest::collection::vec(op(), 1..40)) {
        let (store, _dir) = store(1024 * KIB, true);
        let mut live: HashMap<u8, usize> = HashMap::new();
        let mut pins = Vec::new();
        for op in ops {
            match op {
                Op::Put(i, len) => {
                    let id = ObjectId(u128::from(i));
                    match store.put(id, &contents(id.0, len)) {
                        Ok(()) => { prop_assert!(live.insert(i, len).is_none()); }
                        Err(ObjectStoreError::AlreadyExists(_)) => prop_assert!(live.contains_key(&i)),
                        Err(ObjectStoreError::ObjectStoreFull(r)) => {
                            prop_assert!(r.pinned_bytes + r.freed_pinned_bytes + r.needed > r.limit, "full without cause: {:?}", r);
                        }
                        Err(e) => prop_assert!(false, "unexpected error {}", e),
                    }
                }
                Op::Get(i) => {
                    let id = ObjectId(u128::from(i));
                    match (store.get::<Vec<u8>>(id), live.get(&i)) {
                        (Ok(view), Some(&len)) => prop_assert!(view.as_slice() == contents(id.0, len).as_slice()),
                        (Err(ObjectStoreError::NotFound(_)), None) => {}
                        (Err(ObjectStoreError::ObjectStoreFull(r)), Some(_)) => {
                            prop_assert!(r.pinned_bytes + r.freed_pinned_bytes + r.needed > r.limit, "restore failed without cause: {:?}", r);
                        }
                        (other, expected) => prop_assert!(false, "get {}: {:?} vs {:?}", i, other.map(|_| ()), expected),
                    }
                }
                Op::Free(i) => prop_assert_eq!(store.free(ObjectId(u128::from(i))), live.remove(&i).is_some()),
                Op::Pin(i) => {
                    if let Ok(g) = store.get::<Vec<u8>>(ObjectId(u128::from(i))) { pins.push((i, g)); }
                }
                Op::Unpin(k) => { if k < pins.len() { pins.swap_remove(k); } }
            }
            // Pinned views stay valid and unchanged whatever happens around them.
            for (i, g) in &pins {
                prop_assert!(g.as_slice() == contents(u128::from(*i), g.len()).as_slice());
            }
            let stats = store.stats();
            prop_assert!(stats.used + stats.pooled <= stats.limit, "{:?}", stats);
        }
        drop(pins);
        for (&i, &len) in &live {
            check(&store, ObjectId(u128::from(i)), len);
        }
    }
}
