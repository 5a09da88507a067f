//! oxray's mutually authenticated QUIC mesh.
//!
//! This crate is being built out; for now it only holds the identifiers every other crate shares.

use std::fmt;

/// The identity of one node (one process) in an oxray cluster.
///
/// Random at start-up and carried in the node's certificate, so a peer's id is authenticated by the TLS handshake.
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
pub struct NodeId(pub u128);

impl NodeId {
    /// A fresh random id.
    pub fn random() -> Self {
        NodeId(rand::random())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl fmt::Display for NodeId {
    /// The first 12 hex digits: enough to tell nodes apart in logs and tables.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}", self.0 >> 80)
    }
}
