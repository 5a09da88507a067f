//! The policy's hot path allocates nothing: a counting global allocator watches 30,000 decisions
//! (local, spill with sampling, full-scan fallback, locality, spread, affinity, placement group)
//! on a 1,000-node view. Not a speed test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use oxray_scheduler::sim::{SIM_FUNCTION, random_view};
use oxray_scheduler::view::{BundleLocation, PlacementGroupState};
use oxray_scheduler::{
    Decision, PlacementGroupId, Policy, ResourceSet, Strategy, TaskRequest, ViewDelta,
};
use oxray_transport::NodeId;
use rand::SeedableRng;
use rand::rngs::SmallRng;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Only the measuring thread counts: the test harness may allocate on its own threads.
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn note_alloc() {
    if COUNTING.try_with(|c| c.get()).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decisions_do_not_allocate() {
    let mut view = random_view(1_000, 1_000, 3);
    let pg = PlacementGroupId(9);
    view.apply([ViewDelta::PlacementGroup {
        pg,
        state: PlacementGroupState::Created(vec![
            BundleLocation {
                node: NodeId(5),
                resources: ResourceSet::cpus(2),
            },
            BundleLocation {
                node: NodeId(6),
                resources: ResourceSet::cpus(2),
            },
        ]),
    }]);
    let plain = TaskRequest::new(SIM_FUNCTION, ResourceSet::cpus(1));
    let reqs = [
        plain.clone(),
        TaskRequest {
            args: vec![1.into(), 2.into(), 3.into()],
            ..plain.clone()
        },
        TaskRequest {
            strategy: Strategy::Spread,
            ..plain.clone()
        },
        TaskRequest {
            strategy: Strategy::NodeAffinity {
                node: NodeId(17),
                soft: true,
            },
            ..plain.clone()
        },
        TaskRequest {
            strategy: Strategy::PlacementGroup { pg, bundle: None },
            ..plain.clone()
        },
        // Fits nowhere: sampling fails, full scan, infeasible.
        TaskRequest::new(SIM_FUNCTION, ResourceSet::cpus(64)),
        // Needs a GPU nobody has.
        TaskRequest::new(
            SIM_FUNCTION,
            ResourceSet::try_from_pairs([("GPU", 1.0)]).unwrap(),
        ),
    ];
    let policy = Policy::default();
    let mut rng = SmallRng::seed_from_u64(1);
    let mut kinds = [0usize; 5];
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    for i in 0..30_000usize {
        let local = NodeId((i % 1_000) as u128 + 1);
        let d = policy.decide(&view, local, &reqs[i % reqs.len()], &mut rng);
        let k = match d {
            Decision::RunLocal => 0,
            Decision::Spill(_) => 1,
            Decision::RunInBundle { .. } => 2,
            Decision::Wait => 3,
            Decision::Infeasible(_) => 4,
        };
        kinds[k] += 1;
    }
    COUNTING.with(|c| c.set(false));
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(allocs, 0, "decide allocated {allocs} times");
    // The loop really went down the different paths.
    assert!(
        kinds[0] > 0 && kinds[1] > 0 && kinds[2] > 0 && kinds[4] > 0,
        "{kinds:?}"
    );
}
