//! `ActorOptions::max_concurrency` on the embedded default: calls that overlap when asked, and only then.
//!
//! The overlap tests use barriers: every call waits until all of them have started, so they finish only if the
//! actor really runs that many at once. With calls one at a time they would wait forever; each `get` has a deadline
//! so that shows up as a failed test, not a hung one.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use oxray::{ActorOptions, Error, ObjectRef};

const DEADLINE: Duration = Duration::from_secs(30);

fn init() {
    oxray::init().expect("init");
}

/// A `Sync` actor whose plain `&self` methods may run on several threads at once.
#[derive(Debug)]
pub struct Meeting {
    barrier: Barrier,
    inflight: AtomicUsize,
    most: AtomicUsize,
    bumps: AtomicU64,
    order: Mutex<Vec<u64>>,
}

#[oxray::actor]
impl Meeting {
    pub fn new(parties: u64) -> Self {
        Meeting {
            barrier: Barrier::new(parties as usize),
            inflight: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            bumps: AtomicU64::new(0),
            order: Mutex::new(Vec::new()),
        }
    }
    /// Waits until `parties` calls are here; returns the name of the thread it ran on.
    pub fn meet(&self) -> String {
        self.barrier.wait();
        std::thread::current().name().unwrap_or("").to_string()
    }
    /// Sleeps `ms` while counting how many calls are inside at once.
    pub fn busy(&self, ms: u64) -> usize {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(ms));
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        now
    }
    /// The most calls seen inside `busy` at once.
    pub fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
    /// Counts a call after a nap, and records `v` in arrival order.
    pub fn bump(&self, v: u64) -> u64 {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        self.order.lock().unwrap().push(v);
        let n = self.bumps.fetch_add(1, Ordering::SeqCst) + 1;
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        n
    }
    /// Runs alone: every call made before it has finished, none made after it has started.
    pub fn snapshot(&mut self) -> (u64, usize) {
        (*self.bumps.get_mut(), self.inflight.load(Ordering::SeqCst))
    }
    /// Everything `bump` recorded, in order.
    pub fn order(&self) -> Vec<u64> {
        self.order.lock().unwrap().clone()
    }
}

/// An async actor whose state is not `Sync` (a `Cell`): its `async fn(&self)` calls interleave on one thread.
#[derive(Debug)]
pub struct Gather {
    barrier: tokio::sync::Barrier,
    arrived: Cell<u64>,
    threads: std::cell::RefCell<HashSet<String>>,
}

#[oxray::actor]
impl Gather {
    pub fn new(parties: u64) -> Self {
        Gather {
            barrier: tokio::sync::Barrier::new(parties as usize),
            arrived: Cell::new(0),
            threads: std::cell::RefCell::new(HashSet::new()),
        }
    }
    /// Waits (without blocking the thread) until `parties` calls are here; returns how many had arrived before it.
    pub async fn meet(&self) -> u64 {
        let before = self.arrived.get();
        self.arrived.set(before + 1);
        self.threads
            .borrow_mut()
            .insert(std::thread::current().name().unwrap_or("").to_string());
        self.barrier.wait().await;
        before
    }
    /// Sleeps on a tokio timer (the actor thread must be inside the I/O runtime's context).
    pub async fn nap(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
    /// The threads `meet` ran on.
    pub fn threads(&self) -> Vec<String> {
        self.threads.borrow().iter().cloned().collect()
    }
    /// Fails a call: only that call.
    pub async fn boom(&self) -> u8 {
        tokio::task::yield_now().await;
        panic!("async boom")
    }
    /// Exclusive, and async.
    pub async fn reset(&mut self) -> u64 {
        tokio::task::yield_now().await;
        self.arrived.replace(0)
    }
}

#[test]
fn a_threaded_actor_runs_max_concurrency_calls_at_once() {
    init();
    let m = Meeting::remote_with(&ActorOptions::new().max_concurrency(4), 4).unwrap();
    let refs: Vec<ObjectRef<String>> = (0..4).map(|_| m.meet()).collect();
    let threads: HashSet<String> = refs
        .iter()
        .map(|r| r.get_timeout(DEADLINE).expect("4 calls met at the barrier"))
        .collect();
    assert_eq!(threads.len(), 4, "ran on {threads:?}");
    // And again, on the same helper threads.
    let refs: Vec<ObjectRef<String>> = (0..4).map(|_| m.meet()).collect();
    for r in &refs {
        r.get_timeout(DEADLINE).expect("second round");
    }
}

#[test]
fn no_more_than_max_concurrency_calls_overlap() {
    init();
    let m = Meeting::remote_with(&ActorOptions::new().max_concurrency(2), 1).unwrap();
    let refs: Vec<ObjectRef<usize>> = (0..8).map(|_| m.busy(50)).collect();
    for r in &refs {
        r.get_timeout(DEADLINE).unwrap();
    }
    assert_eq!(m.most().get().unwrap(), 2);
}

#[test]
fn a_mut_method_runs_alone_and_orders_the_calls_around_it() {
    init();
    let m = Meeting::remote_with(&ActorOptions::new().max_concurrency(8), 1).unwrap();
    for round in 1..=3u64 {
        let before: Vec<_> = (0..20).map(|i| m.bump(i)).collect();
        let snap = m.snapshot();
        let after: Vec<_> = (0..5).map(|i| m.bump(100 + i)).collect();
        // Every bump submitted before the snapshot is counted in it, none after it, and none was running.
        assert_eq!(snap.get_timeout(DEADLINE).unwrap(), (round * 25 - 5, 0));
        oxray::get_all(&before).unwrap();
        oxray::get_all(&after).unwrap();
    }
}

#[test]
fn async_calls_interleave_on_the_actor_thread() {
    init();
    let g = Gather::remote_with(&ActorOptions::new().max_concurrency(5), 5).unwrap();
    let refs: Vec<ObjectRef<u64>> = (0..5).map(|_| g.meet()).collect();
    let mut before: Vec<u64> = refs
        .iter()
        .map(|r| r.get_timeout(DEADLINE).expect("5 async calls met"))
        .collect();
    before.sort();
    assert_eq!(before, vec![0, 1, 2, 3, 4]);
    let threads = g.threads().get().unwrap();
    assert_eq!(
        threads.len(),
        1,
        "a non-Sync state stays on one thread: {threads:?}"
    );
    // Tokio timers work in interleaved calls, a panicking call fails alone, and an async `&mut self` call runs.
    let naps: Vec<_> = (1..=3).map(|i| g.nap(i * 10)).collect();
    assert!(matches!(
        g.boom().get_timeout(DEADLINE),
        Err(Error::TaskFailed { message, .. }) if message == "async boom"
    ));
    assert_eq!(oxray::get_all(&naps).unwrap(), vec![10, 20, 30]);
    assert_eq!(g.reset().get_timeout(DEADLINE).unwrap(), 5);
}

#[test]
fn with_the_default_calls_run_one_at_a_time_in_order() {
    init();
    // The same `Sync` actor, without max_concurrency: its `&self` calls neither overlap nor reorder.
    let m = Meeting::remote(1).unwrap();
    let refs: Vec<ObjectRef<usize>> = (0..4).map(|_| m.busy(5)).collect();
    let bumps: Vec<_> = (0..100).map(|i| m.bump(i)).collect();
    assert_eq!(oxray::get_all(&refs).unwrap(), vec![1; 4]);
    assert_eq!(
        oxray::get_all(&bumps).unwrap(),
        (1..=100).collect::<Vec<u64>>()
    );
    assert_eq!(m.order().get().unwrap(), (0..100).collect::<Vec<u64>>());
    assert_eq!(m.most().get().unwrap(), 1);
}

#[test]
fn a_killed_concurrent_actor_fails_later_calls() {
    init();
    let m = Meeting::remote_with(&ActorOptions::new().max_concurrency(4), 1).unwrap();
    assert_eq!(m.bump(1).get().unwrap(), 1);
    oxray::kill(&m);
    assert!(matches!(
        m.bump(2).get_timeout(DEADLINE),
        Err(Error::ActorDied { .. })
    ));
}
