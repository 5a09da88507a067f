//! The local scheduler core: one node's queue of ready tasks and its exact resource accounting.
//!
//! [`LocalQueue`] decides *when* a task that the policy placed on this node starts. The runtime
//! feeds it inputs ([`LocalQueue::enqueue`], [`LocalQueue::finish`], [`LocalQueue::block`],
//! [`LocalQueue::unblock`], [`LocalQueue::cancel`], bundle prepare/commit/release) and drains
//! outputs with [`LocalQueue::poll_dispatch`] until it returns `None`, starting (or resuming)
//! a worker for each.
//!
//! Invariants and choices:
//! - Resources are acquired at dispatch and released at finish; a task in a placement-group
//!   bundle uses the bundle's reserved pool, never the node's free pool.
//! - A worker blocked in `get` gives its CPU back so nested tasks can run on a full pool
//!   (otherwise a pool of N workers each waiting on a child deadlocks). On resume it takes the
//!   CPU back *even if the pool is full*, over-committing by at most
//!   [`LocalQueueConfig::max_cpu_overcommit`]; the over-commit is a debt paid back by the next
//!   CPU releases before anyone new starts. Past the bound the resume waits in a priority queue
//!   ahead of every new task of that pool, so it cannot deadlock: waiting resumers hold no CPU,
//!   and every running non-blocked task eventually finishes or blocks.
//! - Dispatch is FIFO per pool (the node's free pool, and each bundle), so a backlog in one pool
//!   never hides a task that fits another. Within a pool, a task that does not fit can be
//!   overtaken by a smaller one behind it (looking at most [`LocalQueueConfig::dispatch_window`]
//!   tasks deep), but once overtaken [`LocalQueueConfig::max_skips`] times it reserves its pool,
//!   so a large task is never starved by a stream of small ones.
//! - Every collection is bounded ([`LocalQueueConfig`]); hitting a bound is an error the
//!   runtime turns into backpressure.
//!
//! It is not the placement policy (see [`crate::policy`]) and does no I/O and reads no clock.

use std::collections::{BTreeMap, HashMap, VecDeque};

use oxray_transport::NodeId;

use crate::policy::{Policy, TaskRequest};
use crate::resources::{Quantity, ResourceKind, ResourceSet};
use crate::view::{ClusterView, IdBuild, PlacementGroupId, TaskId};

/// Identifies one bundle of one placement group.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleKey {
    /// The group.
    pub pg: PlacementGroupId,
    /// Bundle index within the group.
    pub index: u32,
}

/// A task handed to the local queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalTask {
    /// Task id (unique among this node's queued, running and parked tasks).
    pub id: TaskId,
    /// Resources held while running.
    pub resources: ResourceSet,
    /// Run inside this bundle's reservation instead of the node's free pool.
    pub bundle: Option<BundleKey>,
}

impl LocalTask {
    /// A task using the node's free pool.
    pub fn new(id: TaskId, resources: ResourceSet) -> Self {
        LocalTask {
            id,
            resources,
            bundle: None,
        }
    }
}

/// Limits and knobs of a [`LocalQueue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalQueueConfig {
    /// Most ready tasks queued; beyond it `enqueue` fails with [`LocalError::QueueFull`].
    pub max_queued: usize,
    /// Most tasks parked as infeasible.
    pub max_infeasible: usize,
    /// Most queued tasks examined per dispatch (keeps `poll_dispatch` O(window)).
    pub dispatch_window: usize,
    /// Times a task may be overtaken before it reserves its pool.
    pub max_skips: u32,
    /// CPU a pool may over-commit for resumed blocked workers. `None`: the pool's total CPU
    /// (at most twice the pool's CPUs run at once).
    pub max_cpu_overcommit: Option<Quantity>,
    /// Most bundles hosted by this node.
    pub max_bundles: usize,
}

impl Default for LocalQueueConfig {
    fn default() -> Self {
        LocalQueueConfig {
            max_queued: 100_000,
            max_infeasible: 10_000,
            dispatch_window: 64,
            max_skips: 16,
            max_cpu_overcommit: None,
            max_bundles: 4_096,
        }
    }
}

/// Errors of [`LocalQueue`] operations. None of them changes the queue's state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    /// The id is already queued, running or parked here. A runtime bug or a duplicated message.
    #[error("task {0:?} is already known to this node")]
    Duplicate(TaskId),
    /// The queue (or the infeasible set) is at its bound. Retryable: apply backpressure to the
    /// submitter, or spill elsewhere.
    #[error("local queue is full ({0} tasks)")]
    QueueFull(usize),
    /// The task can never fit this node (or its bundle): its needs exceed the total.
    /// Terminal here; the policy should not have placed it.
    #[error("task needs more than this node or bundle offers in total")]
    NeverFits,
    /// The task names a bundle this node does not host (or has not committed).
    #[error("bundle {0:?} is not committed on this node")]
    UnknownBundle(BundleKey),
    /// The id is not a running task (for finish/block/unblock) or is in the wrong state.
    #[error("task {0:?} is not running here in a state that allows this")]
    NotRunning(TaskId),
}

/// Errors of the bundle participant operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Not enough free resources to reserve the bundle now. Retryable: the coordinator aborts
    /// this attempt and tries again later.
    #[error("not enough free resources to reserve the bundle")]
    Insufficient,
    /// The bundle can never fit this node's total.
    #[error("bundle exceeds this node's total resources")]
    NeverFits,
    /// The bundle was already prepared with different resources.
    #[error("bundle {0:?} already reserved with different resources")]
    Conflict(BundleKey),
    /// Commit of a bundle that was never prepared (or was released).
    #[error("bundle {0:?} is not prepared")]
    NotPrepared(BundleKey),
    /// This node hosts [`LocalQueueConfig::max_bundles`] bundles already.
    #[error("too many bundles on this node")]
    TooMany,
}

/// One output of [`LocalQueue::poll_dispatch`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// Start this queued task on a worker; its resources are now held.
    Start(TaskId),
    /// Wake this blocked worker; its CPU is held again.
    Resume(TaskId),
}

/// Result of [`LocalQueue::unblock`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Unblock {
    /// CPU re-acquired (possibly over-committed within the bound): wake the worker now.
    Resumed,
    /// Over-commit bound reached: the worker stays asleep until `poll_dispatch` returns
    /// [`Dispatch::Resume`] for it.
    Deferred,
}

/// Result of [`LocalQueue::cancel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// It was queued, parked, or waiting to resume, and is now gone (resources, if any, released).
    Removed,
    /// It is running: the runtime must stop the worker, then call [`LocalQueue::finish`].
    Running,
    /// Unknown here (already finished, or never came).
    NotFound,
}

/// What releasing a bundle affected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleRelease {
    /// Resources returned to the node's free pool.
    pub resources: ResourceSet,
    /// Tasks running in the bundle: the runtime must stop them. Their later `finish` is a no-op.
    pub running: Vec<TaskId>,
    /// Queued tasks of the bundle, dropped (report them as failed to their owners).
    pub dropped: Vec<TaskId>,
}

/// A reservation that tasks draw from: the node's free pool or one bundle.
#[derive(Clone, Debug)]
struct Pool {
    total: ResourceSet,
    available: ResourceSet,
    /// CPU handed to resumed workers beyond what was free; repaid first on release.
    cpu_debt: Quantity,
    /// Over-commit bound for this pool.
    max_debt: Quantity,
}

impl Pool {
    fn new(total: ResourceSet, max_debt: Option<Quantity>) -> Self {
        let max_debt = max_debt.unwrap_or(total.cpu());
        Pool {
            available: total.clone(),
            total,
            cpu_debt: Quantity::ZERO,
            max_debt,
        }
    }

    fn can_start(&self, r: &ResourceSet) -> bool {
        (r.cpu().is_zero() || self.cpu_debt.is_zero()) && self.available.fits(r)
    }

    fn release(&mut self, r: &ResourceSet) {
        if self.cpu_debt.is_zero() || r.cpu().is_zero() {
            let _ = self.available.add(r);
        } else {
            let pay = self.cpu_debt.min(r.cpu());
            self.cpu_debt = self.cpu_debt.saturating_sub(pay);
            let mut rest = r.clone();
            let _ = rest.set(ResourceKind::Cpu, r.cpu().saturating_sub(pay));
            let _ = self.available.add(&rest);
        }
    }

    fn release_except_cpu(&mut self, r: &ResourceSet) {
        let mut rest = r.clone();
        let _ = rest.set(ResourceKind::Cpu, Quantity::ZERO);
        let _ = self.available.add(&rest);
    }

    fn release_cpu(&mut self, cpu: Quantity) {
        self.release(&ResourceSet::new().with(ResourceKind::Cpu, cpu));
    }

    /// Takes `cpu` back for a resumed worker, over-committing within the bound.
    fn try_resume(&mut self, cpu: Quantity) -> bool {
        let have = self.available.cpu();
        if have >= cpu {
            let _ = self
                .available
                .set(ResourceKind::Cpu, have.saturating_sub(cpu));
            return true;
        }
        let short = cpu.saturating_sub(have);
        match self.cpu_debt.checked_add(short) {
            Some(d) if d <= self.max_debt => {
                self.cpu_debt = d;
                let _ = self.available.set(ResourceKind::Cpu, Quantity::ZERO);
                true
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug)]
struct Queued {
    task: LocalTask,
    seq: u64,
    skips: u32,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Blocked,
    /// Unblocked but waiting in `resumes` for CPU.
    ResumePending,
}

#[derive(Clone, Debug)]
struct Running {
    resources: ResourceSet,
    bundle: Option<BundleKey>,
    state: RunState,
    /// Its bundle was released: nothing to give back at finish.
    orphaned: bool,
}

#[derive(Clone, Debug)]
struct Bundle {
    pool: Pool,
    committed: bool,
}

/// Most distinct pools with a waiting resume tracked per dispatch scan (beyond it the scan stops).
const MAX_RESERVED_POOLS: usize = 8;

/// One node's local scheduler. See the module docs.
#[derive(Debug)]
pub struct LocalQueue {
    config: LocalQueueConfig,
    node: Pool,
    queued: HashMap<TaskId, Queued, IdBuild>,
    /// One FIFO of `(task, seq)` per pool (`None`: the node's free pool); entries whose seq
    /// no longer matches `queued` are stale (cancelled). Empty FIFOs are removed. A `BTreeMap`
    /// so the scan order is deterministic.
    order: BTreeMap<Option<BundleKey>, VecDeque<(TaskId, u64)>>,
    next_seq: u64,
    /// Cancelled entries still sitting in `order`. When they outnumber live ones (plus slack)
    /// the FIFOs are compacted, so cancel storms cannot grow `order` without bound.
    stale: usize,
    running: HashMap<TaskId, Running, IdBuild>,
    /// Blocked workers waiting to resume, in order; stale entries are skipped.
    resumes: VecDeque<TaskId>,
    bundles: HashMap<BundleKey, Bundle>,
    infeasible: HashMap<TaskId, TaskRequest, IdBuild>,
}

impl LocalQueue {
    /// A node offering `total`.
    pub fn new(total: ResourceSet, config: LocalQueueConfig) -> Self {
        LocalQueue {
            node: Pool::new(total, config.max_cpu_overcommit),
            config,
            queued: HashMap::default(),
            order: BTreeMap::new(),
            next_seq: 0,
            stale: 0,
            running: HashMap::default(),
            resumes: VecDeque::new(),
            bundles: HashMap::new(),
            infeasible: HashMap::default(),
        }
    }

    /// The node's total resources.
    pub fn total(&self) -> &ResourceSet {
        &self.node.total
    }

    /// The node's free pool (bundle reservations excluded), for the resource report.
    pub fn available(&self) -> &ResourceSet {
        &self.node.available
    }

    /// Ready tasks waiting to start (for the resource report).
    pub fn queue_len(&self) -> usize {
        self.queued.len()
    }

    /// Tasks holding a worker (running, blocked or waiting to resume).
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// CPU currently over-committed in the node's pool by resumed workers.
    pub fn cpu_overcommit(&self) -> Quantity {
        self.node.cpu_debt
    }

    fn known(&self, id: TaskId) -> bool {
        self.queued.contains_key(&id)
            || self.running.contains_key(&id)
            || self.infeasible.contains_key(&id)
    }

    fn pool_mut(&mut self, bundle: Option<BundleKey>) -> Option<&mut Pool> {
        match bundle {
            None => Some(&mut self.node),
            Some(k) => self
                .bundles
                .get_mut(&k)
                .filter(|b| b.committed)
                .map(|b| &mut b.pool),
        }
    }

    /// Queues a ready task. It starts when `poll_dispatch` finds room for it.
    pub fn enqueue(&mut self, task: LocalTask) -> Result<(), LocalError> {
        if self.known(task.id) {
            return Err(LocalError::Duplicate(task.id));
        }
        if self.queued.len() >= self.config.max_queued {
            return Err(LocalError::QueueFull(self.queued.len()));
        }
        let pool = match task.bundle {
            None => &self.node,
            Some(k) => match self.bundles.get(&k) {
                Some(b) if b.committed => &b.pool,
                _ => return Err(LocalError::UnknownBundle(k)),
            },
        };
        if !pool.total.fits(&task.resources) {
            return Err(LocalError::NeverFits);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order
            .entry(task.bundle)
            .or_default()
            .push_back((task.id, seq));
        self.queued.insert(
            task.id,
            Queued {
                task,
                seq,
                skips: 0,
            },
        );
        Ok(())
    }

    /// The next task to start or worker to resume, with its resources already acquired.
    /// Call until it returns `None` after every input.
    pub fn poll_dispatch(&mut self) -> Option<Dispatch> {
        // Pools with a resume waiting: new tasks of those pools must not jump ahead of it.
        let mut reserved: [Option<Option<BundleKey>>; MAX_RESERVED_POOLS] =
            [None; MAX_RESERVED_POOLS];
        let mut n_reserved = 0usize;
        let mut i = 0;
        while i < self.resumes.len() {
            let id = self.resumes[i];
            let Some(r) = self
                .running
                .get(&id)
                .filter(|r| r.state == RunState::ResumePending)
            else {
                self.resumes.remove(i);
                continue;
            };
            let (cpu, bundle) = (r.resources.cpu(), r.bundle);
            let ok = self.pool_mut(bundle).is_some_and(|p| p.try_resume(cpu));
            if ok {
                self.resumes.remove(i);
                if let Some(r) = self.running.get_mut(&id) {
                    r.state = RunState::Running;
                }
                return Some(Dispatch::Resume(id));
            }
            if !reserved[..n_reserved].contains(&Some(bundle)) {
                if n_reserved == MAX_RESERVED_POOLS {
                    return None;
                }
                reserved[n_reserved] = Some(bundle);
                n_reserved += 1;
            }
            i += 1;
        }

        // Each pool has its own FIFO, so a backlog in one pool (say the node's) never hides a
        // task that fits another (a bundle). Node pool first, then bundles in key order.
        let LocalQueue {
            order,
            queued,
            node,
            bundles,
            config,
            stale,
            ..
        } = self;
        let mut chosen: Option<(Option<BundleKey>, usize)> = None;
        // Pools whose FIFO turned out empty, removed after the scan (a few per call is plenty).
        let mut empty: [Option<Option<BundleKey>>; 4] = [None; 4];
        let mut n_empty = 0usize;
        for (key, fifo) in order.iter_mut() {
            if reserved[..n_reserved].contains(&Some(*key)) {
                continue;
            }
            // Drop stale heads so the window counts live entries.
            while let Some(&(id, seq)) = fifo.front() {
                if queued.get(&id).is_some_and(|q| q.seq == seq) {
                    break;
                }
                fifo.pop_front();
                *stale = stale.saturating_sub(1);
            }
            if fifo.is_empty() {
                if n_empty < empty.len() {
                    empty[n_empty] = Some(*key);
                    n_empty += 1;
                }
                continue;
            }
            let pool = match key {
                None => Some(&*node),
                Some(k) => bundles.get(k).filter(|b| b.committed).map(|b| &b.pool),
            };
            // Bundle gone: its entries were dropped by `release_bundle`.
            let Some(pool) = pool else { continue };
            let mut live_seen = 0usize;
            let mut pos = 0usize;
            while pos < fifo.len() && live_seen < config.dispatch_window {
                let (id, seq) = fifo[pos];
                if let Some(q) = queued.get(&id).filter(|q| q.seq == seq) {
                    live_seen += 1;
                    if pool.can_start(&q.task.resources) {
                        chosen = Some((*key, pos));
                        break;
                    }
                    if q.skips >= config.max_skips {
                        // Starving: it reserves the pool until it fits.
                        break;
                    }
                }
                pos += 1;
            }
            if chosen.is_some() {
                break;
            }
        }
        for key in empty.iter().take(n_empty).flatten() {
            order.remove(key);
        }
        let (key, pos) = chosen?;
        let fifo = self.order.get_mut(&key)?;
        // Everyone live ahead of the winner in its pool was overtaken once more.
        for &(id, seq) in fifo.iter().take(pos) {
            if let Some(q) = self.queued.get_mut(&id).filter(|q| q.seq == seq) {
                q.skips = q.skips.saturating_add(1);
            }
        }
        let (id, _) = fifo.remove(pos)?;
        if fifo.is_empty() {
            self.order.remove(&key);
        }
        let q = self.queued.remove(&id)?;
        let pool = self.pool_mut(q.task.bundle)?;
        // Checked by `can_start` above.
        if pool.available.sub(&q.task.resources).is_err() {
            return None;
        }
        self.running.insert(
            id,
            Running {
                resources: q.task.resources,
                bundle: q.task.bundle,
                state: RunState::Running,
                orphaned: false,
            },
        );
        Some(Dispatch::Start(id))
    }

    /// A running task ended (success, failure or killed): its resources go back.
    pub fn finish(&mut self, id: TaskId) -> Result<(), LocalError> {
        let r = self.running.remove(&id).ok_or(LocalError::NotRunning(id))?;
        if r.orphaned {
            return Ok(());
        }
        if let Some(pool) = self.pool_mut(r.bundle) {
            match r.state {
                RunState::Running => pool.release(&r.resources),
                RunState::Blocked | RunState::ResumePending => {
                    pool.release_except_cpu(&r.resources)
                }
            }
        }
        Ok(())
    }

    /// The worker running `id` blocked in `get`/`wait`: its CPU goes back to the pool.
    pub fn block(&mut self, id: TaskId) -> Result<(), LocalError> {
        let r = self
            .running
            .get_mut(&id)
            .ok_or(LocalError::NotRunning(id))?;
        if r.state != RunState::Running {
            return Err(LocalError::NotRunning(id));
        }
        r.state = RunState::Blocked;
        let (cpu, bundle, orphaned) = (r.resources.cpu(), r.bundle, r.orphaned);
        if !orphaned && let Some(pool) = self.pool_mut(bundle) {
            pool.release_cpu(cpu);
        }
        Ok(())
    }

    /// The worker running `id` can continue: it takes its CPU back (see the module docs).
    pub fn unblock(&mut self, id: TaskId) -> Result<Unblock, LocalError> {
        let r = self.running.get(&id).ok_or(LocalError::NotRunning(id))?;
        if r.state != RunState::Blocked {
            return Err(LocalError::NotRunning(id));
        }
        let (cpu, bundle, orphaned) = (r.resources.cpu(), r.bundle, r.orphaned);
        // Resumes queue in order: do not overtake an earlier one of the same pool.
        let earlier_waiting = self.resumes.iter().any(|t| {
            self.running
                .get(t)
                .is_some_and(|x| x.state == RunState::ResumePending && x.bundle == bundle)
        });
        let ok = orphaned
            || (!earlier_waiting && self.pool_mut(bundle).is_some_and(|p| p.try_resume(cpu)));
        let r = self
            .running
            .get_mut(&id)
            .ok_or(LocalError::NotRunning(id))?;
        if ok {
            r.state = RunState::Running;
            Ok(Unblock::Resumed)
        } else {
            r.state = RunState::ResumePending;
            self.resumes.push_back(id);
            Ok(Unblock::Deferred)
        }
    }

    /// Cancels a task that has not started (or reports that it is running).
    pub fn cancel(&mut self, id: TaskId) -> Cancel {
        if self.queued.remove(&id).is_some() {
            // Its `order` entry becomes stale and is skipped (or compacted away here).
            self.stale += 1;
            if self.stale > self.queued.len() + 1_024 {
                let queued = &self.queued;
                for fifo in self.order.values_mut() {
                    fifo.retain(|(id, seq)| queued.get(id).is_some_and(|q| q.seq == *seq));
                }
                self.order.retain(|_, fifo| !fifo.is_empty());
                self.stale = 0;
            }
            return Cancel::Removed;
        }
        if self.infeasible.remove(&id).is_some() {
            return Cancel::Removed;
        }
        if self.running.contains_key(&id) {
            Cancel::Running
        } else {
            Cancel::NotFound
        }
    }

    // ---- infeasible tasks ----

    /// Parks a task the policy found infeasible, so it can be re-examined when the cluster grows.
    pub fn park_infeasible(&mut self, id: TaskId, req: TaskRequest) -> Result<(), LocalError> {
        if self.known(id) {
            return Err(LocalError::Duplicate(id));
        }
        if self.infeasible.len() >= self.config.max_infeasible {
            return Err(LocalError::QueueFull(self.infeasible.len()));
        }
        self.infeasible.insert(id, req);
        Ok(())
    }

    /// Ids of parked infeasible tasks (for status reporting).
    pub fn infeasible_tasks(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.infeasible.keys().copied()
    }

    /// Re-examines every parked task against the whole view; returns (and un-parks) those now
    /// feasible, so the runtime can run the policy on them again. O(parked × nodes).
    pub fn recheck_infeasible(
        &mut self,
        policy: &Policy,
        view: &ClusterView,
    ) -> Vec<(TaskId, TaskRequest)> {
        let ready: Vec<TaskId> = self
            .infeasible
            .iter()
            .filter(|(_, req)| policy.check_feasible(view, req).is_ok())
            .map(|(id, _)| *id)
            .collect();
        self.take_parked(ready)
    }

    /// Cheaper re-check after nodes joined: a default/spread task becomes feasible only on a
    /// joined node, so only those are examined (other strategies are checked in full).
    pub fn recheck_infeasible_on(
        &mut self,
        policy: &Policy,
        view: &ClusterView,
        joined: &[NodeId],
    ) -> Vec<(TaskId, TaskRequest)> {
        use crate::policy::Strategy;
        let ready: Vec<TaskId> = self
            .infeasible
            .iter()
            .filter(|(_, req)| match req.strategy {
                Strategy::Default
                | Strategy::Spread
                | Strategy::NodeAffinity { soft: true, .. } => joined
                    .iter()
                    .any(|j| view.node(*j).is_some_and(|n| policy.is_feasible_on(n, req))),
                _ => policy.check_feasible(view, req).is_ok(),
            })
            .map(|(id, _)| *id)
            .collect();
        self.take_parked(ready)
    }

    fn take_parked(&mut self, mut ids: Vec<TaskId>) -> Vec<(TaskId, TaskRequest)> {
        // Deterministic order regardless of hash iteration.
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| self.infeasible.remove(&id).map(|r| (id, r)))
            .collect()
    }

    // ---- placement-group bundles (participant side of the two-phase reservation) ----

    /// Phase 1: reserves `resources` from the free pool for bundle `key`. Idempotent for a
    /// repeated prepare with the same resources.
    pub fn prepare_bundle(
        &mut self,
        key: BundleKey,
        resources: &ResourceSet,
    ) -> Result<(), BundleError> {
        if let Some(b) = self.bundles.get(&key) {
            return if b.pool.total == *resources {
                Ok(())
            } else {
                Err(BundleError::Conflict(key))
            };
        }
        if self.bundles.len() >= self.config.max_bundles {
            return Err(BundleError::TooMany);
        }
        if !self.node.total.fits(resources) {
            return Err(BundleError::NeverFits);
        }
        if !self.node.can_start(resources) {
            return Err(BundleError::Insufficient);
        }
        self.node
            .available
            .sub(resources)
            .map_err(|_| BundleError::Insufficient)?;
        self.bundles.insert(
            key,
            Bundle {
                pool: Pool::new(resources.clone(), self.config.max_cpu_overcommit),
                committed: false,
            },
        );
        Ok(())
    }

    /// Phase 1 for every bundle a [`crate::pg::PgCommand::Prepare`] names: all are reserved, or
    /// none (those reserved by this call are released again on failure).
    pub fn prepare_bundles(
        &mut self,
        bundles: &[(BundleKey, ResourceSet)],
    ) -> Result<(), BundleError> {
        let mut done: Vec<BundleKey> = Vec::with_capacity(bundles.len());
        for (key, res) in bundles {
            let existed = self.bundles.contains_key(key);
            if let Err(e) = self.prepare_bundle(*key, res) {
                for k in done {
                    self.release_bundle(k);
                }
                return Err(e);
            }
            if !existed {
                done.push(*key);
            }
        }
        Ok(())
    }

    /// Phase 2: makes a prepared bundle usable by tasks. Idempotent.
    pub fn commit_bundle(&mut self, key: BundleKey) -> Result<(), BundleError> {
        let b = self
            .bundles
            .get_mut(&key)
            .ok_or(BundleError::NotPrepared(key))?;
        b.committed = true;
        Ok(())
    }

    /// Aborts a prepared bundle or removes a committed one, returning its resources to the free
    /// pool. `None` if this node does not host it (abort of a prepare that never arrived).
    pub fn release_bundle(&mut self, key: BundleKey) -> Option<BundleRelease> {
        let b = self.bundles.remove(&key)?;
        let mut out = BundleRelease {
            resources: b.pool.total.clone(),
            ..Default::default()
        };
        let _ = self.node.available.add(&b.pool.total);
        for (id, r) in self.running.iter_mut() {
            if r.bundle == Some(key) && !r.orphaned {
                r.orphaned = true;
                out.running.push(*id);
            }
        }
        let dropped: Vec<TaskId> = self
            .queued
            .iter()
            .filter(|(_, q)| q.task.bundle == Some(key))
            .map(|(id, _)| *id)
            .collect();
        for id in &dropped {
            self.queued.remove(id);
        }
        self.order.remove(&Some(key));
        out.dropped = dropped;
        out.running.sort_unstable();
        out.dropped.sort_unstable();
        Some(out)
    }

    /// Whether bundle `key` is hosted here, and committed.
    pub fn bundle_state(&self, key: BundleKey) -> Option<bool> {
        self.bundles.get(&key).map(|b| b.committed)
    }

    /// Free resources of a committed bundle.
    pub fn bundle_available(&self, key: BundleKey) -> Option<&ResourceSet> {
        self.bundles
            .get(&key)
            .filter(|b| b.committed)
            .map(|b| &b.pool.available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(i: u128) -> TaskId {
        TaskId(i)
    }

    fn drain(q: &mut LocalQueue) -> Vec<Dispatch> {
        std::iter::from_fn(|| q.poll_dispatch()).collect()
    }

    #[test]
    fn dispatches_when_resources_free() {
        let mut q = LocalQueue::new(ResourceSet::cpus(2), LocalQueueConfig::default());
        for i in 0..3 {
            q.enqueue(LocalTask::new(t(i), ResourceSet::cpus(1)))
                .unwrap();
        }
        assert_eq!(
            drain(&mut q),
            vec![Dispatch::Start(t(0)), Dispatch::Start(t(1))]
        );
        assert_eq!(q.queue_len(), 1);
        q.finish(t(0)).unwrap();
        assert_eq!(drain(&mut q), vec![Dispatch::Start(t(2))]);
        q.finish(t(1)).unwrap();
        q.finish(t(2)).unwrap();
        assert_eq!(q.available(), &ResourceSet::cpus(2));
        assert_eq!(q.finish(t(2)), Err(LocalError::NotRunning(t(2))));
        assert_eq!(
            q.enqueue(LocalTask::new(t(9), ResourceSet::cpus(3))),
            Err(LocalError::NeverFits)
        );
    }

    #[test]
    fn blocked_worker_lends_its_cpu_and_overcommit_is_bounded() {
        let cfg = LocalQueueConfig {
            max_cpu_overcommit: Some(Quantity::whole(1)),
            ..Default::default()
        };
        let mut q = LocalQueue::new(ResourceSet::cpus(2), cfg);
        q.enqueue(LocalTask::new(t(1), ResourceSet::cpus(1)))
            .unwrap();
        q.enqueue(LocalTask::new(t(2), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(drain(&mut q).len(), 2);
        // Both parents block on children; the children can run.
        q.block(t(1)).unwrap();
        q.block(t(2)).unwrap();
        q.enqueue(LocalTask::new(t(11), ResourceSet::cpus(1)))
            .unwrap();
        q.enqueue(LocalTask::new(t(12), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(
            drain(&mut q),
            vec![Dispatch::Start(t(11)), Dispatch::Start(t(12))]
        );
        // Both parents resume while the children still run: one over-commits, one waits.
        assert_eq!(q.unblock(t(1)), Ok(Unblock::Resumed));
        assert_eq!(q.cpu_overcommit(), Quantity::whole(1));
        assert_eq!(q.unblock(t(2)), Ok(Unblock::Deferred));
        // A new task cannot jump ahead of the waiting resume.
        q.enqueue(LocalTask::new(t(20), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(drain(&mut q), vec![]);
        q.finish(t(11)).unwrap(); // repays the debt, which makes room under the bound again
        assert_eq!(q.cpu_overcommit(), Quantity::ZERO);
        assert_eq!(drain(&mut q), vec![Dispatch::Resume(t(2))]);
        assert_eq!(q.cpu_overcommit(), Quantity::whole(1));
        q.finish(t(12)).unwrap();
        assert_eq!(drain(&mut q), vec![]);
        q.finish(t(1)).unwrap();
        assert_eq!(drain(&mut q), vec![Dispatch::Start(t(20))]);
        q.finish(t(2)).unwrap();
        q.finish(t(20)).unwrap();
        assert_eq!(q.available(), &ResourceSet::cpus(2));
    }

    #[test]
    fn large_task_is_not_starved_by_small_ones() {
        let cfg = LocalQueueConfig {
            max_skips: 3,
            ..Default::default()
        };
        let mut q = LocalQueue::new(ResourceSet::cpus(4), cfg);
        q.enqueue(LocalTask::new(t(0), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(drain(&mut q).len(), 1);
        q.enqueue(LocalTask::new(t(100), ResourceSet::cpus(4)))
            .unwrap();
        let mut started_big = false;
        let mut running = vec![t(0)];
        for next in 1..50 {
            q.enqueue(LocalTask::new(t(next), ResourceSet::cpus(1)))
                .unwrap();
            for d in drain(&mut q) {
                match d {
                    Dispatch::Start(x) if x == t(100) => started_big = true,
                    Dispatch::Start(x) => running.push(x),
                    Dispatch::Resume(_) => unreachable!(),
                }
            }
            if started_big {
                break;
            }
            // Small tasks finish one at a time, always leaving some CPU busy.
            if running.len() > 1 {
                let x = running.remove(0);
                q.finish(x).unwrap();
            } else if let Some(x) = running.pop() {
                q.finish(x).unwrap();
            }
        }
        assert!(started_big, "the 4-CPU task starved");
    }

    #[test]
    fn cancel_pending_and_running() {
        let mut q = LocalQueue::new(ResourceSet::cpus(1), LocalQueueConfig::default());
        q.enqueue(LocalTask::new(t(1), ResourceSet::cpus(1)))
            .unwrap();
        q.enqueue(LocalTask::new(t(2), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(drain(&mut q), vec![Dispatch::Start(t(1))]);
        assert_eq!(q.cancel(t(2)), Cancel::Removed);
        assert_eq!(q.cancel(t(1)), Cancel::Running);
        assert_eq!(q.cancel(t(3)), Cancel::NotFound);
        q.finish(t(1)).unwrap();
        assert_eq!(drain(&mut q), vec![]);
        // Re-enqueue of a cancelled id works and the stale order entry is ignored.
        q.enqueue(LocalTask::new(t(2), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(drain(&mut q), vec![Dispatch::Start(t(2))]);
    }

    #[test]
    fn queue_is_bounded() {
        let cfg = LocalQueueConfig {
            max_queued: 2,
            ..Default::default()
        };
        let mut q = LocalQueue::new(ResourceSet::cpus(1), cfg);
        q.enqueue(LocalTask::new(t(1), ResourceSet::cpus(1)))
            .unwrap();
        q.enqueue(LocalTask::new(t(2), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(
            q.enqueue(LocalTask::new(t(3), ResourceSet::cpus(1))),
            Err(LocalError::QueueFull(2))
        );
        assert_eq!(
            q.enqueue(LocalTask::new(t(2), ResourceSet::cpus(1))),
            Err(LocalError::Duplicate(t(2)))
        );
    }

    #[test]
    fn bundle_tasks_use_the_bundle_pool() {
        let mut q = LocalQueue::new(ResourceSet::cpus(4), LocalQueueConfig::default());
        let key = BundleKey {
            pg: PlacementGroupId(1),
            index: 0,
        };
        q.prepare_bundle(key, &ResourceSet::cpus(2)).unwrap();
        assert_eq!(q.available(), &ResourceSet::cpus(2));
        let bt = LocalTask {
            id: t(1),
            resources: ResourceSet::cpus(1),
            bundle: Some(key),
        };
        // Not committed yet.
        assert_eq!(q.enqueue(bt.clone()), Err(LocalError::UnknownBundle(key)));
        q.commit_bundle(key).unwrap();
        q.enqueue(bt).unwrap();
        q.enqueue(LocalTask {
            id: t(2),
            resources: ResourceSet::cpus(2),
            bundle: Some(key),
        })
        .unwrap();
        q.enqueue(LocalTask::new(t(3), ResourceSet::cpus(2)))
            .unwrap();
        assert_eq!(
            drain(&mut q),
            vec![Dispatch::Start(t(3)), Dispatch::Start(t(1))]
        );
        assert_eq!(q.available(), &ResourceSet::new());
        let rel = q.release_bundle(key).unwrap();
        assert_eq!(rel.running, vec![t(1)]);
        assert_eq!(rel.dropped, vec![t(2)]);
        assert_eq!(q.available(), &ResourceSet::cpus(2));
        q.finish(t(1)).unwrap(); // orphaned: no double release
        q.finish(t(3)).unwrap();
        assert_eq!(q.available(), &ResourceSet::cpus(4));
        assert_eq!(
            q.prepare_bundle(key, &ResourceSet::cpus(5)),
            Err(BundleError::NeverFits)
        );
    }

    #[test]
    fn infeasible_tasks_are_released_when_a_fitting_node_joins() {
        use crate::view::{NodeInfo, ViewDelta};
        let mut view = ClusterView::new();
        view.apply([ViewDelta::NodeJoined(
            NodeInfo::new(NodeId(1), ResourceSet::cpus(2)).with_functions([9]),
        )]);
        let policy = Policy::default();
        let mut q = LocalQueue::new(ResourceSet::cpus(2), LocalQueueConfig::default());
        let gpu = TaskRequest::new(9, ResourceSet::try_from_pairs([("GPU", 1.0)]).unwrap());
        let big = TaskRequest::new(9, ResourceSet::cpus(64));
        assert!(policy.check_feasible(&view, &gpu).is_err());
        q.park_infeasible(t(1), gpu.clone()).unwrap();
        q.park_infeasible(t(2), big).unwrap();
        assert_eq!(
            q.park_infeasible(t(1), gpu.clone()),
            Err(LocalError::Duplicate(t(1)))
        );
        // A node without the function does not help.
        let gpu_node = ResourceSet::try_from_pairs([("CPU", 4.0), ("GPU", 2.0)]).unwrap();
        let ch = view.apply([ViewDelta::NodeJoined(NodeInfo::new(
            NodeId(2),
            gpu_node.clone(),
        ))]);
        assert!(
            q.recheck_infeasible_on(&policy, &view, &ch.joined)
                .is_empty()
        );
        let ch = view.apply([ViewDelta::NodeJoined(
            NodeInfo::new(NodeId(3), gpu_node).with_functions([9]),
        )]);
        let ready = q.recheck_infeasible_on(&policy, &view, &ch.joined);
        assert_eq!(ready, vec![(t(1), gpu)]);
        assert_eq!(q.infeasible_tasks().collect::<Vec<_>>(), vec![t(2)]);
        assert!(q.recheck_infeasible(&policy, &view).is_empty());
        assert_eq!(q.cancel(t(2)), Cancel::Removed);
    }

    #[test]
    fn cancel_storm_behind_a_blocked_head_stays_bounded() {
        let mut q = LocalQueue::new(ResourceSet::cpus(1), LocalQueueConfig::default());
        q.enqueue(LocalTask::new(t(0), ResourceSet::cpus(1)))
            .unwrap();
        assert_eq!(drain(&mut q).len(), 1);
        q.enqueue(LocalTask::new(t(1), ResourceSet::cpus(1)))
            .unwrap(); // blocked head
        for i in 2..50_000 {
            q.enqueue(LocalTask::new(t(i), ResourceSet::cpus(1)))
                .unwrap();
            assert_eq!(q.cancel(t(i)), Cancel::Removed);
        }
        let entries: usize = q.order.values().map(|f| f.len()).sum();
        assert!(
            entries <= 2 + 1_025,
            "{entries} entries kept for 1 live task"
        );
        q.finish(t(0)).unwrap();
        assert_eq!(drain(&mut q), vec![Dispatch::Start(t(1))]);
    }
}
