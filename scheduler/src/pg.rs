//! Placement groups: choosing nodes for bundles, and reserving them all-or-nothing.
//!
//! Two pieces, both sans-IO:
//! - [`plan`] maps each bundle of a [`PlacementGroupSpec`] to a node under PACK, SPREAD,
//!   STRICT_PACK or STRICT_SPREAD, from a [`ClusterView`]. It tells apart "never with these
//!   nodes" ([`PlanError::Infeasible`]) from "not right now" ([`PlanError::Unavailable`]).
//! - [`PgCoordinator`] runs the two-phase reservation across nodes: it emits
//!   [`PgCommand::Prepare`] to every chosen node, and only when every node has reserved its
//!   bundles does it emit [`PgCommand::Commit`]; any refusal, timeout or node death releases
//!   every reservation of that attempt and retries later. A group is reported
//!   [`PgEvent::Created`] only once all commits are acknowledged, and tasks are only routed to
//!   a group the view shows as created, so no task ever runs in a partially reserved group.
//!   The participant side is [`crate::LocalQueue::prepare_bundles`] / `commit_bundle` /
//!   `release_bundle`.
//!
//! Assumption the runtime must keep: commands to one node are delivered in order (one QUIC
//! stream per peer), so a `Release` never overtakes the `Prepare` it undoes. Replies carry the
//! attempt number and stale ones are ignored.
//!
//! Known simplifications: the planner is greedy (largest bundle first), so a feasible STRICT_SPREAD
//! with very uneven bundles can be missed. The coordinator subtracts the reservations of its own
//! attempts in flight from the view before planning, so groups placed together do not overbook a
//! node; reservations the view does not show yet from elsewhere are caught by the prepare phase
//! (that attempt fails and retries).
//! When a node holding bundles of a created group dies, only those bundles are placed again
//! (around the survivors, under the same strategy), so tasks in the surviving bundles keep
//! running; under STRICT_PACK the whole group moves.

use std::collections::{HashMap, VecDeque};

use oxray_transport::NodeId;
use rand::Rng;

use crate::resources::ResourceSet;
use crate::view::{ClusterView, NodeInfo, PlacementGroupId};

/// Most bundles in one group.
pub const MAX_BUNDLES: usize = 1_024;

/// How bundles are spread over nodes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PgStrategy {
    /// As few nodes as possible (one if it fits), spilling to more when needed.
    Pack,
    /// Different nodes where possible, sharing nodes when there are not enough.
    Spread,
    /// All bundles on one node, or fail.
    StrictPack,
    /// Every bundle on a different node, or fail.
    StrictSpread,
}

/// A placement group request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementGroupSpec {
    /// Group id.
    pub id: PlacementGroupId,
    /// One resource set per bundle (index = position).
    pub bundles: Vec<ResourceSet>,
    /// Placement strategy.
    pub strategy: PgStrategy,
}

/// Why a group could not be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Not even the nodes' *total* resources allow this placement. Retry when nodes join.
    #[error("placement group cannot fit the cluster's total resources")]
    Infeasible,
    /// The totals allow it but free resources do not right now. Retry later.
    #[error("not enough free resources to place the group now")]
    Unavailable,
    /// The group has no bundles, or more than [`MAX_BUNDLES`].
    #[error("placement group must have between 1 and {MAX_BUNDLES} bundles")]
    BadBundleCount,
}

/// Places every bundle of `spec` on a node, using free resources in `view`.
/// Returns one node per bundle, in bundle order.
pub fn plan<R: Rng + ?Sized>(
    view: &ClusterView,
    spec: &PlacementGroupSpec,
    rng: &mut R,
) -> Result<Vec<NodeId>, PlanError> {
    plan_reserving(view, spec, rng, &HashMap::new())
}

/// Like [`plan`], but treats `in_flight` (per node) as already taken: reservations being
/// prepared that the view may not show yet. Keeps groups planned close together from
/// overbooking the same node and aborting each other.
pub fn plan_reserving<R: Rng + ?Sized>(
    view: &ClusterView,
    spec: &PlacementGroupSpec,
    rng: &mut R,
    in_flight: &HashMap<NodeId, ResourceSet>,
) -> Result<Vec<NodeId>, PlanError> {
    plan_around(view, spec, rng, in_flight, &vec![None; spec.bundles.len()])
}

/// Like [`plan_reserving`], for a group some of whose bundles are already placed (`fixed[i]`
/// is `Some(node)`): only the others are assigned, under the strategy's rules relative to the
/// fixed ones (STRICT_SPREAD avoids their nodes, PACK prefers them, STRICT_PACK must join them).
/// Fixed bundles' resources are assumed already reserved and absent from the view's free pool.
pub fn plan_around<R: Rng + ?Sized>(
    view: &ClusterView,
    spec: &PlacementGroupSpec,
    rng: &mut R,
    in_flight: &HashMap<NodeId, ResourceSet>,
    fixed: &[Option<NodeId>],
) -> Result<Vec<NodeId>, PlanError> {
    if spec.bundles.is_empty()
        || spec.bundles.len() > MAX_BUNDLES
        || fixed.len() != spec.bundles.len()
    {
        return Err(PlanError::BadBundleCount);
    }
    let free = |n: &NodeInfo| {
        let mut r = n.available.clone();
        if let Some(taken) = in_flight.get(&n.id) {
            r.saturating_sub(taken);
        }
        r
    };
    if let Some(p) = plan_with(view, spec, rng, fixed, free) {
        return Ok(p);
    }
    // Against totals the fixed bundles are not yet subtracted, so plan from scratch there:
    // "could it ever fit", not "does it fit next to what is kept".
    let none = vec![None; spec.bundles.len()];
    if plan_with(view, spec, rng, &none, |n| n.total.clone()).is_some() {
        Err(PlanError::Unavailable)
    } else {
        Err(PlanError::Infeasible)
    }
}

/// Sort key for "largest bundle first".
fn size_key(r: &ResourceSet) -> (u64, u64, u64) {
    (r.gpu().raw(), r.cpu().raw(), r.memory().raw())
}

fn plan_with<R: Rng + ?Sized>(
    view: &ClusterView,
    spec: &PlacementGroupSpec,
    rng: &mut R,
    fixed: &[Option<NodeId>],
    cap: impl Fn(&NodeInfo) -> ResourceSet,
) -> Option<Vec<NodeId>> {
    let nodes: Vec<&NodeInfo> = view.nodes().iter().filter(|n| n.alive).collect();
    if nodes.is_empty() {
        return None;
    }
    // Dense index of each fixed bundle's node; a fixed node that is gone cannot be planned around.
    let mut fixed_idx: Vec<Option<usize>> = Vec::with_capacity(fixed.len());
    for f in fixed {
        fixed_idx.push(match f {
            None => None,
            Some(id) => Some(nodes.iter().position(|n| n.id == *id)?),
        });
    }
    let open: Vec<usize> = (0..spec.bundles.len())
        .filter(|&b| fixed_idx[b].is_none())
        .collect();
    // Random rotation so that equal nodes do not always get the first group.
    let offset = rng.random_range(0..nodes.len());
    let order: Vec<usize> = (0..nodes.len())
        .map(|i| (i + offset) % nodes.len())
        .collect();
    let mut scratch: Vec<ResourceSet> = nodes.iter().map(|n| cap(n)).collect();

    // Node that can take every open bundle at once, least loaded first.
    let pack_one = |scratch: &[ResourceSet]| -> Option<usize> {
        let mut sum = ResourceSet::new();
        for &b in &open {
            sum.add(&spec.bundles[b]).ok()?;
        }
        order
            .iter()
            .copied()
            .filter(|&i| scratch[i].fits(&sum))
            .min_by(|&a, &b| {
                let la = ResourceSet::load(&nodes[a].total, &scratch[a]);
                let lb = ResourceSet::load(&nodes[b].total, &scratch[b]);
                la.total_cmp(&lb)
            })
    };
    let mut by_size: Vec<usize> = open.clone();
    by_size.sort_by_key(|&i| std::cmp::Reverse(size_key(&spec.bundles[i])));
    let least_loaded =
        |scratch: &[ResourceSet], need: &ResourceSet, allowed: &dyn Fn(usize) -> bool| {
            order
                .iter()
                .copied()
                .filter(|&i| allowed(i) && scratch[i].fits(need))
                .min_by(|&a, &b| {
                    let la = ResourceSet::load(&nodes[a].total, &scratch[a]);
                    let lb = ResourceSet::load(&nodes[b].total, &scratch[b]);
                    la.total_cmp(&lb)
                })
        };

    let mut out: Vec<usize> = fixed_idx.iter().map(|f| f.unwrap_or(usize::MAX)).collect();
    let used_fixed: Vec<usize> = {
        let mut u: Vec<usize> = fixed_idx.iter().flatten().copied().collect();
        u.sort_unstable();
        u.dedup();
        u
    };
    match spec.strategy {
        PgStrategy::StrictPack => {
            let i = match used_fixed.as_slice() {
                [] => pack_one(&scratch)?,
                // Survivors pin the node: the open bundles must join them.
                [only] => {
                    let mut sum = ResourceSet::new();
                    for &b in &open {
                        sum.add(&spec.bundles[b]).ok()?;
                    }
                    scratch[*only].fits(&sum).then_some(*only)?
                }
                _ => return None,
            };
            open.iter().for_each(|&b| out[b] = i);
        }
        PgStrategy::Pack => {
            let one = if used_fixed.is_empty() {
                pack_one(&scratch)
            } else {
                None
            };
            if let Some(i) = one {
                open.iter().for_each(|&b| out[b] = i);
            } else {
                let mut used: Vec<usize> = used_fixed.clone();
                for &b in &by_size {
                    let need = &spec.bundles[b];
                    let i = match used.iter().copied().find(|&u| scratch[u].fits(need)) {
                        Some(u) => u,
                        None => least_loaded(&scratch, need, &|_| true)?,
                    };
                    scratch[i].sub(need).ok()?;
                    if !used.contains(&i) {
                        used.push(i);
                    }
                    out[b] = i;
                }
            }
        }
        PgStrategy::StrictSpread | PgStrategy::Spread => {
            let strict = spec.strategy == PgStrategy::StrictSpread;
            let mut taken = vec![false; nodes.len()];
            for &u in &used_fixed {
                taken[u] = true;
            }
            for &b in &by_size {
                let need = &spec.bundles[b];
                let fresh = least_loaded(&scratch, need, &|i| !taken[i]);
                let i = match (fresh, strict) {
                    (Some(i), _) => i,
                    (None, true) => return None,
                    (None, false) => least_loaded(&scratch, need, &|_| true)?,
                };
                scratch[i].sub(need).ok()?;
                taken[i] = true;
                out[b] = i;
            }
        }
    }
    Some(out.into_iter().map(|i| nodes[i].id).collect())
}

/// Instructions from the coordinator to one node (the participant).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgCommand {
    /// Reserve these bundles (all or none on this node) and reply with
    /// [`PgCoordinator::on_prepared`].
    Prepare {
        /// Group.
        pg: PlacementGroupId,
        /// Attempt number, echoed in the reply.
        attempt: u32,
        /// Target node.
        node: NodeId,
        /// `(bundle index, resources)` for this node.
        bundles: Vec<(u32, ResourceSet)>,
    },
    /// Make the prepared bundles usable and reply with [`PgCoordinator::on_committed`].
    Commit {
        /// Group.
        pg: PlacementGroupId,
        /// Attempt number, echoed in the reply.
        attempt: u32,
        /// Target node.
        node: NodeId,
        /// Bundle indices on this node.
        indices: Vec<u32>,
    },
    /// Drop these bundles (prepared or committed) and stop the tasks running in them.
    /// Releasing a bundle the node does not hold is a no-op.
    Release {
        /// Group.
        pg: PlacementGroupId,
        /// Target node.
        node: NodeId,
        /// Bundle indices on this node.
        indices: Vec<u32>,
    },
}

/// Things the runtime reports to users or publishes to the GCS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgEvent {
    /// Every bundle is reserved and committed: publish the placement, tasks may use it.
    /// Emitted again after a repair (see [`PgEvent::Rescheduling`]).
    Created {
        /// Group.
        pg: PlacementGroupId,
        /// Node of each bundle, in bundle order.
        placement: Vec<NodeId>,
    },
    /// The group cannot fit the cluster as it is (reported once per pending period); it stays
    /// pending and is retried, so it is placed when capacity arrives.
    Infeasible {
        /// Group.
        pg: PlacementGroupId,
    },
    /// A created group lost bundles (their node died) and they are being placed again. The other
    /// bundles stay reserved and their tasks keep running; the published placement may keep
    /// pointing the lost bundles at the dead node (the policy answers `Wait` for them) until
    /// the next [`PgEvent::Created`]. For STRICT_PACK every bundle is lost together.
    Rescheduling {
        /// Group.
        pg: PlacementGroupId,
        /// Bundle indices being placed again.
        lost: Vec<u32>,
    },
}

/// Errors of coordinator calls.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    /// A group with this id exists already.
    #[error("placement group already exists")]
    Exists(PlacementGroupId),
    /// No group with this id.
    #[error("unknown placement group")]
    Unknown(PlacementGroupId),
    /// The coordinator tracks [`PgConfig::max_groups`] groups already. Retryable after removals.
    #[error("too many placement groups")]
    TooMany,
    /// Bundle count out of range (see [`PlanError::BadBundleCount`]).
    #[error("placement group must have between 1 and {MAX_BUNDLES} bundles")]
    BadBundleCount,
}

/// Coordinator limits and timings (milliseconds of the caller's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgConfig {
    /// How long an attempt may wait for prepare or commit replies before it is aborted.
    pub phase_timeout_ms: u64,
    /// Wait between a failed attempt and the next.
    pub retry_ms: u64,
    /// Most groups tracked.
    pub max_groups: usize,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            phase_timeout_ms: 5_000,
            retry_ms: 100,
            max_groups: 10_000,
        }
    }
}

/// The lifecycle of one group. Bundles already committed are kept in the group's placement
/// ([`PgCoordinator::placement`]); an attempt only ever reserves the bundles not yet placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgPhase {
    /// Waiting to place its unplaced bundles at or after `retry_at`.
    Pending {
        /// Earliest time of the next attempt.
        retry_at: u64,
        /// An `Infeasible` event was already emitted for this pending period.
        reported_infeasible: bool,
    },
    /// Waiting for every node's prepare reply.
    Preparing {
        /// `(bundle index, node)` reserved by this attempt.
        bundles: Vec<(u32, NodeId)>,
        /// Nodes that replied ok.
        prepared: Vec<NodeId>,
        /// Abort if not all replied by then.
        deadline: u64,
    },
    /// Waiting for every node's commit reply.
    Committing {
        /// `(bundle index, node)` reserved by this attempt.
        bundles: Vec<(u32, NodeId)>,
        /// Nodes that confirmed.
        committed: Vec<NodeId>,
        /// Abort if not all replied by then.
        deadline: u64,
    },
    /// Every bundle reserved and committed.
    Created,
}

#[derive(Clone, Debug)]
struct Group {
    spec: PlacementGroupSpec,
    phase: PgPhase,
    attempt: u32,
    /// Committed bundles; `None` while a bundle is unplaced.
    placed: Vec<Option<NodeId>>,
}

/// Distinct nodes of `(index, node)` pairs, in first-use order.
fn distinct(bundles: &[(u32, NodeId)]) -> Vec<NodeId> {
    let mut out: Vec<NodeId> = Vec::new();
    for (_, n) in bundles {
        if !out.contains(n) {
            out.push(*n);
        }
    }
    out
}

fn indices_on(bundles: &[(u32, NodeId)], node: NodeId) -> Vec<u32> {
    bundles
        .iter()
        .filter(|(_, n)| *n == node)
        .map(|(i, _)| *i)
        .collect()
}

fn attempt_bundles(phase: &PgPhase) -> &[(u32, NodeId)] {
    match phase {
        PgPhase::Preparing { bundles, .. } | PgPhase::Committing { bundles, .. } => bundles,
        PgPhase::Pending { .. } | PgPhase::Created => &[],
    }
}

/// The two-phase placement-group coordinator. See the module docs.
///
/// Drive it like quinn-proto: call the `on_*` inputs and [`PgCoordinator::poll`] with the current
/// time, then drain [`PgCoordinator::poll_command`] (send each to its node) and
/// [`PgCoordinator::poll_event`] (publish).
#[derive(Debug, Default)]
pub struct PgCoordinator {
    config: PgConfig,
    groups: HashMap<PlacementGroupId, Group>,
    commands: VecDeque<PgCommand>,
    events: VecDeque<PgEvent>,
}

impl PgCoordinator {
    /// A coordinator with this configuration.
    pub fn new(config: PgConfig) -> Self {
        PgCoordinator {
            config,
            ..Default::default()
        }
    }

    /// Registers a group; it is placed on the next [`PgCoordinator::poll`].
    pub fn create(&mut self, spec: PlacementGroupSpec, now: u64) -> Result<(), PgError> {
        if self.groups.contains_key(&spec.id) {
            return Err(PgError::Exists(spec.id));
        }
        if self.groups.len() >= self.config.max_groups {
            return Err(PgError::TooMany);
        }
        if spec.bundles.is_empty() || spec.bundles.len() > MAX_BUNDLES {
            return Err(PgError::BadBundleCount);
        }
        let id = spec.id;
        let placed = vec![None; spec.bundles.len()];
        self.groups.insert(
            id,
            Group {
                spec,
                phase: PgPhase::Pending {
                    retry_at: now,
                    reported_infeasible: false,
                },
                attempt: 0,
                placed,
            },
        );
        Ok(())
    }

    /// Removes a group: every reservation (committed or in flight) is released. Returns
    /// `(bundle index, node)` for each of them, so the runtime stops what runs in them.
    pub fn remove(&mut self, pg: PlacementGroupId) -> Result<Vec<(u32, NodeId)>, PgError> {
        let g = self.groups.remove(&pg).ok_or(PgError::Unknown(pg))?;
        let mut all: Vec<(u32, NodeId)> = g
            .placed
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.map(|n| (i as u32, n)))
            .collect();
        all.extend_from_slice(attempt_bundles(&g.phase));
        all.sort_unstable();
        self.release(pg, &all);
        Ok(all)
    }

    /// Current phase of a group.
    pub fn phase(&self, pg: PlacementGroupId) -> Option<&PgPhase> {
        self.groups.get(&pg).map(|g| &g.phase)
    }

    /// Committed node of each bundle (`None`: not placed, or lost and being placed again).
    pub fn placement(&self, pg: PlacementGroupId) -> Option<&[Option<NodeId>]> {
        self.groups.get(&pg).map(|g| g.placed.as_slice())
    }

    /// Number of groups tracked.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// `true` when no group is tracked.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Next command to send.
    pub fn poll_command(&mut self) -> Option<PgCommand> {
        self.commands.pop_front()
    }

    /// Next event to publish.
    pub fn poll_event(&mut self) -> Option<PgEvent> {
        self.events.pop_front()
    }

    /// The earliest time at which [`PgCoordinator::poll`] has work (a retry or a timeout).
    pub fn next_deadline(&self) -> Option<u64> {
        self.groups
            .values()
            .filter_map(|g| match &g.phase {
                PgPhase::Pending { retry_at, .. } => Some(*retry_at),
                PgPhase::Preparing { deadline, .. } | PgPhase::Committing { deadline, .. } => {
                    Some(*deadline)
                }
                PgPhase::Created => None,
            })
            .min()
    }

    fn release(&mut self, pg: PlacementGroupId, bundles: &[(u32, NodeId)]) {
        for node in distinct(bundles) {
            self.commands.push_back(PgCommand::Release {
                pg,
                node,
                indices: indices_on(bundles, node),
            });
        }
    }

    /// Aborts the current attempt of `pg` (releasing what it may have reserved; committed
    /// bundles stay) and schedules a retry.
    fn abort(&mut self, pg: PlacementGroupId, now: u64) {
        let retry_at = now.saturating_add(self.config.retry_ms);
        let Some(g) = self.groups.get_mut(&pg) else {
            return;
        };
        let bundles = match &mut g.phase {
            PgPhase::Preparing { bundles, .. } | PgPhase::Committing { bundles, .. } => {
                std::mem::take(bundles)
            }
            PgPhase::Pending { .. } | PgPhase::Created => return,
        };
        g.phase = PgPhase::Pending {
            retry_at,
            reported_infeasible: false,
        };
        self.release(pg, &bundles);
    }

    /// A node answered a prepare: `ok == false` means it could not reserve its bundles.
    pub fn on_prepared(
        &mut self,
        pg: PlacementGroupId,
        attempt: u32,
        node: NodeId,
        ok: bool,
        now: u64,
    ) {
        let Some(g) = self.groups.get_mut(&pg) else {
            return;
        };
        if g.attempt != attempt {
            return;
        }
        let PgPhase::Preparing {
            bundles, prepared, ..
        } = &mut g.phase
        else {
            return;
        };
        if !bundles.iter().any(|(_, n)| *n == node) {
            return;
        }
        if !ok {
            self.abort(pg, now);
            return;
        }
        if !prepared.contains(&node) {
            prepared.push(node);
        }
        let nodes = distinct(bundles);
        if prepared.len() == nodes.len() {
            let bundles = std::mem::take(bundles);
            for node in nodes {
                self.commands.push_back(PgCommand::Commit {
                    pg,
                    attempt,
                    node,
                    indices: indices_on(&bundles, node),
                });
            }
            g.phase = PgPhase::Committing {
                bundles,
                committed: Vec::new(),
                deadline: now.saturating_add(self.config.phase_timeout_ms),
            };
        }
    }

    /// A node confirmed its commit.
    pub fn on_committed(&mut self, pg: PlacementGroupId, attempt: u32, node: NodeId) {
        let Some(g) = self.groups.get_mut(&pg) else {
            return;
        };
        if g.attempt != attempt {
            return;
        }
        let PgPhase::Committing {
            bundles, committed, ..
        } = &mut g.phase
        else {
            return;
        };
        if !bundles.iter().any(|(_, n)| *n == node) {
            return;
        }
        if !committed.contains(&node) {
            committed.push(node);
        }
        if committed.len() == distinct(bundles).len() {
            for (i, n) in std::mem::take(bundles) {
                if let Some(slot) = g.placed.get_mut(i as usize) {
                    *slot = Some(n);
                }
            }
            g.phase = PgPhase::Created;
            let placement: Option<Vec<NodeId>> = g.placed.iter().copied().collect();
            if let Some(placement) = placement {
                self.events.push_back(PgEvent::Created { pg, placement });
            }
        }
    }

    /// A node died: attempts reserving on it are aborted, and bundles committed on it are
    /// placed again (the group's other bundles stay, except under STRICT_PACK where the whole
    /// group moves). Returns the affected groups.
    pub fn on_node_dead(&mut self, node: NodeId, now: u64) -> Vec<PlacementGroupId> {
        let mut hit: Vec<PlacementGroupId> = self
            .groups
            .iter()
            .filter(|(_, g)| {
                g.placed.contains(&Some(node))
                    || attempt_bundles(&g.phase).iter().any(|(_, n)| *n == node)
            })
            .map(|(id, _)| *id)
            .collect();
        hit.sort_unstable();
        let retry_at = now.saturating_add(self.config.retry_ms);
        for id in &hit {
            // Any attempt in flight is abandoned; it is planned again around the survivors.
            self.abort(*id, now);
            let Some(g) = self.groups.get_mut(id) else {
                continue;
            };
            let strict_pack = g.spec.strategy == PgStrategy::StrictPack;
            let mut lost: Vec<u32> = Vec::new();
            let mut survivors: Vec<(u32, NodeId)> = Vec::new();
            for (i, slot) in g.placed.iter_mut().enumerate() {
                match *slot {
                    Some(n) if n == node => {
                        *slot = None;
                        lost.push(i as u32);
                    }
                    Some(n) if strict_pack => {
                        *slot = None;
                        lost.push(i as u32);
                        survivors.push((i as u32, n));
                    }
                    _ => {}
                }
            }
            if lost.is_empty() {
                continue;
            }
            if g.phase == PgPhase::Created {
                g.phase = PgPhase::Pending {
                    retry_at,
                    reported_infeasible: false,
                };
            }
            self.release(*id, &survivors);
            self.events
                .push_back(PgEvent::Rescheduling { pg: *id, lost });
        }
        hit
    }

    /// Handles timeouts and places pending groups' unplaced bundles when their retry time has come.
    pub fn poll<R: Rng + ?Sized>(&mut self, now: u64, view: &ClusterView, rng: &mut R) {
        let mut ids: Vec<PlacementGroupId> = self.groups.keys().copied().collect();
        ids.sort_unstable();
        // Reservations of attempts in flight, which the view may not reflect yet.
        let mut in_flight: HashMap<NodeId, ResourceSet> = HashMap::new();
        for g in self.groups.values() {
            for (i, node) in attempt_bundles(&g.phase) {
                if let Some(r) = g.spec.bundles.get(*i as usize) {
                    let _ = in_flight.entry(*node).or_default().add(r);
                }
            }
        }
        for id in ids {
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            match &mut g.phase {
                PgPhase::Preparing { deadline, .. } | PgPhase::Committing { deadline, .. } => {
                    if now >= *deadline {
                        self.abort(id, now);
                    }
                }
                PgPhase::Pending {
                    retry_at,
                    reported_infeasible,
                } => {
                    if now < *retry_at {
                        continue;
                    }
                    match plan_around(view, &g.spec, rng, &in_flight, &g.placed) {
                        Ok(full) => {
                            let bundles: Vec<(u32, NodeId)> = full
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| g.placed[*i].is_none())
                                .map(|(i, n)| (i as u32, *n))
                                .collect();
                            for (i, node) in &bundles {
                                let _ = in_flight
                                    .entry(*node)
                                    .or_default()
                                    .add(&g.spec.bundles[*i as usize]);
                            }
                            g.attempt = g.attempt.wrapping_add(1);
                            let attempt = g.attempt;
                            for node in distinct(&bundles) {
                                let reserve = indices_on(&bundles, node)
                                    .into_iter()
                                    .map(|i| (i, g.spec.bundles[i as usize].clone()))
                                    .collect();
                                self.commands.push_back(PgCommand::Prepare {
                                    pg: id,
                                    attempt,
                                    node,
                                    bundles: reserve,
                                });
                            }
                            g.phase = PgPhase::Preparing {
                                bundles,
                                prepared: Vec::new(),
                                deadline: now.saturating_add(self.config.phase_timeout_ms),
                            };
                        }
                        Err(e) => {
                            *retry_at = now.saturating_add(self.config.retry_ms);
                            if e != PlanError::Unavailable && !*reported_infeasible {
                                *reported_infeasible = true;
                                self.events.push_back(PgEvent::Infeasible { pg: id });
                            }
                        }
                    }
                }
                PgPhase::Created => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::ViewDelta;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn view(cpus: &[u64]) -> ClusterView {
        let mut v = ClusterView::new();
        v.apply(cpus.iter().enumerate().map(|(i, c)| {
            ViewDelta::NodeJoined(NodeInfo::new(NodeId(i as u128 + 1), ResourceSet::cpus(*c)))
        }));
        v
    }

    fn n_distinct(p: &[NodeId]) -> usize {
        let mut v = p.to_vec();
        v.sort_unstable();
        v.dedup();
        v.len()
    }

    fn drain(c: &mut PgCoordinator) -> Vec<PgCommand> {
        std::iter::from_fn(|| c.poll_command()).collect()
    }

    fn spec(strategy: PgStrategy, bundles: &[u64]) -> PlacementGroupSpec {
        PlacementGroupSpec {
            id: PlacementGroupId(1),
            bundles: bundles.iter().map(|c| ResourceSet::cpus(*c)).collect(),
            strategy,
        }
    }

    #[test]
    fn strategies_place_as_named() {
        let v = view(&[4, 4, 4]);
        let mut r = SmallRng::seed_from_u64(1);
        let p = plan(&v, &spec(PgStrategy::StrictPack, &[1, 2]), &mut r).unwrap();
        assert_eq!(p[0], p[1]);
        assert_eq!(
            plan(&v, &spec(PgStrategy::StrictPack, &[3, 2]), &mut r),
            Err(PlanError::Infeasible)
        );
        let p = plan(&v, &spec(PgStrategy::Pack, &[3, 2]), &mut r).unwrap();
        assert_ne!(p[0], p[1]);
        let p = plan(&v, &spec(PgStrategy::StrictSpread, &[1, 1, 1]), &mut r).unwrap();
        assert_eq!(n_distinct(&p), 3);
        assert_eq!(
            plan(&v, &spec(PgStrategy::StrictSpread, &[1, 1, 1, 1]), &mut r),
            Err(PlanError::Infeasible)
        );
        let p = plan(&v, &spec(PgStrategy::Spread, &[1, 1, 1, 1]), &mut r).unwrap();
        assert_eq!(n_distinct(&p), 3);
        assert_eq!(
            plan(&v, &spec(PgStrategy::Pack, &[]), &mut r),
            Err(PlanError::BadBundleCount)
        );
    }

    #[test]
    fn busy_cluster_is_unavailable_not_infeasible() {
        let mut v = view(&[4]);
        v.apply([ViewDelta::Resources {
            node: NodeId(1),
            seq: 1,
            available: ResourceSet::cpus(1),
            queue_len: 0,
        }]);
        let mut r = SmallRng::seed_from_u64(1);
        assert_eq!(
            plan(&v, &spec(PgStrategy::Pack, &[2]), &mut r),
            Err(PlanError::Unavailable)
        );
    }

    #[test]
    fn refusal_releases_everything_and_retries() {
        let v = view(&[4, 4]);
        let mut r = SmallRng::seed_from_u64(1);
        let mut c = PgCoordinator::new(PgConfig::default());
        c.create(spec(PgStrategy::StrictSpread, &[1, 1]), 0)
            .unwrap();
        c.poll(0, &v, &mut r);
        let cmds: Vec<_> = std::iter::from_fn(|| c.poll_command()).collect();
        assert_eq!(cmds.len(), 2);
        assert!(
            cmds.iter()
                .all(|c| matches!(c, PgCommand::Prepare { attempt: 1, .. }))
        );
        c.on_prepared(PlacementGroupId(1), 1, NodeId(1), true, 1);
        c.on_prepared(PlacementGroupId(1), 1, NodeId(2), false, 1);
        let cmds: Vec<_> = std::iter::from_fn(|| c.poll_command()).collect();
        assert_eq!(cmds.len(), 2);
        assert!(cmds.iter().all(|c| matches!(c, PgCommand::Release { .. })));
        assert!(matches!(
            c.phase(PlacementGroupId(1)),
            Some(PgPhase::Pending { .. })
        ));
        // Retry after the back-off, then succeed.
        c.poll(50, &v, &mut r);
        assert!(c.poll_command().is_none());
        c.poll(101, &v, &mut r);
        let cmds: Vec<_> = std::iter::from_fn(|| c.poll_command()).collect();
        assert_eq!(cmds.len(), 2);
        // A stale reply from attempt 1 is ignored.
        c.on_prepared(PlacementGroupId(1), 1, NodeId(1), false, 102);
        assert!(matches!(
            c.phase(PlacementGroupId(1)),
            Some(PgPhase::Preparing { .. })
        ));
        c.on_prepared(PlacementGroupId(1), 2, NodeId(1), true, 102);
        c.on_prepared(PlacementGroupId(1), 2, NodeId(2), true, 102);
        let cmds: Vec<_> = std::iter::from_fn(|| c.poll_command()).collect();
        assert!(
            cmds.iter()
                .all(|c| matches!(c, PgCommand::Commit { attempt: 2, .. }))
        );
        c.on_committed(PlacementGroupId(1), 2, NodeId(1));
        assert!(c.poll_event().is_none());
        c.on_committed(PlacementGroupId(1), 2, NodeId(2));
        assert!(matches!(c.poll_event(), Some(PgEvent::Created { .. })));
        let removed = c.remove(PlacementGroupId(1)).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(std::iter::from_fn(|| c.poll_command()).count(), 2);
    }

    #[test]
    fn timeout_aborts() {
        let v = view(&[4]);
        let mut r = SmallRng::seed_from_u64(1);
        let mut c = PgCoordinator::new(PgConfig {
            phase_timeout_ms: 10,
            ..Default::default()
        });
        c.create(spec(PgStrategy::Pack, &[1]), 0).unwrap();
        c.poll(0, &v, &mut r);
        assert!(c.poll_command().is_some());
        assert_eq!(c.next_deadline(), Some(10));
        c.poll(10, &v, &mut r);
        assert!(matches!(c.poll_command(), Some(PgCommand::Release { .. })));
        assert!(matches!(
            c.phase(PlacementGroupId(1)),
            Some(PgPhase::Pending { .. })
        ));
    }

    #[test]
    fn infeasible_group_is_reported_once() {
        let v = view(&[2]);
        let mut r = SmallRng::seed_from_u64(1);
        let mut c = PgCoordinator::new(PgConfig::default());
        c.create(spec(PgStrategy::Pack, &[8]), 0).unwrap();
        c.poll(0, &v, &mut r);
        c.poll(200, &v, &mut r);
        assert_eq!(
            c.poll_event(),
            Some(PgEvent::Infeasible {
                pg: PlacementGroupId(1)
            })
        );
        assert_eq!(c.poll_event(), None);
    }

    #[test]
    fn groups_planned_together_do_not_overbook_a_node() {
        let v = view(&[4, 4]);
        for seed in 0..20 {
            let mut r = SmallRng::seed_from_u64(seed);
            let mut c = PgCoordinator::new(PgConfig::default());
            for id in [1, 2] {
                let spec = PlacementGroupSpec {
                    id: PlacementGroupId(id),
                    ..spec(PgStrategy::StrictPack, &[2, 2])
                };
                c.create(spec, 0).unwrap();
            }
            c.poll(0, &v, &mut r);
            let nodes: Vec<NodeId> = std::iter::from_fn(|| c.poll_command())
                .map(|cmd| match cmd {
                    PgCommand::Prepare { node, .. } => node,
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            assert_eq!(nodes.len(), 2, "seed {seed}");
            assert_ne!(
                nodes[0], nodes[1],
                "seed {seed}: both groups planned onto one node"
            );
        }
    }

    #[test]
    fn node_death_replaces_only_the_lost_bundle() {
        let mut v = view(&[4, 4, 4, 4]);
        let mut r = SmallRng::seed_from_u64(3);
        let mut c = PgCoordinator::new(PgConfig::default());
        let pg = PlacementGroupId(1);
        c.create(spec(PgStrategy::StrictSpread, &[1, 1, 1]), 0)
            .unwrap();
        c.poll(0, &v, &mut r);
        for cmd in drain(&mut c) {
            if let PgCommand::Prepare { attempt, node, .. } = cmd {
                c.on_prepared(pg, attempt, node, true, 1);
            }
        }
        for cmd in drain(&mut c) {
            if let PgCommand::Commit { attempt, node, .. } = cmd {
                c.on_committed(pg, attempt, node);
            }
        }
        let Some(PgEvent::Created {
            placement: before, ..
        }) = c.poll_event()
        else {
            panic!("not created")
        };
        let dead = before[1];
        v.apply([ViewDelta::NodeDied(dead)]);
        assert_eq!(c.on_node_dead(dead, 10), vec![pg]);
        assert_eq!(
            c.poll_event(),
            Some(PgEvent::Rescheduling { pg, lost: vec![1] })
        );
        // The survivors are not released.
        assert!(drain(&mut c).is_empty());
        assert_eq!(
            c.placement(pg).unwrap(),
            &[Some(before[0]), None, Some(before[2])]
        );
        c.poll(200, &v, &mut r);
        let cmds = drain(&mut c);
        assert_eq!(cmds.len(), 1);
        let PgCommand::Prepare {
            attempt,
            node,
            bundles,
            ..
        } = &cmds[0]
        else {
            panic!("expected a prepare, got {cmds:?}")
        };
        assert_eq!(bundles.len(), 1);
        assert_eq!(bundles[0].0, 1);
        // STRICT_SPREAD: the replacement avoids the survivors' nodes (and the dead one).
        assert!(!before.contains(node));
        let (attempt, node) = (*attempt, *node);
        c.on_prepared(pg, attempt, node, true, 201);
        drain(&mut c);
        c.on_committed(pg, attempt, node);
        assert_eq!(
            c.poll_event(),
            Some(PgEvent::Created {
                pg,
                placement: vec![before[0], node, before[2]]
            })
        );
        assert_eq!(c.phase(pg), Some(&PgPhase::Created));
        // Removal releases all three.
        assert_eq!(c.remove(pg).unwrap().len(), 3);
        assert_eq!(drain(&mut c).len(), 3);
    }

    #[test]
    fn strict_pack_moves_as_a_whole() {
        let mut v = view(&[4, 4]);
        let mut r = SmallRng::seed_from_u64(3);
        let mut c = PgCoordinator::new(PgConfig::default());
        let pg = PlacementGroupId(1);
        c.create(spec(PgStrategy::StrictPack, &[1, 1]), 0).unwrap();
        c.poll(0, &v, &mut r);
        let PgCommand::Prepare { attempt, node, .. } = drain(&mut c).remove(0) else {
            panic!()
        };
        c.on_prepared(pg, attempt, node, true, 1);
        drain(&mut c);
        c.on_committed(pg, attempt, node);
        assert!(matches!(c.poll_event(), Some(PgEvent::Created { .. })));
        v.apply([ViewDelta::NodeDied(node)]);
        c.on_node_dead(node, 5);
        assert_eq!(
            c.poll_event(),
            Some(PgEvent::Rescheduling {
                pg,
                lost: vec![0, 1]
            })
        );
        c.poll(200, &v, &mut r);
        let cmds = drain(&mut c);
        assert!(
            matches!(&cmds[..], [PgCommand::Prepare { node: n, bundles, .. }] if *n != node && bundles.len() == 2)
        );
    }
}
