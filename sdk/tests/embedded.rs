//! End-to-end tests of the SDK on the embedded default (the whole system in this process).
//!
//! Each test calls `oxray::init()`, which is idempotent, so the tests also pass when a runner shares one process
//! between them.

use std::time::{Duration, Instant};

use oxray::{ActorOptions, Error, ObjectRef, TaskOptions};

#[oxray::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[oxray::remote]
fn concat(parts: Vec<String>, sep: String) -> String {
    parts.join(&sep)
}

#[oxray::remote]
fn fib(n: u64) -> u64 {
    // Nested tasks: each level submits two more and waits for them inside a worker.
    if n < 2 {
        return n;
    }
    let a = fib::remote(n - 1).unwrap();
    let b = fib::remote(n - 2).unwrap();
    a.get().unwrap() + b.get().unwrap()
}

#[oxray::remote]
fn boom(msg: String) -> u32 {
    panic!("{msg}")
}

#[oxray::remote]
fn sleepy(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[oxray::remote]
fn unit() {}

#[oxray::remote]
fn echo_u32(x: u32) -> u32 {
    x
}

#[oxray::remote]
async fn async_double(x: u32) -> u32 {
    tokio::task::yield_now().await;
    x * 2
}

#[oxray::remote]
fn flaky(counter_key: u64) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::SeqCst);
    if n % 3 != 2 {
        panic!("transient failure {n}");
    }
    counter_key
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq, Clone)]
pub struct Point {
    x: f64,
    y: f64,
    label: String,
}

#[oxray::remote]
fn norm(p: Point) -> f64 {
    (p.x * p.x + p.y * p.y).sqrt()
}

#[derive(Debug)]
pub struct Log {
    entries: Vec<u64>,
}

#[oxray::actor]
impl Log {
    pub fn new(first: u64) -> Self {
        Log {
            entries: vec![first],
        }
    }
    pub fn push(&mut self, v: u64) -> usize {
        self.entries.push(v);
        self.entries.len()
    }
    pub fn all(&self) -> Vec<u64> {
        self.entries.clone()
    }
    pub fn fail(&mut self) -> u8 {
        panic!("method failed on purpose")
    }
    pub async fn later(&mut self, v: u64) -> u64 {
        tokio::task::yield_now().await;
        self.entries.push(v);
        v
    }
}

#[derive(Debug)]
pub struct Broken;

#[oxray::actor]
impl Broken {
    pub fn new(why: String) -> Self {
        panic!("cannot build: {why}")
    }
    pub fn ping(&self) -> u8 {
        1
    }
}

fn init() {
    oxray::init().expect("init");
}

#[test]
fn values_and_refs_as_arguments() {
    init();
    let one = add::remote(1, 2).unwrap();
    assert_eq!(one.get().unwrap(), 3);
    // A ref, a borrowed ref, and a value mixed in one call.
    let two = add::remote(&one, one.clone()).unwrap();
    assert_eq!(two.get().unwrap(), 6);
    let put = oxray::put(&40i64).unwrap();
    assert_eq!(add::remote(put, 2).unwrap().get().unwrap(), 42);
    let s = concat::remote(vec!["a".to_string(), "b".into()], "-".to_string()).unwrap();
    assert_eq!(s.get().unwrap(), "a-b");
    let p = Point {
        x: 3.0,
        y: 4.0,
        label: "p".into(),
    };
    assert_eq!(norm::remote(p).unwrap().get().unwrap(), 5.0);
    unit::remote().unwrap().get().unwrap();
    assert_eq!(async_double::remote(21).unwrap().get().unwrap(), 42);
}

#[test]
fn views_are_zero_copy_archives() {
    init();
    let data: Vec<u32> = (0..10_000).collect();
    let r = oxray::put(&data).unwrap();
    let v1 = r.view().unwrap();
    let v2 = r.view().unwrap();
    assert_eq!(v1.len(), 10_000);
    assert_eq!(v1[9_999], 9_999);
    // Two views of one object share the same buffer: nothing was copied or deserialized.
    assert_eq!(v1.bytes().as_ptr(), v2.bytes().as_ptr());
    assert_eq!(v1.deserialize().unwrap(), data);
}

#[test]
fn nested_tasks_do_not_deadlock_the_pool() {
    // More nested waits than CPU slots: only works if blocked workers give their slots back.
    oxray::init_with(oxray::Config {
        num_cpus: 2,
        max_worker_threads: 512,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        fib::remote(12)
            .unwrap()
            .get_timeout(Duration::from_secs(60))
            .unwrap(),
        144
    );
}

#[test]
fn a_panicking_task_is_a_task_error_with_its_message() {
    init();
    let err = boom::remote("kaboom".to_string())
        .unwrap()
        .get()
        .unwrap_err();
    match err {
        Error::TaskFailed { task, message, .. } => {
            assert!(task.ends_with("boom"), "{task}");
            assert_eq!(message, "kaboom");
        }
        other => panic!("unexpected {other:?}"),
    }
    // A task whose argument failed fails with the argument's error.
    let bad = boom::remote("upstream".to_string()).unwrap();
    let dep = add::remote(1, 1).unwrap();
    drop(dep);
    let err = norm::remote(Point {
        x: 0.0,
        y: 0.0,
        label: String::new(),
    })
    .unwrap()
    .get()
    .unwrap();
    assert_eq!(err, 0.0);
    assert!(matches!(bad.get(), Err(Error::TaskFailed { .. })));
}

#[test]
fn retries_on_application_error_when_asked() {
    init();
    let opts = TaskOptions::new().max_retries(5).retry_exceptions(true);
    assert_eq!(flaky::remote_with(&opts, 7).unwrap().get().unwrap(), 7);
}

#[test]
fn get_timeout_and_wait() {
    init();
    let slow = sleepy::remote(800).unwrap();
    let t = Instant::now();
    assert!(matches!(
        slow.get_timeout(Duration::from_millis(50)),
        Err(Error::GetTimeout(_))
    ));
    assert!(t.elapsed() < Duration::from_millis(700));
    let fast = sleepy::remote(1).unwrap();
    let refs = vec![slow.clone(), fast.clone()];
    let (ready, rest) = oxray::wait(&refs, 1, Some(Duration::from_secs(5)));
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].id(), fast.id());
    assert_eq!(rest[0].id(), slow.id());
    // Timeout with fewer ready than asked.
    let (ready, rest) = oxray::wait(&refs[..1], 1, Some(Duration::from_millis(10)));
    assert!(ready.is_empty() && rest.len() == 1);
    assert_eq!(slow.get().unwrap(), 800);
}

#[test]
fn cancelling_a_pending_task() {
    oxray::init_with(oxray::Config {
        num_cpus: 2,
        max_worker_threads: 64,
        ..Default::default()
    })
    .unwrap();
    // Fill every slot, then cancel a queued task: it must never run.
    let blockers: Vec<ObjectRef<u64>> = (0..8).map(|_| sleepy::remote(300).unwrap()).collect();
    let queued = sleepy::remote(5).unwrap();
    assert!(oxray::cancel(&queued));
    assert_eq!(queued.get(), Err(Error::Cancelled));
    for b in blockers {
        assert_eq!(b.get().unwrap(), 300);
    }
}

#[test]
fn actor_calls_from_one_caller_run_in_order() {
    init();
    let log = Log::remote(0).unwrap();
    let refs: Vec<ObjectRef<usize>> = (1..=200).map(|i| log.push(i)).collect();
    let lens = oxray::get_all(&refs).unwrap();
    assert_eq!(lens, (2..=201).collect::<Vec<usize>>());
    assert_eq!(log.all().get().unwrap(), (0..=200).collect::<Vec<u64>>());
    assert_eq!(log.later(7).get().unwrap(), 7);
    // A failing method is an error for that call only; the actor keeps serving.
    assert!(matches!(log.fail().get(), Err(Error::TaskFailed { .. })));
    assert_eq!(log.push(9).get().unwrap(), 203);
}

#[test]
fn named_actors_and_kill() {
    init();
    let name = format!("log-{}", std::process::id());
    let log = Log::remote_with(&ActorOptions::new().name(&name), 1).unwrap();
    assert!(
        Log::remote_with(&ActorOptions::new().name(&name), 1).is_err(),
        "duplicate name accepted"
    );
    let again = oxray::get_actor::<Log>(&name).unwrap();
    assert_eq!(again.push(2).get().unwrap(), 2);
    assert!(matches!(
        oxray::get_actor::<Broken>(&name),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        oxray::get_actor::<Log>("nobody"),
        Err(Error::ActorNotFound(_))
    ));
    oxray::kill(&log);
    assert!(matches!(again.push(3).get(), Err(Error::ActorDied { .. })));
}

#[test]
fn a_failing_constructor_kills_the_actor() {
    init();
    let b = Broken::remote("no reason".to_string()).unwrap();
    match b.ping().get() {
        Err(Error::ActorDied { reason, .. }) => {
            assert!(reason.contains("cannot build: no reason"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn async_forms() {
    init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = add::remote(20, 22).unwrap();
        assert_eq!(r.get_async().await.unwrap(), 42);
        let refs: Vec<_> = (0..10).map(|i| add::remote(i, i).unwrap()).collect();
        let all = oxray::get_all_async(&refs).await.unwrap();
        assert_eq!(all, (0..10).map(|i| i * 2).collect::<Vec<i64>>());
    });
}
