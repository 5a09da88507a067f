//! Seeded simulation of the placement-group two-phase reservation: a real `PgCoordinator`
//! talking to real `LocalQueue` participants over simulated per-node FIFO links with delays,
//! lost replies, background load that makes prepares fail, and node deaths.
//!
//! Checks, at every step: no bundle is committed before the group's first full commit (atomic
//! creation), a group the coordinator calls created has every bundle committed on its node, and
//! tasks routed into it by the policy are accepted by that bundle. At quiescence: nodes hold
//! exactly the coordinator's placement (after a node death only the lost bundles moved),
//! removed groups hold nothing, and every node's resources add up.
//! Not a test of the network runtime itself.

use std::collections::{HashMap, VecDeque};

use oxray_scheduler::pg::{
    PgCommand, PgConfig, PgCoordinator, PgEvent, PgPhase, PgStrategy, PlacementGroupSpec,
};
use oxray_scheduler::view::{BundleLocation, PlacementGroupState};
use oxray_scheduler::{
    BundleKey, ClusterView, Decision, LocalQueue, LocalQueueConfig, LocalTask, NodeInfo,
    PlacementGroupId, Policy, PolicyConfig, ResourceSet, Strategy, TaskId, TaskRequest, ViewDelta,
};
use oxray_transport::NodeId;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

enum Reply {
    Prepared {
        pg: PlacementGroupId,
        attempt: u32,
        node: NodeId,
        ok: bool,
    },
    Committed {
        pg: PlacementGroupId,
        attempt: u32,
        node: NodeId,
    },
}

struct Node {
    id: NodeId,
    queue: LocalQueue,
    alive: bool,
    /// In-order link from the coordinator: (deliver at, command).
    inbox: VecDeque<(u64, PgCommand)>,
    /// Background tasks: (finish at, id).
    background: Vec<(u64, TaskId)>,
}

struct World {
    rng: SmallRng,
    now: u64,
    nodes: Vec<Node>,
    view: ClusterView,
    coord: PgCoordinator,
    replies: Vec<(u64, Reply)>,
    specs: HashMap<PlacementGroupId, PlacementGroupSpec>,
    removed: Vec<PlacementGroupId>,
    next_task: u128,
    seq: u64,
    reply_loss: f64,
    bundle_tasks_run: usize,
    refusals: usize,
    lost_replies: usize,
    rescheduled: usize,
    ever_created: std::collections::HashSet<PlacementGroupId>,
}

const F: u64 = 1;

impl World {
    fn new(seed: u64, nodes: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut view = ClusterView::new();
        let mut ns = Vec::new();
        for i in 0..nodes {
            let cpus = rng.random_range(4..=8);
            let id = NodeId(i as u128 + 1);
            view.apply([ViewDelta::NodeJoined(
                NodeInfo::new(id, ResourceSet::cpus(cpus)).with_functions([F]),
            )]);
            ns.push(Node {
                id,
                queue: LocalQueue::new(ResourceSet::cpus(cpus), LocalQueueConfig::default()),
                alive: true,
                inbox: VecDeque::new(),
                background: Vec::new(),
            });
        }
        World {
            rng,
            now: 0,
            nodes: ns,
            view,
            coord: PgCoordinator::new(PgConfig {
                phase_timeout_ms: 50,
                retry_ms: 10,
                max_groups: 1_000,
            }),
            replies: Vec::new(),
            specs: HashMap::new(),
            removed: Vec::new(),
            next_task: 1,
            seq: 0,
            reply_loss: 0.05,
            bundle_tasks_run: 0,
            refusals: 0,
            lost_replies: 0,
            rescheduled: 0,
            ever_created: Default::default(),
        }
    }

    fn idx(&self, n: NodeId) -> usize {
        (n.0 - 1) as usize
    }

    fn report_resources(&mut self) {
        self.seq += 1;
        let batch: Vec<ViewDelta> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| ViewDelta::Resources {
                node: n.id,
                seq: self.seq,
                available: n.queue.available().clone(),
                queue_len: n.queue.queue_len() as u32,
            })
            .collect();
        self.view.apply(batch);
    }

    fn route_commands(&mut self) {
        while let Some(cmd) = self.coord.poll_command() {
            let node = match &cmd {
                PgCommand::Prepare { node, .. }
                | PgCommand::Commit { node, .. }
                | PgCommand::Release { node, .. } => *node,
            };
            let i = self.idx(node);
            // Per-link FIFO: never deliver before the previous command on this link.
            let last = self.nodes[i].inbox.back().map_or(0, |(t, _)| *t);
            let at = (self.now + self.rng.random_range(1..8)).max(last);
            self.nodes[i].inbox.push_back((at, cmd));
        }
        while let Some(ev) = self.coord.poll_event() {
            match ev {
                PgEvent::Created { pg, placement } => {
                    self.ever_created.insert(pg);
                    let spec = &self.specs[&pg];
                    let bundles = placement
                        .iter()
                        .zip(&spec.bundles)
                        .map(|(n, r)| BundleLocation {
                            node: *n,
                            resources: r.clone(),
                        })
                        .collect();
                    self.view.apply([ViewDelta::PlacementGroup {
                        pg,
                        state: PlacementGroupState::Created(bundles),
                    }]);
                }
                // The published placement keeps the lost bundles on the dead node, for which the
                // policy answers `Wait`; survivors keep serving until the next `Created`.
                PgEvent::Rescheduling { pg, lost } => {
                    self.rescheduled += 1;
                    assert!(
                        !lost.is_empty(),
                        "{pg:?}: rescheduling without a lost bundle"
                    );
                }
                PgEvent::Infeasible { .. } => {}
            }
        }
    }

    fn deliver(&mut self) {
        for i in 0..self.nodes.len() {
            while self.nodes[i]
                .inbox
                .front()
                .is_some_and(|(t, _)| *t <= self.now)
            {
                let Some((_, cmd)) = self.nodes[i].inbox.pop_front() else {
                    break;
                };
                if !self.nodes[i].alive {
                    continue;
                }
                let delay = self.now + self.rng.random_range(1..8);
                let lost = self.rng.random_bool(self.reply_loss);
                let q = &mut self.nodes[i].queue;
                let reply = match cmd {
                    PgCommand::Prepare {
                        pg,
                        attempt,
                        node,
                        bundles,
                    } => {
                        let keys: Vec<_> = bundles
                            .into_iter()
                            .map(|(index, r)| (BundleKey { pg, index }, r))
                            .collect();
                        let ok = q.prepare_bundles(&keys).is_ok();
                        self.refusals += usize::from(!ok);
                        Some(Reply::Prepared {
                            pg,
                            attempt,
                            node,
                            ok,
                        })
                    }
                    PgCommand::Commit {
                        pg,
                        attempt,
                        node,
                        indices,
                    } => {
                        for index in indices {
                            q.commit_bundle(BundleKey { pg, index }).expect(
                                "commit always follows a successful prepare on a FIFO link",
                            );
                        }
                        Some(Reply::Committed { pg, attempt, node })
                    }
                    PgCommand::Release { pg, indices, .. } => {
                        for index in indices {
                            q.release_bundle(BundleKey { pg, index });
                        }
                        None
                    }
                };
                self.lost_replies += usize::from(lost && reply.is_some());
                if let Some(r) = reply
                    && !lost
                {
                    self.replies.push((delay, r));
                }
            }
        }
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.replies)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.replies = later;
        for (_, r) in due {
            match r {
                Reply::Prepared {
                    pg,
                    attempt,
                    node,
                    ok,
                } => self.coord.on_prepared(pg, attempt, node, ok, now),
                Reply::Committed { pg, attempt, node } => {
                    self.coord.on_committed(pg, attempt, node)
                }
            }
        }
    }

    fn background_load(&mut self) {
        self.background(true);
    }

    fn background(&mut self, spawn: bool) {
        for i in 0..self.nodes.len() {
            let now = self.now;
            let n = &mut self.nodes[i];
            if !n.alive {
                continue;
            }
            let (done, keep): (Vec<_>, Vec<_>) =
                n.background.drain(..).partition(|(t, _)| *t <= now);
            n.background = keep;
            for (_, id) in done {
                let _ = n.queue.finish(id);
            }
            if spawn && self.rng.random_bool(0.05) {
                let id = TaskId(self.next_task);
                self.next_task += 1;
                if n.queue
                    .enqueue(LocalTask::new(id, ResourceSet::cpus(1)))
                    .is_ok()
                {
                    while let Some(d) = n.queue.poll_dispatch() {
                        if let oxray_scheduler::Dispatch::Start(t) = d {
                            n.background.push((now + self.rng.random_range(5..40), t));
                        }
                    }
                }
            }
        }
    }

    fn check_created_groups(&mut self) {
        let policy = Policy::new(PolicyConfig::default());
        let ids: Vec<_> = self.specs.keys().copied().collect();
        for pg in ids {
            let placed = self.coord.placement(pg).unwrap_or(&[]);
            // Atomic creation: nothing is committed before the first full commit.
            if placed.iter().any(Option::is_some) {
                assert!(
                    self.ever_created.contains(&pg),
                    "{pg:?} partly placed before creation"
                );
            }
            if self.coord.phase(pg) == Some(&PgPhase::Created) {
                let plan: Vec<NodeId> = placed
                    .iter()
                    .map(|n| n.expect("created means fully placed"))
                    .collect();
                for (index, node) in plan.iter().enumerate() {
                    let key = BundleKey {
                        pg,
                        index: index as u32,
                    };
                    let n = &self.nodes[self.idx(*node)];
                    assert_eq!(
                        n.queue.bundle_state(key),
                        Some(true),
                        "created group {pg:?} bundle {index} not committed"
                    );
                }
                // A task routed into the group by the policy is accepted by its bundle.
                let req = TaskRequest {
                    strategy: Strategy::PlacementGroup { pg, bundle: None },
                    ..TaskRequest::new(F, ResourceSet::new())
                };
                if let Decision::RunInBundle { node, index } =
                    policy.decide(&self.view, self.nodes[0].id, &req, &mut self.rng)
                {
                    let i = self.idx(node);
                    let id = TaskId(self.next_task);
                    self.next_task += 1;
                    let task = LocalTask {
                        id,
                        resources: ResourceSet::new(),
                        bundle: Some(BundleKey { pg, index }),
                    };
                    self.nodes[i]
                        .queue
                        .enqueue(task)
                        .expect("bundle of a created group accepts its tasks");
                    let mut started = false;
                    let now = self.now;
                    while let Some(d) = self.nodes[i].queue.poll_dispatch() {
                        match d {
                            oxray_scheduler::Dispatch::Start(t) if t == id => started = true,
                            oxray_scheduler::Dispatch::Start(t) => {
                                self.nodes[i].background.push((now + 10, t))
                            }
                            oxray_scheduler::Dispatch::Resume(_) => {
                                unreachable!("no task blocks here")
                            }
                        }
                    }
                    assert!(
                        started,
                        "a zero-resource task in a committed bundle starts at once"
                    );
                    self.nodes[i].queue.finish(id).expect("running");
                    self.bundle_tasks_run += 1;
                }
            }
        }
    }

    fn step(&mut self) {
        self.now += 1;
        self.background_load();
        self.report_resources();
        self.deliver();
        let mut rng = SmallRng::seed_from_u64(self.rng.random());
        self.coord.poll(self.now, &self.view, &mut rng);
        self.route_commands();
        self.check_created_groups();
    }
}

fn run(seed: u64) -> (usize, usize, usize) {
    let mut w = World::new(seed, 12);
    let mut next_pg = 1u128;
    let strategies = [
        PgStrategy::Pack,
        PgStrategy::Spread,
        PgStrategy::StrictPack,
        PgStrategy::StrictSpread,
    ];
    let mut killed = 0;
    for _ in 0..3_000 {
        // New groups, bounded so the cluster can eventually hold them all.
        if w.rng.random_bool(0.05) && w.coord.len() < 8 {
            let strategy = strategies[w.rng.random_range(0..4)];
            let n = w.rng.random_range(1..=4);
            let bundles = (0..n)
                .map(|_| ResourceSet::cpus(w.rng.random_range(1..=2)))
                .collect();
            let spec = PlacementGroupSpec {
                id: PlacementGroupId(next_pg),
                bundles,
                strategy,
            };
            next_pg += 1;
            w.specs.insert(spec.id, spec.clone());
            w.view.apply([ViewDelta::PlacementGroup {
                pg: spec.id,
                state: PlacementGroupState::Pending,
            }]);
            w.coord.create(spec, w.now).expect("create");
        }
        // Remove a random created group now and then.
        if w.rng.random_bool(0.01) {
            let created: Vec<_> = w
                .specs
                .keys()
                .copied()
                .filter(|pg| w.coord.phase(*pg) == Some(&PgPhase::Created))
                .collect();
            if !created.is_empty() {
                let pg = created[w.rng.random_range(0..created.len())];
                let bundles = w.coord.remove(pg).expect("remove");
                assert_eq!(bundles.len(), w.specs[&pg].bundles.len());
                w.specs.remove(&pg);
                w.removed.push(pg);
                w.view.apply([ViewDelta::PlacementGroup {
                    pg,
                    state: PlacementGroupState::Removed,
                }]);
            }
        }
        // Kill two nodes over the run.
        if killed < 2 && w.rng.random_bool(0.002) {
            let i = w.rng.random_range(0..w.nodes.len());
            if w.nodes[i].alive {
                w.nodes[i].alive = false;
                killed += 1;
                let id = w.nodes[i].id;
                w.view.apply([ViewDelta::NodeDied(id)]);
                let now = w.now;
                w.coord.on_node_dead(id, now);
            }
        }
        w.step();
    }
    // Quiesce: no new groups, no background load, lossless replies, until every message landed.
    w.reply_loss = 0.0;
    for n in &mut w.nodes {
        for (_, id) in n.background.drain(..) {
            let _ = n.queue.finish(id);
        }
    }
    for _ in 0..2_000 {
        w.now += 1;
        w.background(false);
        w.report_resources();
        w.deliver();
        let mut rng = SmallRng::seed_from_u64(w.now);
        w.coord.poll(w.now, &w.view, &mut rng);
        w.route_commands();
        w.check_created_groups();
    }
    assert!(
        w.nodes.iter().all(|n| n.inbox.is_empty()) && w.replies.is_empty(),
        "seed {seed}: not quiescent"
    );

    // Exactly the committed placement is held: bundle i is held by node n (alive) iff the
    // coordinator placed it there. With atomic creation (checked at every step) this means a
    // group was never partly reserved; after a node death only its lost bundles were re-placed.
    let mut created = 0;
    for (pg, spec) in &w.specs {
        let placed = w.coord.placement(*pg).expect("tracked");
        assert_eq!(placed.len(), spec.bundles.len());
        for (index, slot) in placed.iter().enumerate() {
            let key = BundleKey {
                pg: *pg,
                index: index as u32,
            };
            let holders: Vec<NodeId> = w
                .nodes
                .iter()
                .filter(|n| n.alive && n.queue.bundle_state(key).is_some())
                .map(|n| n.id)
                .collect();
            let expect: Vec<NodeId> = slot.iter().copied().collect();
            assert_eq!(holders, expect, "seed {seed}: {pg:?} bundle {index}");
            if let Some(n) = slot {
                let i = (n.0 - 1) as usize;
                assert_eq!(
                    w.nodes[i].queue.bundle_state(key),
                    Some(true),
                    "seed {seed}: not committed"
                );
            }
        }
        if w.coord.phase(*pg) == Some(&PgPhase::Created) {
            created += 1;
            assert!(placed.iter().all(Option::is_some));
        }
    }
    for pg in &w.removed {
        for n in w.nodes.iter().filter(|n| n.alive) {
            for index in 0..8 {
                assert!(
                    n.queue.bundle_state(BundleKey { pg: *pg, index }).is_none(),
                    "seed {seed}: removed {pg:?} still held"
                );
            }
        }
    }
    // Resources add up on every alive node: free pool + reservations == total.
    for n in w.nodes.iter().filter(|n| n.alive) {
        let mut sum = n.queue.available().clone();
        for (pg, spec) in &w.specs {
            for (index, r) in spec.bundles.iter().enumerate() {
                if n.queue
                    .bundle_state(BundleKey {
                        pg: *pg,
                        index: index as u32,
                    })
                    .is_some()
                {
                    sum.add(r).expect("sum");
                }
            }
        }
        assert_eq!(
            &sum,
            n.queue.total(),
            "seed {seed}: node {:?} leaked resources",
            n.id
        );
    }
    assert!(created > 0, "seed {seed}: no group was ever created");
    assert!(
        w.bundle_tasks_run > 0,
        "seed {seed}: no task ran in a bundle"
    );
    println!(
        "seed {seed}: {} groups live ({created} created), {} removed, {} bundle tasks, {} refused prepares, {} lost replies, {} repairs",
        w.specs.len(),
        w.removed.len(),
        w.bundle_tasks_run,
        w.refusals,
        w.lost_replies,
        w.rescheduled
    );
    (w.refusals, w.lost_replies, w.rescheduled)
}

#[test]
fn placement_groups_are_all_or_nothing_under_faults() {
    let seeds: u64 = if cfg!(debug_assertions) { 4 } else { 16 };
    let (mut refusals, mut lost, mut repairs) = (0, 0, 0);
    for seed in 0..seeds {
        let (r, l, p) = run(seed);
        refusals += r;
        lost += l;
        repairs += p;
    }
    // The abort and repair paths were exercised, not just the happy path.
    assert!(
        refusals > 0 && lost > 0 && repairs > 0,
        "refusals {refusals}, lost replies {lost}, repairs {repairs}"
    );
}
