//! Envelope framing: the sans-IO core that encodes and validates frames.
//!
//! A frame on a QUIC stream is
//!
//! ```text
//! +---------------+----------------+---------------+----------------------+-------------+
//! | magic "OXR1"  | header_len u32 | body_len u64  | header (rkyv archive)| body        |
//! |   4 bytes     |   LE           |   LE          | header_len bytes     | body_len    |
//! +---------------+----------------+---------------+----------------------+-------------+
//! ```
//!
//! The 16-byte prefix is checked against the limits *before* anything is allocated, so a 4 GiB length is refused
//! for the price of 16 bytes. The receiver then reads header and body with one copy into one 16-byte-aligned
//! buffer; the header length is a multiple of 16, so the body starts aligned too. The header is validated with
//! bytecheck before a field is read. A streamed payload (`FrameType::Stream`) follows its frame as raw bytes.
//!
//! A lane (a long-lived stream of many small requests, see `lane.rs`) opens with one such frame and then
//! carries *lane frames*, whose head is cut to what a lane needs:
//!
//! ```text
//! +-------------+---------+----------+----------+----------------+------------------+-------------------------------+------+
//! | body_len u32| type u8 | flags u8 | kind u16 | request_id u64 | [budget_us u64]  | [trace_id u128, span_id u64]  | body |
//! |             |         |          |          |                | flags & BUDGET   | flags & TRACE                 |      |
//! +-------------+---------+----------+----------+----------------+------------------+-------------------------------+------+
//! ```
//!
//! all little-endian, 16 to 48 bytes. Source and destination are the lane's two ends, fixed by the opening
//! frame and the authenticated connection, so they do not travel per frame; deadline and trace context travel
//! only when set. The head is encoded and decoded by hand, with bounds checks, rather than as an rkyv archive:
//! it is a few scalars at offsets the flags determine, and for a 64-byte request the archive's 112 bytes,
//! its serializer and its bytecheck validation were a measurable part of the cost. The length is checked
//! against the limits as soon as its four bytes are in; unknown types and flags are errors.
//!
//! This module does no I/O and reads no clock: deadlines travel as a remaining budget in microseconds.

use rkyv::rancor;

use crate::{Limits, NodeId};

/// The four magic bytes that open every frame: a cheap check that the peer speaks this protocol version.
pub const MAGIC: [u8; 4] = *b"OXR1";
/// Length of the fixed prefix.
pub const PREFIX_LEN: usize = 16;

/// What a frame is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// A request that expects one response on the same stream.
    Request = 1,
    /// A successful response.
    Response = 2,
    /// A failed response: `kind` holds an [`ErrorCode`], the body a UTF-8 message.
    Error = 3,
    /// A one-way message.
    Oneway = 4,
    /// A request followed by `payload_len` raw bytes on the same stream.
    Stream = 5,
    /// Opens a lane: a long-lived stream that carries many small requests one way and their responses the
    /// other, matched by request id (see `lane.rs`). Sent once, with an empty body, as the stream's first frame.
    Lane = 6,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            1 => FrameType::Request,
            2 => FrameType::Response,
            3 => FrameType::Error,
            4 => FrameType::Oneway,
            5 => FrameType::Stream,
            6 => FrameType::Lane,
            _ => return None,
        })
    }
}

/// Why a remote side answered with an error frame (carried in the `kind` of an error frame).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The handler replied with an error.
    Handler = 1,
    /// The request or payload exceeded a limit of the receiver.
    TooLarge = 2,
    /// The request was malformed.
    Malformed = 3,
    /// The handler did not answer before the deadline.
    Timeout = 4,
    /// The receiver is shutting down.
    ShuttingDown = 5,
    /// The handler dropped the request without answering.
    Dropped = 6,
}

impl ErrorCode {
    /// Decodes a code; unknown codes are treated as handler errors (forward compatible).
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            2 => ErrorCode::TooLarge,
            3 => ErrorCode::Malformed,
            4 => ErrorCode::Timeout,
            5 => ErrorCode::ShuttingDown,
            6 => ErrorCode::Dropped,
            _ => ErrorCode::Handler,
        }
    }
}

/// W3C-style trace context carried across the wire so spans on both sides join one trace.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// Trace id; 0 means "not traced".
    pub trace_id: u128,
    /// Parent span id.
    pub span_id: u64,
}

/// The envelope header. Its archived form is what travels; fields are plain scalars so the archive has a
/// fixed size (a multiple of 16, see the assertion below).
#[derive(Copy, Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Header {
    /// [`FrameType`] as a byte (validated on decode).
    pub frame: u8,
    /// Application message kind (or [`ErrorCode`] in an error frame).
    pub kind: u16,
    /// Correlates a response with its request (on a lane, the only thing that does).
    pub request_id: u64,
    /// Sender node id.
    pub source: u128,
    /// Destination node id.
    pub dest: u128,
    /// Remaining time budget in microseconds when sent; 0 = no deadline.
    pub budget_us: u64,
    /// Trace id (0 = none).
    pub trace_id: u128,
    /// Parent span id.
    pub span_id: u64,
    /// Length of the raw payload that follows a `Stream` frame; 0 otherwise.
    pub payload_len: u64,
}

/// Size of an archived header on the wire.
pub const HEADER_LEN: usize = std::mem::size_of::<ArchivedHeader>();
const _: () = assert!(
    HEADER_LEN.is_multiple_of(16),
    "the body must start 16-byte aligned"
);

impl Header {
    /// The envelope of one message with no deadline, trace or streamed payload.
    pub fn plain(
        frame: FrameType,
        kind: u16,
        request_id: u64,
        source: NodeId,
        dest: NodeId,
    ) -> Header {
        Header {
            frame: frame as u8,
            kind,
            request_id,
            source: source.0,
            dest: dest.0,
            budget_us: 0,
            trace_id: 0,
            span_id: 0,
            payload_len: 0,
        }
    }

    /// The decoded frame type (always valid for a header that came out of [`decode_header`]).
    pub fn frame_type(&self) -> Option<FrameType> {
        FrameType::from_u8(self.frame)
    }
    /// Source as a node id.
    pub fn source(&self) -> NodeId {
        NodeId(self.source)
    }
    /// Destination as a node id.
    pub fn dest(&self) -> NodeId {
        NodeId(self.dest)
    }
    /// Trace context.
    pub fn trace(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: self.span_id,
        }
    }
}

/// Decoding failures. Each one ends the stream it happened on (never the process).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The prefix did not start with the magic bytes: garbage or another protocol version.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The header length is not the one this protocol version uses.
    #[error("bad header length {0}")]
    BadHeaderLen(u32),
    /// The body (or streamed payload) is larger than the limit; nothing was allocated for it.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced size.
        size: u64,
        /// Limit in force.
        limit: u64,
    },
    /// The header bytes failed validation.
    #[error("invalid header: {0}")]
    BadHeader(String),
    /// The header names an unknown frame type.
    #[error("unknown frame type {0}")]
    BadFrameType(u8),
    /// The buffer holding the header was not 16-byte aligned (a bug in the caller, not the peer).
    #[error("header buffer not aligned")]
    Misaligned,
    /// A lane frame of a type that lanes do not carry.
    #[error("frame type {0} not valid on a lane")]
    NotOnLane(u8),
    /// A lane frame with flag bits this protocol version does not define.
    #[error("unknown lane frame flags {0:#04x}")]
    BadFlags(u8),
}

/// Lengths announced by a valid prefix.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Header bytes that follow the prefix.
    pub header_len: usize,
    /// Body bytes that follow the header.
    pub body_len: usize,
}

/// Encodes the prefix and header of a frame whose body is `body_len` bytes long.
pub fn encode_head(header: &Header, body_len: usize) -> Vec<u8> {
    encode_head_in(
        header,
        body_len,
        Vec::with_capacity(PREFIX_LEN + HEADER_LEN),
    )
}

/// [`encode_head`] into a caller's (cleared) buffer, so a writer of many frames reuses one allocation.
pub fn encode_head_in(header: &Header, body_len: usize, mut out: Vec<u8>) -> Vec<u8> {
    // The serializer pads relative to the buffer's start: it must start empty for the layout to be the wire's.
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(body_len as u64).to_le_bytes());
    // The prefix is 16 bytes, so positions the serializer pads to are aligned in the receiver's buffer too.
    match rkyv::api::high::to_bytes_in::<_, rancor::Failure>(header, out) {
        Ok(out) => out,
        // Serializing plain scalars into a Vec cannot fail; if rkyv ever disagrees, that is a bug to see loudly.
        Err(e) => unreachable!("serializing a header of scalars failed: {e}"),
    }
}

/// Checks a prefix against the limits. Runs before any allocation for the frame.
pub fn decode_prefix(prefix: &[u8; PREFIX_LEN], limits: &Limits) -> Result<Prefix, FrameError> {
    let magic = [prefix[0], prefix[1], prefix[2], prefix[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let header_len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if header_len as usize != HEADER_LEN {
        return Err(FrameError::BadHeaderLen(header_len));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&prefix[8..16]);
    let body_len = u64::from_le_bytes(len8);
    let limit = limits.max_message_bytes as u64;
    if body_len > limit {
        return Err(FrameError::TooLarge {
            size: body_len,
            limit,
        });
    }
    // body_len <= max_message_bytes, a usize, so the conversion is lossless.
    Ok(Prefix {
        header_len: HEADER_LEN,
        body_len: body_len as usize,
    })
}

/// Validates and decodes a header from the start of a 16-byte-aligned buffer.
pub fn decode_header(bytes: &[u8]) -> Result<Header, FrameError> {
    let bytes = bytes
        .get(..HEADER_LEN)
        .ok_or(FrameError::BadHeaderLen(bytes.len() as u32))?;
    if !(bytes.as_ptr() as usize).is_multiple_of(16) {
        return Err(FrameError::Misaligned);
    }
    let archived = rkyv::access::<ArchivedHeader, rancor::Error>(bytes)
        .map_err(|e| FrameError::BadHeader(e.to_string()))?;
    let header = Header {
        frame: archived.frame,
        kind: archived.kind.to_native(),
        request_id: archived.request_id.to_native(),
        source: archived.source.to_native(),
        dest: archived.dest.to_native(),
        budget_us: archived.budget_us.to_native(),
        trace_id: archived.trace_id.to_native(),
        span_id: archived.span_id.to_native(),
        payload_len: archived.payload_len.to_native(),
    };
    if FrameType::from_u8(header.frame).is_none() {
        return Err(FrameError::BadFrameType(header.frame));
    }
    Ok(header)
}

/// Fixed part of a lane frame's head: body length, type, flags, kind, request id.
pub const LANE_HEAD_MIN: usize = 16;
/// Longest lane frame head: the fixed part, a budget and a trace context.
pub const LANE_HEAD_MAX: usize = LANE_HEAD_MIN + 8 + 24;
/// Largest body a lane frame can announce (its length field is a `u32`).
pub const LANE_BODY_MAX: usize = u32::MAX as usize;
/// Lane flag: an 8-byte remaining budget in microseconds follows the fixed head.
const FLAG_BUDGET: u8 = 1;
/// Lane flag: a 24-byte trace context (trace id, span id) follows.
const FLAG_TRACE: u8 = 2;

/// The head of a lane frame, decoded. Source and destination are not here: they are the lane's ends.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LaneHead {
    /// [`FrameType::Request`], [`FrameType::Response`] or [`FrameType::Error`].
    pub frame: FrameType,
    /// Application message kind (or [`ErrorCode`] in an error frame).
    pub kind: u16,
    /// Correlates a response with its request; 0 in an error frame is a complaint about the lane itself.
    pub request_id: u64,
    /// Remaining time budget in microseconds when sent; 0 = no deadline (and none on the wire).
    pub budget_us: u64,
    /// Trace context; the default (all zero) is not sent.
    pub trace: TraceContext,
}

impl LaneHead {
    /// The full envelope header this head stands for on a lane from `source` to `dest`.
    pub fn header(&self, source: NodeId, dest: NodeId) -> Header {
        Header {
            frame: self.frame as u8,
            kind: self.kind,
            request_id: self.request_id,
            source: source.0,
            dest: dest.0,
            budget_us: self.budget_us,
            trace_id: self.trace.trace_id,
            span_id: self.trace.span_id,
            payload_len: 0,
        }
    }
}

fn lane_type(v: u8) -> Result<FrameType, FrameError> {
    match FrameType::from_u8(v) {
        Some(t @ (FrameType::Request | FrameType::Response | FrameType::Error)) => Ok(t),
        Some(_) => Err(FrameError::NotOnLane(v)),
        None => Err(FrameError::BadFrameType(v)),
    }
}

/// Appends the head of a lane frame whose body is `body_len` bytes to `out`.
pub fn encode_lane_head(head: &LaneHead, body_len: u32, out: &mut Vec<u8>) {
    let mut flags = 0;
    if head.budget_us != 0 {
        flags |= FLAG_BUDGET;
    }
    if head.trace != TraceContext::default() {
        flags |= FLAG_TRACE;
    }
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&[head.frame as u8, flags]);
    out.extend_from_slice(&head.kind.to_le_bytes());
    out.extend_from_slice(&head.request_id.to_le_bytes());
    if flags & FLAG_BUDGET != 0 {
        out.extend_from_slice(&head.budget_us.to_le_bytes());
    }
    if flags & FLAG_TRACE != 0 {
        out.extend_from_slice(&head.trace.trace_id.to_le_bytes());
        out.extend_from_slice(&head.trace.span_id.to_le_bytes());
    }
}

/// `N` bytes of `buf` from `at`, or `None` past its end.
fn bytes_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Decodes the lane frame at the start of `buf`: its head, and where its body lies in `buf`. `Ok(None)` means
/// the frame is not complete yet. A length over the limit is an error as soon as its four bytes are in, so a
/// reader never waits for (or buffers) more than one allowed frame.
pub fn decode_lane_frame(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(LaneHead, std::ops::Range<usize>)>, FrameError> {
    let Some(len) = bytes_at::<4>(buf, 0) else {
        return Ok(None);
    };
    let body_len = u32::from_le_bytes(len) as usize;
    if body_len > limits.max_message_bytes {
        return Err(FrameError::TooLarge {
            size: body_len as u64,
            limit: limits.max_message_bytes as u64,
        });
    }
    let (Some(&ty), Some(&flags)) = (buf.get(4), buf.get(5)) else {
        return Ok(None);
    };
    let frame = lane_type(ty)?;
    if flags & !(FLAG_BUDGET | FLAG_TRACE) != 0 {
        return Err(FrameError::BadFlags(flags));
    }
    let head_len = LANE_HEAD_MIN
        + if flags & FLAG_BUDGET != 0 { 8 } else { 0 }
        + if flags & FLAG_TRACE != 0 { 24 } else { 0 };
    // head_len <= 48 and body_len <= max_message_bytes, a usize: no overflow.
    let end = head_len + body_len;
    if buf.len() < end {
        return Ok(None);
    }
    // Every read below lies inside buf[..head_len], checked just above; `?` on None cannot fire but keeps
    // the decoder free of indexing that could panic.
    let missing = || FrameError::BadHeaderLen(head_len as u32);
    let mut head = LaneHead {
        frame,
        kind: u16::from_le_bytes(bytes_at(buf, 6).ok_or_else(missing)?),
        request_id: u64::from_le_bytes(bytes_at(buf, 8).ok_or_else(missing)?),
        budget_us: 0,
        trace: TraceContext::default(),
    };
    let mut at = LANE_HEAD_MIN;
    if flags & FLAG_BUDGET != 0 {
        head.budget_us = u64::from_le_bytes(bytes_at(buf, at).ok_or_else(missing)?);
        at += 8;
    }
    if flags & FLAG_TRACE != 0 {
        head.trace = TraceContext {
            trace_id: u128::from_le_bytes(bytes_at(buf, at).ok_or_else(missing)?),
            span_id: u64::from_le_bytes(bytes_at(buf, at + 16).ok_or_else(missing)?),
        };
    }
    Ok(Some((head, head_len..end)))
}

/// Splits the lane frames that are complete in `buf` (a byte stream of back-to-back lane frames): appends each
/// one's head and body range to `out` and returns how many bytes they used up; the rest is the start of a frame
/// still arriving.
pub fn split_lane_frames(
    buf: &[u8],
    limits: &Limits,
    out: &mut Vec<(LaneHead, std::ops::Range<usize>)>,
) -> Result<usize, FrameError> {
    let mut off = 0;
    while let Some(rest) = buf.get(off..) {
        let Some((head, body)) = decode_lane_frame(rest, limits)? else {
            break;
        };
        out.push((head, off + body.start..off + body.end));
        off += body.end;
    }
    Ok(off)
}

/// Decodes a whole frame held in one aligned buffer (prefix included): the fuzz target's entry point, and
/// the reference the streaming reader must agree with.
pub fn decode_frame<'a>(buf: &'a [u8], limits: &Limits) -> Result<(Header, &'a [u8]), FrameError> {
    let prefix: &[u8; PREFIX_LEN] = buf
        .get(..PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(FrameError::BadHeaderLen(0))?;
    let p = decode_prefix(prefix, limits)?;
    let rest = &buf[PREFIX_LEN..];
    let header = decode_header(rest)?;
    let body = rest
        .get(p.header_len..p.header_len + p.body_len)
        .ok_or(FrameError::TooLarge {
            size: p.body_len as u64,
            limit: rest.len() as u64,
        })?;
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            frame: FrameType::Request as u8,
            kind: 7,
            request_id: 42,
            source: 1,
            dest: 2,
            budget_us: 1000,
            trace_id: 3,
            span_id: 4,
            payload_len: 0,
        }
    }

    #[test]
    fn head_is_prefix_plus_header() {
        let head = encode_head(&header(), 5);
        assert_eq!(head.len(), PREFIX_LEN + HEADER_LEN);
    }

    #[test]
    fn four_gib_prefix_refused() {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..4].copy_from_slice(&MAGIC);
        prefix[4..8].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        prefix[8..].copy_from_slice(&(4u64 << 30).to_le_bytes());
        let err = decode_prefix(&prefix, &Limits::default()).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                size: 4 << 30,
                limit: 64 << 20
            }
        );
    }

    fn lane_head(id: u64) -> LaneHead {
        LaneHead {
            frame: FrameType::Request,
            kind: 7,
            request_id: id,
            budget_us: 0,
            trace: TraceContext::default(),
        }
    }

    #[test]
    fn lane_heads_carry_only_what_is_set() {
        let mut h = lane_head(1);
        let mut lens = Vec::new();
        for (budget_us, trace_id) in [(0, 0), (5, 0), (0, 9), (5, 9)] {
            h.budget_us = budget_us;
            h.trace.trace_id = trace_id;
            let mut wire = Vec::new();
            encode_lane_head(&h, 3, &mut wire);
            lens.push(wire.len());
            wire.extend_from_slice(b"abc");
            let (d, body) = decode_lane_frame(&wire, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!((d, &wire[body]), (h, &b"abc"[..]));
        }
        assert_eq!(lens, [16, 24, 40, 48]);
    }

    #[test]
    fn lane_split_finds_whole_frames_and_leaves_the_partial_one() {
        let mut wire = Vec::new();
        for (i, body) in [&b"abc"[..], &b""[..], &[9u8; 40][..]]
            .into_iter()
            .enumerate()
        {
            let mut h = lane_head(i as u64);
            h.budget_us = i as u64 * 1000;
            encode_lane_head(&h, body.len() as u32, &mut wire);
            wire.extend_from_slice(body);
        }
        let full = wire.len();
        encode_lane_head(&lane_head(9), 10, &mut wire);
        wire.extend_from_slice(&[1, 2]);
        let mut frames = Vec::new();
        let used = split_lane_frames(&wire, &Limits::default(), &mut frames).unwrap();
        assert_eq!(used, full);
        let got: Vec<(u64, usize)> = frames
            .iter()
            .map(|(h, r)| (h.request_id, r.len()))
            .collect();
        assert_eq!(got, [(0, 3), (1, 0), (2, 40)]);
        // Every prefix of a frame is "not yet", never an error or a frame.
        for cut in 0..full {
            let mut frames = Vec::new();
            let used = split_lane_frames(&wire[..cut], &Limits::default(), &mut frames).unwrap();
            assert!(used <= cut && frames.len() < 3, "cut {cut}");
        }
    }

    #[test]
    fn lane_frames_over_the_limit_are_refused_from_four_bytes() {
        let limits = Limits {
            max_message_bytes: 100,
            ..Limits::default()
        };
        let mut wire = Vec::new();
        encode_lane_head(&lane_head(1), 101, &mut wire);
        assert_eq!(
            decode_lane_frame(&wire[..4], &limits),
            Err(FrameError::TooLarge {
                size: 101,
                limit: 100
            })
        );
        // At the limit it is merely incomplete.
        let mut wire = Vec::new();
        encode_lane_head(&lane_head(1), 100, &mut wire);
        assert_eq!(decode_lane_frame(&wire, &limits), Ok(None));
    }

    #[test]
    fn lane_frames_with_bad_type_or_flags_are_refused() {
        let mut wire = Vec::new();
        encode_lane_head(&lane_head(1), 0, &mut wire);
        let l = Limits::default();
        for (at, byte, err) in [
            (4, 99, FrameError::BadFrameType(99)),
            (4, 0, FrameError::BadFrameType(0)),
            (4, FrameType::Stream as u8, FrameError::NotOnLane(5)),
            (4, FrameType::Lane as u8, FrameError::NotOnLane(6)),
            (5, 4, FrameError::BadFlags(4)),
            (5, 0x80, FrameError::BadFlags(0x80)),
        ] {
            let mut bad = wire.clone();
            bad[at] = byte;
            assert_eq!(decode_lane_frame(&bad, &l), Err(err.clone()));
            // Refused as soon as the byte is in, before the rest of the head.
            assert_eq!(decode_lane_frame(&bad[..6], &l), Err(err));
        }
    }

    #[test]
    fn unknown_frame_type_refused() {
        let mut h = header();
        h.frame = 99;
        let head = encode_head(&h, 0);
        let mut buf = rkyv::util::AlignedVec::<16>::new();
        buf.extend_from_slice(&head);
        assert_eq!(
            decode_frame(&buf, &Limits::default()).unwrap_err(),
            FrameError::BadFrameType(99)
        );
    }
}
