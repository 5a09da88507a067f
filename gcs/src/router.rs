//! The rule that maps keys to shards.
//!
//! **Rule:** a key's *table* is everything up to and including its first `/` (the whole key if it has none);
//! the shard is `fnv1a64(table) % shards`. So `nodes/abc` and `nodes/xyz` always live on the same shard,
//! and a prefix scan or watch of any prefix that contains a `/` (`nodes/`, `actors/by-name/`) touches exactly
//! one shard, in that shard's revision order. A prefix without a `/` (`no`, or the empty prefix) may span
//! tables, so scans fan out to every shard; watches require a single-shard prefix (see
//! [`ShardMap::span`]). FNV-1a is fixed here (not `std`'s randomly keyed hasher) because every process in the
//! cluster must agree on the mapping forever.
//!
//! This is pure computation with no I/O.

/// Which shards a prefix can touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSpan {
    /// All keys with the prefix live on this shard.
    One(u32),
    /// The prefix may cover several tables; every shard must be asked.
    All,
}

/// The cluster's key-to-shard mapping: just the shard count and the rule in the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMap {
    shards: u32,
}

impl ShardMap {
    /// A map over `shards` shards (at least 1).
    pub fn new(shards: u32) -> Self {
        ShardMap {
            shards: shards.max(1),
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard holding `key`.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        (fnv1a64(table_of(key)) % u64::from(self.shards)) as u32
    }

    /// Which shards hold keys starting with `prefix`.
    pub fn span(&self, prefix: &[u8]) -> ShardSpan {
        if self.shards == 1 {
            return ShardSpan::One(0);
        }
        if prefix.contains(&b'/') {
            ShardSpan::One(self.shard_of(prefix))
        } else {
            ShardSpan::All
        }
    }
}

fn table_of(key: &[u8]) -> &[u8] {
    match key.iter().position(|&b| b == b'/') {
        Some(i) => &key[..=i],
        None => key,
    }
}

fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_stays_on_one_shard() {
        let m = ShardMap::new(8);
        let s = m.shard_of(b"nodes/");
        for k in ["nodes/a", "nodes/b/c", "nodes/zzzz"] {
            assert_eq!(m.shard_of(k.as_bytes()), s);
        }
        assert_eq!(m.span(b"nodes/a"), ShardSpan::One(s));
        assert_eq!(m.span(b"nod"), ShardSpan::All);
        assert_eq!(ShardMap::new(1).span(b""), ShardSpan::One(0));
    }

    #[test]
    fn mapping_is_stable() {
        // Pinned values: changing the rule would silently move every key of a running cluster.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let m = ShardMap::new(4);
        let spread: std::collections::BTreeSet<u32> = (0..64)
            .map(|i| m.shard_of(format!("t{i}/k").as_bytes()))
            .collect();
        assert_eq!(spread.len(), 4, "tables spread over all shards");
    }
}
