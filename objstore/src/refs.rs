//! `RefTable`: the owner's bookkeeping of references to its objects and where their copies are.
//!
//! The node that submits a task owns its return objects. It counts local handles (`ObjectRef`s in its process),
//! in-flight tasks that take the object as an argument, and other nodes that borrowed the reference; it also knows
//! which nodes hold copies. When the last reference goes, the table answers with the action "free the copies at
//! these nodes"; when the last copy goes while references remain, "the object is lost" (the SDK then rebuilds it from
//! lineage or fails waiters with `ObjectLost`). It also tracks references this node *borrows* from other owners, so
//! that an owner's death fails them with `OwnerDied`.
//!
//! A sans-IO core: inputs are method calls, outputs are returned [`RefAction`]s; no clock, no network, no store.
//! Every input is total: unknown ids and repeated removals (which a peer may send) are ignored, never a panic.

use std::collections::{BTreeSet, HashMap};

use crate::{NodeId, ObjectId};

/// What the driver must do after an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefAction {
    /// No reference to an owned object is left: delete its copies on these nodes (sorted), then forget it.
    Free {
        /// The object.
        id: ObjectId,
        /// Nodes holding a copy.
        nodes: Vec<NodeId>,
    },
    /// An owned object still referenced has no copy left: rebuild it from lineage or fail it with `ObjectLost`.
    Lost {
        /// The object.
        id: ObjectId,
    },
    /// The owner of an object this node borrowed died: the object fails with `OwnerDied`.
    OwnerDied {
        /// The object.
        id: ObjectId,
    },
    /// This node no longer uses a borrowed object: tell its owner (so the owner can drop us as a borrower).
    ReleaseBorrow {
        /// The object.
        id: ObjectId,
        /// Its owner.
        owner: NodeId,
    },
}

/// References to one object this node owns.
#[derive(Debug, Default)]
struct Owned {
    local: u64,
    task_args: u64,
    borrowers: BTreeSet<NodeId>,
    locations: BTreeSet<NodeId>,
}

impl Owned {
    fn referenced(&self) -> bool {
        self.local > 0 || self.task_args > 0 || !self.borrowers.is_empty()
    }
}

/// A reference this node holds to an object owned elsewhere.
#[derive(Debug)]
struct Borrowed {
    owner: NodeId,
    local: u64,
    task_args: u64,
}

/// The owner's reference table. See the module docs.
#[derive(Debug, Default)]
pub struct RefTable {
    owned: HashMap<ObjectId, Owned>,
    borrowed: HashMap<ObjectId, Borrowed>,
    /// In-flight tasks and the objects they hold as arguments (owned or borrowed), released when they finish.
    tasks: HashMap<u128, Vec<ObjectId>>,
}

impl RefTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a new owned object with one local handle (the `ObjectRef` just created) and an optional first copy.
    /// Registering an id twice only adds a handle.
    pub fn add_owned(&mut self, id: ObjectId, location: Option<NodeId>) {
        let entry = self.owned.entry(id).or_default();
        entry.local += 1;
        entry.locations.extend(location);
    }

    /// Registers a handle to an object owned by `owner` (another node); repeated calls add handles.
    pub fn add_borrowed(&mut self, id: ObjectId, owner: NodeId) {
        if let Some(owned) = self.owned.get_mut(&id) {
            owned.local += 1;
            return;
        }
        self.borrowed
            .entry(id)
            .or_insert(Borrowed {
                owner,
                local: 0,
                task_args: 0,
            })
            .local += 1;
    }

    /// One more local handle (a clone of an `ObjectRef`), owned or borrowed. Unknown ids are ignored.
    pub fn add_local_ref(&mut self, id: ObjectId) {
        if let Some(o) = self.owned.get_mut(&id) {
            o.local += 1;
        } else if let Some(b) = self.borrowed.get_mut(&id) {
            b.local += 1;
        }
    }

    /// One local handle dropped.
    pub fn remove_local_ref(&mut self, id: ObjectId) -> Vec<RefAction> {
        if let Some(o) = self.owned.get_mut(&id) {
            o.local = o.local.saturating_sub(1);
        } else if let Some(b) = self.borrowed.get_mut(&id) {
            b.local = b.local.saturating_sub(1);
        }
        self.settle(id)
    }

    /// A task was submitted with these objects as arguments: they stay referenced until [`RefTable::task_finished`].
    /// Unknown ids are skipped; a task id already in flight is ignored (submission is idempotent).
    pub fn task_submitted(&mut self, task: u128, args: &[ObjectId]) {
        if self.tasks.contains_key(&task) {
            return;
        }
        let mut held = Vec::with_capacity(args.len());
        for &id in args {
            if let Some(o) = self.owned.get_mut(&id) {
                o.task_args += 1;
                held.push(id);
            } else if let Some(b) = self.borrowed.get_mut(&id) {
                b.task_args += 1;
                held.push(id);
            }
        }
        self.tasks.insert(task, held);
    }

    /// The task finished (succeeded, failed for good, or was cancelled): its argument references are released.
    pub fn task_finished(&mut self, task: u128) -> Vec<RefAction> {
        let Some(args) = self.tasks.remove(&task) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        for id in args {
            if let Some(o) = self.owned.get_mut(&id) {
                o.task_args = o.task_args.saturating_sub(1);
            } else if let Some(b) = self.borrowed.get_mut(&id) {
                b.task_args = b.task_args.saturating_sub(1);
            }
            actions.extend(self.settle(id));
        }
        actions
    }

    /// `node` now borrows the owned object `id` (a reference was passed to it).
    pub fn add_borrower(&mut self, id: ObjectId, node: NodeId) {
        if let Some(o) = self.owned.get_mut(&id) {
            o.borrowers.insert(node);
        }
    }

    /// `node` released its borrowed reference to `id`.
    pub fn remove_borrower(&mut self, id: ObjectId, node: NodeId) -> Vec<RefAction> {
        if let Some(o) = self.owned.get_mut(&id) {
            o.borrowers.remove(&node);
        }
        self.settle(id)
    }

    /// A copy of the owned object `id` now lives on `node`.
    pub fn add_location(&mut self, id: ObjectId, node: NodeId) {
        if let Some(o) = self.owned.get_mut(&id) {
            o.locations.insert(node);
        }
    }

    /// The copy on `node` is gone (evicted or freed there). If it was the last copy of a referenced object, the
    /// object is lost.
    pub fn remove_location(&mut self, id: ObjectId, node: NodeId) -> Vec<RefAction> {
        let Some(o) = self.owned.get_mut(&id) else {
            return Vec::new();
        };
        if o.locations.remove(&node) && o.locations.is_empty() && o.referenced() {
            return vec![RefAction::Lost { id }];
        }
        Vec::new()
    }

    /// `node` died: it no longer borrows or holds anything, and objects it owned (that we borrowed) fail.
    /// Actions come in object-id order, so the output is deterministic.
    pub fn node_died(&mut self, node: NodeId) -> Vec<RefAction> {
        let mut ids: Vec<ObjectId> = self.owned.keys().copied().collect();
        ids.sort();
        let mut actions = Vec::new();
        for id in ids {
            let Some(o) = self.owned.get_mut(&id) else {
                continue;
            };
            o.borrowers.remove(&node);
            let had_copy = o.locations.remove(&node);
            if !o.referenced() {
                actions.extend(self.settle(id));
            } else if had_copy && o.locations.is_empty() {
                actions.push(RefAction::Lost { id });
            }
        }
        let mut orphaned: Vec<ObjectId> = self
            .borrowed
            .iter()
            .filter(|(_, b)| b.owner == node)
            .map(|(id, _)| *id)
            .collect();
        orphaned.sort();
        for id in orphaned {
            self.borrowed.remove(&id);
            actions.push(RefAction::OwnerDied { id });
        }
        actions
    }

    /// Nodes holding a copy of the owned object `id` (sorted), or `None` if this node does not own it.
    pub fn locations(&self, id: ObjectId) -> Option<Vec<NodeId>> {
        self.owned
            .get(&id)
            .map(|o| o.locations.iter().copied().collect())
    }

    /// Whether this node owns `id` and still tracks it.
    pub fn owns(&self, id: ObjectId) -> bool {
        self.owned.contains_key(&id)
    }

    /// Whether this node holds a borrowed reference to `id`.
    pub fn borrows(&self, id: ObjectId) -> bool {
        self.borrowed.contains_key(&id)
    }

    /// Number of owned objects tracked.
    pub fn owned_count(&self) -> usize {
        self.owned.len()
    }

    /// Emits `Free` / `ReleaseBorrow` if `id` lost its last reference.
    fn settle(&mut self, id: ObjectId) -> Vec<RefAction> {
        if let Some(o) = self.owned.get(&id) {
            if o.referenced() {
                return Vec::new();
            }
            let nodes = o.locations.iter().copied().collect();
            self.owned.remove(&id);
            return vec![RefAction::Free { id, nodes }];
        }
        if let Some(b) = self.borrowed.get(&id)
            && b.local == 0
            && b.task_args == 0
        {
            let owner = b.owner;
            self.borrowed.remove(&id);
            return vec![RefAction::ReleaseBorrow { id, owner }];
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);

    #[test]
    fn last_reference_frees_every_copy() {
        let mut t = RefTable::new();
        let id = ObjectId(10);
        t.add_owned(id, Some(A));
        t.add_location(id, B);
        t.add_local_ref(id);
        t.task_submitted(1, &[id]);
        t.add_borrower(id, C);
        assert!(t.remove_local_ref(id).is_empty());
        assert!(t.remove_local_ref(id).is_empty());
        assert!(t.task_finished(1).is_empty());
        assert!(t.task_finished(1).is_empty(), "finishing twice is ignored");
        assert_eq!(
            t.remove_borrower(id, C),
            vec![RefAction::Free {
                id,
                nodes: vec![A, B]
            }]
        );
        assert!(!t.owns(id));
        assert!(
            t.remove_borrower(id, C).is_empty(),
            "late duplicates are ignored"
        );
    }

    #[test]
    fn losing_the_last_copy_of_a_referenced_object() {
        let mut t = RefTable::new();
        let id = ObjectId(11);
        t.add_owned(id, Some(B));
        assert_eq!(t.remove_location(id, B), vec![RefAction::Lost { id }]);
        let id2 = ObjectId(12);
        t.add_owned(id2, Some(B));
        t.add_location(id2, C);
        t.add_borrower(id2, C);
        // B dies: id2 still has a copy on C; nothing for id (already had no copy).
        assert!(t.node_died(B).is_empty());
        // C dies: id2 loses its last copy and its borrower, but the local handle keeps it referenced.
        assert_eq!(t.node_died(C), vec![RefAction::Lost { id: id2 }]);
        assert_eq!(
            t.remove_local_ref(id2),
            vec![RefAction::Free {
                id: id2,
                nodes: vec![]
            }]
        );
    }

    #[test]
    fn borrowed_objects_fail_when_their_owner_dies() {
        let mut t = RefTable::new();
        let (x, y) = (ObjectId(20), ObjectId(21));
        t.add_borrowed(x, B);
        t.add_borrowed(y, C);
        t.task_submitted(5, &[y]);
        assert_eq!(t.node_died(B), vec![RefAction::OwnerDied { id: x }]);
        assert!(!t.borrows(x));
        assert!(t.remove_local_ref(y).is_empty(), "the task still holds y");
        assert_eq!(
            t.task_finished(5),
            vec![RefAction::ReleaseBorrow { id: y, owner: C }]
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        AddLocal(u8),
        RemoveLocal(u8),
        Submit(u8, Vec<u8>),
        Finish(u8),
        AddBorrower(u8, u8),
        RemoveBorrower(u8, u8),
        AddLocation(u8, u8),
        NodeDied(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4).prop_map(Op::AddLocal),
            (0u8..4).prop_map(Op::RemoveLocal),
            (0u8..4, proptest::collection::vec(0u8..4, 0..3)).prop_map(|(t, a)| Op::Submit(t, a)),
            (0u8..4).prop_map(Op::Finish),
            (0u8..4, 1u8..4).prop_map(|(o, n)| Op::AddBorrower(o, n)),
            (0u8..4, 1u8..4).prop_map(|(o, n)| Op::RemoveBorrower(o, n)),
            (0u8..4, 1u8..4).prop_map(|(o, n)| Op::AddLocation(o, n)),
            (1u8..4).prop_map(Op::NodeDied),
        ]
    }

    proptest! {
        /// Against a simple model: `Free` comes exactly when the model's count of references reaches zero, once,
        /// with exactly the model's copy locations; no other action names a freed object.
        #[test]
        fn free_exactly_when_unreferenced(ops in proptest::collection::vec(op(), 0..60)) {
            #[derive(Default, Clone)]
            struct M { local: u64, args: u64, borrowers: BTreeSet<u8>, locs: BTreeSet<u8>, freed: bool }
            let mut t = RefTable::new();
            let mut model: Vec<M> = (0..4).map(|_| M { local: 1, locs: [0u8].into(), ..M::default() }).collect();
            let mut tasks: HashMap<u8, Vec<u8>> = HashMap::new();
            for o in 0..4u8 {
                t.add_owned(ObjectId(u128::from(o)), Some(NodeId(0)));
            }
            let mut frees: Vec<(u8, Vec<NodeId>)> = Vec::new();
            for op in ops {
                let actions = match op.clone() {
                    Op::AddLocal(o) => { t.add_local_ref(ObjectId(o.into())); if !model[o as usize].freed { model[o as usize].local += 1; } vec![] }
                    Op::RemoveLocal(o) => { let m = &mut model[o as usize]; m.local = m.local.saturating_sub(1); t.remove_local_ref(ObjectId(o.into())) }
                    Op::Submit(task, args) => {
                        if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(task) {
                            let held: Vec<u8> = args.iter().copied().filter(|&a| !model[a as usize].freed).collect();
                            for &a in &held { model[a as usize].args += 1; }
                            slot.insert(held);
                        }
                        t.task_submitted(task.into(), &args.iter().map(|&a| ObjectId(a.into())).collect::<Vec<_>>());
                        vec![]
                    }
                    Op::Finish(task) => {
                        for a in tasks.remove(&task).unwrap_or_default() { model[a as usize].args -= 1; }
                        t.task_finished(task.into())
                    }
                    Op::AddBorrower(o, n) => { if !model[o as usize].freed { model[o as usize].borrowers.insert(n); } t.add_borrower(ObjectId(o.into()), NodeId(n.into())); vec![] }
                    Op::RemoveBorrower(o, n) => { model[o as usize].borrowers.remove(&n); t.remove_borrower(ObjectId(o.into()), NodeId(n.into())) }
                    Op::AddLocation(o, n) => { if !model[o as usize].freed { model[o as usize].locs.insert(n); } t.add_location(ObjectId(o.into()), NodeId(n.into())); vec![] }
                    Op::NodeDied(n) => { for m in model.iter_mut() { m.borrowers.remove(&n); m.locs.remove(&n); } t.node_died(NodeId(n.into())) }
                };
                for a in actions {
                    match a {
                        RefAction::Free { id, nodes } => frees.push((id.0 as u8, nodes)),
                        RefAction::Lost { id } => prop_assert!(!model[id.0 as usize].freed),
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                for (i, m) in model.iter_mut().enumerate() {
                    let unreferenced = m.local == 0 && m.args == 0 && m.borrowers.is_empty();
                    let freed_now: Vec<&(u8, Vec<NodeId>)> = frees.iter().filter(|f| f.0 as usize == i).collect();
                    if m.freed {
                        prop_assert!(freed_now.is_empty(), "object {} freed twice", i);
                    } else if unreferenced {
                        prop_assert_eq!(freed_now.len(), 1, "object {} must be freed once, after {:?}", i, op);
                        let expect: Vec<NodeId> = m.locs.iter().map(|&n| NodeId(n.into())).collect();
                        prop_assert_eq!(&freed_now[0].1, &expect);
                        m.freed = true;
                    } else {
                        prop_assert!(freed_now.is_empty(), "object {} freed while referenced", i);
                    }
                    prop_assert_eq!(t.owns(ObjectId(i as u128)), !m.freed);
                }
                frees.clear();
            }
        }
    }
}
