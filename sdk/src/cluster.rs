//! Cluster mode: this process as one node of a QUIC mesh.
//!
//! A node serves the kinds in `wire::kind`: it runs tasks and hosts actors for other nodes, serves the objects it
//! owns, and (on the head) keeps the member list and the failure detector, and hosts the GCS replica. Placement
//! decisions are the scheduler crate's sans-IO policy over a `ClusterView` fed by heartbeats; this module only
//! feeds it and carries out its decisions.
//!
//! Not here: the user API (lib.rs), local execution (runtime.rs), the CLI (bin/oxray.rs).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use oxray_objstore::{ObjectStore, PullError, Transfer, TransferConfig};
use oxray_scheduler::{
    ClusterView, Decision, FailureConfig, FailureDetector, NodeInfo, Quantity, ResourceKind,
    ResourceSet, TaskArg, TaskRequest, ViewDelta,
};
use oxray_transport::{Handler, IncomingStream, Mesh, Message, NodeId, Responder, TransportError};
use parking_lot::{Mutex, RwLock};
use rand::SeedableRng;

use crate::arg::{Arg, ArgKind};
use crate::batch::{self, Item, Outbox};
use crate::error::{Error, Result};
use crate::object::{Entry, ObjectId, RefInner, Serve};
use crate::options::{Resources, Strategy};
use crate::registry;
use crate::runtime::{Done, RemoteActor, Runtime, short};
use crate::value;
use crate::wire::{self, ArgW, CallW, CreateW, Load, Member, TaskW, kind};

/// A released result with more lent refs than this frees them on a background thread (`object::drop_in_background`).
const DROP_IN_BACKGROUND_FROM: usize = 64;
/// Long enough for any task: the deadline of a task request is the task's own business (`get_timeout`).
const TASK_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Control requests (membership, names, status) are small and answered at once.
const CONTROL_DEADLINE: Duration = Duration::from_secs(5);
/// Longest a result waits for the acks of this node's pending borrows (an owner that is alive answers within a
/// round trip; one that died is handled by `node_died`).
const BORROW_ACK_WAIT: Duration = Duration::from_secs(10);
/// Most `UNBORROW`s remembered ahead of their `BORROW` (see `Cluster::early_unborrows`).
const MAX_EARLY_UNBORROWS: usize = 100_000;

/// For tests only: `OXRAY_TEST_BORROW_DELAY_MS` holds back every `BORROW` notice this long, to widen the race
/// the ack closes. Off (zero) unless set.
fn test_borrow_delay() -> Duration {
    static DELAY: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        Duration::from_millis(
            std::env::var("OXRAY_TEST_BORROW_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    })
}

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// CPUs offered to tasks (0 for a driver that only submits).
    pub num_cpus: f64,
    /// GPUs offered.
    pub num_gpus: f64,
    /// Custom resources offered.
    pub resources: BTreeMap<String, f64>,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Silence after which the head declares a node dead.
    pub dead_after: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            num_cpus: std::thread::available_parallelism()
                .map(|n| n.get() as f64)
                .unwrap_or(1.0),
            num_gpus: 0.0,
            resources: BTreeMap::new(),
            heartbeat: Duration::from_millis(250),
            dead_after: Duration::from_secs(3),
        }
    }
}

/// A task on its way to a node: everything needed to send it, re-place it, or complete it.
pub(crate) struct Outgoing {
    pub(crate) spec: TaskW,
    /// Kept until the reply: refs among them must outlive the callee's fetches.
    pub(crate) args: Vec<Arg>,
    pub(crate) entry: Arc<Entry>,
    pub(crate) retries: u32,
    pub(crate) function: u64,
    pub(crate) res: Resources,
    pub(crate) strategy: Strategy,
}

/// A call sent to another node whose result has not come back yet.
enum Pending {
    /// A task; kept whole so it can be placed again if its node dies.
    Task { node: NodeId, task: Box<Outgoing> },
    /// An actor call; the args are kept so their objects outlive the callee's fetches, and so the call can be sent
    /// again to a restarted actor.
    Call {
        node: NodeId,
        actor: Arc<RemoteActor>,
        entry: Arc<Entry>,
        args: Vec<Arg>,
        method: u32,
        /// Its place in the caller's order (resent calls keep their order).
        seq: u64,
        retries: u32,
    },
}

impl Pending {
    fn node(&self) -> NodeId {
        match self {
            Pending::Task { node, .. } | Pending::Call { node, .. } => *node,
        }
    }
}

/// Per-(actor, caller) ordering state on the host.
#[derive(Default)]
struct Reorder {
    next: u64,
    pending: BTreeMap<u64, (u32, Vec<Arg>, Done)>,
}

/// The head's extra duties.
struct HeadState {
    members: Mutex<BTreeMap<u128, Member>>,
    detector: Mutex<FailureDetector>,
    epoch: Instant,
}

pub(crate) struct Cluster {
    pub(crate) mesh: Mesh,
    pub(crate) head: NodeId,
    pub(crate) addr: SocketAddr,
    settings: NodeSettings,
    view: Mutex<ClusterView>,
    members: RwLock<Vec<Member>>,
    /// Whether any member in `members` is dead: `node_known_dead`, asked on every actor call, answers from this
    /// alone in a cluster that lost no node.
    any_dead: std::sync::atomic::AtomicBool,
    reorder: DashMap<(u128, u128), Arc<Mutex<Reorder>>>,
    head_state: Option<HeadState>,
    rng: Mutex<rand::rngs::SmallRng>,
    report_seq: AtomicU64,
    /// Tasks waiting because no node can take them now (shown by `status`).
    pub(crate) infeasible: AtomicU64,
    /// Calls in flight to other nodes, by call id.
    pending: DashMap<u64, Pending>,
    next_call: AtomicU64,
    /// Outgoing batches of calls, and of results, per peer.
    call_out: DashMap<NodeId, Arc<Outbox>>,
    result_out: DashMap<NodeId, Arc<Outbox>>,
    tokio: tokio::runtime::Handle,
    /// When the head last answered a heartbeat: a worker node whose head is gone for long exits.
    head_seen: Mutex<Instant>,
    /// Refs nested in results sent as `OK_LENT`, by (owner node, call): kept alive until the owner's `RELEASE`.
    lent: DashMap<(u128, u64), Vec<Arc<RefInner>>>,
    /// Objects of this process that other nodes borrow, by (borrower, object): how many refs the borrower
    /// announced, and a ref that keeps the object in this owner's table until they are all gone.
    borrowers: DashMap<(u128, ObjectId), (usize, Arc<RefInner>)>,
    /// This node's `BORROW`s not yet acknowledged, by token: (owner, completes on the ack). A result waits for
    /// those of other owners than its own (see `send_result_holding`).
    borrow_acks: DashMap<u64, (u128, Arc<Entry>)>,
    /// `UNBORROW`s that arrived before their `BORROW` (notices are not ordered with each other), by (borrower,
    /// object): the `BORROW` they cancel registers nothing.
    early_unborrows: DashMap<(u128, ObjectId), usize>,
    /// `borrow_acks.len()`, read without locking on every result.
    borrow_acks_pending: AtomicUsize,
    /// Actors this process created with `max_restarts`, by id.
    restartable: DashMap<u128, Weak<RemoteActor>>,
    /// Tasks of this process waiting for a node that fits (`park_until_feasible`), or for their arguments before
    /// they are placed (`Runtime::place_when_ready`), by return object.
    parked: DashMap<ObjectId, ()>,
    /// Fetches waiting for their owner's answer, by fetch number: the owner asked and the entry to complete (failed
    /// at once if the owner is declared dead, rather than when the request gives up).
    fetching: DashMap<u64, (u128, Arc<Entry>)>,
    /// Moves large values between stores: pulls them here from the nodes holding copies, and serves this store's
    /// objects to other nodes' pulls.
    pub(crate) transfer: Transfer,
    /// Objects fetched from their owners and still held here, by id (to share one copy between borrowers).
    fetched: DashMap<u128, Weak<Entry>>,
    /// Size of `fetched` at which its dead entries are next swept out.
    fetched_sweep_at: std::sync::atomic::AtomicUsize,
}

/// The mesh handler: forwards to the runtime and cluster once both exist.
pub(crate) struct NodeHandler {
    rt: OnceLock<Weak<Runtime>>,
    /// The GCS replica's service, on the node that hosts one (the head).
    gcs: OnceLock<Arc<oxray_gcs::mesh::GcsService>>,
}

impl NodeHandler {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(NodeHandler {
            rt: OnceLock::new(),
            gcs: OnceLock::new(),
        })
    }
    pub(crate) fn attach(&self, rt: &Arc<Runtime>) {
        let _ = self.rt.set(Arc::downgrade(rt));
    }
    pub(crate) fn serve_gcs(&self, service: Arc<oxray_gcs::mesh::GcsService>) {
        let _ = self.gcs.set(service);
    }
    fn gcs_for(&self, kind: u16) -> Option<&Arc<oxray_gcs::mesh::GcsService>> {
        if oxray_gcs::mesh::GcsService::handles(kind) {
            self.gcs.get()
        } else {
            None
        }
    }
    fn rt(&self) -> Option<Arc<Runtime>> {
        self.rt.get().and_then(Weak::upgrade)
    }
}

fn reply_err(reply: Responder, e: &Error) {
    let body = serde_json::to_vec(e).unwrap_or_default();
    reply.send(kind::ERR, Bytes::from(body));
}

fn reply_json<T: serde::Serialize>(reply: Responder, v: &T) {
    match serde_json::to_vec(v) {
        Ok(b) => reply.send(kind::OK, Bytes::from(b)),
        Err(e) => reply.error(format!("cannot encode reply: {e}")),
    }
}

/// Turns a reply into the value's bytes or the remote error.
fn reply_bytes(msg: Message) -> Result<Bytes> {
    match msg.kind() {
        kind::OK => Ok(msg.into_body()),
        kind::ERR => Err(serde_json::from_slice::<Error>(msg.body())
            .unwrap_or_else(|e| Error::Cluster(format!("unreadable error reply: {e}")))),
        other => Err(Error::Cluster(format!("unexpected reply kind {other}"))),
    }
}

fn transport_err(node: NodeId, e: TransportError) -> Error {
    Error::Cluster(format!("node {node}: {e}"))
}

/// What this node has free now, from the same accounting that admits its tasks (`Runtime::local`: running
/// tasks, actors' leases and bundles all hold theirs there), and how many ready tasks wait there.
fn local_free(rt: &Runtime) -> (ResourceSet, u32) {
    let load = rt.local.load();
    (load.available, load.queued.try_into().unwrap_or(u32::MAX))
}

pub(crate) fn function_id(name: &str, sig: u64) -> u64 {
    value::fnv1a(name.as_bytes()) ^ sig
}

pub(crate) fn resource_set(cpus: f64, gpus: f64, custom: &BTreeMap<String, f64>) -> ResourceSet {
    let mut set = ResourceSet::new();
    let q = |x: f64| Quantity::from_f64(x.max(0.0)).unwrap_or_default();
    let _ = set.set(ResourceKind::Cpu, q(cpus));
    let _ = set.set(ResourceKind::Gpu, q(gpus));
    for (name, amount) in custom {
        if let Ok(kind) = ResourceKind::custom(name) {
            let _ = set.set(kind, q(*amount));
        }
    }
    set
}

/// The bundle a placement-group strategy runs a task in ("any bundle" is bundle 0, as `PlacementGroup::node_of`
/// places it).
pub(crate) fn bundle_of(s: &Strategy) -> Option<oxray_scheduler::BundleKey> {
    match s {
        Strategy::PlacementGroup { group, bundle } => Some(oxray_scheduler::BundleKey {
            pg: oxray_scheduler::PlacementGroupId(*group),
            index: u32::try_from(bundle.unwrap_or(0)).unwrap_or(u32::MAX),
        }),
        _ => None,
    }
}

pub(crate) fn demand(r: &Resources) -> ResourceSet {
    let mut set = resource_set(r.num_cpus, r.num_gpus, &r.custom);
    if r.memory > 0 {
        let _ = set.set(
            ResourceKind::Memory,
            Quantity::from_f64(r.memory as f64).unwrap_or_default(),
        );
    }
    set
}

/// Keeps a large task result this node computed as a secondary copy in its store (no copy of the bytes: the store
/// adopts another handle on the buffer being sent). Returns whether it did. Small results are not kept: moving them
/// costs less than a locality decision is worth, and the owner's reply holds them anyway. A store under pressure
/// drops secondary copies first, so keeping one never fails a put.
fn keep_copy(id: ObjectId, value: &Bytes) -> bool {
    if oxray_objstore::is_inline(value.len()) {
        return false;
    }
    let Ok(rt) = crate::runtime::current() else {
        return false;
    };
    let store = rt.objects.store();
    !store.config().is_inline(value.len()) && store.put_secondary(id, value.clone()).is_ok()
}

/// The large by-reference arguments among `args` (at most the policy's `MAX_ARGS_CONSIDERED`), with their sizes and
/// the nodes known to hold them, for the policy's locality score. What this node knows, honestly:
/// - a ref it owns whose value is known: the value is here (its store or its table), on the node that computed it
///   if that node said it kept a copy (`OK_KEPT`), and on nodes that pulled it (`HOLD_COPY`);
/// - a borrowed ref whose value was fetched here: here, and on its owner (which keeps the primary copy).
///
/// Not counted: values still being computed (the owner waits for its own before placing, see
/// `Runtime::place_when_ready`), borrowed refs not fetched yet (their size is unknown here), small (inline) values,
/// and copies other borrowers fetched (they last only while used).
fn arg_locations(rt: &Runtime, args: &[Arg]) -> Vec<TaskArg> {
    let mut out = Vec::new();
    for a in args {
        let ArgKind::Ref(r) = &a.0 else { continue };
        if out.len() == oxray_scheduler::policy::MAX_ARGS_CONSIDERED {
            break;
        }
        let (known, size, _) = r.entry.summary();
        if !known || rt.objects.store().config().is_inline(size) {
            continue;
        }
        let mut nodes = vec![NodeId(rt.node)];
        let owner = if r.owner == 0 { rt.node } else { r.owner };
        if owner != rt.node {
            nodes.push(NodeId(owner));
        } else {
            nodes.extend(r.entry.copy_holders().into_iter().map(NodeId));
        }
        out.push(TaskArg::new(r.entry.id.0, size as u64, nodes));
    }
    out
}

impl Cluster {
    pub(crate) fn new(
        mesh: Mesh,
        head: NodeId,
        settings: NodeSettings,
        is_head: bool,
        tokio: tokio::runtime::Handle,
        store: ObjectStore,
    ) -> Arc<Self> {
        let addr = mesh.local_addr();
        let transfer = Transfer::new(store, TransferConfig::default());
        {
            let _enter = tokio.enter();
            transfer.attach(mesh.clone());
        }
        let head_state = is_head.then(|| HeadState {
            members: Mutex::new(BTreeMap::new()),
            detector: Mutex::new(FailureDetector::new(FailureConfig {
                timeout_ms: settings.dead_after.as_millis() as u64,
                ..FailureConfig::default()
            })),
            epoch: Instant::now(),
        });
        Arc::new(Cluster {
            mesh,
            head,
            addr,
            settings,
            view: Mutex::new(ClusterView::new()),
            members: RwLock::new(Vec::new()),
            any_dead: std::sync::atomic::AtomicBool::new(false),
            reorder: DashMap::new(),
            head_state,
            rng: Mutex::new(rand::rngs::SmallRng::seed_from_u64(rand::random())),
            report_seq: AtomicU64::new(1),
            infeasible: AtomicU64::new(0),
            pending: DashMap::new(),
            next_call: AtomicU64::new(1),
            call_out: DashMap::new(),
            result_out: DashMap::new(),
            tokio,
            head_seen: Mutex::new(Instant::now()),
            lent: DashMap::new(),
            borrowers: DashMap::new(),
            borrow_acks: DashMap::new(),
            early_unborrows: DashMap::new(),
            borrow_acks_pending: AtomicUsize::new(0),
            restartable: DashMap::new(),
            parked: DashMap::new(),
            fetching: DashMap::new(),
            transfer,
            fetched: DashMap::new(),
            fetched_sweep_at: std::sync::atomic::AtomicUsize::new(4096),
        })
    }

    pub(crate) fn is_head(&self) -> bool {
        self.head_state.is_some()
    }

    fn me(&self, rt: &Runtime) -> Member {
        let (free, queued) = local_free(rt);
        Member {
            id: rt.node,
            addr: self.addr.to_string(),
            cpus: self.settings.num_cpus,
            gpus: self.settings.num_gpus,
            custom: self.settings.resources.clone(),
            functions: registry::table()
                .iter()
                .map(|(n, s)| function_id(n, *s))
                .collect(),
            alive: true,
            free_cpus: free.cpu().as_f64(),
            queued,
            is_head: self.is_head(),
            free_gpus: free.gpu().as_f64(),
            free_custom: self
                .settings
                .resources
                .keys()
                .filter_map(|name| {
                    let kind = ResourceKind::custom(name).ok()?;
                    Some((name.clone(), free.get(&kind).as_f64()))
                })
                .collect(),
        }
    }

    /// Joins: registers with the head and starts the heartbeat loop.
    pub(crate) async fn register(self: &Arc<Self>, rt: &Arc<Runtime>) -> Result<()> {
        let me = self.me(rt);
        let members: Vec<Member> = if let Some(h) = &self.head_state {
            h.members.lock().insert(me.id, me.clone());
            h.detector.lock().heartbeat(NodeId(me.id), 0);
            h.members.lock().values().cloned().collect()
        } else {
            let body =
                Bytes::from(serde_json::to_vec(&me).map_err(|e| Error::Cluster(e.to_string()))?);
            let msg = self
                .mesh
                .request(self.head, kind::REGISTER, body, CONTROL_DEADLINE)
                .await
                .map_err(|e| transport_err(self.head, e))?;
            let bytes = reply_bytes(msg)?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::Cluster(format!("bad member list: {e}")))?
        };
        self.apply_members(rt.node, members);
        let weak = Arc::downgrade(self);
        let rt_weak = Arc::downgrade(rt);
        let period = self.settings.heartbeat;
        rt.tokio.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(cl), Some(rt)) = (weak.upgrade(), rt_weak.upgrade()) else {
                    break;
                };
                cl.heartbeat(&rt).await;
            }
        });
        Ok(())
    }

    async fn heartbeat(self: &Arc<Self>, rt: &Arc<Runtime>) {
        let me = self.me(rt);
        let load = Load {
            id: me.id,
            free_cpus: me.free_cpus,
            queued: me.queued,
            free_gpus: me.free_gpus,
            free_custom: me.free_custom,
        };
        let members = if let Some(h) = &self.head_state {
            Some(self.head_heartbeat(h, &load))
        } else {
            let body = Bytes::from(serde_json::to_vec(&load).unwrap_or_default());
            match self
                .mesh
                .request(self.head, kind::HEARTBEAT, body, CONTROL_DEADLINE)
                .await
            {
                Ok(msg) if msg.kind() == kind::REREGISTER => {
                    *self.head_seen.lock() = Instant::now();
                    tracing::warn!(
                        "the head does not know this node (it restarted?); registering again"
                    );
                    self.register_again(rt).await
                }
                Ok(msg) if msg.kind() == kind::DECLARED_DEAD => {
                    tracing::error!(
                        "the head declared this node dead (it was silent too long); its work was failed or moved"
                    );
                    if self.settings.num_cpus > 0.0 {
                        std::process::exit(3);
                    }
                    None
                }
                Ok(msg) => {
                    *self.head_seen.lock() = Instant::now();
                    reply_bytes(msg)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Vec<Member>>(&b).ok())
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "heartbeat to the head failed");
                    let silent = self.head_seen.lock().elapsed();
                    let limit = (self.settings.dead_after * 3).max(Duration::from_secs(10));
                    if silent > limit && self.settings.num_cpus > 0.0 {
                        // The cluster is gone (or this node was cut off and declared dead): a worker with no head
                        // can never be given work again, so it leaves instead of lingering.
                        tracing::error!(
                            silent_s = silent.as_secs(),
                            "the head is unreachable; this node exits"
                        );
                        std::process::exit(3);
                    }
                    None
                }
            }
        };
        if let Some(m) = members {
            self.apply_members(rt.node, m);
        }
    }

    /// Registers with a head that lost its member list; returns the new list.
    async fn register_again(self: &Arc<Self>, rt: &Arc<Runtime>) -> Option<Vec<Member>> {
        let body = Bytes::from(serde_json::to_vec(&self.me(rt)).ok()?);
        match self
            .mesh
            .request(self.head, kind::REGISTER, body, CONTROL_DEADLINE)
            .await
        {
            Ok(msg) => reply_bytes(msg)
                .ok()
                .and_then(|b| serde_json::from_slice::<Vec<Member>>(&b).ok()),
            Err(e) => {
                tracing::warn!(cause = %e, "registering again failed; retrying at the next heartbeat");
                None
            }
        }
    }

    fn head_heartbeat(&self, h: &HeadState, load: &Load) -> Vec<Member> {
        let now = h.epoch.elapsed().as_millis() as u64;
        let mut members = h.members.lock();
        let mut det = h.detector.lock();
        if let Some(m) = members.get_mut(&load.id)
            && m.alive
        {
            det.heartbeat(NodeId(load.id), now);
            m.free_cpus = load.free_cpus;
            m.free_gpus = load.free_gpus;
            m.free_custom.clone_from(&load.free_custom);
            m.queued = load.queued;
        }
        for dead in det.poll(now) {
            if let Some(m) = members.get_mut(&dead.0) {
                tracing::warn!(node = %dead, "node declared dead: no heartbeat within the bound");
                m.alive = false;
            }
        }
        members.values().cloned().collect()
    }

    /// The head checks for silent nodes on its own timer too, so a death is declared within the bound even when
    /// no other node sends a heartbeat.
    pub(crate) fn spawn_reaper(self: &Arc<Self>, rt: &Arc<Runtime>) {
        let weak = Arc::downgrade(self);
        let period = (self.settings.dead_after / 10).max(Duration::from_millis(20));
        rt.tokio.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(cl) = weak.upgrade() else { break };
                if let Some(h) = &cl.head_state {
                    let now = h.epoch.elapsed().as_millis() as u64;
                    let dead = h.detector.lock().poll(now);
                    let mut members = h.members.lock();
                    for d in dead {
                        if let Some(m) = members.get_mut(&d.0) {
                            tracing::warn!(node = %d, "node declared dead: no heartbeat within the bound");
                            m.alive = false;
                        }
                    }
                }
            }
        });
    }

    fn apply_members(self: &Arc<Self>, me: u128, members: Vec<Member>) {
        let mut died = Vec::new();
        self.apply_members_to_view(me, &members, &mut died);
        // Every member that was alive and is now dead, drivers included (the view above only has placement targets).
        let gone: Vec<NodeId> = {
            let old = self.members.read();
            members
                .iter()
                .filter(|m| !m.alive && old.iter().any(|o| o.id == m.id && o.alive))
                .map(|m| NodeId(m.id))
                .collect()
        };
        self.any_dead
            .store(members.iter().any(|m| !m.alive), Ordering::Release);
        *self.members.write() = members;
        for d in died {
            self.node_died(d);
        }
        for d in gone {
            self.member_died(d);
        }
    }

    fn apply_members_to_view(&self, me: u128, members: &[Member], died: &mut Vec<NodeId>) {
        let mut view = self.view.lock();
        let mut deltas = Vec::new();
        let known: HashMap<u128, Member> = self
            .members
            .read()
            .iter()
            .map(|m| (m.id, m.clone()))
            .collect();
        for m in members {
            if m.id != me
                && let Ok(addr) = m.addr.parse::<SocketAddr>()
            {
                self.mesh.add_peer(NodeId(m.id), addr);
            }
            // Nodes with no CPUs (drivers, the CLI) are never placement targets.
            if m.cpus <= 0.0 && m.gpus <= 0.0 && m.custom.is_empty() {
                continue;
            }
            let total = resource_set(m.cpus, m.gpus, &m.custom);
            match known.get(&m.id) {
                Some(old) if old.alive && !m.alive => {
                    deltas.push(ViewDelta::NodeDied(NodeId(m.id)));
                    died.push(NodeId(m.id));
                }
                Some(old) if old.alive == m.alive && view.node(NodeId(m.id)).is_some() => {}
                _ if m.alive => deltas.push(ViewDelta::NodeJoined(
                    NodeInfo::new(NodeId(m.id), total.clone())
                        .with_functions(m.functions.iter().copied()),
                )),
                _ => {}
            }
            if m.alive && m.id != me {
                // What the node last reported free: CPUs, GPUs and each custom resource.
                let available = resource_set(m.free_cpus, m.free_gpus, &m.free_custom);
                deltas.push(ViewDelta::Resources {
                    node: NodeId(m.id),
                    seq: self.report_seq.fetch_add(1, Ordering::Relaxed),
                    available,
                    queue_len: m.queued,
                });
            }
        }
        view.apply(deltas);
    }

    pub(crate) fn members(&self) -> Vec<Member> {
        self.members.read().clone()
    }

    /// Decides where a task (or actor) runs, given its arguments (their large objects draw it to where they are).
    pub(crate) fn decide(
        &self,
        rt: &Runtime,
        function: u64,
        res: &Resources,
        strategy: &Strategy,
        args: &[Arg],
    ) -> Decision {
        self.decide_with(rt, function, res, strategy, args, true)
    }

    /// Places an actor. An actor holds its resources for its whole life, so queueing it behind a node that only
    /// looks busy on a stale view is worse than for a task: when every fitting node looks busy, the view is
    /// refreshed by up to four heartbeats before the least-loaded node is chosen anyway. (Right after a burst of
    /// tasks, the view still shows every node full, and Spread put two one-CPU actors on one node.)
    pub(crate) fn decide_actor(
        &self,
        rt: &Runtime,
        function: u64,
        res: &Resources,
        strategy: &Strategy,
        args: &[Arg],
    ) -> Decision {
        let holds = res.num_cpus > 0.0 || res.num_gpus > 0.0 || !res.custom.is_empty();
        if holds {
            for _ in 0..4 {
                match self.decide_with(rt, function, res, strategy, args, false) {
                    Decision::Wait => std::thread::sleep(self.settings.heartbeat),
                    d => return d,
                }
            }
        }
        self.decide(rt, function, res, strategy, args)
    }

    fn decide_with(
        &self,
        rt: &Runtime,
        function: u64,
        res: &Resources,
        strategy: &Strategy,
        args: &[Arg],
        queue_when_busy: bool,
    ) -> Decision {
        let mut req = TaskRequest::new(function, demand(res));
        req.args = arg_locations(rt, args);
        req.strategy = match strategy {
            Strategy::Default => oxray_scheduler::Strategy::Default,
            Strategy::Spread => oxray_scheduler::Strategy::Spread,
            Strategy::NodeAffinity { node, soft } => oxray_scheduler::Strategy::NodeAffinity {
                node: self.resolve_node(*node),
                soft: *soft,
            },
            Strategy::PlacementGroup { .. } => oxray_scheduler::Strategy::Default,
        };
        let mut view = self.view.lock();
        let (available, queued) = local_free(rt);
        view.update_local(NodeId(rt.node), &available, queued);
        let mut d = oxray_scheduler::decide(&view, NodeId(rt.node), &req, &mut *self.rng.lock());
        if queue_when_busy
            && matches!(d, Decision::Wait)
            && matches!(strategy, Strategy::Default | Strategy::Spread)
        {
            // Every fitting node is busy: queue the task at the least-loaded one rather than hold it here. Nodes
            // queue work in their pools, and the owner then needs no timer to retry.
            if let Some(n) = view
                .nodes()
                .iter()
                .filter(|n| {
                    n.alive && n.total.fits(&req.resources) && n.functions.contains(&function)
                })
                .min_by_key(|n| n.queue_len)
            {
                d = if n.id.0 == rt.node {
                    Decision::RunLocal
                } else {
                    Decision::Spill(n.id)
                };
            }
        }
        // Count our own spill against the target until its next report, so a burst of submissions spreads instead
        // of landing on the node that looked idlest a heartbeat ago.
        if let Decision::Spill(n) = &d
            && let Some(info) = view.node(*n)
        {
            let mut avail = info.available.clone();
            avail.saturating_sub(&req.resources);
            let q = info.queue_len + 1;
            view.update_local(*n, &avail, q);
        }
        d
    }

    /// Marks a task of this process as parked (waiting here, cancellable by `cancel`).
    pub(crate) fn hold_parked(&self, id: ObjectId) {
        self.parked.insert(id, ());
    }

    /// Takes a parked task back to place it; `false` if it was cancelled meanwhile.
    pub(crate) fn take_parked(&self, id: ObjectId) -> bool {
        self.parked.remove(&id).is_some()
    }

    /// Tells `node` to drop the secondary copy of `id` it kept as the task's executor (the owner's entry is gone).
    /// Sent on the results sender, so it follows the result it refers to; a node known dead is not told.
    pub(crate) fn free_copy(self: &Arc<Self>, node: u128, id: ObjectId) {
        if self.node_known_dead(node) {
            return;
        }
        let _ = self.results_to(NodeId(node)).push(Item {
            kind: kind::FREE_COPY,
            call: 0,
            body: Bytes::copy_from_slice(&id.0.to_le_bytes()),
        });
    }

    /// Plans a placement group's bundles on the current view (this node's own load made exact first).
    pub(crate) fn plan_group(
        &self,
        rt: &Runtime,
        spec: &oxray_scheduler::PlacementGroupSpec,
    ) -> std::result::Result<Vec<NodeId>, oxray_scheduler::PlanError> {
        let mut view = self.view.lock();
        let (available, queued) = local_free(rt);
        view.update_local(NodeId(rt.node), &available, queued);
        oxray_scheduler::pg::plan(&view, spec, &mut *self.rng.lock())
    }

    /// Plans bundles on the current view, leaving out the nodes in `exclude`, or every node but `only`.
    pub(crate) fn plan_group_within(
        &self,
        rt: &Runtime,
        spec: &oxray_scheduler::PlacementGroupSpec,
        exclude: &[u128],
        only: Option<u128>,
    ) -> std::result::Result<Vec<NodeId>, oxray_scheduler::PlanError> {
        if exclude.is_empty() && only.is_none() {
            return self.plan_group(rt, spec);
        }
        let mut view = {
            let mut v = self.view.lock();
            let (available, queued) = local_free(rt);
            v.update_local(NodeId(rt.node), &available, queued);
            v.clone()
        };
        let drop: Vec<ViewDelta> = view
            .nodes()
            .iter()
            .filter(|n| exclude.contains(&n.id.0) || only.is_some_and(|o| o != n.id.0))
            .map(|n| ViewDelta::NodeDied(n.id))
            .collect();
        view.apply(drop);
        oxray_scheduler::pg::plan(&view, spec, &mut *self.rng.lock())
    }

    /// Accepts a full node id, or the short form printed by `status`.
    fn resolve_node(&self, node: u128) -> NodeId {
        if self.members.read().iter().any(|m| m.id == node) {
            return NodeId(node);
        }
        self.members
            .read()
            .iter()
            .find(|m| (m.id >> 80) == node)
            .map(|m| NodeId(m.id))
            .unwrap_or(NodeId(node))
    }

    pub(crate) fn node_alive(&self, node: u128) -> bool {
        self.members.read().iter().any(|m| m.id == node && m.alive)
    }

    /// Whether `node` is a member this node has seen declared dead (unknown is not dead: it may have just joined).
    pub(crate) fn node_known_dead(&self, node: u128) -> bool {
        self.any_dead.load(Ordering::Acquire)
            && self.members.read().iter().any(|m| m.id == node && !m.alive)
    }

    /// Encodes arguments for the wire. Refs become (id, owner) pairs; the caller keeps `args` alive until the
    /// reply, so the objects cannot be freed while the callee fetches them.
    pub(crate) fn wire_args(args: &[Arg], me: u128) -> Vec<ArgW> {
        args.iter()
            .map(|a| match &a.0 {
                ArgKind::Value(b) => ArgW::Value(b.to_vec()),
                // A tiny value's ref passes the value itself (nobody keeps it by id).
                ArgKind::Ref(r) => match r.carried_copy() {
                    Some(b) => ArgW::Value(b),
                    None => ArgW::Ref {
                        id: r.entry.id.0,
                        owner: if r.owner == 0 { me } else { r.owner },
                    },
                },
            })
            .collect()
    }

    /// The batch sender for calls to `node`, started on first use.
    fn calls_to(self: &Arc<Self>, node: NodeId) -> Arc<Outbox> {
        if let Some(o) = self.call_out.get(&node) {
            return o.clone();
        }
        let weak = Arc::downgrade(self);
        let on_fail: batch::OnFail = Arc::new(move |item, e| {
            if let Some(cl) = weak.upgrade()
                && let Some((_, p)) = cl.pending.remove(&item.call)
            {
                cl.fail_pending(p, &format!("cannot reach node {node}: {e}"));
            }
        });
        self.outbox(&self.call_out, node, kind::CALLS, on_fail)
    }

    /// The sender in `map` for `node`, started with `on_fail` if there is none yet (a racing starter's sender is
    /// dropped, and its task ends with it).
    fn outbox(
        self: &Arc<Self>,
        map: &DashMap<NodeId, Arc<Outbox>>,
        node: NodeId,
        k: u16,
        on_fail: batch::OnFail,
    ) -> Arc<Outbox> {
        // An unknown peer: one heartbeat brings the head's member list (and every address in it) at once, instead
        // of failing the batch until the next periodic one.
        let weak = Arc::downgrade(self);
        let resolve: batch::Resolve = Arc::new(move || {
            let weak = weak.clone();
            Box::pin(async move {
                if let (Some(cl), Ok(rt)) = (weak.upgrade(), crate::runtime::current()) {
                    cl.heartbeat(&rt).await;
                }
            })
        });
        let out = Arc::new(Outbox::start(
            &self.tokio,
            self.mesh.clone(),
            node,
            k,
            on_fail,
            resolve,
        ));
        map.entry(node).or_insert(out).clone()
    }

    /// The batch sender for results to `node`, started on first use.
    fn results_to(self: &Arc<Self>, node: NodeId) -> Arc<Outbox> {
        if let Some(o) = self.result_out.get(&node) {
            return o.clone();
        }
        let on_fail: batch::OnFail = Arc::new(move |item, e| {
            // The owner is gone or unreachable: nobody is left to tell.
            tracing::warn!(owner = %node, call = item.call, cause = %e, "result not delivered");
        });
        self.outbox(&self.result_out, node, kind::RESULTS, on_fail)
    }

    /// Sends a task to `node`; its entry completes when the result comes back.
    pub(crate) fn submit_remote(self: &Arc<Self>, rt: &Arc<Runtime>, node: NodeId, task: Outgoing) {
        let body = match rkyv::to_bytes::<rkyv::rancor::Error>(&task.spec) {
            Ok(b) => Bytes::from_owner(b),
            Err(e) => {
                return task
                    .entry
                    .complete(Err(Error::Serialization(e.to_string())));
            }
        };
        if body.len() > batch::MAX_ITEM_BYTES {
            return task.entry.complete(Err(Error::InvalidArgument(format!(
                "the task's arguments take {} bytes; pass large values with oxray::put and a ref",
                body.len()
            ))));
        }
        let _ = rt;
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        self.pending.insert(
            call,
            Pending::Task {
                node,
                task: Box::new(task),
            },
        );
        if self
            .calls_to(node)
            .push(Item {
                kind: kind::SUBMIT,
                call,
                body,
            })
            .is_err()
            && let Some((_, p)) = self.pending.remove(&call)
        {
            self.fail_pending(p, "the sender to that node stopped");
        }
    }

    /// Fails (or, for tasks with retries left, places again) a call whose node is gone.
    fn fail_pending(self: &Arc<Self>, p: Pending, why: &str) {
        match p {
            Pending::Call { actor, entry, .. } => entry.complete(Err(Error::ActorDied {
                actor: short(actor.id),
                reason: why.to_string(),
            })),
            Pending::Task { node, mut task } => {
                if task.retries == 0 {
                    task.entry.complete(Err(Error::Cluster(format!(
                        "task {} lost: {why}",
                        task.spec.name
                    ))));
                    return;
                }
                task.retries -= 1;
                tracing::warn!(node = %node, task = %task.spec.name, "task lost with its node; placing it again");
                let Ok(rt) = crate::runtime::current() else {
                    return task.entry.complete(Err(Error::NotInitialized));
                };
                let strategy = task.strategy.clone();
                match self.decide(&rt, task.function, &task.res, &strategy, &task.args) {
                    Decision::RunLocal => run_owned_here(&rt, *task),
                    Decision::Spill(n) | Decision::RunInBundle { node: n, .. } if n != node => {
                        self.submit_remote(&rt, n, *task)
                    }
                    _ => self.park_until_feasible(&rt, *task, format!("its node died ({why})")),
                }
            }
        }
    }

    /// Fails or re-places everything in flight to a node that was declared dead, and restarts the actors this
    /// process created there with `max_restarts`.
    fn node_died(self: &Arc<Self>, node: NodeId) {
        let mut restarted = std::collections::HashSet::new();
        if let Ok(rt) = crate::runtime::current() {
            crate::pg::node_died(&rt, node.0);
            let ours: Vec<Arc<RemoteActor>> = self
                .restartable
                .iter()
                .filter_map(|a| a.value().upgrade())
                .filter(|a| a.node() == node)
                .collect();
            self.restartable.retain(|_, a| a.strong_count() > 0);
            for a in ours {
                if self.restart_actor(&rt, &a) {
                    restarted.insert(a.id);
                }
            }
        }
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|p| p.value().node() == node)
            .map(|p| *p.key())
            .collect();
        let mut resend = Vec::new();
        for call in lost {
            if let Some((_, p)) = self.pending.remove(&call) {
                match p {
                    Pending::Call {
                        actor,
                        entry,
                        args,
                        method,
                        seq,
                        retries,
                        ..
                    } if retries > 0 && restarted.contains(&actor.id) => {
                        resend.push((seq, actor, method, args, entry, retries - 1))
                    }
                    p => self.fail_pending(p, &format!("node {node} died")),
                }
            }
        }
        // Calls retried on the new incarnation go in their original order.
        resend.sort_by_key(|r| r.0);
        if let Ok(rt) = crate::runtime::current() {
            for (_, actor, method, args, entry, retries) in resend {
                self.call_remote(&rt, &actor, method, args, entry, retries);
            }
        }
        // A dead owner acks no borrow: results waiting for one go now.
        let unacked: Vec<u64> = self
            .borrow_acks
            .iter()
            .filter(|b| b.value().0 == node.0)
            .map(|b| *b.key())
            .collect();
        for token in unacked {
            self.borrow_acked(token, Err(Error::OwnerDied(format!("node {node} died"))));
        }
        // Nobody on a dead node will read what was lent to it, or borrowed, or answer a fetch.
        self.lent.retain(|(owner, _), _| *owner != node.0);
        self.borrowers
            .retain(|(borrower, _), _| *borrower != node.0);
        self.early_unborrows
            .retain(|(borrower, _), _| *borrower != node.0);
        self.fetching.retain(|_, (owner, entry)| {
            if *owner == node.0 {
                entry.complete(Err(Error::OwnerDied(format!(
                    "{} (node {node} died)",
                    entry.id
                ))));
            }
            *owner != node.0
        });
    }

    /// A member (any node, drivers included) was declared dead: its work is failed or re-placed above, and the
    /// actors it created here stop unless detached.
    fn member_died(self: &Arc<Self>, node: NodeId) {
        // Pulls from its copies (drivers hold copies too) move to other copies now, not at their stall timeout.
        self.transfer.on_peer_lost(node);
        if let Ok(rt) = crate::runtime::current() {
            rt.owner_died(node.0);
        }
    }

    /// Sends a result whose value nests `nested` refs: this node keeps them alive until the owner releases the
    /// result, so the owner (or whoever it hands the value to) can still fetch them. A large task result (`keep`
    /// names its object) that nests no refs is also kept here as a secondary copy, for locality.
    pub(crate) fn send_result_holding(
        self: &Arc<Self>,
        owner: NodeId,
        call: u64,
        result: Result<Bytes>,
        nested: Vec<Arc<RefInner>>,
        keep: Option<ObjectId>,
    ) {
        let lend = result.is_ok() && !nested.is_empty();
        if lend {
            self.lent.insert((owner.0, call), nested);
        }
        let ok = match (&result, keep) {
            (Ok(_), _) if lend => kind::OK_LENT,
            (Ok(b), Some(id)) if keep_copy(id, b) => kind::OK_KEPT,
            _ => kind::OK,
        };
        // Refs this call borrowed must be registered with their owners before the caller hears back and drops its
        // own (see `borrow`). A superset is awaited: every pending ack of this node.
        let acks = self.borrows_unacked();
        if acks.is_empty() {
            return self.send_result_kind(owner, call, result, ok);
        }
        let cl = self.clone();
        self.tokio.spawn(async move {
            for a in acks {
                let _ = tokio::time::timeout(BORROW_ACK_WAIT, a.wait_async()).await;
            }
            cl.send_result_kind(owner, call, result, ok);
        });
    }

    /// Cancels a task of this process that was sent to another node: its ref fails with `Cancelled` now, and the
    /// node is told to skip it if it has not started. Returns whether such a task was in flight.
    pub(crate) fn cancel(self: &Arc<Self>, id: ObjectId) -> bool {
        let found = self.pending.iter().find_map(|p| match p.value() {
            Pending::Task { node, task } if task.entry.id == id => Some((*p.key(), *node)),
            _ => None,
        });
        let Some((call, node)) = found else {
            // A task waiting for a node that fits is cancelled where it waits.
            if self.parked.remove(&id).is_some()
                && let Ok(rt) = crate::runtime::current()
                && let Some(e) = rt.objects.lookup(id)
            {
                e.complete(Err(Error::Cancelled));
                return true;
            }
            return false;
        };
        if let Some((_, Pending::Task { task, .. })) = self.pending.remove(&call) {
            task.entry.complete(Err(Error::Cancelled));
        }
        // Sent behind the task on the same sender; the node also remembers a cancel that overtakes its task.
        let _ = self.calls_to(node).push(Item {
            kind: kind::CANCEL,
            call,
            body: Bytes::new(),
        });
        true
    }

    /// Tells `owner` that this node now holds a ref to its object `id` (read out of a value), asking for an ack.
    ///
    /// Why the ack: whoever sent this node the value holding the ref (the owner itself, or a third node A) lets
    /// go of its own ref once this node answers it. That release and this `BORROW` may reach the owner in either
    /// order: A's travels on another path, and even the owner's own answer is not ordered behind this notice (each
    /// one-way batch rides its own QUIC stream). So this node's results wait for the acks of its pending borrows
    /// (`send_result_holding`): the sender hears back only once the owner knows of this borrow.
    pub(crate) fn borrow(self: &Arc<Self>, owner: u128, id: ObjectId) {
        let token = self.next_call.fetch_add(1, Ordering::Relaxed);
        self.borrow_acks
            .insert(token, (owner, Entry::new(ObjectId(u128::from(token)))));
        self.borrow_acks_pending.fetch_add(1, Ordering::AcqRel);
        let item = Item {
            kind: kind::BORROW,
            call: token,
            body: Bytes::copy_from_slice(&id.0.to_le_bytes()),
        };
        let delay = test_borrow_delay();
        if delay.is_zero() {
            let _ = self.results_to(NodeId(owner)).push(item);
        } else {
            let cl = self.clone();
            self.tokio.spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = cl.results_to(NodeId(owner)).push(item);
            });
        }
    }

    /// The owner registered the borrow with this token (or died).
    fn borrow_acked(&self, token: u64, result: Result<Bytes>) {
        if let Some((_, (_, e))) = self.borrow_acks.remove(&token) {
            self.borrow_acks_pending.fetch_sub(1, Ordering::AcqRel);
            e.complete(result);
        }
    }

    /// Acks a result must wait for before it goes out (empty almost always: checked without a lock).
    fn borrows_unacked(&self) -> Vec<Arc<Entry>> {
        if self.borrow_acks_pending.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        self.borrow_acks
            .iter()
            .map(|b| b.value().1.clone())
            .collect()
    }

    /// Tells `owner` that one ref announced with [`Cluster::borrow`] is gone.
    pub(crate) fn unborrow(self: &Arc<Self>, owner: u128, id: ObjectId) {
        let _ = self.results_to(NodeId(owner)).push(Item {
            kind: kind::UNBORROW,
            call: 0,
            body: Bytes::copy_from_slice(&id.0.to_le_bytes()),
        });
    }

    /// A borrower's `BORROW` or `UNBORROW` of an object this process owns.
    fn on_borrow(self: &Arc<Self>, from: NodeId, k: u16, call: u64, body: &[u8]) {
        let Some(id) = wire::id_from(body).map(ObjectId) else {
            return tracing::warn!(%from, "malformed borrow notice dropped");
        };
        let key = (from.0, id);
        if k == kind::BORROW {
            // The ack is sent as soon as this notice is handled: the registration below runs first, on this
            // thread, and an object already gone is reported lost by the borrower's fetch.
            if call != 0 {
                let _ = self.results_to(from).push(Item {
                    kind: kind::BORROW_ACK,
                    call,
                    body: Bytes::new(),
                });
            }
            let mut early = false;
            self.early_unborrows.remove_if_mut(&key, |_, n| {
                early = true;
                *n -= 1;
                *n == 0
            });
            if early {
                return;
            }
            if let Some(mut b) = self.borrowers.get_mut(&key) {
                b.0 += 1;
                return;
            }
            // An object already freed cannot be kept: the borrower's fetch will report it lost.
            let Ok(rt) = crate::runtime::current() else {
                return;
            };
            if let Some(entry) = rt.objects.lookup(id) {
                let keep = RefInner::owned(entry, rt.node, &rt.objects);
                let mut b = self.borrowers.entry(key).or_insert((0, keep));
                b.0 += 1;
            }
        } else {
            // Dropped outside the map's lock: freeing the object takes the table's.
            let mut known = false;
            let gone = self.borrowers.remove_if_mut(&key, |_, b| {
                known = true;
                b.0 = b.0.saturating_sub(1);
                b.0 == 0
            });
            drop(gone);
            if !known {
                // Its BORROW is still on the way: remembered (forgotten with the borrower, and bounded against a
                // peer that sends releases of nothing) so that BORROW registers nothing.
                if self.early_unborrows.len() < MAX_EARLY_UNBORROWS {
                    *self.early_unborrows.entry(key).or_insert(0) += 1;
                } else {
                    tracing::warn!(%from, "too many releases ahead of their borrow notices; one dropped");
                }
            }
        }
    }

    /// Tells `node` that the result of `call` it lent refs for is gone.
    pub(crate) fn release(self: &Arc<Self>, node: u128, call: u64) {
        let _ = self.results_to(NodeId(node)).push(Item {
            kind: kind::RELEASE,
            call,
            body: Bytes::new(),
        });
    }

    /// Sends a result back to its owner: batched if small, streamed into an aligned buffer if large.
    fn send_result_kind(
        self: &Arc<Self>,
        owner: NodeId,
        call: u64,
        result: Result<Bytes>,
        ok: u16,
    ) {
        let (k, body) = match result {
            Ok(b) => (ok, b),
            Err(e) => (
                kind::ERR,
                Bytes::from(serde_json::to_vec(&e).unwrap_or_default()),
            ),
        };
        if body.len() <= batch::MAX_BYTES {
            let _ = self.results_to(owner).push(Item {
                kind: k,
                call,
                body,
            });
            return;
        }
        let mesh = self.mesh.clone();
        self.tokio.spawn(async move {
            let mut header = call.to_le_bytes().to_vec();
            header.extend_from_slice(&k.to_le_bytes());
            if let Err(e) = mesh
                .send_stream(owner, kind::RESULT_STREAM, Bytes::from(header), body)
                .await
            {
                tracing::warn!(owner = %owner, call, cause = %e, "large result not delivered");
            }
        });
    }

    /// Completes the calls whose results arrived (and drops lent refs the sender released).
    fn on_results(self: &Arc<Self>, from: NodeId, body: Bytes) {
        let items = match batch::decode(&body) {
            Ok(i) => i,
            Err(e) => return tracing::warn!(cause = %e, "malformed result batch dropped"),
        };
        crate::spin::io_message(items.len() == 1);
        for item in items {
            if item.kind == kind::RELEASE {
                // Freeing thousands of refs here would hold up the calls behind this item.
                if let Some((_, refs)) = self.lent.remove(&(from.0, item.call))
                    && refs.len() > DROP_IN_BACKGROUND_FROM
                {
                    crate::object::drop_in_background(refs);
                }
                continue;
            }
            if item.kind == kind::BORROW || item.kind == kind::UNBORROW {
                self.on_borrow(from, item.kind, item.call, &item.body);
                continue;
            }
            if item.kind == kind::BORROW_ACK {
                self.borrow_acked(item.call, Ok(Bytes::new()));
                continue;
            }
            if item.kind == kind::HOLD_COPY {
                self.on_hold_copy(from, &item.body);
                continue;
            }
            if item.kind == kind::FREE_COPY {
                // Only a secondary copy: an object this node owns is in its table, and its owner frees it.
                if let Some(id) = wire::id_from(&item.body).map(ObjectId)
                    && let Ok(rt) = crate::runtime::current()
                    && rt.objects.lookup(id).is_none()
                {
                    rt.objects.store().free(id);
                }
                continue;
            }

            self.complete_call(item.call, item.kind, item.body);
        }
    }

    fn complete_call(&self, call: u64, k: u16, body: Bytes) {
        let Some((_, p)) = self.pending.remove(&call) else {
            return;
        };
        let result = if k == kind::OK || k == kind::OK_LENT || k == kind::OK_KEPT {
            if k == kind::OK_KEPT {
                // Recorded before the entry completes, so a reader placed as soon as it is ready sees the copy.
                let (node, entry) = match &p {
                    Pending::Task { node, task } => (node, &task.entry),
                    Pending::Call { node, entry, .. } => (node, entry),
                };
                entry.add_copy(node.0);
            }
            if k == kind::OK_LENT {
                let (node, entry) = match &p {
                    Pending::Task { node, task } => (node, &task.entry),
                    Pending::Call { node, entry, .. } => (node, entry),
                };
                entry.set_lender(node.0, call);
            }
            Ok(body)
        } else {
            Err(serde_json::from_slice::<Error>(&body)
                .unwrap_or_else(|e| Error::Cluster(format!("unreadable error reply: {e}"))))
        };
        match p {
            Pending::Task { task, node } => {
                self.settle_estimate(node, &task.res);
                task.entry.complete(result)
            }
            Pending::Call { entry, .. } => entry.complete(result),
        }
    }

    /// Takes back the load that `decide` charged to `node` for a task that has now finished, so a node that answers
    /// quickly keeps getting the next task (warm, and no other node has to wake) until its next report.
    fn settle_estimate(&self, node: NodeId, res: &Resources) {
        let mut view = self.view.lock();
        if let Some(info) = view.node(node) {
            let mut avail = info.available.clone();
            if avail.add(&demand(res)).is_err() || !info.total.fits(&avail) {
                avail = info.total.clone();
            }
            let q = info.queue_len.saturating_sub(1);
            view.update_local(node, &avail, q);
        }
    }

    /// Runs the calls of a batch from `from`.
    fn on_calls(self: &Arc<Self>, rt: &Arc<Runtime>, from: NodeId, body: Bytes) {
        let items = match batch::decode(&body) {
            Ok(i) => i,
            Err(e) => {
                return tracing::warn!(peer = %from, cause = %e, "malformed call batch dropped");
            }
        };
        crate::spin::io_message(items.len() == 1);
        for item in items {
            let done = Done::Remote {
                cluster: self.clone(),
                owner: from,
                call: item.call,
                keep: None,
            };
            match item.kind {
                kind::CANCEL => rt.cancel_remote(from.0, item.call),
                kind::SUBMIT => {
                    let spec = match rkyv::access::<wire::ArchivedTaskW, rkyv::rancor::Error>(
                        &item.body,
                    ) {
                        Ok(s) => s,
                        Err(e) => {
                            done.complete(Err(Error::Serialization(format!("bad task: {e}"))));
                            continue;
                        }
                    };
                    let f = registry::function(spec.function.as_str(), spec.sig.to_native());
                    let args = if f.is_ok() {
                        self.import_args(rt, &spec.args)
                    } else {
                        Vec::new()
                    };
                    let done = Done::Remote {
                        cluster: self.clone(),
                        owner: from,
                        call: item.call,
                        keep: Some(ObjectId::for_task_return(spec.task.to_native(), 0)),
                    };
                    let need = match wire::demand_of(spec) {
                        Ok(r) => r,
                        Err(e) => {
                            done.complete(Err(e));
                            continue;
                        }
                    };
                    rt.run_here(f, args, spec.attempts.to_native(), done, need);
                }
                kind::ACTOR_CALL => {
                    let call = match rkyv::access::<wire::ArchivedCallW, rkyv::rancor::Error>(
                        &item.body,
                    ) {
                        Ok(c) => c,
                        Err(e) => {
                            done.complete(Err(Error::Serialization(format!("bad call: {e}"))));
                            continue;
                        }
                    };
                    self.deliver_call(rt, call, done);
                }
                other => done.complete(Err(Error::Cluster(format!("unknown call kind {other}")))),
            }
        }
    }

    /// Hands an actor call to its actor in the caller's order.
    fn deliver_call(self: &Arc<Self>, rt: &Arc<Runtime>, call: &wire::ArchivedCallW, done: Done) {
        let actor = call.actor.to_native();
        let Some(host) = rt.actors.get(&actor).map(|h| h.clone()) else {
            return done.complete(Err(Error::ActorDied {
                actor: short(actor),
                reason: "no such actor on this node".into(),
            }));
        };
        let args = self.import_args(rt, &call.args);
        let key = (actor, call.caller.to_native());
        let slot = self.reorder.entry(key).or_default().clone();
        let mut ro = slot.lock();
        let seq = call.seq.to_native();
        if seq < ro.next {
            return done.complete(Err(Error::Cluster(format!(
                "duplicate call sequence {seq}"
            ))));
        }
        ro.pending
            .insert(seq, (call.method.to_native(), args, done));
        loop {
            let next = ro.next;
            let Some((method, args, done)) = ro.pending.remove(&next) else {
                break;
            };
            ro.next += 1;
            host.call(method, args, done);
        }
    }

    /// Waits until some node can take the task, then places it (Ray's pending-infeasible behaviour: the task runs as
    /// soon as a fitting node joins; meanwhile it is counted in `status` and logged).
    pub(crate) fn park_until_feasible(
        self: &Arc<Self>,
        rt: &Arc<Runtime>,
        task: Outgoing,
        why: String,
    ) {
        let cl = self.clone();
        let rt2 = rt.clone();
        tracing::warn!(task = %task.spec.name, reason = %why, "task cannot be placed now; it waits for a node that fits");
        cl.infeasible.fetch_add(1, Ordering::Relaxed);
        cl.parked.insert(task.entry.id, ());
        rt.tokio.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if task.entry.is_ready() {
                    // Cancelled meanwhile.
                    cl.infeasible.fetch_sub(1, Ordering::Relaxed);
                    cl.parked.remove(&task.entry.id);
                    return;
                }
                match cl.decide(&rt2, task.function, &task.res, &task.strategy, &task.args) {
                    Decision::RunLocal => {
                        cl.infeasible.fetch_sub(1, Ordering::Relaxed);
                        cl.parked.remove(&task.entry.id);
                        run_owned_here(&rt2, task);
                        return;
                    }
                    Decision::Spill(n) | Decision::RunInBundle { node: n, .. } => {
                        cl.infeasible.fetch_sub(1, Ordering::Relaxed);
                        cl.parked.remove(&task.entry.id);
                        cl.submit_remote(&rt2, n, task);
                        return;
                    }
                    Decision::Wait | Decision::Infeasible(_) => {}
                }
            }
        });
    }

    /// Asks the owner of an object for its value.
    pub(crate) fn fetch(self: &Arc<Self>, rt: &Runtime, id: u128, owner: u128) -> Arc<Entry> {
        let entry = Entry::new(ObjectId(id));
        self.fetch_into(rt, entry.clone(), owner);
        entry
    }

    /// Fetches the value of `e` (an object of `owner`) into it. Concurrent fetches of one object share one
    /// transfer, and an object fetched earlier and still held here is not fetched again.
    pub(crate) fn fetch_into(self: &Arc<Self>, rt: &Runtime, e: Arc<Entry>, owner: u128) {
        let id = e.id.0;
        // A copy kept here (this node computed the value): read in place, pinned while the entry lives.
        if let Ok(bytes) = rt.objects.store().get_bytes(e.id) {
            return e.complete(Ok(bytes));
        }
        let cl = self.clone();
        // A copy that failed is not shared: this fetch tries again.
        let copy = self
            .fetched
            .get(&id)
            .and_then(|w| w.upgrade())
            .filter(|c| !matches!(c.try_value(), Some(Err(_))));
        if let Some(other) = copy
            && !Arc::ptr_eq(&other, &e)
        {
            rt.tokio.spawn(async move {
                let v = other.wait_async().await;
                e.complete(v);
            });
            return;
        }
        // Forget copies nobody holds, now and then: the next sweep waits until the map has doubled, so many live
        // copies do not make every fetch scan them.
        if self.fetched.len() >= self.fetched_sweep_at.load(Ordering::Relaxed) {
            self.fetched.retain(|_, w| w.strong_count() > 0);
            self.fetched_sweep_at
                .store((self.fetched.len() * 2).max(4096), Ordering::Relaxed);
        }
        self.fetched.insert(id, Arc::downgrade(&e));
        let fetch = self.next_call.fetch_add(1, Ordering::Relaxed);
        self.fetching.insert(fetch, (owner, e.clone()));
        let me = rt.node;
        rt.tokio.spawn(async move {
            let r = match cl
                .mesh
                .request(
                    NodeId(owner),
                    kind::FETCH,
                    Bytes::copy_from_slice(&id.to_le_bytes()),
                    TASK_DEADLINE,
                )
                .await
            {
                Ok(msg) if msg.kind() == kind::LOCATED => {
                    cl.fetching.remove(&fetch);
                    match wire::parse_located(msg.body()) {
                        Some((size, holders)) => {
                            cl.pull(ObjectId(id), owner, me, size, &holders).await
                        }
                        None => Err(Error::Cluster(format!(
                            "malformed location reply for {}",
                            ObjectId(id)
                        ))),
                    }
                }
                Ok(msg) => reply_bytes(msg),
                Err(e) if !cl.node_alive(owner) => {
                    Err(Error::OwnerDied(format!("{} ({e})", ObjectId(id))))
                }
                Err(e) => Err(transport_err(NodeId(owner), e)),
            };
            cl.fetching.remove(&fetch);
            e.complete(r);
        });
    }

    /// Pulls a large value (`size` bytes, copies on `holders`, the owner last) into this node's store with the
    /// transfer driver, and returns it read in place (pinned for as long as the caller holds the bytes).
    ///
    /// Copies other than the owner's are tried first: every large result of the owner's tasks already lands on the
    /// owner (often the driver), so readers spread over the other copies and fall back on the owner's.
    async fn pull(
        self: &Arc<Self>,
        id: ObjectId,
        owner: u128,
        me: u128,
        size: u64,
        holders: &[u128],
    ) -> Result<Bytes> {
        let copies: Vec<NodeId> = holders
            .iter()
            .filter(|h| **h != owner && **h != me)
            .map(|h| NodeId(*h))
            .collect();
        let fallback: Vec<NodeId> = holders
            .iter()
            .filter(|h| **h == owner && **h != me)
            .map(|h| NodeId(*h))
            .collect();
        let mut again = true;
        loop {
            match self
                .transfer
                .pull_with_fallback(id, size, &copies, &fallback)
                .await
            {
                Ok(()) => match self.transfer.store().get_bytes(id) {
                    Ok(bytes) => {
                        // The owner names this copy to later fetchers and has it freed with the object.
                        self.hold_copy(owner, id);
                        return Ok(bytes);
                    }
                    // A secondary copy not pinned yet may be dropped under memory pressure: pull it once more.
                    Err(oxray_objstore::ObjectStoreError::NotFound(_)) if again => again = false,
                    Err(e) => return Err(crate::object::store_error(e)),
                },
                Err(PullError::ObjectLost { tried, .. }) if !self.node_alive(owner) => {
                    return Err(Error::OwnerDied(format!(
                        "{id} (no copy left; tried {tried:?})"
                    )));
                }
                Err(e @ PullError::ObjectLost { .. }) => {
                    return Err(Error::ObjectLost(e.to_string()));
                }
                Err(e @ PullError::StoreFull { .. }) => {
                    return Err(Error::ObjectStoreFull(e.to_string()));
                }
                Err(e) => return Err(Error::Cluster(e.to_string())),
            }
        }
    }

    /// Tells `owner` that this node now holds a secondary copy of its object `id`.
    fn hold_copy(self: &Arc<Self>, owner: u128, id: ObjectId) {
        let _ = self.results_to(NodeId(owner)).push(Item {
            kind: kind::HOLD_COPY,
            call: 0,
            body: Bytes::copy_from_slice(&id.0.to_le_bytes()),
        });
    }

    /// A fetcher's `HOLD_COPY`: recorded on the entry, or, for an object already gone, freed at once.
    fn on_hold_copy(self: &Arc<Self>, from: NodeId, body: &[u8]) {
        let Some(id) = wire::id_from(body).map(ObjectId) else {
            return tracing::warn!(%from, "malformed copy notice dropped");
        };
        let Ok(rt) = crate::runtime::current() else {
            return;
        };
        match rt.objects.lookup(id) {
            Some(entry) => entry.add_copy(from.0),
            None => self.free_copy(from.0, id),
        }
    }

    /// Answers a fetch of a known value: small values in the reply; for large ones, where to pull them from (this
    /// node last, the other live copies first).
    fn answer_fetch(&self, reply: Responder, entry: &Entry, to: NodeId, me: u128) {
        match entry.serve(batch::MAX_BYTES) {
            None => reply_err(
                reply,
                &Error::Cluster(format!("{} is not known yet", entry.id)),
            ),
            Some(Err(e)) => reply_err(reply, &e),
            Some(Ok(Serve::Inline(b))) => reply.send(kind::OK, b),
            Some(Ok(Serve::Stored(size))) => {
                let mut holders: Vec<u128> = entry
                    .copy_holders()
                    .into_iter()
                    .filter(|n| *n != to.0 && !self.node_known_dead(*n))
                    .collect();
                holders.push(me);
                reply.send(kind::LOCATED, Bytes::from(wire::located(size, &holders)));
            }
        }
    }

    /// Turns wire arguments into local ones, starting fetches for refs owned elsewhere.
    pub(crate) fn import_args(
        self: &Arc<Self>,
        rt: &Runtime,
        args: &rkyv::Archived<Vec<ArgW>>,
    ) -> Vec<Arg> {
        args.iter()
            .map(|a| match a {
                wire::ArchivedArgW::Value(v) => {
                    Arg(ArgKind::Value(value::aligned_copy(v.as_slice())))
                }
                wire::ArchivedArgW::Ref { id, owner } => {
                    let (id, owner) = (id.to_native(), owner.to_native());
                    let entry = if owner == rt.node {
                        rt.objects.lookup(ObjectId(id)).unwrap_or_else(|| {
                            let e = Entry::new(ObjectId(id));
                            e.complete(Err(Error::ObjectLost(ObjectId(id).to_string())));
                            e
                        })
                    } else {
                        self.fetch(rt, id, owner)
                    };
                    Arg(ArgKind::Ref(RefInner::borrowed(entry, owner)))
                }
            })
            .collect()
    }

    /// Sends an actor call to the actor's current incarnation (after it exists); `entry` completes with the result.
    /// `retries` is how often the call is sent again if the actor's node dies and the actor is restarted.
    pub(crate) fn call_remote(
        self: &Arc<Self>,
        rt: &Runtime,
        actor: &Arc<RemoteActor>,
        method: u32,
        args: Vec<Arg>,
        entry: Arc<Entry>,
        retries: u32,
    ) {
        // A handle that did not create the actor learns of a restart from the directory, when its next call finds
        // the old node dead (the creator's handles are moved by `restart_actor` itself).
        let home = actor.node();
        if self.node_known_dead(home.0) {
            match &actor.restart {
                // This family restarts it itself (`restart_actor`), unless it has no restarts left: then nothing
                // will bring it back, so fail now rather than wait on a node that is gone.
                Some(r) if r.lock().left > 0 => {}
                Some(_) => {
                    return entry.complete(Err(Error::ActorDied {
                        actor: short(actor.id),
                        reason: format!("its node {home} died and it has no restarts left"),
                    }));
                }
                None => {
                    return self.follow_then_call(rt, actor, home, method, args, entry, retries);
                }
            }
        }
        let route = actor.route();
        let call = CallW {
            actor: actor.id,
            caller: route.caller,
            seq: route.seq,
            method,
            args: Cluster::wire_args(&args, rt.node),
        };
        let body = match rkyv::to_bytes::<rkyv::rancor::Error>(&call) {
            Ok(b) => Bytes::from_owner(b),
            Err(e) => return entry.complete(Err(Error::Serialization(e.to_string()))),
        };
        if body.len() > batch::MAX_ITEM_BYTES {
            return entry.complete(Err(Error::InvalidArgument(format!(
                "the call's arguments take {} bytes; pass large values with oxray::put and a ref",
                body.len()
            ))));
        }
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let cl = self.clone();
        let node = route.node;
        let actor = actor.clone();
        let seq = route.seq;
        let send = move |entry: Arc<Entry>| {
            cl.pending.insert(
                id,
                Pending::Call {
                    node,
                    actor,
                    entry,
                    args,
                    method,
                    seq,
                    retries,
                },
            );
            if cl
                .calls_to(node)
                .push(Item {
                    kind: kind::ACTOR_CALL,
                    call: id,
                    body,
                })
                .is_err()
                && let Some((_, p)) = cl.pending.remove(&id)
            {
                cl.fail_pending(p, "the sender to that node stopped");
            }
        };
        let created = route.created;
        match created.try_value() {
            Some(Ok(_)) => send(entry),
            Some(Err(e)) => entry.complete(Err(e)),
            None => {
                // The actor is still being created: send once it exists (the call's sequence number keeps the order).
                rt.tokio.spawn(async move {
                    match created.wait_async().await {
                        Ok(_) => send(entry),
                        Err(e) => entry.complete(Err(e)),
                    }
                });
            }
        }
    }

    /// Sends a call through a handle whose actor's node `dead` died once the handle has followed the actor to its
    /// new home (or fails the call if it cannot).
    #[allow(clippy::too_many_arguments)]
    fn follow_then_call(
        self: &Arc<Self>,
        rt: &Runtime,
        actor: &Arc<RemoteActor>,
        dead: NodeId,
        method: u32,
        args: Vec<Arg>,
        entry: Arc<Entry>,
        retries: u32,
    ) {
        let cl = self.clone();
        let actor = actor.clone();
        rt.tokio.spawn(async move {
            let followed = cl.follow_restart(&actor, dead).await;
            match followed.and_then(|()| crate::runtime::current()) {
                Ok(rt) => cl.call_remote(&rt, &actor, method, args, entry, retries),
                Err(e) => entry.complete(Err(e)),
            }
        });
    }

    /// Waits (bounded) until the directory names a live new home for `actor`, whose node `dead` died, and moves the
    /// handle family there. Fails with `ActorDied` if the actor cannot restart or no new home is recorded in time.
    async fn follow_restart(
        self: &Arc<Self>,
        actor: &Arc<RemoteActor>,
        dead: NodeId,
    ) -> Result<()> {
        let died = |reason: String| Error::ActorDied {
            actor: short(actor.id),
            reason,
        };
        let deadline = Instant::now() + crate::runtime::RESTART_LOOKUP_WAIT;
        loop {
            // Another call of this family may have followed it already.
            if actor.node() != dead {
                return Ok(());
            }
            let rt = crate::runtime::current()?;
            match crate::control::actor_home(&rt, actor.id).await? {
                None => return Err(died(format!("its node {dead} died"))),
                Some((node, _, _)) if node != dead.0 && !self.node_known_dead(node) => {
                    actor.moved_from(dead, NodeId(node));
                    return Ok(());
                }
                Some((_, restarts, max)) if restarts >= max => {
                    return Err(died(format!(
                        "its node {dead} died and it has no restarts left"
                    )));
                }
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(died(format!(
                    "its node {dead} died and no restarted incarnation was recorded within {:?}",
                    crate::runtime::RESTART_LOOKUP_WAIT
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Remembers an actor this process created with `max_restarts`, to restart it if its node dies.
    pub(crate) fn watch_restartable(&self, actor: &Arc<RemoteActor>) {
        self.restartable.insert(actor.id, Arc::downgrade(actor));
    }

    /// Restarts `actor` (whose node died) on another node, if it has restarts left. Returns whether it did.
    fn restart_actor(self: &Arc<Self>, rt: &Arc<Runtime>, actor: &Arc<RemoteActor>) -> bool {
        let Some(restart) = &actor.restart else {
            return false;
        };
        let mut r = restart.lock();
        if r.left == 0 {
            return false;
        }
        let target = match self.decide(rt, r.function, &r.res, &r.strategy, &r.args) {
            Decision::RunLocal => NodeId(rt.node),
            Decision::Spill(n) | Decision::RunInBundle { node: n, .. } => n,
            Decision::Wait | Decision::Infeasible(_) => {
                tracing::warn!(actor = %short(actor.id), "actor's node died and no node can host it now");
                return false;
            }
        };
        r.left -= 1;
        r.done += 1;
        tracing::warn!(actor = %short(actor.id), node = %target, restart = r.done, "actor's node died; restarting it");
        let created = self.create_remote(rt, target, r.spec.clone(), r.args.clone());
        actor.moved(target, created);
        crate::control::actor_moved(rt, actor.id, target.0, r.done);
        true
    }

    /// Creates an actor on `node`; the returned entry completes when it exists (or failed to).
    pub(crate) fn create_remote(
        self: &Arc<Self>,
        rt: &Runtime,
        node: NodeId,
        spec: CreateW,
        args: Vec<Arg>,
    ) -> Arc<Entry> {
        let created = Entry::new(ObjectId::random());
        let done = created.clone();
        let cl = self.clone();
        rt.tokio.spawn(async move {
            let body = match rkyv::to_bytes::<rkyv::rancor::Error>(&spec) {
                Ok(b) => Bytes::from_owner(b),
                Err(e) => return done.complete(Err(Error::Serialization(e.to_string()))),
            };
            let r = match cl
                .mesh
                .request(node, kind::CREATE_ACTOR, body, TASK_DEADLINE)
                .await
            {
                Ok(msg) => reply_bytes(msg),
                Err(e) => Err(Error::ActorDied {
                    actor: short(spec.actor),
                    reason: format!("creation failed: {e}"),
                }),
            };
            done.complete(r);
            drop(args);
        });
        created
    }

    pub(crate) async fn control(&self, to: NodeId, k: u16, body: Bytes) -> Result<Bytes, Error> {
        let msg = self
            .mesh
            .request(to, k, body, CONTROL_DEADLINE)
            .await
            .map_err(|e| transport_err(to, e))?;
        reply_bytes(msg)
    }

    pub(crate) fn send_oneway(&self, rt: &Runtime, to: NodeId, k: u16, body: Bytes) {
        let mesh = self.mesh.clone();
        rt.tokio.spawn(async move {
            if let Err(e) = mesh.send(to, k, body).await {
                tracing::warn!(node = %to, cause = %e, "one-way message not delivered");
            }
        });
    }

    /// Gathers every node's state (head only).
    async fn cluster_state(self: &Arc<Self>, rt: &Arc<Runtime>) -> wire::ClusterState {
        // The head's own register, not the copy its heartbeat refreshes: a node that joined a moment ago is asked too.
        let members = match &self.head_state {
            Some(h) => h.members.lock().values().cloned().collect(),
            None => self.members(),
        };
        let mut futs = Vec::new();
        for m in members.iter().filter(|m| m.alive) {
            if m.id == rt.node {
                continue;
            }
            let cl = self.clone();
            let id = m.id;
            futs.push((
                id,
                rt.tokio.spawn(async move {
                    // One retry: a node busy with a burst of work can miss one deadline without being gone.
                    let mut last = None;
                    for _ in 0..2 {
                        match cl.control(NodeId(id), kind::NODE_STATE, Bytes::new()).await {
                            Ok(b) => return Ok(b),
                            Err(e) => last = Some(e),
                        }
                    }
                    Err(last.expect("tried"))
                }),
            ));
        }
        let mut nodes = vec![crate::state::snapshot(rt, Some(self.addr.to_string()))];
        let mut unreachable = std::collections::HashSet::new();
        for (id, f) in futs {
            let state = match f.await {
                Ok(Ok(b)) => serde_json::from_slice::<crate::state::NodeState>(&b)
                    .map_err(|e| Error::Cluster(format!("bad node state: {e}"))),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::Cluster(e.to_string())),
            };
            match state {
                Ok(s) => nodes.push(s),
                Err(e) => {
                    tracing::warn!(node = %NodeId(id), cause = %e, "node did not report its state");
                    unreachable.insert(id);
                }
            }
        }
        let named = nodes
            .iter()
            .flat_map(|n| &n.actors)
            .filter_map(|a| a.name.clone().map(|name| (name, a.id.clone())))
            .collect();
        wire::ClusterState {
            nodes,
            members: members
                .into_iter()
                .map(|m| wire::MemberSummary {
                    id: short(m.id),
                    address: m.addr,
                    cpus: m.cpus,
                    free_cpus: m.free_cpus,
                    queued: m.queued,
                    alive: m.alive,
                    head: m.is_head,
                    reachable: m.alive && !unreachable.contains(&m.id),
                })
                .collect(),
            named_actors: named,
        }
    }
}

/// Runs a task this node owns (one it had placed elsewhere, or parked) on this node's queue after all.
fn run_owned_here(rt: &Arc<Runtime>, task: Outgoing) {
    let need = (demand(&task.res), bundle_of(&task.strategy));
    rt.run_here(
        spec_function(&task.spec),
        task.args,
        task.spec.attempts,
        Done::Entry(task.entry),
        need,
    );
}

fn spec_function(spec: &TaskW) -> std::result::Result<&'static registry::FunctionEntry, Error> {
    registry::function(&spec.function, spec.sig)
}

impl Handler for NodeHandler {
    fn on_request(&self, msg: Message, reply: Responder) {
        if let Some(g) = self.gcs_for(msg.kind()) {
            return g.on_request(msg, reply);
        }
        let Some(rt) = self.rt() else {
            reply.error("node is starting or stopping");
            return;
        };
        let Some(cl) = rt.cluster.get().cloned() else {
            reply.error("node is not in cluster mode");
            return;
        };
        if Transfer::handles(msg.kind()) {
            return cl.transfer.on_request(msg, reply);
        }
        match msg.kind() {
            kind::CREATE_ACTOR => {
                let spec = match msg.archived::<CreateW>() {
                    Ok(s) => s,
                    Err(e) => return reply.error(format!("bad actor spec: {e}")),
                };
                let args = cl.import_args(&rt, &spec.args);
                match rt.host_actor(spec, args) {
                    Ok(()) => reply.send(kind::OK, Bytes::new()),
                    Err(e) => reply_err(reply, &e),
                }
            }
            kind::FETCH => {
                let Some(id) = wire::id_from(msg.body()) else {
                    return reply.error("bad object id");
                };
                let to = msg.source();
                match rt.objects.lookup(ObjectId(id)) {
                    None => reply_err(reply, &Error::ObjectLost(ObjectId(id).to_string())),
                    Some(entry) if entry.is_ready() => cl.answer_fetch(reply, &entry, to, rt.node),
                    Some(entry) => {
                        let me = rt.node;
                        rt.tokio.spawn(async move {
                            entry.wait_known().await;
                            cl.answer_fetch(reply, &entry, to, me);
                        });
                    }
                }
            }
            kind::NODE_STATE => {
                let mut s = crate::state::snapshot(&rt, Some(cl.addr.to_string()));
                s.node.infeasible = cl.infeasible.load(Ordering::Relaxed) as usize;
                reply_json(reply, &s)
            }
            kind::REGISTER | kind::HEARTBEAT if cl.is_head() => {
                let h = cl.head_state.as_ref().expect("head");
                if msg.kind() == kind::REGISTER {
                    let m: Member = match serde_json::from_slice(msg.body()) {
                        Ok(m) => m,
                        Err(e) => return reply.error(format!("bad member: {e}")),
                    };
                    let now = h.epoch.elapsed().as_millis() as u64;
                    tracing::info!(node = %NodeId(m.id), addr = %m.addr, cpus = m.cpus, "node joined");
                    h.detector.lock().heartbeat(NodeId(m.id), now);
                    h.members.lock().insert(m.id, m);
                    let all: Vec<Member> = h.members.lock().values().cloned().collect();
                    reply_json(reply, &all);
                } else {
                    let load: Load = match serde_json::from_slice(msg.body()) {
                        Ok(l) => l,
                        Err(e) => return reply.error(format!("bad load report: {e}")),
                    };
                    // A node this head does not know (the head restarted) registers again; one it declared dead
                    // stays dead (its work was failed or placed elsewhere) and is told so.
                    let known = h.members.lock().get(&load.id).map(|m| m.alive);
                    match known {
                        None => reply.send(kind::REREGISTER, Bytes::new()),
                        Some(false) => reply.send(kind::DECLARED_DEAD, Bytes::new()),
                        Some(true) => {
                            let all = cl.head_heartbeat(h, &load);
                            reply_json(reply, &all);
                        }
                    }
                }
            }
            kind::PG_PREPARE | kind::PG_RELEASE => {
                let hold: crate::pg::BundleHold = match serde_json::from_slice(msg.body()) {
                    Ok(h) => h,
                    Err(e) => return reply.error(format!("bad bundle request: {e}")),
                };
                let r = if msg.kind() == kind::PG_PREPARE {
                    rt.hold_bundles(&hold)
                } else {
                    rt.release_bundles(&hold)
                };
                match r {
                    Ok(()) => reply.send(kind::OK, Bytes::new()),
                    Err(e) => reply_err(reply, &e),
                }
            }
            kind::CLUSTER_STATE if cl.is_head() => {
                let rt2 = rt.clone();
                rt.tokio.spawn(async move {
                    let s = cl.cluster_state(&rt2).await;
                    reply_json(reply, &s);
                });
            }
            other => reply.error(format!("unknown request kind {other}")),
        }
    }

    fn on_oneway(&self, msg: Message) {
        if let Some(g) = self.gcs_for(msg.kind()) {
            return g.on_oneway(msg);
        }
        let Some(rt) = self.rt() else { return };
        match msg.kind() {
            kind::CALLS => {
                if let Some(cl) = rt.cluster.get().cloned() {
                    let from = msg.source();
                    cl.on_calls(&rt, from, msg.into_body());
                }
            }
            kind::RESULTS => {
                if let Some(cl) = rt.cluster.get().cloned() {
                    let from = msg.source();
                    cl.on_results(from, msg.into_body());
                }
            }
            kind::KILL_ACTOR => {
                if let Some(id) = wire::id_from(msg.body())
                    && let Some(h) = rt.actors.get(&id)
                {
                    h.kill("it was killed with oxray::kill");
                }
            }
            kind::STOP => {
                tracing::info!("stop requested; exiting");
                if let Some(cl) = rt.cluster.get().cloned()
                    && cl.is_head()
                {
                    // The head passes the stop on to every node before it goes.
                    let rt2 = rt.clone();
                    rt.tokio.spawn(async move {
                        for m in cl.members() {
                            if m.id != rt2.node && m.alive {
                                let _ = cl.mesh.send(NodeId(m.id), kind::STOP, Bytes::new()).await;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        std::process::exit(0);
                    });
                } else {
                    std::thread::spawn(|| {
                        std::thread::sleep(Duration::from_millis(50));
                        std::process::exit(0);
                    });
                }
            }
            _ => {}
        }
    }

    fn on_stream(&self, header: Message, mut incoming: IncomingStream) {
        if let Some(g) = self.gcs_for(header.kind()) {
            return g.on_stream(header, incoming);
        }
        let Some(cl) = self.rt().and_then(|rt| rt.cluster.get().cloned()) else {
            return incoming.error("node is not in cluster mode");
        };
        if Transfer::handles(header.kind()) {
            return cl.transfer.on_stream(header, incoming);
        }
        if header.kind() != kind::RESULT_STREAM || header.body().len() < 10 {
            return incoming.error("unexpected stream");
        }
        let b = header.body();
        let call = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let k = u16::from_le_bytes([b[8], b[9]]);
        let tokio = cl.tokio.clone();
        tokio.spawn(async move {
            match incoming.read_all().await {
                Ok(body) => {
                    cl.complete_call(call, k, body);
                    incoming.reply(kind::OK, Bytes::new());
                }
                Err(e) => {
                    tracing::warn!(call, cause = %e, "large result stream failed");
                    incoming.error(format!("read failed: {e}"));
                }
            }
        });
    }

    fn on_peer_lost(&self, node: NodeId) {
        tracing::debug!(peer = %node, "connection lost");
        if let Some(cl) = self.rt().and_then(|rt| rt.cluster.get().cloned()) {
            cl.transfer.on_peer_lost(node);
        }
    }
}
