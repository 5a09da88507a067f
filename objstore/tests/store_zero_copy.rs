//! Zero-copy reads: a `get` view points into the store's own buffer, and `get` allocates nothing.
//!
//! This test binary installs a counting global allocator (per thread, so the harness's other threads do not
//! interfere); it checks allocation counts, not speed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use oxray_objstore::{ObjectId, ObjectStore, StoreConfig};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: defers every call to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.with(Cell::get)
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
struct Batch {
    step: u64,
    name: String,
    payload: Vec<u8>,
}

#[test]
fn get_is_a_view_into_the_store_and_allocates_nothing() {
    let store = ObjectStore::new(StoreConfig::with_limit(64 << 20));
    let id = ObjectId::random();
    let value = Batch {
        step: 9,
        name: "rollout".into(),
        payload: (0..1_000_000u32).map(|i| i as u8).collect(),
    };
    store.put(id, &value).expect("put");

    let raw = store.get_bytes(id).expect("bytes");
    let range = raw.as_ptr() as usize..raw.as_ptr() as usize + raw.len();

    // Warm up once (lazy thread-locals in the locking code), then count.
    drop(store.get::<Batch>(id).expect("get"));
    let before = allocs();
    let mut total = 0u64;
    for _ in 0..1000 {
        let view = store.get::<Batch>(id).expect("get");
        total += view.step.to_native() + u64::from(view.payload[999_999]);
        let view_addr = &*view as *const _ as usize;
        let payload_addr = view.payload.as_ptr() as usize;
        assert!(
            range.contains(&view_addr),
            "view outside the store's buffer"
        );
        assert!(
            range.contains(&payload_addr),
            "payload outside the store's buffer"
        );
    }
    let after = allocs();
    assert_eq!(after - before, 0, "get allocated");
    assert_eq!(total, 1000 * (9 + u64::from(999_999u32 as u8)));

    let view = store.get::<Batch>(id).expect("get");
    assert_eq!(view.name, "rollout");
    assert_eq!(view.deserialize().expect("deserialize"), value);
}

#[test]
fn bytes_from_elsewhere_are_validated_once_then_read_without_allocating() {
    let store = ObjectStore::new(StoreConfig::with_limit(64 << 20));
    let id = ObjectId::random();
    let value = Batch {
        step: 1,
        name: "net".into(),
        payload: vec![7; 4096],
    };
    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&value).expect("serialize");
    let addr = archive.as_ptr() as usize;
    // Adopted without a copy: the store's view points at the caller's buffer.
    store
        .put_secondary(id, bytes::Bytes::from_owner(archive))
        .expect("adopt");

    let view = store.get::<Batch>(id).expect("first get validates");
    assert_eq!(
        &*view as *const _ as usize - addr,
        view.bytes().len() - std::mem::size_of::<ArchivedBatch>()
    );
    assert_eq!(
        view.bytes().as_ptr() as usize,
        addr,
        "adopted without a copy"
    );
    drop(view);

    let before = allocs();
    for _ in 0..100 {
        let view = store.get::<Batch>(id).expect("get");
        assert_eq!(view.payload.len(), 4096);
    }
    assert_eq!(
        allocs() - before,
        0,
        "validated objects must not be re-validated or copied"
    );
}
