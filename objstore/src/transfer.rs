//! `Transfer`: the network driver that moves objects between nodes' stores over the transport mesh.
//!
//! A thin adapter around the [`PullManager`] core: it executes the core's actions (reserve room in the store, fetch
//! from a source, cancel, wake waiters) and feeds back what happened. The bytes path is:
//!
//! 1. the puller reserves the object's final aligned buffer in its store ([`ObjectStore::create_buffer`]);
//! 2. it asks the source for chunks ([`kind::PULL`] requests, several in flight);
//! 3. the source answers each by streaming the chunk back ([`kind::CHUNK`], `Mesh::send_stream`, zero copy from the
//!    source's pinned buffer) with a CRC-32 of the chunk in the stream header;
//! 4. the puller reads the stream straight into that chunk's place in the final buffer, checks the CRC (a corrupted
//!    chunk is rejected and the fetch fails over), and when every chunk is in, seals the buffer as a secondary copy.
//!
//! Chunks already verified survive a failover: a retry from another copy only fetches the missing ones.
//!
//! What this file is not: it does not decide which copy to use, when to retry or when to give up (the core does);
//! it does not learn where copies are (the owner's [`crate::RefTable`] does, and the SDK passes the sources in).
//!
//! # Wiring
//! The mesh takes one handler per node, owned by the SDK; that handler forwards the kinds for which
//! [`Transfer::handles`] is true to [`Transfer::on_request`] / [`Transfer::on_stream`], and peer losses to
//! [`Transfer::on_peer_lost`]. [`TransferHandler`] does exactly that for nodes (and tests) that only move objects.
//!
//! ```
//! use oxray_objstore::{NodeId, ObjectId, ObjectStore, StoreConfig, Transfer, TransferConfig, TransferHandler};
//! use oxray_transport::{tls::ClusterCa, Mesh, MeshConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = ClusterCa::generate()?;
//! let mut nodes = Vec::new();
//! for _ in 0..2 {
//!     // 1. Each node: a store, a transfer driver around it, and a mesh whose handler forwards to the driver.
//!     let transfer = Transfer::new(ObjectStore::new(StoreConfig::with_limit(64 << 20)), TransferConfig::default());
//!     let cfg = MeshConfig::new("127.0.0.1:0".parse()?, ca.issue(NodeId::random())?);
//!     let mesh = Mesh::bind(cfg, TransferHandler::new(transfer.clone())).await?;
//!     // 2. Then the driver gets the mesh it sends on.
//!     transfer.attach(mesh.clone());
//!     nodes.push((transfer, mesh));
//! }
//! let (a, a_mesh) = &nodes[0];
//! let (b, b_mesh) = &nodes[1];
//! a_mesh.add_peer(b_mesh.node_id(), b_mesh.local_addr());
//!
//! // 3. b produces an object; a learns (from its owner) its size and where copies live, and pulls it.
//! let id = ObjectId::random();
//! b.store().put(id, &vec![7u32; 10_000])?;
//! let size = b.store().get_bytes(id)?.len() as u64;
//! a.pull(id, size, &[b_mesh.node_id()]).await?;
//!
//! // 4. a reads its secondary copy in place (validated once, since it came from the network).
//! assert_eq!(a.store().get::<Vec<u32>>(id)?[9_999], 7);
//! # for (_, mesh) in &nodes { mesh.shutdown().await; }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use oxray_transport::{Handler, IncomingStream, Mesh, Message, Responder};
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};
use tokio::task::{AbortHandle, JoinSet};

use crate::pull::{PullAction, PullConfig, PullError, PullManager};
use crate::store::{ObjectBuffer, ObjectStore};
use crate::{NodeId, ObjectId};

/// Message kinds used by the transfer protocol (a block the SDK leaves free: its kinds are below 0x4000).
pub mod kind {
    /// Request for one chunk of an object ([`super::wire::PullRequest`]).
    pub const PULL: u16 = 0x4001;
    /// A streamed chunk, with a [`super::wire::ChunkHeader`] as the stream header.
    pub const CHUNK: u16 = 0x4002;
    /// Success reply to `PULL` and `CHUNK`.
    pub const OK: u16 = 0x4003;
}

/// The transfer protocol's messages, as rkyv archives.
pub mod wire {
    /// Asks the source to stream `len` bytes at `offset` of object `id` back, tagged with `fetch`.
    #[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub struct PullRequest {
        /// The object.
        pub id: u128,
        /// The puller's fetch token, echoed in the chunk header.
        pub fetch: u64,
        /// Byte offset of the chunk.
        pub offset: u64,
        /// Chunk length.
        pub len: u64,
        /// The whole object's size as the puller believes it; a source holding a different size refuses, so a
        /// wrong size can never produce a truncated or padded copy.
        pub total: u64,
    }

    /// Header of a streamed chunk: where it goes and its checksum.
    #[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    pub struct ChunkHeader {
        /// The object.
        pub id: u128,
        /// The fetch token from the request.
        pub fetch: u64,
        /// Byte offset of the chunk.
        pub offset: u64,
        /// Chunk length (equal to the stream's payload length).
        pub len: u64,
        /// CRC-32 of the chunk's bytes.
        pub crc: u32,
    }
}

/// Settings of the transfer driver.
#[derive(Clone, Debug)]
pub struct TransferConfig {
    /// Bytes per chunk. Default 8 MiB: large enough to amortise a request, small enough to spread over streams.
    pub chunk_bytes: u64,
    /// Chunks of one object in flight at once (parallel QUIC streams). Default 4.
    pub parallel_chunks: usize,
    /// Deadline of one chunk request (request, stream and verification). Default 60 s.
    pub chunk_timeout: Duration,
    /// Bounds of the pull core.
    pub pull: PullConfig,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            chunk_bytes: 8 << 20,
            parallel_chunks: 4,
            chunk_timeout: Duration::from_secs(60),
            pull: PullConfig::default(),
        }
    }
}

/// What one node's transfer driver has done since it started (for status reports and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Pulls that ended with the object in the store.
    pub pulled: u64,
    /// Bytes of those objects.
    pub pulled_bytes: u64,
    /// Pulls that failed for good (lost, no room, refused).
    pub failed: u64,
    /// Fetches started, one per source tried: more than `pulled + failed` means some pull moved to another copy.
    pub fetches: u64,
    /// Pulls not finished yet.
    pub active: u64,
}

#[derive(Default)]
struct Counters {
    pulled: AtomicU64,
    pulled_bytes: AtomicU64,
    failed: AtomicU64,
    fetches: AtomicU64,
}

/// Why a transfer request could not be served (sent to the peer as the error text; never a panic).
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("object {0} not here")]
    NotHere(ObjectId),
    #[error("chunk {offset}+{len} outside object of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("puller expects {expected} bytes, object here has {size}")]
    SizeMismatch { expected: u64, size: u64 },
    #[error("no pull in progress for object {0}")]
    NoPull(ObjectId),
    #[error("unexpected chunk at {0} (not requested from this node by this fetch)")]
    Unexpected(u64),
    #[error("chunk at {0} abandoned: its fetch was given up (source lost or stalled)")]
    Abandoned(u64),
    #[error("chunk at {offset} corrupted: checksum {got:08x}, expected {want:08x}")]
    Corrupted { offset: u64, got: u32, want: u32 },
    #[error("transport: {0}")]
    Transport(#[from] oxray_transport::TransportError),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Chunk {
    Free,
    /// Asked of `source` by fetch `fetch`; only a stream from that source with that token may fill it.
    Requested {
        fetch: u64,
        source: NodeId,
    },
    /// A stream for fetch `fetch` is writing it now (exclusive access to its byte range).
    Writing {
        fetch: u64,
    },
    /// Still being written, but its fetch was given up: the writer is to stop, and then the chunk is `Free`.
    Abandoned,
    /// Filled and checksum-verified.
    Done,
}

/// The reserved final buffer of one pull, and which chunks of it are filled.
struct Landing {
    id: ObjectId,
    len: u64,
    chunk_bytes: u64,
    /// Start of the buffer; valid while `buffer` holds it (taken only when every chunk is `Done`).
    ptr: *mut u8,
    buffer: Mutex<Option<ObjectBuffer>>,
    chunks: Mutex<Vec<Chunk>>,
    /// Woken when a chunk settles or a fetch is released: a fetch waits on chunks another fetch still owns, and a
    /// writer watches for its chunk being abandoned.
    settled: Notify,
}

// SAFETY: `ptr` points into the ObjectBuffer owned by `buffer`; distinct chunks' byte ranges are written by at most
// one task each (the `Writing` state, taken under the `chunks` lock), and the buffer is only taken out once no
// chunk is being written.
unsafe impl Send for Landing {}
// SAFETY: as above.
unsafe impl Sync for Landing {}

impl Landing {
    fn new(id: ObjectId, mut buffer: ObjectBuffer, chunk_bytes: u64) -> Self {
        let len = buffer.len() as u64;
        let ptr = buffer.as_mut_slice().as_mut_ptr();
        let count = len.div_ceil(chunk_bytes).max(1) as usize;
        Landing {
            id,
            len,
            chunk_bytes,
            ptr,
            buffer: Mutex::new(Some(buffer)),
            chunks: Mutex::new(vec![Chunk::Free; count]),
            settled: Notify::new(),
        }
    }

    fn range(&self, index: usize) -> (u64, u64) {
        let offset = index as u64 * self.chunk_bytes;
        (offset, self.chunk_bytes.min(self.len - offset))
    }

    /// Claims the next free chunk for `fetch` from `source`.
    fn claim(&self, fetch: u64, source: NodeId) -> Option<usize> {
        let mut chunks = self.chunks.lock();
        let index = chunks.iter().position(|c| *c == Chunk::Free)?;
        chunks[index] = Chunk::Requested { fetch, source };
        Some(index)
    }

    fn all_done(&self) -> bool {
        self.chunks.lock().iter().all(|c| *c == Chunk::Done)
    }

    /// Returns chunks requested by `fetch` but never streamed (its requests failed or were abandoned), and tells
    /// any stream still writing for `fetch` to stop, so its chunk goes back to `Free` as soon as it does.
    fn release(&self, fetch: u64) {
        let mut chunks = self.chunks.lock();
        for c in chunks.iter_mut() {
            match *c {
                Chunk::Requested { fetch: f, .. } if f == fetch => *c = Chunk::Free,
                Chunk::Writing { fetch: f } if f == fetch => *c = Chunk::Abandoned,
                _ => {}
            }
        }
        drop(chunks);
        self.settled.notify_waiters();
    }

    /// Starts writing the chunk at `offset` for a stream from `source`: the returned guard has exclusive access to
    /// the chunk's bytes until it is finished or dropped.
    fn start_write(
        self: &Arc<Self>,
        fetch: u64,
        source: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<ChunkWrite, ServeError> {
        if self.chunk_bytes == 0
            || !offset.is_multiple_of(self.chunk_bytes)
            || offset >= self.len.max(1)
        {
            return Err(ServeError::Unexpected(offset));
        }
        let index = (offset / self.chunk_bytes) as usize;
        if self.range(index) != (offset, len) {
            return Err(ServeError::OutOfRange {
                offset,
                len,
                size: self.len,
            });
        }
        let mut chunks = self.chunks.lock();
        match chunks.get(index) {
            Some(Chunk::Requested {
                fetch: f,
                source: s,
            }) if *f == fetch && *s == source => {}
            _ => return Err(ServeError::Unexpected(offset)),
        }
        chunks[index] = Chunk::Writing { fetch };
        Ok(ChunkWrite {
            landing: Arc::clone(self),
            index,
            offset: offset as usize,
            len: len as usize,
            finished: false,
        })
    }

    /// Resolves once the chunk at `index`, being written, is abandoned (its fetch released). A stream from a
    /// source that vanished without closing its connection (its close packet lost) would otherwise hold its chunk
    /// until the idle timeout, and every fetch from another copy would stall waiting for that one chunk.
    async fn abandoned(&self, index: usize) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.chunks.lock().get(index) == Some(&Chunk::Abandoned) {
                return;
            }
            notified.await;
        }
    }

    fn finish_write(&self, index: usize, ok: bool) {
        if let Some(c) = self.chunks.lock().get_mut(index) {
            *c = if ok { Chunk::Done } else { Chunk::Free };
        }
        self.settled.notify_waiters();
    }

    fn take_buffer(&self) -> Option<ObjectBuffer> {
        if !self.all_done() {
            return None;
        }
        self.buffer.lock().take()
    }
}

/// Exclusive write access to one chunk of a landing buffer. Dropping it unfinished (e.g. the receiving task was
/// cancelled) returns the chunk to `Free`.
struct ChunkWrite {
    landing: Arc<Landing>,
    index: usize,
    offset: usize,
    len: usize,
    finished: bool,
}

impl ChunkWrite {
    fn region(&mut self) -> &mut [u8] {
        // SAFETY: `start_write` checked that offset..offset+len lies inside the buffer and moved the chunk to
        // `Writing`, which only this guard can leave; the buffer stays alive and in place while any chunk is not
        // `Done` (see `Landing`), and `&mut self` makes this the only live reference to the region.
        unsafe { std::slice::from_raw_parts_mut(self.landing.ptr.add(self.offset), self.len) }
    }

    fn finish(mut self, ok: bool) {
        self.finished = true;
        self.landing.finish_write(self.index, ok);
    }
}

impl Drop for ChunkWrite {
    fn drop(&mut self) {
        if !self.finished {
            self.landing.finish_write(self.index, false);
        }
    }
}

type Waiters = HashMap<ObjectId, Vec<oneshot::Sender<Result<(), PullError>>>>;

struct Inner {
    store: ObjectStore,
    config: TransferConfig,
    mesh: OnceLock<Mesh>,
    core: Mutex<PullManager>,
    waiters: Mutex<Waiters>,
    landings: DashMap<ObjectId, Arc<Landing>>,
    fetches: Mutex<HashMap<u64, AbortHandle>>,
    /// Wakes the timer task when the core's next deadline may have moved (and when the driver is dropped).
    timer: Arc<Notify>,
    counters: Counters,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the timer task notice the driver is gone and exit.
        self.timer.notify_one();
    }
}

/// The transfer driver of one node. Cheap to clone. See the module docs for how to wire it into a mesh.
///
/// Dropping every handle stops its timer task; pulls in progress then never complete, so keep it as long as the
/// node runs.
#[derive(Clone)]
pub struct Transfer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("active_pulls", &self.inner.core.lock().active())
            .finish()
    }
}

impl Transfer {
    /// A driver serving and filling `store`. Call [`Transfer::attach`] once the node's mesh is bound.
    pub fn new(store: ObjectStore, config: TransferConfig) -> Self {
        let core = PullManager::new(config.pull.clone());
        Transfer {
            inner: Arc::new(Inner {
                store,
                config,
                mesh: OnceLock::new(),
                core: Mutex::new(core),
                waiters: Mutex::new(HashMap::new()),
                landings: DashMap::new(),
                fetches: Mutex::new(HashMap::new()),
                timer: Arc::new(Notify::new()),
                counters: Counters::default(),
            }),
        }
    }

    /// Gives the driver the node's mesh (which had to be bound with a handler first) and starts its timer task.
    /// Must run inside a tokio runtime. Later calls are ignored.
    pub fn attach(&self, mesh: Mesh) {
        if self.inner.mesh.set(mesh).is_ok() {
            tokio::spawn(timer_loop(
                Arc::downgrade(&self.inner),
                Arc::clone(&self.inner.timer),
            ));
        }
    }

    /// The store this driver serves.
    pub fn store(&self) -> &ObjectStore {
        &self.inner.store
    }

    /// What this driver has done so far.
    pub fn stats(&self) -> TransferStats {
        let c = &self.inner.counters;
        TransferStats {
            pulled: c.pulled.load(Ordering::Relaxed),
            pulled_bytes: c.pulled_bytes.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            active: self.inner.core.lock().active() as u64,
        }
    }

    /// Whether a message of this kind belongs to the transfer protocol.
    pub fn handles(kind: u16) -> bool {
        matches!(kind, kind::PULL | kind::CHUNK)
    }

    /// Makes object `id` (`size` bytes, copies on `sources`) local, pulling it if needed; returns once it is in the
    /// store as a secondary copy, or with the reason it never will be. Concurrent calls for one object share one pull.
    pub async fn pull(&self, id: ObjectId, size: u64, sources: &[NodeId]) -> Result<(), PullError> {
        self.pull_with_fallback(id, size, sources, &[]).await
    }

    /// Like [`Transfer::pull`], but `fallback` is asked only once every copy in `sources` has failed (the core
    /// spreads pulls over `sources`, never over `fallback`). For a copy that should not carry the load while others
    /// can, such as an owner's, which every large result of its tasks lands on.
    pub async fn pull_with_fallback(
        &self,
        id: ObjectId,
        size: u64,
        sources: &[NodeId],
        fallback: &[NodeId],
    ) -> Result<(), PullError> {
        if self.inner.store.contains(id) {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.inner.waiters.lock().entry(id).or_default().push(tx);
        // Re-check after registering: the object may have arrived in between (and its waiters been woken).
        if self.inner.store.contains(id) {
            self.wake(id, Ok(()));
            return Ok(());
        }
        self.with_core(|core, now| {
            core.request(id, size, sources, now);
            // Appended unrotated, before any fetch can start (room is reserved first, outside this lock).
            core.add_sources(id, fallback);
        });
        match rx.await {
            Ok(result) => result,
            // The sender is only dropped if the driver itself is gone.
            Err(_) => Err(PullError::ObjectLost {
                id,
                tried: Vec::new(),
            }),
        }
    }

    /// Handles a `PULL` request: streams the asked chunk of a local object back to the requester.
    pub fn on_request(&self, msg: Message, reply: Responder) {
        let this = self.clone();
        tokio::spawn(async move {
            match this.serve_chunk(&msg).await {
                Ok(()) => reply.send(kind::OK, Bytes::new()),
                Err(e) => {
                    tracing::debug!(peer = %msg.source(), cause = %e, "pull request failed");
                    reply.error(e);
                }
            }
        });
    }

    /// Handles a `CHUNK` stream: writes it into the waiting pull's buffer and verifies it.
    pub fn on_stream(&self, header: Message, mut incoming: IncomingStream) {
        let this = self.clone();
        tokio::spawn(async move {
            match this.receive_chunk(&header, &mut incoming).await {
                Ok(()) => incoming.reply(kind::OK, Bytes::new()),
                Err(e) => {
                    tracing::debug!(peer = %header.source(), cause = %e, "chunk rejected");
                    incoming.error(e);
                }
            }
        });
    }

    /// A peer is gone: fetches from it fail over now instead of at their stall timeout.
    pub fn on_peer_lost(&self, node: NodeId) {
        self.with_core(|core, now| core.node_lost(node, now));
    }

    async fn serve_chunk(&self, msg: &Message) -> Result<(), ServeError> {
        let req = msg
            .archived::<wire::PullRequest>()
            .map_err(|_| ServeError::Malformed("pull request"))?;
        let id = ObjectId(req.id.to_native());
        let (offset, len, fetch) = (
            req.offset.to_native(),
            req.len.to_native(),
            req.fetch.to_native(),
        );
        let bytes = self
            .inner
            .store
            .get_bytes(id)
            .map_err(|_| ServeError::NotHere(id))?;
        let size = bytes.len() as u64;
        if req.total.to_native() != size {
            return Err(ServeError::SizeMismatch {
                expected: req.total.to_native(),
                size,
            });
        }
        let end = offset.checked_add(len).filter(|&e| e <= size);
        let Some(end) = end else {
            return Err(ServeError::OutOfRange { offset, len, size });
        };
        // Slicing keeps the object pinned (the slice shares the pinned handle) and copies nothing.
        let chunk = bytes.slice(offset as usize..end as usize);
        let crc = crc32fast::hash(&chunk);
        let header = wire::ChunkHeader {
            id: id.0,
            fetch,
            offset,
            len,
            crc,
        };
        let header = rkyv::to_bytes::<rkyv::rancor::BoxedError>(&header)
            .map_err(|_| ServeError::Malformed("header"))?;
        let mesh = self
            .inner
            .mesh
            .get()
            .ok_or(ServeError::Malformed("mesh not attached"))?;
        let reply = mesh
            .send_stream_with_deadline(
                msg.source(),
                kind::CHUNK,
                Bytes::from_owner(header),
                chunk,
                self.inner.config.chunk_timeout,
            )
            .await?;
        if reply.kind() != kind::OK {
            return Err(ServeError::Malformed("chunk reply"));
        }
        Ok(())
    }

    async fn receive_chunk(
        &self,
        header: &Message,
        incoming: &mut IncomingStream,
    ) -> Result<(), ServeError> {
        let hdr = header
            .archived::<wire::ChunkHeader>()
            .map_err(|_| ServeError::Malformed("chunk header"))?;
        let id = ObjectId(hdr.id.to_native());
        let (fetch, offset, len, want) = (
            hdr.fetch.to_native(),
            hdr.offset.to_native(),
            hdr.len.to_native(),
            hdr.crc.to_native(),
        );
        if incoming.len() != len {
            return Err(ServeError::Malformed("chunk length"));
        }
        let landing = self
            .inner
            .landings
            .get(&id)
            .map(|l| Arc::clone(l.value()))
            .ok_or(ServeError::NoPull(id))?;
        let mut write = landing.start_write(fetch, header.source(), offset, len)?;
        let index = write.index;
        // Dropping the read mid-way is safe: it writes into the region only while polled.
        let read = tokio::select! {
            read = incoming.read_into(write.region()) => read,
            () = landing.abandoned(index) => {
                write.finish(false);
                return Err(ServeError::Abandoned(offset));
            }
        };
        let result = match read {
            Ok(()) => {
                let got = crc32fast::hash(write.region());
                if got == want {
                    Ok(())
                } else {
                    Err(ServeError::Corrupted { offset, got, want })
                }
            }
            Err(e) => Err(ServeError::Transport(e)),
        };
        write.finish(result.is_ok());
        if result.is_ok() {
            self.with_core(|core, now| core.progress(id, fetch, now));
        }
        result
    }

    /// Runs `f` on the core, then executes every action it produced.
    fn with_core(&self, f: impl FnOnce(&mut PullManager, std::time::Instant)) {
        let actions: Vec<PullAction> = {
            let mut core = self.inner.core.lock();
            f(&mut core, std::time::Instant::now());
            std::iter::from_fn(|| core.poll_action()).collect()
        };
        self.inner.timer.notify_one();
        for action in actions {
            self.execute(action);
        }
    }

    fn execute(&self, action: PullAction) {
        match action {
            PullAction::Reserve { id, size } => {
                let this = self.clone();
                // Making room may spill to disk: keep it off the async workers.
                tokio::task::spawn_blocking(move || {
                    let reserved = usize::try_from(size)
                        .ok()
                        .map(|len| this.inner.store.create_buffer(len));
                    match reserved {
                        Some(Ok(buffer)) => {
                            if !this.inner.core.lock().contains(id) {
                                // The pull ended while we made room: give the memory back.
                                return;
                            }
                            let landing =
                                Landing::new(id, buffer, this.inner.config.chunk_bytes.max(1));
                            this.inner.landings.insert(id, Arc::new(landing));
                            this.with_core(|core, now| core.room_reserved(id, now));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(object = %id, cause = %e, "no room to pull yet");
                            this.with_core(|core, now| core.room_denied(id, now));
                        }
                        None => this.with_core(|core, now| core.room_denied(id, now)),
                    }
                });
            }
            PullAction::Fetch {
                id, source, fetch, ..
            } => {
                self.inner.counters.fetches.fetch_add(1, Ordering::Relaxed);
                let this = self.clone();
                let task = tokio::spawn(async move {
                    let ok = this.fetch(id, source, fetch).await;
                    this.inner.fetches.lock().remove(&fetch);
                    this.with_core(|core, now| {
                        if ok {
                            core.fetch_done(id, fetch, now)
                        } else {
                            core.fetch_failed(id, fetch, now)
                        }
                    });
                });
                self.inner.fetches.lock().insert(fetch, task.abort_handle());
            }
            PullAction::Cancel { id, fetch } => {
                if let Some(task) = self.inner.fetches.lock().remove(&fetch) {
                    task.abort();
                }
                if let Some(landing) = self.inner.landings.get(&id) {
                    landing.release(fetch);
                }
            }
            PullAction::Complete { id } => {
                if let Some((_, landing)) = self.inner.landings.remove(&id) {
                    let c = &self.inner.counters;
                    c.pulled.fetch_add(1, Ordering::Relaxed);
                    c.pulled_bytes.fetch_add(landing.len, Ordering::Relaxed);
                }
                self.wake(id, Ok(()));
            }
            PullAction::Fail { id, error } => {
                self.inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.inner.landings.remove(&id);
                self.wake(id, Err(error));
            }
        }
    }

    fn wake(&self, id: ObjectId, result: Result<(), PullError>) {
        let waiters = self.inner.waiters.lock().remove(&id).unwrap_or_default();
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }

    /// Fetches every missing chunk of `id` from `source`, several at a time; seals the object when all are in.
    /// Returns whether the object is now in the store.
    async fn fetch(&self, id: ObjectId, source: NodeId, fetch: u64) -> bool {
        let Some(landing) = self.inner.landings.get(&id).map(|l| Arc::clone(l.value())) else {
            return false;
        };
        let Some(mesh) = self.inner.mesh.get().cloned() else {
            return false;
        };
        let mut inflight = JoinSet::new();
        let mut failed = false;
        loop {
            while !failed && inflight.len() < self.inner.config.parallel_chunks.max(1) {
                let Some(index) = landing.claim(fetch, source) else {
                    break;
                };
                let (offset, len) = landing.range(index);
                let req = wire::PullRequest {
                    id: id.0,
                    fetch,
                    offset,
                    len,
                    total: landing.len,
                };
                let Ok(body) = rkyv::to_bytes::<rkyv::rancor::BoxedError>(&req) else {
                    failed = true;
                    break;
                };
                let (mesh, timeout) = (mesh.clone(), self.inner.config.chunk_timeout);
                inflight.spawn(async move {
                    mesh.request(source, kind::PULL, Bytes::from_owner(body), timeout)
                        .await
                });
            }
            match inflight.join_next().await {
                Some(Ok(Ok(reply))) if reply.kind() == kind::OK => {}
                Some(_) => failed = true,
                None => {
                    if failed || landing.all_done() {
                        break;
                    }
                    // Chunks still owned by an abandoned fetch: wait for them to settle, then claim what is free.
                    let settled = landing.settled.notified();
                    tokio::pin!(settled);
                    settled.as_mut().enable();
                    if landing.chunks.lock().contains(&Chunk::Free) {
                        continue;
                    }
                    if tokio::time::timeout(self.inner.config.chunk_timeout, settled)
                        .await
                        .is_err()
                    {
                        failed = true;
                    }
                }
            }
        }
        landing.release(fetch);
        if failed {
            return false;
        }
        let Some(buffer) = landing.take_buffer() else {
            return false;
        };
        match self.inner.store.seal_secondary(landing.id, buffer) {
            Ok(()) => true,
            // Someone stored it meanwhile (e.g. a local put of the same id): it is here either way.
            Err(crate::ObjectStoreError::AlreadyExists(_)) => true,
            Err(e) => {
                tracing::warn!(object = %id, cause = %e, "could not seal pulled object");
                false
            }
        }
    }
}

/// Sleeps until the core's next deadline and runs its timeouts; exits when the driver is dropped. Holds only a weak
/// reference while sleeping, so it never keeps the driver (and its store) alive.
async fn timer_loop(weak: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let deadline = {
            let Some(inner) = weak.upgrade() else { return };
            inner.core.lock().poll_timeout()
        };
        let woken = wake.notified();
        match deadline.map(|d| d.saturating_duration_since(std::time::Instant::now())) {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = woken => continue,
                }
            }
            None => {
                woken.await;
                continue;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        Transfer { inner }.with_core(|core, now| core.handle_timeout(now));
    }
}

/// A mesh handler for nodes whose only traffic is objects (and for tests): forwards the transfer kinds to a
/// [`Transfer`] and refuses the rest.
#[derive(Debug)]
pub struct TransferHandler {
    transfer: Transfer,
}

impl TransferHandler {
    /// A handler for `transfer`.
    pub fn new(transfer: Transfer) -> Arc<Self> {
        Arc::new(TransferHandler { transfer })
    }
}

impl Handler for TransferHandler {
    fn on_request(&self, msg: Message, reply: Responder) {
        if msg.kind() == kind::PULL {
            self.transfer.on_request(msg, reply);
        } else {
            reply.error(format!("unknown request kind {}", msg.kind()));
        }
    }

    fn on_stream(&self, header: Message, incoming: IncomingStream) {
        if header.kind() == kind::CHUNK {
            self.transfer.on_stream(header, incoming);
        } else {
            incoming.error(format!("unknown stream kind {}", header.kind()));
        }
    }

    fn on_peer_lost(&self, node: NodeId) {
        self.transfer.on_peer_lost(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreConfig;

    fn landing(len: usize, chunk_bytes: u64) -> Arc<Landing> {
        let store = ObjectStore::new(StoreConfig::with_limit(1 << 20));
        let buffer = store.create_buffer(len).expect("room");
        Arc::new(Landing::new(ObjectId(7), buffer, chunk_bytes))
    }

    #[tokio::test]
    async fn releasing_a_fetch_stops_its_silent_writer_and_frees_the_chunk() {
        let landing = landing(64, 16);
        let (gone, other) = (NodeId::random(), NodeId::random());
        let index = landing.claim(1, gone).expect("a free chunk");
        let (offset, len) = landing.range(index);
        let write = landing
            .start_write(1, gone, offset, len)
            .expect("requested");
        // A writer whose stream never delivers another byte, like one from a source whose close packet was lost.
        let writer = {
            let landing = Arc::clone(&landing);
            tokio::spawn(async move {
                tokio::select! {
                    () = std::future::pending::<()>() => unreachable!(),
                    () = landing.abandoned(index) => write.finish(false),
                }
            })
        };
        // Releasing another fetch does not touch it.
        landing.release(2);
        tokio::task::yield_now().await;
        assert!(!writer.is_finished());
        assert!(matches!(
            landing.chunks.lock()[index],
            Chunk::Writing { fetch: 1 }
        ));

        landing.release(1);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer gives up once its fetch is released")
            .expect("join");
        // Another copy can now fetch the chunk, and a late stream for the released fetch is refused.
        assert_eq!(landing.chunks.lock()[index], Chunk::Free);
        let again = (0..4)
            .map_while(|_| landing.claim(3, other))
            .collect::<Vec<_>>();
        assert!(again.contains(&index));
        assert!(matches!(
            landing.start_write(1, gone, offset, len),
            Err(ServeError::Unexpected(_))
        ));
    }

    #[tokio::test]
    async fn a_fetch_released_before_its_writer_watches_is_still_seen() {
        let landing = landing(16, 16);
        let source = NodeId::random();
        let index = landing.claim(4, source).expect("a free chunk");
        let (offset, len) = landing.range(index);
        let write = landing
            .start_write(4, source, offset, len)
            .expect("requested");
        landing.release(4);
        tokio::time::timeout(Duration::from_secs(5), landing.abandoned(index))
            .await
            .expect("already released");
        write.finish(false);
        assert_eq!(landing.chunks.lock()[index], Chunk::Free);
    }
}
