//! `ObjectStore`: one node's store of immutable rkyv archives, read in place through pinning guards.
//!
//! This is the driver around the pure eviction policy ([`crate::memory::plan_eviction`]): it owns the objects, the
//! memory accountant (`buffer.rs`) and the spill files (`spill.rs`). It does not talk to other nodes
//! (pulling is [`crate::pull`]) and does not count references (that is the owner's [`crate::refs::RefTable`]).
//!
//! # Locking
//! Three kinds of locks, always taken in this order and never the other way:
//! `evict_lock` (one eviction at a time) → a shard of `objects` → one object's `slot`. While a shard lock is held,
//! slots are only ever `try_lock`ed; blocking slot locks are taken with no shard lock held. Eviction only ever `try_lock`s slots, so a thread that holds a slot while restoring its
//! object from disk (and so may need to evict others) cannot deadlock with another eviction.

use std::any::TypeId;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::{self, BoxedError, Source};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::{Positional, Writer};
use rkyv::{Archive, Deserialize, Serialize};
use tokio::sync::Notify;

use crate::ObjectId;
use crate::buffer::{Accounts, Adopted, ObjectBuf, REQUIRED_ALIGN};
use crate::config::StoreConfig;
use crate::error::{FailureReason, MemoryReport, ObjectStoreError};
use crate::memory::{Candidate, Eviction, Plan, plan_eviction};
use crate::spill::{self, SpillFile};

/// How many times an allocation evicts and retries before giving up (other threads may take the freed room).
const ALLOCATE_ATTEMPTS: usize = 4;

/// A value that can be stored: rkyv-serializable into the store's buffers, and checkable when its bytes come from
/// elsewhere. Every type with `#[derive(rkyv::Archive, rkyv::Serialize)]` (and `'static`) implements it.
pub trait Object:
    Archive<Archived: for<'a> CheckBytes<HighValidator<'a, BoxedError>>>
    + for<'a, 'b> Serialize<HighSerializer<ObjectWriter<'b>, ArenaHandle<'a>, BoxedError>>
    + 'static
{
}

impl<T> Object for T where
    T: Archive<Archived: for<'a> CheckBytes<HighValidator<'a, BoxedError>>>
        + for<'a, 'b> Serialize<HighSerializer<ObjectWriter<'b>, ArenaHandle<'a>, BoxedError>>
        + 'static
{
}

/// The rkyv writer the store serializes with: first in counting mode (to learn the exact size and reserve memory
/// before allocating anything), then writing straight into the object's final buffer.
#[derive(Debug)]
pub struct ObjectWriter<'b> {
    buf: Option<&'b mut [u8]>,
    pos: usize,
    /// Past the end of `buf`: stop writing and only count (a scratch buffer for small values), instead of failing
    /// (the object's own buffer, sized by the counting pass).
    count_past_end: bool,
}

impl<'b> ObjectWriter<'b> {
    fn counting() -> Self {
        ObjectWriter {
            buf: None,
            pos: 0,
            count_past_end: false,
        }
    }

    fn into(buf: &'b mut [u8]) -> Self {
        ObjectWriter {
            buf: Some(buf),
            pos: 0,
            count_past_end: false,
        }
    }
}

impl Positional for ObjectWriter<'_> {
    fn pos(&self) -> usize {
        self.pos
    }
}

/// The writing pass produced more bytes than were counted: the value's serializer is not deterministic, or the
/// length a caller passed was wrong.
#[derive(Debug, thiserror::Error)]
#[error("value serialized to a different size on the second pass")]
struct SizeChanged;

impl<E: rancor::Source> Writer<E> for ObjectWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        let end = self.pos + bytes.len();
        if let Some(buf) = self.buf.as_deref_mut() {
            match buf.get_mut(self.pos..end) {
                Some(dst) => dst.copy_from_slice(bytes),
                None if self.count_past_end => self.buf = None,
                None => return Err(E::new(SizeChanged)),
            }
        }
        self.pos = end;
        Ok(())
    }
}

/// The exact size of `value` once archived, found by serializing it without writing anything (no copy of its data):
/// callers use it to choose between an inline buffer and the store before paying for either.
pub fn archived_len<T: Object>(value: &T) -> Result<usize, String> {
    rkyv::api::high::to_bytes_in::<_, BoxedError>(value, ObjectWriter::counting())
        .map(|w| w.pos)
        .map_err(|e| e.to_string())
}

/// Bytes of archive that [`archive_if_small`] serializes on the stack.
pub const SMALL_ARCHIVE: usize = 256;

/// Serializes `value` in one pass when its archive takes at most [`SMALL_ARCHIVE`] bytes, and returns it in an
/// exact-size aligned buffer; otherwise returns its exact size (the same pass counts the rest without writing), as
/// [`archived_len`] would. Small values, the common case of a `put`, so pay for one pass instead of two.
pub fn archive_if_small<T: Object>(
    value: &T,
) -> Result<Result<rkyv::util::AlignedVec<16>, usize>, String> {
    let mut scratch = [0u8; SMALL_ARCHIVE];
    let writer = ObjectWriter {
        count_past_end: true,
        ..ObjectWriter::into(&mut scratch)
    };
    // A thread-local scratch arena of our own: rkyv's `to_bytes_in` takes its arena out of a thread-local and shrinks
    // it back after every call, about half the cost of archiving a small value. This one is shrunk only when a
    // value made it grow past a bound.
    thread_local! {
        static ARENA: std::cell::RefCell<rkyv::ser::allocator::Arena> =
            std::cell::RefCell::new(rkyv::ser::allocator::Arena::with_capacity(1024));
    }
    const ARENA_KEPT: usize = 64 * 1024;
    let written = ARENA.with(|arena| match arena.try_borrow_mut() {
        Ok(mut arena) => {
            let written = rkyv::api::high::to_bytes_in_with_alloc::<_, _, BoxedError>(
                value,
                writer,
                arena.acquire(),
            );
            if arena.capacity() > ARENA_KEPT {
                arena.shrink();
            }
            written
        }
        // Serializing a value whose serialization puts (a custom impl): take rkyv's own arena.
        Err(_) => rkyv::api::high::to_bytes_in::<_, BoxedError>(value, writer),
    });
    let len = written.map_err(|e| e.to_string())?.pos;
    if len > SMALL_ARCHIVE {
        return Ok(Err(len));
    }
    let mut out = rkyv::util::AlignedVec::<16>::with_capacity(len);
    out.extend_from_slice(&scratch[..len]);
    Ok(Ok(out))
}

/// Counts of what the store holds, for tests, metrics and `list objects`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Objects known to this store (in memory or spilled).
    pub objects: usize,
    /// Bytes charged for object data.
    pub used: usize,
    /// Bytes of free buffers in the pool.
    pub pooled: usize,
    /// The memory limit.
    pub limit: usize,
    /// Objects currently only on disk.
    pub spilled: usize,
    /// Objects currently pinned.
    pub pinned: usize,
}

/// One object as listed by [`ObjectStore::objects`] (for `list objects` and the dashboard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object.
    pub id: ObjectId,
    /// Archive length in bytes.
    pub len: usize,
    /// A copy pulled from another node (dropped, not spilled, under pressure).
    pub secondary: bool,
    /// In memory now (it may also have a spill file).
    pub resident: bool,
    /// Has a spill file.
    pub spilled: bool,
    /// Live guards and `get_bytes` handles.
    pub pins: usize,
}

/// One object's mutable state, under its own lock.
#[derive(Debug)]
struct Slot {
    /// The in-memory copy, if resident.
    resident: Option<Bytes>,
    /// Bytes charged for the resident copy.
    charge: usize,
    /// The spill file, if the object was ever spilled (kept after a restore, so a second eviction needs no write).
    spilled: Option<SpillFile>,
    /// Live guards and `get_bytes` handles. While non-zero the resident copy cannot be evicted.
    pins: usize,
    /// Set by `free`: the entry is out of the map and must not be pinned again.
    freed: bool,
}

#[derive(Debug)]
struct Entry {
    id: ObjectId,
    len: usize,
    /// A copy pulled from another node: dropped (not spilled) under memory pressure.
    secondary: bool,
    /// The type `put` serialized, for which access needs no validation; `None` for bytes from elsewhere.
    put_type: Option<TypeId>,
    /// The last type the bytes were validated as (for bytes from elsewhere): validation runs once, not per `get`.
    validated: Mutex<Option<TypeId>>,
    /// Logical time of last use, for least-recently-used eviction.
    last_use: AtomicU64,
    slot: Mutex<Slot>,
}

impl Entry {
    fn ensure_valid<T: Object>(&self, bytes: &[u8]) -> Result<(), ObjectStoreError> {
        let ty = TypeId::of::<T>();
        if self.put_type == Some(ty) {
            return Ok(());
        }
        let mut validated = self.validated.lock();
        if *validated == Some(ty) {
            return Ok(());
        }
        rkyv::access::<T::Archived, BoxedError>(bytes).map_err(|source| {
            ObjectStoreError::Invalid {
                id: self.id,
                source,
            }
        })?;
        *validated = Some(ty);
        Ok(())
    }

    fn unpin(&self) {
        let mut slot = self.slot.lock();
        slot.pins = slot.pins.saturating_sub(1);
    }
}

struct Inner {
    config: StoreConfig,
    accounts: Arc<Accounts>,
    objects: DashMap<ObjectId, Arc<Entry>>,
    /// Objects that can never be produced (owner died, all copies lost): `get` and `wait` fail fast on them.
    failed: DashMap<ObjectId, FailureReason>,
    /// One `Notify` per object someone is waiting for; removed when the object arrives or the last waiter leaves.
    waiters: DashMap<ObjectId, Arc<Notify>>,
    /// One eviction at a time: two concurrent evictions would each spill for the same shortfall.
    evict_lock: Mutex<()>,
    /// Logical clock for recency; a counter rather than the wall clock keeps eviction deterministic.
    clock: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for entry in self.objects.iter() {
            if let Some(file) = entry.slot.lock().spilled.take() {
                spill::remove(&file);
            }
        }
        if let Some(dir) = &self.config.spill_dir {
            // Only succeeds if empty: never removes anything we did not write.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// One node's object store. Cheap to clone (a handle to shared state) and safe to use from any thread.
///
/// Dropping the last handle frees every object and removes the spill files.
#[derive(Clone)]
pub struct ObjectStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A buffer reserved in the store for an object being received (e.g. chunks arriving from another node), written
/// in place and then sealed with [`ObjectStore::seal_secondary`] or [`ObjectStore::seal_primary`]. Dropping it
/// unsealed returns the memory.
#[derive(Debug)]
pub struct ObjectBuffer {
    buf: ObjectBuf,
}

impl ObjectBuffer {
    /// The whole buffer, exactly as long as the object, to be filled.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }

    /// The object's length.
    pub fn len(&self) -> usize {
        self.buf.as_ref().len()
    }

    /// Whether the object is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ObjectStore {
    /// A store with the given configuration. Allocates nothing until objects arrive.
    pub fn new(config: StoreConfig) -> Self {
        let accounts = Accounts::new(config.memory_limit, config.buffer_pool_limit);
        ObjectStore {
            inner: Arc::new(Inner {
                config,
                accounts,
                objects: DashMap::new(),
                failed: DashMap::new(),
                waiters: DashMap::new(),
                evict_lock: Mutex::new(()),
                clock: AtomicU64::new(0),
            }),
        }
    }

    /// The configuration this store runs with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Serializes `value` straight into a new aligned buffer and stores it as the primary copy of `id`.
    ///
    /// The value is serialized twice: once only counting bytes (cheap: no copies), so memory is reserved, by evicting
    /// or spilling if needed, before anything is allocated; then into the buffer. Fails with
    /// [`ObjectStoreError::AlreadyExists`], [`ObjectStoreError::TooLarge`] or [`ObjectStoreError::ObjectStoreFull`].
    pub fn put<T: Object>(&self, id: ObjectId, value: &T) -> Result<(), ObjectStoreError> {
        if self.inner.objects.contains_key(&id) {
            return Err(ObjectStoreError::AlreadyExists(id));
        }
        let len = rkyv::api::high::to_bytes_in::<_, BoxedError>(value, ObjectWriter::counting())
            .map_err(|source| ObjectStoreError::Serialize { id, source })?
            .pos;
        self.put_counted(id, value, len)
    }

    /// [`ObjectStore::put`] for a caller that already counted the archive's length (with [`archived_len`] or
    /// [`archive_if_small`]): the value is serialized once, into the buffer. A wrong `len` fails the put with a
    /// serialization error; it never writes out of bounds.
    pub fn put_counted<T: Object>(
        &self,
        id: ObjectId,
        value: &T,
        len: usize,
    ) -> Result<(), ObjectStoreError> {
        if self.inner.objects.contains_key(&id) {
            return Err(ObjectStoreError::AlreadyExists(id));
        }
        let serialize = |source| ObjectStoreError::Serialize { id, source };
        let mut buf = self.allocate(len)?;
        let writer = ObjectWriter::into(buf.as_mut_slice());
        let written = rkyv::api::high::to_bytes_in::<_, BoxedError>(value, writer)
            .map_err(serialize)?
            .pos;
        if written != len {
            return Err(serialize(BoxedError::new(SizeChanged)));
        }
        let charge = buf.cap();
        self.insert(
            id,
            Bytes::from_owner(buf),
            charge,
            false,
            Some(TypeId::of::<T>()),
        )
    }

    /// Adopts an already-serialized archive as the primary copy of `id`, without copying it.
    ///
    /// The bytes must start on a 16-byte boundary ([`ObjectStoreError::Misaligned`] otherwise). They are treated as
    /// untrusted: the first `get` of each type validates them. The store charges `bytes.len()` while its handle
    /// lives; if the caller keeps other handles, that memory outlives the charge.
    pub fn put_aligned(&self, id: ObjectId, bytes: Bytes) -> Result<(), ObjectStoreError> {
        self.adopt(id, bytes, false)
    }

    /// Like [`ObjectStore::put_aligned`], but stores a secondary copy (one pulled from another node), which is dropped
    /// rather than spilled under memory pressure.
    pub fn put_secondary(&self, id: ObjectId, bytes: Bytes) -> Result<(), ObjectStoreError> {
        self.adopt(id, bytes, true)
    }

    fn adopt(&self, id: ObjectId, bytes: Bytes, secondary: bool) -> Result<(), ObjectStoreError> {
        let addr = bytes.as_ptr() as usize;
        if !addr.is_multiple_of(REQUIRED_ALIGN) {
            return Err(ObjectStoreError::Misaligned {
                id,
                addr,
                align: REQUIRED_ALIGN,
            });
        }
        if self.inner.objects.contains_key(&id) {
            return Err(ObjectStoreError::AlreadyExists(id));
        }
        let charge = bytes.len();
        self.charge(charge)?;
        let owner = Adopted {
            bytes,
            charge,
            accounts: Arc::clone(&self.inner.accounts),
        };
        self.insert(id, Bytes::from_owner(owner), charge, secondary, None)
    }

    /// Reserves an aligned buffer of `len` bytes (evicting or spilling to make room) for an object to be written in
    /// place, e.g. by the transfer driver as chunks arrive.
    pub fn create_buffer(&self, len: usize) -> Result<ObjectBuffer, ObjectStoreError> {
        Ok(ObjectBuffer {
            buf: self.allocate(len)?,
        })
    }

    /// Stores a filled buffer as a secondary copy of `id` (validated on first access).
    pub fn seal_secondary(
        &self,
        id: ObjectId,
        buffer: ObjectBuffer,
    ) -> Result<(), ObjectStoreError> {
        let charge = buffer.buf.cap();
        self.insert(id, Bytes::from_owner(buffer.buf), charge, true, None)
    }

    /// Stores a filled buffer as the primary copy of `id` (validated on first access).
    pub fn seal_primary(&self, id: ObjectId, buffer: ObjectBuffer) -> Result<(), ObjectStoreError> {
        let charge = buffer.buf.cap();
        self.insert(id, Bytes::from_owner(buffer.buf), charge, false, None)
    }

    /// A view of object `id` as an archived `T`, pinned (never evicted or spilled) while the guard lives.
    ///
    /// No copy and no deserialization; a spilled object is read back from disk first. Bytes that did not come from
    /// `put::<T>` are validated the first time they are read as `T`, then trusted.
    pub fn get<T: Object>(&self, id: ObjectId) -> Result<ObjectGuard<T>, ObjectStoreError> {
        let entry = self.lookup(id)?;
        let bytes = self.pin(&entry)?;
        if let Err(e) = entry.ensure_valid::<T>(&bytes) {
            entry.unpin();
            return Err(e);
        }
        Ok(ObjectGuard {
            entry,
            bytes,
            _type: PhantomData,
        })
    }

    /// The raw archive bytes of `id` (no copy). The object stays pinned until every clone of the returned `Bytes`
    /// is dropped, so the handle is safe to keep while sending.
    pub fn get_bytes(&self, id: ObjectId) -> Result<Bytes, ObjectStoreError> {
        let entry = self.lookup(id)?;
        let bytes = self.pin(&entry)?;
        Ok(Bytes::from_owner(PinnedBytes { bytes, entry }))
    }

    /// Whether `id` is stored on this node (in memory or spilled).
    pub fn contains(&self, id: ObjectId) -> bool {
        self.inner.objects.contains_key(&id)
    }

    /// Waits until `id` is stored here, up to `timeout`. Fails at once if the object was marked failed.
    pub async fn wait(&self, id: ObjectId, timeout: Duration) -> Result<(), ObjectStoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notify = Arc::clone(&self.inner.waiters.entry(id).or_default());
            let timed_out = {
                let notified = notify.notified();
                tokio::pin!(notified);
                // Register before checking, so an insert between the check and the await still wakes us.
                notified.as_mut().enable();
                if let Some(reason) = self.inner.failed.get(&id) {
                    return Err(ObjectStoreError::failed(id, *reason));
                }
                if self.contains(id) {
                    return Ok(());
                }
                tokio::time::timeout_at(deadline, notified).await.is_err()
            };
            if timed_out {
                drop(notify);
                // Remove the notifier only if nobody else holds it (the map's handle is the only one left).
                self.inner
                    .waiters
                    .remove_if(&id, |_, n| Arc::strong_count(n) == 1);
                return Err(ObjectStoreError::Timeout {
                    id,
                    waited: timeout,
                });
            }
        }
    }

    /// Removes `id` from this store. Memory is released once no guard or `get_bytes` handle refers to it; its
    /// spill file is removed now. Returns whether the object was here.
    pub fn free(&self, id: ObjectId) -> bool {
        let Some((_, entry)) = self.inner.objects.remove(&id) else {
            return false;
        };
        let mut slot = entry.slot.lock();
        slot.freed = true;
        slot.resident = None;
        if let Some(file) = slot.spilled.take() {
            spill::remove(&file);
        }
        true
    }

    /// Records that `id` can never be produced; current and future `wait`/`get` calls fail with the matching error.
    pub fn mark_failed(&self, id: ObjectId, reason: FailureReason) {
        self.inner.failed.insert(id, reason);
        if let Some((_, notify)) = self.inner.waiters.remove(&id) {
            notify.notify_waiters();
        }
    }

    /// Current counts.
    pub fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            objects: self.inner.objects.len(),
            used: self.inner.accounts.used(),
            pooled: self.inner.accounts.pooled(),
            limit: self.inner.accounts.limit(),
            ..StoreStats::default()
        };
        for entry in self.entries() {
            let slot = entry.slot.lock();
            if slot.resident.is_none() && slot.spilled.is_some() {
                stats.spilled += 1;
            }
            if slot.pins > 0 {
                stats.pinned += 1;
            }
        }
        stats
    }

    /// Every object in the store, in id order.
    pub fn objects(&self) -> Vec<ObjectInfo> {
        let mut list: Vec<ObjectInfo> = self
            .entries()
            .into_iter()
            .map(|e| {
                let slot = e.slot.lock();
                ObjectInfo {
                    id: e.id,
                    len: e.len,
                    secondary: e.secondary,
                    resident: slot.resident.is_some(),
                    spilled: slot.spilled.is_some(),
                    pins: slot.pins,
                }
            })
            .collect();
        list.sort_by_key(|o| o.id);
        list
    }

    /// Allocates and pre-faults pooled buffers of `object_size` bytes up to `total` bytes, so the first large puts
    /// write into warm pages. Returns the bytes pooled (bounded by the pool limit).
    pub fn prefault(&self, object_size: usize, total: usize) -> usize {
        self.inner.accounts.prefault_pool(object_size, total)
    }

    /// A snapshot of the entries. Slots are locked (blocking) only after the map's shard locks are released: a
    /// thread restoring a spilled object holds its slot while it scans the map, so blocking on a slot under a shard
    /// lock could deadlock behind a queued writer.
    fn entries(&self) -> Vec<Arc<Entry>> {
        self.inner
            .objects
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect()
    }

    fn lookup(&self, id: ObjectId) -> Result<Arc<Entry>, ObjectStoreError> {
        if let Some(entry) = self.inner.objects.get(&id) {
            return Ok(Arc::clone(entry.value()));
        }
        match self.inner.failed.get(&id) {
            Some(reason) => Err(ObjectStoreError::failed(id, *reason)),
            None => Err(ObjectStoreError::NotFound(id)),
        }
    }

    /// Pins the entry and returns its resident bytes, restoring them from the spill file if needed.
    fn pin(&self, entry: &Entry) -> Result<Bytes, ObjectStoreError> {
        entry.last_use.store(
            self.inner.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let mut slot = entry.slot.lock();
        if slot.freed {
            return Err(ObjectStoreError::NotFound(entry.id));
        }
        if let Some(bytes) = &slot.resident {
            let bytes = bytes.clone();
            slot.pins += 1;
            return Ok(bytes);
        }
        let Some(file) = slot.spilled.clone() else {
            return Err(ObjectStoreError::NotFound(entry.id));
        };
        // Restore while holding the slot: concurrent getters of this object wait for one read instead of racing.
        // Evictions we trigger here skip this slot (they only try_lock).
        let mut buf = self.allocate(file.len)?;
        spill::read(entry.id, &file, buf.as_mut_slice())?;
        tracing::debug!(object = %entry.id, bytes = file.len, "restored spilled object");
        slot.charge = buf.cap();
        let bytes = Bytes::from_owner(buf);
        slot.resident = Some(bytes.clone());
        slot.pins += 1;
        Ok(bytes)
    }

    fn insert(
        &self,
        id: ObjectId,
        bytes: Bytes,
        charge: usize,
        secondary: bool,
        put_type: Option<TypeId>,
    ) -> Result<(), ObjectStoreError> {
        let entry = Arc::new(Entry {
            id,
            len: bytes.len(),
            secondary,
            put_type,
            validated: Mutex::new(None),
            last_use: AtomicU64::new(self.inner.clock.fetch_add(1, Ordering::Relaxed)),
            slot: Mutex::new(Slot {
                resident: Some(bytes),
                charge,
                spilled: None,
                pins: 0,
                freed: false,
            }),
        });
        match self.inner.objects.entry(id) {
            dashmap::Entry::Occupied(_) => return Err(ObjectStoreError::AlreadyExists(id)),
            dashmap::Entry::Vacant(v) => {
                v.insert(entry);
            }
        }
        // A reconstructed object supersedes an earlier failure.
        self.inner.failed.remove(&id);
        if let Some((_, notify)) = self.inner.waiters.remove(&id) {
            notify.notify_waiters();
        }
        Ok(())
    }

    /// Charges `n` bytes for adopted memory, making room if needed.
    fn charge(&self, n: usize) -> Result<(), ObjectStoreError> {
        let limit = self.inner.accounts.limit();
        if n > limit {
            return Err(ObjectStoreError::TooLarge { size: n, limit });
        }
        for _ in 0..ALLOCATE_ATTEMPTS {
            if self.inner.accounts.try_charge(n) {
                return Ok(());
            }
            self.make_room(n)?;
        }
        Err(self.full(n))
    }

    /// A charged buffer of exactly `len` bytes, making room if needed.
    fn allocate(&self, len: usize) -> Result<ObjectBuf, ObjectStoreError> {
        let cap = Accounts::capacity_for(len);
        let limit = self.inner.accounts.limit();
        if cap > limit {
            return Err(ObjectStoreError::TooLarge { size: len, limit });
        }
        for _ in 0..ALLOCATE_ATTEMPTS {
            if let Some(buf) = self.inner.accounts.allocate(len) {
                return Ok(buf);
            }
            self.make_room(cap)?;
        }
        Err(self.full(cap))
    }

    /// Snapshot of eviction candidates. Busy slots (locked by another thread) count as pinned.
    fn candidates(&self) -> (Vec<Candidate>, Vec<Arc<Entry>>) {
        let mut cands = Vec::new();
        let mut entries = Vec::new();
        for item in self.inner.objects.iter() {
            let entry = item.value();
            let Some(slot) = entry.slot.try_lock() else {
                cands.push(Candidate {
                    id: entry.id,
                    bytes: entry.len,
                    secondary: entry.secondary,
                    pinned: true,
                    last_use: 0,
                    spilled_already: false,
                });
                entries.push(Arc::clone(entry));
                continue;
            };
            if slot.resident.is_none() {
                continue;
            }
            cands.push(Candidate {
                id: entry.id,
                bytes: slot.charge,
                secondary: entry.secondary,
                pinned: slot.pins > 0,
                last_use: entry.last_use.load(Ordering::Relaxed),
                spilled_already: slot.spilled.is_some(),
            });
            entries.push(Arc::clone(entry));
        }
        (cands, entries)
    }

    fn full(&self, needed: usize) -> ObjectStoreError {
        let (cands, _) = self.candidates();
        let report = match plan_eviction(&cands, usize::MAX, self.inner.config.spill_dir.is_some())
        {
            Plan::Full(report) => report,
            Plan::Evict(_) => MemoryReport::default(),
        };
        self.full_error(report, needed, &cands)
    }

    fn full_error(
        &self,
        mut report: MemoryReport,
        needed: usize,
        cands: &[Candidate],
    ) -> ObjectStoreError {
        report.needed = needed;
        report.limit = self.inner.accounts.limit();
        report.used = self.inner.accounts.used();
        // Whatever is charged but not resident in the map belongs to freed objects that a guard still holds.
        let resident: usize = cands.iter().map(|c| c.bytes).sum();
        report.freed_pinned_bytes = report.used.saturating_sub(resident);
        ObjectStoreError::ObjectStoreFull(report)
    }

    /// Frees at least `needed` bytes of headroom: pooled buffers first, then secondary copies, then spilled primaries.
    fn make_room(&self, needed: usize) -> Result<(), ObjectStoreError> {
        let _one_at_a_time = self.inner.evict_lock.lock();
        let accounts = &self.inner.accounts;
        let short = accounts.shortfall(needed);
        if short == 0 || accounts.trim_pool(short) >= short {
            return Ok(());
        }
        let short = accounts.shortfall(needed);
        let (cands, entries) = self.candidates();
        let actions = match plan_eviction(&cands, short, self.inner.config.spill_dir.is_some()) {
            Plan::Evict(actions) => actions,
            Plan::Full(report) => return Err(self.full_error(report, needed, &cands)),
        };
        for action in actions {
            let (id, spill_it) = match action {
                Eviction::Drop(id) => (id, false),
                Eviction::Spill(id) => (id, true),
            };
            let Some(entry) = entries.iter().find(|e| e.id == id) else {
                continue;
            };
            self.evict(entry, spill_it)?;
        }
        // Evicted buffers may have landed in the pool; release them too.
        accounts.trim_pool(accounts.shortfall(needed));
        Ok(())
    }

    fn evict(&self, entry: &Arc<Entry>, spill_it: bool) -> Result<(), ObjectStoreError> {
        let Some(mut slot) = entry.slot.try_lock() else {
            return Ok(());
        };
        if slot.pins > 0 || slot.freed {
            return Ok(());
        }
        let Some(bytes) = slot.resident.take() else {
            return Ok(());
        };
        if !spill_it {
            slot.freed = true;
            drop(slot);
            drop(bytes);
            self.inner
                .objects
                .remove_if(&entry.id, |_, e| Arc::ptr_eq(e, entry));
            tracing::debug!(object = %entry.id, "dropped secondary copy");
            return Ok(());
        }
        if slot.spilled.is_none() {
            let Some(dir) = self.inner.config.spill_dir.as_deref() else {
                slot.resident = Some(bytes);
                return Ok(());
            };
            match spill::write(dir, entry.id, &bytes, self.inner.config.spill_fsync) {
                Ok(file) => slot.spilled = Some(file),
                Err(e) => {
                    slot.resident = Some(bytes);
                    return Err(e);
                }
            }
            tracing::debug!(object = %entry.id, bytes = entry.len, "spilled primary copy");
        }
        slot.charge = 0;
        Ok(())
    }
}

/// The owner inside `get_bytes` handles: keeps the object pinned until the last clone is dropped.
struct PinnedBytes {
    bytes: Bytes,
    entry: Arc<Entry>,
}

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        self.entry.unpin();
    }
}

/// A pinned, zero-copy view of an object as `T::Archived`.
///
/// Dereferences to the archived value inside the store's buffer. While it lives the object cannot be evicted or
/// spilled; dropping it unpins the object (it is not freed: that is [`ObjectStore::free`]).
pub struct ObjectGuard<T: Object> {
    entry: Arc<Entry>,
    bytes: Bytes,
    _type: PhantomData<fn() -> T>,
}

impl<T: Object> ObjectGuard<T> {
    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.entry.id
    }

    /// The raw archive bytes (the same memory the view points into).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Deserializes the archived value into an owned `T` (a copy: the caller's explicit choice).
    pub fn deserialize(&self) -> Result<T, ObjectStoreError>
    where
        T::Archived: Deserialize<T, HighDeserializer<BoxedError>>,
    {
        rkyv::api::high::deserialize::<T, BoxedError>(&**self).map_err(|source| {
            ObjectStoreError::Deserialize {
                id: self.entry.id,
                source,
            }
        })
    }
}

impl<T: Object> Deref for ObjectGuard<T> {
    type Target = T::Archived;

    fn deref(&self) -> &T::Archived {
        // SAFETY: `get` only builds a guard after the bytes were either serialized by `put::<T>` into this very
        // buffer, or validated as `T::Archived` (`Entry::ensure_valid`); the buffer is 16-byte aligned and immutable,
        // and `self.bytes` keeps it alive.
        unsafe { rkyv::access_unchecked::<T::Archived>(&self.bytes) }
    }
}

impl<T: Object> Drop for ObjectGuard<T> {
    fn drop(&mut self) {
        self.entry.unpin();
    }
}

impl<T: Object> std::fmt::Debug for ObjectGuard<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectGuard")
            .field("id", &self.entry.id)
            .field("len", &self.bytes.len())
            .finish()
    }
}

#[cfg(test)]
mod archive_tests {
    use super::*;

    #[test]
    fn small_values_come_back_archived_large_ones_as_their_size() {
        // Fits: the same bytes rkyv writes, readable in place.
        let small: Vec<u64> = (0..10).collect();
        let Ok(Ok(bytes)) = archive_if_small(&small) else {
            panic!("a small value was not archived");
        };
        let expected = rkyv::to_bytes::<rancor::Error>(&small).expect("archive");
        assert_eq!(&bytes[..], &expected[..]);
        let back = rkyv::access::<rkyv::Archived<Vec<u64>>, rancor::Error>(&bytes).expect("valid");
        assert_eq!(back.len(), 10);

        // Exactly at the limit and one past it (a byte vector's archive: its bytes, then an 8-byte header).
        for n in [SMALL_ARCHIVE - 8, SMALL_ARCHIVE - 7, 4 * SMALL_ARCHIVE] {
            let v = vec![7u8; n];
            let len = archived_len(&v).expect("count");
            let got = archive_if_small(&v).expect("serialize");
            assert_eq!(got.is_ok(), n <= SMALL_ARCHIVE - 8, "{n}: {len} bytes");
            match got {
                Ok(b) => {
                    assert!(len <= SMALL_ARCHIVE, "{n}");
                    assert_eq!(b.len(), len);
                }
                Err(counted) => {
                    assert!(len > SMALL_ARCHIVE, "{n}");
                    assert_eq!(counted, len, "the overflowing pass counts the whole value");
                }
            }
        }
    }

    #[test]
    fn a_put_with_the_counted_length_stores_the_value_and_a_wrong_one_stores_nothing() {
        let store = ObjectStore::new(crate::StoreConfig::with_limit(64 << 20));
        let value = vec![3u8; 4 * SMALL_ARCHIVE];
        let Err(len) = archive_if_small(&value).expect("serialize") else {
            panic!("not a large value");
        };
        for wrong in [len - 1, len + 16] {
            let id = ObjectId::random();
            assert!(matches!(
                store.put_counted(id, &value, wrong),
                Err(ObjectStoreError::Serialize { .. })
            ));
            assert!(!store.contains(id));
        }
        assert_eq!(store.stats().used, 0, "nothing stays charged");
        let id = ObjectId::random();
        store.put_counted(id, &value, len).expect("put");
        let back = store.get::<Vec<u8>>(id).expect("get");
        assert_eq!(back.as_slice(), &value[..]);
    }
}
