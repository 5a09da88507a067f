//! Lanes: many small requests and their responses on one long-lived bidirectional stream per peer.
//!
//! A stream per request costs QUIC a stream opened, accepted, finished and freed, and the receiver a task, for
//! every request; measured on loopback that is most of the price of a 64-byte request. A lane pays those once.
//! The requester's writer task drains every request queued since its last write into one write; the server
//! reads whole datagrams' worth of frames at once, hands each to the handler, and its writer batches the
//! replies the same way. Responses come back in any order and are matched by request id.
//!
//! On the wire a lane is one ordinary frame (`FrameType::Lane`, naming both ends, checked against the
//! authenticated connection like any request) followed by *lane frames*: a 16-to-48-byte head that leaves the
//! ends out, since they cannot change on the stream (see `frame.rs`). Each frame is split and validated
//! before its body is copied (into a 16-byte-aligned buffer shared by the frames of one chunk).
//!
//! What a lane gives up is isolation: frames on one stream arrive in order, so a lost packet or a large body
//! holds up the frames behind it. Lanes therefore carry only requests whose body is at most
//! `Limits::lane_body_limit`; larger requests and streamed payloads keep a stream of their own.
//!
//! Bounds: the requester has at most `Limits::max_inflight_per_peer` requests in flight (its slots); the server
//! holds at most that many unwritten replies per lane (counted by the lane's [`Gate`]) and stops reading the
//! lane while it is at the bound, so a peer that never reads its replies is slowed by QUIC flow control instead
//! of growing our memory. A reply too large for the requester's limit is answered with an error instead. A frame that
//! breaks a limit or fails validation ends the lane (with an error frame to the peer), never the process.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use rkyv::util::AlignedVec;
use tokio::sync::{Notify, oneshot};

use crate::error::TransportError;
use crate::frame::{self, ErrorCode, FrameType, LaneHead, TraceContext};
use crate::mesh::{ActiveCount, IdHasher};
use crate::message::{Message, Reply, read_error};
use crate::{Body, Limits, NodeId};

/// Bodies up to this size are copied next to their head in a batch; larger ones are written as their own
/// chunk without a copy.
const COPY_BODY_MAX: usize = 1024;
/// Frames written in one batch at most, so one write never holds an unbounded vector.
const MAX_BATCH: usize = 512;

/// A frame waiting for a lane's writer.
pub(crate) struct Outgoing {
    pub(crate) head: LaneHead,
    pub(crate) body: Body,
    /// Server side: the reply's place in its lane's bound (and shutdown's count), released once written.
    pub(crate) _hold: Option<Hold>,
}

/// The frames waiting for a lane's writer task.
///
/// Why not a channel: the writer takes everything queued in one swap of vectors (one lock per write,
/// however many frames), where a channel costs a lock per frame received; and the two vectors' allocations
/// are reused from write to write. Its length is bounded by what feeds it: a requester's slots
/// (`max_inflight_per_peer`) on one side, the lane's [`Gate`] on the other.
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    /// Set once the writer is gone: sends fail, and a responder can tell its requester is unreachable.
    closed: AtomicBool,
    /// Wakes the writer when frames arrive in an empty outbox or the last sender goes.
    ready: Notify,
}

#[derive(Default)]
struct OutboxState {
    frames: Vec<Outgoing>,
    /// Live [`OutboxSender`]s; the writer finishes the stream when none is left and nothing is queued.
    senders: usize,
    closed: bool,
}

/// The sending end of an [`Outbox`]; the writer finishes its stream once every sender is dropped.
pub(crate) struct OutboxSender(Arc<Outbox>);

impl OutboxSender {
    /// Queues a frame; gives it back if the writer is gone.
    pub(crate) fn send(&self, o: Outgoing) -> Result<(), Outgoing> {
        let mut st = self.0.state.lock();
        if st.closed {
            return Err(o);
        }
        let was_empty = st.frames.is_empty();
        st.frames.push(o);
        drop(st);
        // Only the first frame of a batch needs to wake the writer; notify_one keeps a permit if it is busy.
        if was_empty {
            self.0.ready.notify_one();
        }
        Ok(())
    }

    /// Whether the writer is gone (the lane's stream or connection failed).
    pub(crate) fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.senders = st.senders.saturating_sub(1);
        drop(st);
        self.0.ready.notify_one();
    }
}

/// An outbox with one sender, and the writer's handle on it.
fn outbox() -> (OutboxSender, Arc<Outbox>) {
    let outbox = Arc::new(Outbox {
        state: Mutex::new(OutboxState {
            senders: 1,
            ..OutboxState::default()
        }),
        closed: AtomicBool::new(false),
        ready: Notify::new(),
    });
    (OutboxSender(outbox.clone()), outbox)
}

impl Outbox {
    /// Swaps everything queued into `batch` (empty on entry), waiting while nothing is; `false` once every
    /// sender is gone and nothing is left.
    async fn take(&self, batch: &mut Vec<Outgoing>) -> bool {
        loop {
            let ready = self.ready.notified();
            {
                let mut st = self.state.lock();
                if !st.frames.is_empty() {
                    std::mem::swap(&mut st.frames, batch);
                    return true;
                }
                if st.senders == 0 {
                    return false;
                }
            }
            ready.await;
        }
    }

    /// The writer is gone: refuse further frames and drop the queued ones (giving back what they hold).
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let frames = {
            let mut st = self.state.lock();
            st.closed = true;
            std::mem::take(&mut st.frames)
        };
        drop(frames);
    }
}

/// A server lane's count of replies not yet written, and where they are written.
///
/// The lane's reader takes a place per request and waits while all `limit` places are taken; a reply gives
/// its place back once written (or dropped). Why a counter and not a semaphore: the reader is the only one
/// that takes, so a load, an add and a subtract do it without the semaphore's lock and wait list.
/// While any place is taken the gate counts once in the node's active work, which shutdown drains.
pub(crate) struct Gate {
    /// The lane's writer.
    tx: OutboxSender,
    /// Largest reply body the requester accepts (its limit is assumed to be ours), at most what a lane
    /// frame can announce.
    max_body: usize,
    unwritten: AtomicUsize,
    limit: usize,
    /// Wakes the reader when a place frees up at the bound.
    room: Notify,
    active: ActiveCount,
}

impl Gate {
    /// A gate for a lane whose replies go to `tx`.
    pub(crate) fn new(tx: OutboxSender, limits: &Limits, active: ActiveCount) -> Arc<Gate> {
        Arc::new(Gate {
            tx,
            max_body: limits.max_message_bytes.min(frame::LANE_BODY_MAX),
            unwritten: AtomicUsize::new(0),
            limit: limits.max_inflight_per_peer,
            room: Notify::new(),
            active,
        })
    }

    /// Takes a place for one reply if one is free. Only the lane's reader takes places.
    pub(crate) fn try_take(self: &Arc<Gate>) -> Option<Hold> {
        if self.unwritten.load(Ordering::Acquire) >= self.limit {
            return None;
        }
        // The reader alone adds, so the count cannot pass the limit between the check and the add.
        if self.unwritten.fetch_add(1, Ordering::AcqRel) == 0 {
            self.active.add();
        }
        Some(Hold(self.clone()))
    }

    /// Takes a place for one reply, waiting while every place is taken.
    pub(crate) async fn take(self: &Arc<Gate>) -> Hold {
        loop {
            let room = self.room.notified();
            if let Some(hold) = self.try_take() {
                return hold;
            }
            // notify_one leaves a permit when nobody waits yet, so a place freed before this await is not missed.
            room.await;
        }
    }

    /// Queues a frame that holds no place (a complaint about the lane). Fails once the writer is gone.
    pub(crate) fn send(&self, o: Outgoing) {
        // A lane whose writer is gone has lost its connection: the requester learns that on its side.
        let _ = self.tx.send(o);
    }
}

/// One reply's place in its lane's [`Gate`]; given back on drop.
pub(crate) struct Hold(Arc<Gate>);

impl Drop for Hold {
    fn drop(&mut self) {
        let gate = &self.0;
        let before = gate.unwritten.fetch_sub(1, Ordering::AcqRel);
        if before == gate.limit {
            gate.room.notify_one();
        }
        if before == 1 {
            gate.active.sub();
        }
    }
}

/// Splits a lane's byte stream back into frames, each body in a 16-byte-aligned buffer.
#[derive(Default)]
pub(crate) struct FrameReader {
    /// The start of a frame whose end has not arrived yet.
    partial: Vec<u8>,
    frames: Vec<(LaneHead, Range<usize>)>,
    starts: Vec<usize>,
}

impl FrameReader {
    /// Appends to `out` every frame completed by `chunk`, as (head, body). The bodies of one chunk share one
    /// 16-byte-aligned allocation, each starting aligned.
    pub(crate) fn push(
        &mut self,
        chunk: &[u8],
        limits: &Limits,
        out: &mut Vec<(LaneHead, Bytes)>,
    ) -> Result<(), TransportError> {
        // Usually a chunk holds whole frames and is read in place; only a frame split across chunks is copied
        // into `partial` first.
        let joined = (!self.partial.is_empty()).then(|| {
            self.partial.extend_from_slice(chunk);
            std::mem::take(&mut self.partial)
        });
        let data: &[u8] = joined.as_deref().unwrap_or(chunk);
        self.frames.clear();
        let used = frame::split_lane_frames(data, limits, &mut self.frames).map_err(frame_error)?;
        if !self.frames.is_empty() {
            let total: usize = self
                .frames
                .iter()
                .map(|(_, r)| r.len().next_multiple_of(16))
                .sum();
            // A zero-capacity vector's dangling pointer is not aligned: reserve at least 16.
            let mut buf = AlignedVec::<16>::with_capacity(total.max(16));
            self.starts.clear();
            for (_, r) in &self.frames {
                let pad = buf.len().next_multiple_of(16) - buf.len();
                buf.extend_from_slice(&[0u8; 16][..pad]);
                self.starts.push(buf.len());
                buf.extend_from_slice(&data[r.clone()]);
            }
            let buf = Bytes::from_owner(buf);
            for ((head, r), &start) in self.frames.iter().zip(&self.starts) {
                out.push((*head, buf.slice(start..start + r.len())));
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

/// Writes a batch of frames as few chunks: heads and small bodies copied together, large bodies by reference.
fn encode(batch: &[Outgoing]) -> Vec<Bytes> {
    let mut chunks = Vec::new();
    let mut seg: Vec<u8> = Vec::with_capacity(
        batch
            .iter()
            .map(|o| frame::LANE_HEAD_MAX + o.body.len().min(COPY_BODY_MAX))
            .sum(),
    );
    for o in batch {
        let Ok(len) = u32::try_from(o.body.len()) else {
            // Unreachable by construction (requests and replies are checked against LANE_BODY_MAX where they
            // are made); if it ever happens, the requester hears why instead of getting a corrupt stream.
            let head = LaneHead {
                frame: FrameType::Error,
                kind: ErrorCode::TooLarge as u16,
                ..o.head
            };
            let why = b"body too large for a lane";
            frame::encode_lane_head(&head, why.len() as u32, &mut seg);
            seg.extend_from_slice(why);
            continue;
        };
        frame::encode_lane_head(&o.head, len, &mut seg);
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

/// Writes what `outbox` receives into `send`, each batch in one write, until every sender is gone, then
/// finishes the stream. `first` is written before anything else (a requester's lane-opening frame). Returns
/// why it stopped early, if it did; either way the outbox is closed when it returns.
async fn write_loop(
    send: quinn::SendStream,
    outbox: &Outbox,
    first: Option<Bytes>,
) -> Result<(), quinn::WriteError> {
    let result = write_all(send, outbox, first).await;
    outbox.close();
    result
}

async fn write_all(
    mut send: quinn::SendStream,
    outbox: &Outbox,
    first: Option<Bytes>,
) -> Result<(), quinn::WriteError> {
    if let Some(first) = first {
        send.write_chunk(first).await?;
    }
    let mut batch: Vec<Outgoing> = Vec::new();
    while outbox.take(&mut batch).await {
        // Bounded by the outbox's feeders; written in slices so one encoding never holds more than MAX_BATCH.
        for slice in batch.chunks(MAX_BATCH) {
            let mut chunks = encode(slice);
            send.write_all_chunks(&mut chunks).await?;
        }
        // Dropping the written frames gives their places back (lane bound, shutdown's count).
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
    map: HashMap<u64, Waiter, BuildHasherDefault<IdHasher>>,
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
    tx: OutboxSender,
    shared: Arc<Shared>,
}

/// A request that was not sent because its lane had died: the caller may try a fresh lane.
pub(crate) struct NotSent(pub(crate) Body);

impl ClientLane {
    /// Starts a lane on a freshly opened stream: spawns its writer (which sends `open`, the encoded
    /// lane-opening frame, first) and reader.
    pub(crate) fn start(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        open: Bytes,
        conn_id: usize,
        me: NodeId,
        peer: NodeId,
        limits: Limits,
    ) -> ClientLane {
        let (tx, rx) = outbox();
        let shared = Arc::new(Shared {
            peer,
            dead: AtomicBool::new(false),
            waiting: Mutex::new(Waiting::default()),
        });
        let writer_shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = write_loop(send, &rx, Some(open)).await {
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

    /// Queues a request (body at most `frame::LANE_BODY_MAX` bytes) and returns where its response will
    /// arrive. The returned guard forgets the request if the caller stops waiting (deadline, cancellation).
    pub(crate) fn call(
        &self,
        head: LaneHead,
        body: Body,
    ) -> Result<
        (
            oneshot::Receiver<Result<Message, TransportError>>,
            Pending<'_>,
        ),
        NotSent,
    > {
        let (tx, rx) = oneshot::channel();
        let id = head.request_id;
        {
            let mut w = self.shared.waiting.lock();
            if w.dead.is_some() {
                return Err(NotSent(body));
            }
            w.map.insert(id, tx);
        }
        if let Err(o) = self.tx.send(Outgoing {
            head,
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
    let mut waiters = Vec::new();
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
        // Frames up to the first that has no business on this side are delivered; that one ends the lane.
        let good = frames
            .iter()
            .position(|(h, _)| !matches!(h.frame, FrameType::Response | FrameType::Error))
            .unwrap_or(frames.len());
        if let Some((h, _)) = frames.get(good) {
            broken = Some(Death::Malformed(format!(
                "frame type {} not valid on a lane's response side",
                h.frame as u8
            )));
        }
        frames.truncate(good);
        // One lock for the whole chunk's waiters; the replies are handed over after it is released.
        {
            let mut w = shared.waiting.lock();
            waiters.extend(frames.iter().map(|(h, _)| w.map.remove(&h.request_id)));
        }
        for ((h, body), waiter) in frames.drain(..).zip(waiters.drain(..)) {
            let result = match h.frame {
                FrameType::Response => Ok(Message::from_frame(h.header(peer, me), body, 0, now)),
                _ => Err(TransportError::from_remote(h.kind, &body)),
            };
            match waiter {
                Some(tx) => {
                    let _ = tx.send(result);
                }
                // Request id 0 is the server's complaint about the lane itself.
                None if h.request_id == 0 => {
                    if let Err(e) = result {
                        broken = Some(Death::of(&e));
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

/// Where a lane request's reply goes: the lane's writer, with the request it answers and its place in the
/// lane's bound.
pub(crate) struct LaneReply {
    req: LaneHead,
    hold: Hold,
}

impl LaneReply {
    pub(crate) fn new(req: LaneHead, hold: Hold) -> Self {
        LaneReply { req, hold }
    }

    pub(crate) fn send(self, reply: Reply) {
        let (mut frame, mut kind, mut body) = reply.parts();
        // The hold moves into the frame below; the gate it names stays reachable through this clone.
        let gate = self.hold.0.clone();
        if body.len() > gate.max_body {
            // Sent whole, it would end the lane (and every request on it) at the requester's limit check.
            let e = TransportError::MessageTooLarge {
                size: body.len() as u64,
                limit: gate.max_body as u64,
            };
            (frame, kind, body) = (
                FrameType::Error,
                ErrorCode::TooLarge as u16,
                Bytes::from(format!("reply: {e}")),
            );
        }
        let head = LaneHead {
            frame,
            kind,
            request_id: self.req.request_id,
            budget_us: 0,
            trace: self.req.trace,
        };
        // A lane whose writer is gone has lost its connection: the requester learns that on its side.
        let _ = gate.tx.send(Outgoing {
            head,
            body,
            _hold: Some(self.hold),
        });
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.hold.0.tx.is_closed()
    }
}

/// An error frame on a lane: the answer to request `request_id` (0 for a complaint about the lane itself).
pub(crate) fn error_frame(request_id: u64, code: ErrorCode, why: String) -> Outgoing {
    Outgoing {
        head: LaneHead {
            frame: FrameType::Error,
            kind: code as u16,
            request_id,
            budget_us: 0,
            trace: TraceContext::default(),
        },
        body: Bytes::from(why),
        _hold: None,
    }
}

/// Starts the server's writer for a lane; replies go through the returned sender.
pub(crate) fn start_server_writer(send: quinn::SendStream) -> OutboxSender {
    let (tx, rx) = outbox();
    tokio::spawn(async move {
        // A failed write means the connection or the requester's reading side is gone; the requester sees
        // that on its own end.
        let _ = write_loop(send, &rx, None).await;
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(id: u64) -> LaneHead {
        LaneHead {
            frame: FrameType::Request,
            kind: 1,
            request_id: id,
            // Some frames with a deadline or a trace, so heads of every length meet chunk boundaries.
            budget_us: id % 3,
            trace: TraceContext {
                trace_id: u128::from(id % 2),
                span_id: 0,
            },
        }
    }

    fn wire(frames: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let batch: Vec<Outgoing> = frames
            .iter()
            .map(|(id, b)| Outgoing {
                head: head(*id),
                body: Bytes::from(b.clone()),
                _hold: None,
            })
            .collect();
        encode(&batch).concat()
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
                assert_eq!(*h, head(*id));
                assert_eq!(&buf[..], &body[..]);
                assert!((buf.as_ptr() as usize).is_multiple_of(16));
            }
        }
    }

    #[test]
    fn garbage_and_oversized_frames_are_errors() {
        // Garbage with a plausible length: its type byte is refused.
        let mut garbage = [0xABu8; 64];
        garbage[..4].copy_from_slice(&8u32.to_le_bytes());
        let err = FrameReader::default()
            .push(&garbage, &Limits::default(), &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, TransportError::Malformed { .. }), "{err}");
        // Garbage whose length reads as 2.8 GiB: refused by its first four bytes.
        let err = FrameReader::default()
            .push(&[0xAB; 4], &Limits::default(), &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(err, TransportError::MessageTooLarge { .. }),
            "{err}"
        );
        let limits = Limits {
            max_message_bytes: 100,
            ..Limits::default()
        };
        let big = wire(&[(1, vec![0; 101])]);
        let err = FrameReader::default()
            .push(&big[..6], &limits, &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(err, TransportError::MessageTooLarge { .. }),
            "{err}"
        );
    }

    fn frame(id: u64) -> Outgoing {
        Outgoing {
            head: head(id),
            body: Bytes::new(),
            _hold: None,
        }
    }

    #[tokio::test]
    async fn outbox_hands_over_batches_in_order_and_ends_with_its_sender() {
        let (tx, rx) = outbox();
        for id in 1..=3 {
            assert!(tx.send(frame(id)).is_ok());
        }
        let mut batch = Vec::new();
        assert!(rx.take(&mut batch).await);
        let ids: Vec<u64> = batch.iter().map(|o| o.head.request_id).collect();
        assert_eq!(ids, [1, 2, 3]);
        batch.clear();
        // A frame sent while the writer waits wakes it.
        let waiting = tokio::spawn(async move {
            let mut batch = Vec::new();
            let more = rx.take(&mut batch).await;
            (more, batch.len(), rx)
        });
        tokio::task::yield_now().await;
        assert!(tx.send(frame(4)).is_ok());
        let (more, n, rx) = waiting.await.unwrap();
        assert!(more && n == 1);
        // Frames queued before the last sender goes are still handed over, then the outbox ends.
        assert!(tx.send(frame(5)).is_ok());
        drop(tx);
        let mut batch = Vec::new();
        assert!(rx.take(&mut batch).await && batch.len() == 1);
        batch.clear();
        assert!(!rx.take(&mut batch).await);
    }

    #[test]
    fn a_closed_outbox_refuses_frames_and_says_so() {
        let (tx, rx) = outbox();
        assert!(tx.send(frame(1)).is_ok() && !tx.is_closed());
        rx.close();
        assert!(tx.is_closed());
        let back = tx.send(frame(2)).err().map(|o| o.head.request_id);
        assert_eq!(back, Some(2));
        assert!(
            rx.state.lock().frames.is_empty(),
            "queued frames are dropped on close"
        );
    }
}
