//! A crash-safe write-ahead log of opaque records in append-only segment files.
//!
//! Each record on disk is `[len: u32][crc32: u32][payload: len bytes]`, little-endian, where the CRC
//! (crc32fast) covers the length field and the payload (so a zero-filled region never looks like a valid
//! empty record, and a damaged length is caught). Records are buffered by [`Wal::append`] and made durable by
//! [`Wal::sync`] (one `write` plus one `fdatasync` for everything buffered; `fsync = false` skips the sync
//! for tests and benchmarks that say so). Segments are named by a sequence number and rotated at
//! [`WalConfig::segment_bytes`]; whole segments are purged from the front once their contents are covered
//! by a snapshot.
//!
//! Recovery ([`Wal::open`]) distinguishes two kinds of damage:
//! - a **torn tail**: the last record of the last segment is incomplete, zero-filled or fails its CRC while
//!   ending exactly at end-of-file. That is what a crash in the middle of a write leaves; the record was never
//!   acknowledged (acknowledgement waits for the sync), so it is truncated away and recovery proceeds.
//! - **corruption**: a bad record anywhere else (in an older segment, or followed by more data). That is
//!   damage to acknowledged data, and recovery fails with [`StorageError::CorruptRecord`] rather than
//!   silently dropping it.
//!
//! Limitation: a corrupted *length* field in the last record of the last segment that points past EOF is
//! indistinguishable from a torn tail and is treated as one.
//!
//! This file knows nothing about Raft; [`crate::storage`] gives the records their meaning.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest record accepted on replay (256 MiB); a larger length field is damage, not data.
pub const MAX_RECORD: usize = 256 << 20;

/// How a [`Wal`] writes.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Call `fdatasync` in [`Wal::sync`] (default true). Off only for simulations and labelled benchmarks.
    pub fsync: bool,
    /// Start a new segment once the active one exceeds this many bytes (default 64 MiB).
    pub segment_bytes: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            fsync: true,
            segment_bytes: 64 << 20,
        }
    }
}

/// Failures of the GCS's durable storage. All of them stop the replica: its disk can no longer be trusted.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file operation failed (disk full, permissions, I/O error). Remedy: fix the disk and restart.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A record before the tail of the log is damaged: acknowledged data is lost on this replica.
    /// Remedy: wipe this replica's directory and let it catch up from the others.
    #[error("corrupt wal record in {segment} at offset {offset}: {reason}")]
    CorruptRecord {
        /// The segment file.
        segment: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// The snapshot file fails its checksum or does not decode. Remedy as for a corrupt record.
    #[error("corrupt snapshot {path}: {reason}")]
    CorruptSnapshot {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// An earlier write or sync failed, so the in-memory and on-disk state may differ; nothing more is written.
    #[error("storage is poisoned by an earlier failure")]
    Poisoned,
}

impl StorageError {
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
        move |source| StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Caller-supplied high-water mark of what the segment holds (a Raft index), for purging.
    max_mark: u64,
}

/// One replayed record and the segment it came from.
#[derive(Debug)]
pub struct Replayed {
    /// Sequence number of its segment.
    pub segment: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

/// The log. See the module docs.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    cfg: WalConfig,
    segments: Vec<Segment>,
    active: File,
    active_len: u64,
    buf: Vec<u8>,
    buf_mark: u64,
    poisoned: bool,
}

fn seg_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

/// Fsyncs a directory so that creates, renames and deletes in it are durable.
pub(crate) fn sync_dir(dir: &Path, fsync: bool) -> Result<(), StorageError> {
    if !fsync {
        return Ok(());
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io("fsync dir", dir))
}

impl Wal {
    /// Opens (creating if needed) the log in `dir` and replays every intact record in order.
    ///
    /// A torn tail is truncated (and the truncation synced); corruption anywhere else is an error.
    pub fn open(dir: &Path, cfg: WalConfig) -> Result<(Wal, Vec<Replayed>), StorageError> {
        fs::create_dir_all(dir).map_err(StorageError::io("create dir", dir))?;
        let mut seqs = Vec::new();
        for ent in fs::read_dir(dir).map_err(StorageError::io("list", dir))? {
            let ent = ent.map_err(StorageError::io("list", dir))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(stem) = name.strip_suffix(".wal")
                && let Ok(seq) = stem.parse::<u64>()
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut records = Vec::new();
        let mut segments = Vec::new();
        let n = seqs.len();
        let mut last_len = 0;
        for (i, seq) in seqs.into_iter().enumerate() {
            let path = dir.join(seg_name(seq));
            let is_last = i + 1 == n;
            let valid_len = replay_segment(&path, seq, is_last, &mut records)?;
            if is_last {
                last_len = valid_len;
            }
            segments.push(Segment {
                seq,
                path,
                max_mark: 0,
            });
        }
        let (active, active_len) = match segments.last() {
            Some(seg) => {
                let f = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(StorageError::io("open", &seg.path))?;
                (f, last_len)
            }
            None => {
                let path = dir.join(seg_name(1));
                let f = create_segment(dir, &path, cfg.fsync)?;
                segments.push(Segment {
                    seq: 1,
                    path,
                    max_mark: 0,
                });
                (f, 0)
            }
        };
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                cfg,
                segments,
                active,
                active_len,
                buf: Vec::new(),
                buf_mark: 0,
                poisoned: false,
            },
            records,
        ))
    }

    /// Records that segment `seq` holds data up to `mark` (used when replay rebuilds the purge marks).
    pub fn note_mark(&mut self, seq: u64, mark: u64) {
        if let Some(s) = self.segments.iter_mut().find(|s| s.seq == seq) {
            s.max_mark = s.max_mark.max(mark);
        }
    }

    /// Buffers one record; `mark` is the highest Raft index it carries (0 if none). Durable after [`Wal::sync`].
    pub fn append(&mut self, payload: &[u8], mark: u64) {
        let len = (payload.len() as u32).to_le_bytes();
        self.buf.extend_from_slice(&len);
        self.buf
            .extend_from_slice(&record_crc(len, payload).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.buf_mark = self.buf_mark.max(mark);
    }

    /// Whether records are buffered but not yet synced.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes every buffered record and (if configured) fdatasyncs. Returns only once they are durable.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = &self
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        let res = self
            .active
            .write_all(&self.buf)
            .map_err(StorageError::io("write", path))
            .and_then(|()| {
                if self.cfg.fsync {
                    self.active
                        .sync_data()
                        .map_err(StorageError::io("fsync", path))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = res {
            // A failed fsync may have dropped dirty pages; retrying could report success for lost data.
            self.poisoned = true;
            return Err(e);
        }
        self.active_len += self.buf.len() as u64;
        self.buf.clear();
        if let Some(s) = self.segments.last_mut() {
            s.max_mark = s.max_mark.max(self.buf_mark);
        }
        self.buf_mark = 0;
        Ok(())
    }

    /// Whether the active segment has outgrown [`WalConfig::segment_bytes`].
    pub fn wants_rotation(&self) -> bool {
        self.active_len >= self.cfg.segment_bytes
    }

    /// Syncs, then starts a new segment. The caller then appends whatever state a segment must start with.
    pub fn rotate(&mut self) -> Result<(), StorageError> {
        self.sync()?;
        let seq = self.segments.last().map_or(1, |s| s.seq + 1);
        let path = self.dir.join(seg_name(seq));
        let f = create_segment(&self.dir, &path, self.cfg.fsync)
            .inspect_err(|_| self.poisoned = true)?;
        self.active = f;
        self.active_len = 0;
        self.segments.push(Segment {
            seq,
            path,
            max_mark: 0,
        });
        Ok(())
    }

    /// Deletes segments from the front while every segment up to and including them holds marks `<= upto`.
    /// The active segment is never deleted.
    pub fn purge(&mut self, upto: u64) -> Result<usize, StorageError> {
        let mut n = 0;
        while self.segments.len() > 1 && self.segments[0].max_mark <= upto {
            let seg = self.segments.remove(0);
            fs::remove_file(&seg.path).map_err(StorageError::io("remove", &seg.path))?;
            n += 1;
        }
        if n > 0 {
            sync_dir(&self.dir, self.cfg.fsync)?;
        }
        Ok(n)
    }

    /// Deletes every segment but the active one (after a snapshot superseded all of them).
    pub fn purge_all_but_active(&mut self) -> Result<usize, StorageError> {
        self.purge(u64::MAX)
    }

    /// Whether syncs are real (see [`WalConfig::fsync`]).
    pub fn fsync(&self) -> bool {
        self.cfg.fsync
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

fn record_crc(len: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    h.finalize()
}

fn create_segment(dir: &Path, path: &Path, fsync: bool) -> Result<File, StorageError> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(StorageError::io("create", path))?;
    sync_dir(dir, fsync)?;
    Ok(f)
}

/// Replays one segment into `out`; returns the length of its valid prefix (truncating a torn tail).
fn replay_segment(
    path: &Path,
    seq: u64,
    is_last: bool,
    out: &mut Vec<Replayed>,
) -> Result<u64, StorageError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(StorageError::io("read", path))?;
    let corrupt = |offset: usize, reason: &str| StorageError::CorruptRecord {
        segment: path.to_path_buf(),
        offset: offset as u64,
        reason: reason.to_string(),
    };
    let mut pos = 0usize;
    let mut torn: Option<&str> = None;
    while pos < data.len() {
        let left = data.len() - pos;
        if left < 8 {
            torn = Some("short header");
            break;
        }
        let len =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len == 0 && crc == 0 && data[pos..].iter().all(|&b| b == 0) {
            torn = Some("zero-filled tail");
            break;
        }
        if len > MAX_RECORD {
            return Err(corrupt(pos, "record length over limit"));
        }
        if len > left - 8 {
            torn = Some("record extends past end of file");
            break;
        }
        let payload = &data[pos + 8..pos + 8 + len];
        if record_crc((len as u32).to_le_bytes(), payload) != crc {
            if pos + 8 + len == data.len() {
                torn = Some("checksum mismatch in final record");
                break;
            }
            return Err(corrupt(pos, "checksum mismatch"));
        }
        out.push(Replayed {
            segment: seq,
            payload: payload.to_vec(),
        });
        pos += 8 + len;
    }
    if let Some(reason) = torn {
        if !is_last {
            return Err(corrupt(pos, reason));
        }
        tracing::warn!(segment = %path.display(), offset = pos, reason, "truncating torn wal tail");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(StorageError::io("open", path))?;
        f.set_len(pos as u64)
            .map_err(StorageError::io("truncate", path))?;
        f.sync_all().map_err(StorageError::io("fsync", path))?;
    }
    Ok(pos as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(r: &[Replayed]) -> Vec<Vec<u8>> {
        r.iter().map(|r| r.payload.clone()).collect()
    }

    #[test]
    fn append_sync_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, recs) = Wal::open(dir.path(), WalConfig::default()).unwrap();
        assert!(recs.is_empty());
        wal.append(b"one", 1);
        wal.append(b"two", 2);
        wal.sync().unwrap();
        wal.append(b"unsynced", 3);
        drop(wal);
        let (_, recs) = Wal::open(dir.path(), WalConfig::default()).unwrap();
        assert_eq!(payloads(&recs), vec![b"one".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn torn_tail_is_truncated_and_log_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), WalConfig::default()).unwrap();
        wal.append(b"keep", 1);
        wal.append(b"torn-record", 2);
        wal.sync().unwrap();
        drop(wal);
        let seg = dir.path().join(seg_name(1));
        let len = fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 3).unwrap();
        drop(f);
        let (mut wal, recs) = Wal::open(dir.path(), WalConfig::default()).unwrap();
        assert_eq!(payloads(&recs), vec![b"keep".to_vec()]);
        wal.append(b"after", 3);
        wal.sync().unwrap();
        drop(wal);
        let (_, recs) = Wal::open(dir.path(), WalConfig::default()).unwrap();
        assert_eq!(payloads(&recs), vec![b"keep".to_vec(), b"after".to_vec()]);
    }

    #[test]
    fn bad_crc_in_final_record_is_torn_but_in_middle_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), WalConfig::default()).unwrap();
        wal.append(b"aaaa", 1);
        wal.append(b"bbbb", 2);
        wal.sync().unwrap();
        drop(wal);
        let seg = dir.path().join(seg_name(1));
        let clean = fs::read(&seg).unwrap();

        // Flip a payload byte of the last record: torn tail.
        let mut d = clean.clone();
        let last = d.len() - 1;
        d[last] ^= 0xff;
        fs::write(&seg, &d).unwrap();
        let (_, recs) = Wal::open(dir.path(), WalConfig::default()).unwrap();
        assert_eq!(payloads(&recs), vec![b"aaaa".to_vec()]);

        // Flip a payload byte of the first record: corruption, reported.
        let mut d = clean.clone();
        d[8] ^= 0xff;
        fs::write(&seg, &d).unwrap();
        let err = Wal::open(dir.path(), WalConfig::default()).unwrap_err();
        assert!(
            matches!(err, StorageError::CorruptRecord { offset: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn damage_in_older_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig {
            fsync: false,
            segment_bytes: 1,
        };
        let (mut wal, _) = Wal::open(dir.path(), cfg.clone()).unwrap();
        wal.append(b"seg1", 1);
        wal.rotate().unwrap();
        wal.append(b"seg2", 2);
        wal.sync().unwrap();
        drop(wal);
        let seg1 = dir.path().join(seg_name(1));
        let d = fs::read(&seg1).unwrap();
        fs::write(&seg1, &d[..d.len() - 1]).unwrap();
        assert!(matches!(
            Wal::open(dir.path(), cfg).unwrap_err(),
            StorageError::CorruptRecord { .. }
        ));
    }

    #[test]
    fn purge_removes_only_a_covered_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig {
            fsync: false,
            segment_bytes: 1,
        };
        let (mut wal, _) = Wal::open(dir.path(), cfg.clone()).unwrap();
        wal.append(b"a", 10);
        wal.rotate().unwrap();
        wal.append(b"b", 5);
        wal.rotate().unwrap();
        wal.append(b"c", 20);
        wal.sync().unwrap();
        assert_eq!(wal.purge(7).unwrap(), 0, "segment 1 holds index 10");
        assert_eq!(wal.purge(10).unwrap(), 2);
        assert_eq!(wal.segment_count(), 1);
        drop(wal);
        let (_, recs) = Wal::open(dir.path(), cfg).unwrap();
        assert_eq!(payloads(&recs), vec![b"c".to_vec()]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever single byte is damaged or wherever the last segment is cut, recovery never panics,
        /// never returns altered records (only a prefix of what was written), and damage to an older
        /// segment is always reported.
        #[test]
        fn recovery_returns_a_prefix_or_reports(
            records in proptest::collection::vec(proptest::collection::vec(0u8..255, 0..40), 1..24),
            rotate_every in 1usize..6,
            damage in 0usize..10_000,
            flip in proptest::bool::ANY,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let cfg = WalConfig { fsync: false, segment_bytes: u64::MAX };
            let (mut wal, _) = Wal::open(dir.path(), cfg.clone()).unwrap();
            for (i, r) in records.iter().enumerate() {
                if i > 0 && i % rotate_every == 0 {
                    wal.rotate().unwrap();
                }
                wal.append(r, i as u64);
            }
            wal.sync().unwrap();
            let segs = wal.segment_count();
            drop(wal);
            let mut files: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            proptest::prop_assert_eq!(files.len(), segs);
            let seg_i = if flip { damage % files.len() } else { files.len() - 1 };
            let target = &files[seg_i];
            let mut data = fs::read(target).unwrap();
            if data.is_empty() {
                return Ok(());
            }
            let pos = damage % data.len();
            if flip {
                data[pos] ^= 0x5a;
            } else {
                data.truncate(pos);
            }
            fs::write(target, &data).unwrap();
            match Wal::open(dir.path(), cfg) {
                Ok((_, recs)) => {
                    proptest::prop_assert!(seg_i == files.len() - 1, "damage to an older segment went unnoticed");
                    proptest::prop_assert!(recs.len() <= records.len());
                    for (got, want) in recs.iter().zip(&records) {
                        proptest::prop_assert_eq!(&got.payload, want);
                    }
                }
                Err(StorageError::CorruptRecord { .. }) => {}
                Err(e) => proptest::prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
