//! Read-only snapshots of what a node holds, for `oxray status` and `oxray list`.
//!
//! Plain serde types: they are printed as tables for people and as JSON for scripts, and travel between nodes as
//! JSON (small, rare, and readable in a packet dump).

use serde::{Deserialize, Serialize};

use crate::runtime::{Runtime, short};

/// One node's load and holdings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeSummary {
    /// The node id (short hex).
    pub id: String,
    /// The node's mesh address, if it has one.
    pub address: Option<String>,
    /// CPU slots.
    pub cpus: usize,
    /// Tasks waiting for a slot.
    pub queued: usize,
    /// Tasks running.
    pub running: usize,
    /// Actors hosted.
    pub actors: usize,
    /// Objects owned.
    pub objects: usize,
    /// Bytes of owned objects that are ready.
    pub object_bytes: usize,
    /// Functions and actor classes compiled into this node.
    pub functions: usize,
    /// Tasks submitted here that no node can take yet.
    #[serde(default)]
    pub infeasible: usize,
    /// The node's object store.
    #[serde(default)]
    pub store: StoreSummary,
    /// Objects pulled into this node's store from other nodes.
    #[serde(default)]
    pub transfer: TransferSummary,
}

/// What a node's transfer driver has pulled from other nodes since it started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TransferSummary {
    /// Objects pulled into this node's store.
    pub pulled: u64,
    /// Bytes of those objects.
    pub pulled_bytes: u64,
    /// Pulls that failed for good (no copy left, or no room).
    pub failed: u64,
    /// Copies asked, one per source tried: above `pulled + failed` when a pull moved on from a copy that failed.
    pub fetches: u64,
    /// Pulls in progress.
    pub active: u64,
}

/// A node's object store: what it holds against its limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreSummary {
    /// Objects in the store (in memory or spilled).
    pub objects: usize,
    /// Bytes of object data in memory.
    pub used: usize,
    /// Bytes of free buffers kept warm for the next large puts (inside the limit).
    pub pooled: usize,
    /// The memory limit.
    pub limit: usize,
    /// Objects spilled to disk and not in memory.
    pub spilled: usize,
    /// Objects pinned by a reader right now.
    pub pinned: usize,
}

/// One actor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActorSummary {
    /// The actor id (short hex).
    pub id: String,
    /// The class name.
    pub class: String,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// The node hosting it.
    pub node: String,
    /// ALIVE or DEAD.
    pub state: String,
    /// Calls it has finished.
    pub calls: u64,
}

/// One task that has not finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskSummary {
    /// The task id (short hex).
    pub id: String,
    /// Its name (the function's, unless named in the options).
    pub name: String,
    /// PENDING or RUNNING.
    pub state: String,
    /// The node that owns it.
    pub owner: String,
}

/// One owned object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjectSummary {
    /// The object id.
    pub id: String,
    /// Whether its value (or error) is known.
    pub ready: bool,
    /// Its size in bytes, once ready.
    pub size: usize,
    /// The owning node.
    pub owner: String,
    /// `inline` (in the owner's table), `store` (in its object store's memory) or `spilled` (on its disk).
    #[serde(default)]
    pub location: String,
}

/// One placement-group bundle held on a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BundleSummary {
    /// The group (short hex).
    pub group: String,
    /// The bundle's index in the group.
    pub index: u32,
    /// CPUs it holds.
    pub cpus: f64,
    /// The node holding it.
    pub node: String,
}

/// Everything one node reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeState {
    /// Load and counts.
    pub node: NodeSummary,
    /// Actors hosted here.
    pub actors: Vec<ActorSummary>,
    /// Tasks owned here that have not finished.
    pub tasks: Vec<TaskSummary>,
    /// Objects owned here.
    pub objects: Vec<ObjectSummary>,
    /// Placement-group bundles held here.
    #[serde(default)]
    pub bundles: Vec<BundleSummary>,
}

pub(crate) fn snapshot(rt: &Runtime, address: Option<String>) -> NodeState {
    let load = rt.local.load();
    let (queued, running) = (load.queued, load.running);
    let node = short(rt.node);
    let store = rt.objects.store();
    let on_disk: std::collections::HashSet<_> = store
        .objects()
        .into_iter()
        .filter(|o| !o.resident && o.spilled)
        .map(|o| o.id)
        .collect();
    let objects: Vec<ObjectSummary> = rt
        .objects
        .ids()
        .into_iter()
        .map(|(id, ready, size, stored)| ObjectSummary {
            id: id.to_string(),
            ready,
            size,
            owner: node.clone(),
            location: match (stored, on_disk.contains(&id)) {
                (false, _) => "inline",
                (true, false) => "store",
                (true, true) => "spilled",
            }
            .to_string(),
        })
        .collect();
    let stats = store.stats();
    let transfer = rt
        .cluster
        .get()
        .map(|c| c.transfer.stats())
        .unwrap_or_default();
    let actors: Vec<ActorSummary> = rt
        .actors
        .iter()
        .map(|a| ActorSummary {
            id: short(a.id),
            class: a.class.name.to_string(),
            name: a.name.clone(),
            node: node.clone(),
            state: if a.is_alive() {
                "ALIVE".into()
            } else {
                "DEAD".into()
            },
            calls: a.calls.load(std::sync::atomic::Ordering::Relaxed),
        })
        .collect();
    let tasks: Vec<TaskSummary> = rt
        .tasks
        .iter()
        .map(|t| TaskSummary {
            id: short(*t.key()),
            name: t.name.clone(),
            state: t.state.to_string(),
            owner: node.clone(),
        })
        .collect();
    let bundles = rt
        .bundles
        .iter()
        .map(|b| BundleSummary {
            group: format!("{:012x}", b.key().0 >> 80),
            index: b.key().1,
            cpus: *b.value() as f64 / 1000.0,
            node: node.clone(),
        })
        .collect();
    NodeState {
        bundles,
        node: NodeSummary {
            id: node.clone(),
            address,
            cpus: rt.local.total().cpu().as_f64().ceil() as usize,
            queued,
            running,
            actors: actors.len(),
            objects: rt.objects.len(),
            object_bytes: objects.iter().map(|o| o.size).sum(),
            functions: crate::registry::table().len(),
            infeasible: 0,
            store: StoreSummary {
                objects: stats.objects,
                used: stats.used,
                pooled: stats.pooled,
                limit: stats.limit,
                spilled: stats.spilled,
                pinned: stats.pinned,
            },
            transfer: TransferSummary {
                pulled: transfer.pulled,
                pulled_bytes: transfer.pulled_bytes,
                failed: transfer.failed,
                fetches: transfer.fetches,
                active: transfer.active,
            },
        },
        actors,
        tasks,
        objects,
    }
}
