//! oxray's global control store (GCS): a Raft-replicated, sharded key-value store with pub/sub.
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
