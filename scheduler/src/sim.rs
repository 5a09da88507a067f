//! A deterministic, seeded discrete-event simulator of a whole cluster driving the real cores.
//!
//! Every simulated node runs a real [`LocalQueue`]; every placement goes through the real
//! [`Policy::decide`] against a shared [`ClusterView`] whose remote entries are refreshed in
//! batches every [`SimConfig::view_sync_us`] (so decisions see a stale view, as in a real
//! cluster). Time is virtual (microseconds); randomness comes from one seeded RNG, so a run is
//! reproducible from its seed. Used by the tests (starvation, locality, infeasible tasks) and by
//! the `policy` benchmark.
//!
//! Simplifications: a spill takes a fixed [`SimConfig::spill_latency_us`]; a node's own view
//! entry is refreshed to its exact state right before it decides (the real runtime knows its own
//! state), which other nodes then also see early; only `nested` tasks block in `get`, each on one
//! child submitted from its own node.
//!
//! [`measure_decisions_per_s`] and [`measure_policy_decisions_per_s`] are the only code in this
//! crate that reads a clock: they time the cores for benchmarks and never feed time into a decision.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use oxray_transport::NodeId;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::local::{Dispatch, LocalQueue, LocalQueueConfig, LocalTask};
use crate::policy::{Decision, Policy, PolicyConfig, Strategy, TaskRequest};
use crate::resources::{Quantity, ResourceKind, ResourceSet};
use crate::view::{ClusterView, FunctionId, NodeInfo, ObjectId, TaskId, ViewDelta};

/// The function every simulated node has registered.
pub const SIM_FUNCTION: FunctionId = 0x51_u64;

/// Name of the custom resource no initial node has (for infeasible-task workloads).
pub const SPECIAL_RESOURCE: &str = "special";

/// Size of each simulated large argument (above the policy's locality threshold).
pub const LARGE_ARG_BYTES: u64 = 64 << 20;

/// Relative weights of the task classes in a workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// 1 CPU, default strategy.
    pub cpu1: u32,
    /// 0.5 CPU (fractional).
    pub cpu_half: u32,
    /// 2 CPUs.
    pub cpu2: u32,
    /// 1 CPU with one large argument living on some node (locality).
    pub large_arg: u32,
    /// 1 GPU (only GPU nodes fit).
    pub gpu1: u32,
    /// 1 CPU, spread strategy.
    pub spread: u32,
    /// Needs [`SPECIAL_RESOURCE`], which only nodes joining later offer.
    pub special: u32,
    /// 1 CPU; halfway through it submits a 1-CPU child and blocks in `get` until the child is
    /// done (nested tasks: needs blocked workers to lend their CPU, or a full pool deadlocks).
    pub nested: u32,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            cpu1: 50,
            cpu_half: 15,
            cpu2: 10,
            large_arg: 15,
            gpu1: 2,
            spread: 8,
            special: 0,
            nested: 0,
        }
    }
}

/// A node joining during the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Join {
    /// Virtual time of the join.
    pub at_us: u64,
    /// Its CPUs.
    pub cpus: u64,
    /// Units of [`SPECIAL_RESOURCE`] it offers.
    pub special: u64,
}

/// Simulation parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Initial nodes.
    pub nodes: usize,
    /// CPUs per node.
    pub cpus_per_node: u64,
    /// Every `gpu_every`-th node has 2 GPUs (0: none).
    pub gpu_every: usize,
    /// Tasks to submit.
    pub tasks: usize,
    /// RNG seed.
    pub seed: u64,
    /// Mean task duration (exponential).
    pub mean_duration_us: u64,
    /// Offered load as a fraction of total CPU capacity (drives the Poisson arrival rate).
    pub utilization: f64,
    /// Period of batched view refreshes.
    pub view_sync_us: u64,
    /// Time a spilled task takes to reach its new node.
    pub spill_latency_us: u64,
    /// Large objects placed on random nodes, used as arguments by `large_arg` tasks.
    pub objects: usize,
    /// Task mix.
    pub workload: Workload,
    /// Nodes that join during the run.
    pub joins: Vec<Join>,
    /// Policy configuration.
    pub policy: PolicyConfig,
    /// Local queue configuration.
    pub local: LocalQueueConfig,
    /// Safety stop: the run ends at this virtual time even if work remains (reported as stuck).
    pub max_time_us: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 100,
            cpus_per_node: 8,
            gpu_every: 10,
            tasks: 10_000,
            seed: 1,
            mean_duration_us: 10_000,
            utilization: 0.7,
            view_sync_us: 10_000,
            spill_latency_us: 200,
            objects: 1_000,
            workload: Workload::default(),
            joins: Vec::new(),
            policy: PolicyConfig::default(),
            local: LocalQueueConfig::default(),
            max_time_us: 600_000_000,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimReport {
    /// Tasks submitted.
    pub submitted: usize,
    /// Tasks that ran to completion.
    pub completed: usize,
    /// Policy decisions made (arrivals, spill arrivals, retries).
    pub decisions: u64,
    /// Spills.
    pub spills: u64,
    /// `Wait` decisions.
    pub waits: u64,
    /// Tasks reported infeasible at least once.
    pub infeasible_reported: usize,
    /// Of those, tasks that later ran (capacity arrived).
    pub infeasible_then_completed: usize,
    /// Feasible tasks that never completed (must be zero: no starvation).
    pub starved: usize,
    /// Tasks still parked as infeasible at the end.
    pub still_infeasible: usize,
    /// `large_arg` tasks, and how many ran on a node holding their argument.
    pub locality_tasks: usize,
    /// See `locality_tasks`.
    pub locality_hits: usize,
    /// Mean and maximum time from arrival to start, over completed tasks.
    pub mean_wait_us: f64,
    /// See `mean_wait_us`.
    pub max_wait_us: u64,
    /// Virtual time at the end.
    pub end_us: u64,
    /// Child tasks submitted by `nested` tasks (not counted in `submitted`).
    pub children: usize,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Class {
    Cpu1,
    CpuHalf,
    Cpu2,
    LargeArg,
    Gpu1,
    Spread,
    Special,
    Nested,
}

const NOT_YET: u64 = u64::MAX;

#[derive(Clone, Debug)]
struct Task {
    class: Class,
    /// Object index for `LargeArg`.
    arg: u32,
    spills: u32,
    duration: u64,
    arrival: u64,
    start: u64,
    end: u64,
    ran_on: u32,
    /// Node it is first submitted to.
    origin: u32,
    arrived: bool,
    infeasible: bool,
    /// For a child of a `Nested` task: the parent.
    parent: u32,
    /// For a `Nested` parent: run time left after its child completes.
    remaining: u64,
}

#[derive(Copy, Clone, Debug)]
enum Ev {
    Arrive {
        task: u32,
        node: u32,
    },
    Finish {
        task: u32,
        node: u32,
    },
    /// A `Nested` task reaches its `get`: submit the child and block.
    Spawn {
        task: u32,
        node: u32,
    },
    Sync,
    Join(u32),
}

#[derive(Debug)]
struct Timed {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    /// Reversed so that `BinaryHeap` pops the earliest event (ties in insertion order).
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug)]
struct SimNode {
    id: NodeId,
    queue: LocalQueue,
    waiting: VecDeque<u32>,
    seq: u64,
    dirty: bool,
}

/// The simulator. Build with [`Sim::new`], run with [`Sim::run`].
#[derive(Debug)]
pub struct Sim {
    cfg: SimConfig,
    policy: Policy,
    rng: SmallRng,
    view: ClusterView,
    nodes: Vec<SimNode>,
    tasks: Vec<Task>,
    objects: Vec<(ObjectId, NodeId)>,
    heap: BinaryHeap<Timed>,
    seq: u64,
    now: u64,
    /// Prototype requests per class; `args` is rewritten per decision (no allocation).
    protos: Vec<TaskRequest>,
    report: SimReport,
    /// Tasks arrived and neither finished nor parked infeasible.
    outstanding: usize,
    parked: usize,
    arrivals_left: usize,
    joins_left: usize,
}

fn class_index(c: Class) -> usize {
    c as usize
}

impl Sim {
    /// Builds the initial cluster, objects and arrival schedule.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let mut view = ClusterView::new();
        let mut nodes = Vec::with_capacity(cfg.nodes);
        for i in 0..cfg.nodes {
            let mut total = ResourceSet::cpus(cfg.cpus_per_node)
                .with(ResourceKind::Memory, Quantity::whole(32 << 30));
            if cfg.gpu_every > 0 && i % cfg.gpu_every == 0 {
                total = total.with(ResourceKind::Gpu, Quantity::whole(2));
            }
            let id = NodeId(i as u128 + 1);
            view.apply([ViewDelta::NodeJoined(
                NodeInfo::new(id, total.clone()).with_functions([SIM_FUNCTION]),
            )]);
            nodes.push(SimNode {
                id,
                queue: LocalQueue::new(total, cfg.local.clone()),
                waiting: VecDeque::new(),
                seq: 0,
                dirty: false,
            });
        }
        let mut objects = Vec::with_capacity(cfg.objects);
        if !nodes.is_empty() {
            for o in 0..cfg.objects {
                let holder = nodes[rng.random_range(0..nodes.len())].id;
                let id = 1_000_000 + o as ObjectId;
                view.apply([ViewDelta::ObjectAdded {
                    object: id,
                    size: LARGE_ARG_BYTES,
                    node: holder,
                }]);
                objects.push((id, holder));
            }
        }
        let res = |pairs: &[(&str, f64)]| {
            ResourceSet::try_from_pairs(pairs.iter().copied()).unwrap_or_default()
        };
        let mk = |r: ResourceSet, s: Strategy| TaskRequest {
            strategy: s,
            ..TaskRequest::new(SIM_FUNCTION, r)
        };
        let protos = vec![
            mk(res(&[("CPU", 1.0)]), Strategy::Default),
            mk(res(&[("CPU", 0.5)]), Strategy::Default),
            mk(res(&[("CPU", 2.0)]), Strategy::Default),
            mk(res(&[("CPU", 1.0)]), Strategy::Default),
            mk(res(&[("CPU", 1.0), ("GPU", 1.0)]), Strategy::Default),
            mk(res(&[("CPU", 1.0)]), Strategy::Spread),
            mk(
                res(&[("CPU", 1.0), (SPECIAL_RESOURCE, 1.0)]),
                Strategy::Default,
            ),
            mk(res(&[("CPU", 1.0)]), Strategy::Default),
        ];
        let mut sim = Sim {
            policy: Policy::new(cfg.policy.clone()),
            rng,
            view,
            nodes,
            tasks: Vec::with_capacity(cfg.tasks),
            objects,
            heap: BinaryHeap::new(),
            seq: 0,
            now: 0,
            protos,
            report: SimReport::default(),
            outstanding: 0,
            parked: 0,
            arrivals_left: cfg.tasks,
            joins_left: cfg.joins.len(),
            cfg,
        };
        sim.generate_tasks();
        sim.push(sim.cfg.view_sync_us.max(1), Ev::Sync);
        for (i, j) in sim.cfg.joins.clone().iter().enumerate() {
            sim.push(j.at_us, Ev::Join(i as u32));
        }
        sim
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Timed {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn generate_tasks(&mut self) {
        let w = &self.cfg.workload;
        let weights = [
            w.cpu1,
            w.cpu_half,
            w.cpu2,
            w.large_arg,
            w.gpu1,
            w.spread,
            w.special,
            w.nested,
        ];
        let classes = [
            Class::Cpu1,
            Class::CpuHalf,
            Class::Cpu2,
            Class::LargeArg,
            Class::Gpu1,
            Class::Spread,
            Class::Special,
            Class::Nested,
        ];
        let wsum: u32 = weights.iter().sum::<u32>().max(1);
        let capacity_cpus = (self.cfg.nodes as f64 * self.cfg.cpus_per_node as f64).max(1.0);
        // Poisson arrivals at `utilization` of CPU capacity (about 1.1 CPU per task).
        let rate_per_us =
            self.cfg.utilization * capacity_cpus / (self.cfg.mean_duration_us.max(1) as f64 * 1.1);
        let mut t = 0.0f64;
        for _ in 0..self.cfg.tasks {
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() / rate_per_us.max(1e-12);
            let mut pick = self.rng.random_range(0..wsum);
            let mut class = Class::Cpu1;
            for (k, wk) in weights.iter().enumerate() {
                if pick < *wk {
                    class = classes[k];
                    break;
                }
                pick -= wk;
            }
            let d: f64 = self.rng.random_range(f64::EPSILON..1.0);
            let duration = ((-d.ln()) * self.cfg.mean_duration_us as f64).max(1.0) as u64;
            let arg = if self.objects.is_empty() {
                0
            } else {
                self.rng.random_range(0..self.objects.len()) as u32
            };
            let class = if class == Class::LargeArg && self.objects.is_empty() {
                Class::Cpu1
            } else {
                class
            };
            self.tasks.push(Task {
                class,
                arg,
                spills: 0,
                duration,
                arrival: t as u64,
                start: NOT_YET,
                end: NOT_YET,
                ran_on: u32::MAX,
                parent: u32::MAX,
                remaining: 0,
                origin: if self.nodes.is_empty() {
                    0
                } else {
                    self.rng.random_range(0..self.nodes.len()) as u32
                },
                arrived: false,
                infeasible: false,
            });
        }
        // Arrivals are pushed one at a time (each first arrival schedules the next), which keeps
        // the event heap small.
        if let Some(first) = self.tasks.first() {
            let (at, node) = (first.arrival, first.origin);
            self.push(at, Ev::Arrive { task: 0, node });
        }
    }

    /// Runs until every task completed or is parked infeasible with no join left, or until
    /// [`SimConfig::max_time_us`].
    pub fn run(mut self) -> SimReport {
        while let Some(Timed { at, ev, .. }) = self.heap.pop() {
            if at > self.cfg.max_time_us {
                break;
            }
            self.now = at;
            match ev {
                Ev::Arrive { task, node } => {
                    if !self.tasks[task as usize].arrived {
                        self.tasks[task as usize].arrived = true;
                        self.arrivals_left = self.arrivals_left.saturating_sub(1);
                        self.outstanding += 1;
                        self.report.submitted += 1;
                        // Chain first arrivals of top-level tasks only (children follow them).
                        if let Some(next) = self
                            .tasks
                            .get(task as usize + 1)
                            .filter(|_| (task as usize + 1) < self.cfg.tasks)
                        {
                            let (at, node) = (next.arrival, next.origin);
                            self.push(
                                at,
                                Ev::Arrive {
                                    task: task + 1,
                                    node,
                                },
                            );
                        }
                    }
                    self.place(task, node);
                }
                Ev::Finish { task, node } => {
                    let n = &mut self.nodes[node as usize];
                    let _ = n.queue.finish(TaskId(u128::from(task)));
                    n.dirty = true;
                    let t = &mut self.tasks[task as usize];
                    t.end = at;
                    let parent = t.parent;
                    self.outstanding -= 1;
                    self.report.completed += 1;
                    self.dispatch(node);
                    if parent != u32::MAX {
                        self.wake_parent(parent);
                    }
                }
                Ev::Spawn { task, node } => self.spawn_child(task, node),
                Ev::Sync => {
                    self.sync();
                    if self.outstanding > 0
                        || self.arrivals_left > 0
                        || (self.parked > 0 && self.joins_left > 0)
                    {
                        self.push(at + self.cfg.view_sync_us.max(1), Ev::Sync);
                    }
                }
                Ev::Join(j) => self.join(j as usize),
            }
        }
        self.finish_report()
    }

    fn request(&mut self, task: u32) -> TaskRequest {
        let t = &self.tasks[task as usize];
        let mut req = std::mem::take(&mut self.protos[class_index(t.class)]);
        req.args.clear();
        if t.class == Class::LargeArg
            && let Some((obj, _)) = self.objects.get(t.arg as usize)
        {
            req.args.push((*obj).into());
        }
        req.spill_count = t.spills;
        req
    }

    fn give_back(&mut self, task: u32, req: TaskRequest) {
        let c = class_index(self.tasks[task as usize].class);
        self.protos[c] = req;
    }

    /// Runs the policy for `task` at `node` and acts on the decision. Returns `false` on `Wait`.
    fn place(&mut self, task: u32, node: u32) -> bool {
        let n = &self.nodes[node as usize];
        let (id, avail, qlen) = (
            n.id,
            n.queue.available().clone(),
            n.queue.queue_len() as u32,
        );
        self.view.update_local(id, &avail, qlen);
        let req = self.request(task);
        let d = self.policy.decide(&self.view, id, &req, &mut self.rng);
        self.report.decisions += 1;
        let res = req.resources.clone();
        let infeasible_req = matches!(d, Decision::Infeasible(_)).then(|| req.clone());
        self.give_back(task, req);
        match d {
            Decision::RunLocal | Decision::RunInBundle { .. } => {
                let n = &mut self.nodes[node as usize];
                if n.queue
                    .enqueue(LocalTask::new(TaskId(u128::from(task)), res))
                    .is_err()
                {
                    n.waiting.push_back(task);
                    return false;
                }
                n.dirty = true;
                self.dispatch(node);
                true
            }
            Decision::Spill(to) => {
                self.report.spills += 1;
                self.tasks[task as usize].spills += 1;
                let to = self.view.node_index(to).unwrap_or(node as usize) as u32;
                self.push(
                    self.now + self.cfg.spill_latency_us,
                    Ev::Arrive { task, node: to },
                );
                true
            }
            Decision::Wait => {
                self.report.waits += 1;
                self.nodes[node as usize].waiting.push_back(task);
                false
            }
            Decision::Infeasible(_) => {
                let t = &mut self.tasks[task as usize];
                if !t.infeasible {
                    t.infeasible = true;
                    self.report.infeasible_reported += 1;
                }
                if let Some(req) = infeasible_req
                    && self.nodes[node as usize]
                        .queue
                        .park_infeasible(TaskId(u128::from(task)), req)
                        .is_ok()
                {
                    self.outstanding -= 1;
                    self.parked += 1;
                }
                true
            }
        }
    }

    fn dispatch(&mut self, node: u32) {
        while let Some(d) = self.nodes[node as usize].queue.poll_dispatch() {
            match d {
                Dispatch::Start(TaskId(t)) => {
                    let t = t as u32;
                    let task = &mut self.tasks[t as usize];
                    task.start = self.now;
                    task.ran_on = node;
                    if task.class == Class::Nested {
                        let first = task.duration / 2;
                        task.remaining = task.duration - first;
                        let at = self.now + first;
                        self.push(at, Ev::Spawn { task: t, node });
                    } else {
                        let at = self.now + task.duration;
                        self.push(at, Ev::Finish { task: t, node });
                    }
                }
                Dispatch::Resume(TaskId(t)) => {
                    let t = t as u32;
                    let at = self.now + self.tasks[t as usize].remaining;
                    self.push(at, Ev::Finish { task: t, node });
                }
            }
            self.nodes[node as usize].dirty = true;
        }
    }

    /// The parent reached `get`: it blocks (lending its CPU) and its child is submitted locally.
    fn spawn_child(&mut self, parent: u32, node: u32) {
        let n = &mut self.nodes[node as usize];
        if n.queue.block(TaskId(u128::from(parent))).is_ok() {
            n.dirty = true;
        }
        let d: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let duration = ((-d.ln()) * self.cfg.mean_duration_us as f64).max(1.0) as u64;
        let child = self.tasks.len() as u32;
        self.tasks.push(Task {
            class: Class::Cpu1,
            arg: 0,
            spills: 0,
            duration,
            arrival: self.now,
            start: NOT_YET,
            end: NOT_YET,
            ran_on: u32::MAX,
            origin: node,
            arrived: true,
            infeasible: false,
            parent,
            remaining: 0,
        });
        self.outstanding += 1;
        self.report.children += 1;
        // The freed CPU may start queued work before the child is placed, as on a real node.
        self.dispatch(node);
        self.place(child, node);
    }

    /// The child finished: the parent takes its CPU back now, or when `poll_dispatch` says so.
    fn wake_parent(&mut self, parent: u32) {
        let node = self.tasks[parent as usize].ran_on;
        let Some(n) = self.nodes.get_mut(node as usize) else {
            return;
        };
        if let Ok(crate::local::Unblock::Resumed) = n.queue.unblock(TaskId(u128::from(parent))) {
            let at = self.now + self.tasks[parent as usize].remaining;
            self.push(at, Ev::Finish { task: parent, node });
        }
        self.nodes[node as usize].dirty = true;
        self.dispatch(node);
    }

    fn sync(&mut self) {
        let mut batch = Vec::new();
        for n in self.nodes.iter_mut().filter(|n| n.dirty) {
            n.dirty = false;
            n.seq += 1;
            batch.push(ViewDelta::Resources {
                node: n.id,
                seq: n.seq,
                available: n.queue.available().clone(),
                queue_len: n.queue.queue_len() as u32,
            });
        }
        self.view.apply(batch);
        // Retry waiting tasks, oldest first, until one still has to wait.
        for i in 0..self.nodes.len() {
            let mut budget = 256;
            while budget > 0 {
                budget -= 1;
                let Some(t) = self.nodes[i].waiting.pop_front() else {
                    break;
                };
                if !self.place(t, i as u32) {
                    // `place` queued it at the back; restore FIFO order for the next round.
                    if let Some(back) = self.nodes[i].waiting.pop_back() {
                        self.nodes[i].waiting.push_front(back);
                    }
                    break;
                }
            }
        }
    }

    fn join(&mut self, j: usize) {
        self.joins_left = self.joins_left.saturating_sub(1);
        let Some(spec) = self.cfg.joins.get(j).cloned() else {
            return;
        };
        let mut total =
            ResourceSet::cpus(spec.cpus).with(ResourceKind::Memory, Quantity::whole(32 << 30));
        if let Ok(k) = ResourceKind::custom(SPECIAL_RESOURCE) {
            total = total.with(k, Quantity::whole(spec.special));
        }
        let id = NodeId(10_000_000 + j as u128);
        let changes = self.view.apply([ViewDelta::NodeJoined(
            NodeInfo::new(id, total.clone()).with_functions([SIM_FUNCTION]),
        )]);
        self.nodes.push(SimNode {
            id,
            queue: LocalQueue::new(total, self.cfg.local.clone()),
            waiting: VecDeque::new(),
            seq: 0,
            dirty: false,
        });
        for i in 0..self.nodes.len() {
            let ready = self.nodes[i].queue.recheck_infeasible_on(
                &self.policy,
                &self.view,
                &changes.joined,
            );
            for (TaskId(t), _) in ready {
                self.parked -= 1;
                self.outstanding += 1;
                self.push(
                    self.now,
                    Ev::Arrive {
                        task: t as u32,
                        node: i as u32,
                    },
                );
            }
        }
    }

    fn finish_report(mut self) -> SimReport {
        let mut r = std::mem::take(&mut self.report);
        r.end_us = self.now;
        let mut wait_sum = 0f64;
        for t in &self.tasks {
            if t.end != NOT_YET {
                let w = t.start.saturating_sub(t.arrival);
                wait_sum += w as f64;
                r.max_wait_us = r.max_wait_us.max(w);
                if t.infeasible {
                    r.infeasible_then_completed += 1;
                }
                if t.class == Class::LargeArg {
                    r.locality_tasks += 1;
                    let holder = self.objects.get(t.arg as usize).map(|o| o.1);
                    let ran = self.nodes.get(t.ran_on as usize).map(|n| n.id);
                    if holder.is_some() && holder == ran {
                        r.locality_hits += 1;
                    }
                }
            }
        }
        r.still_infeasible = self
            .nodes
            .iter()
            .map(|n| n.queue.infeasible_tasks().count())
            .sum();
        r.starved = (r.submitted + r.children).saturating_sub(r.completed + r.still_infeasible);
        r.mean_wait_us = if r.completed > 0 {
            wait_sum / r.completed as f64
        } else {
            0.0
        };
        r
    }
}

/// Runs the default workload on `nodes` nodes with `tasks` tasks and returns policy decisions
/// per wall-clock second of the whole simulation (queues, events and view updates included).
/// Reads the clock: benchmark use only.
pub fn measure_decisions_per_s(nodes: usize, tasks: usize, seed: u64) -> f64 {
    let cfg = SimConfig {
        nodes,
        tasks,
        seed,
        ..SimConfig::default()
    };
    let sim = Sim::new(cfg);
    let t0 = std::time::Instant::now();
    let r = sim.run();
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    r.decisions as f64 / secs
}

/// A view of `nodes` nodes with random load, queue lengths and object locations, as the
/// benchmark and tests use it.
pub fn random_view(nodes: usize, objects: usize, seed: u64) -> ClusterView {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut view = ClusterView::new();
    for i in 0..nodes {
        let total = ResourceSet::cpus(8).with(ResourceKind::Memory, Quantity::whole(32 << 30));
        let id = NodeId(i as u128 + 1);
        view.apply([ViewDelta::NodeJoined(
            NodeInfo::new(id, total.clone()).with_functions([SIM_FUNCTION]),
        )]);
        let mut avail = total;
        let _ = avail.set(ResourceKind::Cpu, Quantity::whole(rng.random_range(0..=8)));
        view.apply([ViewDelta::Resources {
            node: id,
            seq: 1,
            available: avail,
            queue_len: rng.random_range(0..12),
        }]);
    }
    for o in 0..objects {
        if nodes > 0 {
            let holder = NodeId(rng.random_range(0..nodes) as u128 + 1);
            view.apply([ViewDelta::ObjectAdded {
                object: o as ObjectId,
                size: LARGE_ARG_BYTES,
                node: holder,
            }]);
        }
    }
    view
}

/// Times [`Policy::decide`] alone: `decisions` calls on a [`random_view`] of `nodes` nodes, with
/// a mix of plain, large-argument and spread requests from random local nodes. Returns
/// decisions per wall-clock second. Reads the clock: benchmark use only.
pub fn measure_policy_decisions_per_s(nodes: usize, decisions: usize, seed: u64) -> f64 {
    let view = random_view(nodes, 1_000, seed);
    let policy = Policy::default();
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let plain = TaskRequest::new(SIM_FUNCTION, ResourceSet::cpus(1));
    let mut with_arg = plain.clone();
    with_arg.args.push(0.into());
    let spread = TaskRequest {
        strategy: Strategy::Spread,
        ..plain.clone()
    };
    let reqs = [plain, with_arg, spread];
    let mut sink = 0u64;
    let t0 = std::time::Instant::now();
    for i in 0..decisions {
        let local = NodeId((i % nodes.max(1)) as u128 + 1);
        let d = policy.decide(&view, local, &reqs[i % 3], &mut rng);
        sink = sink.wrapping_add(matches!(d, Decision::RunLocal) as u64);
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    std::hint::black_box(sink);
    decisions as f64 / secs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_completes_everything_and_is_deterministic() {
        let cfg = SimConfig {
            nodes: 20,
            tasks: 2_000,
            seed: 3,
            ..Default::default()
        };
        let a = Sim::new(cfg.clone()).run();
        let b = Sim::new(cfg).run();
        assert_eq!(a, b);
        assert_eq!(a.submitted, 2_000);
        assert_eq!(a.completed, 2_000);
        assert_eq!(a.starved, 0);
    }
}
