//! The cluster view: what one node believes about every node, object location and placement group.
//!
//! A [`ClusterView`] is a plain data structure updated by batches of [`ViewDelta`]s that the
//! runtime receives (from the GCS pub/sub or from peers' resource reports). It is deliberately
//! *not* authoritative and may be stale: the policy only uses it to guess well, and the node
//! that receives a spilled task re-checks with its own exact [`crate::LocalQueue`].
//! It performs no I/O and reads no clock.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use oxray_transport::NodeId;

use crate::resources::{Labels, ResourceSet};

/// A registered function or actor type: the stable hash of its name and signature.
pub type FunctionId = u64;

/// An object's id (the object store's 128-bit id).
pub type ObjectId = u128;

/// The identity of one task.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u128);

/// The identity of one placement group.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlacementGroupId(pub u128);

/// Most locations remembered per object. Further copies are ignored for scheduling
/// (a handful of copies is all locality scoring needs) so one hot object cannot grow without bound.
pub const MAX_LOCATIONS_PER_OBJECT: usize = 8;

/// Most functions remembered per node; further announcements are ignored (a peer cannot grow
/// the table without bound).
pub const MAX_FUNCTIONS_PER_NODE: usize = 65_536;

/// Most objects whose locations are tracked. Locality is only a hint, so objects beyond this
/// are simply not considered for it.
pub const MAX_TRACKED_OBJECTS: usize = 1_000_000;

/// Hasher for ids that are already uniformly distributed (function hashes, random node and
/// object ids): SipHash would cost more than the lookup it protects, and these keys are not
/// attacker-chosen in a way that matters for a per-node table.
#[derive(Default, Clone, Copy, Debug)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
        self.0 = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64 ^ (n >> 64) as u64);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

/// `BuildHasher` for [`IdHasher`].
pub type IdBuild = BuildHasherDefault<IdHasher>;

/// What the view knows about one node.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The node.
    pub id: NodeId,
    /// Everything the node offers.
    pub total: ResourceSet,
    /// What is free, as last reported.
    pub available: ResourceSet,
    /// The node's labels.
    pub labels: Labels,
    /// Ready tasks waiting in the node's local queue, as last reported.
    pub queue_len: u32,
    /// `false` once the node is declared dead; dead nodes are never chosen.
    pub alive: bool,
    /// Functions and actor types compiled into the node's binary.
    pub functions: HashSet<FunctionId, IdBuild>,
    /// Sequence number of the last applied resource report (older reports are ignored).
    pub report_seq: u64,
}

impl NodeInfo {
    /// A fresh, idle, alive node offering `total`, with no labels and no functions.
    pub fn new(id: NodeId, total: ResourceSet) -> Self {
        NodeInfo {
            id,
            available: total.clone(),
            total,
            labels: Labels::new(),
            queue_len: 0,
            alive: true,
            functions: HashSet::default(),
            report_seq: 0,
        }
    }

    /// Builder: sets the labels.
    pub fn with_labels(mut self, labels: Labels) -> Self {
        self.labels = labels;
        self
    }

    /// Builder: adds functions to the node's function table.
    pub fn with_functions(mut self, f: impl IntoIterator<Item = FunctionId>) -> Self {
        self.functions.extend(f);
        self
    }
}

/// Where copies of one object live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// Nodes holding a copy (at most [`MAX_LOCATIONS_PER_OBJECT`]).
    pub nodes: Vec<NodeId>,
}

/// Where one bundle of a created placement group lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleLocation {
    /// Hosting node.
    pub node: NodeId,
    /// The bundle's resources.
    pub resources: ResourceSet,
}

/// The view's knowledge of one placement group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlacementGroupState {
    /// Known but not yet reserved: tasks for it wait.
    Pending,
    /// Reserved; one entry per bundle index.
    Created(Vec<BundleLocation>),
    /// Removed: tasks for it are infeasible.
    Removed,
}

/// One change to the view. Batches of these are applied with [`ClusterView::apply`].
#[derive(Clone, Debug)]
pub enum ViewDelta {
    /// A node joined (or re-announced itself: its entry is replaced).
    NodeJoined(NodeInfo),
    /// A node's periodic resource report. Applied only if `seq` is newer than the last applied.
    Resources {
        /// Reporting node.
        node: NodeId,
        /// Report sequence number, increasing per node.
        seq: u64,
        /// Free resources.
        available: ResourceSet,
        /// Ready tasks waiting in its queue.
        queue_len: u32,
    },
    /// A node added functions to its table.
    FunctionsAdded {
        /// The node.
        node: NodeId,
        /// New function ids.
        functions: Vec<FunctionId>,
    },
    /// A node's labels changed.
    LabelsChanged {
        /// The node.
        node: NodeId,
        /// The new full label set.
        labels: Labels,
    },
    /// A node was declared dead. Its entry stays (marked dead) until [`ViewDelta::NodeRemoved`].
    NodeDied(NodeId),
    /// Forget a node entirely.
    NodeRemoved(NodeId),
    /// A copy of an object now lives on `node`.
    ObjectAdded {
        /// Object.
        object: ObjectId,
        /// Size in bytes.
        size: u64,
        /// Node holding the copy.
        node: NodeId,
    },
    /// The copy on `node` is gone.
    ObjectRemoved {
        /// Object.
        object: ObjectId,
        /// Node that dropped it.
        node: NodeId,
    },
    /// The object is freed everywhere.
    ObjectFreed(ObjectId),
    /// A placement group's state changed.
    PlacementGroup {
        /// Group.
        pg: PlacementGroupId,
        /// New state.
        state: PlacementGroupState,
    },
}

/// What a batch changed that the runtime may need to react to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewChanges {
    /// Nodes that joined (infeasible tasks should be re-examined against them).
    pub joined: Vec<NodeId>,
    /// Nodes newly marked dead.
    pub died: Vec<NodeId>,
    /// Placement groups that became created.
    pub groups_created: Vec<PlacementGroupId>,
}

/// One node's picture of the cluster. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Dense storage so the policy can sample by index without hashing.
    nodes: Vec<NodeInfo>,
    /// Node id → index into `nodes`.
    index: HashMap<NodeId, u32, IdBuild>,
    objects: HashMap<ObjectId, ObjectInfo, IdBuild>,
    groups: HashMap<PlacementGroupId, PlacementGroupState, IdBuild>,
}

impl ClusterView {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a batch of deltas in order and reports what changed.
    ///
    /// Deltas about unknown nodes are ignored (they may race with a removal), never an error.
    pub fn apply(&mut self, batch: impl IntoIterator<Item = ViewDelta>) -> ViewChanges {
        let mut changes = ViewChanges::default();
        for d in batch {
            self.apply_one(d, &mut changes);
        }
        changes
    }

    fn apply_one(&mut self, d: ViewDelta, changes: &mut ViewChanges) {
        match d {
            ViewDelta::NodeJoined(mut info) => {
                let id = info.id;
                if info.functions.len() > MAX_FUNCTIONS_PER_NODE {
                    let keep: HashSet<FunctionId, IdBuild> = info
                        .functions
                        .iter()
                        .copied()
                        .take(MAX_FUNCTIONS_PER_NODE)
                        .collect();
                    info.functions = keep;
                }
                match self.index.get(&id) {
                    Some(&i) => self.nodes[i as usize] = info,
                    None => {
                        self.index.insert(id, self.nodes.len() as u32);
                        self.nodes.push(info);
                    }
                }
                changes.joined.push(id);
            }
            ViewDelta::Resources {
                node,
                seq,
                available,
                queue_len,
            } => {
                if let Some(n) = self.node_mut(node)
                    && n.alive
                    && seq > n.report_seq
                {
                    n.report_seq = seq;
                    n.available = available;
                    n.queue_len = queue_len;
                }
            }
            ViewDelta::FunctionsAdded { node, functions } => {
                if let Some(n) = self.node_mut(node) {
                    let room = MAX_FUNCTIONS_PER_NODE.saturating_sub(n.functions.len());
                    n.functions.extend(functions.into_iter().take(room));
                }
            }
            ViewDelta::LabelsChanged { node, labels } => {
                if let Some(n) = self.node_mut(node) {
                    n.labels = labels;
                }
            }
            ViewDelta::NodeDied(node) => {
                if let Some(n) = self.node_mut(node)
                    && n.alive
                {
                    n.alive = false;
                    n.available = ResourceSet::new();
                    changes.died.push(node);
                }
            }
            ViewDelta::NodeRemoved(node) => {
                if let Some(i) = self.index.remove(&node) {
                    let i = i as usize;
                    self.nodes.swap_remove(i);
                    if let Some(moved) = self.nodes.get(i) {
                        self.index.insert(moved.id, i as u32);
                    }
                }
            }
            ViewDelta::ObjectAdded { object, size, node } => {
                if self.objects.len() >= MAX_TRACKED_OBJECTS && !self.objects.contains_key(&object)
                {
                    return;
                }
                let e = self.objects.entry(object).or_insert_with(|| ObjectInfo {
                    size,
                    nodes: Vec::new(),
                });
                e.size = size;
                if !e.nodes.contains(&node) && e.nodes.len() < MAX_LOCATIONS_PER_OBJECT {
                    e.nodes.push(node);
                }
            }
            ViewDelta::ObjectRemoved { object, node } => {
                if let Some(e) = self.objects.get_mut(&object) {
                    e.nodes.retain(|n| *n != node);
                    if e.nodes.is_empty() {
                        self.objects.remove(&object);
                    }
                }
            }
            ViewDelta::ObjectFreed(object) => {
                self.objects.remove(&object);
            }
            ViewDelta::PlacementGroup { pg, state } => {
                if matches!(state, PlacementGroupState::Created(_)) {
                    changes.groups_created.push(pg);
                }
                self.groups.insert(pg, state);
            }
        }
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut NodeInfo> {
        let i = *self.index.get(&id)?;
        self.nodes.get_mut(i as usize)
    }

    /// The entry for `id`, if known.
    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        let i = *self.index.get(&id)?;
        self.nodes.get(i as usize)
    }

    /// Dense index of `id` (stable until a [`ViewDelta::NodeRemoved`]).
    pub fn node_index(&self, id: NodeId) -> Option<usize> {
        self.index.get(&id).map(|&i| i as usize)
    }

    /// All known nodes, alive or dead, in index order.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Number of alive nodes.
    pub fn alive_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.alive).count()
    }

    /// Location info of `object`, if any copy is known.
    pub fn object(&self, object: ObjectId) -> Option<&ObjectInfo> {
        self.objects.get(&object)
    }

    /// Number of objects with known locations.
    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    /// State of a placement group, if known.
    pub fn placement_group(&self, pg: PlacementGroupId) -> Option<&PlacementGroupState> {
        self.groups.get(&pg)
    }

    /// Direct mutable access to a node's report, for a runtime that tracks its *own* node exactly
    /// (it knows its own availability without waiting for a report round trip).
    pub fn update_local(&mut self, node: NodeId, available: &ResourceSet, queue_len: u32) {
        if let Some(n) = self.node_mut(node) {
            n.available.clone_from(available);
            n.queue_len = queue_len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u128) -> NodeId {
        NodeId(i)
    }

    #[test]
    fn stale_reports_are_ignored_and_removal_keeps_index_consistent() {
        let mut v = ClusterView::new();
        let ch = v.apply([
            ViewDelta::NodeJoined(NodeInfo::new(n(1), ResourceSet::cpus(4))),
            ViewDelta::NodeJoined(NodeInfo::new(n(2), ResourceSet::cpus(8))),
            ViewDelta::NodeJoined(NodeInfo::new(n(3), ResourceSet::cpus(2))),
        ]);
        assert_eq!(ch.joined, vec![n(1), n(2), n(3)]);
        v.apply([
            ViewDelta::Resources {
                node: n(2),
                seq: 5,
                available: ResourceSet::cpus(1),
                queue_len: 3,
            },
            ViewDelta::Resources {
                node: n(2),
                seq: 4,
                available: ResourceSet::cpus(8),
                queue_len: 0,
            },
        ]);
        assert_eq!(v.node(n(2)).unwrap().available, ResourceSet::cpus(1));
        assert_eq!(v.node(n(2)).unwrap().queue_len, 3);
        v.apply([ViewDelta::NodeRemoved(n(1))]);
        assert!(v.node(n(1)).is_none());
        assert_eq!(v.node(n(3)).unwrap().total, ResourceSet::cpus(2));
        assert_eq!(v.node(n(2)).unwrap().total, ResourceSet::cpus(8));
        let ch = v.apply([ViewDelta::NodeDied(n(3)), ViewDelta::NodeDied(n(3))]);
        assert_eq!(ch.died, vec![n(3)]);
        assert!(!v.node(n(3)).unwrap().alive);
        // Unknown node: ignored.
        v.apply([ViewDelta::Resources {
            node: n(9),
            seq: 1,
            available: ResourceSet::cpus(1),
            queue_len: 0,
        }]);
    }

    #[test]
    fn object_locations_are_bounded() {
        let mut v = ClusterView::new();
        for i in 0..20 {
            v.apply([ViewDelta::ObjectAdded {
                object: 7,
                size: 100,
                node: n(i),
            }]);
        }
        assert_eq!(v.object(7).unwrap().nodes.len(), MAX_LOCATIONS_PER_OBJECT);
        for i in 0..20 {
            v.apply([ViewDelta::ObjectRemoved {
                object: 7,
                node: n(i),
            }]);
        }
        assert!(v.object(7).is_none());
    }
}
