//! Spill files: one file per primary object, written when memory is short and read back on `get`.
//!
//! Format (little-endian): an 8-byte magic `OXSPILL1`, the object id (16 bytes), the data length (8 bytes), the
//! CRC-32 of the data (4 bytes), 4 reserved zero bytes, then the data. The checksum and length are also kept in
//! memory ([`SpillFile`]), so a file altered on disk is detected even if its header was rewritten to match.
//! This file does blocking file I/O and nothing else; when to spill is decided in [`crate::memory`].

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::ObjectId;
use crate::error::ObjectStoreError;

const MAGIC: &[u8; 8] = b"OXSPILL1";
const HEADER_LEN: usize = 40;

/// Where a spilled object lives on disk and what it must read back as.
#[derive(Clone, Debug)]
pub(crate) struct SpillFile {
    pub(crate) path: PathBuf,
    pub(crate) len: usize,
    pub(crate) crc: u32,
}

fn header(id: ObjectId, len: usize, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..24].copy_from_slice(&id.0.to_le_bytes());
    h[24..32].copy_from_slice(&(len as u64).to_le_bytes());
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes `data` as the spill file of `id` in `dir` (created if missing), fsyncing if asked.
pub(crate) fn write(
    dir: &Path,
    id: ObjectId,
    data: &[u8],
    fsync: bool,
) -> Result<SpillFile, ObjectStoreError> {
    let io = |source| ObjectStoreError::SpillIo { id, source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join(format!("{id}.obj"));
    let crc = crc32fast::hash(data);
    let mut file = File::create(&path).map_err(io)?;
    file.write_all(&header(id, data.len(), crc)).map_err(io)?;
    file.write_all(data).map_err(io)?;
    if fsync {
        file.sync_all().map_err(io)?;
    }
    Ok(SpillFile {
        path,
        len: data.len(),
        crc,
    })
}

/// Reads the spill file back into `into` (exactly `spill.len` bytes long), checking header, length and checksum.
pub(crate) fn read(
    id: ObjectId,
    spill: &SpillFile,
    into: &mut [u8],
) -> Result<(), ObjectStoreError> {
    let io = |source| ObjectStoreError::SpillIo { id, source };
    let corrupt = |reason: String| ObjectStoreError::SpillCorrupt { id, reason };
    let mut file = File::open(&spill.path).map_err(io)?;
    let on_disk = file.metadata().map_err(io)?.len();
    if on_disk != (HEADER_LEN + spill.len) as u64 {
        return Err(corrupt(format!(
            "file is {on_disk} bytes, expected {}",
            HEADER_LEN + spill.len
        )));
    }
    let mut h = [0u8; HEADER_LEN];
    file.read_exact(&mut h).map_err(io)?;
    if h != header(id, spill.len, spill.crc) {
        return Err(corrupt("header does not match the object".to_owned()));
    }
    if into.len() != spill.len {
        return Err(corrupt(format!(
            "buffer of {} bytes for {} bytes of data",
            into.len(),
            spill.len
        )));
    }
    file.read_exact(into).map_err(io)?;
    let crc = crc32fast::hash(into);
    if crc != spill.crc {
        return Err(corrupt(format!(
            "checksum {crc:08x}, expected {:08x}",
            spill.crc
        )));
    }
    Ok(())
}

/// Removes a spill file; a file already gone is not an error (freeing is idempotent).
pub(crate) fn remove(spill: &SpillFile) {
    if let Err(e) = std::fs::remove_file(&spill.path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %spill.path.display(), cause = %e, "could not remove spill file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = ObjectId(5);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let spill = write(dir.path(), id, &data, true).expect("write");
        let mut back = vec![0u8; data.len()];
        read(id, &spill, &mut back).expect("read");
        assert_eq!(back, data);

        // Flip one data byte on disk.
        let mut raw = std::fs::read(&spill.path).expect("raw");
        raw[HEADER_LEN + 77] ^= 1;
        std::fs::write(&spill.path, &raw).expect("rewrite");
        assert!(matches!(
            read(id, &spill, &mut back),
            Err(ObjectStoreError::SpillCorrupt { .. })
        ));

        // Truncate it.
        std::fs::write(&spill.path, &raw[..100]).expect("truncate");
        assert!(matches!(
            read(id, &spill, &mut back),
            Err(ObjectStoreError::SpillCorrupt { .. })
        ));

        remove(&spill);
        remove(&spill);
        assert!(matches!(
            read(id, &spill, &mut back),
            Err(ObjectStoreError::SpillIo { .. })
        ));
    }
}
