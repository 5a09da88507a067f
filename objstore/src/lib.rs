//! oxray's per-node object store: immutable objects as rkyv archives, read in place.
//!
//! Objects are how tasks and actors share data. Each node (process) has one [`ObjectStore`]. A value is serialized
//! once, straight into a 16-byte aligned buffer; readers get an [`ObjectGuard`] that dereferences to the archived
//! value inside that buffer: no copy and no deserialization (bytes from elsewhere are validated once). The store's
//! memory is bounded: under pressure it drops secondary copies, then spills primary copies to disk and restores them
//! transparently, and only when everything left is pinned does a put fail with
//! [`ObjectStoreError::ObjectStoreFull`].
//!
//! # Contents
//! - [`id`]: [`ObjectId`], and deterministic ids for task returns.
//! - [`config`]: [`StoreConfig`] (memory limit, spill directory, inline threshold) and [`is_inline`].
//! - [`store`]: [`ObjectStore`], [`ObjectGuard`], [`ObjectBuffer`] — the driver that owns memory and files.
//! - [`memory`]: the eviction policy, a pure function (sans-IO core).
//! - [`refs`]: [`RefTable`], the owner's reference counting and copy locations (sans-IO core, driven by the SDK).
//! - [`pull`]: [`PullManager`], which copy to pull from, dedup, admission and retries (sans-IO core).
//! - [`transfer`]: [`Transfer`], the network driver around that core: chunked, checksummed pulls over the mesh
//!   into the object's final aligned buffer.
//! - `buffer` and `spill` (private): aligned buffers with memory accounting, and spill files with checksums.
//!
//! What this crate is not: it does not decide where tasks run, does not keep lineage (the owner in the SDK does),
//! and its cores never read the clock, the disk or the network.
//!
//! # Walkthrough
//! ```
//! use std::time::Duration;
//! use oxray_objstore::{ObjectId, ObjectStore, StoreConfig};
//!
//! #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
//! struct Weights {
//!     step: u64,
//!     values: Vec<f32>,
//! }
//!
//! let store = ObjectStore::new(StoreConfig::with_limit(64 << 20));
//! let id = ObjectId::random();
//! store.put(id, &Weights { step: 3, values: vec![0.5; 1000] })?;
//!
//! // A view into the store's buffer: no copy, no deserialization.
//! let view = store.get::<Weights>(id)?;
//! assert_eq!(view.step, 3);
//! assert_eq!(view.values.len(), 1000);
//!
//! // Owned values only when asked for.
//! let owned: Weights = view.deserialize()?;
//! assert_eq!(owned.values[999], 0.5);
//! drop(view);
//!
//! // Waiting for an object that is already here returns at once.
//! let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
//! rt.block_on(store.wait(id, Duration::from_secs(1)))?;
//! assert!(store.free(id));
//! assert!(!store.contains(id));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod error;
pub mod id;
pub mod memory;
pub mod pull;
pub mod refs;
pub mod store;
pub mod transfer;

mod buffer;
mod spill;

pub use config::{StoreConfig, is_inline};
pub use error::{FailureReason, MemoryReport, ObjectStoreError};
pub use id::ObjectId;
pub use pull::{PullAction, PullConfig, PullError, PullManager, Requested};

pub use refs::{RefAction, RefTable};
pub use store::{
    Object, ObjectBuffer, ObjectGuard, ObjectInfo, ObjectStore, ObjectWriter, SMALL_ARCHIVE,
    StoreStats, archive_if_small, archived_len,
};
pub use transfer::{Transfer, TransferConfig, TransferHandler, TransferStats};

/// Re-exported so users name the same node id the transport authenticates.
pub use oxray_transport::NodeId;
