//! Streaming large payloads: checksummed transfers (1 GiB in release builds), size limits, truncation, and the
//! local short-cut.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use oxray_transport::frame::{self, FrameType, Header};
use oxray_transport::{
    Handler, IncomingStream, Limits, Mesh, MeshConfig, Message, NodeId, Responder, TransportError,
    testing,
};

fn pattern(len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while v.len() + 8 <= len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.resize(len, 0xab);
    Bytes::from(v)
}

fn check_reply(reply: &Message, payload: &[u8]) {
    let body = reply.body();
    assert_eq!(body.len(), 16);
    assert_eq!(
        u64::from_le_bytes(body[..8].try_into().unwrap()),
        payload.len() as u64
    );
    assert_eq!(
        u64::from_le_bytes(body[8..].try_into().unwrap()),
        checksum(payload),
        "payload corrupted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payload_arrives_intact() {
    // 1 GiB in release (about a second or two); debug builds copy bytes too slowly for that, so they send 32 MiB.
    let len = if cfg!(debug_assertions) {
        32 << 20
    } else {
        1 << 30
    };
    let (_ca, a, b) = pair(Limits::default()).await;
    let payload = pattern(len);
    let reply = a
        .mesh
        .send_stream(
            b.mesh.node_id(),
            0,
            Bytes::from_static(b"hdr"),
            payload.clone(),
        )
        .await
        .unwrap();
    check_reply(&reply, &payload);
}

#[tokio::test]
async fn several_streams_and_requests_share_a_connection() {
    let (_ca, a, b) = pair(Limits::default()).await;
    let to = b.mesh.node_id();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mesh = a.mesh.clone();
        tasks.push(tokio::spawn(async move {
            let payload = pattern((1 << 20) + i * 4099);
            let reply = mesh
                .send_stream(to, 0, Bytes::new(), payload.clone())
                .await
                .unwrap();
            check_reply(&reply, &payload);
        }));
    }
    for _ in 0..20 {
        a.mesh
            .request(to, ECHO, Bytes::from_static(b"between"), SECOND)
            .await
            .unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Reads every stream with `read_all` and answers with the checksum.
struct ReadAll;
impl Handler for ReadAll {
    fn on_request(&self, _msg: Message, reply: Responder) {
        reply.error("streams only");
    }
    fn on_stream(&self, header: Message, mut incoming: IncomingStream) {
        tokio::spawn(async move {
            match incoming.read_all().await {
                Ok(data) => {
                    assert_eq!(
                        data.as_ptr() as usize % 16,
                        0,
                        "payload buffer must be aligned"
                    );
                    assert_eq!(header.payload_len(), data.len() as u64);
                    let mut out = (data.len() as u64).to_le_bytes().to_vec();
                    out.extend_from_slice(&checksum(&data).to_le_bytes());
                    incoming.reply(1, Bytes::from(out));
                }
                Err(e) => incoming.error(e),
            }
        });
    }
}

#[tokio::test]
async fn read_all_and_local_short_cut() {
    let ca = oxray_transport::tls::ClusterCa::generate().unwrap();
    let a = Mesh::bind(
        MeshConfig::new(localhost(), ca.issue(NodeId::random()).unwrap()),
        Arc::new(ReadAll),
    )
    .await
    .unwrap();
    let b = Mesh::bind(
        MeshConfig::new(localhost(), ca.issue(NodeId::random()).unwrap()),
        Arc::new(ReadAll),
    )
    .await
    .unwrap();
    a.add_peer(b.node_id(), b.local_addr());
    let payload = pattern(3 << 20);
    check_reply(
        &a.send_stream(b.node_id(), 0, Bytes::new(), payload.clone())
            .await
            .unwrap(),
        &payload,
    );
    // To ourselves: no network, same handler contract.
    check_reply(
        &a.send_stream(a.node_id(), 0, Bytes::new(), payload.clone())
            .await
            .unwrap(),
        &payload,
    );
    assert!(a.connected_peers() == vec![b.node_id()]);
    // Empty payloads work too.
    check_reply(
        &a.send_stream(b.node_id(), 0, Bytes::new(), Bytes::new())
            .await
            .unwrap(),
        &[],
    );
}

#[tokio::test]
async fn payload_over_the_receivers_limit_is_refused() {
    let ca = oxray_transport::tls::ClusterCa::generate().unwrap();
    let a = node(&ca, Limits::default()).await;
    let b = node(
        &ca,
        Limits {
            max_stream_payload_bytes: 1 << 20,
            ..Limits::default()
        },
    )
    .await;
    a.mesh.add_peer(b.mesh.node_id(), b.mesh.local_addr());
    match a
        .mesh
        .send_stream(b.mesh.node_id(), 0, Bytes::new(), pattern(2 << 20))
        .await
    {
        Err(TransportError::RemoteError(why)) => {
            assert!(why.contains("exceeds the limit"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    // Within the limit it passes.
    let payload = pattern(1 << 20);
    check_reply(
        &a.mesh
            .send_stream(b.mesh.node_id(), 0, Bytes::new(), payload.clone())
            .await
            .unwrap(),
        &payload,
    );
    // The sender's own limit is checked before sending anything.
    match b
        .mesh
        .send_stream(a.mesh.node_id(), 0, Bytes::new(), pattern(2 << 20))
        .await
    {
        Err(TransportError::MessageTooLarge { size, limit }) => {
            assert_eq!((size, limit), (2 << 20, 1 << 20))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn truncated_or_overlong_payloads_are_errors() {
    let (ca, _a, b) = pair(Limits::default()).await;
    let me = ca.issue(NodeId::random()).unwrap();
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
    for (announced, sent, expect) in [
        (1000u64, 10usize, "payload truncated"),
        (10, 1000, "longer than announced"),
    ] {
        let h = Header {
            frame: FrameType::Stream as u8,
            kind: 0,
            request_id: 1,
            source: me.node_id().0,
            dest: b.mesh.node_id().0,
            budget_us: 0,
            trace_id: 0,
            span_id: 0,
            payload_len: announced,
        };
        let mut wire = frame::encode_head(&h, 0);
        wire.extend_from_slice(&vec![0u8; sent]);
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(&wire).await.unwrap();
        s.finish().unwrap();
        let reply = r.read_to_end(1 << 20).await.unwrap();
        let mut buf = rkyv::util::AlignedVec::<16>::new();
        buf.extend_from_slice(&reply);
        let (h, body) = frame::decode_frame(&buf, &Limits::default()).unwrap();
        assert_eq!(h.frame_type(), Some(FrameType::Error));
        let why = String::from_utf8_lossy(body);
        assert!(why.contains(expect), "{why}");
    }
}
