//! Lanes: many small requests and their responses on one long-lived bidirectional stream per peer.
//!
//! A stream per request costs QUIC a stream opened, accepted, finished and freed, and the receiver a task, for
//! every request; measured on loopback that is most of the price of a 64-byte request. A lane pays those once.
//! The requester's writer task drains every request queued since its last write into one write; the server
//! reads whole datagrams' worth of frames at once, hands each to the handler, and its writer batches the
//! replies the same way. Responses come back in any order and are matched by request id.
//!
//! What a lane gives up is isolation: frames on one stream arrive in order, so a lost packet or a large body
//! holds up the frames behind it. Lanes therefore carry only requests whose body is at most
//! `Limits::lane_body_limit`; larger requests and streamed payloads keep a stream of their own.
//!
//! Bounds: the requester has at most `Limits::max_inflight_per_peer` requests in flight (its slots); the server
//! holds at most that many unwritten replies per lane and stops reading the lane while it is at the bound, so a
//! peer that never reads its replies is slowed by QUIC flow control instead of growing our memory. A frame that
//! breaks a limit or fails validation ends the lane (with an error frame to the peer), never the process.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use rkyv::util::AlignedVec;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::error::TransportError;
use crate::frame::{self, ErrorCode, FrameType, HEADER_LEN, Header};
use crate::message::{Message, Reply, read_error};
use crate::{Body, Limits, NodeId};

/// Bodies up to this size are copied next to their header in a batch; larger ones are written as their own
/// chunk without a copy.
const COPY_BODY_MAX: usize = 1024;
/// Frames written in one batch at most, so one write never holds an unbounded vector.
const MAX_BATCH: usize = 512;

/// A frame waiting for a lane's writer.
pub(crate) struct Outgoing {
    pub(crate) header: Header,
    pub(crate) body: Body,
    /// Server side: what the reply holds until it is written (a slot of the lane's reply bound, and the
    /// node's count of work that shutdown waits for).
    pub(crate) _hold: Option<Hold>,
}

/// Released when a reply has been written.
pub(crate) struct Hold {
    pub(crate) _permit: OwnedSemaphorePermit,
    pub(crate) _active: crate::mesh::ActiveOwned,
}

/// Splits a lane's byte stream back into frames, each in a 16-byte-aligned buffer.
#[derive(Default)]
pub(crate) struct FrameReader {
    /// The start of a frame whose end has not arrived yet.
    partial: Vec<u8>,
    ranges: Vec<Range<usize>>,
    starts: Vec<usize>,
}

impl FrameReader {
    /// Appends to `out` every frame completed by `chunk`, as (header, buffer with the header at 0 and the body
    /// at `HEADER_LEN`). All frames of one chunk share one allocation.
    pub(crate) fn push(
        &mut self,
        chunk: &[u8],
        limits: &Limits,
        out: &mut Vec<(Header, Bytes)>,
    ) -> Result<(), TransportError> {
        // Usually a chunk holds whole frames and is read in place; only a frame split across chunks is copied
        // into `partial` first.
        let joined = (!self.partial.is_empty()).then(|| {
            self.partial.extend_from_slice(chunk);
            std::mem::take(&mut self.partial)
        });
        let data: &[u8] = joined.as_deref().unwrap_or(chunk);
        self.ranges.clear();
        let used = frame::split_frames(data, limits, &mut self.ranges).map_err(frame_error)?;
        if !self.ranges.is_empty() {
            // Header lengths are multiples of 16, so rounding each frame up keeps every header aligned.
            let total: usize = self
                .ranges
                .iter()
                .map(|r| r.len().next_multiple_of(16))
                .sum();
            let mut buf = AlignedVec::<16>::with_capacity(total.max(16));
            self.starts.clear();
            for r in &self.ranges {
                let pad = buf.len().next_multiple_of(16) - buf.len();
                buf.extend_from_slice(&[0u8; 16][..pad]);
                self.starts.push(buf.len());
                buf.extend_from_slice(&data[r.clone()]);
            }
            let buf = Bytes::from_owner(buf);
            for (r, &start) in self.ranges.iter().zip(&self.starts) {
                let frame = buf.slice(start..start + r.len());
                let header = frame::decode_header(&frame).map_err(frame_error)?;
                out.push((header, frame));
            }
        }
        match joined {
            Some(mut v) => {
                v.drain(..used);
                self.partial = v;
            }
            None => self.partial.extend_from_slice(&chunk[used..]),
        }
        Ok(())
    }
}

fn frame_error(e: frame::FrameError) -> TransportError {
    match e {
        frame::FrameError::TooLarge { size, limit } => {
            TransportError::MessageTooLarge { size, limit }
        }
        other => TransportError::malformed(other),
    }
}

/// Writes a batch of frames as few chunks: headers and small bodies copied together, large bodies by
/// reference.
fn encode(batch: &[Outgoing], scratch: &mut Vec<u8>) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    let mut seg: Vec<u8> = Vec::with_capacity(
        batch
            .iter()
            .map(|o| frame::PREFIX_LEN + HEADER_LEN + o.body.len().min(COPY_BODY_MAX))
            .sum(),
    );
    for o in batch.iter() {
        *scratch = frame::encode_head_in(&o.header, o.body.len(), std::mem::take(scratch));
        seg.extend_from_slice(scratch);
        if o.body.len() <= COPY_BODY_MAX {
            seg.extend_from_slice(&o.body);
        } else {
            chunks.push(Bytes::from(std::mem::take(&mut seg)));
            chunks.push(o.body.clone());
        }
    }
    if !seg.is_empty() {
        chunks.push(Bytes::from(seg));
    }
    chunks
}

/// Drains `rx` into `send` in batches until every sender is gone, then finishes the stream. `first` is
/// written before anything else (a requester's lane-opening frame). Returns why it stopped early, if it did.
async fn write_loop(
    mut send: quinn::SendStream,
    rx: flume::Receiver<Outgoing>,
    first: Option<Outgoing>,
) -> Result<(), quinn::WriteError> {
    let mut batch: Vec<Outgoing> = first.into_iter().collect();
    let mut scratch = Vec::new();
    loop {
        if batch.is_empty() {
            match rx.recv_async().await {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let mut chunks = encode(&batch, &mut scratch);
        send.write_all_chunks(&mut chunks).await?;
        // Dropping the written frames releases what the replies held (reply slots, shutdown's count).
        batch.clear();
    }
    let _ = send.finish();
    Ok(())
}

// ----- requester side -----

type Waiter = oneshot::Sender<Result<Message, TransportError>>;

/// Why a lane died, kept so every request still waiting on it learns the same cause.
#[derive(Clone)]
enum Death {
    Connect(String),
    Malformed(String),
    Closed,
}

impl Death {
    fn of(e: &TransportError) -> Death {
        match e {
            TransportError::Malformed { why } => Death::Malformed(why.clone()),
            TransportError::Closed => Death::Closed,
            other => Death::Connect(other.to_string()),
        }
    }

    fn error(&self, peer: NodeId) -> TransportError {
        match self {
            Death::Connect(why) => TransportError::Connect {
                peer,
                why: why.clone(),
            },
            Death::Malformed(why) => TransportError::malformed(why),
            Death::Closed => TransportError::Closed,
        }
    }
}

#[derive(Default)]
struct Waiting {
    dead: Option<Death>,
    map: HashMap<u64, Waiter>,
}

/// State shared by a requester's lane handle and its reader task.
struct Shared {
    peer: NodeId,
    dead: AtomicBool,
    waiting: Mutex<Waiting>,
}

impl Shared {
    /// Marks the lane dead and fails every request waiting on it. Idempotent.
    fn kill(&self, death: Death) {
        let waiters = {
            let mut w = self.waiting.lock();
            if w.dead.is_none() {
                w.dead = Some(death.clone());
            }
            self.dead.store(true, Ordering::Release);
            std::mem::take(&mut w.map)
        };
        for (_, tx) in waiters {
            let _ = tx.send(Err(death.error(self.peer)));
        }
    }
}

/// The requester's end of a lane to one peer.
pub(crate) struct ClientLane {
    /// The connection the lane's stream is on (`quinn::Connection::stable_id`).
    pub(crate) conn_id: usize,
    tx: flume::Sender<Outgoing>,
    shared: Arc<Shared>,
}

/// A request that was not sent because its lane had died: the caller may try a fresh lane.
pub(crate) struct NotSent(pub(crate) Body);

impl ClientLane {
    /// Starts a lane on a freshly opened stream: spawns its writer (which sends `open` first) and reader.
    pub(crate) fn start(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        open: Header,
        conn_id: usize,
        me: NodeId,
        peer: NodeId,
        limits: Limits,
    ) -> ClientLane {
        let (tx, rx) = flume::unbounded();
        let shared = Arc::new(Shared {
            peer,
            dead: AtomicBool::new(false),
            waiting: Mutex::new(Waiting::default()),
        });
        let first = Outgoing {
            header: open,
            body: Bytes::new(),
            _hold: None,
        };
        let writer_shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = write_loop(send, rx, Some(first)).await {
                writer_shared.kill(Death::Connect(format!("lane write failed: {e}")));
            }
        });
        tokio::spawn(read_responses(recv, shared.clone(), me, limits));
        ClientLane {
            conn_id,
            tx,
            shared,
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Queues a request and returns where its response will arrive. The returned guard forgets the request
    /// if the caller stops waiting (deadline, cancellation).
    pub(crate) fn call(
        &self,
        header: Header,
        body: Body,
    ) -> Result<
        (
            oneshot::Receiver<Result<Message, TransportError>>,
            Pending<'_>,
        ),
        NotSent,
    > {
        let (tx, rx) = oneshot::channel();
        let id = header.request_id;
        {
            let mut w = self.shared.waiting.lock();
            if w.dead.is_some() {
                return Err(NotSent(body));
            }
            w.map.insert(id, tx);
        }
        if let Err(flume::SendError(o)) = self.tx.send(Outgoing {
            header,
            body,
            _hold: None,
        }) {
            self.shared.waiting.lock().map.remove(&id);
            return Err(NotSent(o.body));
        }
        Ok((
            rx,
            Pending {
                shared: &self.shared,
                id,
                done: false,
            },
        ))
    }
}

/// A request waiting on a lane; dropping it before the response came removes it from the lane's table.
pub(crate) struct Pending<'a> {
    shared: &'a Shared,
    id: u64,
    done: bool,
}

impl Pending<'_> {
    /// The response arrived (the reader already removed the entry).
    pub(crate) fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.waiting.lock().map.remove(&self.id);
        }
    }
}

/// The requester's reader: matches responses to waiting requests until the lane ends.
async fn read_responses(
    mut recv: quinn::RecvStream,
    shared: Arc<Shared>,
    me: NodeId,
    limits: Limits,
) {
    let peer = shared.peer;
    let mut reader = FrameReader::default();
    let mut frames = Vec::new();
    let death = loop {
        let chunk = match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => c,
            Ok(None) => break Death::Connect("the peer closed the lane".into()),
            Err(e) => break Death::of(&read_error(e).with_peer(peer)),
        };
        if let Err(e) = reader.push(&chunk.bytes, &limits, &mut frames) {
            let _ = recv.stop(crate::error::close::STREAM_MALFORMED);
            break Death::of(&e);
        }
        let now = Instant::now();
        let mut broken = None;
        for (h, buf) in frames.drain(..) {
            if h.source != peer.0 || h.dest != me.0 {
                broken = Some(Death::Malformed(
                    "lane response does not match the connection".into(),
                ));
                break;
            }
            let result = match h.frame_type() {
                Some(FrameType::Response) => Ok(Message::from_frame(h, buf, HEADER_LEN, now)),
                Some(FrameType::Error) => {
                    Err(TransportError::from_remote(h.kind, &buf[HEADER_LEN..]))
                }
                _ => {
                    broken = Some(Death::Malformed(format!(
                        "frame type {} not valid on a lane",
                        h.frame
                    )));
                    break;
                }
            };
            let waiter = shared.waiting.lock().map.remove(&h.request_id);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(result);
                }
                // Request id 0 is the server's complaint about the lane itself.
                None if h.request_id == 0 => {
                    if let Err(e) = result {
                        broken = Some(Death::of(&e));
                        break;
                    }
                }
                // The requester gave up (deadline) before the answer came.
                None => {}
            }
        }
        if let Some(d) = broken {
            let _ = recv.stop(crate::error::close::STREAM_MALFORMED);
            break d;
        }
    };
    shared.kill(death);
}

// ----- server side -----

/// Where a lane request's reply goes: the lane's writer, with the request it answers.
pub(crate) struct LaneReply {
    tx: flume::Sender<Outgoing>,
    me: NodeId,
    req: Header,
    hold: Hold,
}

impl LaneReply {
    pub(crate) fn new(tx: flume::Sender<Outgoing>, me: NodeId, req: Header, hold: Hold) -> Self {
        LaneReply { tx, me, req, hold }
    }

    pub(crate) fn send(self, reply: Reply) {
        let (header, body) = reply.answer(self.me, &self.req);
        // A lane whose writer is gone has lost its connection: the requester learns that on its side.
        let _ = self.tx.send(Outgoing {
            header,
            body,
            _hold: Some(self.hold),
        });
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_disconnected()
    }
}

/// An error frame on a lane: the answer to request `request_id` of `to` (0 for a complaint about the lane itself).
pub(crate) fn error_frame(
    me: NodeId,
    to: NodeId,
    request_id: u64,
    code: ErrorCode,
    why: String,
) -> Outgoing {
    let req = Header {
        frame: FrameType::Request as u8,
        kind: 0,
        request_id,
        source: to.0,
        dest: me.0,
        budget_us: 0,
        trace_id: 0,
        span_id: 0,
        payload_len: 0,
    };
    let (header, body) = Reply::Err { code, text: why }.answer(me, &req);
    Outgoing {
        header,
        body,
        _hold: None,
    }
}

/// Starts the server's writer for a lane; replies go through the returned sender.
pub(crate) fn start_server_writer(send: quinn::SendStream) -> flume::Sender<Outgoing> {
    let (tx, rx) = flume::unbounded();
    tokio::spawn(async move {
        // A failed write means the connection or the requester's reading side is gone; the requester sees
        // that on its own end.
        let _ = write_loop(send, rx, None).await;
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: u64) -> Header {
        Header {
            frame: FrameType::Request as u8,
            kind: 1,
            request_id: id,
            source: 1,
            dest: 2,
            budget_us: 0,
            trace_id: 0,
            span_id: 0,
            payload_len: 0,
        }
    }

    fn wire(frames: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let batch: Vec<Outgoing> = frames
            .iter()
            .map(|(id, b)| Outgoing {
                header: header(*id),
                body: Bytes::from(b.clone()),
                _hold: None,
            })
            .collect();
        encode(&batch, &mut Vec::new()).concat()
    }

    #[test]
    fn frames_survive_any_chunking() {
        let frames: Vec<(u64, Vec<u8>)> = (0..20u64)
            .map(|i| (i, vec![i as u8; (i as usize * 397) % 3000]))
            .collect();
        let bytes = wire(&frames);
        for step in [1, 7, 16, 113, 1200, bytes.len()] {
            let mut r = FrameReader::default();
            let mut out = Vec::new();
            for c in bytes.chunks(step) {
                r.push(c, &Limits::default(), &mut out).unwrap();
            }
            assert!(r.partial.is_empty(), "step {step}");
            assert_eq!(out.len(), frames.len(), "step {step}");
            for ((h, buf), (id, body)) in out.iter().zip(&frames) {
                assert_eq!(h.request_id, *id);
                assert_eq!(&buf[HEADER_LEN..], &body[..]);
                assert!((buf.as_ptr() as usize).is_multiple_of(16));
            }
        }
    }

    #[test]
    fn garbage_and_oversized_frames_are_errors() {
        let mut r = FrameReader::default();
        let err = r
            .push(&[0xAB; 64], &Limits::default(), &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, TransportError::Malformed { .. }), "{err}");
        let limits = Limits {
            max_message_bytes: 100,
            ..Limits::default()
        };
        let big = wire(&[(1, vec![0; 101])]);
        let err = FrameReader::default()
            .push(&big[..20], &limits, &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(err, TransportError::MessageTooLarge { .. }),
            "{err}"
        );
    }
}
