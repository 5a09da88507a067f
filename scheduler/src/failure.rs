//! Failure detector core: heartbeats in, dead nodes out.
//!
//! A node is declared dead when no heartbeat has arrived for [`FailureConfig::timeout_ms`].
//! Death is final for a node id (a restarted process joins with a new id), so late heartbeats
//! from a dead node are reported as [`Heartbeat::FromDead`] and never revive it; the runtime
//! should tell that peer to shut down. Time is the caller's monotonic clock in milliseconds.
//! It is a plain timeout detector, not a phi-accrual one: the bound is explicit and easy to
//! reason about for retries. No I/O, no clock reads.

use std::collections::HashMap;

use oxray_transport::NodeId;

use crate::view::IdBuild;

/// Detector limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureConfig {
    /// Silence after which a node is declared dead.
    pub timeout_ms: u64,
    /// Most nodes watched (ids beyond it are refused with [`Heartbeat::Refused`]).
    pub max_nodes: usize,
    /// Most dead ids remembered (oldest forgotten first) to recognise late heartbeats.
    pub max_dead_remembered: usize,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            timeout_ms: 10_000,
            max_nodes: 100_000,
            max_dead_remembered: 100_000,
        }
    }
}

/// What a heartbeat did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// First heartbeat from this node: it is now watched.
    Joined,
    /// Deadline extended.
    Refreshed,
    /// The node was already declared dead; the heartbeat is ignored.
    FromDead,
    /// The detector is at [`FailureConfig::max_nodes`].
    Refused,
}

/// Timeout failure detector. See the module docs.
#[derive(Debug, Default)]
pub struct FailureDetector {
    config: FailureConfig,
    last_seen: HashMap<NodeId, u64, IdBuild>,
    dead: HashMap<NodeId, u64, IdBuild>,
    dead_order: std::collections::VecDeque<NodeId>,
}

impl FailureDetector {
    /// A detector with this configuration.
    pub fn new(config: FailureConfig) -> Self {
        FailureDetector {
            config,
            ..Default::default()
        }
    }

    /// Records a heartbeat from `node` at `now`.
    pub fn heartbeat(&mut self, node: NodeId, now: u64) -> Heartbeat {
        if self.dead.contains_key(&node) {
            return Heartbeat::FromDead;
        }
        if let Some(t) = self.last_seen.get_mut(&node) {
            // Never move a deadline backwards, even if timestamps arrive out of order.
            *t = (*t).max(now);
            return Heartbeat::Refreshed;
        }
        if self.last_seen.len() >= self.config.max_nodes {
            return Heartbeat::Refused;
        }
        self.last_seen.insert(node, now);
        Heartbeat::Joined
    }

    /// Stops watching a node that left cleanly (not declared dead).
    pub fn remove(&mut self, node: NodeId) -> bool {
        self.last_seen.remove(&node).is_some()
    }

    /// Declares `node` dead now (e.g. its connection reported a fatal error). Returns `false`
    /// if it was not watched.
    pub fn declare_dead(&mut self, node: NodeId, now: u64) -> bool {
        if self.last_seen.remove(&node).is_none() {
            return false;
        }
        self.remember_dead(node, now);
        true
    }

    fn remember_dead(&mut self, node: NodeId, now: u64) {
        if self.dead_order.len() >= self.config.max_dead_remembered
            && let Some(old) = self.dead_order.pop_front()
        {
            self.dead.remove(&old);
        }
        self.dead.insert(node, now);
        self.dead_order.push_back(node);
    }

    /// Nodes silent for longer than the timeout at `now`, each reported once, sorted.
    pub fn poll(&mut self, now: u64) -> Vec<NodeId> {
        let timeout = self.config.timeout_ms;
        let mut newly: Vec<NodeId> = self
            .last_seen
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) >= timeout)
            .map(|(n, _)| *n)
            .collect();
        newly.sort_unstable();
        for n in &newly {
            self.last_seen.remove(n);
            self.remember_dead(*n, now);
        }
        newly
    }

    /// When the next node could be declared dead, for the driver's timer.
    pub fn next_deadline(&self) -> Option<u64> {
        self.last_seen
            .values()
            .min()
            .map(|t| t.saturating_add(self.config.timeout_ms))
    }

    /// Whether `node` has been declared dead (and is still remembered).
    pub fn is_dead(&self, node: NodeId) -> bool {
        self.dead.contains_key(&node)
    }

    /// Nodes currently watched.
    pub fn watched(&self) -> usize {
        self.last_seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_node_dies_once_and_stays_dead() {
        let mut d = FailureDetector::new(FailureConfig {
            timeout_ms: 100,
            ..Default::default()
        });
        assert_eq!(d.heartbeat(NodeId(1), 0), Heartbeat::Joined);
        assert_eq!(d.heartbeat(NodeId(2), 0), Heartbeat::Joined);
        assert_eq!(d.heartbeat(NodeId(1), 60), Heartbeat::Refreshed);
        assert_eq!(d.next_deadline(), Some(100));
        assert!(d.poll(99).is_empty());
        assert_eq!(d.poll(100), vec![NodeId(2)]);
        assert!(d.poll(100).is_empty());
        assert_eq!(d.poll(160), vec![NodeId(1)]);
        assert_eq!(d.heartbeat(NodeId(2), 170), Heartbeat::FromDead);
        assert!(d.is_dead(NodeId(2)));
        assert_eq!(d.watched(), 0);
        // A heartbeat with an older timestamp never shortens the deadline.
        d.heartbeat(NodeId(3), 500);
        d.heartbeat(NodeId(3), 400);
        assert!(d.poll(599).is_empty());
        assert!(d.declare_dead(NodeId(3), 550));
        assert!(!d.declare_dead(NodeId(3), 560));
    }

    #[test]
    fn limits_hold() {
        let mut d = FailureDetector::new(FailureConfig {
            timeout_ms: 1,
            max_nodes: 2,
            max_dead_remembered: 1,
        });
        d.heartbeat(NodeId(1), 0);
        d.heartbeat(NodeId(2), 0);
        assert_eq!(d.heartbeat(NodeId(3), 0), Heartbeat::Refused);
        assert_eq!(d.poll(5).len(), 2);
        assert_eq!(d.dead.len(), 1);
    }
}
