//! Property tests of the envelope codec: every frame type round-trips, and no input makes the decoder panic.

use oxray_transport::Limits;
use oxray_transport::frame::{self, FrameError, FrameType, HEADER_LEN, Header, PREFIX_LEN};
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
}
