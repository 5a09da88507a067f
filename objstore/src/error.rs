//! The store's error type, one variant per way an operation can fail.
//!
//! Whether a caller may retry is part of the type ([`ObjectStoreError::is_retryable`]): a full store or a timeout can
//! succeed later; a lost object, a dead owner or corrupt bytes cannot.

use std::time::Duration;

use crate::ObjectId;

/// Why an object can never be produced any more (recorded with [`crate::ObjectStore::mark_failed`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The node that owned the object died, taking its reference counts and lineage with it.
    OwnerDied,
    /// Every copy of the object is gone and it was not (or could not be) rebuilt.
    ObjectLost,
}

/// What holds the store's memory when a put cannot be satisfied; carried by [`ObjectStoreError::ObjectStoreFull`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Bytes the failed operation asked for.
    pub needed: usize,
    /// The store's memory limit.
    pub limit: usize,
    /// Bytes currently charged for object data (resident objects and buffers still referenced elsewhere).
    pub used: usize,
    /// Bytes held by pinned objects (a live guard or `get_bytes` handle), which cannot move.
    pub pinned_bytes: usize,
    /// Number of pinned objects.
    pub pinned_count: usize,
    /// Bytes of objects already freed but still referenced by a live guard or `get_bytes` handle.
    pub freed_pinned_bytes: usize,
    /// Bytes of unpinned primary copies that could not be spilled (spilling disabled).
    pub primary_bytes: usize,
    /// Number of those primary copies.
    pub primary_count: usize,
}

/// Every way an object-store operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    /// Nothing more can be evicted or spilled: everything left is pinned (or spilling is off). Retryable: release
    /// guards, free objects or enable spilling, then try again.
    #[error(
        "object store full: need {} bytes of {} limit, {} used; {} bytes pinned in {} objects, {} bytes freed but still held, {} bytes in {} unspillable primary copies",
        .0.needed, .0.limit, .0.used, .0.pinned_bytes, .0.pinned_count, .0.freed_pinned_bytes, .0.primary_bytes, .0.primary_count
    )]
    ObjectStoreFull(MemoryReport),
    /// The object alone is larger than the store's whole memory limit; no amount of eviction helps. Raise the limit.
    #[error("object of {size} bytes exceeds the store's whole memory limit of {limit} bytes")]
    TooLarge {
        /// Size of the object.
        size: usize,
        /// The store's limit.
        limit: usize,
    },
    /// An object with this id is already stored; objects are immutable, so the second put is refused.
    #[error("object {0} already exists")]
    AlreadyExists(ObjectId),
    /// No object with this id is stored on this node (never put, freed, or a secondary copy that was evicted).
    #[error("object {0} not found in this store")]
    NotFound(ObjectId),
    /// `put_aligned` was given bytes whose start is not 16-byte aligned; rkyv archives must be. Serialize into an
    /// aligned buffer (e.g. `rkyv::util::AlignedVec`) instead.
    #[error("buffer for object {id} starts at {addr:#x}, which is not {align}-byte aligned")]
    Misaligned {
        /// The object.
        id: ObjectId,
        /// The buffer's start address.
        addr: usize,
        /// The required alignment.
        align: usize,
    },
    /// rkyv could not serialize the value (e.g. a custom serializer failed).
    #[error("serialize object {id}")]
    Serialize {
        /// The object.
        id: ObjectId,
        /// rkyv's error.
        #[source]
        source: rkyv::rancor::BoxedError,
    },
    /// Bytes that came from outside this process are not a valid archive of the requested type. Terminal for this
    /// copy: free it and pull again, or the sender is faulty.
    #[error("object {id} is not a valid archive of the requested type")]
    Invalid {
        /// The object.
        id: ObjectId,
        /// The validator's error.
        #[source]
        source: rkyv::rancor::BoxedError,
    },
    /// Deserializing an archived object into an owned value failed.
    #[error("deserialize object {id}")]
    Deserialize {
        /// The object.
        id: ObjectId,
        /// rkyv's error.
        #[source]
        source: rkyv::rancor::BoxedError,
    },
    /// Reading or writing a spill file failed (disk full, directory removed, permissions).
    #[error("spill file i/o for object {id}")]
    SpillIo {
        /// The object.
        id: ObjectId,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A spill file no longer holds what was written (checksum, length or header mismatch). The copy is unusable.
    #[error("spill file for object {id} is corrupt: {reason}")]
    SpillCorrupt {
        /// The object.
        id: ObjectId,
        /// What did not match.
        reason: String,
    },
    /// `wait` gave up before the object appeared. Retryable.
    #[error("object {id} did not appear within {waited:?}")]
    Timeout {
        /// The object.
        id: ObjectId,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The owner of the object died; the object can never be produced.
    #[error("owner of object {0} died")]
    OwnerDied(ObjectId),
    /// Every copy of the object is gone.
    #[error("object {0} is lost: no copy left")]
    ObjectLost(ObjectId),
}

impl ObjectStoreError {
    /// Whether the same call may succeed later without anything else changing in the cluster's data.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ObjectStoreError::ObjectStoreFull(_) | ObjectStoreError::Timeout { .. }
        )
    }

    pub(crate) fn failed(id: ObjectId, reason: FailureReason) -> Self {
        match reason {
            FailureReason::OwnerDied => ObjectStoreError::OwnerDied(id),
            FailureReason::ObjectLost => ObjectStoreError::ObjectLost(id),
        }
    }
}
