//! Objects as the owner sees them: typed references, the owner's table of objects, and read-only views.
//!
//! An [`ObjectRef<T>`] is a cheap handle (an `Arc`) on an entry in the owning node's object table. The entry is
//! pending until the producing task or `put` completes it, then holds the object's aligned bytes (an rkyv archive) or
//! the error that replaced it. Dropping the last `ObjectRef` removes the object from the owner's table; tasks still
//! in flight keep the entry itself alive until they finish, so dropping a ref never breaks a running task.
//!
//! This module does not move bytes between nodes: `runtime` does that.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::value::{self, Value};
use oxray_objstore::{ObjectStore, ObjectStoreError};

/// Object ids are the object store's: random for `put`, derived from the task id for task returns.
pub use oxray_objstore::ObjectId;

pub(crate) fn rand_u128() -> u128 {
    use std::cell::Cell;
    // A per-thread xorshift seeded once from the OS: ids must be unique, not unpredictable, and this keeps the
    // submit path free of syscalls.
    thread_local! {
        static STATE: Cell<u128> = Cell::new({
            let mut seed = [0u8; 16];
            getrandom(&mut seed);
            u128::from_le_bytes(seed) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 35;
        x ^= x >> 59;
        x ^= x << 21;
        s.set(x);
        x
    })
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom")
        && f.read_exact(buf).is_ok()
    {
        return;
    }
    // No /dev/urandom: fall back on time and address entropy (ids only need to be unique).
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let addr = buf.as_ptr() as u128;
    let mixed = (t ^ (addr << 64)).to_le_bytes();
    for (b, m) in buf.iter_mut().zip(mixed.iter().cycle()) {
        *b = *m;
    }
}

/// The state of one object in its owner's table.
pub(crate) enum Slot {
    Pending,
    /// Small (inline) values, and values borrowed from another node for a task's arguments.
    Ready(Bytes),
    /// Large values the owner keeps in its node's object store: bounded memory, spilled to disk under pressure,
    /// read back (pinned) on each access.
    Stored {
        store: ObjectStore,
        len: usize,
    },
    Failed(Error),
}

impl Slot {
    fn value(&self, id: ObjectId) -> Option<Result<Bytes>> {
        match self {
            Slot::Pending => None,
            Slot::Ready(b) => Some(Ok(b.clone())),
            Slot::Stored { store, .. } => Some(store.get_bytes(id).map_err(store_error)),
            Slot::Failed(e) => Some(Err(e.clone())),
        }
    }
}

/// The SDK's error for a store failure, in words a user acts on.
pub(crate) fn store_error(e: ObjectStoreError) -> Error {
    match e {
        ObjectStoreError::NotFound(id) => Error::ObjectLost(id.to_string()),
        e @ (ObjectStoreError::ObjectStoreFull(_) | ObjectStoreError::TooLarge { .. }) => {
            Error::ObjectStoreFull(e.to_string())
        }
        e => Error::Serialization(e.to_string()),
    }
}

/// One object in the owner's table: its value once known, and the means to wait for it (blocking and async).
pub(crate) struct Entry {
    pub(crate) id: ObjectId,
    slot: Mutex<Slot>,
    cv: Condvar,
    notify: tokio::sync::Notify,
    /// The owner's store, for entries in an owner's table: a large value completing this entry moves into it.
    store: OnceLock<ObjectStore>,
    /// Live owned `RefInner`s naming this entry: the table forgets the object when the last one goes.
    families: AtomicUsize,
    /// Refs nested in this object's value, kept alive as long as the value may be read.
    contained: Mutex<Vec<Arc<RefInner>>>,
    /// Set when the value came from another node's task and nests refs that node owns: that node keeps them alive
    /// until this lease is dropped by this entry and by every ref read out of the value.
    lease: OnceLock<Arc<Lease>>,
    /// For a large value in its owner's table: the other nodes that keep a secondary copy in their stores (the node
    /// that computed it, and nodes that pulled it), so the policy may run readers there and fetchers may pull from
    /// them. Each is told to free its copy when this entry drops.
    copies: Mutex<Vec<u128>>,
    /// Set when a large value held inline here was also put in the store so that pullers can be served from it: the
    /// store copy goes with the entry.
    serving_copy: AtomicBool,
}

/// How an owner answers a fetch of a known value.
pub(crate) enum Serve {
    /// Small enough to ride in the reply.
    Inline(Bytes),
    /// In this node's store under the object's id, this many bytes: the fetcher pulls it.
    Stored(u64),
}

/// Refs lent by another node inside one result: the lender keeps their objects until the last holder of this lease
/// (the result's entry, and every ref read out of it here) is gone.
pub(crate) struct Lease {
    node: u128,
    call: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        crate::runtime::release_lent(self.node, self.call);
    }
}

impl Entry {
    fn with_slot(id: ObjectId, slot: Slot) -> Arc<Self> {
        Arc::new(Entry {
            id,
            slot: Mutex::new(slot),
            cv: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            store: OnceLock::new(),
            families: AtomicUsize::new(0),
            contained: Mutex::new(Vec::new()),
            lease: OnceLock::new(),
            copies: Mutex::new(Vec::new()),
            serving_copy: AtomicBool::new(false),
        })
    }

    /// Records that `node` keeps a secondary copy of this value (it computed or pulled it), to be freed when this
    /// entry goes.
    pub(crate) fn add_copy(&self, node: u128) {
        let mut copies = self.copies.lock();
        if !copies.contains(&node) {
            copies.push(node);
        }
    }

    /// The other nodes known to hold a copy of this value, the one that computed it first.
    pub(crate) fn copy_holders(&self) -> Vec<u128> {
        self.copies.lock().clone()
    }

    /// Keeps `refs` (nested in this object's value) alive as long as this object.
    pub(crate) fn hold(&self, refs: Vec<Arc<RefInner>>) {
        if !refs.is_empty() {
            self.contained.lock().extend(refs);
        }
    }

    /// Records that `node` keeps refs nested in this value alive (for its call `call`) until released.
    pub(crate) fn set_lender(&self, node: u128, call: u64) {
        let _ = self.lease.set(Arc::new(Lease { node, call }));
    }

    pub(crate) fn lease(&self) -> Option<Arc<Lease>> {
        self.lease.get().cloned()
    }

    pub(crate) fn new(id: ObjectId) -> Arc<Self> {
        Self::with_slot(id, Slot::Pending)
    }

    pub(crate) fn ready(id: ObjectId, bytes: Bytes) -> Arc<Self> {
        Self::with_slot(id, Slot::Ready(bytes))
    }

    /// An entry whose value is already in `store` under `id`.
    pub(crate) fn stored(id: ObjectId, store: ObjectStore, len: usize) -> Arc<Self> {
        Self::with_slot(id, Slot::Stored { store, len })
    }

    /// Completes the object. The first completion wins: a late duplicate (a retried task) is ignored.
    ///
    /// In an owner's table, a value of at least the inline threshold is adopted by the node's store (no copy); if the
    /// store cannot take it, the object fails with `ObjectStoreFull` rather than growing memory past the limit.
    pub(crate) fn complete(&self, result: Result<Bytes>) {
        {
            let mut slot = self.slot.lock();
            if !matches!(*slot, Slot::Pending) {
                return;
            }
            *slot = match result {
                Ok(b) => match self.store.get() {
                    Some(store) if !store.config().is_inline(b.len()) => {
                        let len = b.len();
                        match store.put_aligned(self.id, b.clone()) {
                            Ok(()) => Slot::Stored {
                                store: store.clone(),
                                len,
                            },
                            // Bytes that arrived unaligned stay inline rather than being copied again.
                            Err(ObjectStoreError::Misaligned { .. }) => Slot::Ready(b),
                            Err(e) => Slot::Failed(store_error(e)),
                        }
                    }
                    _ => Slot::Ready(b),
                },
                Err(e) => Slot::Failed(e),
            };
        }
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    /// How to answer a fetch of this value (`None` while pending). Values above `max_inline` bytes are answered
    /// from the store without reading them (a spilled one is restored only when a puller asks for its chunks).
    pub(crate) fn serve(&self, max_inline: usize) -> Option<Result<Serve>> {
        let slot = self.slot.lock();
        match &*slot {
            Slot::Pending => None,
            Slot::Failed(e) => Some(Err(e.clone())),
            Slot::Stored { len, .. } if *len > max_inline => Some(Ok(Serve::Stored(*len as u64))),
            Slot::Ready(b) if b.len() > max_inline => {
                // Only with an inline threshold above the reply size: pullers read from the store, so it goes there.
                let Some(store) = self.store.get() else {
                    return Some(Err(Error::ObjectLost(self.id.to_string())));
                };
                if !store.contains(self.id) {
                    let bytes = match store.put_secondary(self.id, b.clone()) {
                        Err(ObjectStoreError::Misaligned { .. }) => {
                            store.put_secondary(self.id, value::aligned_copy(b))
                        }
                        r => r,
                    };
                    if let Err(e) = bytes {
                        return Some(Err(store_error(e)));
                    }
                    self.serving_copy.store(true, Ordering::Relaxed);
                }
                Some(Ok(Serve::Stored(b.len() as u64)))
            }
            slot => slot.value(self.id).map(|v| v.map(Serve::Inline)),
        }
    }

    /// The value if it is known now.
    pub(crate) fn try_value(&self) -> Option<Result<Bytes>> {
        self.slot.lock().value(self.id)
    }

    /// (known, size, in the store) without reading the value: listing objects must not pin or restore them.
    pub(crate) fn summary(&self) -> (bool, usize, bool) {
        match &*self.slot.lock() {
            Slot::Pending => (false, 0, false),
            Slot::Ready(b) => (true, b.len(), false),
            Slot::Stored { len, .. } => (true, *len, true),
            Slot::Failed(_) => (true, 0, false),
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        !matches!(*self.slot.lock(), Slot::Pending)
    }

    /// Blocks the calling thread until the object is known or `deadline` passes.
    pub(crate) fn wait_blocking(&self, deadline: Option<Instant>) -> Result<Bytes> {
        let mut slot = self.slot.lock();
        loop {
            if let Some(v) = slot.value(self.id) {
                return v;
            }
            match deadline {
                None => self.cv.wait(&mut slot),
                Some(d) => {
                    let start = Instant::now();
                    if (start >= d || self.cv.wait_until(&mut slot, d).timed_out())
                        && matches!(&*slot, Slot::Pending)
                    {
                        return Err(Error::GetTimeout(d.saturating_duration_since(start)));
                    }
                }
            }
        }
    }

    /// Waits, without blocking a thread, until the object is known (without reading its value).
    pub(crate) async fn wait_known(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    /// Waits without blocking a thread.
    pub(crate) async fn wait_async(&self) -> Result<Bytes> {
        loop {
            let notified = self.notify.notified();
            if let Some(v) = self.try_value() {
                return v;
            }
            notified.await;
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // The last holder is gone (refs, in-flight tasks, senders): the store may reuse the memory.
        if let Slot::Stored { store, .. } = &*self.slot.get_mut() {
            store.free(self.id);
        }
        if *self.serving_copy.get_mut()
            && let Some(store) = self.store.get()
        {
            store.free(self.id);
        }
        // Nobody can name the object any more: the nodes that kept copies of it may drop them.
        for node in self.copies.get_mut().drain(..) {
            crate::runtime::free_copy(node, self.id);
        }
    }
}

/// Drops `value` on a background thread: for large batches of refs (the 10,000 refs of a released result), whose
/// freeing would otherwise hold up the I/O thread, and with it the next call it has to dispatch.
pub(crate) fn drop_in_background<T: Send + 'static>(value: T) {
    type Garbage = Box<dyn Send>;
    static REAPER: OnceLock<Option<std::sync::mpsc::Sender<Garbage>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Garbage>();
        std::thread::Builder::new()
            .name("oxray-reaper".into())
            .spawn(move || {
                for garbage in rx {
                    drop(garbage);
                }
            })
            .ok()
            .map(|_| tx)
    });
    let value: Garbage = Box::new(value);
    // No thread (spawn failed) or a closed channel: drop here, which is only slower.
    if let Some(tx) = reaper
        && let Err(std::sync::mpsc::SendError(value)) = tx.send(value)
    {
        drop(value);
    }
}

thread_local! {
    /// Refs serialized on this thread since the last `take_contained`: the refs nested in the value being encoded.
    static CONTAINED: std::cell::RefCell<Vec<Arc<RefInner>>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Leases of the values being decoded on this thread: a remote ref read out of them holds the leases.
    static DECODING: std::cell::RefCell<Option<Leases>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (which decodes values read from `entries`) so that remote refs read out of them keep the lenders'
/// objects alive.
pub(crate) fn decoding<'a, R>(
    entries: impl IntoIterator<Item = &'a Arc<Entry>>,
    f: impl FnOnce() -> R,
) -> R {
    // Collecting into an empty Vec allocates nothing: values that nest no lent refs pay one pass over the entries.
    with_leases(entries.into_iter().filter_map(|e| e.lease()).collect(), f)
}

/// The leases a remote ref holds: shared by every ref read out of the same values, so a list of 10,000 refs costs
/// one allocation, not one per ref.
pub(crate) type Leases = Arc<[Arc<Lease>]>;

/// Runs `f` with `leases` as this thread's decoding leases (restored afterwards, also if `f` panics).
fn with_leases<R>(leases: Vec<Arc<Lease>>, f: impl FnOnce() -> R) -> R {
    if leases.is_empty() {
        return f();
    }
    struct Restore(Option<Leases>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let saved = self.0.take();
            DECODING.with(|d| *d.borrow_mut() = saved);
        }
    }
    let _restore = Restore(DECODING.with(|d| d.borrow_mut().replace(Leases::from(leases))));
    f()
}

/// The leases of the values being decoded on this thread, if any.
pub(crate) fn current_leases() -> Option<Leases> {
    DECODING.with(|d| d.borrow().clone())
}

/// Forgets refs collected by earlier serializations on this thread.
pub(crate) fn clear_contained() {
    CONTAINED.with(|c| c.borrow_mut().clear());
}

/// The refs serialized on this thread since the last clear: those nested in the value just encoded.
pub(crate) fn take_contained() -> Vec<Arc<RefInner>> {
    CONTAINED.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// Hashes object ids by folding their bits: ids are random (or derived from random task ids), so a keyed hash
/// would only add cost to every put and lookup.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = ((v as u64) ^ ((v >> 64) as u64)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = DashMap<ObjectId, V, std::hash::BuildHasherDefault<IdHasher>>;

/// The owner's table: every object this node owns that still has a reference, by id (so other nodes can fetch them).
pub(crate) struct ObjectTable {
    entries: IdMap<Arc<Entry>>,
    /// This node's store, where large values of the entries live.
    store: ObjectStore,
}

impl ObjectTable {
    pub(crate) fn new(store: ObjectStore) -> Self {
        ObjectTable {
            entries: IdMap::default(),
            store,
        }
    }

    pub(crate) fn store(&self) -> &ObjectStore {
        &self.store
    }

    pub(crate) fn insert(&self, entry: Arc<Entry>) {
        let _ = entry.store.set(self.store.clone());
        self.entries.insert(entry.id, entry);
    }
    pub(crate) fn lookup(&self, id: ObjectId) -> Option<Arc<Entry>> {
        self.entries.get(&id).map(|e| e.clone())
    }
    pub(crate) fn remove(&self, id: ObjectId) {
        self.entries.remove(&id);
    }
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
    /// (id, known, size, in the store) of every entry.
    pub(crate) fn ids(&self) -> Vec<(ObjectId, bool, usize, bool)> {
        self.entries
            .iter()
            .map(|e| {
                let (ready, size, stored) = e.value().summary();
                (*e.key(), ready, size, stored)
            })
            .collect()
    }
}

/// What the owner keeps per live `ObjectRef` family: dropping the last clone frees the object.
pub(crate) struct RefInner {
    pub(crate) entry: Arc<Entry>,
    /// The owning node (this process's id for objects it owns).
    pub(crate) owner: u128,
    /// The owner's table, when this process is the owner; `None` for a borrowed ref.
    pub(crate) table: Option<Weak<ObjectTable>>,
    /// Set for a ref read out of a value and owned by another node, until its value is first asked for: the fetch
    /// starts then, so a value holding thousands of refs costs no network traffic until they are used.
    unfetched: AtomicBool,
    /// The leases of the values this ref was read out of: the lender keeps the object while this ref lives.
    _leases: Option<Leases>,
    /// Set for a ref read out of a value and owned by another node: the owner was told this node borrows the
    /// object (`BORROW`), and is told when this ref goes (`UNBORROW`).
    borrowed_from: Option<u128>,
    /// Set for a tiny value (see `Config::carry_max`): the value travels with the ref wherever the ref goes, so no
    /// table, fetch, borrow or lease is ever needed for it. For a few bytes, that copy costs less than the owner's
    /// table entry, the borrow notices and the fetch that a ref by id needs (Ray, likewise, passes small objects by
    /// value).
    pub(crate) carried: bool,
}

impl RefInner {
    /// A new family of refs to an entry of this process's table: the table keeps the object while any family lives.
    pub(crate) fn owned(entry: Arc<Entry>, owner: u128, table: &Arc<ObjectTable>) -> Arc<RefInner> {
        entry.families.fetch_add(1, Ordering::AcqRel);
        Arc::new(RefInner {
            entry,
            owner,
            table: Some(Arc::downgrade(table)),
            unfetched: AtomicBool::new(false),
            _leases: None,
            borrowed_from: None,
            carried: false,
        })
    }

    /// A ref to a tiny ready value (see `Config::carry_max`) that travels with the ref: in no table.
    pub(crate) fn carried(entry: Arc<Entry>, owner: u128) -> Arc<RefInner> {
        Self::untabled(entry, owner, true)
    }

    /// A ref that does not keep the owner's table entry (an argument's, or one borrowed from another node).
    pub(crate) fn borrowed(entry: Arc<Entry>, owner: u128) -> Arc<RefInner> {
        Self::untabled(entry, owner, false)
    }

    fn untabled(entry: Arc<Entry>, owner: u128, carried: bool) -> Arc<RefInner> {
        Arc::new(RefInner {
            entry,
            owner,
            table: None,
            unfetched: AtomicBool::new(false),
            _leases: None,
            borrowed_from: None,
            carried,
        })
    }

    /// A copy of the value of a ref that carries it (`None` for the others), to send as a call's argument.
    pub(crate) fn carried_copy(&self) -> Option<Vec<u8>> {
        self.with_carried(|carried| carried.map(|c| c.0.to_vec()))
    }

    /// A ref to object `id` of node `owner`, fetched when first used.
    /// Read out of a value lent by another node, the ref holds that value's leases, which keep the object; else
    /// `announced` says the caller has announced the borrow to `owner`, and dropping the ref announces its end.
    pub(crate) fn remote(
        id: ObjectId,
        owner: u128,
        leases: Option<Leases>,
        announced: bool,
    ) -> Arc<RefInner> {
        Arc::new(RefInner {
            entry: Entry::new(id),
            owner,
            table: None,
            unfetched: AtomicBool::new(true),
            _leases: leases,
            borrowed_from: announced.then_some(owner),
            carried: false,
        })
    }

    /// The entry, about to be waited on or read: a remote ref's fetch starts on first use.
    pub(crate) fn used(&self) -> &Arc<Entry> {
        if self.unfetched.load(Ordering::Relaxed) && self.unfetched.swap(false, Ordering::AcqRel) {
            crate::runtime::start_fetch(&self.entry, self.owner);
        }
        &self.entry
    }
}

impl Drop for RefInner {
    fn drop(&mut self) {
        if let Some(owner) = self.borrowed_from {
            crate::runtime::unborrow(owner, self.entry.id);
        }
        if let Some(table) = self.table.as_ref().and_then(Weak::upgrade)
            && self.entry.families.fetch_sub(1, Ordering::AcqRel) == 1
        {
            table.remove(self.entry.id);
        }
    }
}

/// How a ref travels inside a value: the object's id and its owner, and the value itself for a tiny one (see
/// `Config::carry_max`). Not used directly.
#[doc(hidden)]
#[derive(rkyv::Archive, Debug)]
#[expect(
    dead_code,
    reason = "only its archived form is written (field by field) and read"
)]
pub struct RefW {
    id: u128,
    owner: u128,
    value: Option<Box<[u8]>>,
}

impl<T> ObjectRef<T> {
    /// The owner as written on the wire: this process for a ref it owns.
    fn wire_owner(&self) -> u128 {
        match self.inner.owner {
            0 => crate::runtime::current().map(|rt| rt.node).unwrap_or(0),
            o => o,
        }
    }
}

/// A carried value's bytes, borrowed, archived as the `Box<[u8]>` that [`RefW::value`] reads back: serializing a
/// ref neither allocates nor copies the value twice.
struct CarriedBytes<'a>(&'a [u8]);

impl rkyv::Archive for CarriedBytes<'_> {
    type Archived = rkyv::boxed::ArchivedBox<[u8]>;
    type Resolver = rkyv::boxed::BoxResolver;
    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::boxed::ArchivedBox::resolve_from_ref(self.0, resolver, out)
    }
}

impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::Serialize<S> for CarriedBytes<'_>
where
    [u8]: rkyv::SerializeUnsized<S, Archived = [u8]>,
{
    fn serialize(&self, s: &mut S) -> std::result::Result<Self::Resolver, S::Error> {
        rkyv::boxed::ArchivedBox::serialize_from_ref(self.0, s)
    }
}

impl RefInner {
    /// Runs `f` on the carried value's bytes (`None` for a ref by id), read in place.
    fn with_carried<R>(&self, f: impl FnOnce(Option<CarriedBytes<'_>>) -> R) -> R {
        if !self.carried {
            return f(None);
        }
        match &*self.entry.slot.lock() {
            Slot::Ready(b) => f(Some(CarriedBytes(b))),
            _ => f(None),
        }
    }
}

// A ref nested in a value is archived as (id, owner). Serializing it records it on this thread, so whoever encodes
// the value can keep the object alive as long as the value; deserializing it gives a working ref on this node.
// Written field by field (the archived form is `RefW`'s) so that a carried value is read in place.
impl<T> rkyv::Archive for ObjectRef<T> {
    type Archived = ArchivedRefW;
    type Resolver = Option<rkyv::boxed::BoxResolver>;
    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::munge::munge!(let ArchivedRefW { id, owner, value } = out);
        self.inner.entry.id.0.resolve((), id);
        self.wire_owner().resolve((), owner);
        self.inner
            .with_carried(|carried| carried.resolve(resolver, value));
    }
}

impl<T, S: rkyv::rancor::Fallible + ?Sized> rkyv::Serialize<S> for ObjectRef<T>
where
    [u8]: rkyv::SerializeUnsized<S, Archived = [u8]>,
{
    fn serialize(&self, s: &mut S) -> std::result::Result<Self::Resolver, S::Error> {
        // A ref carrying its value needs nothing kept alive for it.
        if !self.inner.carried {
            CONTAINED.with(|c| c.borrow_mut().push(self.inner.clone()));
        }
        self.inner.with_carried(|carried| carried.serialize(s))
    }
}

impl<T, D: rkyv::rancor::Fallible + ?Sized> rkyv::Deserialize<ObjectRef<T>, D> for ArchivedRefW
where
    D::Error: rkyv::rancor::Source,
{
    fn deserialize(&self, _: &mut D) -> std::result::Result<ObjectRef<T>, D::Error> {
        if let Some(value) = self.value.as_ref() {
            // One allocation, unaligned: a get of it aligns a copy then (`value::decode`), so a ref never used costs
            // no second one.
            let entry = Entry::ready(ObjectId(self.id.to_native()), Bytes::copy_from_slice(value));
            return Ok(ObjectRef::from_inner(RefInner::carried(
                entry,
                self.owner.to_native(),
            )));
        }
        crate::runtime::borrow_ref(self.id.to_native(), self.owner.to_native())
            .map(ObjectRef::from_inner)
            .map_err(<D::Error as rkyv::rancor::Source>::new)
    }
}

/// A typed reference to an object that exists, or will exist, somewhere in the cluster.
///
/// Returned by `put`, by every remote function call and by every actor method call. Cheap to clone. `get` blocks
/// until the value is there and returns it owned; [`ObjectRef::view`] returns the archived form in place, with no
/// copy and no deserialization; [`ObjectRef::get_async`] is the non-blocking form.
///
/// Dropping the last clone of a ref frees the object in its owner's table; a task that already received the ref
/// as an argument keeps what it needs until it finishes.
pub struct ObjectRef<T> {
    pub(crate) inner: Arc<RefInner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        ObjectRef {
            inner: self.inner.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ObjectRef<{}>({})",
            std::any::type_name::<T>(),
            self.inner.entry.id
        )
    }
}

impl<T> ObjectRef<T> {
    pub(crate) fn from_inner(inner: Arc<RefInner>) -> Self {
        ObjectRef {
            inner,
            _type: PhantomData,
        }
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.inner.entry.id
    }

    /// Whether the value (or its error) is already known, without blocking.
    pub fn is_ready(&self) -> bool {
        self.inner.used().is_ready()
    }

    /// A ref with its type erased, for `wait` over refs of mixed types.
    pub fn untyped(&self) -> ObjectRef<()> {
        ObjectRef {
            inner: self.inner.clone(),
            _type: PhantomData,
        }
    }
}

impl<T: Value> ObjectRef<T> {
    /// Blocks until the value is available and returns it deserialized.
    ///
    /// Inside a task this releases the task's CPU slot while it waits, so nested tasks cannot deadlock the pool.
    pub fn get(&self) -> Result<T> {
        let entry = self.inner.used();
        let bytes = crate::runtime::wait_blocking(entry, None)?;
        decoding([entry], || value::decode::<T>(&bytes))
    }

    /// As [`ObjectRef::get`], giving up with [`Error::GetTimeout`] after `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        let entry = self.inner.used();
        let bytes = crate::runtime::wait_blocking(entry, Some(Instant::now() + timeout))?;
        decoding([entry], || value::decode::<T>(&bytes))
    }

    /// Waits without blocking a thread and returns the value deserialized.
    pub async fn get_async(&self) -> Result<T> {
        let entry = self.inner.used();
        let bytes = entry.wait_async().await?;
        decoding([entry], || value::decode::<T>(&bytes))
    }

    /// Blocks until the value is available and returns a view of the archived value, in place: no copy, no
    /// deserialization (the bytes are validated once, here).
    pub fn view(&self) -> Result<ObjectView<T>> {
        let entry = self.inner.used();
        let bytes = crate::runtime::wait_blocking(entry, None)?;
        let mut view = ObjectView::new(bytes)?;
        view.lease = entry.lease();
        Ok(view)
    }
}

/// A read-only view of an archived object. Derefs to `T::Archived`; holds the object's buffer alive.
pub struct ObjectView<T: Value> {
    bytes: Bytes,
    archived: *const T::Archived,
    /// Keeps refs nested in the value (lent by another node) alive while the view can still deserialize them.
    lease: Option<Arc<Lease>>,
}

// SAFETY: the view only hands out shared references into `bytes`, which is immutable and Send + Sync;
// `T::Archived` is plain data read in place.
unsafe impl<T: Value> Send for ObjectView<T> where T::Archived: Sync {}
// SAFETY: as above.
unsafe impl<T: Value> Sync for ObjectView<T> where T::Archived: Sync {}

impl<T: Value> ObjectView<T> {
    pub(crate) fn new(bytes: Bytes) -> Result<Self> {
        let bytes = if (bytes.as_ptr() as usize).is_multiple_of(16) {
            bytes
        } else {
            value::aligned_copy(&bytes)
        };
        let archived: *const T::Archived = value::access::<T>(&bytes)?;
        Ok(ObjectView {
            bytes,
            archived,
            lease: None,
        })
    }

    /// The raw archive bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Deserializes the viewed value into an owned `T`.
    pub fn deserialize(&self) -> Result<T> {
        with_leases(self.lease.iter().cloned().collect(), || {
            rkyv::deserialize::<T, rkyv::rancor::Error>(&**self)
                .map_err(|e| Error::Serialization(e.to_string()))
        })
    }
}

impl<T: Value> std::ops::Deref for ObjectView<T> {
    type Target = T::Archived;
    fn deref(&self) -> &T::Archived {
        // SAFETY: `archived` points into `self.bytes`, validated in `new`, and `bytes` is never mutated or dropped
        // while `self` lives.
        unsafe { &*self.archived }
    }
}

impl<T: Value> fmt::Debug for ObjectView<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ObjectView<{}>({} bytes)",
            std::any::type_name::<T>(),
            self.bytes.len()
        )
    }
}
