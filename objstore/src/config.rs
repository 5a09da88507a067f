//! Configuration of one node's object store, and the inline threshold.
//!
//! [`StoreConfig::from_system`] is the only place that reads the machine (`/proc/meminfo`); the parsing itself is a
//! pure function ([`parse_mem_total`]) so it can be tested on fixed text. Nothing here allocates object memory.

use std::path::PathBuf;

/// Results smaller than this travel inside the task reply instead of through the store (Ray uses 100 KiB too).
pub const DEFAULT_INLINE_THRESHOLD: usize = 100 * 1024;

/// Share of physical memory the store may use when no explicit limit is given (Ray's default is 30%).
pub const DEFAULT_MEMORY_FRACTION: f64 = 0.3;

/// Limit used when the machine's memory cannot be read (not Linux, or `/proc` missing).
pub const FALLBACK_MEMORY_LIMIT: usize = 2 << 30;

/// Settings of one [`crate::ObjectStore`].
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Most bytes of object data held in memory at once, buffer pool included. Puts beyond it evict, spill or fail.
    pub memory_limit: usize,
    /// Most bytes kept in the pool of reusable large buffers (counted inside `memory_limit`, trimmed under pressure).
    /// Reusing warm pages is what lets a large `put` run near memcpy speed instead of page-fault speed.
    pub buffer_pool_limit: usize,
    /// Where primary copies are spilled when memory is short; `None` disables spilling (puts then fail when full).
    pub spill_dir: Option<PathBuf>,
    /// Whether each spill file is fsynced before its memory is released. Off by default: spilled objects are a cache
    /// of a live process's memory, not durable state, and a crash loses the store anyway.
    pub spill_fsync: bool,
    /// Results below this size are returned inline by the SDK; see [`StoreConfig::is_inline`].
    pub inline_threshold: usize,
}

impl StoreConfig {
    /// A configuration with an explicit memory limit; spilling goes to a fresh directory under the system temp dir.
    pub fn with_limit(memory_limit: usize) -> Self {
        let spill_dir = std::env::temp_dir().join(format!(
            "oxray-spill-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        StoreConfig {
            memory_limit,
            buffer_pool_limit: memory_limit / 4,
            spill_dir: Some(spill_dir),
            spill_fsync: false,
            inline_threshold: DEFAULT_INLINE_THRESHOLD,
        }
    }

    /// A configuration whose limit is [`DEFAULT_MEMORY_FRACTION`] of this machine's RAM (read from `/proc/meminfo`),
    /// or [`FALLBACK_MEMORY_LIMIT`] if that cannot be read.
    pub fn from_system() -> Self {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| parse_mem_total(&text));
        let limit = match total {
            // Float math on a byte count is fine here: the fraction is a rough policy knob, not an exact quantity.
            Some(bytes) => ((bytes as f64) * DEFAULT_MEMORY_FRACTION) as usize,
            None => FALLBACK_MEMORY_LIMIT,
        };
        Self::with_limit(limit)
    }

    /// Whether a result of `len` bytes should travel inline in the reply rather than through the store.
    pub fn is_inline(&self, len: usize) -> bool {
        len < self.inline_threshold
    }
}

impl Default for StoreConfig {
    /// Same as [`StoreConfig::from_system`].
    fn default() -> Self {
        Self::from_system()
    }
}

/// Whether a result of `len` bytes travels inline under the default threshold ([`DEFAULT_INLINE_THRESHOLD`]).
pub fn is_inline(len: usize) -> bool {
    len < DEFAULT_INLINE_THRESHOLD
}

/// The `MemTotal` line of `/proc/meminfo`, in bytes; `None` if absent or malformed.
pub fn parse_mem_total(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let value: usize = parts.next()?.parse().ok()?;
    let scale = match parts.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24567892 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_567_892 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5 MB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 99999999999999999999 kB\n"), None);
    }

    #[test]
    fn inline_threshold() {
        assert!(is_inline(100 * 1024 - 1));
        assert!(!is_inline(100 * 1024));
        let mut cfg = StoreConfig::with_limit(1 << 20);
        cfg.inline_threshold = 10;
        assert!(cfg.is_inline(9));
        assert!(!cfg.is_inline(10));
        assert!(StoreConfig::from_system().memory_limit > 0);
    }
}
