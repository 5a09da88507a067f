//! The placement policy: given a [`ClusterView`] and one [`TaskRequest`], where should it run?
//!
//! This is the bottom-up decision that every node makes for every task it is handed, so it is on
//! the hot path: in the common case (local node free, or a short sample finds a free node) it
//! allocates nothing and touches O(sample size + argument locations) nodes, not the whole cluster.
//! Only when sampling finds nothing does it scan every node, which also yields a precise
//! [`InfeasibleReason`].
//!
//! Hard requirements (a task never goes where they fail): resources fit the node's *total*,
//! label selectors match, the node is alive, the node has the function compiled in (unless
//! [`PolicyConfig::require_function`] is off), hard node affinity, the placement group bundle.
//! Soft preferences (used for ranking): free resources now, short queue, bytes of large arguments
//! already on the node, soft node affinity, spreading. Argument sizes and holders come from the
//! request ([`TaskArg`], what the submitter knows) and from the view's object table, merged.
//!
//! It is not the local dispatcher ([`crate::LocalQueue`] decides *when* a task starts) and it
//! does no I/O, reads no clock and uses only the RNG it is given.

use oxray_transport::NodeId;
use rand::Rng;

use crate::resources::{LabelSelector, ResourceSet};
use crate::view::{
    ClusterView, FunctionId, NodeInfo, ObjectId, ObjectInfo, PlacementGroupId, PlacementGroupState,
};

/// Most by-reference arguments looked at for locality (further ones are ignored for scoring).
pub const MAX_ARGS_CONSIDERED: usize = 16;

/// Largest `top_k` honoured (the candidate buffer lives on the stack).
pub const MAX_TOP_K: usize = 16;

/// Most holders of one argument read from [`TaskArg::nodes`] (further ones are ignored, as the view
/// keeps at most [`crate::view::MAX_LOCATIONS_PER_OBJECT`] per object).
pub const MAX_ARG_HOLDERS: usize = crate::view::MAX_LOCATIONS_PER_OBJECT;

/// One by-reference argument of a task, for locality.
///
/// The submitter (the object's owner, usually) often knows more than its [`ClusterView`]: the
/// object's size and which nodes hold a copy. It says so here. Whatever the view knows about the
/// same object is added to it, so a runtime may feed either or both. An argument with `size` 0
/// and no `nodes` is looked up in the view alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskArg {
    /// The object.
    pub object: ObjectId,
    /// Its size in bytes, if known (0 if not).
    pub size: u64,
    /// Nodes known to hold a copy (at most [`MAX_ARG_HOLDERS`] are read).
    pub nodes: Vec<NodeId>,
}

impl TaskArg {
    /// An argument whose size and holders the submitter knows.
    pub fn new(object: ObjectId, size: u64, nodes: Vec<NodeId>) -> Self {
        TaskArg {
            object,
            size,
            nodes,
        }
    }
}

impl From<ObjectId> for TaskArg {
    /// An argument known by id only: its size and holders come from the view.
    fn from(object: ObjectId) -> Self {
        TaskArg {
            object,
            ..Default::default()
        }
    }
}

/// How a task wants to be placed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Local first, then the best node by load and argument locality.
    #[default]
    Default,
    /// Spread tasks across nodes: least-loaded feasible node, local gets no preference.
    Spread,
    /// Run on `node`. Hard (`soft == false`): infeasible if that node is dead or cannot fit the
    /// task. Soft: prefer it while it has room, otherwise behave as [`Strategy::Default`].
    NodeAffinity {
        /// The wanted node.
        node: NodeId,
        /// Whether falling back to another node is allowed.
        soft: bool,
    },
    /// Run inside a bundle of a placement group, using the bundle's reserved resources.
    PlacementGroup {
        /// The group.
        pg: PlacementGroupId,
        /// A specific bundle, or `None` for any bundle that fits.
        bundle: Option<u32>,
    },
}

/// What the policy needs to know about one task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskRequest {
    /// The function (or actor type) to run.
    pub function: FunctionId,
    /// Resources the task holds while running.
    pub resources: ResourceSet,
    /// Placement strategy.
    pub strategy: Strategy,
    /// Hard label requirements on the node.
    pub label_selector: Vec<LabelSelector>,
    /// Objects passed by reference (their sizes and locations drive locality). At most
    /// [`MAX_ARGS_CONSIDERED`] are looked at.
    pub args: Vec<TaskArg>,
    /// How many times this task has already been spilled. Past
    /// [`PolicyConfig::max_spill_hops`] a feasible node keeps it, so a stale view cannot bounce a
    /// task around the cluster forever.
    pub spill_count: u32,
}

impl TaskRequest {
    /// A default-strategy request for `function` needing `resources`.
    pub fn new(function: FunctionId, resources: ResourceSet) -> Self {
        TaskRequest {
            function,
            resources,
            ..Default::default()
        }
    }
}

/// Why a task cannot run anywhere in the cluster as it is now. Not permanent: a joining node or a
/// created placement group can make the task feasible (see [`crate::LocalQueue::recheck_infeasible`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InfeasibleReason {
    /// No alive node's *total* resources fit the request. Add a bigger node or shrink the request.
    #[error("no alive node has enough total resources")]
    NoNodeHasResources,
    /// Nodes with enough resources exist but none matches the label selectors.
    #[error("no node with enough resources matches the label selector")]
    NoNodeMatchesLabels,
    /// Nodes fit but none has the function compiled in (mixed binaries in the cluster).
    #[error("no suitable node has the function registered")]
    NoNodeHasFunction,
    /// Hard node affinity names a node that is unknown, dead, or cannot fit the task.
    #[error("affinity node {0} is unavailable or cannot fit the task")]
    AffinityNodeUnavailable(NodeId),
    /// The placement group is unknown to this node's view.
    #[error("unknown placement group")]
    UnknownPlacementGroup(PlacementGroupId),
    /// The placement group was removed.
    #[error("placement group was removed")]
    PlacementGroupRemoved(PlacementGroupId),
    /// The bundle index is past the group's last bundle.
    #[error("bundle index {index} out of range ({bundles} bundles)")]
    BundleIndexOutOfRange {
        /// Asked index.
        index: u32,
        /// Bundles in the group.
        bundles: u32,
    },
    /// The bundle (or every bundle, for "any bundle") is too small for the task.
    #[error("placement group bundle too small for the task")]
    BundleTooSmall,
}

/// The policy's answer for one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Hand the task to this node's [`crate::LocalQueue`].
    RunLocal,
    /// Forward the task to another node (increment [`TaskRequest::spill_count`]).
    Spill(NodeId),
    /// Placement-group task: run in bundle `index` on `node` (which may be the local node).
    RunInBundle {
        /// Node hosting the bundle.
        node: NodeId,
        /// Bundle index.
        index: u32,
    },
    /// Feasible, but every suitable node is busy or has a long queue (or the placement group is
    /// still pending): keep the task and decide again when the view changes.
    Wait,
    /// Cannot run anywhere now; report it to the user and park it until the cluster changes.
    Infeasible(InfeasibleReason),
}

/// Tunables of the policy. Every limit is explicit here.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// A node whose queue holds this many ready tasks counts as busy, and is neither kept nor
    /// chosen for new work while a less loaded node exists.
    pub spill_queue_len: u32,
    /// Random nodes probed per decision before falling back to a full scan.
    pub sample_size: usize,
    /// A full scan keeps the best `top_k` nodes and picks one at random, so that many nodes
    /// deciding on the same stale view do not all pick the same target (capped at [`MAX_TOP_K`]).
    pub top_k: usize,
    /// Arguments smaller than this in total are ignored for locality: moving them is cheap.
    pub locality_min_bytes: u64,
    /// Weight of "fraction of argument bytes already on the node" against load (in `[0, 1]`).
    pub locality_weight: f64,
    /// Weight of queue length (relative to `spill_queue_len`) against load.
    pub queue_weight: f64,
    /// After this many spills a feasible node runs the task rather than spill again.
    pub max_spill_hops: u32,
    /// Whether a node must have the function in its table to be chosen. When `false` it is a
    /// soft preference weighted by `function_weight` (for runtimes that can load code lazily).
    pub require_function: bool,
    /// Score bonus of a node that has the function, when `require_function` is off.
    pub function_weight: f64,
    /// Below this load (in `[0, 1]`) a node counts as empty, and a full scan takes the first such node in view
    /// order instead of a random one of the best `top_k` (Ray's hybrid policy). Light work then packs onto the
    /// same few nodes, so a caller that submits one task at a time keeps reaching a node whose threads and
    /// caches are warm, and work spreads once those nodes are half full. Zero turns packing off.
    pub pack_below: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            spill_queue_len: 8,
            sample_size: 16,
            top_k: 4,
            locality_min_bytes: 1 << 20,
            locality_weight: 2.0,
            queue_weight: 1.0,
            max_spill_hops: 3,
            require_function: true,
            function_weight: 0.5,
            pack_below: 0.5,
        }
    }
}

/// The placement policy: a [`PolicyConfig`] plus the decision procedure. Stateless between calls.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    config: PolicyConfig,
}

/// Decides with the default configuration. See [`Policy::decide`].
pub fn decide<R: Rng + ?Sized>(
    view: &ClusterView,
    local: NodeId,
    req: &TaskRequest,
    rng: &mut R,
) -> Decision {
    Policy::default().decide(view, local, req, rng)
}

/// One argument's size and holders, as the request and the view tell them.
#[derive(Clone, Copy)]
struct ArgLoc<'a> {
    size: u64,
    given: &'a [NodeId],
    seen: &'a [NodeId],
}

impl ArgLoc<'_> {
    fn on(&self, node: NodeId) -> bool {
        self.given.contains(&node) || self.seen.contains(&node)
    }
}

/// Resolved argument locations for one decision, on the stack.
struct ArgLocs<'a> {
    objs: [Option<ArgLoc<'a>>; MAX_ARGS_CONSIDERED],
    total: u64,
}

impl<'a> ArgLocs<'a> {
    fn new(view: &'a ClusterView, req: &'a TaskRequest, min_bytes: u64) -> Self {
        let mut objs = [None; MAX_ARGS_CONSIDERED];
        let mut total = 0u64;
        for (slot, arg) in objs.iter_mut().zip(req.args.iter()) {
            let seen: Option<&ObjectInfo> = view.object(arg.object);
            let given = &arg.nodes[..arg.nodes.len().min(MAX_ARG_HOLDERS)];
            if seen.is_none() && given.is_empty() {
                continue;
            }
            // The larger of the two sizes: a stale or missing one must not hide a large object.
            let size = arg.size.max(seen.map_or(0, |o| o.size));
            total = total.saturating_add(size);
            *slot = Some(ArgLoc {
                size,
                given,
                seen: seen.map_or(&[][..], |o| &o.nodes[..]),
            });
        }
        if total < min_bytes {
            total = 0;
        }
        ArgLocs { objs, total }
    }

    /// Locality matters for this task.
    fn enabled(&self) -> bool {
        self.total > 0
    }

    fn bytes_on(&self, node: NodeId) -> u64 {
        self.objs
            .iter()
            .flatten()
            .filter(|o| o.on(node))
            .map(|o| o.size)
            .sum()
    }

    /// Every holder named (a node may appear more than once).
    fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.objs
            .iter()
            .flatten()
            .flat_map(|o| o.given.iter().chain(o.seen.iter()).copied())
    }
}

/// How far a node got through the hard checks (for the infeasibility reason).
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Dead,
    NoResources,
    NoLabels,
    NoFunction,
    Feasible,
}

/// Fixed-capacity best-k buffer (no allocation).
struct TopK {
    items: [(f64, u32); MAX_TOP_K],
    len: usize,
    cap: usize,
}

impl TopK {
    fn new(cap: usize) -> Self {
        TopK {
            items: [(f64::NEG_INFINITY, 0); MAX_TOP_K],
            len: 0,
            cap: cap.clamp(1, MAX_TOP_K),
        }
    }

    fn offer(&mut self, score: f64, idx: u32) {
        if self.len < self.cap {
            self.items[self.len] = (score, idx);
            self.len += 1;
            return;
        }
        // Replace the worst if this one is better.
        let (worst, ws) = self.items[..self.len].iter().enumerate().fold(
            (0, f64::INFINITY),
            |acc, (i, (s, _))| if *s < acc.1 { (i, *s) } else { acc },
        );
        if score > ws {
            self.items[worst] = (score, idx);
        }
    }

    fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<u32> {
        if self.len == 0 {
            None
        } else {
            Some(self.items[rng.random_range(0..self.len)].1)
        }
    }
}

impl Policy {
    /// A policy with this configuration.
    pub fn new(config: PolicyConfig) -> Self {
        Policy { config }
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// How far `n` gets through the hard requirements of `req`.
    fn stage(&self, n: &NodeInfo, req: &TaskRequest) -> Stage {
        if !n.alive {
            Stage::Dead
        } else if !n.total.fits(&req.resources) {
            Stage::NoResources
        } else if !req.label_selector.iter().all(|s| s.matches(&n.labels)) {
            Stage::NoLabels
        } else if self.config.require_function && !n.functions.contains(&req.function) {
            Stage::NoFunction
        } else {
            Stage::Feasible
        }
    }

    /// `true` when `n` meets every hard requirement of `req` (ignoring current load).
    pub fn is_feasible_on(&self, n: &NodeInfo, req: &TaskRequest) -> bool {
        self.stage(n, req) == Stage::Feasible
    }

    /// Free now and queue short: a good target.
    fn has_room(&self, n: &NodeInfo, req: &TaskRequest) -> bool {
        n.queue_len < self.config.spill_queue_len && n.available.fits(&req.resources)
    }

    fn score(&self, n: &NodeInfo, req: &TaskRequest, locs: &ArgLocs<'_>) -> f64 {
        let mut s = -ResourceSet::load(&n.total, &n.available);
        // With the function table as a soft preference, nodes that have it rank higher.
        if !self.config.require_function && n.functions.contains(&req.function) {
            s += self.config.function_weight;
        }
        s -= self.config.queue_weight * f64::from(n.queue_len)
            / f64::from(self.config.spill_queue_len.max(1));
        if locs.enabled() {
            s += self.config.locality_weight * locs.bytes_on(n.id) as f64 / locs.total as f64;
        }
        s
    }

    /// Checks feasibility over the whole view without regard to load: `Ok` when at least one
    /// node meets every hard requirement, else the reason. Placement-group and affinity
    /// requests are checked against their target. O(nodes); used for parked infeasible tasks.
    pub fn check_feasible(
        &self,
        view: &ClusterView,
        req: &TaskRequest,
    ) -> Result<(), InfeasibleReason> {
        match &req.strategy {
            Strategy::NodeAffinity { node, soft: false } => {
                return match view.node(*node) {
                    Some(n) if self.is_feasible_on(n, req) => Ok(()),
                    _ => Err(InfeasibleReason::AffinityNodeUnavailable(*node)),
                };
            }
            Strategy::PlacementGroup { pg, bundle } => {
                return match self.bundle_target(view, NodeId(0), req, *pg, *bundle) {
                    Decision::Infeasible(r) => Err(r),
                    _ => Ok(()),
                };
            }
            _ => {}
        }
        let best = view
            .nodes()
            .iter()
            .map(|n| self.stage(n, req))
            .max()
            .unwrap_or(Stage::Dead);
        stage_result(best)
    }

    /// Decides where `req`, submitted to (or spilled to) node `local`, should run.
    ///
    /// `rng` breaks ties and drives sampling; pass a seeded RNG for reproducible decisions.
    pub fn decide<R: Rng + ?Sized>(
        &self,
        view: &ClusterView,
        local: NodeId,
        req: &TaskRequest,
        rng: &mut R,
    ) -> Decision {
        match &req.strategy {
            Strategy::Default => self.decide_default(view, local, req, rng, false),
            Strategy::Spread => self.decide_default(view, local, req, rng, true),
            Strategy::NodeAffinity { node, soft } => {
                let target = view.node(*node).filter(|n| self.is_feasible_on(n, req));
                match (target, soft) {
                    (Some(n), false) => place_on(local, n.id),
                    (Some(n), true) if self.has_room(n, req) => place_on(local, n.id),
                    (_, true) => self.decide_default(view, local, req, rng, false),
                    (None, false) => {
                        Decision::Infeasible(InfeasibleReason::AffinityNodeUnavailable(*node))
                    }
                }
            }
            Strategy::PlacementGroup { pg, bundle } => {
                self.bundle_target(view, local, req, *pg, *bundle)
            }
        }
    }

    fn bundle_target(
        &self,
        view: &ClusterView,
        local: NodeId,
        req: &TaskRequest,
        pg: PlacementGroupId,
        bundle: Option<u32>,
    ) -> Decision {
        let bundles = match view.placement_group(pg) {
            None => return Decision::Infeasible(InfeasibleReason::UnknownPlacementGroup(pg)),
            Some(PlacementGroupState::Removed) => {
                return Decision::Infeasible(InfeasibleReason::PlacementGroupRemoved(pg));
            }
            Some(PlacementGroupState::Pending) => return Decision::Wait,
            Some(PlacementGroupState::Created(b)) => b,
        };
        let usable = |b: &crate::view::BundleLocation| {
            b.resources.fits(&req.resources)
                && (!self.config.require_function
                    || view
                        .node(b.node)
                        .is_none_or(|n| n.functions.contains(&req.function)))
        };
        let chosen = match bundle {
            Some(i) => {
                let Some(b) = bundles.get(i as usize) else {
                    return Decision::Infeasible(InfeasibleReason::BundleIndexOutOfRange {
                        index: i,
                        bundles: bundles.len() as u32,
                    });
                };
                if !b.resources.fits(&req.resources) {
                    return Decision::Infeasible(InfeasibleReason::BundleTooSmall);
                }
                if !usable(b) {
                    return Decision::Infeasible(InfeasibleReason::NoNodeHasFunction);
                }
                Some(i)
            }
            // Any bundle: prefer one on the local node (no hop), else the first that fits.
            None => {
                let fits = |b: &&crate::view::BundleLocation| usable(b);
                let local_b = bundles.iter().position(|b| b.node == local && fits(&b));
                let any = bundles.iter().position(|b| fits(&b));
                match local_b.or(any) {
                    Some(i) => Some(i as u32),
                    None => return Decision::Infeasible(InfeasibleReason::BundleTooSmall),
                }
            }
        };
        match chosen {
            Some(i) => {
                let node = bundles[i as usize].node;
                // A bundle on a dead node is being rescheduled by the group's coordinator.
                if view.node(node).is_some_and(|n| !n.alive) {
                    Decision::Wait
                } else {
                    Decision::RunInBundle { node, index: i }
                }
            }
            None => Decision::Wait,
        }
    }

    fn decide_default<R: Rng + ?Sized>(
        &self,
        view: &ClusterView,
        local: NodeId,
        req: &TaskRequest,
        rng: &mut R,
        spread: bool,
    ) -> Decision {
        let local_node = view.node(local);
        let local_feasible = local_node.is_some_and(|n| self.is_feasible_on(n, req));
        // Past the hop limit a feasible node keeps the task, whatever the (stale) view says.
        if local_feasible && req.spill_count >= self.config.max_spill_hops {
            return Decision::RunLocal;
        }
        let locs = ArgLocs::new(
            view,
            req,
            if spread {
                u64::MAX
            } else {
                self.config.locality_min_bytes
            },
        );
        let local_room = local_feasible && local_node.is_some_and(|n| self.has_room(n, req));

        if local_room && !spread {
            if !locs.enabled() {
                return Decision::RunLocal;
            }
            // Large arguments: stay unless another free node holds clearly more of them.
            let here = locs.bytes_on(local);
            if here.saturating_mul(2) >= locs.total {
                return Decision::RunLocal;
            }
            let mut best: Option<(u64, NodeId)> = None;
            for id in locs.nodes() {
                if id == local {
                    continue;
                }
                let Some(n) = view.node(id) else { continue };
                if !self.is_feasible_on(n, req) || !self.has_room(n, req) {
                    continue;
                }
                let b = locs.bytes_on(id);
                if b > here && best.is_none_or(|(bb, _)| b > bb) {
                    best = Some((b, id));
                }
            }
            return match best {
                Some((_, id)) => Decision::Spill(id),
                None => Decision::RunLocal,
            };
        }

        // Look elsewhere: argument holders first, then a random sample.
        let nodes = view.nodes();
        let mut best: Option<(f64, NodeId)> = None;
        let consider = |n: &NodeInfo, best: &mut Option<(f64, NodeId)>| {
            if (spread || n.id != local) && self.is_feasible_on(n, req) && self.has_room(n, req) {
                let s = self.score(n, req, &locs);
                if best.is_none_or(|(bs, _)| s > bs) {
                    *best = Some((s, n.id));
                }
            }
        };
        if locs.enabled() {
            for id in locs.nodes() {
                if let Some(n) = view.node(id) {
                    consider(n, &mut best);
                }
            }
        }
        let sample = self.config.sample_size;
        let full_scan_needed = nodes.len() <= sample.saturating_mul(2);
        if !full_scan_needed && !nodes.is_empty() {
            for _ in 0..sample {
                let n = &nodes[rng.random_range(0..nodes.len())];
                consider(n, &mut best);
            }
        }
        if let Some((_, id)) = best {
            return place_on(local, id);
        }

        // Full scan: best-k with room, and the furthest hard stage reached for the reason. Without spread or large
        // arguments, the best node below the packing threshold wins outright, the first in view order on a tie.
        let pack = !spread && !locs.enabled() && self.config.pack_below > 0.0;
        let mut packed: Option<(f64, u32)> = None;
        let mut top = TopK::new(self.config.top_k);
        let mut furthest = Stage::Dead;
        for (i, n) in nodes.iter().enumerate() {
            let st = self.stage(n, req);
            furthest = furthest.max(st);
            if st == Stage::Feasible && (spread || n.id != local) && self.has_room(n, req) {
                let load = ResourceSet::load(&n.total, &n.available);
                let score = self.score(n, req, &locs);
                if pack && load < self.config.pack_below {
                    // As if empty: the load term is dropped, the function and queue terms stay.
                    let as_empty = score + load;
                    if packed.is_none_or(|(b, _)| as_empty > b) {
                        packed = Some((as_empty, i as u32));
                    }
                }
                top.offer(score, i as u32);
            }
        }
        if let Some((_, i)) = packed {
            return place_on(local, nodes[i as usize].id);
        }
        if let Some(i) = top.pick(rng) {
            return place_on(local, nodes[i as usize].id);
        }
        if furthest != Stage::Feasible {
            return match stage_result(furthest) {
                Err(r) => Decision::Infeasible(r),
                Ok(()) => Decision::Wait,
            };
        }
        // Feasible somewhere but nowhere has room: queue locally if the local queue is short,
        // otherwise hold the task at the submitter.
        if local_feasible && local_node.is_some_and(|n| n.queue_len < self.config.spill_queue_len) {
            Decision::RunLocal
        } else {
            Decision::Wait
        }
    }
}

fn place_on(local: NodeId, target: NodeId) -> Decision {
    if target == local {
        Decision::RunLocal
    } else {
        Decision::Spill(target)
    }
}

fn stage_result(s: Stage) -> Result<(), InfeasibleReason> {
    match s {
        Stage::Dead | Stage::NoResources => Err(InfeasibleReason::NoNodeHasResources),
        Stage::NoLabels => Err(InfeasibleReason::NoNodeMatchesLabels),
        Stage::NoFunction => Err(InfeasibleReason::NoNodeHasFunction),
        Stage::Feasible => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{LabelSelector, Labels};
    use crate::view::{BundleLocation, ViewDelta};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    const F: FunctionId = 42;

    fn n(i: u128) -> NodeId {
        NodeId(i)
    }

    fn view(nodes: &[(u128, u64)]) -> ClusterView {
        let mut v = ClusterView::new();
        v.apply(nodes.iter().map(|&(id, cpus)| {
            ViewDelta::NodeJoined(NodeInfo::new(n(id), ResourceSet::cpus(cpus)).with_functions([F]))
        }));
        v
    }

    fn busy(v: &mut ClusterView, id: u128, queue: u32) {
        let seq = v.node(n(id)).unwrap().report_seq + 1;
        v.apply([ViewDelta::Resources {
            node: n(id),
            seq,
            available: ResourceSet::new(),
            queue_len: queue,
        }]);
    }

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    #[test]
    fn light_work_packs_onto_the_first_node_then_spreads() {
        // A driver with no CPUs and three empty 4-CPU nodes: every seed picks the same node while it is light.
        let mut v = view(&[(1, 0), (2, 4), (3, 4), (4, 4)]);
        let req = TaskRequest::new(F, ResourceSet::cpus(1));
        let first = decide(&v, n(1), &req, &mut SmallRng::seed_from_u64(0));
        assert!(matches!(first, Decision::Spill(_)), "{first:?}");
        for seed in 1..50 {
            assert_eq!(
                decide(&v, n(1), &req, &mut SmallRng::seed_from_u64(seed)),
                first
            );
        }
        // Half full (2 of 4 CPUs taken): no longer counted as empty, so the work goes to another node.
        let Decision::Spill(target) = first else {
            unreachable!()
        };
        let seq = v.node(target).unwrap().report_seq + 1;
        v.apply([ViewDelta::Resources {
            node: target,
            seq,
            available: ResourceSet::cpus(2),
            queue_len: 0,
        }]);
        for seed in 0..50 {
            let d = decide(&v, n(1), &req, &mut SmallRng::seed_from_u64(seed));
            assert!(matches!(d, Decision::Spill(t) if t != target), "{d:?}");
        }
        // Packing off: the pick among equally empty nodes is random again.
        let random = Policy::new(PolicyConfig {
            pack_below: 0.0,
            ..PolicyConfig::default()
        });
        let v = view(&[(1, 0), (2, 4), (3, 4), (4, 4)]);
        let picked: std::collections::HashSet<_> = (0..50)
            .filter_map(|seed| {
                match random.decide(&v, n(1), &req, &mut SmallRng::seed_from_u64(seed)) {
                    Decision::Spill(t) => Some(t.0),
                    _ => None,
                }
            })
            .collect();
        assert!(picked.len() > 1, "{picked:?}");
    }

    #[test]
    fn local_first_then_spill_then_wait() {
        let mut v = view(&[(1, 4), (2, 4)]);
        let req = TaskRequest::new(F, ResourceSet::cpus(1));
        assert_eq!(decide(&v, n(1), &req, &mut rng()), Decision::RunLocal);
        busy(&mut v, 1, 100);
        assert_eq!(decide(&v, n(1), &req, &mut rng()), Decision::Spill(n(2)));
        busy(&mut v, 2, 100);
        assert_eq!(decide(&v, n(1), &req, &mut rng()), Decision::Wait);
        // Busy but with a short queue: queue locally.
        busy(&mut v, 1, 2);
        assert_eq!(decide(&v, n(1), &req, &mut rng()), Decision::RunLocal);
        // Too many hops: stay.
        busy(&mut v, 1, 100);
        let hopped = TaskRequest {
            spill_count: 3,
            ..req
        };
        assert_eq!(decide(&v, n(1), &hopped, &mut rng()), Decision::RunLocal);
    }

    #[test]
    fn infeasible_reasons() {
        let mut v = view(&[(1, 4)]);
        let big = TaskRequest::new(F, ResourceSet::cpus(8));
        assert_eq!(
            decide(&v, n(1), &big, &mut rng()),
            Decision::Infeasible(InfeasibleReason::NoNodeHasResources)
        );
        let other_fn = TaskRequest::new(7, ResourceSet::cpus(1));
        assert_eq!(
            decide(&v, n(1), &other_fn, &mut rng()),
            Decision::Infeasible(InfeasibleReason::NoNodeHasFunction)
        );
        let labelled = TaskRequest {
            label_selector: vec![LabelSelector::equals("zone", "b")],
            ..TaskRequest::new(F, ResourceSet::cpus(1))
        };
        assert_eq!(
            decide(&v, n(1), &labelled, &mut rng()),
            Decision::Infeasible(InfeasibleReason::NoNodeMatchesLabels)
        );
        v.apply([ViewDelta::NodeJoined(
            NodeInfo::new(n(2), ResourceSet::cpus(2))
                .with_labels(Labels::new().with("zone", "b"))
                .with_functions([F]),
        )]);
        assert_eq!(
            decide(&v, n(1), &labelled, &mut rng()),
            Decision::Spill(n(2))
        );
        assert!(Policy::default().check_feasible(&v, &labelled).is_ok());
    }

    #[test]
    fn locality_pulls_large_arguments() {
        let mut v = view(&[(1, 4), (2, 4), (3, 4)]);
        v.apply([
            ViewDelta::ObjectAdded {
                object: 10,
                size: 64 << 20,
                node: n(3),
            },
            ViewDelta::ObjectAdded {
                object: 11,
                size: 1024,
                node: n(1),
            },
        ]);
        let req = TaskRequest {
            args: vec![10.into(), 11.into()],
            ..TaskRequest::new(F, ResourceSet::cpus(1))
        };
        assert_eq!(decide(&v, n(1), &req, &mut rng()), Decision::Spill(n(3)));
        // Small args: stay local.
        let small = TaskRequest {
            args: vec![11.into()],
            ..req.clone()
        };
        assert_eq!(decide(&v, n(1), &small, &mut rng()), Decision::RunLocal);
        // Holder busy: stay local.
        busy(&mut v, 3, 50);
        assert_eq!(decide(&v, n(1), &req, &mut rng()), Decision::RunLocal);
    }

    #[test]
    fn locality_from_the_request_never_overrides_hard_constraints() {
        // Locations and sizes known only to the submitter (not in the view), as the SDK passes them.
        let mut v = view(&[(1, 4), (2, 4), (3, 1)]);
        let big = |nodes: Vec<NodeId>| TaskArg::new(10, 8 << 20, nodes);
        let req = TaskRequest {
            args: vec![big(vec![n(3)])],
            ..TaskRequest::new(F, ResourceSet::cpus(1))
        };
        // The local node lacks the big argument and the holder has room: locality beats local first.
        for seed in 0..20 {
            let mut r = SmallRng::seed_from_u64(seed);
            assert_eq!(decide(&v, n(1), &req, &mut r), Decision::Spill(n(3)));
        }
        // From a submitter outside the view (a driver with no CPUs) too.
        assert_eq!(decide(&v, n(99), &req, &mut rng()), Decision::Spill(n(3)));
        // The local node holds it as well: stay.
        let both = TaskRequest {
            args: vec![big(vec![n(1), n(3)])],
            ..req.clone()
        };
        assert_eq!(decide(&v, n(1), &both, &mut rng()), Decision::RunLocal);
        // Small arguments carry no weight.
        let small = TaskRequest {
            args: vec![TaskArg::new(10, 4096, vec![n(3)])],
            ..req.clone()
        };
        assert_eq!(decide(&v, n(1), &small, &mut rng()), Decision::RunLocal);
        // The holder cannot fit the task (1 CPU in total): it runs where it fits, never on the holder.
        let two = TaskRequest {
            resources: ResourceSet::cpus(2),
            ..req.clone()
        };
        for seed in 0..20 {
            let mut r = SmallRng::seed_from_u64(seed);
            assert_eq!(decide(&v, n(1), &two, &mut r), Decision::RunLocal);
            assert!(matches!(
                decide(&v, n(99), &two, &mut r),
                Decision::Spill(x) if x == n(1) || x == n(2)
            ));
        }
        // Hard affinity wins over locality.
        let pinned = TaskRequest {
            strategy: Strategy::NodeAffinity {
                node: n(2),
                soft: false,
            },
            ..req.clone()
        };
        assert_eq!(decide(&v, n(1), &pinned, &mut rng()), Decision::Spill(n(2)));
        // Labels are hard too: a holder without the label is never chosen.
        let labelled = TaskRequest {
            label_selector: vec![LabelSelector::equals("zone", "b")],
            ..req.clone()
        };
        assert!(matches!(
            decide(&v, n(1), &labelled, &mut rng()),
            Decision::Infeasible(InfeasibleReason::NoNodeMatchesLabels)
        ));
        // A dead holder is never chosen.
        v.apply([ViewDelta::NodeDied(n(3))]);
        for seed in 0..20 {
            let mut r = SmallRng::seed_from_u64(seed);
            assert_eq!(decide(&v, n(1), &req, &mut r), Decision::RunLocal);
            assert!(matches!(
                decide(&v, n(99), &req, &mut r),
                Decision::Spill(x) if x == n(1) || x == n(2)
            ));
        }
    }

    #[test]
    fn affinity_hard_and_soft() {
        let mut v = view(&[(1, 4), (2, 4)]);
        let hard = TaskRequest {
            strategy: Strategy::NodeAffinity {
                node: n(2),
                soft: false,
            },
            ..TaskRequest::new(F, ResourceSet::cpus(1))
        };
        assert_eq!(decide(&v, n(1), &hard, &mut rng()), Decision::Spill(n(2)));
        busy(&mut v, 2, 100);
        assert_eq!(decide(&v, n(1), &hard, &mut rng()), Decision::Spill(n(2)));
        let soft = TaskRequest {
            strategy: Strategy::NodeAffinity {
                node: n(2),
                soft: true,
            },
            ..hard.clone()
        };
        assert_eq!(decide(&v, n(1), &soft, &mut rng()), Decision::RunLocal);
        v.apply([ViewDelta::NodeDied(n(2))]);
        assert_eq!(
            decide(&v, n(1), &hard, &mut rng()),
            Decision::Infeasible(InfeasibleReason::AffinityNodeUnavailable(n(2)))
        );
    }

    #[test]
    fn spread_visits_every_node() {
        let v = view(&[(1, 4), (2, 4), (3, 4), (4, 4)]);
        let req = TaskRequest {
            strategy: Strategy::Spread,
            ..TaskRequest::new(F, ResourceSet::cpus(1))
        };
        let mut r = rng();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            match decide(&v, n(1), &req, &mut r) {
                Decision::RunLocal => seen.insert(n(1)),
                Decision::Spill(x) => seen.insert(x),
                d => panic!("unexpected {d:?}"),
            };
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn placement_group_targets() {
        let mut v = view(&[(1, 4), (2, 4)]);
        let pg = PlacementGroupId(5);
        let req = TaskRequest {
            strategy: Strategy::PlacementGroup { pg, bundle: None },
            ..TaskRequest::new(F, ResourceSet::cpus(1))
        };
        assert_eq!(
            decide(&v, n(1), &req, &mut rng()),
            Decision::Infeasible(InfeasibleReason::UnknownPlacementGroup(pg))
        );
        v.apply([ViewDelta::PlacementGroup {
            pg,
            state: PlacementGroupState::Pending,
        }]);
        assert_eq!(decide(&v, n(1), &req, &mut rng()), Decision::Wait);
        v.apply([ViewDelta::PlacementGroup {
            pg,
            state: PlacementGroupState::Created(vec![
                BundleLocation {
                    node: n(2),
                    resources: ResourceSet::cpus(2),
                },
                BundleLocation {
                    node: n(1),
                    resources: ResourceSet::cpus(1),
                },
            ]),
        }]);
        assert_eq!(
            decide(&v, n(1), &req, &mut rng()),
            Decision::RunInBundle {
                node: n(1),
                index: 1
            }
        );
        let two = TaskRequest {
            resources: ResourceSet::cpus(2),
            ..req.clone()
        };
        assert_eq!(
            decide(&v, n(1), &two, &mut rng()),
            Decision::RunInBundle {
                node: n(2),
                index: 0
            }
        );
        let three = TaskRequest {
            resources: ResourceSet::cpus(3),
            ..req.clone()
        };
        assert_eq!(
            decide(&v, n(1), &three, &mut rng()),
            Decision::Infeasible(InfeasibleReason::BundleTooSmall)
        );
        let oob = TaskRequest {
            strategy: Strategy::PlacementGroup {
                pg,
                bundle: Some(9),
            },
            ..req
        };
        assert!(matches!(
            decide(&v, n(1), &oob, &mut rng()),
            Decision::Infeasible(InfeasibleReason::BundleIndexOutOfRange {
                index: 9,
                bundles: 2
            })
        ));
    }

    #[test]
    fn sampling_at_scale_finds_the_rare_free_node() {
        let mut v = ClusterView::new();
        v.apply((0..1000u128).map(|i| {
            ViewDelta::NodeJoined(NodeInfo::new(n(i), ResourceSet::cpus(4)).with_functions([F]))
        }));
        for i in 0..1000u128 {
            if i != 777 {
                busy(&mut v, i, 100);
            }
        }
        let req = TaskRequest::new(F, ResourceSet::cpus(1));
        assert_eq!(decide(&v, n(0), &req, &mut rng()), Decision::Spill(n(777)));
    }

    #[test]
    fn function_table_as_a_soft_preference() {
        let mut v = ClusterView::new();
        v.apply([
            ViewDelta::NodeJoined(NodeInfo::new(n(1), ResourceSet::cpus(4))),
            ViewDelta::NodeJoined(NodeInfo::new(n(2), ResourceSet::cpus(4))),
            ViewDelta::NodeJoined(NodeInfo::new(n(3), ResourceSet::cpus(4)).with_functions([F])),
        ]);
        busy(&mut v, 1, 100);
        let req = TaskRequest::new(F, ResourceSet::cpus(1));
        let soft = Policy::new(PolicyConfig {
            require_function: false,
            top_k: 1,
            ..Default::default()
        });
        for seed in 0..10 {
            let mut r = SmallRng::seed_from_u64(seed);
            assert_eq!(soft.decide(&v, n(1), &req, &mut r), Decision::Spill(n(3)));
        }
        // Without the preference node 2 would do as well; with the hard rule it is excluded too.
        let other = TaskRequest::new(99, ResourceSet::cpus(1));
        assert!(matches!(
            soft.decide(&v, n(1), &other, &mut rng()),
            Decision::Spill(_)
        ));
        assert_eq!(
            Policy::default().decide(&v, n(1), &other, &mut rng()),
            Decision::Infeasible(InfeasibleReason::NoNodeHasFunction)
        );
    }
}
