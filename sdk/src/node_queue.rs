//! The node's task admission: the scheduler's `LocalQueue` driven by the runtime.
//!
//! Placement only guesses from a view that is a heartbeat old, so a node can be sent more than it holds. Here a
//! task whose arguments are ready waits until its resources (fractional CPUs, GPUs, custom resources) are free on
//! this node, holds them while it runs, and gives them back when it ends, whatever way it ends (the release is a
//! drop guard). A worker that blocks in `get`/`wait` lends its CPU to the queue, so a full node can still run the
//! children its tasks wait for; on wake-up it takes the CPU back, over-committing within the queue's bound, or
//! sleeps until the queue resumes it.
//!
//! One short mutex guards the queue; pool submissions and wake-ups happen after it is released.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use oxray_scheduler::view::IdBuild;
use oxray_scheduler::{
    BundleKey, Dispatch, LocalError, LocalQueue, LocalQueueConfig, LocalTask, Quantity,
    ResourceKind, ResourceSet, TaskId, Unblock,
};
use parking_lot::{Condvar, Mutex};

use crate::error::Error;
use crate::pool::WorkerPool;

/// A task waiting in the queue. It is called once: with `None` to run, or with the error that keeps it from running.
pub(crate) type TaskJob = Box<dyn FnOnce(Option<Error>) + Send + 'static>;

/// Told once that a lease was granted (or why it never will be). Called with the queue unlocked, on whatever
/// thread released what it needed: it must only hand the lease on.
type LeaseJob = Box<dyn FnOnce(Result<Lease, Error>) + Send + 'static>;

/// What waits in the queue: a task to run on a pool thread, or a lease to hand out.
enum Job {
    Task(TaskJob),
    Lease(LeaseJob),
}

impl Job {
    /// Tells the waiter it will never start.
    fn fail(self, e: Error) {
        match self {
            Job::Task(job) => job(Some(e)),
            Job::Lease(job) => job(Err(e)),
        }
    }
}

/// Resources held from this node's queue for as long as the lease lives: what an actor with `num_cpus`,
/// `num_gpus` or custom resources holds while it is alive, so tasks queued here wait for what it took.
pub(crate) struct Lease {
    q: Arc<NodeQueue>,
    id: TaskId,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut g = self.q.inner.lock();
        let _ = g.queue.finish(self.id);
        let out = NodeQueue::drain_locked(&mut g);
        drop(g);
        self.q.start(out);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({:?})", self.id)
    }
}

/// Most ready tasks waiting on one node. Past it a task fails at once with a clear error instead of growing the
/// queue without bound; a program that submits more than this at once should wait on some results first.
const MAX_QUEUED: usize = 1_000_000;

thread_local! {
    /// The task this pool thread runs, and the queue it belongs to (a process may hold two runtimes in tests).
    static CURRENT: Cell<Option<(*const NodeQueue, TaskId)>> = const { Cell::new(None) };
    /// This thread is inside `blocking` already: a nested wait lends nothing more.
    static BLOCKED: Cell<bool> = const { Cell::new(false) };
}

/// Clears `BLOCKED` however the wait ends.
struct Unmark;

impl Drop for Unmark {
    fn drop(&mut self) {
        BLOCKED.with(|b| b.set(false));
    }
}

/// A worker whose resume the queue deferred sleeps on this until `poll_dispatch` resumes it.
#[derive(Default)]
struct Wake {
    ready: Mutex<bool>,
    cv: Condvar,
}

struct Inner {
    queue: LocalQueue,
    /// Jobs of queued tasks and leases, started when the queue says so.
    jobs: HashMap<TaskId, Job, IdBuild>,
    /// Blocked workers the queue has not resumed yet.
    waking: HashMap<TaskId, Arc<Wake>, IdBuild>,
    /// Bundles held here.
    bundles: usize,
}

/// What the node's tasks hold, for placement and status.
pub(crate) struct Load {
    pub(crate) queued: usize,
    pub(crate) running: usize,
    pub(crate) available: ResourceSet,
}

pub(crate) struct NodeQueue {
    inner: Mutex<Inner>,
    total: ResourceSet,
    pool: Arc<WorkerPool>,
}

/// Gives a finished task's resources back, on every way out of the job (a panic included).
struct Finish<'a> {
    q: &'a Arc<NodeQueue>,
    id: TaskId,
    /// The task this worker runs next, if the release let one start.
    next: &'a mut Option<(TaskId, TaskJob)>,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(None));
        let mut g = self.q.inner.lock();
        // A task cancelled while queued ran without resources: nothing to give back.
        let _ = g.queue.finish(self.id);
        let mut out = NodeQueue::drain_locked(&mut g);
        drop(g);
        // This worker is about to be free: it runs the next task itself. Through the pool, another thread would be
        // woken for it (a context switch per task on a busy node). Not while unwinding: the task would be lost.
        if !std::thread::panicking()
            && let Some(i) = out
                .iter()
                .position(|o| matches!(o, Out::Start(_, Job::Task(_))))
            && let Out::Start(id, Job::Task(job)) = out.swap_remove(i)
        {
            *self.next = Some((id, job));
        }
        self.q.start(out);
    }
}

enum Out {
    Start(TaskId, Job),
    Resume(Arc<Wake>),
}

impl NodeQueue {
    pub(crate) fn new(total: ResourceSet, pool: Arc<WorkerPool>) -> Arc<Self> {
        let config = LocalQueueConfig {
            max_queued: MAX_QUEUED,
            ..LocalQueueConfig::default()
        };
        Arc::new(NodeQueue {
            inner: Mutex::new(Inner {
                queue: LocalQueue::new(total.clone(), config),
                jobs: HashMap::default(),
                waking: HashMap::default(),
                bundles: 0,
            }),
            total,
            pool,
        })
    }

    /// What this node offers tasks in total.
    pub(crate) fn total(&self) -> &ResourceSet {
        &self.total
    }

    pub(crate) fn load(&self) -> Load {
        let g = self.inner.lock();
        Load {
            queued: g.queue.queue_len(),
            running: g.queue.running_len(),
            available: g.queue.available().clone(),
        }
    }

    /// Queues `job` until `demand` is free here; a demand this node can never meet fails the task at once.
    /// In a placement group's `bundle`, the task draws on what the bundle reserved instead of the node's free pool.
    pub(crate) fn submit(
        self: &Arc<Self>,
        id: u128,
        demand: ResourceSet,
        bundle: Option<BundleKey>,
        job: TaskJob,
    ) {
        match self.admissible(demand, bundle) {
            Ok(demand) => self.enqueue(id, demand, bundle, Job::Task(job)),
            Err(e) => job(Some(e)),
        }
    }

    /// Asks for `demand` until the lease handed to `granted` is dropped: at once if it is free, else when it
    /// frees, ahead of tasks queued later. Fails at once for a demand this node can never meet. Does not wait:
    /// `granted` runs on whichever thread frees the resources (it must only store the lease).
    pub(crate) fn lease(
        self: &Arc<Self>,
        id: u128,
        demand: ResourceSet,
        granted: impl FnOnce(Lease) + Send + 'static,
    ) -> Result<(), Error> {
        let demand = self.admissible(demand, None)?;
        self.enqueue(
            id,
            demand,
            None,
            Job::Lease(Box::new(move |r| match r {
                Ok(lease) => granted(lease),
                Err(e) => {
                    tracing::warn!(cause = %e, "an actor's resources could not be queued for")
                }
            })),
        );
        Ok(())
    }

    /// The demand as this node admits it, or why it can never be met here. Nodes declare no memory, so there is
    /// nothing to hold it against here (placement checks it); a bundle's demand is checked against the bundle.
    fn admissible(
        &self,
        mut demand: ResourceSet,
        bundle: Option<BundleKey>,
    ) -> Result<ResourceSet, Error> {
        let _ = demand.set(ResourceKind::Memory, Quantity::ZERO);
        if bundle.is_none() && !self.total.fits(&demand) {
            return Err(Error::Infeasible(format!(
                "it needs {demand:?} and this node offers {:?} in total",
                self.total
            )));
        }
        Ok(demand)
    }

    /// Queues an admissible demand.
    fn enqueue(
        self: &Arc<Self>,
        id: u128,
        demand: ResourceSet,
        bundle: Option<BundleKey>,
        job: Job,
    ) {
        let id = TaskId(id);
        let mut g = self.inner.lock();
        // Every input is followed by a drain, so nothing queued could start before this one came; if it does not
        // fit what is free either, a drain would only rescan the queue's window for nothing. That rescan per
        // submission was most of the cost of submitting thousands of tasks to a busy node.
        let may_start = match bundle {
            None => g.queue.available().fits(&demand),
            Some(k) => g.queue.bundle_available(k).is_none_or(|a| a.fits(&demand)),
        };
        match g.queue.enqueue(LocalTask {
            id,
            resources: demand,
            bundle,
        }) {
            Ok(()) => {
                g.jobs.insert(id, job);
                if !may_start {
                    return;
                }
                let out = Self::drain_locked(&mut g);
                drop(g);
                self.start(out);
            }
            Err(e) => {
                drop(g);
                let why = match e {
                    LocalError::NeverFits => {
                        "the task needs more than its placement-group bundle reserved".to_string()
                    }
                    LocalError::UnknownBundle(_) => {
                        "its placement-group bundle is not held on this node (the group was removed?)"
                            .to_string()
                    }
                    LocalError::QueueFull(n) => format!(
                        "this node already has {n} tasks waiting for resources; wait for some results before \
                         submitting more"
                    ),
                    e => e.to_string(),
                };
                job.fail(Error::Infeasible(why));
            }
        }
    }

    /// A task cancelled before it started leaves the queue at once (its job then sees its cancel flag).
    pub(crate) fn cancel(self: &Arc<Self>, id: u128) {
        let id = TaskId(id);
        let mut g = self.inner.lock();
        if !matches!(g.queue.cancel(id), oxray_scheduler::Cancel::Removed) {
            return;
        }
        let job = g.jobs.remove(&id);
        let out = Self::drain_locked(&mut g);
        drop(g);
        match job {
            Some(Job::Task(job)) => self.pool.submit(Box::new(move || job(None))),
            Some(Job::Lease(job)) => job(Err(Error::Cancelled)),
            None => {}
        }
        self.start(out);
    }

    /// Reserves a placement group's bundles, all or none, from what is free (actors' leases are taken already).
    pub(crate) fn hold_bundles(&self, bundles: &[(BundleKey, ResourceSet)]) -> Result<(), String> {
        let mut g = self.inner.lock();
        let need = bundles
            .iter()
            .filter(|(k, _)| g.queue.bundle_state(*k).is_none())
            .fold(Quantity::ZERO, |sum, (_, r)| {
                sum.checked_add(r.cpu())
                    .unwrap_or(Quantity::from_raw(u64::MAX))
            });
        let free = g.queue.available().cpu();
        if need > free {
            return Err(format!(
                "{free} CPUs are free here, the bundles need {need}"
            ));
        }
        g.queue
            .prepare_bundles(bundles)
            .map_err(|e| e.to_string())?;
        for (k, _) in bundles {
            if g.queue.bundle_state(*k) == Some(false) {
                g.bundles += 1;
            }
            let _ = g.queue.commit_bundle(*k);
        }
        Ok(())
    }

    /// Gives a bundle's reservation back. Its running tasks finish; its queued ones fail.
    pub(crate) fn release_bundle(self: &Arc<Self>, key: BundleKey) {
        let mut g = self.inner.lock();
        let Some(rel) = g.queue.release_bundle(key) else {
            return;
        };
        g.bundles = g.bundles.saturating_sub(1);
        let dropped: Vec<Job> = rel
            .dropped
            .iter()
            .filter_map(|id| g.jobs.remove(id))
            .collect();
        let out = Self::drain_locked(&mut g);
        drop(g);
        self.start(out);
        for job in dropped {
            job.fail(Error::Infeasible(
                "its placement group was removed before the task started".into(),
            ));
        }
    }

    fn drain_locked(g: &mut Inner) -> Vec<Out> {
        let mut out = Vec::new();
        while let Some(d) = g.queue.poll_dispatch() {
            match d {
                Dispatch::Start(id) => match g.jobs.remove(&id) {
                    Some(job) => {
                        out.push(Out::Start(id, job));
                        // The poll that finds nothing to start scans the queue's window (64 tasks deep): with a long
                        // queue on a full node that failed scan, after every finish, was most of a task's cost. With
                        // nothing free, no bundle and no worker waiting to resume, only a task that needs nothing could
                        // start, and it started when it was queued (unless it sits deeper than the window; the next
                        // input finds it).
                        if g.waking.is_empty() && g.bundles == 0 && g.queue.available().is_empty() {
                            break;
                        }
                    }
                    // Unreachable by construction; never leak the resources it holds.
                    None => {
                        let _ = g.queue.finish(id);
                    }
                },
                Dispatch::Resume(id) => {
                    if let Some(w) = g.waking.remove(&id) {
                        out.push(Out::Resume(w));
                    }
                }
            }
        }
        out
    }

    fn start(self: &Arc<Self>, out: Vec<Out>) {
        for o in out {
            match o {
                Out::Start(id, Job::Task(job)) => {
                    let q = self.clone();
                    self.pool.submit(Box::new(move || q.run(id, job)));
                }
                Out::Start(id, Job::Lease(job)) => job(Ok(Lease {
                    q: self.clone(),
                    id,
                })),
                Out::Resume(w) => {
                    *w.ready.lock() = true;
                    w.cv.notify_one();
                }
            }
        }
    }

    /// Runs a started task on this pool thread, then each task its release starts.
    fn run(self: &Arc<Self>, mut id: TaskId, mut job: TaskJob) {
        loop {
            let mut next = None;
            {
                CURRENT.with(|c| c.set(Some((Arc::as_ptr(self), id))));
                let _finish = Finish {
                    q: self,
                    id,
                    next: &mut next,
                };
                job(None);
            }
            match next {
                Some((i, j)) => (id, job) = (i, j),
                None => return,
            }
        }
    }

    /// Runs `wait` with the calling worker's CPU lent to the queue, if the caller runs one of this queue's tasks.
    pub(crate) fn blocking<R>(self: &Arc<Self>, wait: impl FnOnce() -> R) -> R {
        if BLOCKED.with(|b| b.get()) {
            return wait();
        }
        BLOCKED.with(|b| b.set(true));
        let _unmark = Unmark;
        let me = Arc::as_ptr(self);
        let id = match CURRENT.with(|c| c.get()) {
            Some((q, id)) if std::ptr::eq(q, me) => id,
            _ => return self.pool.blocking(wait),
        };
        let lent = {
            let mut g = self.inner.lock();
            let lent = g.queue.block(id).is_ok();
            let out = Self::drain_locked(&mut g);
            drop(g);
            self.start(out);
            lent
        };
        let r = self.pool.blocking(wait);
        if lent {
            let wake = {
                let mut g = self.inner.lock();
                match g.queue.unblock(id) {
                    Ok(Unblock::Deferred) => {
                        let w = Arc::new(Wake::default());
                        g.waking.insert(id, w.clone());
                        Some(w)
                    }
                    _ => None,
                }
            };
            if let Some(w) = wake {
                // Past the over-commit bound: the CPU comes back when running tasks release theirs.
                let mut ready = w.ready.lock();
                while !*ready {
                    w.cv.wait(&mut ready);
                }
            }
        }
        r
    }
}
