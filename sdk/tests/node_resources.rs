//! The node admits a task only when the resources it asks for are free here (not just when placement guessed so):
//! custom resources, fractional CPUs, and a worker blocked in `get` lending its CPU to nested tasks.
//!
//! Every test starts the same runtime (2 CPUs and one "slot") and takes `SERIAL`, so they also pass when a runner
//! shares one process between them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use oxray::pg::{PlacementStrategy, placement_group, remove_placement_group};
use oxray::{ActorOptions, Error, ObjectRef, Strategy, TaskOptions};

/// Tasks running now and the most seen at once, per test (tests may share a process).
static LIVE: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
static PEAK: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
/// Each test needs the node to itself.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[oxray::remote]
fn occupy(counter: usize, ms: u64) -> u32 {
    let now = LIVE[counter].fetch_add(1, Ordering::SeqCst) + 1;
    PEAK[counter].fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(ms));
    LIVE[counter].fetch_sub(1, Ordering::SeqCst);
    1
}

#[oxray::remote]
fn tree(depth: u32) -> u64 {
    // Each level waits inside its worker for two children: on 2 CPUs this deadlocks unless a blocked worker lends
    // its CPU to the queue.
    if depth == 0 {
        return 1;
    }
    let a = tree::remote(depth - 1).unwrap();
    let b = tree::remote(depth - 1).unwrap();
    a.get().unwrap() + b.get().unwrap()
}

fn init() -> std::sync::MutexGuard<'static, ()> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    oxray::init_with(oxray::Config {
        num_cpus: 2,
        resources: [("slot".to_string(), 1.0)].into_iter().collect(),
        max_worker_threads: 256,
        ..Default::default()
    })
    .unwrap();
    serial
}

fn run_all(refs: Vec<ObjectRef<u32>>) -> u32 {
    refs.into_iter()
        .map(|r| r.get_timeout(Duration::from_secs(30)).unwrap())
        .sum()
}

#[test]
fn a_custom_resource_of_one_runs_its_tasks_one_at_a_time() {
    let _serial = init();
    let opts = TaskOptions::new().num_cpus(0.5).resource("slot", 1.0);
    let refs = (0..4)
        .map(|_| occupy::remote_with(&opts, 0, 60).unwrap())
        .collect();
    assert_eq!(run_all(refs), 4);
    assert_eq!(
        PEAK[0].load(Ordering::SeqCst),
        1,
        "tasks needing the node's one slot overlapped"
    );
    // More than the node has in total can never run here: a clear error, not a task that waits forever.
    let too_big = TaskOptions::new().resource("slot", 2.0);
    match occupy::remote_with(&too_big, 0, 1).unwrap().get() {
        Err(Error::Infeasible(why)) => assert!(why.contains("slot"), "{why}"),
        other => panic!("expected Infeasible, got {other:?}"),
    }
}

#[test]
fn half_cpu_tasks_run_two_per_cpu() {
    let _serial = init();
    let opts = TaskOptions::new().num_cpus(0.5);
    let refs = (0..8)
        .map(|_| occupy::remote_with(&opts, 1, 300).unwrap())
        .collect();
    assert_eq!(run_all(refs), 8);
    // 2 CPUs hold four half-CPU tasks: never more, and (each sleeping 300 ms, submitted together) all four at once.
    assert_eq!(PEAK[1].load(Ordering::SeqCst), 4);
}

#[test]
fn nested_tasks_on_a_full_node_complete() {
    let _serial = init();
    // 2^6 leaves under 63 waiting parents, on 2 CPUs.
    let r = tree::remote(6).unwrap();
    assert_eq!(r.get_timeout(Duration::from_secs(30)).unwrap(), 64);
    // Whole-CPU tasks still run at most two at once, after the over-commit the tree used is paid back.
    let refs = (0..6)
        .map(|_| occupy::remote_with(&TaskOptions::new(), 2, 50).unwrap())
        .collect();
    assert_eq!(run_all(refs), 6);
    assert!(PEAK[2].load(Ordering::SeqCst) <= 2);
}

#[test]
fn tasks_in_a_bundle_share_what_it_reserved() {
    let _serial = init();
    let one_cpu = oxray::Resources {
        num_cpus: 1.0,
        ..Default::default()
    };
    let pg = placement_group(vec![one_cpu], PlacementStrategy::Pack).unwrap();
    assert!(pg.wait(Duration::from_secs(10)));
    let in_bundle = TaskOptions::new().strategy(Strategy::PlacementGroup {
        group: pg.id(),
        bundle: Some(0),
    });
    // The node's other CPU is busy for a while: tasks in the bundle run on what it reserved all the same.
    let outside = occupy::remote_with(&TaskOptions::new(), 0, 2_000).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let refs = (0..4)
        .map(|_| occupy::remote_with(&in_bundle, 3, 60).unwrap())
        .collect();
    assert_eq!(run_all(refs), 4);
    let (_, busy) = oxray::wait(std::slice::from_ref(&outside), 1, Some(Duration::ZERO));
    assert_eq!(
        busy.len(),
        1,
        "tasks in the bundle waited for the node's free CPU"
    );
    // The bundle holds 1 CPU: its tasks ran one at a time.
    assert_eq!(PEAK[3].load(Ordering::SeqCst), 1, "bundle tasks overlapped");
    match occupy::remote_with(&in_bundle.clone().num_cpus(2.0), 3, 1)
        .unwrap()
        .get_timeout(Duration::from_secs(10))
    {
        Err(Error::Infeasible(_)) => {}
        other => panic!("a task bigger than its bundle: {other:?}"),
    }
    assert_eq!(outside.get().unwrap(), 1);
    remove_placement_group(&pg).unwrap();
}

/// An actor that only holds what it was created with.
#[derive(Debug)]
pub struct Holder;

#[oxray::actor]
impl Holder {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Holder
    }
    pub fn ping(&self) -> u8 {
        1
    }
}

#[test]
fn an_actor_holds_its_resources_while_it_lives() {
    let _serial = init();
    // The actor takes the node's one slot: a task that needs it waits, although placement in one process has
    // nowhere else to send it.
    let holder = Holder::remote_with(&ActorOptions::new().resource("slot", 1.0)).unwrap();
    assert_eq!(
        holder.ping().get_timeout(Duration::from_secs(10)).unwrap(),
        1
    );
    let opts = TaskOptions::new().num_cpus(0.5).resource("slot", 1.0);
    let waiting = occupy::remote_with(&opts, 2, 1).unwrap();
    match waiting.get_timeout(Duration::from_millis(400)) {
        Err(Error::GetTimeout(_)) => {}
        other => panic!("a task needing the actor's slot ran beside it: {other:?}"),
    }
    // Its death gives the slot back, and the waiting task runs.
    oxray::kill(&holder);
    assert_eq!(waiting.get_timeout(Duration::from_secs(10)).unwrap(), 1);
    // An actor asking for more than the node has dies with a clear reason instead of waiting for good.
    let greedy = Holder::remote_with(&ActorOptions::new().resource("slot", 2.0)).unwrap();
    match greedy.ping().get_timeout(Duration::from_secs(10)) {
        Err(Error::ActorDied { reason, .. }) => assert!(reason.contains("slot"), "{reason}"),
        other => panic!("expected the actor to die, got {other:?}"),
    }
}
