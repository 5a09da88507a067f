//! A small hand-rolled binary encoding for the GCS's commands, results, snapshots and wire messages.
//!
//! Little-endian fixed-width integers and `u32`-length-prefixed byte strings, nothing more. It is deliberately
//! not self-describing and not versioned per field: every message starts with a tag byte chosen by its owner,
//! and decoding is strict (trailing bytes, short buffers, bad tags and oversized lengths are all errors).
//! It never panics on untrusted input: every read is bounds-checked and every length is capped by
//! [`MAX_FIELD`] before anything is allocated.

use bytes::Bytes;

/// The largest byte string one field may carry (64 MiB); bigger lengths are rejected before allocating.
///
/// Values are limited far lower by [`crate::shard::Limits`]; this only bounds what a hostile peer can make us allocate.
pub const MAX_FIELD: usize = 64 << 20;

/// Why a buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ended before the value did: it was truncated or is not this kind of message.
    #[error("buffer too short: needed {needed} more bytes at offset {at}")]
    Short {
        /// Offset of the read that failed.
        at: usize,
        /// How many bytes were missing.
        needed: usize,
    },
    /// A tag byte named no known variant: the peer speaks another version or the data is corrupt.
    #[error("unknown tag {tag} for {what}")]
    BadTag {
        /// What was being decoded.
        what: &'static str,
        /// The tag found.
        tag: u8,
    },
    /// A length prefix exceeded [`MAX_FIELD`] or a collection limit.
    #[error("length {len} exceeds limit {max}")]
    TooLong {
        /// The length found.
        len: usize,
        /// The limit it broke.
        max: usize,
    },
    /// Bytes were left over after the message ended.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}

/// Appends encoded fields to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(cap),
        }
    }
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a bool as one byte.
    pub fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    /// Appends a length-prefixed byte string.
    ///
    /// Callers keep fields under [`MAX_FIELD`] (limits are checked before encoding); a longer one would
    /// encode a wrong length, so it is clamped by the type conversion being checked in debug builds.
    pub fn bytes(&mut self, v: &[u8]) {
        debug_assert!(v.len() <= MAX_FIELD);
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    /// Appends an optional byte string (presence byte, then the string).
    pub fn opt_bytes(&mut self, v: Option<&[u8]>) {
        match v {
            None => self.u8(0),
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
        }
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Reads fields back from a buffer, checking every bound.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(DecodeError::Short {
                at: self.pos,
                needed: n - left,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// Reads a bool; any byte other than 0 or 1 is an error.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::BadTag { what: "bool", tag }),
        }
    }
    /// Reads a collection length and checks it against `max` before the caller allocates.
    pub fn len(&mut self, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::TooLong { len: n, max });
        }
        Ok(n)
    }
    /// Reads a length-prefixed byte string as a borrowed slice.
    pub fn slice(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len(MAX_FIELD)?;
        self.take(n)
    }
    /// Reads a length-prefixed byte string into an owned vector.
    pub fn vec(&mut self) -> Result<Vec<u8>, DecodeError> {
        Ok(self.slice()?.to_vec())
    }
    /// Reads a length-prefixed byte string into [`Bytes`] (one copy, so the result does not pin the input).
    pub fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        Ok(Bytes::copy_from_slice(self.slice()?))
    }
    /// Reads an optional byte string.
    pub fn opt_bytes(&mut self) -> Result<Option<Bytes>, DecodeError> {
        if self.bool()? {
            Ok(Some(self.bytes()?))
        } else {
            Ok(None)
        }
    }
    /// Fails unless the whole buffer was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        let left = self.buf.len() - self.pos;
        if left != 0 {
            return Err(DecodeError::Trailing(left));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let mut w = Writer::default();
        w.u8(7);
        w.u64(u64::MAX - 1);
        w.bytes(b"abc");
        w.opt_bytes(None);
        w.opt_bytes(Some(b"z"));
        let buf = w.finish();
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u64().unwrap(), u64::MAX - 1);
        assert_eq!(r.vec().unwrap(), b"abc");
        assert_eq!(r.opt_bytes().unwrap(), None);
        assert_eq!(r.opt_bytes().unwrap().as_deref(), Some(&b"z"[..]));
        r.finish().unwrap();

        // Every truncation of a valid buffer is an error, never a panic.
        for cut in 0..buf.len() {
            let mut r = Reader::new(&buf[..cut]);
            let res = (|| -> Result<(), DecodeError> {
                r.u8()?;
                r.u64()?;
                r.vec()?;
                r.opt_bytes()?;
                r.opt_bytes()?;
                Ok(())
            })();
            assert!(res.is_err(), "cut at {cut} decoded");
        }
    }

    #[test]
    fn huge_length_rejected_before_allocation() {
        let mut w = Writer::default();
        w.u32(u32::MAX);
        let buf = w.finish();
        assert!(matches!(
            Reader::new(&buf).vec(),
            Err(DecodeError::TooLong { .. })
        ));
    }
}
