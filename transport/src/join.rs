//! The join protocol: how a new node obtains its certificate from the head.
//!
//! The new node generates its key pair locally, connects to the head with ALPN `oxray-join/1`, and authenticates
//! the head by the CA fingerprint in its [`JoinToken`] (no client certificate yet). On one bidirectional stream
//! it sends one frame carrying the token's secret, the node id it wants and its public key; the head checks the
//! secret in constant time, signs a certificate for that public key and answers with it and the CA certificate.
//! A wrong secret gets an error frame and the connection is closed; the head keeps serving everyone else.
//!
//! It is not a general certificate authority: no revocation, no renewal (issue a new token and re-join).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::QuicClientConfig;
use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};

use crate::error::{TransportError, close};
use crate::frame::{FrameType, HEADER_LEN, Header};
use crate::mesh::read_frame;
use crate::message::Message;
use crate::tls::{self, JoinAuthority, JoinToken, NodeIdentity, RawP256};
use crate::{Limits, NodeId};

/// Request kind of a join.
const KIND_JOIN: u16 = 1;
/// Join messages are small: a key and a certificate.
const JOIN_MAX_BYTES: usize = 64 * 1024;
/// How long a join may take end to end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a joining node sends (archived with rkyv, validated by the head).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub(crate) struct JoinRequest {
    secret: [u8; tls::SECRET_LEN],
    node_id: u128,
    /// Uncompressed ECDSA P-256 public key (65 bytes).
    public_key: Vec<u8>,
}

/// What the head answers.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub(crate) struct JoinResponse {
    cert_der: Vec<u8>,
    ca_der: Vec<u8>,
}

fn join_limits() -> Limits {
    Limits {
        max_message_bytes: JOIN_MAX_BYTES,
        ..Limits::default()
    }
}

async fn write(
    send: &mut quinn::SendStream,
    header: &Header,
    body: Bytes,
) -> Result<(), TransportError> {
    let head = Bytes::from(crate::frame::encode_head(header, body.len()));
    send.write_all_chunks(&mut [head, body])
        .await
        .map_err(|e| TransportError::Connect {
            peer: NodeId(header.dest),
            why: e.to_string(),
        })?;
    let _ = send.finish();
    Ok(())
}

/// Obtains a certificate for `node_id` from the head at `head`, using `token`.
pub async fn join(
    head: SocketAddr,
    token: &JoinToken,
    node_id: NodeId,
) -> Result<NodeIdentity, TransportError> {
    tokio::time::timeout(JOIN_TIMEOUT, join_inner(head, token, node_id))
        .await
        .map_err(|_| TransportError::Timeout)?
}

async fn join_inner(
    head: SocketAddr,
    token: &JoinToken,
    node_id: NodeId,
) -> Result<NodeIdentity, TransportError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(tls::TlsError::from)?;
    let bind: SocketAddr = if head.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .map_err(|_| TransportError::malformed("bind address"))?;
    let endpoint = quinn::Endpoint::client(bind)?;
    let quic = QuicClientConfig::try_from(tls::join_client_config(token)?)
        .map_err(|e| TransportError::Handshake { why: e.to_string() })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(crate::mesh::transport_config(&join_limits())?));
    let result = async {
        let conn = endpoint
            .connect_with(cfg, head, "join.oxray")
            .map_err(|e| TransportError::Connect {
                peer: NodeId(0),
                why: e.to_string(),
            })?
            .await
            .map_err(|e| crate::error::from_connection(NodeId(0), e))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| crate::error::from_connection(NodeId(0), e))?;
        let req = JoinRequest {
            secret: *token.secret(),
            node_id: node_id.0,
            public_key: key.public_key_raw().to_vec(),
        };
        let body =
            rkyv::to_bytes::<rkyv::rancor::Error>(&req).map_err(TransportError::malformed)?;
        write(
            &mut send,
            &Header::plain(FrameType::Request, KIND_JOIN, 1, node_id, NodeId(0)),
            Bytes::from_owner(body),
        )
        .await?;
        let (h, buf) = read_frame(&mut recv, &join_limits())
            .await
            .map_err(|e| match e {
                // The head closes the connection after refusing: report why it refused.
                TransportError::Closed | TransportError::Connect { .. } => {
                    TransportError::NotAuthorized {
                        why: format!("head refused the join: {e}"),
                    }
                }
                other => other,
            })?;
        let msg = Message::from_frame(h, buf, HEADER_LEN, Instant::now());
        if h.frame_type() == Some(FrameType::Error) {
            return Err(TransportError::NotAuthorized {
                why: String::from_utf8_lossy(msg.body()).into_owned(),
            });
        }
        let resp = msg.archived::<JoinResponse>()?;
        let cert = CertificateDer::from(resp.cert_der.as_slice().to_vec());
        let ca = CertificateDer::from(resp.ca_der.as_slice().to_vec());
        if tls::fingerprint(&ca) != token.ca_fingerprint() {
            return Err(TransportError::NotAuthorized {
                why: "head returned a ca other than the token's".into(),
            });
        }
        conn.close(close::SHUTDOWN, b"joined");
        let ident =
            NodeIdentity::from_parts(cert, PrivatePkcs8KeyDer::from(key.serialize_der()), ca)?;
        if ident.node_id() != node_id {
            return Err(TransportError::malformed(
                "head issued a certificate for another node id",
            ));
        }
        Ok(ident)
    }
    .await;
    endpoint.close(close::SHUTDOWN, b"done");
    result
}

/// Head side: answers one join connection.
pub(crate) async fn serve(auth: JoinAuthority, conn: quinn::Connection, head: NodeId) {
    let remote = conn.remote_address();
    let served = tokio::time::timeout(JOIN_TIMEOUT, serve_inner(&auth, &conn, head)).await;
    match served {
        Ok(Ok(node)) => {
            info!(%head, %node, %remote, "issued certificate to joining node");
            // Let the answer reach the client; it closes the connection itself.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        }
        Ok(Err(why)) => {
            warn!(%head, %remote, %why, "join refused");
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
            conn.close(close::JOIN_REFUSED, why.as_bytes());
        }
        Err(_) => conn.close(close::JOIN_REFUSED, b"join timed out"),
    }
}

async fn serve_inner(
    auth: &JoinAuthority,
    conn: &quinn::Connection,
    head: NodeId,
) -> Result<NodeId, String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let (h, buf) = read_frame(&mut recv, &join_limits())
        .await
        .map_err(|e| e.to_string())?;
    let msg = Message::from_frame(h, buf, HEADER_LEN, Instant::now());
    let result = check_request(auth, &msg);
    match result {
        Ok((node, public_key)) => {
            let cert = auth
                .ca
                .sign_public_key(node, &RawP256(public_key))
                .map_err(|e| e.to_string())?;
            let resp = JoinResponse {
                cert_der: cert.to_vec(),
                ca_der: auth.ca.cert_der().to_vec(),
            };
            let body = rkyv::to_bytes::<rkyv::rancor::Error>(&resp).map_err(|e| e.to_string())?;
            write(
                &mut send,
                &Header::plain(FrameType::Response, KIND_JOIN, 1, head, node),
                Bytes::from_owner(body),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(node)
        }
        Err(why) => {
            let _ = write(
                &mut send,
                &Header::plain(FrameType::Error, 0, 1, head, NodeId(h.source)),
                Bytes::from(why.clone()),
            )
            .await;
            Err(why)
        }
    }
}

fn check_request(auth: &JoinAuthority, msg: &Message) -> Result<(NodeId, Vec<u8>), String> {
    if msg.kind() != KIND_JOIN {
        return Err(format!("unexpected join message kind {}", msg.kind()));
    }
    let req = msg.archived::<JoinRequest>().map_err(|e| e.to_string())?;
    if !auth.token.secret_matches(&req.secret) {
        return Err("bad join token: secret does not match".into());
    }
    let node = NodeId(req.node_id.to_native());
    if node.0 == 0 {
        return Err("node id 0 is reserved".into());
    }
    let key = req.public_key.as_slice();
    // An uncompressed P-256 point: 0x04 || X || Y.
    if key.len() != 65 || key[0] != 0x04 {
        return Err("public key is not an uncompressed p-256 point".into());
    }
    Ok((node, key.to_vec()))
}
