//! Fuzz target: arbitrary bytes through the envelope decoder, header validation and the lane frame decoder.
//!
//! Checks that decoding never panics, never reads past the input, and that whatever decodes re-encodes to the
//! same prefix and header bytes (the codec is a bijection on valid frames). Run with
//! `cd transport/fuzz && cargo +nightly fuzz run frame_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxray_transport::Limits;
use oxray_transport::frame::{self, HEADER_LEN, LANE_HEAD_MIN, PREFIX_LEN};
use rkyv::util::AlignedVec;

fuzz_target!(|data: &[u8]| {
    // The decoder requires an aligned buffer (the mesh always reads into one); fuzz with the same contract.
    let mut buf = AlignedVec::<16>::with_capacity(data.len().max(16));
    buf.extend_from_slice(data);
    let limits = Limits {
        max_message_bytes: 1 << 16,
        ..Limits::default()
    };
    if let Ok((header, body)) = frame::decode_frame(&buf, &limits) {
        assert!(body.len() <= data.len());
        let again = frame::encode_head(&header, body.len());
        assert_eq!(&again[..PREFIX_LEN], &data[..PREFIX_LEN]);
        // Re-encoding a decoded header must decode to the same header.
        let mut round = AlignedVec::<16>::with_capacity(again.len() + body.len());
        round.extend_from_slice(&again);
        round.extend_from_slice(body);
        let (h2, b2) = frame::decode_frame(&round, &limits).expect("re-encoded frame must decode");
        assert_eq!(h2, header);
        assert_eq!(b2, body);
        assert_eq!(again.len(), PREFIX_LEN + HEADER_LEN);
    }
    // The prefix check alone must never panic either.
    if let Some(prefix) = data
        .get(..PREFIX_LEN)
        .and_then(|p| <&[u8; PREFIX_LEN]>::try_from(p).ok())
    {
        let _ = frame::decode_prefix(prefix, &limits);
    }
    // A lane's frames: never panics, every body lies inside the input, and each frame re-encodes to one
    // that decodes the same (not always to the same bytes: a flag may announce a zero budget or trace).
    let mut frames = Vec::new();
    if let Ok(used) = frame::split_lane_frames(data, &limits, &mut frames) {
        assert!(used <= data.len());
        for (head, body) in frames {
            assert!(body.end <= used && body.start >= LANE_HEAD_MIN);
            let mut again = Vec::new();
            frame::encode_lane_head(&head, body.len() as u32, &mut again);
            again.extend_from_slice(&data[body.clone()]);
            let (h2, b2) = frame::decode_lane_frame(&again, &limits)
                .expect("re-encoded lane frame must decode")
                .expect("and be complete");
            assert_eq!(h2, head);
            assert_eq!(&again[b2], &data[body]);
        }
    }
});
