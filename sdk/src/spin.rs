//! Spin-then-park for threads that wait on a reply expected within microseconds.
//!
//! A synchronous round trip to another process (a `get` after a tiny task, a sync actor call) comes back in tens of
//! microseconds. A thread that parks at once pays a futex wake, and, when its CPU went idle meanwhile, the cost of
//! waking that CPU: on a virtual machine that is an exit to the hypervisor and an inter-processor interrupt, measured
//! here at ~50 µs, as much as the round trip itself. So a waiter first spins for a short, bounded while, checking its
//! condition; only if the reply is later than that does it park. A node's idle workers do the same before they
//! sleep, which keeps their CPU awake for the next request of a synchronous caller.
//!
//! The price is bounded: at most the spin limit of CPU per wait that outlasts it; the spinning thread yields to any
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
