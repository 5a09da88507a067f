//! The adapter between the GCS's network seams and the QUIC mesh (`oxray-transport`).
//!
//! - [`MeshPeers`] implements [`PeerNetwork`]: Raft messages go out as one-way mesh messages to the member's
//!   node. One sender task per member drains everything queued for it into one message ([`KIND_RAFT`] for a
//!   lone message, [`KIND_RAFT_BATCH`] for several), so a busy shard costs one QUIC stream per peer per
//!   drain instead of one per message, and messages to one peer arrive in the order they were sent. Those
//!   above [`STREAM_THRESHOLD`] (snapshots) are streamed ([`KIND_RAFT_STREAM`]) so they are not bound by the
//!   transport's message size limit.
//! - [`MeshConnector`] implements [`Connector`]: client requests are mesh requests of kind [`KIND_REQUEST`].
//! - [`GcsService`] answers both on the receiving node. A node whose mesh serves other things too routes
//!   these kinds to [`GcsService::on_request`] / [`GcsService::on_oneway`] from its own handler; a mesh that
//!   serves only the GCS can use [`GcsService`] directly as its [`Handler`].
//!
//! Bodies are the encodings of [`crate::wire`]; nothing here makes decisions.
//!
//! Three small control kinds let a node running `start` learn and join the replica group without a second
//! protocol: [`KIND_MEMBERS`] (the member table, answered by any member), [`KIND_STATUS`] (one member's
//! [`ShardStatus`] list, for `oxray status` and tests) and [`KIND_CLAIM`] (a bootstrap slot request, answered by
//! whatever hook the head installed with [`GcsService::set_claim_handler`]; the slot policy is the caller's).
//! A fourth, [`KIND_CHANGE`], asks a member to propose one Raft membership change ([`MemberChange`]); only the
//! node set with [`GcsService::set_coordinator`] (the head) may send it, except a leadership transfer.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use oxray_transport::{Handler, Mesh, Message, NodeId, Responder};

use crate::client::{CallError, Connector};
use crate::replica::{MemberChange, ReplicaError};
use crate::server::{GcsServer, PeerNetwork, ShardStatus};
use crate::wire::{MAX_RAFT_BATCH, Request, Response, decode_raft_batch, encode_raft_batch};

/// Mesh message kind of a client request to a GCS member (answered with [`KIND_RESPONSE`]).
pub const KIND_REQUEST: u16 = 0x0300;
/// Mesh message kind of a GCS member's answer.
pub const KIND_RESPONSE: u16 = 0x0301;
/// Mesh message kind of a one-way Raft message between GCS members.
pub const KIND_RAFT: u16 = 0x0302;
/// Mesh stream kind of a large Raft message (a snapshot) streamed between GCS members.
pub const KIND_RAFT_STREAM: u16 = 0x0303;
/// Mesh message kind asking a member for the member table (empty body; answered with [`encode_members`]).
pub const KIND_MEMBERS: u16 = 0x0304;
/// Mesh message kind asking a member for its shard replicas' status (answered with [`encode_status`]).
pub const KIND_STATUS: u16 = 0x0305;
/// Mesh message kind claiming a bootstrap replica slot (body and answer are defined by the claim hook).
pub const KIND_CLAIM: u16 = 0x0306;
/// Mesh message kind asking a member to propose one membership change (body [`encode_change`], answer
/// [`encode_change_result`]); accepted only from the coordinator node.
pub const KIND_CHANGE: u16 = 0x0308;
/// Mesh message kind of several one-way Raft messages between GCS members, in order (see
/// [`crate::wire::encode_raft_batch`]).
pub const KIND_RAFT_BATCH: u16 = 0x0307;

/// Raft messages queued per peer member before new ones are dropped (Raft retransmits what is lost). Only a
/// peer that is down or far slower than the network lets the queue fill.
pub const RAFT_QUEUE: usize = 4096;
/// Most bytes of Raft messages packed into one [`KIND_RAFT_BATCH`] message (one more message may overshoot
/// it by at most [`STREAM_THRESHOLD`]; both together stay far below the transport's message limit).
pub const RAFT_BATCH_BYTES: usize = 4 << 20;

/// Most members a member table may list. Raft groups beyond 7 voters only slow commits down, and the bound
/// keeps a decoded table from a peer small.
pub const MAX_MEMBERS: usize = 7;

/// What the head answers a [`KIND_CLAIM`] with: the reply body, or an error shown to the claimant.
pub type ClaimHandler = Arc<dyn Fn(NodeId, &[u8]) -> Result<Bytes, String> + Send + Sync>;

/// Which node hosts each member, shared by a node's [`MeshPeers`], [`MeshConnector`] and [`GcsService`].
///
/// A member's Raft identity (its member id, its log) is fixed, but the node hosting it is not: a replica restarted
/// from its data dir joins the mesh under a new node id, because a node id's death is final in the cluster's
/// failure detector. The table is versioned; whoever assigns slots (the head) bumps the version on each change,
/// and holders apply only newer tables. Holders that see a sign of staleness (a Raft message from a node the
/// table does not name, a send or call that fails) call [`MemberTable::suspect_stale`], which wakes whoever
/// refreshes the table ([`MemberTable::stale`]).
#[derive(Debug)]
pub struct MemberTable {
    table: parking_lot::RwLock<(u64, BTreeMap<u64, NodeId>)>,
    stale: tokio::sync::Notify,
}

impl MemberTable {
    /// A table at `version` (member id → node id).
    pub fn new(version: u64, members: BTreeMap<u64, NodeId>) -> Arc<MemberTable> {
        Arc::new(MemberTable {
            table: parking_lot::RwLock::new((version, members)),
            stale: tokio::sync::Notify::new(),
        })
    }

    /// The node hosting `member`.
    pub fn node(&self, member: u64) -> Option<NodeId> {
        self.table.read().1.get(&member).copied()
    }

    /// Whether `node` hosts `member` according to this table.
    pub fn hosts(&self, member: u64, node: NodeId) -> bool {
        self.node(member) == Some(node)
    }

    /// Whether `node` hosts any member.
    pub fn is_member_node(&self, node: NodeId) -> bool {
        self.table.read().1.values().any(|n| *n == node)
    }

    /// The version and the table.
    pub fn snapshot(&self) -> (u64, BTreeMap<u64, NodeId>) {
        self.table.read().clone()
    }

    /// The member ids, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.table.read().1.keys().copied().collect()
    }

    /// Replaces the table if `version` is newer; returns whether it did. Members may come and go between
    /// versions (the group grows by membership changes); the table lists every member Raft may address,
    /// learners included, so it is updated before a member is added to the group.
    pub fn update(&self, version: u64, members: BTreeMap<u64, NodeId>) -> bool {
        let mut t = self.table.write();
        if version <= t.0 || members.is_empty() || members.len() > MAX_MEMBERS {
            return false;
        }
        *t = (version, members);
        true
    }

    /// Reports a sign that the table may be out of date.
    pub fn suspect_stale(&self) {
        self.stale.notify_one();
    }

    /// Waits for [`MemberTable::suspect_stale`].
    pub async fn stale(&self) {
        self.stale.notified().await
    }
}

/// Raft messages larger than this (in practice only snapshots) are streamed rather than sent as one mesh
/// message, which the transport caps at `max_message_bytes` (64 MiB by default).
pub const STREAM_THRESHOLD: usize = 8 << 20;

/// Sends Raft traffic over the mesh. Member ids map to node ids through a [`MemberTable`].
#[derive(Debug)]
pub struct MeshPeers {
    mesh: OnceLock<Mesh>,
    members: Arc<MemberTable>,
    runtime: tokio::runtime::Handle,
    /// The queue of each peer member's sender task (started on the first message to it).
    queues: parking_lot::Mutex<BTreeMap<u64, flume::Sender<Bytes>>>,
}

impl MeshPeers {
    /// A peer network over `members` (member id → node id). Call [`MeshPeers::attach`] once the mesh is
    /// bound (the mesh needs its handler first, and the handler needs the server, which needs this).
    /// Must be created inside a tokio runtime: sends are spawned on it.
    pub fn new(members: BTreeMap<u64, NodeId>) -> Arc<MeshPeers> {
        MeshPeers::with_table(MemberTable::new(0, members))
    }

    /// [`MeshPeers::new`] over a shared, updatable table.
    pub fn with_table(members: Arc<MemberTable>) -> Arc<MeshPeers> {
        Arc::new(MeshPeers {
            mesh: OnceLock::new(),
            members,
            runtime: tokio::runtime::Handle::current(),
            queues: parking_lot::Mutex::new(BTreeMap::new()),
        })
    }

    /// Sets the mesh to send through (later calls are ignored).
    pub fn attach(&self, mesh: Mesh) {
        let _ = self.mesh.set(mesh);
    }
}

impl PeerNetwork for MeshPeers {
    fn send_raft(&self, to: u64, msg: Bytes) {
        let Some(mesh) = self.mesh.get() else {
            return;
        };
        if msg.len() > STREAM_THRESHOLD {
            // A snapshot: streamed on its own, off the queue, so it never holds small messages back.
            let Some(node) = self.members.node(to) else {
                return;
            };
            let (mesh, table) = (mesh.clone(), self.members.clone());
            self.runtime.spawn(async move {
                let res = mesh
                    .send_stream(node, KIND_RAFT_STREAM, Bytes::new(), msg)
                    .await;
                if let Err(e) = res {
                    tracing::debug!(to = %node, cause = %e, "raft snapshot send failed");
                    table.suspect_stale();
                }
            });
            return;
        }
        // Called from a shard thread: the queue hands the message to this peer's sender task.
        let tx = {
            let mut queues = self.queues.lock();
            queues
                .entry(to)
                .or_insert_with(|| {
                    let (tx, rx) = flume::bounded(RAFT_QUEUE);
                    self.runtime
                        .spawn(raft_sender(mesh.clone(), self.members.clone(), to, rx));
                    tx
                })
                .clone()
        };
        if tx.try_send(msg).is_err() {
            tracing::debug!(to, "raft queue full; message dropped");
        }
    }
}

/// Sends the Raft messages queued for member `to`: everything queued at once goes out as one mesh message,
/// one at a time, so messages to one peer keep their order. Ends when the [`MeshPeers`] is dropped. Failures
/// are dropped (Raft retransmits) and make the member table suspect.
async fn raft_sender(mesh: Mesh, table: Arc<MemberTable>, to: u64, rx: flume::Receiver<Bytes>) {
    let mut msgs = Vec::new();
    while let Ok(first) = rx.recv_async().await {
        let mut bytes = first.len();
        msgs.push(first);
        while msgs.len() < MAX_RAFT_BATCH && bytes < RAFT_BATCH_BYTES {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.len();
                    msgs.push(m);
                }
                Err(_) => break,
            }
        }
        let Some(node) = table.node(to) else {
            // Raft addresses a member this table does not list yet: one just added to the group.
            msgs.clear();
            table.suspect_stale();
            continue;
        };
        let (kind, body) = if msgs.len() == 1 {
            (KIND_RAFT, msgs.pop().unwrap_or_default())
        } else {
            let body = encode_raft_batch(&msgs);
            msgs.clear();
            (KIND_RAFT_BATCH, body)
        };
        if let Err(e) = mesh.send(node, kind, body).await {
            tracing::debug!(to = %node, cause = %e, "raft send failed");
            // The member may have moved to a new node.
            table.suspect_stale();
        }
    }
}

/// Calls GCS members over the mesh.
#[derive(Debug, Clone)]
pub struct MeshConnector {
    mesh: Mesh,
    members: Arc<MemberTable>,
    timeout: Duration,
}

impl MeshConnector {
    /// A connector over `mesh` to `members` (member id → node id); each request waits at most `timeout`
    /// (the client also applies its own deadlines; this bounds one attempt on the wire).
    pub fn new(
        mesh: Mesh,
        members: BTreeMap<u64, NodeId>,
        timeout: Duration,
    ) -> Arc<MeshConnector> {
        MeshConnector::with_table(mesh, MemberTable::new(0, members), timeout)
    }

    /// [`MeshConnector::new`] over a shared, updatable table.
    pub fn with_table(
        mesh: Mesh,
        members: Arc<MemberTable>,
        timeout: Duration,
    ) -> Arc<MeshConnector> {
        Arc::new(MeshConnector {
            mesh,
            members,
            timeout,
        })
    }
}

impl Connector for MeshConnector {
    fn call(
        &self,
        member: u64,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, CallError>> + Send + '_>> {
        Box::pin(async move {
            let node = self
                .members
                .node(member)
                .ok_or_else(|| CallError::Unreachable(format!("unknown member {member}")))?;
            let reply = self
                .mesh
                .request(node, KIND_REQUEST, req.encode(), self.timeout)
                .await
                .map_err(|e| {
                    // The member may have moved to a new node.
                    self.members.suspect_stale();
                    CallError::Unreachable(e.to_string())
                })?;
            if reply.kind() != KIND_RESPONSE {
                return Err(CallError::BadResponse(format!(
                    "message kind {:#x}",
                    reply.kind()
                )));
            }
            Response::decode(reply.body()).map_err(|e| CallError::BadResponse(e.to_string()))
        })
    }

    fn members(&self) -> Option<Vec<u64>> {
        Some(self.members.ids())
    }

    fn unknown_member(&self, _member: u64) {
        self.members.suspect_stale();
    }

    fn no_answer(&self, _member: u64) {
        // The client's attempt deadline is usually shorter than `timeout`, so a call to a node that is gone
        // (a replica restarted under a new node id, its old address silent) ends there and never reaches the
        // error path above. Without this, a client whose table still names the old node, redirected there by
        // the others' leader hints, times out at it until the periodic refresh, longer than a call's deadline.
        self.members.suspect_stale();
    }
}

/// Serves GCS requests and Raft messages arriving over the mesh for one member.
///
/// A Raft message is accepted only if the mesh-authenticated sender is the node of the member the message
/// claims to come from, so a node that is not a member cannot vote or append.
pub struct GcsService {
    /// Replaceable, so a member restarted in-process (from its files) can take over the same endpoint.
    server: parking_lot::RwLock<Option<GcsServer>>,
    members: Arc<MemberTable>,
    claims: OnceLock<ClaimHandler>,
    /// The only node whose [`KIND_CHANGE`] requests are obeyed (the head, which decides membership).
    coordinator: OnceLock<NodeId>,
}

impl std::fmt::Debug for GcsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsService")
            .field("server", &*self.server.read())
            .field("members", &self.members)
            .field("hands_out_slots", &self.claims.get().is_some())
            .finish()
    }
}

impl GcsService {
    /// A service for a cluster of `members` (member id → node id), with no server yet (requests fail until
    /// [`GcsService::attach`]).
    pub fn new(members: BTreeMap<u64, NodeId>) -> Arc<GcsService> {
        GcsService::with_table(MemberTable::new(0, members))
    }

    /// [`GcsService::new`] over a shared, updatable table.
    pub fn with_table(members: Arc<MemberTable>) -> Arc<GcsService> {
        Arc::new(GcsService {
            server: parking_lot::RwLock::new(None),
            members,
            claims: OnceLock::new(),
            coordinator: OnceLock::new(),
        })
    }

    /// Sets the node allowed to ask for membership changes ([`KIND_CHANGE`]); later calls are ignored.
    /// Without one, every change request is refused.
    pub fn set_coordinator(&self, node: NodeId) {
        let _ = self.coordinator.set(node);
    }

    /// The member table this service checks senders against.
    pub fn members(&self) -> &Arc<MemberTable> {
        &self.members
    }

    /// Installs the answer to [`KIND_CLAIM`] (only the bootstrapping head does; later calls are ignored).
    /// Without one, claims are refused.
    pub fn set_claim_handler(&self, handler: ClaimHandler) {
        let _ = self.claims.set(handler);
    }

    /// Sets (or replaces) the server to dispatch to.
    pub fn attach(&self, server: GcsServer) {
        *self.server.write() = Some(server);
    }

    /// Stops dispatching (requests fail, Raft messages are dropped) and returns the server that was attached.
    pub fn detach(&self) -> Option<GcsServer> {
        self.server.write().take()
    }

    /// Whether `kind` is one of the GCS's message kinds.
    pub fn handles(kind: u16) -> bool {
        matches!(
            kind,
            KIND_REQUEST
                | KIND_RAFT
                | KIND_RAFT_BATCH
                | KIND_RAFT_STREAM
                | KIND_MEMBERS
                | KIND_STATUS
                | KIND_CLAIM
                | KIND_CHANGE
        )
    }
}

impl Handler for GcsService {
    fn on_request(&self, msg: Message, reply: Responder) {
        match msg.kind() {
            KIND_REQUEST | KIND_STATUS => {}
            KIND_CHANGE => {
                let (shard, change) = match decode_change(msg.body()) {
                    Ok(c) => c,
                    Err(e) => return reply.error(format!("gcs: {e}")),
                };
                // Any cluster node (mesh-authenticated) may move leadership: it changes no membership and
                // loses nothing. Membership itself is the coordinator's alone.
                let transfer = matches!(change, MemberChange::TransferLeader(_));
                if !transfer && self.coordinator.get() != Some(&msg.source()) {
                    return reply.error("gcs: only the head proposes membership changes");
                }
                let Some(server) = self.server.read().clone() else {
                    return reply.error("gcs: member not started");
                };
                tokio::spawn(async move {
                    let r = server.change_membership(shard, change).await;
                    reply.send(KIND_RESPONSE, encode_change_result(&r));
                });
                return;
            }
            KIND_MEMBERS => {
                let (version, members) = self.members.snapshot();
                return reply.send(KIND_RESPONSE, encode_members(version, &members));
            }
            KIND_CLAIM => {
                return match self.claims.get() {
                    Some(h) => match h(msg.source(), msg.body()) {
                        Ok(body) => reply.send(KIND_RESPONSE, body),
                        Err(why) => reply.error(format!("gcs: claim refused: {why}")),
                    },
                    None if self.members.snapshot().1.len() == 1 => reply.error(
                        "gcs: this cluster's GCS has one replica, on the head, and no slots for others \
                         (start the head without --gcs-replicas 1 for a replicated GCS)",
                    ),
                    None => reply.error("gcs: only the head hands out replica slots"),
                };
            }
            other => {
                reply.error(format!("gcs: unexpected request kind {other:#x}"));
                return;
            }
        }
        let Some(server) = self.server.read().clone() else {
            reply.error("gcs: member not started");
            return;
        };
        tokio::spawn(async move {
            if msg.kind() == KIND_STATUS {
                let status = server.status().await;
                reply.send(KIND_RESPONSE, encode_status(&status));
                return;
            }
            let resp = server.handle_bytes(msg.body()).await;
            reply.send(KIND_RESPONSE, resp);
        });
    }

    fn on_oneway(&self, msg: Message) {
        match msg.kind() {
            KIND_RAFT => self.deliver(msg.source(), msg.body()),
            KIND_RAFT_BATCH => match decode_raft_batch(msg.body()) {
                Ok(parts) => {
                    for part in parts {
                        self.deliver(msg.source(), part);
                    }
                }
                Err(e) => {
                    tracing::debug!(source = %msg.source(), cause = %e, "malformed raft batch dropped")
                }
            },
            _ => {}
        }
    }

    fn on_stream(&self, header: Message, mut incoming: oxray_transport::IncomingStream) {
        if header.kind() != KIND_RAFT_STREAM {
            incoming.error(format!("gcs: unexpected stream kind {:#x}", header.kind()));
            return;
        }
        if !self.members.is_member_node(header.source()) {
            incoming.error("gcs: streams are accepted from members only");
            return;
        }
        let this = GcsService {
            server: parking_lot::RwLock::new(self.server.read().clone()),
            members: self.members.clone(),
            claims: OnceLock::new(),
            coordinator: OnceLock::new(),
        };
        tokio::spawn(async move {
            match incoming.read_all().await {
                Ok(body) => {
                    this.deliver(header.source(), &body);
                    incoming.reply(KIND_RESPONSE, Bytes::new());
                }
                Err(e) => tracing::debug!(cause = %e, "raft stream failed"),
            }
        });
    }
}

impl GcsService {
    /// Delivers an encoded Raft message if `source` is the node of the member it claims to come from.
    fn deliver(&self, source: NodeId, body: &[u8]) {
        let Some(server) = self.server.read().clone() else {
            return;
        };
        match crate::wire::decode_raft(body) {
            Ok((shard, m)) if self.members.hosts(m.from, source) => server.deliver(shard, m),
            Ok((_, m)) => {
                // Either a stranger, or a member that moved to a new node and this table is behind.
                tracing::debug!(source = %source, claimed = m.from, "raft message from a non-member dropped");
                self.members.suspect_stale();
            }
            Err(e) => {
                tracing::debug!(source = %source, cause = %e, "malformed raft message dropped")
            }
        }
    }
}

/// Encodes a member table: its `u64` version, a `u32` count, then `(member u64, node u128)` pairs, little-endian.
pub fn encode_members(version: u64, members: &BTreeMap<u64, NodeId>) -> Bytes {
    let mut out = Vec::with_capacity(12 + members.len() * 24);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(members.len() as u32).to_le_bytes());
    for (m, n) in members {
        out.extend_from_slice(&m.to_le_bytes());
        out.extend_from_slice(&n.0.to_le_bytes());
    }
    Bytes::from(out)
}

/// Decodes [`encode_members`]. The bytes come from the network: the length is checked against the count,
/// the count against [`MAX_MEMBERS`], and member ids must be non-zero.
pub fn decode_members(buf: &[u8]) -> Result<(u64, BTreeMap<u64, NodeId>), CallError> {
    let bad = |why: &str| CallError::BadResponse(format!("member table: {why}"));
    let (version, buf) = buf
        .split_first_chunk::<8>()
        .ok_or_else(|| bad("truncated"))?;
    let (count, rest) = buf
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("truncated"))?;
    let count = u32::from_le_bytes(*count) as usize;
    if count == 0 || count > MAX_MEMBERS {
        return Err(bad(&format!("{count} members")));
    }
    if rest.len() != count * 24 {
        return Err(bad("length does not match the count"));
    }
    let mut out = BTreeMap::new();
    for pair in rest.chunks_exact(24) {
        let (m, n) = pair.split_at(8);
        let m = u64::from_le_bytes(m.try_into().map_err(|_| bad("member"))?);
        let n = u128::from_le_bytes(n.try_into().map_err(|_| bad("node"))?);
        if m == 0 || out.insert(m, NodeId(n)).is_some() {
            return Err(bad("member ids must be non-zero and distinct"));
        }
    }
    Ok((u64::from_le_bytes(*version), out))
}

const STATUS_LEN: usize = 4 + 1 + 8 * 5;

/// Encodes a member's shard statuses: per shard `shard u32, is_leader u8, leader u64 (0 = none), term, applied,
/// revision, snapshot_index` (all `u64`, little-endian), then the voters and the learners, each as a `u8` count
/// and that many `u64` ids (at most [`MAX_MEMBERS`] each are sent).
pub fn encode_status(status: &[ShardStatus]) -> Bytes {
    let mut out = Vec::with_capacity(status.len() * (STATUS_LEN + 2 + 8 * 2 * MAX_MEMBERS));
    for s in status {
        out.extend_from_slice(&s.shard.to_le_bytes());
        out.push(u8::from(s.is_leader));
        for v in [
            s.leader.unwrap_or(0),
            s.term,
            s.applied,
            s.revision,
            s.snapshot_index,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for ids in [&s.voters, &s.learners] {
            let ids = &ids[..ids.len().min(MAX_MEMBERS)];
            out.push(ids.len() as u8);
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    Bytes::from(out)
}

/// Decodes [`encode_status`] (network input: every record must be whole, and each id list at most
/// [`MAX_MEMBERS`] long).
pub fn decode_status(mut buf: &[u8]) -> Result<Vec<ShardStatus>, CallError> {
    let bad = |why: &str| CallError::BadResponse(format!("status: {why}"));
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = buf.split_at_checked(n)?;
        *buf = rest;
        Some(head)
    }
    fn u64_of(b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let r = take(&mut buf, STATUS_LEN).ok_or_else(|| bad("truncated record"))?;
        let mut shard = [0u8; 4];
        shard.copy_from_slice(&r[..4]);
        let leader = u64_of(&r[5..13]);
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = take(&mut buf, 1).ok_or_else(|| bad("truncated record"))?[0] as usize;
            if n > MAX_MEMBERS {
                return Err(bad(&format!("{n} members")));
            }
            let ids = take(&mut buf, n * 8).ok_or_else(|| bad("truncated record"))?;
            *list = ids.chunks_exact(8).map(u64_of).collect();
        }
        let [voters, learners] = lists;
        out.push(ShardStatus {
            shard: u32::from_le_bytes(shard),
            is_leader: r[4] != 0,
            leader: (leader != 0).then_some(leader),
            term: u64_of(&r[13..21]),
            applied: u64_of(&r[21..29]),
            revision: u64_of(&r[29..37]),
            snapshot_index: u64_of(&r[37..45]),
            voters,
            learners,
        });
    }
    Ok(out)
}

/// Encodes a membership change request: `shard u32`, the change (`u8`: 1 add learner, 2 promote, 3 remove,
/// 4 leadership transfer),
/// `member u64`, little-endian.
pub fn encode_change(shard: u32, change: MemberChange) -> Bytes {
    let op = match change {
        MemberChange::AddLearner(_) => 1u8,
        MemberChange::Promote(_) => 2,
        MemberChange::Remove(_) => 3,
        MemberChange::TransferLeader(_) => 4,
    };
    let mut out = Vec::with_capacity(13);
    out.extend_from_slice(&shard.to_le_bytes());
    out.push(op);
    out.extend_from_slice(&change.member().to_le_bytes());
    Bytes::from(out)
}

/// Decodes [`encode_change`] (network input: exact length, a known change, a non-zero member).
pub fn decode_change(buf: &[u8]) -> Result<(u32, MemberChange), CallError> {
    let bad = |why: &str| CallError::BadResponse(format!("membership change: {why}"));
    if buf.len() != 13 {
        return Err(bad("must be 13 bytes"));
    }
    let shard = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let mut m = [0u8; 8];
    m.copy_from_slice(&buf[5..13]);
    let m = u64::from_le_bytes(m);
    if m == 0 {
        return Err(bad("member 0"));
    }
    let change = match buf[4] {
        1 => MemberChange::AddLearner(m),
        2 => MemberChange::Promote(m),
        3 => MemberChange::Remove(m),
        4 => MemberChange::TransferLeader(m),
        op => return Err(bad(&format!("unknown change {op}"))),
    };
    Ok((shard, change))
}

/// Encodes the outcome of a membership change request: `0` proposed; `1` + leader hint `u64` (0 = none) not
/// leader; `2` another change in flight; `3` + UTF-8 text refused; `4` + UTF-8 text stopped.
pub fn encode_change_result(r: &Result<(), ReplicaError>) -> Bytes {
    let mut out = Vec::new();
    match r {
        Ok(()) => out.push(0),
        Err(ReplicaError::NotLeader { leader } | ReplicaError::LeadershipLost { leader }) => {
            out.push(1);
            out.extend_from_slice(&leader.unwrap_or(0).to_le_bytes());
        }
        Err(ReplicaError::ChangePending | ReplicaError::Busy { .. }) => out.push(2),
        Err(ReplicaError::Stopped(why)) => {
            out.push(4);
            out.extend_from_slice(why.as_bytes());
        }
        Err(ReplicaError::BadChange(why)) => {
            out.push(3);
            out.extend_from_slice(why.as_bytes());
        }
        Err(other) => {
            out.push(3);
            out.extend_from_slice(other.to_string().as_bytes());
        }
    }
    Bytes::from(out)
}

/// Decodes [`encode_change_result`] (network input).
pub fn decode_change_result(buf: &[u8]) -> Result<Result<(), ReplicaError>, CallError> {
    let bad = |why: &str| CallError::BadResponse(format!("membership change answer: {why}"));
    let (&tag, rest) = buf.split_first().ok_or_else(|| bad("empty"))?;
    let text = || String::from_utf8_lossy(&rest[..rest.len().min(4096)]).into_owned();
    Ok(match tag {
        0 if rest.is_empty() => Ok(()),
        1 => {
            let hint: [u8; 8] = rest.try_into().map_err(|_| bad("leader hint"))?;
            let leader = u64::from_le_bytes(hint);
            Err(ReplicaError::NotLeader {
                leader: (leader != 0).then_some(leader),
            })
        }
        2 if rest.is_empty() => Err(ReplicaError::ChangePending),
        3 => Err(ReplicaError::BadChange(text())),
        4 => Err(ReplicaError::Stopped(text())),
        _ => return Err(bad(&format!("tag {tag}"))),
    })
}

async fn control_call(
    mesh: &Mesh,
    node: NodeId,
    kind: u16,
    body: Bytes,
    timeout: Duration,
) -> Result<Message, CallError> {
    let reply = mesh
        .request(node, kind, body, timeout)
        .await
        .map_err(|e| CallError::Unreachable(e.to_string()))?;
    if reply.kind() != KIND_RESPONSE {
        return Err(CallError::BadResponse(format!(
            "message kind {:#x}",
            reply.kind()
        )));
    }
    Ok(reply)
}

/// Asks the member on `node` for the member table and its version.
pub async fn fetch_members(
    mesh: &Mesh,
    node: NodeId,
    timeout: Duration,
) -> Result<(u64, BTreeMap<u64, NodeId>), CallError> {
    let reply = control_call(mesh, node, KIND_MEMBERS, Bytes::new(), timeout).await?;
    decode_members(reply.body())
}

/// Asks the member on `node` for its shard replicas' status.
pub async fn fetch_status(
    mesh: &Mesh,
    node: NodeId,
    timeout: Duration,
) -> Result<Vec<ShardStatus>, CallError> {
    let reply = control_call(mesh, node, KIND_STATUS, Bytes::new(), timeout).await?;
    decode_status(reply.body())
}

/// Asks the member on `node` to propose `change` to `shard`'s group ([`KIND_CHANGE`]; it must be the leader,
/// and this node the coordinator). `Ok(Ok(()))` means proposed, not applied.
pub async fn propose_change(
    mesh: &Mesh,
    node: NodeId,
    shard: u32,
    change: MemberChange,
    timeout: Duration,
) -> Result<Result<(), ReplicaError>, CallError> {
    let reply = control_call(
        mesh,
        node,
        KIND_CHANGE,
        encode_change(shard, change),
        timeout,
    )
    .await?;
    decode_change_result(reply.body())
}

/// Sends a [`KIND_CLAIM`] with `body` to `node` and returns the answer's body.
pub async fn claim(
    mesh: &Mesh,
    node: NodeId,
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, CallError> {
    let reply = control_call(mesh, node, KIND_CLAIM, body, timeout).await?;
    Ok(Bytes::copy_from_slice(reply.body()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_table_round_trips_and_rejects_bad_input() {
        let m: BTreeMap<u64, NodeId> = [(1, NodeId(7)), (2, NodeId(u128::MAX)), (3, NodeId(0))]
            .into_iter()
            .collect();
        let enc = encode_members(9, &m);
        assert_eq!(decode_members(&enc).unwrap(), (9, m.clone()));
        assert!(decode_members(&enc[..enc.len() - 1]).is_err());
        assert!(decode_members(&[]).is_err());
        let mut huge = 1u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_members(&huge).is_err());
        let mut zero = enc.to_vec();
        zero[12..20].copy_from_slice(&0u64.to_le_bytes());
        assert!(decode_members(&zero).is_err());

        // Tables only move forward; members may be added (the group grows), never all removed.
        let t = MemberTable::new(1, m.clone());
        let mut moved = m.clone();
        moved.insert(2, NodeId(99));
        assert!(!t.update(1, moved.clone()));
        assert!(t.update(2, moved.clone()));
        assert!(t.hosts(2, NodeId(99)) && !t.hosts(2, NodeId(u128::MAX)));
        let mut grown = moved;
        grown.insert(4, NodeId(5));
        assert!(t.update(3, grown));
        assert_eq!(t.ids(), vec![1, 2, 3, 4]);
        assert!(!t.update(4, BTreeMap::new()));
    }

    #[test]
    fn status_round_trips_and_rejects_bad_input() {
        let s = vec![ShardStatus {
            shard: 3,
            is_leader: true,
            leader: Some(2),
            term: 4,
            applied: 5,
            revision: 6,
            snapshot_index: 7,
            voters: vec![1, 2, 3],
            learners: vec![4],
        }];
        let enc = encode_status(&s);
        assert_eq!(decode_status(&enc).unwrap(), s);
        assert!(decode_status(&enc[1..]).is_err());
        assert!(decode_status(&enc[..enc.len() - 1]).is_err());
        assert!(decode_status(&[]).unwrap().is_empty());
        let mut long = enc.to_vec();
        long[STATUS_LEN] = (MAX_MEMBERS + 1) as u8;
        assert!(decode_status(&long).is_err());
    }

    #[test]
    fn changes_round_trip_and_reject_bad_input() {
        for c in [
            MemberChange::AddLearner(4),
            MemberChange::Promote(4),
            MemberChange::Remove(u64::MAX),
            MemberChange::TransferLeader(2),
        ] {
            assert_eq!(decode_change(&encode_change(2, c)).unwrap(), (2, c));
        }
        let enc = encode_change(0, MemberChange::Promote(3));
        assert!(decode_change(&enc[1..]).is_err());
        let mut op = enc.to_vec();
        op[4] = 9;
        assert!(decode_change(&op).is_err());
        assert!(decode_change(&encode_change(0, MemberChange::Remove(0))).is_err());
        for r in [
            Ok(()),
            Err(ReplicaError::NotLeader { leader: Some(3) }),
            Err(ReplicaError::NotLeader { leader: None }),
            Err(ReplicaError::ChangePending),
            Err(ReplicaError::BadChange("no".into())),
            Err(ReplicaError::Stopped("disk".into())),
        ] {
            assert_eq!(decode_change_result(&encode_change_result(&r)).unwrap(), r);
        }
        assert!(decode_change_result(&[]).is_err());
        assert!(decode_change_result(&[1, 2]).is_err());
        assert!(decode_change_result(&[7]).is_err());
    }
}
