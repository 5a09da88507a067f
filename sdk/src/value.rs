//! What may cross a task or actor boundary, and how it is encoded.
//!
//! Every argument and every result is an rkyv archive in a 16-byte aligned buffer, so a receiver can read it in place.
//! This module is only the encoding; where bytes live (inline in a reply or in the object store) is `object`'s business.

use bytes::Bytes;
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::{self, Strategy};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::error::Error;

/// A value that can be passed to a remote function or actor method, or returned from one.
///
/// Implemented for every type that derives rkyv's `Archive`, `Serialize` and `Deserialize` (with checked access):
/// integers, floats, `String`, `Vec<T>`, tuples, `Option`, and your own `#[derive(rkyv::Archive, rkyv::Serialize,
/// rkyv::Deserialize)]` structs. There is nothing to implement by hand.
pub trait Value:
    Sized
    // Large values are serialized straight into the object store's buffers.
    + oxray_objstore::Object
    + Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + Deserialize<Self, Strategy<Pool, rancor::Error>>,
    > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
    + Send
    + 'static
{
}

impl<T> Value for T where
    T: oxray_objstore::Object
        + Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                          + Deserialize<T, Strategy<Pool, rancor::Error>>,
        > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
        + Send
        + 'static
{
}

/// Serializes a value into an aligned buffer and hands it over as `Bytes` without copying.
pub fn encode<T: Value>(value: &T) -> Result<Bytes, Error> {
    let buf =
        rkyv::to_bytes::<rancor::Error>(value).map_err(|e| Error::Serialization(e.to_string()))?;
    Ok(Bytes::from_owner(buf))
}

/// Validates `bytes` as an archived `T` and returns a reference into them (no copy).
///
/// `bytes` must be 16-byte aligned (every buffer this crate produces is).
pub fn access<T: Value>(bytes: &[u8]) -> Result<&T::Archived, Error> {
    rkyv::access::<T::Archived, rancor::Error>(bytes)
        .map_err(|e| Error::Serialization(format!("invalid archive: {e}")))
}

/// Validates and deserializes `bytes` into an owned `T`.
pub fn decode<T: Value>(bytes: &[u8]) -> Result<T, Error> {
    if !bytes.is_empty() && !(bytes.as_ptr() as usize).is_multiple_of(16) {
        // Only bytes that came through an unaligned path (a test, a foreign buffer) pay this copy.
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        return decode_aligned::<T>(&aligned);
    }
    decode_aligned::<T>(bytes)
}

fn decode_aligned<T: Value>(bytes: &[u8]) -> Result<T, Error> {
    let archived = access::<T>(bytes)?;
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| Error::Serialization(e.to_string()))
}

/// Copies `bytes` into a fresh 16-byte aligned buffer (used for bytes that arrive unaligned).
pub fn aligned_copy(bytes: &[u8]) -> Bytes {
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    Bytes::from_owner(aligned)
}

/// A stable 64-bit FNV-1a hash, used for function ids and signature hashes (the same on every build and platform).
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_in_place_access() {
        let v: Vec<f32> = vec![1.0, 2.5, -3.0];
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes.as_ptr() as usize % 16, 0);
        let archived = access::<Vec<f32>>(&bytes).unwrap();
        assert_eq!(archived.len(), 3);
        assert_eq!(decode::<Vec<f32>>(&bytes).unwrap(), v);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let junk = aligned_copy(&[0xff; 7]);
        assert!(decode::<String>(&junk).is_err());
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
