//! Spin-then-park for threads that wait on a reply expected within microseconds.
//!
//! A synchronous round trip to another process (a `get` after a tiny task, a sync actor call) comes back in tens of
//! microseconds. A thread that parks at once pays a futex wake, and, when its CPU went idle meanwhile, the cost of
//! waking that CPU: on a virtual machine that is an exit to the hypervisor and an inter-processor interrupt, as
//! much as a large part of the round trip. So one thread per process first spins for a short, bounded while; only
//! if the reply is later than that does it park. Which thread depends on where the reply comes from:
//!
//! - In a process alone (the embedded default), the reply comes from another thread of the process: a `get` of one
//!   ref, an idle worker and an idle actor thread spin ([`until`]).
//! - In a process on a cluster, it comes in a packet: the I/O thread spins after each lone message
//!   ([`spin_io_instead`], [`io_message`]), and the callers and workers park at once.
//!
//! The price is bounded: at most the spin limit of CPU per wait that outlasts it; a spinning thread yields to any
//! other runnable thread every few iterations; and only a few threads per process spin at once (one per four
//! cores, at least one), the others park at once. One spinner is all a synchronous caller needs, while many (every
//! idle worker of a 16-core node after a burst, each polling the queue under its lock) took the CPU and the lock
//! from the threads doing the work: async tasks per second fell from 115k to 70k.
//!
//! It pays only on small machines, where one spinner per process keeps every CPU awake; see [`SMALL_MACHINE`].
//! The limit is [`Config::spin`](crate::Config::spin) (`OXRAY_SPIN_US` overrides it; 0 turns spinning off).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Spin limit of this process in nanoseconds; set when the runtime is installed.
static LIMIT_NS: AtomicU64 = AtomicU64::new(0);

/// Threads of this process spinning now, and how many may.
static SPINNING: AtomicUsize = AtomicUsize::new(0);
static MAX_SPINNING: AtomicUsize = AtomicUsize::new(1);

/// The limit on machines of up to [`SMALL_MACHINE`] cores: longer than a quiet loopback round trip between two
/// processes (~50-90 µs on 2 cores), short enough that a wait for real work costs little CPU. Measured on 2 cores,
/// `oxray microbenchmark`, sync rows per second (actor / async actor / tasks), medians of interleaved runs: 0 µs
/// 14.4k/10.9k/13.5k, 100 µs 18.9k/19.2k/17.5k; 200 µs was no better than 100; async rows unchanged.
pub(crate) const SMALL_MACHINE_LIMIT: Duration = Duration::from_micros(100);

/// Spinning pays only where the few spinners keep every CPU awake, so that whichever one a wake-up lands on is not
/// halted. On 16 cores the others still sleep: the sync rows did not improve (actor 10.3k either way, tasks
/// 7.6k -> 8.5k), while async tasks fell from 120k to 94k per second and the CPU per task grew. So machines with more
/// cores than this do not spin unless told to.
pub(crate) const SMALL_MACHINE: usize = 4;

/// The default limit for a machine with `cores` cores.
pub(crate) fn default_limit(cores: usize) -> Duration {
    if cores <= SMALL_MACHINE {
        SMALL_MACHINE_LIMIT
    } else {
        Duration::ZERO
    }
}

/// Iterations between yields: long enough that the spin stays cheap, short enough (about a microsecond) that a
/// thread woken on this CPU runs almost at once.
const YIELD_EVERY: u32 = 16;

/// Sets this process's spin limit, and lets one thread per four of `cores` (at least one) spin at once.
pub(crate) fn set_limit(limit: Duration, cores: usize) {
    IO_LIMIT_NS.store(0, Ordering::Relaxed);
    LIMIT_NS.store(
        u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    MAX_SPINNING.store((cores / 4).max(1), Ordering::Relaxed);
}

/// A claimed spinner place among `count`'s, given back on drop.
struct Spinner(&'static AtomicUsize);

impl Spinner {
    fn claim(count: &'static AtomicUsize, max: usize) -> Option<Spinner> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Spinner(count))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Spins until `ready` returns true or the limit passes; returns whether it became ready. With no limit set, or
/// with as many threads spinning as may, it checks once. `ready` should be cheap and take no lock others need.
pub(crate) fn until(mut ready: impl FnMut() -> bool) -> bool {
    if ready() {
        return true;
    }
    let limit = LIMIT_NS.load(Ordering::Relaxed);
    let spinner = (limit > 0)
        .then(|| Spinner::claim(&SPINNING, MAX_SPINNING.load(Ordering::Relaxed)))
        .flatten();
    spinner.is_some() && within(limit, ready)
}

fn within(limit: u64, mut ready: impl FnMut() -> bool) -> bool {
    if ready() {
        return true;
    }
    if limit == 0 {
        return false;
    }
    let start = Instant::now();
    let mut i: u32 = 0;
    loop {
        i = i.wrapping_add(1);
        if i.is_multiple_of(YIELD_EVERY) {
            std::thread::yield_now();
            if start.elapsed().as_nanos() >= u128::from(limit) {
                return ready();
            }
        } else {
            std::hint::spin_loop();
        }
        if ready() {
            return true;
        }
    }
}

/// The I/O thread's spin limit in nanoseconds: set instead of [`LIMIT_NS`] once this process is on a cluster.
static IO_LIMIT_NS: AtomicU64 = AtomicU64::new(0);
/// When the I/O thread last sent or received a lone message, in nanoseconds since [`EPOCH`].
static IO_LAST: AtomicU64 = AtomicU64::new(0);
/// Whether the spinner task is spinning (or has been told to).
static IO_SPINNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static IO_WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_ns() -> u64 {
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Moves this process's spinning from its application threads to its I/O thread: called when it joins a cluster,
/// with the handle of the I/O runtime that oxray owns.
///
/// Across processes, the thread that must be awake when a reply lands is the I/O thread: it reads the packet and
/// runs QUIC. While callers and idle workers spun, the I/O threads of both processes slept in `epoll_wait` and
/// each message paid a wake of a halted CPU (about 5 µs each way, seen with `sched_switch` tracing), and the
/// spinners of two processes shared one CPU while the I/O threads took turns on the other. Measured on 2 cores,
/// `oxray microbenchmark` sync rows, medians of six interleaved runs (actor / async actor / tasks, calls per
/// second): callers spinning 14.4k / 14.9k / 14.9k, I/O thread spinning 18.6k / 20.9k / 17.7k. Both at once was
/// worse than either (four spinners on two CPUs). A process alone keeps spinning its callers and workers, where
/// the wait is for another thread of the same process.
pub(crate) fn spin_io_instead(io: &tokio::runtime::Handle) {
    let limit = LIMIT_NS.swap(0, Ordering::Relaxed);
    IO_LIMIT_NS.store(limit, Ordering::Relaxed);
    // A spinner of an earlier runtime of this process (shut down mid-spin) may have left the flag set, and a set
    // flag means nobody would notify the new spinner.
    IO_SPINNING.store(false, Ordering::Release);
    if limit > 0 {
        io.spawn(io_spinner());
    }
}

/// Marks a message sent or received by the I/O thread. A lone one (a batch of one call or one result) is the mark
/// of a synchronous caller, whose next message follows within microseconds, so the I/O thread spins for it; batches
/// of many come under load, when the I/O thread is busy anyway and a spinner would only take CPU from the workers.
pub(crate) fn io_message(lone: bool) {
    if !lone || IO_LIMIT_NS.load(Ordering::Relaxed) == 0 {
        return;
    }
    IO_LAST.store(now_ns(), Ordering::Relaxed);
    if !IO_SPINNING.load(Ordering::Relaxed) && !IO_SPINNING.swap(true, Ordering::AcqRel) {
        IO_WAKE.notify_one();
    }
}

fn io_recent(limit: u64) -> bool {
    now_ns().saturating_sub(IO_LAST.load(Ordering::Relaxed)) < limit
}

/// The spinner task on the I/O runtime: after a lone message, keeps the I/O thread polling its sockets (each
/// `yield_now` makes tokio poll for I/O without blocking) until the limit passes with no newer one.
async fn io_spinner() {
    loop {
        IO_WAKE.notified().await;
        loop {
            let limit = IO_LIMIT_NS.load(Ordering::Relaxed);
            while io_recent(limit) {
                // Let a thread runnable on this CPU go first (the worker just handed a call, another process's
                // I/O thread): a spinner that never yields keeps its CPU until the kernel preempts it,
                // milliseconds later, and two of them on one CPU made round trips 4x slower.
                std::thread::yield_now();
                tokio::task::yield_now().await;
            }
            IO_SPINNING.store(false, Ordering::Release);
            // A message marked between the last check and the store found the flag still set and notified no
            // one: look once more.
            if !io_recent(limit) || IO_SPINNING.swap(true, Ordering::AcqRel) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    const MS: u64 = 1_000_000;

    #[test]
    fn only_so_many_spin_at_once() {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let first = Spinner::claim(&COUNT, 2).expect("a place");
        let second = Spinner::claim(&COUNT, 2).expect("a second place");
        assert!(Spinner::claim(&COUNT, 2).is_none(), "a third spinner");
        drop(first);
        let third = Spinner::claim(&COUNT, 2).expect("the place given back");
        drop((second, third));
        assert_eq!(COUNT.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_io_thread_spins_after_a_lone_message_until_the_limit() {
        let io = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        set_limit(Duration::from_millis(30), 2);
        spin_io_instead(io.handle());
        assert_eq!(
            LIMIT_NS.load(Ordering::Relaxed),
            0,
            "callers no longer spin"
        );
        assert_eq!(IO_LIMIT_NS.load(Ordering::Relaxed), 30 * MS);

        io_message(false);
        assert!(!IO_SPINNING.load(Ordering::Acquire), "a batch of many");
        let t = Instant::now();
        io_message(true);
        assert!(IO_SPINNING.load(Ordering::Acquire));
        while IO_SPINNING.load(Ordering::Acquire) {
            assert!(t.elapsed() < Duration::from_secs(10), "spun past the limit");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(t.elapsed() >= Duration::from_millis(25), "stopped early");

        // And again: a later message wakes the spinner anew.
        io_message(true);
        assert!(IO_SPINNING.load(Ordering::Acquire));
        let t = Instant::now();
        while IO_SPINNING.load(Ordering::Acquire) {
            assert!(t.elapsed() < Duration::from_secs(10), "spun past the limit");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn spins_until_ready_or_the_limit() {
        let mut calls = 0;
        assert!(!within(0, || {
            calls += 1;
            false
        }));
        assert_eq!(calls, 1, "no limit: one check");

        let t = Instant::now();
        assert!(!within(20 * MS, || false));
        assert!(t.elapsed() >= Duration::from_millis(20));

        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2));
                flag.store(true, Ordering::Release);
            })
        };
        let t = Instant::now();
        assert!(within(10_000 * MS, || flag.load(Ordering::Acquire)));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "returned when ready, not at the limit"
        );
        setter.join().expect("join");
    }
}
