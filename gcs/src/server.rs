//! [`GcsServer`]: one GCS member, hosting one replica of every shard, each driven by its own thread; and
//! [`LocalNet`], the in-process network used by embedded mode and tests.
//!
//! # Topology
//! A cluster has `R` members (1, 3, 5 or 7; a group grows to its size by membership changes, see
//! [`crate::replica::MemberChange`]), each with a non-zero id. Every member hosts one replica of each of the `S`
//! shards, and a member's id is its Raft replica id in every shard, so a leader hint is directly a member id.
//!
//! # Why a thread per shard
//! A replica's Ready loop fsyncs. Running it on a tokio worker would stall unrelated tasks for the length of
//! an fsync, so each shard replica runs on a dedicated OS thread that owns the [`Replica`] outright (no lock)
//! and is fed through a bounded flume channel; async callers await a oneshot reply. Everything that arrives
//! while the thread was busy is drained in one go before the next Ready, which is what makes batching work.
//!
//! # The network seam
//! The server needs only [`PeerNetwork::send_raft`] ("send these encoded Raft messages to member X") and calls
//! [`GcsServer::deliver_raft`] for what arrives; clients reach it through [`crate::client::Connector`]. Both carry
//! opaque bytes or the typed messages of [`crate::wire`], so plugging in the QUIC mesh is a thin adapter.
//!
//! # Watches
//! A watch is a long-poll ([`Request::Watch`]) answered from the shard's bounded change log. Waiting polls are
//! parked in the shard thread (at most [`ServerConfig::max_watch_waiters`]) and woken when the revision moves.
//! The server keeps no per-subscriber buffer, so a slow subscriber can never stall a shard: it simply falls
//! behind until the log no longer holds its revision and it is told [`ServerError::Compacted`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use raft::prelude::Message;
use tokio::sync::oneshot;

use crate::client::{CallError, ClientConfig, Connector, GcsClient};
use crate::replica::{
    Completion, MemberChange, Replica, ReplicaConfig, ReplicaError, Reply, Token, raft_logger,
};
use crate::router::ShardMap;
use crate::shard::WriteResult;
use crate::wire::{
    MAX_BATCH_OPS, MAX_WATCH_BATCH, Request, Response, ServerError, batch_over_limit, decode_raft,
    encode_raft,
};

/// Settings of one GCS member.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This member's id (its Raft id in every shard), non-zero.
    pub member: u64,
    /// The voters a new data dir starts with: every member of a statically configured group, `[member]` for
    /// the first member of a group that grows by membership changes, or empty for a member joining a running
    /// group (it learns the membership from the leader). A data dir that exists keeps its own membership.
    pub members: Vec<u64>,
    /// Number of shards (every member hosts all of them).
    pub shards: u32,
    /// Directory holding `shard-N/` for each shard.
    pub dir: PathBuf,
    /// Length of one Raft tick (default 20 ms: heartbeats every 40 ms, elections after 200–400 ms).
    pub tick: Duration,
    /// Template for every replica (its `id` and `peers` are filled in per shard).
    pub replica: ReplicaConfig,
    /// Requests queued per shard before callers get [`ServerError::Busy`] (default 16 384).
    pub queue: usize,
    /// Watch polls parked per shard before new ones get [`ServerError::Busy`] (default 4096).
    pub max_watch_waiters: usize,
    /// Longest a watch poll is parked (default 5 s).
    pub max_watch_wait: Duration,
}

impl ServerConfig {
    /// Defaults for `member` of a cluster of `members`, with `shards` shards stored under `dir`.
    pub fn new(member: u64, members: Vec<u64>, shards: u32, dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            member,
            replica: ReplicaConfig::new(member, members.clone()),
            members,
            shards,
            dir: dir.into(),
            tick: Duration::from_millis(20),
            queue: 16_384,
            max_watch_waiters: 4096,
            max_watch_wait: Duration::from_secs(5),
        }
    }
}

/// Carries Raft traffic between members. Best effort: Raft tolerates loss, delay and duplication.
pub trait PeerNetwork: Send + Sync + 'static {
    /// Sends one encoded Raft message (see [`crate::wire::encode_raft`]) to member `to`.
    fn send_raft(&self, to: u64, msg: Bytes);
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A shard replica could not open its storage.
    #[error("shard {shard}: {source}")]
    Replica {
        /// The shard.
        shard: u32,
        /// Why.
        #[source]
        source: crate::replica::ReplicaFatal,
    },
    /// The configuration is inconsistent.
    #[error("bad config: {0}")]
    Config(String),
    /// A shard thread could not be spawned.
    #[error("spawn shard thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// A snapshot of one shard replica's Raft status (for `oxray status` and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u32,
    /// Whether this member leads it.
    pub is_leader: bool,
    /// The leader as known here.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Last applied Raft index.
    pub applied: u64,
    /// Current revision.
    pub revision: u64,
    /// Raft index of the latest snapshot on disk (the log before it is compacted away).
    pub snapshot_index: u64,
    /// The voters as of `applied` (at most [`crate::mesh::MAX_MEMBERS`] cross the network).
    pub voters: Vec<u64>,
    /// The learners as of `applied` (members receiving the log that do not vote yet).
    pub learners: Vec<u64>,
}

enum Input {
    Req(Request, oneshot::Sender<Response>),
    Raft(Box<Message>),
    Status(oneshot::Sender<ShardStatus>),
    Change(MemberChange, oneshot::Sender<Result<(), ReplicaError>>),
    Campaign,
    Stop,
}

struct ShardHandle {
    tx: flume::Sender<Input>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct ServerInner {
    member: u64,
    shards: Vec<ShardHandle>,
    map: ShardMap,
}

/// One GCS member. Cheap to clone; [`GcsServer::shutdown`] stops its shard threads, and dropping the last
/// clone does too (a [`LocalNet`] holds members weakly, so it does not keep them alive).
#[derive(Clone)]
pub struct GcsServer {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for GcsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsServer")
            .field("member", &self.inner.member)
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}

impl Drop for ServerInner {
    fn drop(&mut self) {
        for s in &self.shards {
            let _ = s.tx.send(Input::Stop);
        }
        for s in &self.shards {
            if let Some(t) = s.thread.lock().take() {
                let _ = t.join();
            }
        }
    }
}

impl GcsServer {
    /// Opens every shard replica under `cfg.dir` and starts their threads.
    pub fn start(cfg: ServerConfig, net: Arc<dyn PeerNetwork>) -> Result<GcsServer, StartError> {
        if cfg.member == 0 || !(cfg.members.is_empty() || cfg.members.contains(&cfg.member)) {
            return Err(StartError::Config(format!(
                "member {} not in {:?}",
                cfg.member, cfg.members
            )));
        }
        if cfg.shards == 0 {
            return Err(StartError::Config("zero shards".into()));
        }
        let logger = raft_logger();
        let mut shards = Vec::new();
        for shard in 0..cfg.shards {
            let mut rc = cfg.replica.clone();
            rc.id = cfg.member;
            rc.peers = cfg.members.clone();
            let dir = cfg.dir.join(format!("shard-{shard}"));
            let mut replica = Replica::open(rc, &dir, &logger)
                .map_err(|source| StartError::Replica { shard, source })?;
            if replica.conf_state().voters == [cfg.member] {
                // A lone voter need not wait an election timeout to lead.
                replica.campaign();
            }
            let (tx, rx) = flume::bounded(cfg.queue.max(1));
            let driver = ShardDriver {
                shard,
                replica,
                rx,
                net: net.clone(),
                tick: cfg.tick,
                waiting: HashMap::new(),
                next_token: 1,
                batches: HashMap::new(),
                next_batch: 1,
                watchers: Vec::new(),
                max_watch_waiters: cfg.max_watch_waiters,
                max_watch_wait: cfg.max_watch_wait,
            };
            let thread = std::thread::Builder::new()
                .name(format!("gcs-m{}-s{shard}", cfg.member))
                .spawn(move || driver.run())
                .map_err(StartError::Spawn)?;
            shards.push(ShardHandle {
                tx,
                thread: Mutex::new(Some(thread)),
            });
        }
        Ok(GcsServer {
            inner: Arc::new(ServerInner {
                member: cfg.member,
                shards,
                map: ShardMap::new(cfg.shards),
            }),
        })
    }

    /// An embedded GCS: one shard, one replica, stored in `dir`, with a client wired to it in-process.
    /// This is what `oxray::init()` uses; it runs exactly the replicated code path with a quorum of one.
    pub fn embedded(dir: &Path) -> Result<(GcsServer, GcsClient), StartError> {
        GcsServer::embedded_with(
            ServerConfig::new(1, vec![1], 1, dir),
            ClientConfig::default(),
        )
    }

    /// [`GcsServer::embedded`] with explicit settings (e.g. `fsync` off for tests, other limits). `cfg` must
    /// describe a single member; it may have several shards.
    pub fn embedded_with(
        cfg: ServerConfig,
        client: ClientConfig,
    ) -> Result<(GcsServer, GcsClient), StartError> {
        if cfg.members.len() != 1 {
            return Err(StartError::Config(format!(
                "embedded mode has one member, not {:?}",
                cfg.members
            )));
        }
        let net = LocalNet::new();
        let (member, shards) = (cfg.member, cfg.shards);
        let server = GcsServer::start(cfg, net.clone())?;
        net.add(member, server.clone());
        let client = GcsClient::new(net, vec![member], shards, client);
        Ok((server, client))
    }

    /// This member's id.
    pub fn member(&self) -> u64 {
        self.inner.member
    }

    /// The key-to-shard map this server was started with.
    pub fn shard_map(&self) -> ShardMap {
        self.inner.map
    }

    /// Serves one client request.
    pub async fn handle(&self, req: Request) -> Response {
        let shard = req.shard();
        let Some(h) = self.inner.shards.get(shard as usize) else {
            return Response::Err(ServerError::NoSuchShard { shard });
        };
        if let Request::WriteBatch { cmds, .. } = &req
            && cmds.len() > MAX_BATCH_OPS
        {
            // Refused whole, before any of it is proposed (the byte bound is checked on arrival as bytes).
            return Response::Err(ServerError::BatchTooLarge {
                ops: cmds.len() as u64,
                bytes: 0,
            });
        }
        let (tx, rx) = oneshot::channel();
        match h.tx.try_send(Input::Req(req, tx)) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(_)) => return Response::Err(ServerError::Busy),
            Err(flume::TrySendError::Disconnected(_)) => {
                return Response::Err(ServerError::Stopped("shut down".into()));
            }
        }
        rx.await
            .unwrap_or_else(|_| Response::Err(ServerError::Stopped("shut down".into())))
    }

    /// Serves one encoded client request and returns the encoded response (for byte transports).
    pub async fn handle_bytes(&self, req: &[u8]) -> Bytes {
        if let Some(e) = batch_over_limit(req) {
            return Response::Err(e).encode();
        }
        match Request::decode(req) {
            Ok(r) => self.handle(r).await.encode(),
            Err(e) => Response::Err(ServerError::BadRequest(e.to_string())).encode(),
        }
    }

    /// Delivers one encoded Raft message from a peer. Malformed or unroutable messages are dropped.
    pub fn deliver_raft(&self, buf: &[u8]) {
        match decode_raft(buf) {
            // A full queue drops the message; Raft retransmits.
            Ok((shard, msg)) => self.deliver(shard, msg),
            Err(e) => tracing::debug!(cause = %e, "dropped malformed raft message"),
        }
    }

    /// Delivers one decoded Raft message for `shard` (dropped if the shard is unknown or its queue is full).
    pub fn deliver(&self, shard: u32, msg: Message) {
        if let Some(h) = self.inner.shards.get(shard as usize) {
            let _ = h.tx.try_send(Input::Raft(Box::new(msg)));
        }
    }

    /// Asks this member's replica of `shard` to start an election now.
    pub fn campaign(&self, shard: u32) {
        if let Some(h) = self.inner.shards.get(shard as usize) {
            let _ = h.tx.try_send(Input::Campaign);
        }
    }

    /// The Raft status of every shard replica on this member.
    pub async fn status(&self) -> Vec<ShardStatus> {
        let mut out = Vec::new();
        for h in &self.inner.shards {
            let (tx, rx) = oneshot::channel();
            if h.tx.send_async(Input::Status(tx)).await.is_ok()
                && let Ok(s) = rx.await
            {
                out.push(s);
            }
        }
        out
    }

    /// Proposes one membership change of `shard`'s Raft group on this member (see
    /// [`Replica::change_membership`]). It answers once proposed, not applied: watch [`GcsServer::status`] for
    /// the change to show. Fails on a member that does not lead the shard.
    pub async fn change_membership(
        &self,
        shard: u32,
        change: MemberChange,
    ) -> Result<(), ReplicaError> {
        let Some(h) = self.inner.shards.get(shard as usize) else {
            return Err(ReplicaError::BadChange(format!("no shard {shard}")));
        };
        let (tx, rx) = oneshot::channel();
        let stopped = || ReplicaError::Stopped("shut down".into());
        h.tx.send_async(Input::Change(change, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Stops every shard thread and waits for them. Requests after this fail with [`ServerError::Stopped`].
    pub fn shutdown(&self) {
        for s in &self.inner.shards {
            let _ = s.tx.send(Input::Stop);
        }
        for s in &self.inner.shards {
            if let Some(t) = s.thread.lock().take() {
                let _ = t.join();
            }
        }
    }
}

/// Who waits for a token's completion: a caller of one request, or one command of a write batch.
enum Waiter {
    One(oneshot::Sender<Response>),
    InBatch { batch: u64, index: u32 },
}

/// A [`Request::WriteBatch`] being served: its per-command results fill in as the commands complete (in any
/// order), and the caller is answered once none is left.
struct BatchWait {
    results: Vec<Result<WriteResult, ServerError>>,
    left: usize,
    reply: oneshot::Sender<Response>,
}

struct Watcher {
    prefix: Vec<u8>,
    after: u64,
    max: usize,
    deadline: Instant,
    reply: oneshot::Sender<Response>,
}

struct ShardDriver {
    shard: u32,
    replica: Replica,
    rx: flume::Receiver<Input>,
    net: Arc<dyn PeerNetwork>,
    tick: Duration,
    waiting: HashMap<Token, Waiter>,
    next_token: Token,
    /// Write batches with commands still pending, by batch id.
    batches: HashMap<u64, BatchWait>,
    next_batch: u64,
    watchers: Vec<Watcher>,
    max_watch_waiters: usize,
    max_watch_wait: Duration,
}

/// Most inputs handled per Ready loop, so ticks and sends are never starved by a flood of requests.
const MAX_DRAIN: usize = 8192;

impl ShardDriver {
    fn run(mut self) {
        let span = tracing::info_span!("gcs_shard", shard = self.shard, member = self.replica.id());
        let _g = span.enter();
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let first = match self.rx.recv_deadline(next_tick) {
                Ok(i) => Some(i),
                Err(flume::RecvTimeoutError::Timeout) => None,
                Err(flume::RecvTimeoutError::Disconnected) => return,
            };
            let mut stop = false;
            if let Some(i) = first {
                stop |= self.input(i);
                let mut n = 1;
                while n < MAX_DRAIN {
                    match self.rx.try_recv() {
                        Ok(i) => stop |= self.input(i),
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            if stop {
                return;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.replica.tick();
                next_tick += self.tick;
                if next_tick < now {
                    // We fell far behind (a long fsync); do not fire a burst of catch-up ticks.
                    next_tick = now + self.tick;
                }
                self.expire_watchers(now);
            }
            // Appends and answers leave before this loop's fsync (see `Replica::handle_ready_with`), the
            // rest after it.
            let (shard, net) = (self.shard, &self.net);
            let (waiting, batches) = (&mut self.waiting, &mut self.batches);
            self.replica.handle_ready_with(|msgs, done| {
                send_all(shard, net.as_ref(), msgs.drain(..));
                for c in done.drain(..) {
                    complete(waiting, batches, c);
                }
            });
            send_all(self.shard, self.net.as_ref(), self.replica.take_messages());
            for c in self.replica.take_completions() {
                complete(&mut self.waiting, &mut self.batches, c);
            }
            if self.replica.take_revision_advanced() {
                self.wake_watchers();
            }
        }
    }

    /// Handles one input; returns true to stop.
    fn input(&mut self, i: Input) -> bool {
        match i {
            Input::Raft(m) => self.replica.step(*m),
            Input::Req(req, reply) => self.request(req, reply),
            Input::Status(reply) => {
                let st = self.replica.state();
                let _ = reply.send(ShardStatus {
                    shard: self.shard,
                    is_leader: self.replica.is_leader(),
                    leader: self.replica.leader(),
                    term: self.replica.term(),
                    applied: st.applied_index(),
                    revision: st.revision(),
                    snapshot_index: self
                        .replica
                        .storage()
                        .latest_snapshot()
                        .get_metadata()
                        .index,
                    voters: self.replica.conf_state().voters.clone(),
                    learners: self.replica.conf_state().learners.clone(),
                });
            }
            Input::Change(change, reply) => {
                let _ = reply.send(self.replica.change_membership(change));
            }
            Input::Campaign => self.replica.campaign(),
            Input::Stop => return true,
        }
        false
    }

    fn request(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        match req {
            Request::Write { cmd, .. } => {
                let t = self.token(reply);
                self.replica.propose(t, cmd);
            }
            Request::WriteBatch { cmds, .. } => {
                if cmds.is_empty() {
                    let _ = reply.send(Response::Writes(Vec::new()));
                    return;
                }
                // Every command is proposed on its own (validated, deduplicated and completed by its
                // `(client, seq)`), and they all land in this loop's Raft entry with everything else queued.
                let batch = self.next_batch;
                self.next_batch += 1;
                // Every slot is overwritten by its command's completion before the batch is answered; the
                // placeholder is an error that allocates nothing.
                self.batches.insert(
                    batch,
                    BatchWait {
                        results: vec![Err(ServerError::Busy); cmds.len()],
                        left: cmds.len(),
                        reply,
                    },
                );
                for (index, cmd) in cmds.into_iter().enumerate() {
                    let t = self.next_token;
                    self.next_token += 1;
                    let index = index as u32;
                    self.waiting.insert(t, Waiter::InBatch { batch, index });
                    self.replica.propose(t, cmd);
                }
            }
            Request::Read { query, .. } => {
                let t = self.token(reply);
                self.replica.read(t, query);
            }
            Request::Watch {
                prefix,
                after,
                max,
                wait_ms,
                ..
            } => {
                let max = max.clamp(1, MAX_WATCH_BATCH) as usize;
                if let Some(resp) = self.poll_watch(&prefix, after, max) {
                    let _ = reply.send(resp);
                    return;
                }
                let wait = Duration::from_millis(u64::from(wait_ms)).min(self.max_watch_wait);
                if wait.is_zero() {
                    let covered = self.replica.state().revision().max(after);
                    let _ = reply.send(Response::Events {
                        events: Vec::new(),
                        covered,
                    });
                    return;
                }
                if self.watchers.len() >= self.max_watch_waiters {
                    let _ = reply.send(Response::Err(ServerError::Busy));
                    return;
                }
                self.watchers.push(Watcher {
                    prefix,
                    after,
                    max,
                    deadline: Instant::now() + wait,
                    reply,
                });
            }
        }
    }

    /// Answers a poll if there is something to say (events or compaction); `None` means "wait".
    fn poll_watch(&self, prefix: &[u8], after: u64, max: usize) -> Option<Response> {
        let st = self.replica.state();
        match st.events_after(prefix, after, max) {
            Err(c) => Some(Response::Err(ServerError::Compacted { oldest: c.oldest })),
            Ok(events) if events.is_empty() => None,
            Ok(events) => {
                let covered = if events.len() < max {
                    st.revision()
                } else {
                    events.last().map_or(after, |e| e.revision)
                };
                Some(Response::Events { events, covered })
            }
        }
    }

    fn wake_watchers(&mut self) {
        let mut i = 0;
        while i < self.watchers.len() {
            let w = &self.watchers[i];
            if w.reply.is_closed() {
                self.watchers.swap_remove(i);
                continue;
            }
            if let Some(resp) = self.poll_watch(&w.prefix, w.after, w.max) {
                let w = self.watchers.swap_remove(i);
                let _ = w.reply.send(resp);
            } else {
                i += 1;
            }
        }
    }

    fn expire_watchers(&mut self, now: Instant) {
        let revision = self.replica.state().revision();
        let mut i = 0;
        while i < self.watchers.len() {
            if self.watchers[i].deadline <= now || self.watchers[i].reply.is_closed() {
                let w = self.watchers.swap_remove(i);
                let _ = w.reply.send(Response::Events {
                    events: Vec::new(),
                    covered: revision.max(w.after),
                });
            } else {
                i += 1;
            }
        }
    }

    fn token(&mut self, reply: oneshot::Sender<Response>) -> Token {
        let t = self.next_token;
        self.next_token += 1;
        self.waiting.insert(t, Waiter::One(reply));
        t
    }
}

fn send_all(shard: u32, net: &dyn PeerNetwork, msgs: impl IntoIterator<Item = Message>) {
    for m in msgs {
        net.send_raft(m.to, encode_raft(shard, &m));
    }
}

/// Answers the caller waiting on `c.token`, if it still waits; a command of a batch fills in its slot, and
/// the batch is answered when its last command completes.
fn complete(
    waiting: &mut HashMap<Token, Waiter>,
    batches: &mut HashMap<u64, BatchWait>,
    c: Completion,
) {
    let Some(waiter) = waiting.remove(&c.token) else {
        return;
    };
    match waiter {
        Waiter::One(reply) => {
            let _ = reply.send(response_of(c.result));
        }
        Waiter::InBatch { batch, index } => {
            let Some(b) = batches.get_mut(&batch) else {
                return;
            };
            if let Some(slot) = b.results.get_mut(index as usize) {
                *slot = match response_of(c.result) {
                    Response::Write(w) => Ok(w),
                    Response::Err(e) => Err(e),
                    other => Err(ServerError::BadRequest(format!(
                        "a write completed with a read's answer: {other:?}"
                    ))),
                };
            }
            b.left -= 1;
            if b.left == 0
                && let Some(b) = batches.remove(&batch)
            {
                let _ = b.reply.send(Response::Writes(b.results));
            }
        }
    }
}

fn response_of(result: Result<Reply, ReplicaError>) -> Response {
    match result {
        Ok(Reply::Write(w)) => Response::Write(w),
        Ok(Reply::Get { kv, revision }) => Response::Get { kv, revision },
        Ok(Reply::Range {
            kvs,
            more,
            revision,
        }) => Response::Range {
            kvs,
            more,
            revision,
        },
        Err(e) => Response::Err(match e {
            ReplicaError::NotLeader { leader } => ServerError::NotLeader { leader },
            ReplicaError::LeadershipLost { leader } => ServerError::LeadershipLost { leader },
            ReplicaError::Invalid(v) => ServerError::Invalid(v),
            ReplicaError::Command(crate::shard::CommandError::DedupExpired { client, seq }) => {
                ServerError::DedupExpired { client, seq }
            }
            ReplicaError::Busy { .. } => ServerError::Busy,
            ReplicaError::Stopped(why) => ServerError::Stopped(why),
            // Membership changes are not client requests and never complete through here.
            ReplicaError::ChangePending => ServerError::Busy,
            ReplicaError::BadChange(why) => ServerError::BadRequest(why),
        }),
    }
}

/// An in-process network of GCS members: routes client calls and Raft messages by member id.
///
/// Used by embedded mode (one member) and by tests and benchmarks of multi-replica clusters in one process.
/// [`LocalNet::isolate`] cuts a member off (both directions) to simulate a crash or partition.
#[derive(Default)]
pub struct LocalNet {
    /// Weak, so that the network (which shard threads hold) never keeps a dropped server alive.
    servers: RwLock<BTreeMap<u64, std::sync::Weak<ServerInner>>>,
    isolated: RwLock<Vec<u64>>,
}

impl std::fmt::Debug for LocalNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNet")
            .field("members", &self.servers.read().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl LocalNet {
    /// An empty network.
    pub fn new() -> Arc<LocalNet> {
        Arc::new(LocalNet::default())
    }

    /// Attaches a member.
    pub fn add(&self, member: u64, server: GcsServer) {
        self.servers
            .write()
            .insert(member, Arc::downgrade(&server.inner));
    }

    /// Detaches a member.
    pub fn remove(&self, member: u64) {
        self.servers.write().remove(&member);
    }

    /// Cuts a member off from everyone (clients and peers) until [`LocalNet::heal`].
    pub fn isolate(&self, member: u64) {
        self.isolated.write().push(member);
    }

    /// Restores every isolated member.
    pub fn heal(&self) {
        self.isolated.write().clear();
    }

    fn reachable(&self, member: u64) -> Option<GcsServer> {
        if self.isolated.read().contains(&member) {
            return None;
        }
        let inner = self.servers.read().get(&member)?.upgrade()?;
        Some(GcsServer { inner })
    }
}

impl PeerNetwork for LocalNet {
    fn send_raft(&self, to: u64, msg: Bytes) {
        let Some(s) = self.reachable(to) else { return };
        // Decoded once here and handed over decoded (a batch of appends is not parsed twice).
        match decode_raft(&msg) {
            // The sender's id is inside the message; drop traffic from isolated members too.
            Ok((_, m)) if self.isolated.read().contains(&m.from) => {}
            Ok((shard, m)) => s.deliver(shard, m),
            Err(e) => tracing::debug!(cause = %e, "dropped malformed raft message"),
        }
    }
}

impl Connector for LocalNet {
    fn call(
        &self,
        member: u64,
        req: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, CallError>> + Send + '_>>
    {
        let server = self.reachable(member);
        Box::pin(async move {
            match server {
                Some(s) => Ok(s.handle(req).await),
                None => Err(CallError::Unreachable(format!(
                    "member {member} unreachable"
                ))),
            }
        })
    }
}
