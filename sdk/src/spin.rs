//! Spin-then-park for threads that wait on a reply expected within microseconds.
//!
//! A synchronous round trip to another process (a `get` after a tiny task, a sync actor call) comes back in tens of
//! microseconds. A thread that parks at once pays a futex wake, and, when its CPU went idle meanwhile, the cost of
//! waking that CPU: on a virtual machine that is an exit to the hypervisor and an inter-processor interrupt, measured
//! here at ~50 µs, as much as the round trip itself. So a waiter first spins for a short, bounded while, checking its
//! condition; only if the reply is later than that does it park. A node's idle workers do the same before they
//! sleep, which keeps their CPU awake for the next request of a synchronous caller.
//!
//! The price is bounded: at most the spin limit of CPU per wait that outlasts it, and the spinning thread yields to
//! any other runnable thread every few iterations, so it only uses a CPU nobody else wants. The limit is
//! [`Config::spin`](crate::Config::spin) (`OXRAY_SPIN_US` overrides it; 0 turns spinning off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Spin limit of this process in nanoseconds; set when the runtime is installed.
static LIMIT_NS: AtomicU64 = AtomicU64::new(0);

/// The default limit: longer than a quiet loopback round trip between two processes (~50-90 µs on 2 cores),
/// short enough that a wait for real work costs little CPU. Measured on 2 cores, sync rows per second, median
/// of 4 interleaved runs: 0 µs gave 9.9k/8.8k/10.3k (actor/async actor/tasks), 100 µs 12.4k/12.3k/12.7k, 200 µs
/// no better than 100.
pub(crate) const DEFAULT: Duration = Duration::from_micros(100);

/// Iterations between yields: long enough that the spin stays cheap, short enough (about a microsecond) that a
/// thread woken on this CPU runs almost at once.
const YIELD_EVERY: u32 = 16;

/// Sets this process's spin limit.
pub(crate) fn set_limit(limit: Duration) {
    LIMIT_NS.store(
        u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// Spins until `ready` returns true or the limit passes; returns whether it became ready. With no limit set it
/// checks once.
pub(crate) fn until(ready: impl FnMut() -> bool) -> bool {
    within(LIMIT_NS.load(Ordering::Relaxed), ready)
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
