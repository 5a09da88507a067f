//! Hostile or broken input from an authenticated peer: garbage, truncated frames, a 4 GiB length prefix,
//! a spoofed source. Each gets an error frame naming the problem, and the node keeps serving everyone.

mod common;

use bytes::Bytes;
use common::*;
use oxray_transport::frame::{self, ErrorCode, FrameType, HEADER_LEN, Header, PREFIX_LEN};
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
    Header {
        frame: FrameType::Request as u8,
        kind: ECHO,
        request_id: 9,
        source: source.0,
        dest: dest.0,
        budget_us: 0,
        trace_id: 0,
        span_id: 0,
        payload_len: 0,
    }
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

/// Reads one frame from a lane's response side: (header, body).
async fn read_lane_frame(r: &mut quinn::RecvStream) -> (Header, Vec<u8>) {
    let mut prefix = [0u8; PREFIX_LEN];
    tokio::time::timeout(SECOND, r.read_exact(&mut prefix))
        .await
        .expect("no answer on the lane")
        .unwrap();
    let p = frame::decode_prefix(&prefix, &Limits::default()).unwrap();
    let mut rest = vec![0u8; p.header_len + p.body_len];
    r.read_exact(&mut rest).await.unwrap();
    let mut buf = AlignedVec::<16>::new();
    buf.extend_from_slice(&rest);
    let h = frame::decode_header(&buf).unwrap();
    (h, rest[HEADER_LEN..].to_vec())
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

#[tokio::test]
async fn bad_frames_on_a_lane_end_that_lane_only() {
    let (ca, a, b) = pair(Limits::default()).await;
    let (me, _ep, conn) = raw_conn(&ca, &b).await;
    let dest = b.mesh.node_id();

    // A lane answers requests by id, then meets garbage: an error frame for the lane (id 0), and it ends.
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    for (id, body) in [(7u64, &b"first"[..]), (8, &b"second"[..])] {
        let mut h = request_header(me, dest);
        h.request_id = id;
        let mut wire = frame::encode_head(&h, body.len());
        wire.extend_from_slice(body);
        s.write_all(&wire).await.unwrap();
        let (rh, rb) = read_lane_frame(&mut r).await;
        assert_eq!(
            (rh.frame_type(), rh.request_id, &rb[..]),
            (Some(FrameType::Response), id, body)
        );
    }
    let _ = s.write_all(&[0xEE; 40]).await;
    let (rh, rb) = read_lane_frame(&mut r).await;
    assert_eq!(
        (rh.frame_type(), rh.request_id, rh.kind),
        (Some(FrameType::Error), 0, ErrorCode::Malformed as u16)
    );
    assert!(String::from_utf8_lossy(&rb).contains("bad magic"));
    let end = tokio::time::timeout(SECOND, r.read_to_end(1 << 16))
        .await
        .expect("the lane was not closed");
    assert_eq!(end.unwrap(), b"");

    // A 4 GiB length on a lane is refused from the prefix alone.
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    let mut wire = frame::encode_head(&request_header(me, dest), 0);
    wire[8..PREFIX_LEN].copy_from_slice(&(4u64 << 30).to_le_bytes());
    let _ = s.write_all(&wire).await;
    let (rh, _) = read_lane_frame(&mut r).await;
    assert_eq!(rh.kind, ErrorCode::TooLarge as u16);

    // A spoofed source, and a response frame where requests belong, each end their lane.
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    let _ = s
        .write_all(&frame::encode_head(
            &request_header(a.mesh.node_id(), dest),
            0,
        ))
        .await;
    let (rh, rb) = read_lane_frame(&mut r).await;
    assert_eq!(rh.frame_type(), Some(FrameType::Error));
    assert!(String::from_utf8_lossy(&rb).contains("does not match"));
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    let mut h = request_header(me, dest);
    h.frame = FrameType::Response as u8;
    let _ = s.write_all(&frame::encode_head(&h, 0)).await;
    let (_, rb) = read_lane_frame(&mut r).await;
    assert!(String::from_utf8_lossy(&rb).contains("not valid on a lane"));

    // Only the two good requests reached the handler; the connection and the node serve on.
    assert_eq!(
        b.handler
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let (mut s, mut r) = raw_lane(&conn, me, dest).await;
    s.write_all(&frame::encode_head(&request_header(me, dest), 0))
        .await
        .unwrap();
    assert_eq!(
        read_lane_frame(&mut r).await.0.frame_type(),
        Some(FrameType::Response)
    );
    a.mesh
        .request(dest, ECHO, Bytes::from_static(b"fine"), SECOND)
        .await
        .unwrap();
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
        let mut h = request_header(me, dest);
        h.kind = SLOW;
        h.request_id = id;
        s.write_all(&frame::encode_head(&h, 0)).await.unwrap();
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
        assert_eq!(h.frame_type(), Some(FrameType::Response));
        ids.push(h.request_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    assert_eq!(requests(), 10);
}
