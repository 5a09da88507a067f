//! [`GcsClient`]: the async client of a GCS cluster, with leader discovery, redirects, retries with backoff,
//! per-call deadlines, exactly-once writes and resumable watch streams.
//!
//! # Exactly once
//! Each client instance has a random id; every write gets the next seq, and every retry of that write
//! (after a timeout, a lost connection or a leader change) reuses it, so the shard applies it at most once.
//! When the deadline passes, [`GcsError::Timeout`] says whether the outcome is unknown (a write that may
//! have applied) or not.
//!
//! # Watches
//! [`GcsClient::watch`] returns a [`WatchStream`] fed by a background long-poll loop. It remembers the last
//! revision delivered and always asks for changes *after* it, on whichever member answers, so reconnects and
//! leader changes neither miss nor repeat an event. The stream's buffer is bounded
//! ([`ClientConfig::watch_buffer`]); the loop only polls when there is room, so a slow consumer costs the
//! server nothing and, if it falls behind the retained history, gets [`GcsError::Compacted`] (resync with
//! [`GcsClient::scan_prefix`] and watch again from the revision it returns).
//!
//! # Write batching
//! Concurrent writes from one client to the same shard are coalesced into one [`Request::WriteBatch`] per
//! trip to the leader: each write queues its command for `(member, shard)`, and at most
//! [`ClientConfig::max_batches_in_flight`] batches are on the wire per destination. A batch takes everything
//! queued when it leaves (up to [`ClientConfig::max_batch_ops`] commands and
//! [`ClientConfig::max_batch_bytes`] bytes), so a lone writer waits for no timer and a busy client sends few,
//! large requests. Batching is only an envelope: every command keeps its own `(client, seq)` and gets its own
//! result, and each write runs its own retry loop with its own deadline, so a batch that fails or times out
//! just sends its writes on their next attempt (maybe in other batches), where the dedup table keeps each at
//! most once.
//!
//! The network is behind [`Connector`]; [`crate::server::LocalNet`] is the in-process implementation.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::replica::Query;
use crate::router::{ShardMap, ShardSpan};
use crate::shard::{Command, Event, Expect, KeyValue, Op, ValidateError, WriteResult};
use crate::wire::{
    MAX_BATCH_BYTES, MAX_BATCH_OPS, MAX_WATCH_BATCH, Request, Response, ServerError, command_len,
};

/// A failure to reach a member at all (as opposed to an answer that is an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No connection to the member (down, partitioned, refused).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The member's answer could not be decoded.
    #[error("bad response: {0}")]
    BadResponse(String),
}

/// Sends one request to one member and returns its answer.
pub trait Connector: Send + Sync + 'static {
    /// Calls `member`. Implementations need not apply deadlines; the client does.
    fn call(
        &self,
        member: u64,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, CallError>> + Send + '_>>;

    /// Told when a call to `member` got no answer within the client's attempt deadline, which cut it short
    /// before any deadline of the connector's own could turn it into an error. A connector whose idea of
    /// where a member lives can go stale takes it as a sign of that (the mesh's does: a restarted replica
    /// lives on a new node, and calls to its old one go unanswered); the default ignores it.
    fn no_answer(&self, member: u64) {
        let _ = member;
    }

    /// Told when a leader hint names `member`, which [`Connector::members`] does not list: the group grew and
    /// the connector's table is behind. The default ignores it.
    fn unknown_member(&self, member: u64) {
        let _ = member;
    }

    /// The members as the connector knows them now, when that can change while the client runs (a group
    /// that grows by membership changes); `None` keeps the list the client was created with.
    fn members(&self) -> Option<Vec<u64>> {
        None
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline of one call, retries included (default 5 s).
    pub call_timeout: Duration,
    /// Longest wait for one attempt before trying another member (default 1 s).
    pub attempt_timeout: Duration,
    /// First backoff between attempts (default 2 ms), doubled up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest backoff (default 200 ms).
    pub backoff_max: Duration,
    /// Events buffered per watch stream (default 1024).
    pub watch_buffer: usize,
    /// How long one watch poll waits on the server (default 2 s).
    pub watch_wait: Duration,
    /// Page size of prefix scans (default 1000).
    pub scan_page: usize,
    /// Most writes in flight per client (default 512). Kept below the shard's per-client dedup window
    /// ([`crate::shard::Limits::dedup_per_client`], 1024) so that concurrent seqs do not push each other out of it.
    pub max_inflight_writes: usize,
    /// Most writes coalesced into one request (default 256, at most [`MAX_BATCH_OPS`]). 1 sends every write
    /// on its own.
    pub max_batch_ops: usize,
    /// Most encoded command bytes in one batched request (default 1 MiB, at most [`MAX_BATCH_BYTES`] less
    /// room for the header). A write larger than this on its own is sent alone.
    pub max_batch_bytes: usize,
    /// Most write batches on the wire at once to one member for one shard (default 1). The leader already
    /// pipelines batches from many clients through its Raft loop, so one batch per destination per client
    /// makes the largest batches and the fewest requests, fsync rounds and QUIC streams; the GCS benchmark
    /// over the QUIC mesh measured 27–32k writes/s with 1 against 17–21k with 2 at 64 concurrent writers
    /// (one client), and no loss at 1024. Raise it when one client's round trip, not the leader's CPU,
    /// is the bound.
    pub max_batches_in_flight: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            call_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(2),
            backoff_max: Duration::from_millis(200),
            watch_buffer: 1024,
            watch_wait: Duration::from_secs(2),
            scan_page: 1000,
            max_inflight_writes: 512,
            max_batch_ops: 256,
            max_batch_bytes: 1 << 20,
            max_batches_in_flight: 1,
        }
    }
}

/// Errors of GCS client calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GcsError {
    /// The deadline passed before an answer. For a write, `outcome_unknown` is true: it may have applied
    /// (a later read tells); retrying the same call with a fresh seq could apply it twice.
    #[error(
        "gcs call timed out after {after:?} (outcome unknown: {outcome_unknown}); last error: {last}"
    )]
    Timeout {
        /// How long the call ran.
        after: Duration,
        /// Whether a write may have applied.
        outcome_unknown: bool,
        /// The last failure seen, for diagnosis.
        last: String,
    },
    /// The request breaks a limit; retrying will not help.
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    /// A retried write fell out of the shard's dedup window; its outcome is unknown.
    #[error("write outcome unknown: seq {seq} left the dedup window")]
    DedupExpired {
        /// The seq.
        seq: u64,
    },
    /// A watch fell behind the retained history. Re-read with [`GcsClient::scan_prefix`] and watch again
    /// from the revision it returns.
    #[error("watch history compacted through revision {oldest}; resync")]
    Compacted {
        /// Oldest revision still replayable.
        oldest: u64,
    },
    /// A watch prefix must name one table (contain a `/`) when there are several shards.
    #[error("watch prefix {0:?} spans shards; include a table name ending in '/'")]
    WatchSpansShards(String),
    /// A member answered with something that does not fit the request.
    #[error("protocol error: {0}")]
    Protocol(String),
}

struct ClientInner {
    connector: Arc<dyn Connector>,
    members: Vec<u64>,
    map: ShardMap,
    cfg: ClientConfig,
    client_id: u64,
    seq: AtomicU64,
    /// Known leader per shard (member id, 0 = unknown).
    leaders: Vec<AtomicU64>,
    /// Round-robin cursor for when no leader is known.
    cursor: AtomicUsize,
    /// Bounds writes in flight (see [`ClientConfig::max_inflight_writes`]).
    write_permits: tokio::sync::Semaphore,
    /// Writes waiting to be batched, per `(member, shard)` (see "Write batching" in the module docs).
    batches: Mutex<HashMap<(u64, u32), BatchQueue>>,
    rng: Mutex<rand::rngs::StdRng>,
}

/// A handle to the GCS. Cheap to clone (clones share the client id, seqs and leader cache).
///
/// Every call has a deadline: [`ClientConfig::call_timeout`] by default, or another one for the calls made
/// through [`GcsClient::with_timeout`]. Dropping the handle stops nothing on the server; dropping a
/// [`WatchStream`] stops its poll.
#[derive(Clone)]
pub struct GcsClient {
    inner: Arc<ClientInner>,
    /// Deadline of each call made through this handle.
    call_timeout: Duration,
}

impl std::fmt::Debug for GcsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsClient")
            .field("client_id", &format_args!("{:x}", self.inner.client_id))
            .field("members", &self.inner.members)
            .field("shards", &self.inner.map.shards())
            .finish()
    }
}

/// The result of a range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResult {
    /// Keys found, in key order.
    pub kvs: Vec<KeyValue>,
    /// Whether `limit` cut the answer short.
    pub more: bool,
    /// The shard revision the read saw (watch from here to follow later changes).
    pub revision: u64,
}

impl GcsClient {
    /// A client of the cluster whose members are `members`, with `shards` shards, reached through `connector`.
    pub fn new(
        connector: Arc<dyn Connector>,
        members: Vec<u64>,
        shards: u32,
        cfg: ClientConfig,
    ) -> GcsClient {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let client_id = rng.random::<u64>() | 1;
        let map = ShardMap::new(shards);
        let write_permits = tokio::sync::Semaphore::new(cfg.max_inflight_writes.max(1));
        let call_timeout = cfg.call_timeout;
        GcsClient {
            call_timeout,
            inner: Arc::new(ClientInner {
                connector,
                members,
                leaders: (0..map.shards()).map(|_| AtomicU64::new(0)).collect(),
                map,
                cfg,
                client_id,
                seq: AtomicU64::new(0),
                cursor: AtomicUsize::new(0),
                write_permits,
                batches: Mutex::new(HashMap::new()),
                rng: Mutex::new(rng),
            }),
        }
    }

    /// A handle whose calls have deadline `timeout` (retries included). It shares everything else with
    /// `self`, including the client id, so writes through either are deduplicated together.
    pub fn with_timeout(&self, timeout: Duration) -> GcsClient {
        GcsClient {
            inner: self.inner.clone(),
            call_timeout: timeout,
        }
    }

    /// The key-to-shard map in use.
    pub fn shard_map(&self) -> ShardMap {
        self.inner.map
    }

    /// The member this client currently believes leads `shard` (learned from answers and redirects).
    pub fn leader_hint(&self, shard: u32) -> Option<u64> {
        match self
            .inner
            .leaders
            .get(shard as usize)?
            .load(Ordering::Relaxed)
        {
            0 => None,
            m => Some(m),
        }
    }

    /// Sets `key` to `value`.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Bytes>,
    ) -> Result<WriteResult, GcsError> {
        self.write(Op::Put {
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// Removes `key`; `succeeded` says whether it existed.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<WriteResult, GcsError> {
        self.write(Op::Delete { key: key.into() }).await
    }

    /// Compare-and-swap: if `expect` holds, set `key` to `new` (`None` deletes). `succeeded` says whether it did.
    pub async fn cas(
        &self,
        key: impl Into<Vec<u8>>,
        expect: Expect,
        new: Option<Bytes>,
    ) -> Result<WriteResult, GcsError> {
        self.write(Op::Cas {
            key: key.into(),
            expect,
            new,
        })
        .await
    }

    /// Applies one mutation exactly once (see the module docs).
    pub async fn write(&self, op: Op) -> Result<WriteResult, GcsError> {
        let shard = self.inner.map.shard_of(op.key());
        // The seq is taken after the permit, so seqs in flight always span less than the dedup window.
        let _permit = self
            .inner
            .write_permits
            .acquire()
            .await
            .map_err(|_| GcsError::Protocol("client closed".into()))?;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let req = Request::Write {
            shard,
            cmd: Command {
                client: self.inner.client_id,
                seq,
                op,
            },
        };
        match self.call(shard, req).await? {
            Response::Write(w) => Ok(w),
            other => Err(GcsError::Protocol(format!(
                "unexpected answer to write: {other:?}"
            ))),
        }
    }

    /// Linearizable read of one key.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, GcsError> {
        let key = key.into();
        let shard = self.inner.map.shard_of(&key);
        match self
            .call(
                shard,
                Request::Read {
                    shard,
                    query: Query::Get { key },
                },
            )
            .await?
        {
            Response::Get { kv, .. } => Ok(kv),
            other => Err(GcsError::Protocol(format!(
                "unexpected answer to get: {other:?}"
            ))),
        }
    }

    /// Linearizable read of keys in `[start, end)` on the shard of `start`'s table (at most `limit`).
    pub async fn range(
        &self,
        start: impl Into<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<RangeResult, GcsError> {
        let start = start.into();
        let shard = self.inner.map.shard_of(&start);
        self.range_on(shard, start, end, limit).await
    }

    async fn range_on(
        &self,
        shard: u32,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<RangeResult, GcsError> {
        let req = Request::Read {
            shard,
            query: Query::Range { start, end, limit },
        };
        match self.call(shard, req).await? {
            Response::Range {
                kvs,
                more,
                revision,
            } => Ok(RangeResult {
                kvs,
                more,
                revision,
            }),
            other => Err(GcsError::Protocol(format!(
                "unexpected answer to range: {other:?}"
            ))),
        }
    }

    /// Every key starting with `prefix`, in key order, read page by page, and the revision of the first page
    /// (for a single-shard prefix, watching from it misses nothing; for a multi-shard prefix it is 0).
    ///
    /// Each page is linearizable; the whole scan is not a single snapshot when it spans several pages.
    pub async fn scan_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
    ) -> Result<(Vec<KeyValue>, u64), GcsError> {
        let prefix = prefix.into();
        let end = prefix_end(&prefix);
        let shards: Vec<u32> = match self.inner.map.span(&prefix) {
            ShardSpan::One(s) => vec![s],
            ShardSpan::All => (0..self.inner.map.shards()).collect(),
        };
        let single = shards.len() == 1;
        let mut out = Vec::new();
        let mut first_revision = None;
        for shard in shards {
            let mut start = prefix.clone();
            loop {
                let page = self
                    .range_on(shard, start.clone(), end.clone(), self.inner.cfg.scan_page)
                    .await?;
                first_revision.get_or_insert(page.revision);
                let last = page.kvs.last().map(|kv| kv.key.clone());
                out.extend(page.kvs);
                match (page.more, last) {
                    (true, Some(mut k)) => {
                        k.push(0);
                        start = k;
                    }
                    _ => break,
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        let rev = if single {
            first_revision.unwrap_or(0)
        } else {
            0
        };
        Ok((out, rev))
    }

    /// Streams every change under `prefix` with revision greater than `after`, in revision order.
    ///
    /// The prefix must name one table (contain a `/`) unless there is a single shard.
    pub fn watch(&self, prefix: impl Into<Vec<u8>>, after: u64) -> Result<WatchStream, GcsError> {
        let prefix = prefix.into();
        let shard = match self.inner.map.span(&prefix) {
            ShardSpan::One(s) => s,
            ShardSpan::All => {
                return Err(GcsError::WatchSpansShards(
                    String::from_utf8_lossy(&prefix).into_owned(),
                ));
            }
        };
        let (tx, rx) = mpsc::channel(self.inner.cfg.watch_buffer.max(1));
        let client = self.clone();
        let task = tokio::spawn(async move { client.watch_loop(shard, prefix, after, tx).await });
        Ok(WatchStream {
            rx,
            task,
            last: after,
        })
    }

    async fn watch_loop(
        self,
        shard: u32,
        prefix: Vec<u8>,
        mut after: u64,
        tx: mpsc::Sender<Result<Event, GcsError>>,
    ) {
        let cfg = self.inner.cfg.clone();
        let mut backoff = cfg.backoff_min;
        let mut attempt = 0usize;
        loop {
            // Only poll when the consumer has room: backpressure instead of an unbounded buffer.
            match tx.reserve().await {
                Ok(p) => drop(p),
                Err(_) => return,
            }
            let room = tx.capacity().clamp(1, MAX_WATCH_BATCH as usize);
            let member = self.pick(shard, attempt);
            let req = Request::Watch {
                shard,
                prefix: prefix.clone(),
                after,
                max: room as u32,
                wait_ms: cfg.watch_wait.as_millis().min(u128::from(u32::MAX)) as u32,
            };
            let budget = cfg.watch_wait + cfg.attempt_timeout;
            let res = tokio::time::timeout(budget, self.inner.connector.call(member, req)).await;
            match res {
                Ok(Ok(Response::Events { events, covered })) => {
                    backoff = cfg.backoff_min;
                    for e in events {
                        if e.revision <= after {
                            continue; // never repeat an event, whatever the member sends
                        }
                        after = e.revision;
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    after = after.max(covered);
                    continue;
                }
                Ok(Ok(Response::Err(ServerError::Compacted { oldest }))) => {
                    let _ = tx.send(Err(GcsError::Compacted { oldest })).await;
                    return;
                }
                Ok(Ok(other)) => {
                    tracing::debug!(member, answer = ?other, "watch poll failed; trying another member");
                }
                Ok(Err(e)) => {
                    tracing::debug!(member, cause = %e, "watch poll failed; trying another member")
                }
                Err(_) => {
                    tracing::debug!(member, "watch poll timed out; trying another member");
                    self.inner.connector.no_answer(member);
                }
            }
            self.forget_leader(shard, member);
            attempt += 1;
            tokio::time::sleep(self.jitter(backoff)).await;
            backoff = (backoff * 2).min(cfg.backoff_max);
        }
    }

    fn pick(&self, shard: u32, attempt: usize) -> u64 {
        let known = self.inner.leaders[shard as usize].load(Ordering::Relaxed);
        let current = self.inner.connector.members();
        let members = current.as_deref().unwrap_or(&self.inner.members);
        if known != 0 {
            if members.contains(&known) {
                return known;
            }
            self.inner.connector.unknown_member(known);
        }
        let n = members.len().max(1);
        let i = self
            .inner
            .cursor
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(attempt);
        members.get(i % n).copied().unwrap_or(1)
    }

    fn forget_leader(&self, shard: u32, member: u64) {
        let _ = self.inner.leaders[shard as usize].compare_exchange(
            member,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn set_leader(&self, shard: u32, leader: Option<u64>) {
        self.inner.leaders[shard as usize].store(leader.unwrap_or(0), Ordering::Relaxed);
    }

    fn jitter(&self, d: Duration) -> Duration {
        use rand::Rng;
        let f: f64 = self.inner.rng.lock().random_range(0.5..1.0);
        d.mul_f64(f)
    }

    /// One attempt of `req` at `member`. A write joins the batch queue of `(member, shard)` unless batching
    /// is off; anything else is its own request.
    async fn attempt(&self, member: u64, req: &Request) -> Result<Response, CallError> {
        match req {
            Request::Write { shard, cmd } if self.inner.cfg.max_batch_ops > 1 => {
                self.batched(member, *shard, cmd.clone()).await
            }
            _ => self.inner.connector.call(member, req.clone()).await,
        }
    }

    /// Queues `cmd` for the next batch to `member` and waits for its own result. Starts a sender if fewer
    /// than [`ClientConfig::max_batches_in_flight`] are running for this destination.
    async fn batched(&self, member: u64, shard: u32, cmd: Command) -> Result<Response, CallError> {
        let (tx, rx) = oneshot::channel();
        let bytes = command_len(&cmd);
        let start = {
            let mut queues = self.inner.batches.lock();
            let q = queues.entry((member, shard)).or_default();
            q.ops.push_back(Queued { cmd, bytes, tx });
            let start = q.senders < self.inner.cfg.max_batches_in_flight.max(1);
            q.senders += usize::from(start);
            start
        };
        if start {
            tokio::spawn(self.clone().send_batches(member, shard));
        }
        rx.await
            .unwrap_or_else(|_| Err(CallError::Unreachable("write batch abandoned".into())))
    }

    /// One batch sender for `(member, shard)`: sends batches while writes are queued, then exits. The sender
    /// count is decremented under the same lock that finds the queue empty, so a write queued concurrently
    /// either is taken by this sender or starts a new one.
    async fn send_batches(self, member: u64, shard: u32) {
        let cfg = &self.inner.cfg;
        let max_ops = cfg.max_batch_ops.clamp(1, MAX_BATCH_OPS);
        // Room for the request's tag, shard and count.
        let max_bytes = cfg.max_batch_bytes.clamp(1, MAX_BATCH_BYTES - 16);
        loop {
            let batch = {
                let mut queues = self.inner.batches.lock();
                let Some(q) = queues.get_mut(&(member, shard)) else {
                    return;
                };
                let mut batch = Vec::new();
                let mut bytes = 0;
                while let Some(next) = q.ops.front() {
                    if next.tx.is_closed() {
                        // Its caller gave up (deadline) or already retried elsewhere: never send it.
                        q.ops.pop_front();
                        continue;
                    }
                    if !batch.is_empty()
                        && (batch.len() >= max_ops || bytes + next.bytes > max_bytes)
                    {
                        break;
                    }
                    bytes += next.bytes;
                    batch.extend(q.ops.pop_front());
                }
                if batch.is_empty() {
                    q.senders -= 1;
                    return;
                }
                batch
            };
            self.send_batch(member, shard, batch).await;
        }
    }

    /// Sends one batch (a lone command as a plain [`Request::Write`]) and hands each command its own answer.
    async fn send_batch(&self, member: u64, shard: u32, batch: Vec<Queued>) {
        let mut txs = Vec::with_capacity(batch.len());
        let mut cmds = Vec::with_capacity(batch.len());
        for q in batch {
            txs.push(q.tx);
            cmds.push(q.cmd);
        }
        let n = cmds.len();
        let req = if n == 1 {
            let cmd = cmds.pop().expect("one command");
            Request::Write { shard, cmd }
        } else {
            Request::WriteBatch { shard, cmds }
        };
        // Bounded like one attempt, so a lost answer never holds the sender (and its queue) forever.
        let res = tokio::time::timeout(
            self.inner.cfg.attempt_timeout,
            self.inner.connector.call(member, req),
        )
        .await;
        let all = |txs: Vec<oneshot::Sender<Result<Response, CallError>>>,
                   r: Result<Response, CallError>| {
            for tx in txs {
                let _ = tx.send(r.clone());
            }
        };
        match res {
            Ok(Ok(Response::Writes(results))) if results.len() == n => {
                for (tx, r) in txs.into_iter().zip(results) {
                    let _ = tx.send(Ok(match r {
                        Ok(w) => Response::Write(w),
                        Err(e) => Response::Err(e),
                    }));
                }
            }
            Ok(Ok(Response::Writes(results))) => all(
                txs,
                Err(CallError::BadResponse(format!(
                    "{} results for a batch of {n} writes",
                    results.len()
                ))),
            ),
            // A lone write's own answer, or an error for the whole batch (not leader, busy, stopped).
            Ok(Ok(resp @ (Response::Write(_) | Response::Err(_)))) => all(txs, Ok(resp)),
            Ok(Ok(other)) => all(
                txs,
                Err(CallError::BadResponse(format!(
                    "unexpected answer to a write batch: {other:?}"
                ))),
            ),
            Ok(Err(e)) => all(txs, Err(e)),
            Err(_) => {
                self.inner.connector.no_answer(member);
                all(
                    txs,
                    Err(CallError::Unreachable(format!(
                        "write batch to member {member} timed out"
                    ))),
                )
            }
        }
    }

    /// Sends `req` to the shard's leader until it succeeds, fails for good, or the deadline passes.
    async fn call(&self, shard: u32, req: Request) -> Result<Response, GcsError> {
        let is_write = matches!(req, Request::Write { .. } | Request::WriteBatch { .. });
        let cfg = &self.inner.cfg;
        let start = Instant::now();
        let deadline = start + self.call_timeout;
        let mut backoff = cfg.backoff_min;
        let mut attempt = 0usize;
        let mut last = String::from("no attempt");
        let mut maybe_applied = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(GcsError::Timeout {
                    after: now - start,
                    outcome_unknown: is_write && maybe_applied,
                    last,
                });
            }
            let member = self.pick(shard, attempt);
            let attempt_deadline = deadline.min(now + cfg.attempt_timeout);
            let res = tokio::time::timeout_at(attempt_deadline, self.attempt(member, &req)).await;
            let mut hinted = false;
            match res {
                Ok(Ok(Response::Err(e))) => match e {
                    ServerError::NotLeader { leader } => {
                        last = e.to_string();
                        hinted = leader.is_some_and(|l| l != member);
                        self.set_leader(shard, leader.filter(|&l| l != member));
                    }
                    ServerError::LeadershipLost { leader } => {
                        last = e.to_string();
                        maybe_applied = true;
                        hinted = leader.is_some_and(|l| l != member);
                        self.set_leader(shard, leader.filter(|&l| l != member));
                    }
                    ServerError::Busy
                    | ServerError::Stopped(_)
                    | ServerError::NoSuchShard { .. } => {
                        last = e.to_string();
                        maybe_applied |= matches!(e, ServerError::Stopped(_));
                        self.forget_leader(shard, member);
                    }
                    ServerError::Invalid(v) => return Err(GcsError::Invalid(v)),
                    ServerError::DedupExpired { seq, .. } => {
                        return Err(GcsError::DedupExpired { seq });
                    }
                    ServerError::Compacted { oldest } => {
                        return Err(GcsError::Compacted { oldest });
                    }
                    ServerError::BadRequest(why) => return Err(GcsError::Protocol(why)),
                    // The client keeps its batches within the limits; a member that disagrees runs with
                    // other limits, and retrying will not change its mind.
                    e @ ServerError::BatchTooLarge { .. } => {
                        return Err(GcsError::Protocol(e.to_string()));
                    }
                },
                Ok(Ok(resp)) => {
                    self.set_leader(shard, Some(member));
                    return Ok(resp);
                }
                Ok(Err(e)) => {
                    last = e.to_string();
                    maybe_applied = true;
                    self.forget_leader(shard, member);
                }
                Err(_) => {
                    last = format!("attempt at member {member} timed out");
                    maybe_applied = true;
                    self.forget_leader(shard, member);
                    self.inner.connector.no_answer(member);
                }
            }
            attempt += 1;
            if !hinted {
                // No fresh hint: back off before asking around (an election is probably in progress).
                let pause = self
                    .jitter(backoff)
                    .min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(cfg.backoff_max);
            }
        }
    }
}

/// Writes queued for one `(member, shard)` and how many senders serve them.
#[derive(Default)]
struct BatchQueue {
    ops: VecDeque<Queued>,
    senders: usize,
}

/// One queued write: its command, encoded size, and where its result goes.
struct Queued {
    cmd: Command,
    bytes: usize,
    tx: oneshot::Sender<Result<Response, CallError>>,
}

/// The smallest key greater than every key starting with `prefix` (`None` if there is none).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A stream of changes under one prefix (see [`GcsClient::watch`]). Dropping it stops the background poll.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<Event, GcsError>>,
    task: tokio::task::JoinHandle<()>,
    last: u64,
}

impl WatchStream {
    /// The next change, in revision order. `Some(Err(Compacted))` ends the stream: resync and watch again.
    pub async fn next(&mut self) -> Option<Result<Event, GcsError>> {
        let item = self.rx.recv().await;
        if let Some(Ok(e)) = &item {
            self.last = e.revision;
        }
        item
    }

    /// The next change, or `None` if none arrives within `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Option<Result<Event, GcsError>> {
        tokio::time::timeout(timeout, self.next())
            .await
            .ok()
            .flatten()
    }

    /// Revision of the last event returned (or the starting revision).
    pub fn last_revision(&self) -> u64 {
        self.last
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
