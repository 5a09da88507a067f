//! `ObjectId`, the cluster-wide name of one immutable object.
//!
//! This file only defines the identifier and how it is derived; it knows nothing about where an object lives
//! or who owns it (that is [`crate::refs`]).

use std::fmt;

/// The name of one immutable object, unique across the cluster.
///
/// Task return values get ids derived from the task id ([`ObjectId::for_task_return`]) so that every node that knows
/// the task can name its results without a round trip; `put` objects get random ids ([`ObjectId::random`]).
#[derive(
    Copy,
    Clone,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct ObjectId(pub u128);

impl ObjectId {
    /// A fresh random id, for objects created by `put`.
    pub fn random() -> Self {
        ObjectId(rand::random())
    }

    /// The id of return value number `index` of task `task`.
    ///
    /// Deterministic: the same `(task, index)` always gives the same id, so a retried or reconstructed task writes
    /// to the same object. The task id is mixed through a bijective 128-bit function and its low 32 bits replaced by
    /// the index, so two different tasks collide only with probability 2^-96 while the index stays readable
    /// ([`ObjectId::return_index`]).
    pub fn for_task_return(task: u128, index: u32) -> Self {
        let mixed = mix128(task);
        ObjectId((mixed & !0xffff_ffff_u128) | u128::from(index))
    }

    /// The low 32 bits: the return index when this id came from [`ObjectId::for_task_return`], meaningless otherwise.
    pub fn return_index(self) -> u32 {
        // Truncation is the point: the index lives in the low 32 bits.
        (self.0 & 0xffff_ffff) as u32
    }
}

/// A bijective mixer (odd multiply + xor-shift rounds) so sequential task ids spread over the whole id space.
fn mix128(mut x: u128) -> u128 {
    const K1: u128 = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835;
    const K2: u128 = 0xbf58_476d_1ce4_e5b9_94d0_49bb_1331_11eb;
    x ^= x >> 67;
    x = x.wrapping_mul(K1);
    x ^= x >> 61;
    x = x.wrapping_mul(K2);
    x ^= x >> 64;
    x
}

impl fmt::Display for ObjectId {
    /// All 32 hex digits: object ids are typed back into the CLI, so they must round-trip.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_return_ids_are_deterministic_and_distinct() {
        let a = ObjectId::for_task_return(7, 0);
        assert_eq!(a, ObjectId::for_task_return(7, 0));
        assert_ne!(a, ObjectId::for_task_return(7, 1));
        assert_ne!(a, ObjectId::for_task_return(8, 0));
        assert_eq!(ObjectId::for_task_return(7, 42).return_index(), 42);
        let mut seen = std::collections::HashSet::new();
        for task in 0..1000u128 {
            for index in 0..4 {
                assert!(seen.insert(ObjectId::for_task_return(task, index)));
            }
        }
    }

    #[test]
    fn display_is_full_hex() {
        let id = ObjectId(0xabc);
        assert_eq!(id.to_string(), "00000000000000000000000000000abc");
        assert_eq!(
            format!("{id:?}"),
            "ObjectId(00000000000000000000000000000abc)"
        );
        assert_ne!(ObjectId::random(), ObjectId::random());
    }
}
