//! The transport's error type: what can go wrong talking to a peer, and whether retrying can help.
//!
//! This file only defines and classifies errors; mapping quinn's errors onto them lives here too so every
//! driver reports the same failure the same way.

use crate::NodeId;
use crate::frame::{ErrorCode, FrameError};
use crate::tls::TlsError;

/// Errors of the mesh. `Busy`, `Timeout` and `Connect` are retryable (see [`TransportError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The deadline passed before a response arrived. The request may or may not have run on the peer:
    /// retry only idempotent work.
    #[error("deadline exceeded")]
    Timeout,
    /// Too many requests to this peer are in flight (`Limits::max_inflight_per_peer`). Back off and retry.
    #[error("too many requests in flight to {peer} (limit {limit})")]
    Busy {
        /// The peer.
        peer: NodeId,
        /// The limit in force.
        limit: usize,
    },
    /// No address is known for the node: call `Mesh::add_peer` first (the GCS node table has it).
    #[error("no address known for node {0}")]
    PeerUnknown(NodeId),
    /// The peer could not be reached or the connection broke. Retryable once it is back.
    #[error("cannot reach {peer}: {why}")]
    Connect {
        /// The peer.
        peer: NodeId,
        /// What failed.
        why: String,
    },
    /// The TLS/QUIC handshake failed for a reason other than authorisation (e.g. timeout, protocol mismatch).
    #[error("handshake failed: {why}")]
    Handshake {
        /// What failed.
        why: String,
    },
    /// The peer or we refused the other's identity: no client certificate, a certificate from another CA,
    /// the wrong node, or a bad join token. Not retryable: fix the credentials.
    #[error("not authorized: {why}")]
    NotAuthorized {
        /// Which check failed.
        why: String,
    },
    /// A message or streamed payload exceeded a size limit (ours or the receiver's).
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// Size of the message.
        size: u64,
        /// Limit in force.
        limit: u64,
    },
    /// Bytes from the peer did not form a valid frame or archive; the stream was dropped.
    #[error("malformed input: {why}")]
    Malformed {
        /// What was wrong.
        why: String,
    },
    /// The remote handler answered with an error.
    #[error("remote error: {0}")]
    RemoteError(String),
    /// This mesh (or the remote one) is shut down.
    #[error("transport closed")]
    Closed,
    /// The configuration is inconsistent (e.g. keep-alive not below the idle timeout, a window out of range).
    #[error("invalid configuration: {why}")]
    Config {
        /// What is wrong.
        why: String,
    },
    /// A local I/O failure (binding the socket, reading identity files).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Building or loading TLS identities failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl TransportError {
    /// Whether trying again later can succeed without changing anything (`Busy`, `Timeout`, `Connect`).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TransportError::Busy { .. } | TransportError::Timeout | TransportError::Connect { .. }
        )
    }

    /// Names the peer in a `Connect` error raised where the stream did not know it.
    pub(crate) fn with_peer(self, peer: NodeId) -> TransportError {
        match self {
            TransportError::Connect {
                peer: NodeId(0),
                why,
            } => TransportError::Connect { peer, why },
            other => other,
        }
    }

    pub(crate) fn malformed(why: impl std::fmt::Display) -> TransportError {
        TransportError::Malformed {
            why: why.to_string(),
        }
    }

    /// Maps an error frame received from a peer.
    pub(crate) fn from_remote(code: u16, body: &[u8]) -> TransportError {
        let text = String::from_utf8_lossy(body).into_owned();
        match ErrorCode::from_u16(code) {
            ErrorCode::Handler | ErrorCode::Dropped => TransportError::RemoteError(text),
            ErrorCode::TooLarge => TransportError::RemoteError(format!("too large: {text}")),
            ErrorCode::Malformed => TransportError::Malformed {
                why: format!("peer says: {text}"),
            },
            ErrorCode::Timeout => TransportError::Timeout,
            ErrorCode::ShuttingDown => TransportError::Closed,
        }
    }
}

impl From<FrameError> for TransportError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { size, limit } => TransportError::MessageTooLarge { size, limit },
            other => TransportError::Malformed {
                why: other.to_string(),
            },
        }
    }
}

/// Application close codes the mesh uses on connections.
pub(crate) mod close {
    use quinn::VarInt;
    /// Orderly shutdown.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// A mesh connection without a client certificate (head with optional client auth only).
    pub const NO_CLIENT_CERT: VarInt = VarInt::from_u32(0x101);
    /// A join request was refused.
    pub const JOIN_REFUSED: VarInt = VarInt::from_u32(0x103);
    /// Stream reset code for malformed frames.
    pub const STREAM_MALFORMED: VarInt = VarInt::from_u32(0x201);
}

/// Maps a quinn connection error to ours. `peer` names the node for `Connect` errors.
pub(crate) fn from_connection(peer: NodeId, e: quinn::ConnectionError) -> TransportError {
    use quinn::ConnectionError as C;
    match e {
        C::ApplicationClosed(ref a)
            if a.error_code == close::NO_CLIENT_CERT || a.error_code == close::JOIN_REFUSED =>
        {
            TransportError::NotAuthorized {
                why: String::from_utf8_lossy(&a.reason).into_owned(),
            }
        }
        C::ApplicationClosed(ref a) if a.error_code == close::SHUTDOWN => TransportError::Closed,
        C::TransportError(ref t) if is_crypto(t.code) => TransportError::NotAuthorized {
            why: explain(&e.to_string()),
        },
        C::ConnectionClosed(ref c) if is_crypto(c.error_code) => TransportError::NotAuthorized {
            why: explain(&e.to_string()),
        },
        C::LocallyClosed => TransportError::Closed,
        C::VersionMismatch => TransportError::Handshake { why: e.to_string() },
        other => TransportError::Connect {
            peer,
            why: other.to_string(),
        },
    }
}

/// TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100..=0x1ff.
fn is_crypto(code: quinn_proto::TransportErrorCode) -> bool {
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// Prefixes rustls' terse verdicts with what they mean in a cluster.
fn explain(raw: &str) -> String {
    let meaning = if raw.contains("UnknownIssuer") || raw.contains("BadSignature") {
        "peer certificate is not signed by this cluster's ca"
    } else if raw.contains("not valid for name") {
        "peer certificate belongs to another node"
    } else if raw.contains("CertificateRequired") || raw.contains("error 116") {
        "peer requires a client certificate"
    } else if raw.contains("BadCertificate")
        || raw.contains("error 42")
        || raw.contains("UnknownCA")
        || raw.contains("error 48")
    {
        "peer refused our certificate (another cluster?)"
    } else if raw.contains("NoApplicationProtocol") || raw.contains("error 120") {
        "peer does not speak this protocol (not an oxray node, or not a head for joins)"
    } else {
        "tls handshake refused"
    };
    format!("{meaning}: {raw}")
}
