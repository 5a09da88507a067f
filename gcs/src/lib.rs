//! oxray's global control store (GCS): a Raft-replicated, sharded key-value store with pub/sub.
//!
//! The GCS holds cluster metadata (nodes, actors, function tables, jobs, placement groups, user KV) and
//! publishes its changes. It is *not* on the task hot path: submitting and running tasks needs no consensus.
//!
//! # Shape
//! A cluster runs 1, 3 or 5 **members**; each hosts one Raft replica of each of `S` **shards**. Keys map to
//! shards by their table (the text up to the first `/`, see [`router`]), so a table is ordered and watchable on
//! one shard. Every mutation carries `(client id, seq)` and applies exactly once even when retried. Reads are
//! linearizable (ReadIndex on the leader). Watches replay a bounded per-shard change log from any revision and
//! resume across reconnects and leader changes without gaps or duplicates.
//!
//! **Architecture invariants:** [`shard`], [`router`], [`codec`], [`wire`] and [`linearizability`] do no I/O
//! and read no clock. [`replica`] reads no clock and touches no network (time enters as `tick()`); its only I/O
//! is its own storage. Only this crate speaks `raft`.
//!
//! # Walkthrough
//!
//! ```
//! use bytes::Bytes;
//! use oxray_gcs::{Expect, GcsServer};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 1. Embedded mode: one shard, one replica, in-process, durable in a directory.
//! let dir = tempfile::tempdir()?;
//! let (server, gcs) = GcsServer::embedded(dir.path())?;
//!
//! // 2. Writes return the shard revision they created.
//! let w = gcs.put("kv/app/greeting", Bytes::from_static(b"hello")).await?;
//! assert_eq!(w.revision, 1);
//!
//! // 3. Compare-and-swap on the value (or on `Expect::ModRevision`, or `Expect::Absent`).
//! let swapped = gcs
//!     .cas("kv/app/greeting", Expect::Value(Bytes::from_static(b"hello")), Some(Bytes::from_static(b"hi")))
//!     .await?;
//! assert!(swapped.succeeded);
//!
//! // 4. A prefix scan returns the table and the revision it saw; watching from there misses nothing.
//! let (kvs, revision) = gcs.scan_prefix("kv/app/").await?;
//! assert_eq!(kvs.len(), 1);
//! let mut watch = gcs.watch("kv/app/", revision)?;
//! gcs.delete("kv/app/greeting").await?;
//! let event = watch.next().await.unwrap()?;
//! assert_eq!(event.value, None); // a delete
//!
//! // 5. Shut down (dropping the last handle does the same).
//! server.shutdown();
//! # Ok(())
//! # }
//! ```
//!
//! A 3-member cluster is three [`GcsServer::start`] calls with a [`server::PeerNetwork`] between them (the
//! in-process [`LocalNet`], or [`mesh::MeshPeers`] over QUIC) and a [`GcsClient`] over a [`client::Connector`].
//!
//! # Table of contents
//! - [`codec`]: the compact binary encoding of commands, snapshots and wire messages.
//! - [`shard`]: the sans-IO replicated state machine of one shard (KV with revisions, dedup, change log).
//! - [`wal`]: the crash-safe segmented write-ahead log.
//! - [`storage`]: raft-rs `Storage` over the WAL and an atomically replaced snapshot file.
//! - [`replica`]: one Raft replica of one shard: the Ready loop, batching, ReadIndex, completions.
//! - [`router`]: the documented key-to-shard rule.
//! - [`linearizability`]: a WGL-style checker for register/CAS histories (test tooling).
//! - [`wire`]: request/response messages and their encoding.
//! - [`server`]: [`GcsServer`] (one member: a thread per shard replica) and the in-process [`LocalNet`].
//! - [`client`]: [`GcsClient`] with leader discovery, retries, deadlines and resumable watches.
//! - [`tables`]: typed tables (nodes, actors, functions, jobs, placement groups, user KV).
//! - [`mesh`]: the thin adapter onto the QUIC mesh (`oxray-transport`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod linearizability;
pub mod mesh;
pub mod replica;
pub mod router;
pub mod server;
pub mod shard;
pub mod storage;
pub mod tables;
pub mod wal;
pub mod wire;

pub use client::{ClientConfig, GcsClient, GcsError, WatchStream};
pub use server::{GcsServer, LocalNet, ServerConfig};
pub use shard::{Event, Expect, KeyValue, WriteResult};
