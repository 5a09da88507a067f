//! oxray's mutually authenticated QUIC mesh.
//!
//! Every oxray process is a node with one QUIC endpoint ([`Mesh`]). Nodes authenticate each other with
//! certificates from the cluster CA ([`tls`]); a node's [`NodeId`] lives in its certificate, so the id a message
//! claims to come from is the id the handshake proved. On top of QUIC the mesh offers three patterns:
//!
//! - request/response with a deadline ([`Mesh::request`], answered through a [`Responder`]);
//! - one-way messages ([`Mesh::send`]);
//! - streamed large payloads, written once into a buffer the receiver provides ([`Mesh::send_stream`],
//!   received as an [`IncomingStream`]).
//!
//! Bodies are usually rkyv archives; the receiver gets them in a 16-byte-aligned buffer and reads them in place
//! with [`Message::archived`], validated, without deserializing.
//!
//! # Map
//! - [`frame`]: the wire format, a sans-IO encoder/validator (fuzzed).
//! - [`tls`]: cluster CA, node identities, join tokens, rustls configurations.
//! - `mesh`: the endpoint driver (peer table, tasks); [`join()`]: how a new node gets its certificate.
//! - `local`: local links, on which one-way messages between nodes of one host skip QUIC (a Unix socket whose
//!   two ends prove with keying material of their QUIC connection that they are its ends; see
//!   [`MeshConfig::local_links`]).
//! - [`Limits`]: every bound, with defaults.
//!
//! What this crate is not: it does not retry requests (it says which errors are retryable), does not know what
//! message kinds mean, and does not discover peers (the GCS node table feeds [`Mesh::add_peer`]).
//!
//! # Walkthrough
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use oxray_transport::{tls::ClusterCa, Handler, Mesh, MeshConfig, Message, NodeId, Responder};
//!
//! /// Answers every request with its own body.
//! struct Echo;
//! impl Handler for Echo {
//!     fn on_request(&self, msg: Message, reply: Responder) {
//!         let kind = msg.kind();
//!         reply.send(kind, msg.into_body());
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 1. Once per cluster: a CA. Each node gets an identity signed by it (or uses `join` with a token).
//! let ca = ClusterCa::generate()?;
//! let (a_id, b_id) = (NodeId::random(), NodeId::random());
//! let localhost = "127.0.0.1:0".parse()?;
//!
//! // 2. Each node binds its endpoint with a handler.
//! let a = Mesh::bind(MeshConfig::new(localhost, ca.issue(a_id)?), Arc::new(Echo)).await?;
//! let b = Mesh::bind(MeshConfig::new(localhost, ca.issue(b_id)?), Arc::new(Echo)).await?;
//!
//! // 3. Tell a where b listens; the connection is made on first use and reused.
//! a.add_peer(b_id, b.local_addr());
//!
//! // 4. Send rkyv archives; the reply's body is aligned and can be read in place.
//! let body = rkyv::to_bytes::<rkyv::rancor::Error>(&vec![1u32, 2, 3])?;
//! let reply = a.request(b_id, 7, bytes::Bytes::from_owner(body), Duration::from_secs(5)).await?;
//! assert_eq!(reply.source(), b_id);
//! assert_eq!(reply.archived::<Vec<u32>>()?.as_slice(), &[1, 2, 3]);
//!
//! // 5. Shut down: drain in-flight requests, then close.
//! a.shutdown().await;
//! b.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::time::Duration;

mod error;
pub mod frame;
mod join;
mod lane;
mod local;
mod mesh;
mod message;
pub mod tls;

#[doc(hidden)]
pub mod testing;

pub use error::TransportError;
pub use frame::TraceContext;
pub use join::join;
pub use mesh::{Handler, Mesh, MeshConfig};
pub use message::{IncomingStream, Message, Responder};

/// A message body: typically the bytes of an rkyv archive (`Bytes::from_owner(rkyv::to_bytes(..)?)`).
pub type Body = bytes::Bytes;

/// Every bound the transport enforces. Defaults suit a LAN cluster; all are per node unless noted.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request, response or one-way body (checked before allocating). Default 64 MiB.
    pub max_message_bytes: usize,
    /// Requests in flight to one peer before `request` answers `Busy`. Default 4096.
    pub max_inflight_per_peer: usize,
    /// Concurrent bidirectional streams a peer may open to us (requests and streams). Default 4096.
    pub max_concurrent_bidi_streams: u32,
    /// Concurrent unidirectional streams a peer may open to us (one-way messages). Default 1024.
    pub max_concurrent_uni_streams: u32,
    /// Bytes a peer may send on one stream ahead of our reading. Default 16 MiB.
    pub stream_receive_window: u64,
    /// Bytes a peer may send on one connection ahead of our reading, all streams together. Set explicitly:
    /// quinn's default is unlimited. Default 64 MiB.
    pub connection_receive_window: u64,
    /// Bytes we buffer for sending on one connection before writes wait. Default 64 MiB.
    pub send_window: u64,
    /// A connection with no traffic for this long is closed (keep-alives count). Default 10 s.
    pub idle_timeout: Duration,
    /// Keep-alive interval; must be below `idle_timeout`. Default 2 s.
    pub keep_alive: Duration,
    /// Limit on dialling plus handshake. Default 5 s.
    pub handshake_timeout: Duration,
    /// Largest streamed payload. Default 64 GiB.
    pub max_stream_payload_bytes: u64,
    /// Deadline of [`Mesh::send_stream`] (transfer plus reply). Default 10 min.
    pub stream_reply_timeout: Duration,
    /// How long [`Mesh::shutdown`] waits for in-flight requests. Default 5 s.
    pub shutdown_grace: Duration,
    /// UDP socket send and receive buffer size requested from the kernel. Default 4 MiB.
    pub socket_buffer_bytes: usize,
    /// Requests whose body is at most this many bytes share one long-lived stream per peer (a lane) instead of
    /// each opening a stream: several times cheaper per request, at the price of head-of-line blocking among
    /// them, which this bound keeps small. 0 gives every request its own stream. Default 16 KiB.
    pub lane_body_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 << 20,
            max_inflight_per_peer: 4096,
            max_concurrent_bidi_streams: 4096,
            max_concurrent_uni_streams: 1024,
            stream_receive_window: 16 << 20,
            connection_receive_window: 64 << 20,
            send_window: 64 << 20,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            max_stream_payload_bytes: 64 << 30,
            stream_reply_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(5),
            socket_buffer_bytes: 4 << 20,
            lane_body_limit: 16 << 10,
        }
    }
}

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
