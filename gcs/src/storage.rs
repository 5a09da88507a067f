//! [`DiskStorage`]: raft-rs's [`raft::Storage`] over the crash-safe [`crate::wal::Wal`] plus an atomically
//! replaced snapshot file.
//!
//! Layout of a replica directory:
//! - `snapshot`: the latest snapshot (`OXSN`, `len: u32`, `crc32: u32`, protobuf `Snapshot`), replaced by
//!   write-temp, fsync, rename, fsync-dir, so a crash leaves either the old or the new one, never a mix
//!   (the syncs are skipped only with `WalConfig::fsync = false`).
//! - `wal/NNN.wal`: segments holding two kinds of records: a batch of entries, and a hard state.
//!
//! The hard state is a WAL record written in the same sync as the entries of the same `Ready`, so one
//! `fdatasync` makes both durable (three syncs per `Ready` with a separate renamed file would triple the
//! write latency; the record is just as atomic thanks to its CRC). Each new segment starts with the
//! current hard state, so purging old segments never loses it.
//!
//! Replay rebuilds the in-memory log: the snapshot, then every record in order, where an entry at index `i`
//! replaces any entry at `i` or later (Raft's conflict truncation), and entries covered by the snapshot are
//! skipped. All entries since the last snapshot live in memory; the replica bounds that by snapshotting
//! every [`crate::replica::ReplicaConfig::snapshot_entries`] entries or
//! [`crate::replica::ReplicaConfig::snapshot_log_bytes`] bytes, whichever comes first.
//!
//! Membership: a new directory starts with the voters given at first open (none for a member joining a running
//! group). After that the membership is the snapshot's conf state plus the conf-change entries in the log after
//! it, which the replica re-applies on start; each local snapshot records the membership at its index.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};

use crate::codec::{Reader, Writer};
use crate::wal::{StorageError, Wal, WalConfig, sync_dir};

const REC_ENTRIES: u8 = 1;
const REC_HARD_STATE: u8 = 2;
const SNAP_MAGIC: &[u8; 4] = b"OXSN";

/// Durable Raft storage for one replica of one shard. See the module docs.
#[derive(Debug)]
pub struct DiskStorage {
    dir: PathBuf,
    wal: Wal,
    hard: HardState,
    /// Whether `hard`'s term or vote changed since it was last written to the WAL (must be synced).
    hard_dirty: bool,
    /// Whether only `hard.commit` changed since (written with the next entries, see `set_commit`).
    commit_dirty: bool,
    snapshot: Snapshot,
    /// Entries after the snapshot: `entries[0].index == snapshot index + 1`.
    entries: Vec<Entry>,
    /// Payload bytes held in `entries` (the replica snapshots when this grows too large).
    entries_bytes: usize,
}

impl DiskStorage {
    /// Opens the replica directory `dir`, creating it with `voters` as the membership if it is new.
    ///
    /// Fails on a corrupt snapshot or a WAL record damaged before its tail.
    pub fn open(dir: &Path, cfg: WalConfig, voters: &[u64]) -> Result<Self, StorageError> {
        fs::create_dir_all(dir).map_err(StorageError::io("create dir", dir))?;
        let snap_path = dir.join("snapshot");
        let wal_dir = dir.join("wal");
        let fresh = !snap_path.exists() && !wal_dir.exists();
        let snapshot = if fresh {
            let mut s = Snapshot::default();
            s.mut_metadata().mut_conf_state().voters = voters.to_vec();
            write_snapshot_file(dir, &s, cfg.fsync)?;
            s
        } else {
            read_snapshot_file(&snap_path)?
        };
        let (wal, records) = Wal::open(&wal_dir, cfg.clone())?;
        let mut st = DiskStorage {
            dir: dir.to_path_buf(),
            wal,
            hard: HardState::default(),
            hard_dirty: false,
            commit_dirty: false,
            snapshot,
            entries: Vec::new(),
            entries_bytes: 0,
        };
        for rec in records {
            st.replay(rec.segment, &rec.payload)?;
        }
        let snap_index = st.snapshot.get_metadata().index;
        let snap_term = st.snapshot.get_metadata().term;
        st.hard.term = st.hard.term.max(snap_term);
        st.hard.commit = st.hard.commit.max(snap_index).min(st.last());
        Ok(st)
    }

    fn replay(&mut self, segment: u64, payload: &[u8]) -> Result<(), StorageError> {
        let seg_path = self.dir.join("wal").join(format!("{segment:020}.wal"));
        let bad = |reason: String| StorageError::CorruptRecord {
            segment: seg_path.clone(),
            offset: 0,
            reason,
        };
        let mut r = Reader::new(payload);
        match r.u8().map_err(|e| bad(e.to_string()))? {
            REC_ENTRIES => {
                let n = r.len(payload.len()).map_err(|e| bad(e.to_string()))?;
                let mut max = 0;
                for _ in 0..n {
                    let raw = r.slice().map_err(|e| bad(e.to_string()))?;
                    let e = Entry::parse_from_bytes(raw).map_err(|e| bad(e.to_string()))?;
                    max = max.max(e.index);
                    if e.index <= self.snapshot.get_metadata().index {
                        continue;
                    }
                    let last = self.last();
                    if e.index > last + 1 {
                        return Err(bad(format!("gap: entry {} after last {}", e.index, last)));
                    }
                    self.truncate_from(e.index);
                    self.entries_bytes += e.data.len();
                    self.entries.push(e);
                }
                r.finish().map_err(|e| bad(e.to_string()))?;
                self.wal.note_mark(segment, max);
            }
            REC_HARD_STATE => {
                let term = r.u64().map_err(|e| bad(e.to_string()))?;
                let vote = r.u64().map_err(|e| bad(e.to_string()))?;
                let commit = r.u64().map_err(|e| bad(e.to_string()))?;
                r.finish().map_err(|e| bad(e.to_string()))?;
                self.hard.term = term;
                self.hard.vote = vote;
                self.hard.commit = commit;
            }
            tag => return Err(bad(format!("unknown record type {tag}"))),
        }
        Ok(())
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    fn truncate_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first()) as usize;
        if keep < self.entries.len() {
            let removed: usize = self.entries[keep..].iter().map(|e| e.data.len()).sum();
            self.entries_bytes -= removed;
            self.entries.truncate(keep);
        }
    }

    /// Payload bytes of the entries held since the last snapshot.
    pub fn log_bytes(&self) -> usize {
        self.entries_bytes
    }

    /// Appends entries (replacing any conflicting suffix). Durable after [`DiskStorage::sync`].
    pub fn append(&mut self, ents: &[Entry]) -> Result<(), StorageError> {
        let Some(first_new) = ents.first() else {
            return Ok(());
        };
        if first_new.index < self.first() || first_new.index > self.last() + 1 {
            return Err(StorageError::CorruptRecord {
                segment: self.dir.join("wal"),
                offset: 0,
                reason: format!(
                    "append at {} outside [{}, {}]",
                    first_new.index,
                    self.first(),
                    self.last() + 1
                ),
            });
        }
        let mut w =
            Writer::with_capacity(64 + ents.iter().map(|e| e.data.len() + 32).sum::<usize>());
        w.u8(REC_ENTRIES);
        w.u32(ents.len() as u32);
        let mut max = 0;
        for e in ents {
            let raw = e
                .write_to_bytes()
                .map_err(|err| StorageError::CorruptRecord {
                    segment: self.dir.join("wal"),
                    offset: 0,
                    reason: format!("encode entry: {err}"),
                })?;
            w.bytes(&raw);
            max = max.max(e.index);
        }
        self.wal.append(&w.finish(), max);
        self.truncate_from(first_new.index);
        self.entries_bytes += ents.iter().map(|e| e.data.len()).sum::<usize>();
        self.entries.extend_from_slice(ents);
        Ok(())
    }

    /// Replaces the hard state. A new term or vote is durable after [`DiskStorage::sync`]; a new commit
    /// index alone is written lazily (see [`DiskStorage::set_commit`]).
    pub fn set_hard_state(&mut self, hs: &HardState) {
        if hs.term != self.hard.term || hs.vote != self.hard.vote {
            self.hard = hs.clone();
            self.hard_dirty = true;
        } else {
            self.set_commit(hs.commit);
        }
    }

    /// Updates only the commit index. It is written with the next sync that has entries to write anyway
    /// (or the next term/vote change, or segment rotation), never synced on its own: Raft needs the term
    /// and vote durable before it answers, but a commit index that lags on disk is only re-learned from
    /// the leader after a restart (and [`DiskStorage::open`] never lets it fall below the snapshot). An
    /// fsync per commit advance would double the fsyncs of every replica under load.
    pub fn set_commit(&mut self, commit: u64) {
        if commit != self.hard.commit {
            self.hard.commit = commit;
            self.commit_dirty = true;
        }
    }

    fn append_hard_state(&mut self) {
        let mut w = Writer::with_capacity(25);
        w.u8(REC_HARD_STATE);
        w.u64(self.hard.term);
        w.u64(self.hard.vote);
        w.u64(self.hard.commit);
        self.wal.append(&w.finish(), 0);
        self.hard_dirty = false;
        self.commit_dirty = false;
    }

    /// Makes every appended entry and hard-state change durable (one write + one fdatasync), rotating the
    /// segment when it is full.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        if self.hard_dirty || (self.commit_dirty && self.wal.has_pending()) {
            self.append_hard_state();
        }
        self.wal.sync()?;
        if self.wal.wants_rotation() {
            self.wal.rotate()?;
            self.append_hard_state();
            self.wal.sync()?;
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader: replaces the snapshot file, drops the whole log and
    /// every old segment, and moves the hard state forward.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        let meta = snap.get_metadata();
        write_snapshot_file(&self.dir, &snap, self.wal.fsync())?;
        self.hard.term = self.hard.term.max(meta.term);
        self.hard.commit = meta.index;
        self.entries.clear();
        self.entries_bytes = 0;
        self.snapshot = snap;
        // Every old segment is superseded; start a clean one that begins with the new hard state.
        self.wal.rotate()?;
        self.append_hard_state();
        self.wal.sync()?;
        self.wal.purge_all_but_active()?;
        Ok(())
    }

    /// Takes a local snapshot at `index` (which must be applied) with state-machine bytes `data`, then
    /// drops the log up to it and purges WAL segments it covers.
    /// `conf` is the membership in force at `index`.
    pub fn compact(
        &mut self,
        index: u64,
        data: Vec<u8>,
        conf: raft::prelude::ConfState,
    ) -> Result<(), StorageError> {
        if index <= self.snapshot.get_metadata().index || index > self.last() {
            return Ok(());
        }
        let term = self.term_of(index).unwrap_or(0);
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf);
        write_snapshot_file(&self.dir, &snap, self.wal.fsync())?;
        let first = self.first();
        let dropped: usize = self
            .entries
            .drain(..(index + 1 - first) as usize)
            .map(|e| e.data.len())
            .sum();
        self.entries_bytes -= dropped;
        self.snapshot = snap;
        self.wal.purge(index)?;
        Ok(())
    }

    fn term_of(&self, idx: u64) -> Option<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Some(meta.term);
        }
        if idx < meta.index || idx > self.last() {
            return None;
        }
        Some(self.entries[(idx - self.first()) as usize].term)
    }

    /// The latest snapshot (metadata and state-machine bytes).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The durable hard state as last set.
    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    /// Number of WAL segment files (for tests of compaction).
    pub fn segment_count(&self) -> usize {
        self.wal.segment_count()
    }
}

fn write_snapshot_file(dir: &Path, snap: &Snapshot, fsync: bool) -> Result<(), StorageError> {
    let tmp = dir.join("snapshot.tmp");
    let path = dir.join("snapshot");
    let body = snap
        .write_to_bytes()
        .map_err(|e| StorageError::CorruptSnapshot {
            path: path.clone(),
            reason: format!("encode: {e}"),
        })?;
    let mut buf = Vec::with_capacity(body.len() + 12);
    buf.extend_from_slice(SNAP_MAGIC);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    buf.extend_from_slice(&body);
    let mut f = File::create(&tmp).map_err(StorageError::io("create", &tmp))?;
    f.write_all(&buf).map_err(StorageError::io("write", &tmp))?;
    if fsync {
        f.sync_all().map_err(StorageError::io("fsync", &tmp))?;
    }
    drop(f);
    fs::rename(&tmp, &path).map_err(StorageError::io("rename", &path))?;
    sync_dir(dir, fsync)
}

fn read_snapshot_file(path: &Path) -> Result<Snapshot, StorageError> {
    let data = fs::read(path).map_err(StorageError::io("read", path))?;
    let bad = |reason: &str| StorageError::CorruptSnapshot {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if data.len() < 12 || &data[..4] != SNAP_MAGIC {
        return Err(bad("bad header"));
    }
    let len = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
    let crc = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
    if data.len() != 12 + len {
        return Err(bad("length mismatch"));
    }
    let body = &data[12..];
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch"));
    }
    Snapshot::parse_from_bytes(body).map_err(|e| bad(&e.to_string()))
}

fn store_err(e: raft::StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard.clone(),
            conf_state: self.snapshot.get_metadata().get_conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(store_err(raft::StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(store_err(raft::StorageError::Unavailable));
        }
        let first = self.first();
        let mut out = self.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snapshot.get_metadata().index {
            return Err(store_err(raft::StorageError::Compacted));
        }
        self.term_of(idx)
            .ok_or_else(|| store_err(raft::StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cs = self.snapshot.get_metadata().get_conf_state();
        // A replica refuses a snapshot whose membership does not name it (raft-rs, like etcd), so one taken
        // before `to` joined is useless to it. The replica snapshots right after each membership change, so a
        // fitting one exists once the change that added `to` has applied here.
        let names_to = cs.voters.contains(&to) || cs.learners.contains(&to);
        if self.snapshot.get_metadata().index < request_index || !names_to {
            return Err(store_err(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage as _;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}t{term}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn cfg() -> WalConfig {
        WalConfig {
            fsync: true,
            segment_bytes: 256,
        }
    }

    /// A commit-only change is not written (nor synced) on its own, but with the next entries; a term or
    /// vote change is written by the next sync even with no entries.
    #[test]
    fn commit_only_hard_state_rides_with_the_next_entries() {
        let dir = tempfile::tempdir().unwrap();
        let big = WalConfig {
            fsync: true,
            segment_bytes: 1 << 20,
        };
        let wal_len = |d: &Path| -> u64 {
            fs::read_dir(d.join("wal"))
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum()
        };
        {
            let mut s = DiskStorage::open(dir.path(), big.clone(), &[1]).unwrap();
            s.set_hard_state(&HardState {
                term: 1,
                vote: 1,
                commit: 0,
                ..Default::default()
            });
            s.sync().unwrap();
            s.append(&(1..=3).map(|i| ent(i, 1)).collect::<Vec<_>>())
                .unwrap();
            s.sync().unwrap();
            let before = wal_len(dir.path());
            s.set_commit(2);
            s.sync().unwrap();
            assert_eq!(wal_len(dir.path()), before, "no write for the commit alone");
            s.append(&[ent(4, 1)]).unwrap();
            s.sync().unwrap();
        }
        let s = DiskStorage::open(dir.path(), big, &[1]).unwrap();
        let hs = s.initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.vote, hs.commit), (1, 1, 2));
        assert_eq!(s.last_index().unwrap(), 4);
    }

    #[test]
    fn fresh_open_has_voters_and_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path(), cfg(), &[1, 2, 3]).unwrap();
        let rs = s.initial_state().unwrap();
        assert_eq!(rs.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert_eq!(s.term(0).unwrap(), 0);
    }

    #[test]
    fn entries_and_hard_state_survive_restart_with_conflict_truncation() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), cfg(), &[1]).unwrap();
            s.append(&(1..=5).map(|i| ent(i, 1)).collect::<Vec<_>>())
                .unwrap();
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 3,
                ..Default::default()
            };
            s.set_hard_state(&hs);
            s.sync().unwrap();
            // A new leader overwrites 4..5 with term-2 entries.
            s.append(&[ent(4, 2)]).unwrap();
            s.sync().unwrap();
            assert_eq!(s.last_index().unwrap(), 4);
        }
        let s = DiskStorage::open(dir.path(), cfg(), &[1]).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(s.term(3).unwrap(), 1);
        let hs = s.initial_state().unwrap().hard_state;
        assert_eq!((hs.term, hs.vote, hs.commit), (2, 1, 3));
        let got = s
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(2, 1), (3, 1), (4, 2)]
        );
    }

    #[test]
    fn compaction_drops_log_and_segments_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), cfg(), &[1]).unwrap();
            for i in 1..=40 {
                s.append(&[ent(i, 1)]).unwrap();
                s.sync().unwrap();
            }
            let before = s.segment_count();
            assert!(before > 3, "small segments rotate: {before}");
            s.compact(
                30,
                b"state@30".to_vec(),
                s.latest_snapshot().get_metadata().get_conf_state().clone(),
            )
            .unwrap();
            assert!(s.segment_count() < before);
            assert_eq!(s.first_index().unwrap(), 31);
            assert!(matches!(
                s.term(29),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            ));
            assert_eq!(s.term(30).unwrap(), 1);
        }
        let s = DiskStorage::open(dir.path(), cfg(), &[1]).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (31, 40)
        );
        assert_eq!(s.snapshot(0, 1).unwrap().get_data(), b"state@30");
        // A snapshot is never handed out for a member its membership does not name (it would refuse it).
        assert!(matches!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        assert!(s.hard_state().commit >= 30);
    }

    #[test]
    fn log_bytes_track_appends_truncation_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), cfg(), &[1]).unwrap();
        let size = |i: u64, t: u64| format!("e{i}t{t}").len();
        s.append(&(1..=5).map(|i| ent(i, 1)).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(s.log_bytes(), (1..=5).map(|i| size(i, 1)).sum::<usize>());
        s.append(&[ent(4, 2)]).unwrap();
        let expect = (1..=3).map(|i| size(i, 1)).sum::<usize>() + size(4, 2);
        assert_eq!(s.log_bytes(), expect);
        s.sync().unwrap();
        let conf = s.latest_snapshot().get_metadata().get_conf_state().clone();
        s.compact(2, Vec::new(), conf).unwrap();
        assert_eq!(s.log_bytes(), size(3, 1) + size(4, 2));
        drop(s);
        let s = DiskStorage::open(dir.path(), cfg(), &[1]).unwrap();
        assert_eq!(s.log_bytes(), size(3, 1) + size(4, 2), "rebuilt on replay");
    }

    #[test]
    fn installed_snapshot_replaces_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), cfg(), &[1, 2]).unwrap();
            s.append(&(1..=5).map(|i| ent(i, 1)).collect::<Vec<_>>())
                .unwrap();
            s.sync().unwrap();
            let mut snap = Snapshot::default();
            snap.set_data(b"leader-state".to_vec().into());
            snap.mut_metadata().index = 100;
            snap.mut_metadata().term = 7;
            snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
            s.apply_snapshot(snap).unwrap();
            s.append(&[ent(101, 7)]).unwrap();
            s.sync().unwrap();
        }
        let s = DiskStorage::open(dir.path(), cfg(), &[1, 2]).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (101, 101)
        );
        assert_eq!(s.hard_state().term, 7);
        assert_eq!(s.term(100).unwrap(), 7);
    }

    #[test]
    fn corrupt_snapshot_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        drop(DiskStorage::open(dir.path(), cfg(), &[1]).unwrap());
        let p = dir.path().join("snapshot");
        let mut d = fs::read(&p).unwrap();
        let last = d.len() - 1;
        d[last] ^= 0x55;
        fs::write(&p, &d).unwrap();
        assert!(matches!(
            DiskStorage::open(dir.path(), cfg(), &[1]).unwrap_err(),
            StorageError::CorruptSnapshot { .. }
        ));
    }
}
