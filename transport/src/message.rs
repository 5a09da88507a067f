//! What a handler receives and answers with: [`Message`], [`Responder`] and [`IncomingStream`].
//!
//! A `Message` owns one 16-byte-aligned buffer holding its archived header and its body, so the body can be
//! read in place as an rkyv archive. These types do no framing of their own; the mesh driver fills them.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::sync::oneshot;

use crate::error::TransportError;
use crate::frame::{ErrorCode, FrameType, Header, TraceContext};
use crate::{Body, NodeId};

/// A received envelope: header fields plus a body that is 16-byte aligned.
///
/// Cloning is cheap (the buffer is reference counted). Dropping it frees the buffer once no `Bytes` taken with
/// [`Message::into_body`] refers to it.
#[derive(Clone)]
pub struct Message {
    header: Header,
    buf: Bytes,
    body_off: usize,
    deadline: Option<Instant>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("kind", &self.header.kind)
            .field("request_id", &self.header.request_id)
            .field("source", &self.source())
            .field("dest", &self.dest())
            .field("body_len", &self.body().len())
            .finish_non_exhaustive()
    }
}

/// Returns `body` if it is 16-byte aligned, else an aligned copy (only the local short-cut needs this: bodies
/// from the network are always read into aligned buffers).
pub(crate) fn aligned(body: Bytes) -> Bytes {
    if (body.as_ptr() as usize).is_multiple_of(16) {
        return body;
    }
    // A zero-capacity vector does not allocate and its dangling pointer is not aligned: reserve at least 16.
    let mut v = AlignedVec::<16>::with_capacity(body.len().max(16));
    v.extend_from_slice(&body);
    Bytes::from_owner(v)
}

impl Message {
    /// Builds a message from a frame buffer (`buf` = header at 0, body at `body_off`, both aligned).
    pub(crate) fn from_frame(
        header: Header,
        buf: Bytes,
        body_off: usize,
        received: Instant,
    ) -> Message {
        let deadline =
            (header.budget_us > 0).then(|| received + Duration::from_micros(header.budget_us));
        Message {
            header,
            buf,
            body_off,
            deadline,
        }
    }

    /// A message delivered through the local short-cut.
    pub(crate) fn local(header: Header, body: Bytes, deadline: Option<Instant>) -> Message {
        Message {
            header,
            buf: aligned(body),
            body_off: 0,
            deadline,
        }
    }

    /// Application message kind.
    pub fn kind(&self) -> u16 {
        self.header.kind
    }

    /// The sending node (authenticated by its certificate for messages from the network).
    pub fn source(&self) -> NodeId {
        NodeId(self.header.source)
    }

    /// The destination node (always this node).
    pub fn dest(&self) -> NodeId {
        NodeId(self.header.dest)
    }

    /// The sender's request id.
    pub fn request_id(&self) -> u64 {
        self.header.request_id
    }

    /// When the sender stops waiting, in this node's clock (`None`: no deadline).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Trace context carried from the sender.
    pub fn trace(&self) -> TraceContext {
        self.header.trace()
    }

    /// For a stream header: the announced payload length.
    pub fn payload_len(&self) -> u64 {
        self.header.payload_len
    }

    /// The body bytes, 16-byte aligned.
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body_off..]
    }

    /// Validates the body as an archived `T` and returns a reference into it (no copy, no deserialization).
    pub fn archived<T>(&self) -> Result<&T::Archived, TransportError>
    where
        T: rkyv::Archive,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rancor::BoxedError>,
            >,
    {
        rkyv::access::<T::Archived, rancor::BoxedError>(self.body())
            .map_err(TransportError::malformed)
    }

    /// The body as `Bytes` sharing this message's buffer (aligned, zero copy).
    pub fn into_body(self) -> Bytes {
        self.buf.slice(self.body_off..)
    }
}

/// What a responder produced.
#[derive(Debug)]
pub(crate) enum Reply {
    Ok { kind: u16, body: Body },
    Err { code: ErrorCode, text: String },
}

impl Reply {
    /// The frame type, kind and body that carry this reply.
    pub(crate) fn parts(self) -> (FrameType, u16, Body) {
        match self {
            Reply::Ok { kind, body } => (FrameType::Response, kind, body),
            Reply::Err { code, text } => (FrameType::Error, code as u16, Bytes::from(text)),
        }
    }

    /// The frame that answers `req` from node `me` on the request's own stream.
    pub(crate) fn answer(self, me: NodeId, req: &Header) -> (Header, Body) {
        let (frame, kind, body) = self.parts();
        let header = Header {
            frame: frame as u8,
            kind,
            request_id: req.request_id,
            source: me.0,
            dest: req.source,
            budget_us: 0,
            trace_id: req.trace_id,
            span_id: req.span_id,
            payload_len: 0,
        };
        (header, body)
    }
}

/// The way to answer one request. Answer exactly once with [`Responder::send`] or [`Responder::error`]; it may
/// be moved to another task first. Dropping it unanswered sends the requester an error ("dropped").
pub struct Responder {
    sink: Option<Sink>,
}

/// Where a reply goes: to the task serving a request's own stream (or the local short-cut), or straight onto
/// the writer of the lane the request came on.
enum Sink {
    Oneshot(oneshot::Sender<Reply>),
    Lane(crate::lane::LaneReply),
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let via = match self.sink {
            Some(Sink::Oneshot(_)) => "stream",
            Some(Sink::Lane(_)) => "lane",
            None => "answered",
        };
        f.debug_struct("Responder").field("via", &via).finish()
    }
}

impl Responder {
    pub(crate) fn new() -> (Responder, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        (
            Responder {
                sink: Some(Sink::Oneshot(tx)),
            },
            rx,
        )
    }

    pub(crate) fn lane(reply: crate::lane::LaneReply) -> Responder {
        Responder {
            sink: Some(Sink::Lane(reply)),
        }
    }

    fn finish(mut self, reply: Reply) {
        self.deliver(reply);
    }

    fn deliver(&mut self, reply: Reply) {
        match self.sink.take() {
            // The requester may have given up (deadline); then nobody wants the reply.
            Some(Sink::Oneshot(tx)) => {
                let _ = tx.send(reply);
            }
            Some(Sink::Lane(lane)) => lane.send(reply),
            None => {}
        }
    }

    /// Sends a successful response.
    pub fn send(self, kind: u16, body: Body) {
        self.finish(Reply::Ok { kind, body });
    }

    /// Sends an error response; the requester gets `TransportError::RemoteError(message)`.
    pub fn error(self, message: impl fmt::Display) {
        self.finish(Reply::Err {
            code: ErrorCode::Handler,
            text: message.to_string(),
        });
    }

    /// Whether the requester has stopped waiting (deadline passed or connection lost).
    /// On a lane this only knows whether the lane itself is gone: the requester's deadline is its own.
    pub fn is_closed(&self) -> bool {
        match &self.sink {
            Some(Sink::Oneshot(tx)) => tx.is_closed(),
            Some(Sink::Lane(lane)) => lane.is_closed(),
            None => true,
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.sink.is_some() {
            self.deliver(Reply::Err {
                code: ErrorCode::Dropped,
                text: "handler dropped the request unanswered".into(),
            });
        }
    }
}

pub(crate) enum Source {
    Remote(quinn::RecvStream),
    Local(Option<Bytes>),
}

/// A large payload arriving after a stream header. Read it once (with [`IncomingStream::read_into`] into a
/// buffer you provide, or [`IncomingStream::read_all`]), then answer with [`IncomingStream::reply`].
///
/// Flow control is QUIC's: the sender can only run `Limits::stream_receive_window` bytes ahead of the reader.
/// Dropping it unanswered stops the stream and sends the sender an error.
pub struct IncomingStream {
    source: Source,
    len: u64,
    consumed: bool,
    responder: Option<Responder>,
}

impl fmt::Debug for IncomingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingStream")
            .field("len", &self.len)
            .field("consumed", &self.consumed)
            .finish()
    }
}

impl IncomingStream {
    pub(crate) fn new(source: Source, len: u64, responder: Responder) -> IncomingStream {
        IncomingStream {
            source,
            len,
            consumed: false,
            responder: Some(responder),
        }
    }

    /// Payload length in bytes, as announced (and enforced: a sender that sends more or less gets an error).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn start(&mut self) -> Result<usize, TransportError> {
        if self.consumed {
            return Err(TransportError::malformed("payload already read"));
        }
        self.consumed = true;
        usize::try_from(self.len).map_err(|_| TransportError::MessageTooLarge {
            size: self.len,
            limit: usize::MAX as u64,
        })
    }

    /// Reads the whole payload into `buf[..len]`, written once, in order. `buf` must hold at least `len()` bytes.
    pub async fn read_into(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let len = self.start()?;
        if buf.len() < len {
            return Err(TransportError::MessageTooLarge {
                size: self.len,
                limit: buf.len() as u64,
            });
        }
        let dst = &mut buf[..len];
        match &mut self.source {
            Source::Local(data) => {
                let data = data.take().unwrap_or_default();
                if data.len() != len {
                    return Err(TransportError::malformed("local payload length mismatch"));
                }
                dst.copy_from_slice(&data);
                Ok(())
            }
            Source::Remote(recv) => {
                let mut off = 0;
                while off < len {
                    let chunk = recv
                        .read_chunk(len - off, true)
                        .await
                        .map_err(read_error)?
                        .ok_or_else(|| {
                            TransportError::malformed(format!(
                                "payload truncated at {off} of {len} bytes"
                            ))
                        })?;
                    let n = chunk.bytes.len();
                    dst[off..off + n].copy_from_slice(&chunk.bytes);
                    off += n;
                }
                expect_end(recv).await
            }
        }
    }

    /// Reads the whole payload into a fresh 16-byte-aligned buffer.
    pub async fn read_all(&mut self) -> Result<Bytes, TransportError> {
        if let Source::Local(data) = &mut self.source {
            self.consumed = true;
            return Ok(aligned(data.take().unwrap_or_default()));
        }
        let len = usize::try_from(self.len).map_err(|_| TransportError::MessageTooLarge {
            size: self.len,
            limit: 0,
        })?;
        let mut v = AlignedVec::<16>::with_capacity(len.max(16));
        let Source::Remote(recv) = &mut self.source else {
            unreachable!("local handled above")
        };
        self.consumed = true;
        while v.len() < len {
            let chunk = recv
                .read_chunk(len - v.len(), true)
                .await
                .map_err(read_error)?
                .ok_or_else(|| {
                    TransportError::malformed(format!(
                        "payload truncated at {} of {len} bytes",
                        v.len()
                    ))
                })?;
            v.extend_from_slice(&chunk.bytes);
        }
        expect_end(recv).await?;
        Ok(Bytes::from_owner(v))
    }

    /// Answers the sender.
    pub fn reply(mut self, kind: u16, body: Body) {
        if let Some(r) = self.responder.take() {
            r.send(kind, body);
        }
    }

    /// Answers the sender with an error.
    pub fn error(mut self, message: impl fmt::Display) {
        if let Some(r) = self.responder.take() {
            r.error(message);
        }
    }

    /// Takes the responder, to answer from elsewhere (the payload can no longer be read after this).
    pub fn into_responder(mut self) -> Responder {
        match self.responder.take() {
            Some(r) => r,
            // Every constructor sets it and only consuming methods take it.
            None => unreachable!("responder taken twice"),
        }
    }
}

async fn expect_end(recv: &mut quinn::RecvStream) -> Result<(), TransportError> {
    match recv.read_chunk(1, true).await.map_err(read_error)? {
        None => Ok(()),
        Some(_) => Err(TransportError::malformed("payload longer than announced")),
    }
}

pub(crate) fn read_error(e: quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::ConnectionLost(c) => crate::error::from_connection(NodeId(0), c),
        quinn::ReadError::Reset(code) => {
            TransportError::malformed(format!("stream reset by peer (code {code})"))
        }
        other => TransportError::malformed(other),
    }
}
