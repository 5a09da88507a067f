//! What nodes say to each other: message kinds and their bodies.
//!
//! The hot path (task submission, actor calls, object fetches, results) is rkyv, read in place on arrival; results
//! travel as the raw archive of the value, so the caller's `ObjectRef` adopts the received buffer without a copy.
//! Control messages (membership, status, names) are JSON: small, rare, and readable when debugging.

use serde::{Deserialize, Serialize};

/// Message kinds on the mesh.
pub(crate) mod kind {
    /// Reply: the body is the result.
    pub const OK: u16 = 1;
    /// Reply: the body is a JSON `Error`.
    pub const ERR: u16 = 2;
    /// A task (`TaskW`), as an item of a `CALLS` batch.
    pub const SUBMIT: u16 = 10;
    /// Create an actor here (`CreateW`).
    pub const CREATE_ACTOR: u16 = 11;
    /// An actor call (`CallW`), as an item of a `CALLS` batch.
    pub const ACTOR_CALL: u16 = 12;
    /// Send me the value of an object you own (body: the id as 16 little-endian bytes). Answered with `OK` (the
    /// value, if small), `LOCATED` (where to pull a large one from) or `ERR`.
    pub const FETCH: u16 = 13;
    /// Kill an actor hosted here (one-way; body: the id).
    pub const KILL_ACTOR: u16 = 14;
    /// Report this node's state (`NodeState` JSON).
    pub const NODE_STATE: u16 = 15;
    /// To the head: a node joins (`Member` JSON); replies with the member list.
    pub const REGISTER: u16 = 16;
    /// To the head: liveness and load (`Load` JSON); replies with the member list.
    pub const HEARTBEAT: u16 = 17;
    /// Stop this node's process (one-way).
    pub const STOP: u16 = 20;
    /// To the head: the whole cluster's state (`ClusterState` JSON).
    pub const CLUSTER_STATE: u16 = 21;
    /// One-way: a batch (`batch` module) of `SUBMIT` (`TaskW`) and `ACTOR_CALL` (`CallW`) items.
    pub const CALLS: u16 = 22;
    /// One-way: a batch of results, each item `OK` (the value) or `ERR` (a JSON `Error`), keyed by call id.
    pub const RESULTS: u16 = 23;
    /// Stream: one large result; the header is the call id (8 bytes) and the kind (2 bytes).
    pub const RESULT_STREAM: u16 = 24;
    /// Hold placement-group bundles on this node, all or none (`BundleHold` JSON).
    pub const PG_PREPARE: u16 = 25;
    /// Release placement-group bundles and kill the group's actors here (`BundleHold` JSON).
    pub const PG_RELEASE: u16 = 26;
    /// Result item: like `OK`, and the sender keeps refs nested in the value alive until told `RELEASE`.
    pub const OK_LENT: u16 = 27;
    /// One-way: results received as `OK_LENT` are gone (body: call ids, 8 little-endian bytes each).
    pub const RELEASE: u16 = 28;
    /// Call-batch item, owner to executor: the owner cancelled call `call`; skip it if it has not started.
    pub const CANCEL: u16 = 29;
    /// Heartbeat reply: the head does not know you (it restarted); register again.
    pub const REREGISTER: u16 = 30;
    /// Heartbeat reply: the head declared you dead; your work is gone.
    pub const DECLARED_DEAD: u16 = 31;
    /// Result item: like `OK`, and the executor keeps a secondary copy of the (large) value in its store until told
    /// `FREE_COPY`, so the owner may place tasks that read the value there.
    pub const OK_KEPT: u16 = 34;
    /// Result-batch item, owner to executor: the object is gone; drop its secondary copy (body: the id).
    pub const FREE_COPY: u16 = 35;
    /// Result-batch item, borrower to owner: this node now holds a ref to object `body` (16 bytes), read out of a
    /// value; keep the object until the matching `UNBORROW`. A nonzero `call` asks for a `BORROW_ACK` with it.
    pub const BORROW: u16 = 36;
    /// Result-batch item, borrower to owner: one ref announced with `BORROW` is gone.
    pub const UNBORROW: u16 = 37;
    /// Fetch reply for a value too large to ride in it: a `Located` body; the requester pulls it with the
    /// objstore's `Transfer` from the nodes named.
    pub const LOCATED: u16 = 38;
    /// Result-batch item, fetcher to owner: this node pulled object `body` (16 bytes) into its store as a secondary
    /// copy; name it to later fetchers, and send `FREE_COPY` when the object goes.
    pub const HOLD_COPY: u16 = 39;
    /// Result-batch item, owner to borrower: the `BORROW` whose `call` this carries is registered.
    pub const BORROW_ACK: u16 = 40;
}

/// A task to run.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub(crate) struct TaskW {
    pub task: u128,
    pub function: String,
    pub sig: u64,
    pub owner: u128,
    pub name: String,
    pub attempts: u32,
    pub args: Vec<ArgW>,
    /// What the task holds while it runs, in the scheduler's fixed-point units: the executing node admits it by
    /// this, not by what the owner's (older) view said was free there.
    pub cpu: u64,
    pub gpu: u64,
    pub memory: u64,
    pub custom: Vec<(String, u64)>,
    /// The placement group whose bundle `bundle` the task runs in (0: none).
    pub pg: u128,
    pub bundle: u32,
}

impl TaskW {
    /// Sets the bundle fields.
    pub(crate) fn in_bundle(mut self, b: Option<oxray_scheduler::BundleKey>) -> Self {
        if let Some(b) = b {
            self.pg = b.pg.0;
            self.bundle = b.index;
        }
        self
    }

    /// Sets the resource fields from a demand.
    pub(crate) fn with_demand(mut self, d: &oxray_scheduler::ResourceSet) -> Self {
        use oxray_scheduler::ResourceKind;
        self.cpu = d.cpu().raw();
        self.gpu = d.gpu().raw();
        self.memory = d.memory().raw();
        self.custom = d
            .iter()
            .filter_map(|(k, q)| match k {
                ResourceKind::Custom(name) => Some((name.to_string(), q.raw())),
                _ => None,
            })
            .collect();
        self
    }
}

/// The demand a received task carries, and its bundle (names are validated: they come from the network).
pub(crate) fn demand_of(
    t: &ArchivedTaskW,
) -> Result<
    (
        oxray_scheduler::ResourceSet,
        Option<oxray_scheduler::BundleKey>,
    ),
    crate::error::Error,
> {
    use oxray_scheduler::{Quantity, ResourceKind, ResourceSet};
    let mut d = ResourceSet::new()
        .with(ResourceKind::Cpu, Quantity::from_raw(t.cpu.to_native()))
        .with(ResourceKind::Gpu, Quantity::from_raw(t.gpu.to_native()))
        .with(
            ResourceKind::Memory,
            Quantity::from_raw(t.memory.to_native()),
        );
    for c in t.custom.iter() {
        let bad = |e: oxray_scheduler::ResourceError| {
            crate::error::Error::InvalidArgument(format!("task resource {:?}: {e}", c.0.as_str()))
        };
        let kind = ResourceKind::custom(c.0.as_str()).map_err(bad)?;
        d.set(kind, Quantity::from_raw(c.1.to_native()))
            .map_err(bad)?;
    }
    let bundle = (t.pg.to_native() != 0).then(|| oxray_scheduler::BundleKey {
        pg: oxray_scheduler::PlacementGroupId(t.pg.to_native()),
        index: t.bundle.to_native(),
    });
    Ok((d, bundle))
}

/// One argument on the wire.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone)]
pub(crate) enum ArgW {
    /// The encoded value.
    Value(Vec<u8>),
    /// An object to fetch from its owner before the call runs.
    Ref { id: u128, owner: u128 },
}

/// An actor to create.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone)]
pub(crate) struct CreateW {
    pub actor: u128,
    pub class: String,
    pub sig: u64,
    pub name: Option<String>,
    /// CPUs, GPUs and custom resources the actor holds for its lifetime on the node that hosts it (taken from
    /// that node's queue, so its tasks wait for them).
    pub cpus: f64,
    pub gpus: f64,
    pub custom: Vec<(String, f64)>,
    /// The placement group the actor is placed in (0: none).
    pub pg: u128,
    /// The creating node: the actor dies with it unless `detached`.
    pub owner: u128,
    pub detached: bool,
    /// Calls the actor may run at once (`ActorOptions::max_concurrency`; 0 is read as 1).
    pub max_concurrency: u32,
    pub args: Vec<ArgW>,
}

/// A method call. `caller` + `seq` restore the caller's order on the host, whatever order the network delivers.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub(crate) struct CallW {
    pub actor: u128,
    pub caller: u128,
    pub seq: u64,
    pub method: u32,
    pub args: Vec<ArgW>,
}

/// A node as the cluster knows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct Member {
    pub id: u128,
    pub addr: String,
    pub cpus: f64,
    pub gpus: f64,
    pub custom: std::collections::BTreeMap<String, f64>,
    /// Function ids (name hash ^ signature hash) compiled into the node.
    pub functions: Vec<u64>,
    pub alive: bool,
    /// Free CPUs and queue length, as last reported.
    pub free_cpus: f64,
    pub queued: u32,
    pub is_head: bool,
    /// Free GPUs and custom resources (every one in `custom`, zeros included), as last reported.
    #[serde(default)]
    pub free_gpus: f64,
    #[serde(default)]
    pub free_custom: std::collections::BTreeMap<String, f64>,
}

/// A heartbeat's payload.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Load {
    pub id: u128,
    pub free_cpus: f64,
    pub queued: u32,
    #[serde(default)]
    pub free_gpus: f64,
    #[serde(default)]
    pub free_custom: std::collections::BTreeMap<String, f64>,
}

/// The whole cluster, for `oxray status` and `oxray list`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClusterState {
    /// Every node's report (a live node that did not answer is missing here and marked `reachable: false` in `members`).
    pub nodes: Vec<crate::state::NodeState>,
    /// Membership as the head sees it.
    pub members: Vec<MemberSummary>,
    /// Named actors.
    pub named_actors: Vec<(String, String)>,
}

/// One member, as printed by `oxray status`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MemberSummary {
    /// Short node id.
    pub id: String,
    /// Mesh address.
    pub address: String,
    /// Total CPUs.
    pub cpus: f64,
    /// Free CPUs as last reported.
    pub free_cpus: f64,
    /// Queued tasks as last reported.
    pub queued: u32,
    /// Whether the node is alive (heartbeats arriving).
    pub alive: bool,
    /// Whether it is the head.
    pub head: bool,
    /// Whether it answered the state request that built this report (a live but overloaded or cut-off node may
    /// not: its tasks, actors and bundles are then missing from `nodes`).
    #[serde(default = "yes")]
    pub reachable: bool,
}

fn yes() -> bool {
    true
}

pub(crate) fn id_bytes(id: u128) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&id.to_le_bytes())
}

/// Body of a `LOCATED` reply: the value's size (8 little-endian bytes), then the nodes holding copies (16 bytes
/// each), the owner last.
pub(crate) fn located(size: u64, holders: &[u128]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 16 * holders.len());
    b.extend_from_slice(&size.to_le_bytes());
    for h in holders {
        b.extend_from_slice(&h.to_le_bytes());
    }
    b
}

/// Reads a `LOCATED` body; `None` if malformed.
pub(crate) fn parse_located(body: &[u8]) -> Option<(u64, Vec<u128>)> {
    let size = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let rest = &body[8..];
    if rest.is_empty() || !rest.len().is_multiple_of(16) {
        return None;
    }
    let holders = rest.chunks_exact(16).filter_map(id_from).collect();
    Some((size, holders))
}

pub(crate) fn id_from(body: &[u8]) -> Option<u128> {
    let b: [u8; 16] = body.get(..16)?.try_into().ok()?;
    Some(u128::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn located_round_trips_and_rejects_malformed_bodies() {
        let body = located(64 << 20, &[7, u128::MAX, 1]);
        assert_eq!(
            parse_located(&body),
            Some((64 << 20, vec![7, u128::MAX, 1]))
        );
        // No holder, a torn holder, a torn size.
        assert_eq!(parse_located(&located(5, &[])), None);
        assert_eq!(parse_located(&body[..body.len() - 1]), None);
        assert_eq!(parse_located(&body[..7]), None);
    }
}
