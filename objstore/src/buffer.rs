//! Aligned object buffers, the memory accountant and the pool of reusable large buffers.
//!
//! Every byte of object data the store holds is charged here *before* it is allocated, so the store never allocates
//! beyond its limit; the charge is released when the last `Bytes` referring to the buffer is dropped, wherever that
//! happens. This file decides nothing about eviction (that is [`crate::memory`]) and does no I/O.
//!
//! This is the crate's only `unsafe` allocation code: a raw, zero-initialised, [`ALIGN`]-aligned block of memory.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Alignment of every object buffer. rkyv needs 16 for `u128`; 64 keeps objects on their own cache lines.
pub const ALIGN: usize = 64;

/// The alignment callers of `put_aligned` must provide (what rkyv archives need).
pub const REQUIRED_ALIGN: usize = 16;

/// Buffers at least this large go back to the pool when freed; smaller ones go back to the allocator, which already
/// caches small blocks well.
pub const POOL_MIN: usize = 256 * 1024;

/// Pool capacities are rounded up to this, so objects of slightly different sizes can reuse each other's buffers.
const POOL_GRANULE: usize = 64 * 1024;

/// A zero-initialised, [`ALIGN`]-aligned heap block with a length (bytes in use) and a capacity.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its block exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `cap` zeroed bytes (at least [`ALIGN`]). `None` if the allocator refuses.
    fn zeroed(cap: usize) -> Option<Self> {
        let cap = cap.max(ALIGN);
        let layout = Layout::from_size_align(cap, ALIGN).ok()?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        Some(AlignedBuf {
            ptr: NonNull::new(ptr)?,
            len: 0,
            cap,
        })
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Sets the length; the bytes are always initialised (zeroed at allocation, or left from a previous object).
    fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length beyond capacity");
        self.len = len;
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Touches one byte per page so the kernel maps the whole capacity now rather than during a later copy.
    fn prefault(&mut self) {
        // SAFETY: writes stay within the allocated capacity.
        let whole = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) };
        for page in whole.chunks_mut(4096) {
            // A volatile write so the compiler cannot drop a store of the value already there.
            // SAFETY: page is non-empty and valid for writes.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // The layout was valid when allocated with the same values.
        if let Ok(layout) = Layout::from_size_align(self.cap, ALIGN) {
            // SAFETY: allocated by alloc_zeroed with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// The memory accountant: how much object data is charged, and the pool of free large buffers.
///
/// `used + pooled <= limit` holds at all times (updates are ordered so that the sum is only ever over-counted,
/// never under-counted, in between).
#[derive(Debug)]
pub(crate) struct Accounts {
    limit: usize,
    pool_limit: usize,
    /// Bytes of buffers that hold (or held, while still referenced) object data.
    used: AtomicUsize,
    /// Bytes of free buffers kept in the pool. Atomic so a charge can be checked without the pool lock.
    pooled: AtomicUsize,
    /// Free buffers, reused by capacity. A std-style lock is enough: it is held only to push or pick one entry.
    pool: Mutex<Vec<AlignedBuf>>,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf(len {}, cap {})", self.len, self.cap)
    }
}

impl Accounts {
    pub(crate) fn new(limit: usize, pool_limit: usize) -> Arc<Self> {
        Arc::new(Accounts {
            limit,
            pool_limit: pool_limit.min(limit),
            used: AtomicUsize::new(0),
            pooled: AtomicUsize::new(0),
            pool: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn pooled(&self) -> usize {
        self.pooled.load(Ordering::Acquire)
    }

    /// Bytes that must be released before `n` more fit (0 if they fit now).
    pub(crate) fn shortfall(&self, n: usize) -> usize {
        (self.used() + self.pooled() + n).saturating_sub(self.limit)
    }

    /// Charges `n` bytes if they fit under the limit.
    pub(crate) fn try_charge(&self, n: usize) -> bool {
        let mut current = self.used.load(Ordering::Acquire);
        loop {
            if current + self.pooled.load(Ordering::Acquire) + n > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                current,
                current + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    pub(crate) fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Frees pooled buffers until at least `want` bytes are released (or the pool is empty); returns bytes released.
    pub(crate) fn trim_pool(&self, want: usize) -> usize {
        let mut released = 0;
        let mut doomed = Vec::new();
        {
            let mut pool = self.pool.lock();
            // Largest first: fewest frees for the bytes wanted.
            pool.sort_by_key(AlignedBuf::cap);
            while released < want {
                let Some(buf) = pool.pop() else { break };
                released += buf.cap();
                doomed.push(buf);
            }
            self.pooled.fetch_sub(released, Ordering::AcqRel);
        }
        // Freed outside the lock: returning a large block to the OS can take a while.
        drop(doomed);
        released
    }

    /// Takes a pooled buffer that fits `len` without wasting much, moving its charge from pooled to used.
    fn take_pooled(&self, len: usize) -> Option<AlignedBuf> {
        if len < POOL_MIN {
            return None;
        }
        let mut pool = self.pool.lock();
        let slack = len / 4 + POOL_GRANULE;
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.cap() >= len && b.cap() <= len + slack)
            .min_by_key(|(_, b)| b.cap())
            .map(|(i, _)| i)?;
        let buf = pool.swap_remove(best);
        // Used first, then pooled: the sum is over-counted for a moment, never under-counted.
        self.used.fetch_add(buf.cap(), Ordering::AcqRel);
        self.pooled.fetch_sub(buf.cap(), Ordering::AcqRel);
        Some(buf)
    }

    /// Capacity a fresh buffer of `len` bytes is charged for.
    pub(crate) fn capacity_for(len: usize) -> usize {
        if len >= POOL_MIN {
            len.div_ceil(POOL_GRANULE) * POOL_GRANULE
        } else {
            len.max(1).div_ceil(ALIGN) * ALIGN
        }
    }

    /// A buffer of exactly `len` bytes, charged to this accountant, or `None` if it does not fit right now.
    /// The caller makes room and retries on `None`.
    pub(crate) fn allocate(self: &Arc<Self>, len: usize) -> Option<ObjectBuf> {
        let mut buf = match self.take_pooled(len) {
            Some(buf) => buf,
            None => {
                let cap = Self::capacity_for(len);
                if !self.try_charge(cap) {
                    return None;
                }
                match AlignedBuf::zeroed(cap) {
                    Some(buf) => buf,
                    None => {
                        self.release(cap);
                        return None;
                    }
                }
            }
        };
        buf.set_len(len);
        Some(ObjectBuf {
            buf: Some(buf),
            accounts: Arc::clone(self),
        })
    }

    /// Allocates, pre-faults and pools buffers of `size` bytes until `total` bytes are pooled (bounded by the pool
    /// limit), so the first large puts already find warm pages.
    pub(crate) fn prefault_pool(&self, size: usize, total: usize) -> usize {
        let cap = Self::capacity_for(size.max(POOL_MIN));
        let mut added = 0;
        while added + cap <= total && self.pooled() + cap <= self.pool_limit {
            if !self.try_charge(cap) {
                break;
            }
            let Some(mut buf) = AlignedBuf::zeroed(cap) else {
                self.release(cap);
                break;
            };
            buf.prefault();
            self.pooled.fetch_add(cap, Ordering::AcqRel);
            self.used.fetch_sub(cap, Ordering::AcqRel);
            self.pool.lock().push(buf);
            added += cap;
        }
        added
    }

    /// Returns a buffer whose object is gone: into the pool if it is large and the pool has room, else to the OS.
    fn give_back(&self, buf: AlignedBuf) {
        let cap = buf.cap();
        if cap >= POOL_MIN && self.pooled() + cap <= self.pool_limit {
            // Pooled first, then used: over-count for a moment rather than under-count.
            self.pooled.fetch_add(cap, Ordering::AcqRel);
            self.used.fetch_sub(cap, Ordering::AcqRel);
            self.pool.lock().push(buf);
        } else {
            drop(buf);
            self.used.fetch_sub(cap, Ordering::AcqRel);
        }
    }
}

/// An object's buffer while charged to the store: returns itself to the pool (and releases its charge) on drop.
/// This is the owner inside each object's `Bytes`.
#[derive(Debug)]
pub(crate) struct ObjectBuf {
    /// Always `Some` until drop takes it.
    buf: Option<AlignedBuf>,
    accounts: Arc<Accounts>,
}

impl ObjectBuf {
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(buf) => buf.as_mut_slice(),
            None => &mut [],
        }
    }

    pub(crate) fn cap(&self) -> usize {
        self.buf.as_ref().map_or(0, AlignedBuf::cap)
    }
}

impl AsRef<[u8]> for ObjectBuf {
    fn as_ref(&self) -> &[u8] {
        match &self.buf {
            Some(buf) => buf.as_ref(),
            None => &[],
        }
    }
}

impl Drop for ObjectBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.accounts.give_back(buf);
        }
    }
}

/// Bytes adopted from a caller (`put_aligned`): charged while the store's copy of the handle lives.
#[derive(Debug)]
pub(crate) struct Adopted {
    pub(crate) bytes: bytes::Bytes,
    pub(crate) charge: usize,
    pub(crate) accounts: Arc<Accounts>,
}

impl AsRef<[u8]> for Adopted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        self.accounts.release(self.charge);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_never_exceed_the_limit_and_come_back() {
        let acc = Accounts::new(4 << 20, 2 << 20);
        let a = acc.allocate(1 << 20).expect("fits");
        assert_eq!(a.as_ref().as_ptr() as usize % ALIGN, 0);
        let b = acc.allocate(2 << 20).expect("fits");
        assert!(acc.allocate(2 << 20).is_none(), "would exceed 4 MiB");
        drop(b);
        // The 2 MiB buffer went into the pool: still counted, reusable without a new charge.
        assert_eq!(acc.pooled(), 2 << 20);
        let c = acc
            .allocate((2 << 20) - 1000)
            .expect("reuses the pooled buffer");
        assert_eq!(acc.pooled(), 0);
        drop((a, c));
        assert_eq!(acc.used(), 0);
        // `a` (1 MiB) fits in the 2 MiB pool; `c` (2 MiB) would overflow it and went back to the allocator.
        assert_eq!(acc.trim_pool(usize::MAX), 1 << 20);
        assert_eq!(acc.pooled(), 0);
    }

    #[test]
    fn small_buffers_bypass_the_pool() {
        let acc = Accounts::new(1 << 20, 1 << 20);
        let a = acc.allocate(100).expect("fits");
        assert_eq!(a.as_ref().len(), 100);
        assert_eq!(acc.used(), 128);
        drop(a);
        assert_eq!((acc.used(), acc.pooled()), (0, 0));
        assert_eq!(acc.prefault_pool(POOL_MIN, 1 << 20), 1 << 20);
        assert_eq!(acc.pooled(), 1 << 20);
        assert!(
            acc.allocate(1).is_none(),
            "pool fills the whole limit until trimmed"
        );
        assert_eq!(acc.trim_pool(1), POOL_MIN);
        assert!(acc.allocate(1).is_some());
    }
}
