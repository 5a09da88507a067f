//! The replicated state machine of one GCS shard: a revisioned key-value map, an exactly-once dedup table and
//! a bounded change log for watches.
//!
//! This is a sans-IO core. It never touches the clock, the disk or the network; it only applies commands that
//! Raft has already committed, answers reads, and encodes/decodes itself for snapshots. Every replica applying
//! the same log gets byte-identical state, so nothing here may depend on anything but its inputs (no hash-map
//! iteration order leaks into results or snapshots: ordered maps are used throughout).
//!
//! What it is not: it does not validate the *limits* of a command at apply time. Limits are checked when a
//! command is proposed ([`ShardState::validate`]); apply trusts the committed log so that replicas configured
//! with different limits can never diverge.
//!
//! # Revisions
//! Every successful mutation bumps the shard's revision by one and stamps the key with it (`mod_revision`).
//! Failed compare-and-swaps and deletes of absent keys leave the revision alone. Revisions are per shard.
//!
//! # Exactly once
//! Every mutation carries `(client, seq)`. The result of each applied `(client, seq)` is remembered (up to
//! [`Limits::dedup_per_client`] recent seqs per client and [`Limits::max_clients`] clients); a retried command
//! returns the remembered result instead of applying twice. A seq older than the retained window yields
//! [`CommandError::DedupExpired`]: its outcome is unknown, and the client must re-read.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::codec::{DecodeError, Reader, Writer};

/// Explicit bounds on what one shard accepts and retains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest key in bytes (default 4 KiB).
    pub max_key: usize,
    /// Longest value in bytes (default 1 MiB).
    pub max_value: usize,
    /// Most change-log events retained for watch replay (default 100 000).
    pub history_events: usize,
    /// Most change-log bytes (keys + values) retained for watch replay (default 64 MiB).
    pub history_bytes: usize,
    /// Recent results remembered per client for exactly-once retries (default 1024).
    pub dedup_per_client: usize,
    /// Client sessions remembered; the least recently used is forgotten beyond this (default 16 384).
    pub max_clients: usize,
    /// Most keys one range read returns (default 10 000); callers page with `limit` and the last key.
    pub max_range: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key: 4 << 10,
            max_value: 1 << 20,
            history_events: 100_000,
            history_bytes: 64 << 20,
            dedup_per_client: 1024,
            max_clients: 16_384,
            max_range: 10_000,
        }
    }
}

/// One stored key with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Bytes,
    /// Revision of the put that created this incarnation of the key.
    pub create_revision: u64,
    /// Revision of the latest put to this key.
    pub mod_revision: u64,
    /// Number of puts since creation (1 after the first put).
    pub version: u64,
}

/// The condition of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this value.
    Value(Bytes),
    /// The key's `mod_revision` must equal this (0 means absent).
    ModRevision(u64),
}

/// A mutation of the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Bytes,
    },
    /// Remove `key` (succeeds whether or not it existed; `succeeded` tells which).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// If `expect` holds, set `key` to `new` (or delete it when `new` is `None`).
    Cas {
        /// The key.
        key: Vec<u8>,
        /// The condition.
        expect: Expect,
        /// The value to store; `None` deletes.
        new: Option<Bytes>,
    },
}

impl Op {
    /// The key this op touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Cas { key, .. } => key,
        }
    }
}

/// A mutation plus the identity that makes retries idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The client session, random per client instance.
    pub client: u64,
    /// Strictly increasing per client; a retry reuses the seq of the original attempt.
    pub seq: u64,
    /// What to do.
    pub op: Op,
}

/// The outcome of one applied mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteResult {
    /// The shard revision after this command (unchanged when it had no effect).
    pub revision: u64,
    /// Put: always true. Delete: whether the key existed. Cas: whether the condition held.
    pub succeeded: bool,
    /// `mod_revision` of the key before this command (0 if absent); on a failed CAS, the current one.
    pub prev_revision: u64,
}

/// Why a command failed deterministically on every replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The seq is older than the retained dedup window for this client, so whether it already applied is
    /// unknown. Remedy: re-read the key and decide again; use fewer concurrent requests per client.
    #[error("request seq {seq} of client {client:x} is older than the dedup window")]
    DedupExpired {
        /// The client.
        client: u64,
        /// The rejected seq.
        seq: u64,
    },
}

/// Why a command was refused before being proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    /// The key is empty.
    #[error("empty key")]
    EmptyKey,
    /// The key is longer than [`Limits::max_key`].
    #[error("key of {len} bytes exceeds limit {max}")]
    KeyTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is longer than [`Limits::max_value`].
    #[error("value of {len} bytes exceeds limit {max}")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A watch replay asked for revisions the change log no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("revisions up to {oldest} were compacted; resync with a full read")]
pub struct Compacted {
    /// Replay is possible from this revision on: the watcher must re-read the prefix (which returns the
    /// current revision) and resume watching after that.
    pub oldest: u64,
}

/// One change to the shard, as delivered to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The revision this change created.
    pub revision: u64,
    /// The key changed.
    pub key: Vec<u8>,
    /// The new value, or `None` for a delete.
    pub value: Option<Bytes>,
}

impl Event {
    fn weight(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Bytes::len) + 32
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    value: Bytes,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Session {
    /// Results of recent seqs, ordered so the oldest is evicted first.
    results: BTreeMap<u64, Result<WriteResult, CommandError>>,
    /// Every seq at or below this was forgotten.
    floor: u64,
    /// Raft index of the last command from this client (least recently used sessions are evicted).
    last_index: u64,
}

/// Keys up to this many bytes are stored inside the tree node (see [`Key`]).
const INLINE_KEY: usize = 22;

/// A key as the state's tree stores it: up to [`INLINE_KEY`] bytes inline, longer ones on the heap.
///
/// Why: a tree search compares the probe with a few dozen stored keys. With `Vec<u8>` keys each comparison
/// first follows a pointer to a separate allocation, which at a few hundred thousand keys is a cache miss
/// per comparison; profiles of the write path showed that search as the largest single cost of applying a
/// write, paid on every replica. Typical GCS keys (`nodes/…`, `actors/…`, short user keys) fit inline, so
/// a search only touches the tree's own nodes. It orders, compares and borrows exactly like `[u8]`.
#[derive(Clone)]
enum Key {
    Inline { len: u8, buf: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(k: &[u8]) -> Key {
        if k.len() <= INLINE_KEY {
            let mut buf = [0u8; INLINE_KEY];
            buf[..k.len()].copy_from_slice(k);
            Key::Inline {
                len: k.len() as u8,
                buf,
            }
        } else {
            Key::Heap(k.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, buf } => &buf[..usize::from(*len)],
            Key::Heap(b) => b,
        }
    }
}

impl From<Vec<u8>> for Key {
    fn from(v: Vec<u8>) -> Key {
        if v.len() <= INLINE_KEY {
            Key::new(&v)
        } else {
            Key::Heap(v.into_boxed_slice())
        }
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_slice().fmt(f)
    }
}

/// The state of one shard. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    limits: Limits,
    revision: u64,
    applied_index: u64,
    kv: BTreeMap<Key, Stored>,
    sessions: BTreeMap<u64, Session>,
    log: VecDeque<Event>,
    log_bytes: usize,
    /// Highest revision dropped from `log`; replay is possible after any revision >= this.
    compacted_through: u64,
}

const SNAPSHOT_MAGIC: u8 = 0xA7;

impl ShardState {
    /// An empty shard.
    pub fn new(limits: Limits) -> Self {
        ShardState {
            limits,
            revision: 0,
            applied_index: 0,
            kv: BTreeMap::new(),
            sessions: BTreeMap::new(),
            log: VecDeque::new(),
            log_bytes: 0,
            compacted_through: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The current revision (the revision of the latest change, 0 when none yet).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The Raft index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    /// Whether the shard holds no keys.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// Checks a command against the limits before it is proposed.
    pub fn validate(&self, op: &Op) -> Result<(), ValidateError> {
        validate_op(&self.limits, op)
    }

    /// Applies one committed command at Raft index `index`. Deterministic.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Result<WriteResult, CommandError> {
        if index > self.applied_index {
            self.applied_index = index;
        }
        if let Some(s) = self.sessions.get_mut(&cmd.client) {
            s.last_index = index;
            if let Some(r) = s.results.get(&cmd.seq) {
                return r.clone();
            }
            if cmd.seq <= s.floor {
                return Err(CommandError::DedupExpired {
                    client: cmd.client,
                    seq: cmd.seq,
                });
            }
        }
        let result = Ok(self.apply_op(&cmd.op));
        self.remember(index, cmd, result.clone());
        result
    }

    /// Marks `index` applied without a command (Raft's empty entries on leader change).
    pub fn apply_noop(&mut self, index: u64) {
        if index > self.applied_index {
            self.applied_index = index;
        }
    }

    fn remember(&mut self, index: u64, cmd: &Command, result: Result<WriteResult, CommandError>) {
        if !self.sessions.contains_key(&cmd.client)
            && self.sessions.len() >= self.limits.max_clients
        {
            // Forget the least recently used session. O(clients), only when the table is full.
            if let Some((&victim, _)) = self
                .sessions
                .iter()
                .min_by_key(|(id, s)| (s.last_index, **id))
            {
                self.sessions.remove(&victim);
            }
        }
        let per_client = self.limits.dedup_per_client.max(1);
        let s = self.sessions.entry(cmd.client).or_default();
        s.last_index = index;
        s.results.insert(cmd.seq, result);
        while s.results.len() > per_client {
            if let Some((seq, _)) = s.results.pop_first() {
                s.floor = s.floor.max(seq);
            }
        }
    }

    fn apply_op(&mut self, op: &Op) -> WriteResult {
        match op {
            Op::Put { key, value } => {
                let prev = self.put(key, value.clone());
                WriteResult {
                    revision: self.revision,
                    succeeded: true,
                    prev_revision: prev,
                }
            }
            Op::Delete { key } => {
                let prev = self.kv.get(key.as_slice()).map_or(0, |s| s.mod_revision);
                let existed = self.delete(key);
                WriteResult {
                    revision: self.revision,
                    succeeded: existed,
                    prev_revision: prev,
                }
            }
            Op::Cas { key, expect, new } => {
                let cur = self.kv.get(key.as_slice());
                let prev = cur.map_or(0, |s| s.mod_revision);
                let holds = match expect {
                    Expect::Absent => cur.is_none(),
                    Expect::Value(v) => cur.is_some_and(|s| s.value == v),
                    Expect::ModRevision(r) => prev == *r,
                };
                if holds {
                    match new {
                        Some(v) => {
                            self.put(key, v.clone());
                        }
                        None => {
                            self.delete(key);
                        }
                    }
                }
                WriteResult {
                    revision: self.revision,
                    succeeded: holds,
                    prev_revision: prev,
                }
            }
        }
    }

    /// Sets `key`; returns its previous mod revision (0 if it was absent). Exactly one tree search, new key
    /// or not: the apply loop runs this on every replica for every write, and with long shared key prefixes
    /// the key comparisons of a search cost more than the key copy `entry` needs up front.
    fn put(&mut self, key: &[u8], value: Bytes) -> u64 {
        use std::collections::btree_map::Entry;
        self.revision += 1;
        let rev = self.revision;
        let prev = match self.kv.entry(Key::new(key)) {
            Entry::Occupied(mut o) => {
                let s = o.get_mut();
                let prev = s.mod_revision;
                s.value = value.clone();
                s.mod_revision = rev;
                s.version += 1;
                prev
            }
            Entry::Vacant(v) => {
                v.insert(Stored {
                    value: value.clone(),
                    create_revision: rev,
                    mod_revision: rev,
                    version: 1,
                });
                0
            }
        };
        self.record(Event {
            revision: rev,
            key: key.to_vec(),
            value: Some(value),
        });
        prev
    }

    fn delete(&mut self, key: &[u8]) -> bool {
        if self.kv.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        self.record(Event {
            revision: self.revision,
            key: key.to_vec(),
            value: None,
        });
        true
    }

    fn record(&mut self, ev: Event) {
        self.log_bytes += ev.weight();
        self.log.push_back(ev);
        while self.log.len() > self.limits.history_events
            || self.log_bytes > self.limits.history_bytes
        {
            match self.log.pop_front() {
                Some(old) => {
                    self.log_bytes -= old.weight();
                    self.compacted_through = old.revision;
                }
                None => break,
            }
        }
    }

    /// The current value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.kv.get(key).map(|s| to_kv(key, s))
    }

    /// Keys in `[start, end)` (`end = None`: to the end), at most `limit` (capped by [`Limits::max_range`]).
    /// Returns the keys and whether more remained.
    pub fn range(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> (Vec<KeyValue>, bool) {
        use std::ops::Bound;
        let limit = limit.min(self.limits.max_range);
        let upper = match end {
            Some(e) if e <= start => return (Vec::new(), false),
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut iter = self.kv.range::<[u8], _>((Bound::Included(start), upper));
        for (k, s) in iter.by_ref().take(limit) {
            out.push(to_kv(k.as_slice(), s));
        }
        let more = iter.next().is_some();
        (out, more)
    }

    /// Every retained change with revision `> after` whose key starts with `prefix`, oldest first, at most `max`.
    ///
    /// Fails with [`Compacted`] when changes after `after` were already dropped from the bounded history.
    pub fn events_after(
        &self,
        prefix: &[u8],
        after: u64,
        max: usize,
    ) -> Result<Vec<Event>, Compacted> {
        if after < self.compacted_through {
            return Err(Compacted {
                oldest: self.compacted_through,
            });
        }
        // Revisions in the log are strictly increasing, so binary search for the first one after `after`.
        let start = self.log.partition_point(|e| e.revision <= after);
        Ok(self
            .log
            .range(start..)
            .filter(|e| e.key.starts_with(prefix))
            .take(max)
            .cloned()
            .collect())
    }

    /// Encodes the whole state for a Raft snapshot.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.log_bytes);
        w.u8(SNAPSHOT_MAGIC);
        w.u64(self.revision);
        w.u64(self.applied_index);
        w.u64(self.compacted_through);
        w.u32(self.kv.len() as u32);
        for (k, s) in &self.kv {
            w.bytes(k.as_slice());
            w.bytes(&s.value);
            w.u64(s.create_revision);
            w.u64(s.mod_revision);
            w.u64(s.version);
        }
        w.u32(self.sessions.len() as u32);
        for (id, s) in &self.sessions {
            w.u64(*id);
            w.u64(s.floor);
            w.u64(s.last_index);
            w.u32(s.results.len() as u32);
            for (seq, r) in &s.results {
                w.u64(*seq);
                encode_result(&mut w, r);
            }
        }
        w.u32(self.log.len() as u32);
        for e in &self.log {
            w.u64(e.revision);
            w.bytes(&e.key);
            w.opt_bytes(e.value.as_deref());
        }
        w.finish()
    }

    /// Rebuilds a state from [`ShardState::encode_snapshot`] output. An empty buffer is the empty state.
    pub fn decode_snapshot(limits: Limits, buf: &[u8]) -> Result<Self, DecodeError> {
        let mut st = ShardState::new(limits);
        if buf.is_empty() {
            return Ok(st);
        }
        let mut r = Reader::new(buf);
        let magic = r.u8()?;
        if magic != SNAPSHOT_MAGIC {
            return Err(DecodeError::BadTag {
                what: "shard snapshot",
                tag: magic,
            });
        }
        st.revision = r.u64()?;
        st.applied_index = r.u64()?;
        st.compacted_through = r.u64()?;
        let n = r.len(usize::MAX >> 1)?;
        for _ in 0..n {
            let k = r.vec()?;
            let value = r.bytes()?;
            let s = Stored {
                value,
                create_revision: r.u64()?,
                mod_revision: r.u64()?,
                version: r.u64()?,
            };
            st.kv.insert(Key::from(k), s);
        }
        let n = r.len(usize::MAX >> 1)?;
        for _ in 0..n {
            let id = r.u64()?;
            let mut s = Session {
                floor: r.u64()?,
                last_index: r.u64()?,
                ..Session::default()
            };
            let m = r.len(usize::MAX >> 1)?;
            for _ in 0..m {
                let seq = r.u64()?;
                s.results.insert(seq, decode_result(&mut r)?);
            }
            st.sessions.insert(id, s);
        }
        let n = r.len(usize::MAX >> 1)?;
        for _ in 0..n {
            let ev = Event {
                revision: r.u64()?,
                key: r.vec()?,
                value: r.opt_bytes()?,
            };
            st.log_bytes += ev.weight();
            st.log.push_back(ev);
        }
        r.finish()?;
        Ok(st)
    }
}

fn to_kv(key: &[u8], s: &Stored) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: s.value.clone(),
        create_revision: s.create_revision,
        mod_revision: s.mod_revision,
        version: s.version,
    }
}

/// Checks an op against `limits` (shared by the shard and by clients that want to fail early).
pub fn validate_op(limits: &Limits, op: &Op) -> Result<(), ValidateError> {
    let key = op.key();
    if key.is_empty() {
        return Err(ValidateError::EmptyKey);
    }
    if key.len() > limits.max_key {
        return Err(ValidateError::KeyTooLarge {
            len: key.len(),
            max: limits.max_key,
        });
    }
    let value_len = match op {
        Op::Put { value, .. } => value.len(),
        Op::Cas { expect, new, .. } => {
            let e = match expect {
                Expect::Value(v) => v.len(),
                _ => 0,
            };
            e.max(new.as_ref().map_or(0, Bytes::len))
        }
        Op::Delete { .. } => 0,
    };
    if value_len > limits.max_value {
        return Err(ValidateError::ValueTooLarge {
            len: value_len,
            max: limits.max_value,
        });
    }
    Ok(())
}

/// Encodes a command (used inside Raft entries and on the wire).
pub fn encode_command(w: &mut Writer, c: &Command) {
    w.u64(c.client);
    w.u64(c.seq);
    match &c.op {
        Op::Put { key, value } => {
            w.u8(1);
            w.bytes(key);
            w.bytes(value);
        }
        Op::Delete { key } => {
            w.u8(2);
            w.bytes(key);
        }
        Op::Cas { key, expect, new } => {
            w.u8(3);
            w.bytes(key);
            match expect {
                Expect::Absent => w.u8(0),
                Expect::Value(v) => {
                    w.u8(1);
                    w.bytes(v);
                }
                Expect::ModRevision(r) => {
                    w.u8(2);
                    w.u64(*r);
                }
            }
            w.opt_bytes(new.as_deref());
        }
    }
}

/// Decodes a command written by [`encode_command`].
pub fn decode_command(r: &mut Reader<'_>) -> Result<Command, DecodeError> {
    let client = r.u64()?;
    let seq = r.u64()?;
    let op = match r.u8()? {
        1 => Op::Put {
            key: r.vec()?,
            value: r.bytes()?,
        },
        2 => Op::Delete { key: r.vec()? },
        3 => {
            let key = r.vec()?;
            let expect = match r.u8()? {
                0 => Expect::Absent,
                1 => Expect::Value(r.bytes()?),
                2 => Expect::ModRevision(r.u64()?),
                tag => {
                    return Err(DecodeError::BadTag {
                        what: "expect",
                        tag,
                    });
                }
            };
            Op::Cas {
                key,
                expect,
                new: r.opt_bytes()?,
            }
        }
        tag => return Err(DecodeError::BadTag { what: "op", tag }),
    };
    Ok(Command { client, seq, op })
}

/// Encodes a batch of commands as one Raft entry payload.
pub fn encode_batch(cmds: &[Command]) -> Vec<u8> {
    let mut w = Writer::with_capacity(16 + cmds.len() * 64);
    w.u32(cmds.len() as u32);
    for c in cmds {
        encode_command(&mut w, c);
    }
    w.finish()
}

/// Decodes a Raft entry payload written by [`encode_batch`].
pub fn decode_batch(buf: &[u8]) -> Result<Vec<Command>, DecodeError> {
    let mut r = Reader::new(buf);
    // Each command is at least 17 bytes, so this bounds the allocation by the buffer size.
    let n = r.len(buf.len() / 17 + 1)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(decode_command(&mut r)?);
    }
    r.finish()?;
    Ok(out)
}

/// Encodes a command result.
pub fn encode_result(w: &mut Writer, r: &Result<WriteResult, CommandError>) {
    match r {
        Ok(wr) => {
            w.u8(0);
            w.u64(wr.revision);
            w.bool(wr.succeeded);
            w.u64(wr.prev_revision);
        }
        Err(CommandError::DedupExpired { client, seq }) => {
            w.u8(1);
            w.u64(*client);
            w.u64(*seq);
        }
    }
}

/// Decodes a command result.
pub fn decode_result(r: &mut Reader<'_>) -> Result<Result<WriteResult, CommandError>, DecodeError> {
    Ok(match r.u8()? {
        0 => Ok(WriteResult {
            revision: r.u64()?,
            succeeded: r.bool()?,
            prev_revision: r.u64()?,
        }),
        1 => Err(CommandError::DedupExpired {
            client: r.u64()?,
            seq: r.u64()?,
        }),
        tag => {
            return Err(DecodeError::BadTag {
                what: "result",
                tag,
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: u64, seq: u64, k: &str, v: &str) -> Command {
        Command {
            client,
            seq,
            op: Op::Put {
                key: k.as_bytes().to_vec(),
                value: Bytes::copy_from_slice(v.as_bytes()),
            },
        }
    }

    #[test]
    fn put_get_delete_revisions() {
        let mut s = ShardState::new(Limits::default());
        let r1 = s.apply(1, &put(1, 1, "a/x", "1")).unwrap();
        assert_eq!((r1.revision, r1.prev_revision), (1, 0));
        let r2 = s.apply(2, &put(1, 2, "a/x", "2")).unwrap();
        assert_eq!((r2.revision, r2.prev_revision), (2, 1));
        let kv = s.get(b"a/x").unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
        let d = s
            .apply(
                3,
                &Command {
                    client: 1,
                    seq: 3,
                    op: Op::Delete {
                        key: b"a/x".to_vec(),
                    },
                },
            )
            .unwrap();
        assert!(d.succeeded);
        assert_eq!(d.revision, 3);
        let d2 = s
            .apply(
                4,
                &Command {
                    client: 1,
                    seq: 4,
                    op: Op::Delete {
                        key: b"a/x".to_vec(),
                    },
                },
            )
            .unwrap();
        assert!(!d2.succeeded);
        assert_eq!(d2.revision, 3, "no-op delete keeps the revision");
        assert_eq!(s.get(b"a/x"), None);
    }

    #[test]
    fn cas_variants() {
        let mut s = ShardState::new(Limits::default());
        let cas = |seq, expect, new: Option<&str>| Command {
            client: 9,
            seq,
            op: Op::Cas {
                key: b"k".to_vec(),
                expect,
                new: new.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            },
        };
        assert!(
            s.apply(1, &cas(1, Expect::Absent, Some("a")))
                .unwrap()
                .succeeded
        );
        assert!(
            !s.apply(2, &cas(2, Expect::Absent, Some("b")))
                .unwrap()
                .succeeded
        );
        assert!(
            !s.apply(
                3,
                &cas(3, Expect::Value(Bytes::from_static(b"zz")), Some("b"))
            )
            .unwrap()
            .succeeded
        );
        assert!(
            s.apply(
                4,
                &cas(4, Expect::Value(Bytes::from_static(b"a")), Some("b"))
            )
            .unwrap()
            .succeeded
        );
        let rev = s.get(b"k").unwrap().mod_revision;
        assert!(
            !s.apply(5, &cas(5, Expect::ModRevision(rev + 7), None))
                .unwrap()
                .succeeded
        );
        assert!(
            s.apply(6, &cas(6, Expect::ModRevision(rev), None))
                .unwrap()
                .succeeded
        );
        assert_eq!(s.get(b"k"), None);
    }

    #[test]
    fn retried_command_applies_once() {
        let mut s = ShardState::new(Limits::default());
        let c = put(5, 1, "k", "v");
        let a = s.apply(1, &c).unwrap();
        let b = s.apply(2, &c).unwrap();
        assert_eq!(a, b);
        assert_eq!(s.revision(), 1);
        assert_eq!(s.get(b"k").unwrap().version, 1);
    }

    #[test]
    fn dedup_window_is_bounded_and_expiry_is_reported() {
        let limits = Limits {
            dedup_per_client: 2,
            max_clients: 2,
            ..Limits::default()
        };
        let mut s = ShardState::new(limits);
        for seq in 1..=3 {
            s.apply(seq, &put(1, seq, "k", "v")).unwrap();
        }
        assert_eq!(
            s.apply(4, &put(1, 1, "k", "v")),
            Err(CommandError::DedupExpired { client: 1, seq: 1 })
        );
        // A third client evicts the least recently used session (client 2 here).
        s.apply(5, &put(2, 1, "k", "v")).unwrap();
        s.apply(6, &put(1, 4, "k", "v")).unwrap();
        s.apply(7, &put(3, 1, "k", "v")).unwrap();
        assert_eq!(s.sessions.len(), 2);
        assert!(s.sessions.contains_key(&1) && s.sessions.contains_key(&3));
    }

    #[test]
    fn watch_replay_and_compaction() {
        let limits = Limits {
            history_events: 3,
            ..Limits::default()
        };
        let mut s = ShardState::new(limits);
        for i in 1..=5u64 {
            let k = if i % 2 == 0 { "a/even" } else { "b/odd" };
            s.apply(i, &put(1, i, k, &i.to_string())).unwrap();
        }
        // Revisions 3,4,5 retained; 1 and 2 dropped.
        assert_eq!(s.events_after(b"", 1, 10), Err(Compacted { oldest: 2 }));
        let evs = s.events_after(b"", 2, 10).unwrap();
        assert_eq!(
            evs.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let evs = s.events_after(b"a/", 2, 10).unwrap();
        assert_eq!(evs.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![4]);
        assert!(s.events_after(b"", 5, 10).unwrap().is_empty());
    }

    #[test]
    fn range_bounds_and_limit() {
        let mut s = ShardState::new(Limits::default());
        for (i, k) in ["a/1", "a/2", "a/3", "b/1"].iter().enumerate() {
            s.apply(i as u64 + 1, &put(1, i as u64 + 1, k, "v"))
                .unwrap();
        }
        let (kvs, more) = s.range(b"a/", Some(b"a0"), 2);
        assert_eq!(kvs.len(), 2);
        assert!(more);
        let (kvs, more) = s.range(b"a/", Some(b"a0"), 10);
        assert_eq!(kvs.len(), 3);
        assert!(!more);
        assert!(s.range(b"b", Some(b"a"), 10).0.is_empty());
    }

    #[test]
    fn snapshot_round_trip_and_corruption() {
        let mut s = ShardState::new(Limits::default());
        for i in 1..=20u64 {
            s.apply(i, &put(i % 3, i, &format!("t/{}", i % 7), &i.to_string()))
                .unwrap();
        }
        let snap = s.encode_snapshot();
        let back = ShardState::decode_snapshot(Limits::default(), &snap).unwrap();
        assert_eq!(back, s);
        for cut in [1, snap.len() / 2, snap.len() - 1] {
            assert!(ShardState::decode_snapshot(Limits::default(), &snap[..cut]).is_err());
        }
    }

    #[test]
    fn validate_limits() {
        let limits = Limits {
            max_key: 4,
            max_value: 2,
            ..Limits::default()
        };
        let s = ShardState::new(limits);
        assert_eq!(
            s.validate(&Op::Delete { key: vec![] }),
            Err(ValidateError::EmptyKey)
        );
        assert!(matches!(
            s.validate(&Op::Delete { key: vec![1; 5] }),
            Err(ValidateError::KeyTooLarge { len: 5, max: 4 })
        ));
        assert!(matches!(
            s.validate(&Op::Put {
                key: vec![1],
                value: Bytes::from_static(b"abc")
            }),
            Err(ValidateError::ValueTooLarge { len: 3, max: 2 })
        ));
    }

    proptest::proptest! {
        /// Inline and heap keys order, compare and read back exactly like the byte strings they hold,
        /// including across the inline length boundary (the tree relies on it for ranges and lookups).
        #[test]
        fn keys_order_like_byte_slices(
            a in proptest::collection::vec(0u8..4, 0..30),
            b in proptest::collection::vec(0u8..4, 0..30),
        ) {
            let (ka, kb) = (Key::new(&a), Key::from(b.clone()));
            proptest::prop_assert_eq!(ka.as_slice(), &a[..]);
            proptest::prop_assert_eq!(kb.as_slice(), &b[..]);
            proptest::prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            proptest::prop_assert_eq!(ka == kb, a == b);
        }

        #[test]
        fn batch_codec_round_trips(ops in proptest::collection::vec((0u64..4, 0u8..3, proptest::collection::vec(0u8..255, 1..8)), 0..20)) {
            let cmds: Vec<Command> = ops.iter().enumerate().map(|(i, (c, kind, k))| Command {
                client: *c,
                seq: i as u64,
                op: match kind {
                    0 => Op::Put { key: k.clone(), value: Bytes::from(k.clone()) },
                    1 => Op::Delete { key: k.clone() },
                    _ => Op::Cas { key: k.clone(), expect: Expect::ModRevision(*c), new: None },
                },
            }).collect();
            let buf = encode_batch(&cmds);
            proptest::prop_assert_eq!(decode_batch(&buf).unwrap(), cmds);
        }

        #[test]
        fn batch_decoder_never_panics(buf in proptest::collection::vec(0u8..255, 0..200)) {
            let _ = decode_batch(&buf);
        }
    }
}
