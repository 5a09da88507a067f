//! Refs nested in values and actor handles passed as arguments, on the embedded default.
//!
//! The tests only look at their own objects, so they also pass when a runner shares one process between them.

use oxray::{ActorHandle, ObjectRef};

#[derive(Debug, Default)]
pub struct Tally {
    total: u64,
}

#[oxray::actor]
impl Tally {
    pub fn new() -> Self {
        Tally::default()
    }
    pub fn add(&mut self, n: u64) -> u64 {
        self.total += n;
        self.total
    }
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Gets every nested ref and sums the values.
#[oxray::remote]
fn sum_refs(refs: Vec<ObjectRef<u64>>) -> u64 {
    refs.iter().map(|r| r.get().unwrap()).sum()
}

/// Puts `n` values and returns refs to them: the refs outlive the task that made them.
#[oxray::remote]
fn make_refs(n: u64) -> Vec<ObjectRef<u64>> {
    (0..n).map(|i| oxray::put(&(i * 10)).unwrap()).collect()
}

/// Calls the actor it was handed.
#[oxray::remote]
fn bump(tally: ActorHandle<Tally>, times: u64) -> u64 {
    let calls: Vec<_> = (0..times).map(|_| tally.add(1)).collect();
    oxray::get_all(&calls)
        .unwrap()
        .into_iter()
        .max()
        .unwrap_or(0)
}

fn is_listed(id: oxray::ObjectId) -> bool {
    let id = id.to_string();
    oxray::node_state()
        .unwrap()
        .objects
        .iter()
        .any(|o| o.id == id)
}

#[test]
fn refs_nested_in_a_put_value_live_as_long_as_it() {
    oxray::init().unwrap();
    // Values above the carrying limit (`Config::carry_max`), so the owner keeps them by id.
    let inner: Vec<ObjectRef<Vec<u64>>> = (0..100u64)
        .map(|i| oxray::put(&vec![i; 16]).unwrap())
        .collect();
    let first = inner[0].id();
    let outer = oxray::put(&inner).unwrap();
    // The only refs left are inside `outer`'s value: the objects must stay.
    drop(inner);
    assert!(
        is_listed(first),
        "nested object freed while its container lives"
    );
    let back: Vec<ObjectRef<Vec<u64>>> = outer.get().unwrap();
    assert_eq!(
        back.iter()
            .map(|r| r.get().unwrap()[15])
            .collect::<Vec<_>>(),
        (0..100u64).collect::<Vec<_>>()
    );
    // The archived view reads the refs in place too.
    assert_eq!(outer.view().unwrap().len(), 100);
    // Container and read-back refs gone: the nested objects are freed.
    drop(back);
    drop(outer);
    assert!(!is_listed(first), "nested object outlived every ref to it");
}

#[test]
fn refs_nested_in_arguments_and_results() {
    oxray::init().unwrap();
    let refs: Vec<ObjectRef<u64>> = (1..=10u64).map(|i| oxray::put(&i).unwrap()).collect();
    assert_eq!(sum_refs::remote(refs).unwrap().get().unwrap(), 55);
    // A tiny value's ref carries it (nothing listed by id), and works as any other.
    let tiny = oxray::put(&7u64).unwrap();
    assert!(!is_listed(tiny.id()));
    assert_eq!(
        sum_refs::remote(vec![tiny.clone(), tiny])
            .unwrap()
            .get()
            .unwrap(),
        14
    );
    // Refs made inside a task come back through its result and still resolve.
    let made: Vec<ObjectRef<u64>> = make_refs::remote(5).unwrap().get().unwrap();
    assert_eq!(oxray::get_all(&made).unwrap(), vec![0, 10, 20, 30, 40]);
    // And a result holding refs can be passed on as an argument, by ref.
    let r = make_refs::remote(4).unwrap();
    let nested_sum: u64 = sum_refs::remote(&r).unwrap().get().unwrap();
    assert_eq!(nested_sum, 60);
}

#[test]
fn actor_handles_pass_to_tasks() {
    oxray::init().unwrap();
    let tally = Tally::remote().unwrap();
    let jobs: Vec<_> = (0..4)
        .map(|_| bump::remote(tally.clone(), 25).unwrap())
        .collect();
    oxray::get_all(&jobs).unwrap();
    assert_eq!(tally.total().get().unwrap(), 100);
    // A handle nested in a value works too.
    let handles = oxray::put(&vec![tally.clone(), tally.clone()]).unwrap();
    let back: Vec<ActorHandle<Tally>> = handles.get().unwrap();
    assert_eq!(back[1].add(5).get().unwrap(), 105);
    // A handle to an actor that was killed fails calls with ActorDied, not a hang.
    oxray::kill(&tally);
    let stale: Vec<ActorHandle<Tally>> = handles.get().unwrap();
    assert!(matches!(
        stale[0].total().get(),
        Err(oxray::Error::ActorDied { .. })
    ));
}

#[derive(Debug, Default)]
pub struct Napper {
    naps: u64,
}

#[oxray::actor]
impl Napper {
    pub fn new() -> Self {
        Napper::default()
    }
    /// Waits on a tokio timer inside an async method.
    pub async fn nap(&mut self, ms: u64) -> u64 {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        self.naps += 1;
        self.naps
    }
}

#[test]
fn async_methods_can_wait_on_tokio_timers() {
    oxray::init().unwrap();
    let n = Napper::remote().unwrap();
    let t = std::time::Instant::now();
    let calls: Vec<_> = (0..3).map(|_| n.nap(30)).collect();
    assert_eq!(oxray::get_all(&calls).unwrap(), vec![1, 2, 3]);
    assert!(t.elapsed() >= std::time::Duration::from_millis(90));
}

#[test]
fn tiny_values_nested_in_a_value_come_back_with_it() {
    oxray::init().unwrap();
    // Tiny values (their refs carry them) beside one kept by id, in one value.
    let tiny: Vec<ObjectRef<u64>> = (0..50u64).map(|i| oxray::put(&i).unwrap()).collect();
    let by_id = oxray::put(&vec![7u64; 16]).unwrap();
    let outer = oxray::put(&(tiny.clone(), by_id.clone())).unwrap();
    let by_id_id = by_id.id();
    drop((tiny, by_id));
    assert!(is_listed(by_id_id), "the nested object kept by id went");
    let (back, kept): (Vec<ObjectRef<u64>>, ObjectRef<Vec<u64>>) = outer.get().unwrap();
    assert_eq!(
        oxray::get_all(&back).unwrap(),
        (0..50u64).collect::<Vec<_>>()
    );
    assert_eq!(kept.get().unwrap(), vec![7u64; 16]);
    // Read in place too, and the carried values travel on as arguments.
    assert_eq!(outer.view().unwrap().0.len(), 50);
    assert_eq!(sum_refs::remote(back).unwrap().get().unwrap(), 1225);
}

#[test]
fn values_up_to_the_carrying_limit_ride_with_their_refs_and_larger_ones_are_kept_by_id() {
    oxray::init().unwrap();
    // A `Vec<u8>` archives as its bytes then an 8-byte header: 56 bytes make 64, the default limit.
    let at_limit = oxray::put(&vec![1u8; 56]).unwrap();
    let over = oxray::put(&vec![1u8; 57]).unwrap();
    assert!(
        !is_listed(at_limit.id()),
        "a value at the limit was kept by id"
    );
    assert!(is_listed(over.id()), "a value over the limit was carried");
    assert_eq!(at_limit.get().unwrap(), vec![1u8; 56]);
    assert_eq!(over.get().unwrap(), vec![1u8; 57]);
}
