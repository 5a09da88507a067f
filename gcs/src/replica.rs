//! [`Replica`]: one Raft replica of one shard, driving raft-rs's `RawNode` over [`DiskStorage`] and applying
//! committed commands to a [`ShardState`].
//!
//! It is "sans-IO-ish": it reads no clock and touches no network. Time enters only as [`Replica::tick`];
//! messages enter through [`Replica::step`] and leave through [`Replica::take_messages`] (each carries its
//! destination replica id in `to`), so the driver only has to move opaque messages between replicas. The one
//! I/O it does perform is its own storage (the Ready loop must persist before it sends).
//!
//! # The Ready loop ([`Replica::handle_ready`])
//! 1. Buffered client commands become **one** Raft entry (batching: many commands per entry, one fsync for
//!    everything a loop iteration appended); buffered reads become one ReadIndex request.
//! 2. Messages that need no persistence (a leader's appends) go to the outbox at once.
//! 3. A received snapshot is installed; committed entries are applied and their proposers completed.
//!    With [`Replica::handle_ready_with`] the outbox and the completions so far are handed to the driver
//!    here, before the fsync, so the followers' fsyncs overlap the leader's and answers do not wait for it.
//! 4. New entries and the hard state are appended and synced (one `fdatasync`; a hard state whose only
//!    change is the commit index rides along with entries and never costs a sync of its own).
//! 5. Messages that must follow persistence (votes, append responses) go to the outbox.
//! 6. `advance`, then the light ready's commits are applied the same way.
//! 7. Reads whose ReadIndex has been applied are answered from local state (linearizable).
//! 8. Every [`ReplicaConfig::snapshot_entries`] applied entries the state is snapshotted and the log compacted.
//!
//! # Completions
//! # Membership changes
//! [`Replica::change_membership`] proposes one [`MemberChange`] (add a learner, promote a learner, remove a
//! member) as a Raft conf-change entry, on the leader only and only while no other change is in flight, so
//! the group moves one member at a time and never needs joint consensus. A change takes effect on each replica
//! when its entry applies (`apply_conf_change`); the resulting voters and learners are what this replica
//! reports in [`Replica::conf_state`] and what every later local snapshot records, so a restart from disk
//! (snapshot, then the log after it, conf changes included) rebuilds the same membership. A replica created
//! with no voters (a member joining a running group) waits for the leader to send it the log or a snapshot.
//!
//! Writes are tracked by `(client, seq)` and the term they were proposed in. When this replica stops being
//! leader, or leads again in a later term, every pending write of an earlier term completes with
//! [`ReplicaError::LeadershipLost`]: the outcome is unknown and the client retries
//! with the *same* seq, which the shard's dedup table makes exactly-once.

use std::collections::BTreeMap;
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message,
    MessageType,
};
use raft::{Config, RawNode, SnapshotStatus, StateRole};

use crate::shard::{
    Command, CommandError, KeyValue, Limits, ShardState, ValidateError, WriteResult, decode_batch,
    encode_batch,
};
use crate::storage::DiskStorage;
use crate::wal::{StorageError, WalConfig};

/// A caller-chosen id that comes back with a request's [`Completion`].
pub type Token = u64;

/// Settings of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's Raft id (non-zero, unique within the shard).
    pub id: u64,
    /// The voters a new directory starts with: this replica alone for the first member of a group, none for a
    /// member joining a running group (it learns the membership from the leader's log or snapshot). An
    /// existing directory keeps the membership it holds.
    pub peers: Vec<u64>,
    /// Ticks without a leader before an election (default 10).
    pub election_tick: usize,
    /// Ticks between leader heartbeats (default 2).
    pub heartbeat_tick: usize,
    /// Most commands batched into one Raft entry (default 1024).
    pub max_batch_cmds: usize,
    /// Most payload bytes batched into one Raft entry (default 4 MiB).
    pub max_batch_bytes: usize,
    /// Most writes plus reads awaiting completion; beyond it requests fail with [`ReplicaError::Busy`]
    /// (default 65 536).
    pub max_pending: usize,
    /// Snapshot and compact the log every this many applied entries (default 10 000).
    pub snapshot_entries: u64,
    /// ... or once the log held in memory since the last snapshot exceeds this many bytes (default 256 MiB).
    pub snapshot_log_bytes: usize,
    /// Shard limits (must be equal on every replica).
    pub limits: Limits,
    /// How the WAL writes.
    pub wal: WalConfig,
}

impl ReplicaConfig {
    /// Defaults for replica `id` of a shard with voters `peers`.
    pub fn new(id: u64, peers: Vec<u64>) -> Self {
        ReplicaConfig {
            id,
            peers,
            election_tick: 10,
            heartbeat_tick: 2,
            max_batch_cmds: 1024,
            max_batch_bytes: 4 << 20,
            max_pending: 65_536,
            snapshot_entries: 10_000,
            snapshot_log_bytes: 256 << 20,
            limits: Limits::default(),
            wal: WalConfig::default(),
        }
    }
}

/// A linearizable read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// One key.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Keys in `[start, end)`, at most `limit`.
    Range {
        /// First key.
        start: Vec<u8>,
        /// End (exclusive); `None` for no bound.
        end: Option<Vec<u8>>,
        /// Most keys.
        limit: usize,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A write applied (or was found already applied).
    Write(WriteResult),
    /// A get's answer and the shard revision it was read at.
    Get {
        /// The value, if any.
        kv: Option<KeyValue>,
        /// The shard's revision at the read.
        revision: u64,
    },
    /// A range's answer.
    Range {
        /// Keys found.
        kvs: Vec<KeyValue>,
        /// Whether `limit` cut the answer short.
        more: bool,
        /// The shard's revision at the read.
        revision: u64,
    },
}

/// Why a request to a replica failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// This replica is not the leader; the write was not proposed. Retry at `leader` (a replica id) if known.
    #[error("not leader (leader hint {leader:?})")]
    NotLeader {
        /// The leader this replica believes in, if any.
        leader: Option<u64>,
    },
    /// Leadership changed while the write was in flight; it may or may not have applied. Retry with the same
    /// `(client, seq)`: the dedup table makes the retry safe.
    #[error("leadership lost while the request was in flight (leader hint {leader:?})")]
    LeadershipLost {
        /// The new leader, if known.
        leader: Option<u64>,
    },
    /// The command breaks a limit; retrying will not help.
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    /// The command applied deterministically as an error (see [`CommandError`]).
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Too many requests are pending on this replica; back off and retry.
    #[error("replica busy: {pending} requests pending")]
    Busy {
        /// How many were pending.
        pending: usize,
    },
    /// The replica's storage failed and it has stopped.
    #[error("replica storage failed: {0}")]
    Stopped(String),
    /// Another membership change is still in flight (proposed, not yet applied); retry once it has applied.
    #[error("a membership change is already in flight")]
    ChangePending,
    /// The membership change does not fit the current membership (see the message); retrying will not help
    /// until the membership is different.
    #[error("membership change refused: {0}")]
    BadChange(String),
}

/// One membership change of a shard's Raft group. Changes go one at a time (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    /// Adds a member that receives the log but does not vote (yet).
    AddLearner(u64),
    /// Makes a learner a voter (it should have caught up first, or commits wait for it).
    Promote(u64),
    /// Removes a voter or learner. The last voter cannot be removed.
    Remove(u64),
    /// Not a membership change: asks the leader to hand its leadership to this voter (raft-rs's leadership
    /// transfer; the voter takes over once its log has caught up, and nothing changes if it never does).
    TransferLeader(u64),
}

impl MemberChange {
    /// The member it changes.
    pub fn member(&self) -> u64 {
        match *self {
            MemberChange::AddLearner(m)
            | MemberChange::Promote(m)
            | MemberChange::Remove(m)
            | MemberChange::TransferLeader(m) => m,
        }
    }
}

/// One finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The token given with the request.
    pub token: Token,
    /// Its outcome.
    pub result: Result<Reply, ReplicaError>,
}

/// Why a replica could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaFatal {
    /// Its storage failed (see [`StorageError`]).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// raft-rs refused the configuration or state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A snapshot's state-machine bytes did not decode.
    #[error("snapshot state does not decode: {0}")]
    BadSnapshot(#[from] crate::codec::DecodeError),
}

/// One replica. See the module docs.
pub struct Replica {
    cfg: ReplicaConfig,
    raw: RawNode<DiskStorage>,
    state: ShardState,
    batch: Vec<Command>,
    batch_bytes: usize,
    /// Writes awaiting apply, by `(client, seq)`, with the term they were proposed in.
    pending_writes: BTreeMap<(u64, u64), (u64, Tokens)>,
    /// Reads not yet sent as a ReadIndex request.
    reads_unsent: Vec<(Token, Query)>,
    /// Reads whose ReadIndex request is out, by request context, with the term it was sent in.
    reads_in_flight: BTreeMap<u64, (u64, Vec<(Token, Query)>)>,
    /// Reads whose read index is known; served once applied reaches it.
    reads_ready: Vec<(u64, Vec<(Token, Query)>)>,
    next_read_ctx: u64,
    outbox: Vec<Message>,
    /// Peers a snapshot was handed over to early in this loop, reported sent at its end.
    snapshots_sent: Vec<u64>,
    completions: Vec<Completion>,
    /// Set when an apply advanced the revision since the driver last looked.
    revision_advanced: bool,
    stopped: Option<String>,
    /// The membership as of the applied index: the latest snapshot's, then every conf change applied since.
    /// Local snapshots record it, so it is durable with them (and in the log before them).
    conf_state: ConfState,
    /// Set when a membership change applied: the next snapshot is taken at once, so the leader has one that
    /// names a member just added (a replica refuses a snapshot whose membership lacks it).
    snapshot_soon: bool,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.cfg.id)
            .field("term", &self.raw.raft.term)
            .field("role", &self.raw.raft.state)
            .field("applied", &self.state.applied_index())
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Opens (or creates) the replica stored in `dir` and restores its state from the latest snapshot.
    /// Committed entries after the snapshot are re-applied by the following Ready loops.
    pub fn open(
        cfg: ReplicaConfig,
        dir: &Path,
        logger: &slog::Logger,
    ) -> Result<Self, ReplicaFatal> {
        let storage = DiskStorage::open(dir, cfg.wal.clone(), &cfg.peers)?;
        let snap = storage.latest_snapshot();
        let applied = snap.get_metadata().index;
        let conf_state = snap.get_metadata().get_conf_state().clone();
        let state = ShardState::decode_snapshot(cfg.limits.clone(), snap.get_data())?;
        let rcfg = Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Config::default()
        };
        let raw = RawNode::new(&rcfg, storage, logger)?;
        Ok(Replica {
            cfg,
            raw,
            state,
            batch: Vec::new(),
            batch_bytes: 0,
            pending_writes: BTreeMap::new(),
            reads_unsent: Vec::new(),
            reads_in_flight: BTreeMap::new(),
            reads_ready: Vec::new(),
            next_read_ctx: 1,
            outbox: Vec::new(),
            snapshots_sent: Vec::new(),
            completions: Vec::new(),
            revision_advanced: false,
            stopped: None,
            conf_state,
            snapshot_soon: false,
        })
    }

    /// The voters and learners as of the applied index.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The highest log index known to be replicated on `member`, as this replica tracks it (meaningful on
    /// the leader only; `None` for a member outside the group).
    pub fn matched(&self, member: u64) -> Option<u64> {
        self.raw.raft.prs().get(member).map(|p| p.matched)
    }

    /// Proposes one membership change. It returns once proposed, not applied: the change takes effect when
    /// its entry applies, visible in [`Replica::conf_state`]. Refused on a follower
    /// ([`ReplicaError::NotLeader`]), while another change is in flight ([`ReplicaError::ChangePending`]),
    /// and when it does not fit the current membership ([`ReplicaError::BadChange`]).
    pub fn change_membership(&mut self, change: MemberChange) -> Result<(), ReplicaError> {
        if let Some(why) = &self.stopped {
            return Err(ReplicaError::Stopped(why.clone()));
        }
        if !self.is_leader() {
            return Err(ReplicaError::NotLeader {
                leader: self.leader(),
            });
        }
        if let MemberChange::TransferLeader(m) = change {
            if m == self.cfg.id || !self.conf_state.voters.contains(&m) {
                return Err(ReplicaError::BadChange(format!(
                    "member {m} is not another voter"
                )));
            }
            self.raw.transfer_leader(m);
            return Ok(());
        }
        // raft-rs would turn a second change into an empty entry without saying so; refuse it visibly.
        if self.raw.raft.has_pending_conf() {
            return Err(ReplicaError::ChangePending);
        }
        let cs = &self.conf_state;
        let voter = |m: u64| cs.voters.contains(&m);
        let learner = |m: u64| cs.learners.contains(&m);
        let bad = |why: String| Err(ReplicaError::BadChange(why));
        let (kind, m) = match change {
            MemberChange::AddLearner(0) | MemberChange::Promote(0) | MemberChange::Remove(0) => {
                return bad("member id 0".into());
            }
            MemberChange::TransferLeader(_) => unreachable!("handled above"),
            MemberChange::AddLearner(m) => {
                if voter(m) || learner(m) {
                    return bad(format!("member {m} is already in the group"));
                }
                (ConfChangeType::AddLearnerNode, m)
            }
            MemberChange::Promote(m) => {
                if !learner(m) {
                    return bad(format!("member {m} is not a learner"));
                }
                (ConfChangeType::AddNode, m)
            }
            MemberChange::Remove(m) => {
                if !voter(m) && !learner(m) {
                    return bad(format!("member {m} is not in the group"));
                }
                if voter(m) && cs.voters.len() == 1 {
                    return bad(format!("member {m} is the last voter"));
                }
                (ConfChangeType::RemoveNode, m)
            }
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = m;
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        self.raw.propose_conf_change(Vec::new(), cc).map_err(|e| {
            tracing::debug!(replica = self.cfg.id, cause = %e, "membership change dropped");
            ReplicaError::NotLeader {
                leader: self.leader(),
            }
        })
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// Whether this replica is currently the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<u64> {
        match self.raw.raft.leader_id {
            0 => None,
            id => Some(id),
        }
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The applied state (for watches and tests; reads that must be linearizable go through [`Replica::read`]).
    pub fn state(&self) -> &ShardState {
        &self.state
    }

    /// The storage (for tests).
    pub fn storage(&self) -> &DiskStorage {
        self.raw.store()
    }

    /// Whether the storage failed and the replica stopped.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Starts an election now (tests and embedded single-replica start-up use it to skip the timeout).
    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
    }

    /// Feeds a message from another replica. Messages for another replica or malformed ones are dropped.
    pub fn step(&mut self, msg: Message) {
        if msg.to != self.cfg.id {
            return;
        }
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(replica = self.cfg.id, cause = %e, "dropped raft message");
        }
    }

    fn pending(&self) -> usize {
        self.pending_writes.len()
            + self.reads_unsent.len()
            + self
                .reads_in_flight
                .values()
                .map(|(_, v)| v.len())
                .sum::<usize>()
            + self.reads_ready.iter().map(|(_, v)| v.len()).sum::<usize>()
    }

    fn refuse(&mut self, token: Token, err: ReplicaError) {
        self.completions.push(Completion {
            token,
            result: Err(err),
        });
    }

    /// Submits a write. It completes (see [`Replica::take_completions`]) once applied, or with an error.
    pub fn propose(&mut self, token: Token, cmd: Command) {
        if let Some(why) = &self.stopped {
            let e = ReplicaError::Stopped(why.clone());
            return self.refuse(token, e);
        }
        if !self.is_leader() {
            let e = ReplicaError::NotLeader {
                leader: self.leader(),
            };
            return self.refuse(token, e);
        }
        if let Err(e) = self.state.validate(&cmd.op) {
            return self.refuse(token, e.into());
        }
        let pending = self.pending();
        if pending >= self.cfg.max_pending {
            return self.refuse(token, ReplicaError::Busy { pending });
        }
        let term = self.raw.raft.term;
        match self.pending_writes.entry((cmd.client, cmd.seq)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((term, Tokens::one(token)));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let e = o.get_mut();
                e.0 = term;
                e.1.more.push(token);
            }
        }
        self.batch_bytes += cmd.op.key().len() + 64 + op_value_len(&cmd);
        self.batch.push(cmd);
        if self.batch.len() >= self.cfg.max_batch_cmds
            || self.batch_bytes >= self.cfg.max_batch_bytes
        {
            self.flush_batch();
        }
    }

    /// Submits a linearizable read, answered after a ReadIndex round confirms leadership.
    pub fn read(&mut self, token: Token, query: Query) {
        if let Some(why) = &self.stopped {
            let e = ReplicaError::Stopped(why.clone());
            return self.refuse(token, e);
        }
        if !self.is_leader() {
            let e = ReplicaError::NotLeader {
                leader: self.leader(),
            };
            return self.refuse(token, e);
        }
        let pending = self.pending();
        if pending >= self.cfg.max_pending {
            return self.refuse(token, ReplicaError::Busy { pending });
        }
        self.reads_unsent.push((token, query));
    }

    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let cmds = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let data = encode_batch(&cmds);
        if let Err(e) = self.raw.propose(Vec::new(), data) {
            tracing::debug!(replica = self.cfg.id, cause = %e, "proposal dropped");
            let leader = self.leader();
            for c in cmds {
                if let Some((_, tokens)) = self.pending_writes.remove(&(c.client, c.seq)) {
                    for t in tokens {
                        self.refuse(t, ReplicaError::NotLeader { leader });
                    }
                }
            }
        }
    }

    fn flush_reads(&mut self) {
        if self.reads_unsent.is_empty() {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        let reads = std::mem::take(&mut self.reads_unsent);
        self.reads_in_flight
            .insert(ctx, (self.raw.raft.term, reads));
        self.raw.read_index(ctx.to_le_bytes().to_vec());
    }

    /// Runs the Ready loop once (see the module docs). Call after any tick, step, propose or read.
    pub fn handle_ready(&mut self) {
        self.handle_ready_with(|_, _| {});
    }

    /// [`Replica::handle_ready`], but hands what may leave before this loop's fsync to `early` as soon as it
    /// is known: the leader's appends (Raft lets a leader send them before its own log is durable; it counts
    /// itself toward a quorum only once it is) and the completions of entries that just applied (committed
    /// means already durable on a quorum, so answering does not have to wait for this replica's next fsync).
    /// Without this a write's round trip would hold the leader's fsync, then the followers', then one more
    /// of the leader's in series; with it, the leader's and the followers' fsyncs overlap.
    /// `early` may be called zero or more times; whatever it is not handed comes out of
    /// [`Replica::take_messages`] and [`Replica::take_completions`] afterwards, as before.
    pub fn handle_ready_with(
        &mut self,
        early: impl FnMut(&mut Vec<Message>, &mut Vec<Completion>),
    ) {
        if self.stopped.is_some() {
            return;
        }
        if let Err(e) = self.ready_inner(early) {
            tracing::error!(replica = self.cfg.id, cause = %e, "replica stopped");
            let why = e.to_string();
            self.stopped = Some(why.clone());
            self.fail_all(|_| ReplicaError::Stopped(why.clone()));
        }
    }

    fn ready_inner(
        &mut self,
        mut early: impl FnMut(&mut Vec<Message>, &mut Vec<Completion>),
    ) -> Result<(), ReplicaFatal> {
        self.flush_batch();
        self.flush_reads();
        if self.raw.has_ready() {
            let mut rd = self.raw.ready();
            if !rd.messages().is_empty() {
                self.outbox.extend(rd.take_messages());
            }
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                let state = ShardState::decode_snapshot(self.cfg.limits.clone(), snap.get_data())?;
                let conf = snap.get_metadata().get_conf_state().clone();
                self.raw.mut_store().apply_snapshot(snap)?;
                self.state = state;
                self.conf_state = conf;
                self.revision_advanced = true;
            }
            let committed = rd.take_committed_entries();
            self.apply_entries(committed);
            // Hand over the appends and the completions before the fsync below (see handle_ready_with).
            // A snapshot leaving now is still reported once this loop is done.
            self.snapshots_sent.extend(
                self.outbox
                    .iter()
                    .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                    .map(|m| m.to),
            );
            if !self.outbox.is_empty() || !self.completions.is_empty() {
                early(&mut self.outbox, &mut self.completions);
            }
            if !rd.entries().is_empty() {
                self.raw.mut_store().append(rd.entries())?;
            }
            if let Some(hs) = rd.hs() {
                let hs = hs.clone();
                self.raw.mut_store().set_hard_state(&hs);
            }
            self.raw.mut_store().sync()?;
            for rs in rd.take_read_states() {
                let ctx = read_ctx(&rs.request_ctx);
                if let Some((_, reads)) = ctx.and_then(|c| self.reads_in_flight.remove(&c)) {
                    self.reads_ready.push((rs.index, reads));
                }
            }
            if !rd.persisted_messages().is_empty() {
                self.outbox.extend(rd.take_persisted_messages());
            }
            let mut light = self.raw.advance(rd);
            if let Some(c) = light.commit_index() {
                self.raw.mut_store().set_commit(c);
            }
            self.outbox.extend(light.take_messages());
            let committed = light.take_committed_entries();
            self.apply_entries(committed);
            self.raw.advance_apply();
            // The commit index from the light ready is written lazily with the next sync; that is safe
            // because commit can always be re-learned from the leader.
        }
        self.report_snapshots_sent();
        self.serve_reads();
        self.maybe_snapshot()?;
        self.check_leadership();
        Ok(())
    }

    /// raft-rs holds a follower in "snapshot" state until the snapshot is reported. The network may drop it
    /// silently, so report it finished as soon as it is handed to the driver: the leader then probes, and if
    /// the snapshot was lost the probe is rejected and a fresh snapshot goes out (costs a resend, never safety).
    fn report_snapshots_sent(&mut self) {
        let mut targets = std::mem::take(&mut self.snapshots_sent);
        targets.extend(
            self.outbox
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .map(|m| m.to),
        );
        targets.sort_unstable();
        targets.dedup();
        for to in targets {
            self.raw.report_snapshot(to, SnapshotStatus::Finish);
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&e);
                    self.state.apply_noop(e.index);
                    continue;
                }
                EntryType::EntryNormal if !e.data.is_empty() => {}
                EntryType::EntryNormal => {
                    // Empty entries are new leaders' no-ops.
                    self.state.apply_noop(e.index);
                    continue;
                }
            }
            let cmds = match decode_batch(&e.data) {
                Ok(c) => c,
                Err(err) => {
                    // Deterministic on every replica, so skipping keeps them identical.
                    tracing::error!(replica = self.cfg.id, index = e.index, cause = %err, "undecodable entry skipped");
                    self.state.apply_noop(e.index);
                    continue;
                }
            };
            for c in &cmds {
                let res = self.state.apply(e.index, c);
                if let Some((_, tokens)) = self.pending_writes.remove(&(c.client, c.seq)) {
                    for t in tokens {
                        self.completions.push(Completion {
                            token: t,
                            result: res.clone().map(Reply::Write).map_err(ReplicaError::from),
                        });
                    }
                }
            }
            self.state.apply_noop(e.index);
            self.revision_advanced = true;
        }
    }

    /// Applies a committed conf-change entry. The entry is the same on every replica, so a change that fails
    /// to decode or apply fails the same way everywhere and is skipped everywhere.
    fn apply_conf_change(&mut self, e: &Entry) {
        // We propose only V2; V1 is accepted too, since both are valid Raft entries.
        let applied = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            ConfChangeV2::parse_from_bytes(&e.data)
                .map_err(|err| err.to_string())
                .and_then(|cc| {
                    self.raw
                        .apply_conf_change(&cc)
                        .map_err(|err| err.to_string())
                })
        } else {
            raft::prelude::ConfChange::parse_from_bytes(&e.data)
                .map_err(|err| err.to_string())
                .and_then(|cc| {
                    self.raw
                        .apply_conf_change(&cc)
                        .map_err(|err| err.to_string())
                })
        };
        match applied {
            Ok(cs) => {
                tracing::info!(replica = self.cfg.id, index = e.index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                self.conf_state = cs;
                self.snapshot_soon = true;
            }
            Err(why) => {
                tracing::error!(replica = self.cfg.id, index = e.index, cause = %why, "membership change skipped")
            }
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.state.applied_index();
        let mut i = 0;
        while i < self.reads_ready.len() {
            if self.reads_ready[i].0 <= applied {
                let (_, reads) = self.reads_ready.swap_remove(i);
                for (token, q) in reads {
                    let result = Ok(self.answer(&q));
                    self.completions.push(Completion { token, result });
                }
            } else {
                i += 1;
            }
        }
    }

    fn answer(&self, q: &Query) -> Reply {
        let revision = self.state.revision();
        match q {
            Query::Get { key } => Reply::Get {
                kv: self.state.get(key),
                revision,
            },
            Query::Range { start, end, limit } => {
                let (kvs, more) = self.state.range(start, end.as_deref(), *limit);
                Reply::Range {
                    kvs,
                    more,
                    revision,
                }
            }
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), ReplicaFatal> {
        let applied = self.state.applied_index();
        let snap_index = self.raw.store().latest_snapshot().get_metadata().index;
        let by_count = applied >= snap_index + self.cfg.snapshot_entries.max(1);
        let by_bytes =
            applied > snap_index && self.raw.store().log_bytes() > self.cfg.snapshot_log_bytes;
        let by_change = std::mem::take(&mut self.snapshot_soon) && applied > snap_index;
        if by_count || by_bytes || by_change {
            let data = self.state.encode_snapshot();
            // The membership recorded is the one in force at `applied`, the snapshot's index.
            let conf = self.conf_state.clone();
            self.raw.mut_store().compact(applied, data, conf)?;
        }
        Ok(())
    }

    fn check_leadership(&mut self) {
        let term = self.raw.raft.term;
        if self.is_leader() {
            // Still (or again) leader: requests from an earlier term of ours may have been overwritten by
            // another leader in between and would otherwise wait forever.
            let leader = self.leader();
            let stale: Vec<(u64, u64)> = self
                .pending_writes
                .iter()
                .filter(|(_, (t, _))| *t != term)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some((_, tokens)) = self.pending_writes.remove(&k) {
                    for token in tokens {
                        self.refuse(token, ReplicaError::LeadershipLost { leader });
                    }
                }
            }
            let stale: Vec<u64> = self
                .reads_in_flight
                .iter()
                .filter(|(_, (t, _))| *t != term)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some((_, reads)) = self.reads_in_flight.remove(&k) {
                    for (token, _) in reads {
                        self.refuse(token, ReplicaError::NotLeader { leader });
                    }
                }
            }
            return;
        }
        if self.pending() > 0 || !self.batch.is_empty() {
            let leader = self.leader();
            self.batch.clear();
            self.batch_bytes = 0;
            self.fail_all(|write| {
                if write {
                    ReplicaError::LeadershipLost { leader }
                } else {
                    ReplicaError::NotLeader { leader }
                }
            });
        }
    }

    fn fail_all(&mut self, err: impl Fn(bool) -> ReplicaError) {
        for (_, (_, tokens)) in std::mem::take(&mut self.pending_writes) {
            for token in tokens {
                self.completions.push(Completion {
                    token,
                    result: Err(err(true)),
                });
            }
        }
        let reads = std::mem::take(&mut self.reads_unsent)
            .into_iter()
            .chain(
                std::mem::take(&mut self.reads_in_flight)
                    .into_values()
                    .flat_map(|(_, v)| v),
            )
            .chain(self.reads_ready.drain(..).flat_map(|(_, v)| v))
            .collect::<Vec<_>>();
        for (token, _) in reads {
            self.completions.push(Completion {
                token,
                result: Err(err(false)),
            });
        }
    }

    /// Messages to send, each addressed by its `to` field. Sending may drop or reorder them: Raft copes.
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    /// Finished requests since the last call.
    pub fn take_completions(&mut self) -> Vec<Completion> {
        std::mem::take(&mut self.completions)
    }

    /// Whether the revision advanced since the last call (so watch waiters should be re-checked).
    pub fn take_revision_advanced(&mut self) -> bool {
        std::mem::take(&mut self.revision_advanced)
    }
}

/// The callers waiting on one `(client, seq)`: nearly always exactly one, so it is held inline and the
/// per-write path allocates nothing here (a retry racing its original adds to `more`).
#[derive(Debug)]
struct Tokens {
    first: Token,
    more: Vec<Token>,
}

impl Tokens {
    fn one(first: Token) -> Self {
        Tokens {
            first,
            more: Vec::new(),
        }
    }
}

impl IntoIterator for Tokens {
    type Item = Token;
    type IntoIter = std::iter::Chain<std::iter::Once<Token>, std::vec::IntoIter<Token>>;
    fn into_iter(self) -> Self::IntoIter {
        std::iter::once(self.first).chain(self.more)
    }
}

fn op_value_len(c: &Command) -> usize {
    match &c.op {
        crate::shard::Op::Put { value, .. } => value.len(),
        crate::shard::Op::Cas { new, .. } => new.as_ref().map_or(0, |v| v.len()),
        crate::shard::Op::Delete { .. } => 0,
    }
}

fn read_ctx(ctx: &[u8]) -> Option<u64> {
    let a: [u8; 8] = ctx.try_into().ok()?;
    Some(u64::from_le_bytes(a))
}

/// A `slog` logger that forwards raft-rs's log lines into `tracing` (at debug level, since raft-rs is chatty).
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(
        &self,
        record: &slog::Record<'_>,
        _values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::warn!(target: "raft", "{}", record.msg())
            }
            _ => tracing::trace!(target: "raft", "{}", record.msg()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Op;
    use bytes::Bytes;

    fn single(dir: &Path) -> Replica {
        let mut cfg = ReplicaConfig::new(1, vec![1]);
        cfg.wal.fsync = false;
        cfg.snapshot_entries = 5;
        Replica::open(cfg, dir, &raft_logger()).unwrap()
    }

    fn put(seq: u64, k: &str, v: &str) -> Command {
        Command {
            client: 7,
            seq,
            op: Op::Put {
                key: k.as_bytes().to_vec(),
                value: Bytes::copy_from_slice(v.as_bytes()),
            },
        }
    }

    fn settle(r: &mut Replica) -> Vec<Completion> {
        let mut out = Vec::new();
        for _ in 0..5 {
            r.handle_ready();
            out.extend(r.take_completions());
        }
        out
    }

    #[test]
    fn single_replica_writes_reads_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = single(dir.path());
            r.propose(1, put(1, "a/x", "0"));
            let c = r.take_completions();
            assert!(matches!(
                c[0].result,
                Err(ReplicaError::NotLeader { leader: None })
            ));
            r.campaign();
            settle(&mut r);
            assert!(r.is_leader());
            // Six writes in one loop iteration become one entry; six more go one entry each.
            for i in 1..=6 {
                r.propose(i, put(i, "a/x", &i.to_string()));
            }
            let mut done = settle(&mut r);
            let index_after_batch = r.state().applied_index();
            for i in 7..=12 {
                r.propose(i, put(i, "a/x", &i.to_string()));
                done.extend(settle(&mut r));
            }
            assert_eq!(r.state().applied_index(), index_after_batch + 6);
            assert_eq!(done.len(), 12, "{done:?}");
            assert!(done.iter().all(|c| matches!(c.result, Ok(Reply::Write(_)))));
            r.read(
                100,
                Query::Get {
                    key: b"a/x".to_vec(),
                },
            );
            let done = settle(&mut r);
            match &done[0].result {
                Ok(Reply::Get {
                    kv: Some(kv),
                    revision,
                }) => {
                    assert_eq!(&kv.value[..], b"12");
                    assert_eq!(*revision, 12);
                }
                other => panic!("{other:?}"),
            }
            assert!(
                r.storage().latest_snapshot().get_metadata().index >= 5,
                "snapshotted"
            );
        }
        let mut r = single(dir.path());
        r.campaign();
        settle(&mut r);
        assert_eq!(
            r.state().get(b"a/x").unwrap().value,
            Bytes::from_static(b"12")
        );
        // The retried seq 12 is answered from the dedup table, not re-applied.
        r.propose(1, put(12, "a/x", "12"));
        let done = settle(&mut r);
        assert!(matches!(done[0].result, Ok(Reply::Write(w)) if w.revision == 12));
        assert_eq!(r.state().revision(), 12);
    }

    #[test]
    fn invalid_and_busy_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = single(dir.path());
        r.campaign();
        settle(&mut r);
        r.propose(1, put(1, "", "v"));
        assert!(matches!(
            r.take_completions()[0].result,
            Err(ReplicaError::Invalid(ValidateError::EmptyKey))
        ));
        r.cfg.max_pending = 2;
        r.propose(2, put(2, "k", "v"));
        r.propose(3, put(3, "k", "v"));
        r.propose(4, put(4, "k", "v"));
        assert!(matches!(
            r.take_completions()[0].result,
            Err(ReplicaError::Busy { .. })
        ));
    }
}
