//! Hostile or broken input from an authenticated peer: garbage, truncated frames, a 4 GiB length prefix,
//! a spoofed source. Each gets an error frame naming the problem, and the node keeps serving everyone.

mod common;

use bytes::Bytes;
use common::*;
use oxray_transport::frame::{
    self, ErrorCode, FrameType, HEADER_LEN, Header, LaneHead, PREFIX_LEN,
};
use oxray_transport::tls::ClusterCa;
use oxray_transport::{Limits, NodeId, testing};
use rkyv::util::AlignedVec;

/// A raw quinn connection to `b`, authenticated as a fresh node of `ca`.
async fn raw_conn(ca: &ClusterCa, b: &Node) -> (NodeId, quinn::Endpoint, quinn::Connection) {
    let me = ca.issue(NodeId::random()).unwrap();
    let id = me.node_id();
    let ep = quinn::Endpoint::client(localhost()).unwrap();
    let cfg = testing::client_config(&me, &Limits::default()).unwrap();
    let conn = ep
        .connect_with(
            cfg,
            b.mesh.local_addr(),
            &testing::server_name(b.mesh.node_id()),
        )
        .unwrap()
        .await
        .unwrap();
    (id, ep, conn)
}

/// Sends `bytes` on a fresh stream and returns the error frame the node answers with: (code, message).
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> (u16, String) {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    // The node may stop reading before we are done writing; that is fine.
    let _ = s.write_all(bytes).await;
    let _ = s.finish();
    let reply = tokio::time::timeout(SECOND, r.read_to_end(1 << 20))
        .await
        .expect("no answer")
        .unwrap();
    let mut buf = AlignedVec::<16>::new();
    buf.extend_from_slice(&reply);
    let (h, body) = frame::decode_frame(&buf, &Limits::default()).unwrap();
    assert_eq!(h.frame_type(), Some(FrameType::Error));
    (h.kind, String::from_utf8_lossy(body).into_owned())
}

fn request_header(source: NodeId, dest: NodeId) -> Header {
    Header::plain(FrameType::Request, ECHO, 9, source, dest)
}

#[tokio::test]
async fn garbage_truncation_and_huge_prefixes_are_answered_with_errors() {
    let (ca, a, b) = pair(Limits::default()).await;
    let (me, _ep, conn) = raw_conn(&ca, &b).await;
    let dest = b.mesh.node_id();

    let (code, why) = send_raw(&conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(code, ErrorCode::Malformed as u16);
    assert!(why.contains("bad magic"), "{why}");

    // A frame that promises 100 body bytes and delivers 10.
    let mut wire = frame::encode_head(&request_header(me, dest), 100);
    wire.extend_from_slice(&[0u8; 10]);
    let (code, why) = send_raw(&conn, &wire).await;
    assert_eq!(code, ErrorCode::Malformed as u16);
    assert!(why.contains("truncated frame"), "{why}");

    // A prefix cut short.
    let (_, why) = send_raw(&conn, &wire[..7]).await;
    assert!(why.contains("truncated frame prefix"), "{why}");

    // A 4 GiB length prefix: refused from the prefix alone, before any allocation or body byte.
    let mut wire = frame::encode_head(&request_header(me, dest), 0);
    wire[8..PREFIX_LEN].copy_from_slice(&(4u64 << 30).to_le_bytes());
    let (code, why) = send_raw(&conn, &wire).await;
    assert_eq!(code, ErrorCode::TooLarge as u16);
    assert!(why.contains("4294967296") && why.contains("limit"), "{why}");

    // A header that is not a valid archive of the right shape: unknown frame type.
    let mut bad = request_header(me, dest);
    bad.frame = 77;
    let (code, why) = send_raw(&conn, &frame::encode_head(&bad, 0)).await;
    assert_eq!(code, ErrorCode::Malformed as u16);
    assert!(why.contains("unknown frame type"), "{why}");

    // A header with the wrong length field.
    let mut wire = frame::encode_head(&request_header(me, dest), 0);
    wire[4..8].copy_from_slice(&(HEADER_LEN as u32 + 16).to_le_bytes());
    let (_, why) = send_raw(&conn, &wire).await;
    assert!(why.contains("bad header length"), "{why}");

    // The same connection still carries a valid request...
    let mut wire = frame::encode_head(&request_header(me, dest), 2);
    wire.extend_from_slice(b"ok");
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(&wire).await.unwrap();
    s.finish().unwrap();
    let reply = r.read_to_end(1 << 20).await.unwrap();
    let mut buf = AlignedVec::<16>::new();
    buf.extend_from_slice(&reply);
    let (h, body) = frame::decode_frame(&buf, &Limits::default()).unwrap();
    assert_eq!(
        (h.frame_type(), body),
        (Some(FrameType::Response), &b"ok"[..])
    );
    // ...and the node keeps serving its other peers.
    a.mesh
        .request(dest, ECHO, Bytes::from_static(b"fine"), SECOND)
        .await
        .unwrap();
}

#[tokio::test]
async fn lowering_the_limit_refuses_what_it_used_to_accept() {
    // The limit is what refuses the frame, not an accident of the test: the same 2 KiB request passes a
    // default node and is refused by a node limited to 1 KiB.
    let ca = ClusterCa::generate().unwrap();
    for (limit, refused) in [(64 << 20, false), (1024, true)] {
        let b = node(
            &ca,
            Limits {
                max_message_bytes: limit,
                ..Limits::default()
            },
        )
        .await;
        let (me, _ep, conn) = raw_conn(&ca, &b).await;
        let mut wire = frame::encode_head(&request_header(me, b.mesh.node_id()), 2048);
        wire.extend_from_slice(&[1u8; 2048]);
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        let _ = s.write_all(&wire).await;
        let _ = s.finish();
        let reply = r.read_to_end(1 << 20).await.unwrap();
        let mut buf = AlignedVec::<16>::new();
        buf.extend_from_slice(&reply);
        let (h, _) = frame::decode_frame(&buf, &Limits::default()).unwrap();
        assert_eq!(
            h.frame_type() == Some(FrameType::Error),
            refused,
            "limit {limit}"
        );
    }
}

#[tokio::test]
async fn spoofed_source_is_refused() {
    let (ca, a, b) = pair(Limits::default()).await;
    let (_me, _ep, conn) = raw_conn(&ca, &b).await;
    // Claim to be node a, over a connection authenticated as someone else.
    let wire = frame::encode_head(&request_header(a.mesh.node_id(), b.mesh.node_id()), 0);
    let (code, why) = send_raw(&conn, &wire).await;
    assert_eq!(code, ErrorCode::Malformed as u16);
    assert!(
        why.contains("does not match the authenticated connection"),
        "{why}"
    );
    // Wrong destination too.
    let wire = frame::encode_head(&request_header(_me, NodeId(5)), 0);
    let (_, why) = send_raw(&conn, &wire).await;
    assert!(why.contains("does not match"), "{why}");
    assert_eq!(
        b.handler
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn garbage_one_way_stream_is_dropped_and_connection_survives() {
    let (ca, a, b) = pair(Limits::default()).await;
    let (me, _ep, conn) = raw_conn(&ca, &b).await;
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[0xffu8; 64]).await.unwrap();
    s.finish().unwrap();
    // A valid one-way message on the same connection still arrives.
    let mut h = request_header(me, b.mesh.node_id());
    h.frame = FrameType::Oneway as u8;
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&frame::encode_head(&h, 0)).await.unwrap();
    s.finish().unwrap();
    let deadline = tokio::time::Instant::now() + SECOND;
    while b.handler.oneways.load(std::sync::atomic::Ordering::Relaxed) < 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        b.handler.oneways.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    a.mesh
        .request(b.mesh.node_id(), ECHO, Bytes::new(), SECOND)
        .await
        .unwrap();
}

/// Reads one lane frame from a lane's response side: (head, body). Reads exactly that frame's bytes: its
/// first six say how long the rest is.
async fn read_lane_frame(r: &mut quinn::RecvStream) -> (LaneHead, Vec<u8>) {
    let mut buf = vec![0u8; 6];
    tokio::time::timeout(SECOND, r.read_exact(&mut buf))
        .await
        .expect("no answer on the lane")
        .unwrap();
    let body_len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    let flags = buf[5];
    let head_len = 16 + 8 * usize::from(flags & 1) + 24 * usize::from(flags >> 1 & 1);
    buf.resize(head_len + body_len, 0);
    r.read_exact(&mut buf[6..]).await.unwrap();
    let (h, body) = frame::decode_lane_frame(&buf, &Limits::default())
        .unwrap()
        .expect("a whole frame");
    (h, buf[body].to_vec())
}

/// A lane opened by hand: the opening frame, then requests on the same stream.
async fn raw_lane(
    conn: &quinn::Connection,
    me: NodeId,
    dest: NodeId,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut s, r) = conn.open_bi().await.unwrap();
    let mut open = request_header(me, dest);
    open.frame = FrameType::Lane as u8;
    s.write_all(&frame::encode_head(&open, 0)).await.unwrap();
    (s, r)
}

/// A lane request frame.
fn lane_request(id: u64, kind: u16, body: &[u8]) -> Vec<u8> {
    let head = LaneHead {
        frame: FrameType::Request,
        kind,
        request_id: id,
        budget_us: 1_000_000,
        trace: Default::default(),
    };
    let mut wire = Vec::new();
    frame::encode_lane_head(&head, body.len() as u32, &mut wire);
    wire.extend_from_slice(body);
    wire
}

/// Expects the lane's complaint about itself (request id 0) with `code` and a message containing `what`,
/// then the end of the lane.
async fn expect_lane_refused(r: &mut quinn::RecvStream, code: ErrorCode, what: &str) {
    let (rh, rb) = read_lane_frame(r).await;
    assert_eq!(
        (rh.frame, rh.request_id, rh.kind),
        (FrameType::Error, 0, code as u16)
    );
    let why = String::from_utf8_lossy(&rb);
    assert!(why.contains(what), "{why}");
    let end = tokio::time::timeout(SECOND, r.read_to_end(1 << 16))
        .await
        .expect("the lane was not closed");
    assert_eq!(end.unwrap(), b"");
}

#[tokio::test]
async fn bad_frames_on_a_lane_end_that_lane_only() {
    let (ca, a, b) = pair(Limits::default()).await;
    let (me, _ep, conn) = raw_conn(&ca, &b).await;
    let dest = b.mesh.node_id();

    // A lane answers requests by id, then meets garbage: an error frame for the lane (id 0), and it ends.
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    for (id, body) in [(7u64, &b"first"[..]), (8, &b"second"[..])] {
        s.write_all(&lane_request(id, ECHO, body)).await.unwrap();
        let (rh, rb) = read_lane_frame(&mut r).await;
        assert_eq!(
            (rh.frame, rh.request_id, &rb[..]),
            (FrameType::Response, id, body)
        );
    }
    // Garbage whose first four bytes read as a small length: its type byte gives it away.
    let mut garbage = [0xEEu8; 40];
    garbage[..4].copy_from_slice(&8u32.to_le_bytes());
    let _ = s.write_all(&garbage).await;
    expect_lane_refused(&mut r, ErrorCode::Malformed, "unknown frame type").await;

    // A length of 4 GiB - 1 on a lane is refused from its four bytes alone.
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    let _ = s.write_all(&u32::MAX.to_le_bytes()).await;
    expect_lane_refused(&mut r, ErrorCode::TooLarge, "4294967295").await;

    // Flag bits this version does not define.
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    let mut wire = lane_request(1, ECHO, b"x");
    wire[5] |= 0x40;
    let _ = s.write_all(&wire).await;
    expect_lane_refused(&mut r, ErrorCode::Malformed, "unknown lane frame flags").await;

    // A response frame where requests belong, and a stream header, which lanes never carry.
    for (ty, what) in [
        (FrameType::Response, "frame type 2 not valid on a lane"),
        (FrameType::Stream, "frame type 5 not valid on a lane"),
    ] {
        let (mut s, mut r) = raw_lane(&conn, me, dest).await;
        let mut wire = lane_request(1, ECHO, b"x");
        wire[4] = ty as u8;
        let _ = s.write_all(&wire).await;
        expect_lane_refused(&mut r, ErrorCode::Malformed, what).await;
    }

    // A frame cut short by the end of the stream reaches no handler; the lane just ends.
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    let wire = lane_request(1, ECHO, b"truncated");
    s.write_all(&wire[..wire.len() - 3]).await.unwrap();
    s.finish().unwrap();
    let end = tokio::time::timeout(SECOND, r.read_to_end(1 << 16))
        .await
        .expect("the lane was not closed");
    assert_eq!(end.unwrap(), b"");

    // A lane opened in another node's name is refused before any lane frame is read.
    let (mut s, mut r) = raw_lane(&conn, a.mesh.node_id(), dest).await;
    let _ = s.write_all(&lane_request(1, ECHO, b"x")).await;
    let _ = s.finish();
    let reply = tokio::time::timeout(SECOND, r.read_to_end(1 << 20))
        .await
        .expect("no answer")
        .unwrap();
    let mut buf = AlignedVec::<16>::new();
    buf.extend_from_slice(&reply);
    let (h, body) = frame::decode_frame(&buf, &Limits::default()).unwrap();
    assert_eq!(h.frame_type(), Some(FrameType::Error));
    assert!(String::from_utf8_lossy(body).contains("does not match"));

    // Only the two good requests reached the handler; the connection and the node serve on.
    assert_eq!(
        b.handler
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    s.write_all(&lane_request(1, ECHO, b"")).await.unwrap();
    assert_eq!(read_lane_frame(&mut r).await.0.frame, FrameType::Response);
    a.mesh
        .request(dest, ECHO, Bytes::from_static(b"fine"), SECOND)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_reply_too_large_for_the_lane_is_an_error_for_that_request_only() {
    // An 8 KiB reply from a node whose limit is 4 KiB would break the requester's limit (assumed to be the
    // node's own) and end the lane with every request on it: that one request gets TooLarge instead.
    let ca = ClusterCa::generate().unwrap();
    let b = node(
        &ca,
        Limits {
            max_message_bytes: 4096,
            ..Limits::default()
        },
    )
    .await;
    let (me, _ep, conn) = raw_conn(&ca, &b).await;
    let (mut s, mut r) = raw_lane(&conn, me, b.mesh.node_id()).await;
    s.write_all(&lane_request(1, BIG_REPLY, b"")).await.unwrap();
    let (h, body) = read_lane_frame(&mut r).await;
    assert_eq!(
        (h.frame, h.request_id, h.kind),
        (FrameType::Error, 1, ErrorCode::TooLarge as u16)
    );
    assert!(String::from_utf8_lossy(&body).contains("limit of 4096"));
    s.write_all(&lane_request(2, ECHO, b"next")).await.unwrap();
    let (h, body) = read_lane_frame(&mut r).await;
    assert_eq!(
        (h.frame, h.request_id, &body[..]),
        (FrameType::Response, 2, &b"next"[..])
    );
}

#[tokio::test]
async fn a_lane_stops_reading_at_its_bound_of_unanswered_requests() {
    // The node answers at most 4 requests of one lane at a time; the rest wait in QUIC's buffers, unread.
    let ca = ClusterCa::generate().unwrap();
    let b = node(
        &ca,
        Limits {
            max_inflight_per_peer: 4,
            ..Limits::default()
        },
    )
    .await;
    let (me, _ep, conn) = raw_conn(&ca, &b).await;
    let dest = b.mesh.node_id();
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    for id in 1..=10u64 {
        s.write_all(&lane_request(id, SLOW, b"")).await.unwrap();
    }
    // SLOW answers after 300 ms: well before that, only the first 4 have reached the handler.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let requests = || {
        b.handler
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(requests(), 4);
    // As replies are written, reading resumes, and every request is answered.
    let mut ids = Vec::new();
    for _ in 0..10 {
        let (h, _) = tokio::time::timeout(3 * SECOND, read_lane_frame(&mut r))
            .await
            .expect("every request is answered");
        assert_eq!(h.frame, FrameType::Response);
        ids.push(h.request_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    assert_eq!(requests(), 10);
}
