//! Local links: one-way messages to a peer on the same host over a Unix socket instead of QUIC.
//!
//! Why: on one host, QUIC's per-packet work (encrypting, acknowledging, pacing, two driver tasks per side) is
//! most of a small message's cost. Callgrind put quinn's connection and endpoint drivers at about 31k of the 44k
//! instructions each process spends per synchronous actor call. A Unix socket carries the same frames through
//! the kernel with one `write` and one `read`.
//!
//! What it keeps:
//! - **Authentication, both ways**, derived from the QUIC connection the link belongs to. Both proofs are TLS
//!   exporter values of that connection (RFC 5705/8446 keying material, under two labels and both node ids), which
//!   only its two ends can compute. The dialler sends its node id and its proof; the listener checks the proof
//!   against its own connection to that node, then answers with its proof; the dialler checks that before it
//!   writes anything. A process that is not an end of the connection gets no message in and none out.
//! - **Confidentiality**: bytes on a Unix socket go from one process's memory to the other's through the kernel;
//!   unlike a packet on loopback, nothing else on the host can capture them.
//! - **Order and framing**: the link carries the mesh's ordinary frames (prefix, header, body), in the order
//!   they were written, and the reader checks them as a QUIC one-way stream's reader does.
//! - **Scope**: a link exists only where the listener's name resolves, which is in the same network namespace
//!   of the same host (the name is in Linux's abstract socket namespace, which is per network namespace). Nodes
//!   in other namespaces or on other hosts simply fail to dial and use QUIC. Requests, replies and streamed
//!   payloads stay on QUIC, as does everything that detects a lost peer (keep-alives, idle timeout).
//!
//! The listener's name is derived from its node id. Someone who knows the id could take the name first; then
//! the node cannot listen (its peers use QUIC) and whoever took it cannot answer a dialler's proof (so the
//! dialler uses QUIC too).

use std::time::{Duration, Instant};

use bytes::Bytes;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::TransportError;
use crate::frame::{self, FrameType, HEADER_LEN, Header, PREFIX_LEN};
use crate::message::Message;
use crate::{Limits, NodeId};

const MAGIC: [u8; 4] = *b"OXL1";
const PROOF_LEN: usize = 32;
/// The dialler's hello: magic, its node id, its proof.
const HELLO_LEN: usize = 4 + 16 + PROOF_LEN;
/// The listener's answer: magic, its proof.
const ANSWER_LEN: usize = 4 + PROOF_LEN;
const CLIENT_LABEL: &[u8] = b"EXPORTER-oxray-local-link-dialler";
const SERVER_LABEL: &[u8] = b"EXPORTER-oxray-local-link-listener";
/// Bodies up to this size are written in one `write` with their head; larger ones in two, without a copy.
const COPY_BODY_MAX: usize = 64 << 10;
/// The reader's buffer: many small frames per `read`.
const READ_BUFFER: usize = 64 << 10;
/// How long the listener waits for the dialler's connection to show up in its peer table: a dialler can finish
/// the QUIC handshake a moment before the listener has recorded it.
const CONNECTION_WAIT: Duration = Duration::from_secs(1);

/// The abstract socket name of `node`'s listener (a leading NUL byte marks Linux's abstract namespace).
fn name(node: NodeId) -> String {
    format!("\0oxray/mesh/{:032x}", node.0)
}

/// The proof of one end of `conn`, for a link from `dialler` to `listener`.
fn proof(
    conn: &quinn::Connection,
    label: &[u8],
    dialler: NodeId,
    listener: NodeId,
) -> Option<[u8; PROOF_LEN]> {
    let mut context = [0u8; 32];
    context[..16].copy_from_slice(&dialler.0.to_le_bytes());
    context[16..].copy_from_slice(&listener.0.to_le_bytes());
    let mut out = [0u8; PROOF_LEN];
    conn.export_keying_material(&mut out, label, &context)
        .ok()?;
    Some(out)
}

/// Compares without stopping at the first difference, so the time taken says nothing about the expected value.
fn same(a: &[u8; PROOF_LEN], b: &[u8; PROOF_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Binds `node`'s listener. `None` where there is none to be had (not Linux, or the name is taken).
pub(crate) fn listen(node: NodeId) -> Option<tokio::net::UnixListener> {
    #[cfg(target_os = "linux")]
    {
        let bind = || -> std::io::Result<tokio::net::UnixListener> {
            let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
            socket.set_cloexec(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&socket2::SockAddr::unix(name(node))?)?;
            socket.listen(1024)?;
            tokio::net::UnixListener::from_std(socket.into())
        };
        match bind() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(%node, cause = %e, "no local link listener; local peers will use QUIC");
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = node;
        None
    }
}

/// Dials `to`'s listener and proves that this end holds `conn`. `None` when there is no link to be had (the
/// peer is elsewhere, listens nowhere, or failed its proof): the caller uses QUIC.
pub(crate) async fn dial(
    me: NodeId,
    to: NodeId,
    conn: &quinn::Connection,
    timeout: Duration,
) -> Option<UnixStream> {
    let mine = proof(conn, CLIENT_LABEL, me, to)?;
    let theirs = proof(conn, SERVER_LABEL, me, to)?;
    let connect = || -> std::io::Result<UnixStream> {
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        socket.set_cloexec(true)?;
        // Non-blocking: a Unix socket connects at once or fails (a full backlog gives EAGAIN, not a wait).
        socket.set_nonblocking(true)?;
        socket.connect(&socket2::SockAddr::unix(name(to))?)?;
        UnixStream::from_std(socket.into())
    };
    let mut stream = match connect() {
        Ok(s) => s,
        Err(e) => {
            tracing::trace!(peer = %to, cause = %e, "no local link");
            return None;
        }
    };
    let handshake = async {
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4..20].copy_from_slice(&me.0.to_le_bytes());
        hello[20..].copy_from_slice(&mine);
        stream.write_all(&hello).await?;
        let mut answer = [0u8; ANSWER_LEN];
        stream.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            tracing::debug!(peer = %to, cause = %e, "local link refused; using QUIC");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %to, "local link handshake timed out; using QUIC");
            return None;
        }
    };
    let mut got = [0u8; PROOF_LEN];
    got.copy_from_slice(&answer[4..]);
    if answer[..4] != MAGIC || !same(&got, &theirs) {
        tracing::warn!(peer = %to, "the local link's listener failed its proof; using QUIC");
        return None;
    }
    Some(stream)
}

/// Writes one frame on a link. Small bodies go in one `write` with their head.
pub(crate) async fn write_frame(
    stream: &mut UnixStream,
    header: &Header,
    body: &Bytes,
) -> std::io::Result<()> {
    // One allocation, sized for the body that joins the head.
    let room = PREFIX_LEN
        + HEADER_LEN
        + if body.len() <= COPY_BODY_MAX {
            body.len()
        } else {
            0
        };
    let mut head = frame::encode_head_in(header, body.len(), Vec::with_capacity(room));
    if body.len() <= COPY_BODY_MAX {
        head.extend_from_slice(body);
        stream.write_all(&head).await
    } else {
        stream.write_all(&head).await?;
        stream.write_all(body).await
    }
}

/// The listener's side of a link's handshake: reads the hello, finds the connection it claims through
/// `connection_of`, checks the proof, answers with ours. Returns the dialler's node id.
pub(crate) async fn accept(
    stream: &mut UnixStream,
    me: NodeId,
    connection_of: impl Fn(NodeId) -> Option<quinn::Connection>,
) -> Result<NodeId, String> {
    let mut hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut hello)
        .await
        .map_err(|e| format!("no hello: {e}"))?;
    if hello[..4] != MAGIC {
        return Err("not a local link hello".into());
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&hello[4..20]);
    let peer = NodeId(u128::from_le_bytes(id));
    let mut claimed = [0u8; PROOF_LEN];
    claimed.copy_from_slice(&hello[20..]);
    let give_up = Instant::now() + CONNECTION_WAIT;
    loop {
        let checked = connection_of(peer).and_then(|conn| {
            let expected = proof(&conn, CLIENT_LABEL, peer, me)?;
            same(&expected, &claimed)
                .then(|| proof(&conn, SERVER_LABEL, peer, me))
                .flatten()
        });
        if let Some(ours) = checked {
            let mut answer = [0u8; ANSWER_LEN];
            answer[..4].copy_from_slice(&MAGIC);
            answer[4..].copy_from_slice(&ours);
            stream
                .write_all(&answer)
                .await
                .map_err(|e| format!("answer not sent: {e}"))?;
            return Ok(peer);
        }
        if Instant::now() >= give_up {
            return Err(format!(
                "no connection with {peer} matches the proof of the dialler"
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Reads frames from an accepted link until it ends, handing each one-way message to `deliver` in order.
/// Returns why it stopped, if the stream broke a rule (the messages before were delivered).
pub(crate) async fn read_frames(
    stream: UnixStream,
    peer: NodeId,
    me: NodeId,
    limits: &Limits,
    mut deliver: impl FnMut(Message),
) -> Result<(), TransportError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
    loop {
        let mut prefix = [0u8; PREFIX_LEN];
        // A link ends where a frame would start (the dialler dropped it), or with the peer's process.
        let n = reader.read(&mut prefix).await.unwrap_or(0);
        if n == 0 {
            return Ok(());
        }
        if n < PREFIX_LEN {
            reader
                .read_exact(&mut prefix[n..])
                .await
                .map_err(|e| TransportError::malformed(format!("truncated frame prefix: {e}")))?;
        }
        let p = frame::decode_prefix(&prefix, limits).map_err(TransportError::malformed)?;
        let total = p.header_len + p.body_len;
        let mut buf = AlignedVec::<16>::with_capacity(total.max(16));
        buf.resize(total, 0);
        reader
            .read_exact(&mut buf[..])
            .await
            .map_err(|e| TransportError::malformed(format!("truncated frame: {e}")))?;
        let header = frame::decode_header(&buf).map_err(TransportError::malformed)?;
        if header.source != peer.0
            || header.dest != me.0
            || header.frame_type() != Some(FrameType::Oneway)
        {
            return Err(TransportError::malformed(
                "a frame on a local link that is not a one-way message between its ends",
            ));
        }
        deliver(Message::from_frame(
            header,
            Bytes::from_owner(buf),
            HEADER_LEN,
            Instant::now(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_by_node_and_are_abstract() {
        let a = name(NodeId(1));
        assert!(a.starts_with('\0'));
        assert_ne!(a, name(NodeId(2)));
        // sun_path holds 108 bytes.
        assert!(a.len() < 108);
    }

    fn frame_bytes(source: NodeId, dest: NodeId, kind: FrameType, body: &[u8]) -> Vec<u8> {
        let header = Header::plain(kind, 9, 1, source, dest);
        let mut f = frame::encode_head(&header, body.len());
        f.extend_from_slice(body);
        f
    }

    /// Frames arrive whole, in order and aligned however the bytes are cut; the first frame that is not a
    /// one-way message between the link's ends stops the reader, after the ones before it were delivered.
    #[tokio::test]
    async fn the_reader_delivers_frames_in_order_and_stops_at_a_stranger() {
        let (peer, me) = (NodeId(5), NodeId(6));
        let mut wire = Vec::new();
        for i in 0..50u32 {
            let body = vec![i as u8; (i as usize * 997) % 5000];
            wire.extend(frame_bytes(peer, me, FrameType::Oneway, &body));
        }
        wire.extend(frame_bytes(
            NodeId(7),
            me,
            FrameType::Oneway,
            b"not from the peer",
        ));
        wire.extend(frame_bytes(peer, me, FrameType::Oneway, b"after"));
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            // Odd cuts, so frames and prefixes straddle reads.
            for c in wire.chunks(333) {
                tx.write_all(c).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut got = Vec::new();
        let end = read_frames(rx, peer, me, &Limits::default(), |m| got.push(m)).await;
        assert!(
            matches!(end, Err(TransportError::Malformed { .. })),
            "{end:?}"
        );
        assert_eq!(got.len(), 50);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.body().len(), (i * 997) % 5000);
            assert!(m.body().iter().all(|&b| b == i as u8));
            assert!((m.body().as_ptr() as usize).is_multiple_of(16));
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_oversized_frame_ends_the_link_before_it_is_read() {
        let (peer, me) = (NodeId(5), NodeId(6));
        let limits = Limits {
            max_message_bytes: 100,
            ..Limits::default()
        };
        let (mut tx, rx) = UnixStream::pair().unwrap();
        tx.write_all(&frame_bytes(peer, me, FrameType::Oneway, &[0; 101]))
            .await
            .unwrap();
        let end = read_frames(rx, peer, me, &limits, |_| panic!("delivered")).await;
        assert!(end.is_err());
    }

    #[test]
    fn proofs_compare_in_full() {
        let a = [7u8; PROOF_LEN];
        let mut b = a;
        assert!(same(&a, &b));
        b[PROOF_LEN - 1] ^= 1;
        assert!(!same(&a, &b));
    }
}
