//! Model-based property test of `LocalQueue`: random sequences of enqueue, dispatch, finish,
//! block/unblock, cancel and bundle prepare/commit/release, checked against a model of what each
//! task holds. Invariants: no pool hands out more than its total (CPU: more than total plus the
//! over-commit bound), and once everything is cancelled, finished and released the node is back
//! to exactly its total with no over-commit. Not a test of dispatch order.

use std::collections::BTreeMap;

use oxray_scheduler::{
    BundleKey, Cancel, Dispatch, LocalQueue, LocalQueueConfig, LocalTask, PlacementGroupId,
    Quantity, ResourceKind, ResourceSet, TaskId, Unblock,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Enqueue { shape: usize, bundle: Option<u32> },
    Dispatch,
    Finish(usize),
    Block(usize),
    Unblock(usize),
    Cancel(usize),
    Prepare(u32),
    Commit(u32),
    Release(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, prop::option::weighted(0.3, 0u32..3)).prop_map(|(shape, bundle)| Op::Enqueue { shape, bundle }),
        4 => Just(Op::Dispatch),
        3 => any::<usize>().prop_map(Op::Finish),
        2 => any::<usize>().prop_map(Op::Block),
        2 => any::<usize>().prop_map(Op::Unblock),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => (0u32..3).prop_map(Op::Prepare),
        1 => (0u32..3).prop_map(Op::Commit),
        1 => (0u32..3).prop_map(Op::Release),
    ]
}

fn shape(i: usize) -> ResourceSet {
    let mem = |gb: u64| Quantity::whole(gb << 30);
    match i {
        0 => ResourceSet::cpus(1),
        1 => ResourceSet::try_from_pairs([("CPU", 0.5)])
            .unwrap()
            .with(ResourceKind::Memory, mem(1)),
        2 => ResourceSet::cpus(2).with(ResourceKind::Memory, mem(2)),
        _ => ResourceSet::new().with(ResourceKind::Memory, mem(1)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum St {
    Running,
    Blocked,
    ResumePending,
}

struct Held {
    res: ResourceSet,
    bundle: Option<BundleKey>,
    state: St,
}

fn key(i: u32) -> BundleKey {
    BundleKey {
        pg: PlacementGroupId(1),
        index: i,
    }
}

fn bundle_res() -> ResourceSet {
    ResourceSet::cpus(2).with(ResourceKind::Memory, Quantity::whole(2 << 30))
}

/// Sum of what live holders of `pool` hold: (cpu of running ones, memory of all).
fn held_in(
    model: &BTreeMap<u128, Held>,
    pool: Option<BundleKey>,
    orphaned: &[u128],
) -> (Quantity, Quantity) {
    let mut cpu = Quantity::ZERO;
    let mut mem = Quantity::ZERO;
    for (id, h) in model {
        if h.bundle != pool || orphaned.contains(id) {
            continue;
        }
        if h.state == St::Running {
            cpu = cpu.checked_add(h.res.cpu()).unwrap();
        }
        mem = mem.checked_add(h.res.memory()).unwrap();
    }
    (cpu, mem)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(debug_assertions) { 128 } else { 512 }, ..ProptestConfig::default() })]

    #[test]
    fn accounting_never_leaks_or_overcommits(ops in prop::collection::vec(op(), 1..200)) {
        let total = ResourceSet::cpus(4).with(ResourceKind::Memory, Quantity::whole(8 << 30));
        let bound = Quantity::whole(1);
        let cfg = LocalQueueConfig { max_cpu_overcommit: Some(bound), max_skips: 4, ..Default::default() };
        let mut q = LocalQueue::new(total.clone(), cfg);
        let mut model: BTreeMap<u128, Held> = BTreeMap::new();
        let mut queued: BTreeMap<u128, (ResourceSet, Option<BundleKey>)> = BTreeMap::new();
        let mut orphaned: Vec<u128> = Vec::new();
        let mut next = 1u128;

        let on_dispatch = |d: Dispatch, model: &mut BTreeMap<u128, Held>, queued: &mut BTreeMap<u128, (ResourceSet, Option<BundleKey>)>| {
            match d {
                Dispatch::Start(TaskId(id)) => {
                    let (res, bundle) = queued.remove(&id).expect("started a task that was queued");
                    model.insert(id, Held { res, bundle, state: St::Running });
                }
                Dispatch::Resume(TaskId(id)) => {
                    let h = model.get_mut(&id).expect("resumed a known task");
                    assert_eq!(h.state, St::ResumePending);
                    h.state = St::Running;
                }
            }
        };

        for op in ops {
            match op {
                Op::Enqueue { shape: s, bundle } => {
                    let res = shape(s);
                    let bundle = bundle.map(key);
                    let id = next;
                    next += 1;
                    if q.enqueue(LocalTask { id: TaskId(id), resources: res.clone(), bundle }).is_ok() {
                        queued.insert(id, (res, bundle));
                    }
                }
                Op::Dispatch => {
                    while let Some(d) = q.poll_dispatch() {
                        on_dispatch(d, &mut model, &mut queued);
                    }
                }
                Op::Finish(i) => {
                    if let Some(&id) = model.keys().nth(i % model.len().max(1)) {
                        q.finish(TaskId(id)).unwrap();
                        model.remove(&id);
                    }
                }
                Op::Block(i) => {
                    let n = model.len().max(1);
                    if let Some((&id, h)) = model.iter_mut().nth(i % n) {
                        let r = q.block(TaskId(id));
                        prop_assert_eq!(r.is_ok(), h.state == St::Running);
                        if r.is_ok() {
                            h.state = St::Blocked;
                        }
                    }
                }
                Op::Unblock(i) => {
                    let n = model.len().max(1);
                    if let Some((&id, h)) = model.iter_mut().nth(i % n) {
                        match q.unblock(TaskId(id)) {
                            Ok(Unblock::Resumed) => { prop_assert_eq!(h.state, St::Blocked); h.state = St::Running; }
                            Ok(Unblock::Deferred) => { prop_assert_eq!(h.state, St::Blocked); h.state = St::ResumePending; }
                            Err(_) => prop_assert_ne!(h.state, St::Blocked),
                        }
                    }
                }
                Op::Cancel(i) => {
                    let ids: Vec<u128> = queued.keys().chain(model.keys()).copied().collect();
                    if let Some(&id) = ids.get(i % ids.len().max(1)) {
                        match q.cancel(TaskId(id)) {
                            Cancel::Removed => { prop_assert!(queued.remove(&id).is_some()); }
                            Cancel::Running => prop_assert!(model.contains_key(&id)),
                            Cancel::NotFound => prop_assert!(false, "known task not found"),
                        }
                    }
                }
                Op::Prepare(b) => { let _ = q.prepare_bundles(&[(key(b), bundle_res())]); }
                Op::Commit(b) => { let _ = q.commit_bundle(key(b)); }
                Op::Release(b) => {
                    if let Some(rel) = q.release_bundle(key(b)) {
                        for id in rel.running { orphaned.push(id.0); }
                        for id in rel.dropped { prop_assert!(queued.remove(&id.0).is_some()); }
                    }
                }
            }
            // The node's free pool never exceeds its total.
            prop_assert!(total.fits(q.available()));
            // Holders of the node pool: CPU within total + bound, memory within total.
            let (cpu, mem) = held_in(&model, None, &orphaned);
            prop_assert!(cpu <= total.cpu().checked_add(bound).unwrap(), "cpu {:?}", cpu);
            prop_assert!(mem <= total.memory());
            for b in 0..3 {
                if q.bundle_state(key(b)) == Some(true) {
                    let (cpu, mem) = held_in(&model, Some(key(b)), &orphaned);
                    prop_assert!(cpu <= bundle_res().cpu().checked_add(bound).unwrap());
                    prop_assert!(mem <= bundle_res().memory());
                }
            }
        }

        // Wind down: cancel what is queued, finish what runs, release bundles.
        for id in queued.keys().copied().collect::<Vec<_>>() {
            prop_assert_eq!(q.cancel(TaskId(id)), Cancel::Removed);
        }
        for id in model.keys().copied().collect::<Vec<_>>() {
            q.finish(TaskId(id)).unwrap();
        }
        prop_assert_eq!(q.poll_dispatch(), None);
        for b in 0..3 {
            q.release_bundle(key(b));
        }
        prop_assert_eq!(q.available(), &total);
        prop_assert_eq!(q.cpu_overcommit(), Quantity::ZERO);
        prop_assert_eq!(q.queue_len(), 0);
        prop_assert_eq!(q.running_len(), 0);
    }
}
