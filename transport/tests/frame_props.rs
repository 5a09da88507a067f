//! Property tests of the envelope codec: every frame type round-trips, and no input makes the decoder panic.

use oxray_transport::Limits;
use oxray_transport::TraceContext;
use oxray_transport::frame::{
    self, FrameError, FrameType, HEADER_LEN, Header, LANE_HEAD_MAX, LANE_HEAD_MIN, LaneHead,
    PREFIX_LEN,
};
use proptest::prelude::*;
use rkyv::util::AlignedVec;

fn frame_type() -> impl Strategy<Value = FrameType> {
    prop_oneof![
        Just(FrameType::Request),
        Just(FrameType::Response),
        Just(FrameType::Error),
        Just(FrameType::Oneway),
        Just(FrameType::Stream),
        Just(FrameType::Lane),
    ]
}

prop_compose! {
    fn header()(frame in frame_type(), kind: u16, request_id: u64, source: u128, dest: u128, budget_us: u64,
                trace_id: u128, span_id: u64, payload_len: u64) -> Header {
        Header { frame: frame as u8, kind, request_id, source, dest, budget_us, trace_id, span_id, payload_len }
    }
}

prop_compose! {
    fn lane_head()(frame in prop_oneof![Just(FrameType::Request), Just(FrameType::Response), Just(FrameType::Error)],
                   kind: u16, request_id: u64, budget_us in prop_oneof![Just(0u64), any::<u64>()],
                   trace in prop_oneof![Just((0u128, 0u64)), any::<(u128, u64)>()]) -> LaneHead {
        LaneHead { frame, kind, request_id, budget_us, trace: TraceContext { trace_id: trace.0, span_id: trace.1 } }
    }
}

fn aligned(bytes: &[u8]) -> AlignedVec<16> {
    let mut v = AlignedVec::<16>::with_capacity(bytes.len());
    v.extend_from_slice(bytes);
    v
}

proptest! {
    #[test]
    fn every_envelope_round_trips(h in header(), body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut wire = frame::encode_head(&h, body.len());
        prop_assert_eq!(wire.len(), PREFIX_LEN + HEADER_LEN);
        wire.extend_from_slice(&body);
        let buf = aligned(&wire);
        let (decoded, got) = frame::decode_frame(&buf, &Limits::default()).unwrap();
        prop_assert_eq!(decoded, h);
        prop_assert_eq!(got, &body[..]);
        // The body starts 16-byte aligned in a buffer that is.
        prop_assert_eq!(got.as_ptr() as usize % 16, 0);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let buf = aligned(&bytes);
        let _ = frame::decode_frame(&buf, &Limits::default());
    }

    #[test]
    fn corrupted_header_is_rejected_or_decodes(h in header(), pos in 0..HEADER_LEN, byte: u8) {
        let mut wire = frame::encode_head(&h, 0);
        wire[PREFIX_LEN + pos] = byte;
        let buf = aligned(&wire);
        // Either a clean error or a header (flipping a field's value is still a valid header).
        match frame::decode_frame(&buf, &Limits::default()) {
            Ok((d, _)) => prop_assert!(d.frame_type().is_some()),
            Err(e) => prop_assert!(matches!(e, FrameError::BadHeader(_) | FrameError::BadFrameType(_))),
        }
    }

    #[test]
    fn oversized_bodies_are_refused_from_the_prefix(len in (64u64 << 20) + 1..u64::MAX) {
        let h = Header { frame: FrameType::Request as u8, kind: 0, request_id: 0, source: 0, dest: 0,
                         budget_us: 0, trace_id: 0, span_id: 0, payload_len: 0 };
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&frame::encode_head(&h, 0)[..PREFIX_LEN]);
        prefix[8..].copy_from_slice(&len.to_le_bytes());
        prop_assert_eq!(
            frame::decode_prefix(&prefix, &Limits::default()),
            Err(FrameError::TooLarge { size: len, limit: 64 << 20 })
        );
    }

    #[test]
    fn every_lane_frame_round_trips_in_any_chunking(
        frames in proptest::collection::vec((lane_head(), proptest::collection::vec(any::<u8>(), 0..300)), 1..12),
        cut in 1usize..64,
    ) {
        let mut wire = Vec::new();
        for (h, body) in &frames {
            let before = wire.len();
            frame::encode_lane_head(h, body.len() as u32, &mut wire);
            let head_len = wire.len() - before;
            prop_assert!((LANE_HEAD_MIN..=LANE_HEAD_MAX).contains(&head_len));
            wire.extend_from_slice(body);
        }
        // Fed `cut` bytes at a time, as a reader would see them, keeping the unused tail.
        let mut got = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for chunk in wire.chunks(cut) {
            pending.extend_from_slice(chunk);
            let mut out = Vec::new();
            let used = frame::split_lane_frames(&pending, &Limits::default(), &mut out).unwrap();
            for (h, r) in out {
                got.push((h, pending[r].to_vec()));
            }
            pending.drain(..used);
        }
        prop_assert!(pending.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn lane_garbage_never_panics_and_stays_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut out = Vec::new();
        if let Ok(used) = frame::split_lane_frames(&bytes, &Limits::default(), &mut out) {
            prop_assert!(used <= bytes.len());
            for (_, r) in out {
                prop_assert!(r.end <= used);
            }
        }
    }

    #[test]
    fn lane_lengths_over_the_limit_are_refused_from_four_bytes(len in 1025u32.., rest in proptest::collection::vec(any::<u8>(), 0..60)) {
        let limits = Limits { max_message_bytes: 1024, ..Limits::default() };
        let mut wire = len.to_le_bytes().to_vec();
        wire.extend_from_slice(&rest);
        prop_assert_eq!(
            frame::decode_lane_frame(&wire, &limits),
            Err(FrameError::TooLarge { size: u64::from(len), limit: 1024 })
        );
    }
}
