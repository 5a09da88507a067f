//! The node's bounded worker pool for tasks.
//!
//! `slots` tasks run at once (the node's CPUs). A worker that blocks in `get` gives its slot back for the wait, and
//! the pool starts another thread if work is queued and no thread is idle, so nested tasks cannot deadlock the pool.
//! Threads are bounded by `max_threads`: past it, queued work waits for a thread, and nothing grows without limit.
//!
//! This is not a scheduler: which tasks come here, and when, is decided by the caller. The node runtime makes one
//! with [`WorkerPool::unslotted`]: its `LocalQueue` decides what may run at once (resources, not slots), and the
//! pool only supplies threads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long a thread above the slot count may sit idle before it exits.
const IDLE_RETIRE: std::time::Duration = std::time::Duration::from_secs(10);

struct State {
    queue: VecDeque<Job>,
    /// Workers currently holding a slot.
    running: usize,
    /// Threads alive.
    threads: usize,
    /// Threads waiting for work, parked or spinning.
    idle: usize,
    /// Of the idle threads, those spinning: each takes a queued job without being notified.
    spinning: usize,
    shutdown: bool,
    /// The thread cap was hit (warned once).
    warned_cap: bool,
}

/// A pool of worker threads with a fixed number of execution slots.
pub(crate) struct WorkerPool {
    state: Mutex<State>,
    /// `state.queue`'s length, for an idle worker's spin to watch without taking the lock.
    queued: AtomicUsize,
    cv: Condvar,
    slots: usize,
    /// Threads kept alive when idle; those above it retire.
    warm: usize,
    max_threads: usize,
    name: String,
}

thread_local! {
    static IN_POOL: std::cell::Cell<*const WorkerPool> = const { std::cell::Cell::new(std::ptr::null()) };
}

impl WorkerPool {
    #[cfg(test)]
    pub(crate) fn new(name: &str, slots: usize, max_threads: usize) -> Arc<Self> {
        Self::with_warm(name, slots, slots, max_threads)
    }

    /// A pool that runs every job it is given as soon as a thread is free (up to `max_threads`), keeping `warm`
    /// threads when idle: for a caller that already limits what runs at once.
    pub(crate) fn unslotted(name: &str, warm: usize, max_threads: usize) -> Arc<Self> {
        let max = max_threads.max(warm.max(1));
        Self::with_warm(name, max, warm, max)
    }

    fn with_warm(name: &str, slots: usize, warm: usize, max_threads: usize) -> Arc<Self> {
        Arc::new(WorkerPool {
            queued: AtomicUsize::new(0),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                running: 0,
                threads: 0,
                idle: 0,
                spinning: 0,
                shutdown: false,
                warned_cap: false,
            }),
            cv: Condvar::new(),
            slots: slots.max(1),
            warm: warm.max(1),
            max_threads: max_threads.max(slots.max(1)),
            name: name.to_string(),
        })
    }

    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        let mut s = self.state.lock();
        if s.shutdown {
            return;
        }
        s.queue.push_back(job);
        self.queued.store(s.queue.len(), Ordering::Release);
        self.wake_or_spawn(&mut s);
    }

    fn wake_or_spawn(self: &Arc<Self>, s: &mut State) {
        // Spinning threads take a queued job each by themselves: notifying a parked one as well (a futex wake,
        // for a thread that then finds nothing) cost every synchronous task a context switch.
        if s.running >= self.slots || s.queue.len() <= s.spinning {
            return;
        }
        if s.idle > s.spinning {
            self.cv.notify_one();
        } else if s.threads >= self.max_threads {
            if !s.warned_cap {
                s.warned_cap = true;
                tracing::warn!(
                    threads = s.threads,
                    queued = s.queue.len(),
                    "every worker thread is busy or blocked in get: queued tasks wait for one to finish \
                     (tasks that wait on tasks queued behind them deadlock; raise max_worker_threads)"
                );
            }
        } else {
            s.threads += 1;
            let pool = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-worker", self.name))
                .spawn(move || pool.worker_loop());
            if spawned.is_err() {
                // The OS refused a thread: the queued job waits for an existing worker.
                s.threads -= 1;
            }
        }
    }

    fn worker_loop(self: Arc<Self>) {
        IN_POOL.with(|p| p.set(Arc::as_ptr(&self)));
        let mut s = self.state.lock();
        loop {
            if s.shutdown {
                break;
            }
            if s.running < self.slots
                && let Some(job) = s.queue.pop_front()
            {
                self.queued.store(s.queue.len(), Ordering::Release);
                s.running += 1;
                drop(s);
                job();
                s = self.state.lock();
                s.running -= 1;
                continue;
            }
            s.idle += 1;
            // Spin briefly first (counted idle and spinning, so a submit neither starts another thread nor wakes a
            // parked one): a synchronous caller's next task comes within microseconds, and a parked thread on an
            // idle CPU is slow to wake.
            s.spinning += 1;
            let more = parking_lot::MutexGuard::unlocked(&mut s, || {
                crate::spin::until(|| self.queued.load(Ordering::Acquire) > 0)
            });
            s.spinning -= 1;
            // Checked again under the lock: a job submitted after the spin gave up found no thread waiting to
            // notify, and a shutdown meanwhile notified nobody either.
            if more || s.shutdown || !s.queue.is_empty() {
                s.idle -= 1;
                continue;
            }
            let timed_out = self.cv.wait_for(&mut s, IDLE_RETIRE).timed_out();
            s.idle -= 1;
            // Threads started while others were blocked in `get` leave once the burst is over; `warm` stay.
            if timed_out && s.threads > self.warm && s.queue.is_empty() {
                break;
            }
        }
        s.threads -= 1;
    }

    /// Runs `wait` with the calling worker's slot released, if the caller is one of this pool's workers.
    pub(crate) fn blocking<R>(self: &Arc<Self>, wait: impl FnOnce() -> R) -> R {
        let ours = IN_POOL.with(|p| std::ptr::eq(p.get(), Arc::as_ptr(self)));
        if !ours {
            return wait();
        }
        {
            let mut s = self.state.lock();
            s.running -= 1;
            self.wake_or_spawn(&mut s);
        }
        let out = wait();
        // Take the slot back even if that over-commits for a moment: the waiting task must finish to free anything,
        // and over-commit is bounded by max_threads.
        self.state.lock().running += 1;
        out
    }

    pub(crate) fn shutdown(&self) {
        let mut s = self.state.lock();
        s.shutdown = true;
        s.queue.clear();
        self.queued.store(0, Ordering::Release);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_jobs_with_bounded_parallelism() {
        let pool = WorkerPool::new("t", 2, 8);
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..20 {
            let (live, peak, done) = (live.clone(), peak.clone(), done.clone());
            pool.submit(Box::new(move || {
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(2));
                live.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        while done.load(Ordering::SeqCst) < 20 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            peak.load(Ordering::SeqCst) <= 2,
            "peak {}",
            peak.load(Ordering::SeqCst)
        );
        pool.shutdown();
    }

    #[test]
    fn past_the_thread_cap_queued_work_waits_for_a_thread() {
        // One slot, two threads: both threads blocked in a wait leave the third job queued, not on a new thread.
        let pool = WorkerPool::new("t", 1, 2);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(parking_lot::Mutex::new(release_rx));
        for _ in 0..2 {
            let (p, rx) = (pool.clone(), release_rx.clone());
            pool.submit(Box::new(move || {
                p.blocking(|| rx.lock().recv().unwrap());
            }));
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        pool.submit(Box::new(move || done_tx.send(()).unwrap()));
        let wait = std::time::Duration::from_millis(300);
        assert!(
            done_rx.recv_timeout(wait).is_err(),
            "ran past the thread cap"
        );
        {
            let s = pool.state.lock();
            assert_eq!(s.threads, 2);
            assert!(s.warned_cap, "hitting the cap was not reported");
        }
        // A thread freed by a finished wait takes the queued job.
        release_tx.send(()).unwrap();
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("queued job never ran");
        release_tx.send(()).unwrap();
        pool.shutdown();
    }

    #[test]
    fn nested_wait_releases_the_slot() {
        // One slot: a job that waits for a second job would deadlock unless the wait releases the slot.
        let pool = WorkerPool::new("t", 1, 4);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let inner_pool = pool.clone();
        pool.submit(Box::new(move || {
            inner_pool.submit(Box::new(move || tx.send(()).unwrap()));
            inner_pool.blocking(|| rx.recv().unwrap());
            done_tx.send(()).unwrap();
        }));
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("nested job deadlocked");
        pool.shutdown();
    }
}
