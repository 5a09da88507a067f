//! Typed tables over key prefixes: nodes, actors (directory, state and names), function tables, jobs,
//! placement groups and user KV.
//!
//! Each table is a prefix ending in `/`, so by the rule in [`crate::router`] a whole table lives on one shard:
//! listing it is one linearizable range read and watching it is one ordered stream. Records are rkyv archives
//! (validated on decode, so a corrupt or foreign value is a [`TableError::Decode`], never a panic).
//!
//! | table | key | value |
//! |---|---|---|
//! | nodes | `nodes/{node id hex}` | [`NodeInfo`] |
//! | actors | `actors/{actor id hex}` | [`ActorInfo`] |
//! | actor names | `actor_names/{namespace}/{name}` | actor id (16 bytes, little-endian) |
//! | functions | `functions/{name}/{node id hex}` | [`FunctionEntry`] |
//! | jobs | `jobs/{job id hex}` | [`JobInfo`] |
//! | placement groups | `pgs/{group id hex}` | [`PlacementGroupInfo`] |
//! | user KV | `kv/{namespace}/{key}` | raw bytes |
//!
//! What it is not: policy. Liveness timeouts, actor restarts and placement decisions belong to the scheduler;
//! these are only typed, versioned reads and writes (with compare-and-swap for the transitions that race).

use std::marker::PhantomData;

use bytes::Bytes;
use oxray_transport::NodeId;

use crate::client::{GcsClient, GcsError, WatchStream};
use crate::shard::{Expect, WriteResult};

/// Errors of typed table access.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The underlying GCS call failed.
    #[error(transparent)]
    Gcs(#[from] GcsError),
    /// A stored value is not a valid record of this table (corrupt, or written by an incompatible version).
    #[error("value at {key} does not decode: {reason}")]
    Decode {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A record could not be encoded.
    #[error("encode: {0}")]
    Encode(String),
}

/// A record type stored in a table.
pub trait Record: Sized {
    /// Encodes the record.
    fn encode(&self) -> Result<Bytes, TableError>;
    /// Decodes and validates a stored record.
    fn decode(buf: &[u8]) -> Result<Self, String>;
}

macro_rules! rkyv_record {
    ($($t:ty),*) => {$(
        impl Record for $t {
            fn encode(&self) -> Result<Bytes, TableError> {
                rkyv::to_bytes::<rkyv::rancor::Error>(self)
                    .map(|v| Bytes::copy_from_slice(&v))
                    .map_err(|e| TableError::Encode(e.to_string()))
            }
            fn decode(buf: &[u8]) -> Result<Self, String> {
                // One copy into an aligned buffer: stored values carry no alignment guarantee.
                let mut a = rkyv::util::AlignedVec::<16>::with_capacity(buf.len());
                a.extend_from_slice(buf);
                rkyv::from_bytes::<$t, rkyv::rancor::Error>(&a).map_err(|e| e.to_string())
            }
        }
    )*};
}

/// A node's liveness as recorded in the GCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum NodeState {
    /// Heartbeating and accepting work.
    Alive,
    /// Finishing its work; accepts none.
    Draining,
    /// Declared dead; its actors and objects are gone.
    Dead,
}

/// A cluster member's registration.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub node: NodeId,
    /// Where its mesh endpoint listens (`host:port`).
    pub address: String,
    /// Total resources (`CPU`, `GPU`, `memory`, custom), by name.
    pub resources: Vec<(String, f64)>,
    /// Free-form labels.
    pub labels: Vec<(String, String)>,
    /// Liveness.
    pub state: NodeState,
    /// Last heartbeat, in the writer's milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
}

/// An actor's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ActorState {
    /// Waiting for a node.
    PendingCreation,
    /// Running.
    Alive,
    /// Being restarted after a failure.
    Restarting,
    /// Gone for good.
    Dead,
}

/// An actor's directory entry.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ActorInfo {
    /// Its id.
    pub actor: u128,
    /// Its registered class name.
    pub class: String,
    /// Its name, if named (see [`Tables::register_actor_name`]).
    pub name: Option<String>,
    /// Its namespace.
    pub namespace: String,
    /// Where it runs, once placed.
    pub node: Option<NodeId>,
    /// The node that created it.
    pub owner: NodeId,
    /// Lifecycle state.
    pub state: ActorState,
    /// Restarts so far.
    pub restarts: u32,
    /// Restart budget (-1 for unbounded).
    pub max_restarts: i32,
    /// Whether it outlives its owner.
    pub detached: bool,
    /// Why it died, when dead.
    pub death_cause: Option<String>,
}

/// Whether a function-table entry is a task or an actor class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum FunctionKind {
    /// A `#[remote]` function.
    Task,
    /// An actor class.
    Actor,
}

/// One node's announcement that it can run a function.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FunctionEntry {
    /// Stable registered name.
    pub name: String,
    /// Hash of the signature; callers compare it before sending work.
    pub signature_hash: u64,
    /// Task or actor.
    pub kind: FunctionKind,
    /// The node announcing it.
    pub node: NodeId,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum JobState {
    /// Its driver is running.
    Running,
    /// It ended normally.
    Succeeded,
    /// It ended with an error or its driver died.
    Failed,
}

/// A job (one driver program's session).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JobInfo {
    /// Its id.
    pub job: u64,
    /// The driver's node.
    pub driver: NodeId,
    /// What was run.
    pub entrypoint: String,
    /// State.
    pub state: JobState,
    /// Start, milliseconds since the Unix epoch.
    pub start_ms: u64,
    /// End, once ended.
    pub end_ms: Option<u64>,
}

/// A placement group's strategy (Ray's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PlacementStrategy {
    /// Bundles on as few nodes as possible.
    Pack,
    /// Bundles on as many nodes as possible.
    Spread,
    /// All bundles on one node.
    StrictPack,
    /// Every bundle on a different node.
    StrictSpread,
}

/// A placement group's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PlacementGroupState {
    /// Not yet reserved.
    Pending,
    /// All bundles reserved.
    Created,
    /// Cannot be placed with the cluster's resources.
    Infeasible,
    /// Removed.
    Removed,
}

/// A placement group.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PlacementGroupInfo {
    /// Its id.
    pub id: u128,
    /// Optional name.
    pub name: Option<String>,
    /// Strategy.
    pub strategy: PlacementStrategy,
    /// Resources of each bundle.
    pub bundles: Vec<Vec<(String, f64)>>,
    /// Node reserved for each bundle, once created.
    pub bundle_nodes: Vec<Option<NodeId>>,
    /// State.
    pub state: PlacementGroupState,
}

rkyv_record!(
    NodeInfo,
    ActorInfo,
    FunctionEntry,
    JobInfo,
    PlacementGroupInfo
);

/// A record with the revision of its last write (pass it to [`Table::update`] for compare-and-swap).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The record.
    pub value: T,
    /// Its `mod_revision`.
    pub mod_revision: u64,
}

/// A change to a table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableEvent<T> {
    /// The record id (the key without the table prefix).
    pub id: String,
    /// The revision of the change.
    pub revision: u64,
    /// The new record, or `None` if deleted.
    pub value: Option<T>,
}

/// Typed access to one table. Cheap to clone.
pub struct Table<T> {
    client: GcsClient,
    prefix: &'static str,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table {
            client: self.client.clone(),
            prefix: self.prefix,
            _t: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl<T: Record> Table<T> {
    fn new(client: GcsClient, prefix: &'static str) -> Self {
        Table {
            client,
            prefix,
            _t: PhantomData,
        }
    }

    /// The table's key prefix.
    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// The key of record `id`.
    pub fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<T, TableError> {
        T::decode(value).map_err(|reason| TableError::Decode {
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        })
    }

    /// Writes record `id` unconditionally.
    pub async fn put(&self, id: &str, value: &T) -> Result<WriteResult, TableError> {
        Ok(self.client.put(self.key(id), value.encode()?).await?)
    }

    /// Creates record `id` only if it does not exist; returns whether it was created.
    pub async fn insert_new(&self, id: &str, value: &T) -> Result<bool, TableError> {
        let w = self
            .client
            .cas(self.key(id), Expect::Absent, Some(value.encode()?))
            .await?;
        Ok(w.succeeded)
    }

    /// Replaces record `id` only if it was last written at `mod_revision`; returns whether it was.
    pub async fn update(&self, id: &str, mod_revision: u64, value: &T) -> Result<bool, TableError> {
        let w = self
            .client
            .cas(
                self.key(id),
                Expect::ModRevision(mod_revision),
                Some(value.encode()?),
            )
            .await?;
        Ok(w.succeeded)
    }

    /// Reads record `id`.
    pub async fn get(&self, id: &str) -> Result<Option<Versioned<T>>, TableError> {
        match self.client.get(self.key(id)).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                value: self.decode(&kv.key, &kv.value)?,
                mod_revision: kv.mod_revision,
            })),
        }
    }

    /// Deletes record `id`; returns whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, TableError> {
        Ok(self.client.delete(self.key(id)).await?.succeeded)
    }

    /// Every record, by id, and the revision to watch from to follow later changes.
    pub async fn list(&self) -> Result<(Vec<(String, Versioned<T>)>, u64), TableError> {
        let (kvs, rev) = self.client.scan_prefix(self.prefix).await?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in kvs {
            let id = String::from_utf8_lossy(&kv.key[self.prefix.len()..]).into_owned();
            let value = self.decode(&kv.key, &kv.value)?;
            out.push((
                id,
                Versioned {
                    value,
                    mod_revision: kv.mod_revision,
                },
            ));
        }
        Ok((out, rev))
    }

    /// Follows changes after revision `after` (typically the revision returned by [`Table::list`]).
    pub fn watch(&self, after: u64) -> Result<TableWatch<T>, TableError> {
        Ok(TableWatch {
            inner: self.client.watch(self.prefix, after)?,
            prefix_len: self.prefix.len(),
            _t: PhantomData,
        })
    }
}

/// A typed stream of a table's changes.
#[derive(Debug)]
pub struct TableWatch<T> {
    inner: WatchStream,
    prefix_len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T: Record> TableWatch<T> {
    /// The next change (see [`WatchStream::next`]).
    pub async fn next(&mut self) -> Option<Result<TableEvent<T>, TableError>> {
        let e = match self.inner.next().await? {
            Ok(e) => e,
            Err(err) => return Some(Err(err.into())),
        };
        let id = String::from_utf8_lossy(&e.key[self.prefix_len.min(e.key.len())..]).into_owned();
        let value = match e.value {
            None => None,
            Some(v) => match T::decode(&v) {
                Ok(t) => Some(t),
                Err(reason) => {
                    return Some(Err(TableError::Decode {
                        key: String::from_utf8_lossy(&e.key).into_owned(),
                        reason,
                    }));
                }
            },
        };
        Some(Ok(TableEvent {
            id,
            revision: e.revision,
            value,
        }))
    }
}

/// A 128-bit id as the fixed-width hex used in table keys (so keys sort by id).
pub fn hex_id(id: u128) -> String {
    format!("{id:032x}")
}

/// All GCS tables, over one client.
#[derive(Debug, Clone)]
pub struct Tables {
    client: GcsClient,
    /// `nodes/`: membership, resources, liveness.
    pub nodes: Table<NodeInfo>,
    /// `actors/`: the actor directory and state.
    pub actors: Table<ActorInfo>,
    /// `functions/`: which node can run which function, with signature hashes.
    pub functions: Table<FunctionEntry>,
    /// `jobs/`: driver sessions.
    pub jobs: Table<JobInfo>,
    /// `pgs/`: placement groups.
    pub placement_groups: Table<PlacementGroupInfo>,
}

impl Tables {
    /// The tables over `client`.
    pub fn new(client: GcsClient) -> Tables {
        Tables {
            nodes: Table::new(client.clone(), "nodes/"),
            actors: Table::new(client.clone(), "actors/"),
            functions: Table::new(client.clone(), "functions/"),
            jobs: Table::new(client.clone(), "jobs/"),
            placement_groups: Table::new(client.clone(), "pgs/"),
            client,
        }
    }

    /// The id under which `node` is stored in [`Tables::nodes`].
    pub fn node_id(node: NodeId) -> String {
        hex_id(node.0)
    }

    /// The id under which a function entry is stored in [`Tables::functions`].
    pub fn function_id(name: &str, node: NodeId) -> String {
        format!("{name}/{}", hex_id(node.0))
    }

    /// Binds `name` in `namespace` to `actor` if the name is free; returns whether it was bound.
    /// Names are unique per namespace: the bind is a compare-and-swap on absence.
    pub async fn register_actor_name(
        &self,
        namespace: &str,
        name: &str,
        actor: u128,
    ) -> Result<bool, TableError> {
        let key = format!("actor_names/{namespace}/{name}");
        let w = self
            .client
            .cas(
                key,
                Expect::Absent,
                Some(Bytes::copy_from_slice(&actor.to_le_bytes())),
            )
            .await?;
        Ok(w.succeeded)
    }

    /// The actor bound to `name` in `namespace`.
    pub async fn lookup_actor_name(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<u128>, TableError> {
        let key = format!("actor_names/{namespace}/{name}");
        match self.client.get(key.clone()).await? {
            None => Ok(None),
            Some(kv) => {
                let raw: [u8; 16] = kv.value[..].try_into().map_err(|_| TableError::Decode {
                    key,
                    reason: format!("{} bytes, expected 16", kv.value.len()),
                })?;
                Ok(Some(u128::from_le_bytes(raw)))
            }
        }
    }

    /// Frees `name` in `namespace` only if it is still bound to `actor`; returns whether it was freed.
    pub async fn unregister_actor_name(
        &self,
        namespace: &str,
        name: &str,
        actor: u128,
    ) -> Result<bool, TableError> {
        let key = format!("actor_names/{namespace}/{name}");
        let w = self
            .client
            .cas(
                key,
                Expect::Value(Bytes::copy_from_slice(&actor.to_le_bytes())),
                None,
            )
            .await?;
        Ok(w.succeeded)
    }

    /// User KV: sets `key` in `namespace`.
    pub async fn kv_put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
    ) -> Result<WriteResult, TableError> {
        Ok(self
            .client
            .put(format!("kv/{namespace}/{key}"), value)
            .await?)
    }

    /// User KV: reads `key` in `namespace`.
    pub async fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, TableError> {
        Ok(self
            .client
            .get(format!("kv/{namespace}/{key}"))
            .await?
            .map(|kv| kv.value))
    }

    /// User KV: deletes `key` in `namespace`; returns whether it existed.
    pub async fn kv_delete(&self, namespace: &str, key: &str) -> Result<bool, TableError> {
        Ok(self
            .client
            .delete(format!("kv/{namespace}/{key}"))
            .await?
            .succeeded)
    }

    /// User KV: every key in `namespace` (without the namespace prefix) and its value.
    pub async fn kv_list(&self, namespace: &str) -> Result<Vec<(String, Bytes)>, TableError> {
        let prefix = format!("kv/{namespace}/");
        let (kvs, _) = self.client.scan_prefix(prefix.clone()).await?;
        Ok(kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned(),
                    kv.value,
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let n = NodeInfo {
            node: NodeId(7),
            address: "127.0.0.1:1".into(),
            resources: vec![("CPU".into(), 2.0)],
            labels: vec![],
            state: NodeState::Alive,
            heartbeat_ms: 5,
        };
        let b = n.encode().unwrap();
        assert_eq!(NodeInfo::decode(&b).unwrap(), n);
        assert!(NodeInfo::decode(&b[..b.len() / 2]).is_err());
        assert!(NodeInfo::decode(b"garbage").is_err());
    }
}
