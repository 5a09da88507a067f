//! The mesh driver: one QUIC endpoint per node, the peer table, and the tokio tasks that move frames.
//!
//! Small requests (body up to `Limits::lane_body_limit`) travel on the peer's lane, one long-lived bidirectional
//! stream that carries many requests and their responses matched by id (see `lane.rs` for why). A larger request
//! travels on its own bidirectional QUIC stream (request frame, then response frame), each one-way message on its
//! own unidirectional stream, each streamed payload on its own bidirectional stream after its header frame: a
//! big or broken message then only ever holds up or kills its own stream. QUIC multiplexes all of them over one
//! connection per peer pair and packs frames of many streams into each datagram.
//!
//! Decisions about bytes (framing, validation, limits on sizes) live in [`crate::frame`]; this file owns the
//! sockets, the clock and the tasks. It does not interpret message bodies.

use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rkyv::util::AlignedVec;
use tokio::sync::Notify;
use tracing::{Instrument as _, debug, info_span, warn};

use crate::error::{TransportError, close, from_connection};
use crate::frame::{
    self, ErrorCode, FrameType, HEADER_LEN, Header, LaneHead, PREFIX_LEN, TraceContext,
};
use crate::lane::{self, ClientLane, FrameReader, Gate, LaneReply, NotSent};
use crate::message::{IncomingStream, Message, Reply, Responder, Source, read_error};
use crate::tls::{self, JoinAuthority, NodeIdentity};
use crate::{Body, Limits, NodeId};

/// What a node serves. Called on the connection's tasks: answer inline if cheap, otherwise move the
/// [`Responder`] into a task of your own. Never block.
pub trait Handler: Send + Sync + 'static {
    /// A request; answer exactly once through `reply`.
    fn on_request(&self, msg: Message, reply: Responder);
    /// A one-way message.
    fn on_oneway(&self, msg: Message) {
        let _ = msg;
    }
    /// A streamed payload announced by `header`; read `incoming`, then reply through it.
    fn on_stream(&self, header: Message, incoming: IncomingStream) {
        let _ = header;
        incoming.error("this node does not accept streams");
    }
    /// The connection to `node` was lost (the next request re-dials).
    fn on_peer_lost(&self, node: NodeId) {
        let _ = node;
    }
}

/// Configuration of one mesh endpoint.
#[derive(Debug)]
pub struct MeshConfig {
    /// UDP address to bind (`127.0.0.1:0` picks a port; read it back with [`Mesh::local_addr`]).
    pub bind: SocketAddr,
    /// This node's certificate and key; the node id is read from it.
    pub identity: NodeIdentity,
    /// Limits and QUIC tuning.
    pub limits: Limits,
    /// Head only: the CA and token with which this node answers join requests (see [`crate::join`]).
    pub join_secret: Option<JoinAuthority>,
    /// Whether one-way messages to and from peers on this host (same network namespace) may travel on a Unix
    /// socket authenticated by the QUIC connection, instead of on QUIC itself (see `local.rs`). Default on;
    /// off, every byte goes through QUIC (e.g. to put a user-space relay between two local nodes).
    pub local_links: bool,
}

impl MeshConfig {
    /// A config with default limits and no join service.
    pub fn new(bind: SocketAddr, identity: NodeIdentity) -> MeshConfig {
        MeshConfig {
            bind,
            identity,
            limits: Limits::default(),
            join_secret: None,
            local_links: true,
        }
    }
}

/// Handle to one node's endpoint. Cheap to clone; all clones drive the same endpoint.
///
/// Dropping the last handle closes the endpoint abruptly; call [`Mesh::shutdown`] first to drain.
#[derive(Clone, Debug)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Peer {
    /// Where to dial. Learned from `add_peer` or from an accepted connection (one socket serves both roles,
    /// so a peer's source address is its listening address).
    addr: parking_lot::Mutex<Option<SocketAddr>>,
    /// The connection in use. A std-style mutex: held for a clone, never across an await.
    conn: parking_lot::Mutex<Option<quinn::Connection>>,
    /// Serialises dialling so concurrent first requests share one connection.
    dial: tokio::sync::Mutex<()>,
    /// Requests in flight to this peer, against `Limits::max_inflight_per_peer`.
    inflight: AtomicUsize,
    /// The lane small requests to this peer travel on (see `lane.rs`); replaced when it dies.
    lane: parking_lot::Mutex<Option<Arc<ClientLane>>>,
    /// The one unidirectional stream every one-way message to this peer is written on, so they arrive in the
    /// order their sends completed. An async mutex: held across the write, which is what orders the senders.
    oneway: tokio::sync::Mutex<Option<OnewayStream>>,
}

/// The stream one-way messages to a peer share, and the connection it belongs to.
struct OnewayStream {
    conn: usize,
    send: OnewaySink,
}

/// Where one-way messages to a peer are written: a QUIC stream, or a local link proven by that connection.
enum OnewaySink {
    Quic(quinn::SendStream),
    Local(tokio::net::UnixStream),
}

impl OnewaySink {
    async fn write(
        &mut self,
        to: NodeId,
        header: &Header,
        body: Body,
    ) -> Result<(), TransportError> {
        match self {
            OnewaySink::Quic(send) => write_frame(send, header, body, None)
                .await
                .map_err(|e| write_error(to, e)),
            OnewaySink::Local(stream) => crate::local::write_frame(stream, header, &body)
                .await
                .map_err(|e| TransportError::Connect {
                    peer: to,
                    why: format!("local link: {e}"),
                }),
        }
    }
}

impl Peer {
    fn new(addr: Option<SocketAddr>) -> Peer {
        Peer {
            addr: parking_lot::Mutex::new(addr),
            conn: parking_lot::Mutex::new(None),
            dial: tokio::sync::Mutex::new(()),
            inflight: AtomicUsize::new(0),
            lane: parking_lot::Mutex::new(None),
            oneway: tokio::sync::Mutex::new(None),
        }
    }

    fn live(&self) -> Option<quinn::Connection> {
        self.conn
            .lock()
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The lane to this peer if it is alive and on the current connection (see `Inner::lane`).
    fn live_lane(&self) -> Option<Arc<ClientLane>> {
        let current = self.conn.lock().as_ref().map(|c| c.stable_id())?;
        self.lane
            .lock()
            .as_ref()
            .filter(|l| !l.is_dead() && l.conn_id == current)
            .cloned()
    }

    fn forget(&self, conn: &quinn::Connection) -> bool {
        let mut slot = self.conn.lock();
        if slot
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *slot = None;
            return true;
        }
        false
    }
}

/// Hashes node ids for the peer table, which every request consults, and request ids for a lane's table of
/// waiting requests. Node ids are random 128-bit numbers chosen by the CA's holder and request ids are our own
/// counter (a peer's ids are only ever looked up, never inserted), so no one can choose keys that collide:
/// folding the words with a multiply is as good as SipHash here and a few times cheaper.
#[derive(Default)]
pub(crate) struct IdHasher(u64);
impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(29) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

/// Counts a peer's request slot; released on drop.
struct Slot<'a>(&'a AtomicUsize);
impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// Counts work that shutdown must wait for.
struct Active<'a>(&'a Inner);

/// Adds to and takes from the count of work that shutdown waits for, for a holder that counts its own work
/// (a lane's [`Gate`] counts once while any of its replies is unwritten).
pub(crate) struct ActiveCount(Arc<Inner>);
impl ActiveCount {
    pub(crate) fn add(&self) {
        self.0.active.fetch_add(1, Ordering::AcqRel);
    }
    /// Undoes one `add`.
    pub(crate) fn sub(&self) {
        drop(Active(&self.0));
    }
}
impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.closing.load(Ordering::Acquire)
        {
            self.0.idle.notify_waiters();
        }
    }
}

struct Inner {
    /// Ourselves, weakly: background tasks hold this so that dropping every `Mesh` ends them.
    me: Weak<Inner>,
    node_id: NodeId,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    client_cfg: quinn::ClientConfig,
    limits: Limits,
    handler: Arc<dyn Handler>,
    peers: DashMap<NodeId, Arc<Peer>, BuildHasherDefault<IdHasher>>,
    next_request: AtomicU64,
    join: Option<JoinAuthority>,
    closing: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
    /// Whether one-way messages to local peers try a local link first.
    local_links: bool,
    /// Ends the local link listener and readers: on shutdown, or when this is dropped with the mesh.
    local_stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("node", &self.node_id)
            .field("addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Background tasks hold only weak references; closing the endpoint ends them.
        self.endpoint.close(close::SHUTDOWN, b"dropped");
    }
}

/// quinn's transport parameters from our limits. Everything that bounds memory is set explicitly.
pub(crate) fn transport_config(l: &Limits) -> Result<quinn::TransportConfig, TransportError> {
    let varint = |v: u64, what: &str| {
        quinn::VarInt::from_u64(v).map_err(|_| TransportError::Config {
            why: format!("{what} out of range"),
        })
    };
    if l.keep_alive >= l.idle_timeout {
        return Err(TransportError::Config {
            why: "keep_alive must be shorter than idle_timeout".into(),
        });
    }
    if l.max_message_bytes == 0 || l.max_inflight_per_peer == 0 {
        return Err(TransportError::Config {
            why: "max_message_bytes and max_inflight_per_peer must be positive".into(),
        });
    }
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(l.max_concurrent_bidi_streams))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(l.max_concurrent_uni_streams))
        .stream_receive_window(varint(l.stream_receive_window, "stream_receive_window")?)
        .receive_window(varint(
            l.connection_receive_window,
            "connection_receive_window",
        )?)
        .send_window(l.send_window)
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(l.idle_timeout).map_err(
            |_| TransportError::Config {
                why: "idle_timeout out of range".into(),
            },
        )?))
        .keep_alive_interval(Some(l.keep_alive));
    Ok(t)
}

/// Binds a UDP socket with the configured buffer sizes (the kernel caps them at `net.core.[rw]mem_max`).
pub(crate) fn bind_socket(
    addr: SocketAddr,
    buffer: usize,
) -> Result<std::net::UdpSocket, TransportError> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let s = socket2::SockRef::from(&socket);
    // Best effort: larger buffers cut loss under bursts; failure here is not an error.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    Ok(socket)
}

impl Mesh {
    /// Binds the endpoint and starts accepting connections. Must run inside a tokio runtime.
    pub async fn bind(cfg: MeshConfig, handler: Arc<dyn Handler>) -> Result<Mesh, TransportError> {
        let MeshConfig {
            bind,
            identity,
            limits,
            join_secret,
            local_links,
        } = cfg;
        let transport = Arc::new(transport_config(&limits)?);
        let server_tls = identity.server_config(join_secret.is_some())?;
        let quic_server = QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::Handshake { why: e.to_string() })?;
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_cfg.transport_config(transport.clone());
        let quic_client = QuicClientConfig::try_from(identity.client_config()?)
            .map_err(|e| TransportError::Handshake { why: e.to_string() })?;
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(quic_client));
        client_cfg.transport_config(transport);
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &identity.reset_key_seed());
        let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
        // Connection ids carry a keyed hash so that garbage gets no reset; the key is derived from the identity
        // like the reset key, so a restarted node recognises its predecessor's ids and resets them.
        let cid_key = identity.cid_key();
        endpoint_cfg.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let socket = bind_socket(bind, limits.socket_buffer_bytes)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_cfg,
            Some(server_cfg),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            node_id: identity.node_id(),
            endpoint,
            local_addr,
            client_cfg,
            limits,
            handler,
            peers: DashMap::default(),
            next_request: AtomicU64::new(1),
            join: join_secret,
            closing: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            local_links,
            local_stop: tokio::sync::watch::Sender::new(false),
        });
        let span = info_span!("mesh", node = %inner.node_id);
        if local_links && let Some(listener) = crate::local::listen(inner.node_id) {
            let stop = inner.local_stop.subscribe();
            tokio::spawn(
                local_accept_loop(Arc::downgrade(&inner), listener, stop).instrument(span.clone()),
            );
        }
        tokio::spawn(accept_loop(Arc::downgrade(&inner), inner.endpoint.clone()).instrument(span));
        debug!(node = %inner.node_id, addr = %local_addr, "mesh bound");
        Ok(Mesh { inner })
    }

    /// This node's id (from its certificate).
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Records where `node` listens. Connections are made lazily on first use and reused.
    ///
    /// A new address for a known node means it restarted elsewhere (a node restarted with its identity binds a
    /// fresh port): a connection whose far end is not the new address is to the previous process, which may be
    /// dead without having said so, and would swallow requests until the idle timeout. It is closed, so the next
    /// use dials the new address. (A connection the peer opened itself comes from its listening socket, so its
    /// remote address is where the peer listens.) An unspecified address (`0.0.0.0`) names no place to dial and
    /// never closes a working connection.
    pub fn add_peer(&self, node: NodeId, addr: SocketAddr) {
        match self.inner.peers.get(&node) {
            Some(p) => {
                let moved = p.addr.lock().replace(addr).is_some_and(|old| old != addr);
                if moved && !addr.ip().is_unspecified() {
                    let mut slot = p.conn.lock();
                    if let Some(c) = slot.as_ref()
                        && c.remote_address() != addr
                    {
                        c.close(close::SHUTDOWN, b"peer moved");
                        *slot = None;
                    }
                }
            }
            None => {
                self.inner
                    .peers
                    .entry(node)
                    .or_insert_with(|| Arc::new(Peer::new(Some(addr))));
            }
        }
    }

    /// Removes `node` from the address book and closes its connection.
    pub fn remove_peer(&self, node: NodeId) {
        if let Some((_, p)) = self.inner.peers.remove(&node)
            && let Some(c) = p.conn.lock().take()
        {
            c.close(close::SHUTDOWN, b"peer removed");
        }
    }

    /// Nodes with a live connection right now.
    pub fn connected_peers(&self) -> Vec<NodeId> {
        self.inner
            .peers
            .iter()
            .filter(|e| e.value().live().is_some())
            .map(|e| *e.key())
            .collect()
    }

    /// Sends a request and waits for its response, at most `deadline`.
    pub async fn request(
        &self,
        to: NodeId,
        kind: u16,
        body: Body,
        deadline: Duration,
    ) -> Result<Message, TransportError> {
        self.request_traced(to, kind, body, deadline, TraceContext::default())
            .await
    }

    /// [`Mesh::request`] carrying a trace context to the receiver.
    pub async fn request_traced(
        &self,
        to: NodeId,
        kind: u16,
        body: Body,
        deadline: Duration,
        trace: TraceContext,
    ) -> Result<Message, TransportError> {
        let inner = &*self.inner;
        let _active = inner.enter()?;
        let header = inner.header(FrameType::Request, kind, to, deadline, trace, 0);
        if to == inner.node_id {
            return inner.local_request(header, body, deadline).await;
        }
        let peer = inner.peer(to)?;
        let _slot = inner.slot(to, &peer)?;
        // The common case first: a small request on a lane that is up needs no await before it is queued,
        // so it skips the connection and lane futures below and waits on its reply alone.
        let mut body = body;
        if body.len() <= inner.lane_limit()
            && let Some(lane) = peer.live_lane()
        {
            match lane.call(lane_head(&header), body) {
                Ok((rx, pending)) => {
                    return match tokio::time::timeout(deadline, rx).await {
                        Ok(reply) => {
                            pending.done();
                            reply.unwrap_or(Err(TransportError::Closed))
                        }
                        Err(_) => Err(TransportError::Timeout),
                    };
                }
                // The lane died just now; the slow path below opens another.
                Err(NotSent(b)) => body = b,
            }
        }
        match tokio::time::timeout(
            deadline,
            inner.remote_request(to, &peer, header, body, None),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout),
        }
    }

    /// Whether one-way messages to `to` travel on a local link now (see [`MeshConfig::local_links`]): false
    /// before the first one is sent, and while one is being written.
    pub fn has_local_link(&self, to: NodeId) -> bool {
        let Some(peer) = self.inner.peers.get(&to).map(|p| p.value().clone()) else {
            return false;
        };
        let Ok(slot) = peer.oneway.try_lock() else {
            return false;
        };
        matches!(slot.as_ref().map(|s| &s.send), Some(OnewaySink::Local(_)))
    }

    /// Sends a one-way message. Returns once it is handed to QUIC, or to the kernel on a local link (delivery is
    /// reliable while the connection lives).
    ///
    /// One-way messages to a peer arrive in the order their sends completed: they share one long-lived stream
    /// per connection, written under a lock and read by one task that hands them to the handler in turn. (A
    /// stream per message, as before, let a small message overtake a larger one sent earlier, and cost a stream
    /// open, accept, task and FIN per message.) A message sent after the connection was replaced travels on a
    /// new stream and is not ordered against what was in flight on the old one.
    pub async fn send(&self, to: NodeId, kind: u16, body: Body) -> Result<(), TransportError> {
        let inner = &*self.inner;
        let _active = inner.enter()?;
        let header = inner.header(
            FrameType::Oneway,
            kind,
            to,
            Duration::ZERO,
            TraceContext::default(),
            0,
        );
        if to == inner.node_id {
            inner.handler.on_oneway(Message::local(header, body, None));
            return Ok(());
        }
        if body.len() > inner.limits.max_message_bytes {
            return Err(TransportError::MessageTooLarge {
                size: body.len() as u64,
                limit: inner.limits.max_message_bytes as u64,
            });
        }
        let peer = inner.peer(to)?;
        let handshake = inner.limits.handshake_timeout;
        let fut = async {
            let conn = inner.connection(to, &peer).await?;
            let mut slot = peer.oneway.lock().await;
            let stream = match slot.take() {
                Some(s) if s.conn == conn.stable_id() => s,
                // The first message on this connection: every later one takes the same way, which keeps them
                // in order.
                _ => inner.oneway_stream(to, &peer, conn).await?,
            };
            // A failed write, or this future dropped mid-frame (the timeout below), resets the stream and empties
            // the slot, so no later message follows a torn frame on it.
            let mut writing = ResetUnlessWritten {
                slot: &mut slot,
                written: false,
            };
            let sent = writing
                .slot
                .insert(stream)
                .send
                .write(to, &header, body)
                .await;
            writing.written = sent.is_ok();
            drop(writing);
            sent
        };
        // Opening a stream can wait for stream credit; bound it like a handshake.
        tokio::time::timeout(handshake + inner.limits.keep_alive, fut)
            .await
            .map_err(|_| TransportError::Timeout)?
    }

    /// Streams a large payload after a small header; returns the receiver's reply once it has stored it.
    /// Bounded by `Limits::stream_reply_timeout`.
    pub async fn send_stream(
        &self,
        to: NodeId,
        kind: u16,
        header: Body,
        payload: Bytes,
    ) -> Result<Message, TransportError> {
        let deadline = self.inner.limits.stream_reply_timeout;
        self.send_stream_with_deadline(to, kind, header, payload, deadline)
            .await
    }

    /// [`Mesh::send_stream`] with an explicit deadline for the whole transfer and reply.
    pub async fn send_stream_with_deadline(
        &self,
        to: NodeId,
        kind: u16,
        header_body: Body,
        payload: Bytes,
        deadline: Duration,
    ) -> Result<Message, TransportError> {
        let inner = &*self.inner;
        let _active = inner.enter()?;
        let len = payload.len() as u64;
        if len > inner.limits.max_stream_payload_bytes {
            return Err(TransportError::MessageTooLarge {
                size: len,
                limit: inner.limits.max_stream_payload_bytes,
            });
        }
        let header = inner.header(
            FrameType::Stream,
            kind,
            to,
            deadline,
            TraceContext::default(),
            len,
        );
        if to == inner.node_id {
            let (responder, rx) = Responder::new();
            let msg = Message::local(header, header_body, Some(Instant::now() + deadline));
            let incoming = IncomingStream::new(Source::Local(Some(payload)), len, responder);
            inner.handler.on_stream(msg, incoming);
            return inner.local_reply(to, header, rx, deadline).await;
        }
        let peer = inner.peer(to)?;
        let _slot = inner.slot(to, &peer)?;
        let fut = inner.remote_request(to, &peer, header, header_body, Some(payload));
        tokio::time::timeout(deadline, fut)
            .await
            .map_err(|_| TransportError::Timeout)?
    }

    /// Stops accepting, waits (at most `Limits::shutdown_grace`) for in-flight requests in both directions to
    /// finish, then closes every connection.
    pub async fn shutdown(&self) {
        let inner = &*self.inner;
        inner.closing.store(true, Ordering::Release);
        inner.endpoint.set_server_config(None);
        let drained = async {
            loop {
                let notified = inner.idle.notified();
                if inner.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(inner.limits.shutdown_grace, drained)
            .await
            .is_err()
        {
            warn!(node = %inner.node_id, active = inner.active.load(Ordering::Relaxed), "shutdown grace expired");
        }
        inner.endpoint.close(close::SHUTDOWN, b"shutdown");
        inner.local_stop.send_replace(true);
        // Let the close frames leave and the connections drain (a few round trips); a peer that misses them
        // times out by itself.
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.endpoint.wait_idle()).await;
    }
}

impl Inner {
    fn enter(&self) -> Result<Active<'_>, TransportError> {
        self.active.fetch_add(1, Ordering::AcqRel);
        let guard = Active(self);
        if self.closing.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        Ok(guard)
    }

    fn header(
        &self,
        frame: FrameType,
        kind: u16,
        to: NodeId,
        deadline: Duration,
        trace: TraceContext,
        payload_len: u64,
    ) -> Header {
        Header {
            frame: frame as u8,
            kind,
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            source: self.node_id.0,
            dest: to.0,
            // A deadline of zero would read as "none"; the smallest real budget is 1 µs.
            budget_us: u64::try_from(deadline.as_micros())
                .unwrap_or(u64::MAX)
                .max(u64::from(!deadline.is_zero())),
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            payload_len,
        }
    }

    /// Largest body that travels on a lane (never more than any message may be).
    fn lane_limit(&self) -> usize {
        self.limits
            .lane_body_limit
            .min(self.limits.max_message_bytes)
            .min(frame::LANE_BODY_MAX)
    }

    fn peer(&self, node: NodeId) -> Result<Arc<Peer>, TransportError> {
        self.peers
            .get(&node)
            .map(|p| p.value().clone())
            .ok_or(TransportError::PeerUnknown(node))
    }

    fn slot<'a>(&self, node: NodeId, peer: &'a Peer) -> Result<Slot<'a>, TransportError> {
        let limit = self.limits.max_inflight_per_peer;
        if peer.inflight.fetch_add(1, Ordering::AcqRel) >= limit {
            peer.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(TransportError::Busy { peer: node, limit });
        }
        Ok(Slot(&peer.inflight))
    }

    async fn local_request(
        &self,
        header: Header,
        body: Body,
        deadline: Duration,
    ) -> Result<Message, TransportError> {
        let (responder, rx) = Responder::new();
        let msg = Message::local(header, body, Some(Instant::now() + deadline));
        self.handler.on_request(msg, responder);
        self.local_reply(self.node_id, header, rx, deadline).await
    }

    async fn local_reply(
        &self,
        to: NodeId,
        req: Header,
        rx: tokio::sync::oneshot::Receiver<Reply>,
        deadline: Duration,
    ) -> Result<Message, TransportError> {
        let reply = tokio::time::timeout(deadline, rx)
            .await
            .map_err(|_| TransportError::Timeout)?;
        match reply {
            Ok(Reply::Ok { kind, body }) => {
                let header = Header {
                    frame: FrameType::Response as u8,
                    kind,
                    source: to.0,
                    dest: self.node_id.0,
                    ..req
                };
                Ok(Message::local(header, body, None))
            }
            Ok(Reply::Err { code, text }) => {
                Err(TransportError::from_remote(code as u16, text.as_bytes()))
            }
            // Responder dropped inside its own Drop always sends; a closed channel means the runtime is going away.
            Err(_) => Err(TransportError::Closed),
        }
    }

    /// The connection to `to`, dialled if there is none.
    async fn connection(
        self: &Inner,
        to: NodeId,
        peer: &Peer,
    ) -> Result<quinn::Connection, TransportError> {
        // Fast path without asking quinn (which takes the connection's lock): a closed connection is removed by
        // its serving task, and a request that finds it closed anyway re-dials once (see `remote_request`).
        if let Some(c) = peer.conn.lock().as_ref() {
            return Ok(c.clone());
        }
        let _dialing = peer.dial.lock().await;
        if let Some(c) = peer.live() {
            return Ok(c);
        }
        let addr = (*peer.addr.lock()).ok_or(TransportError::PeerUnknown(to))?;
        let connecting = self
            .endpoint
            .connect_with(self.client_cfg.clone(), addr, &tls::node_dns_name(to))
            .map_err(|e| TransportError::Connect {
                peer: to,
                why: e.to_string(),
            })?;
        let conn = match tokio::time::timeout(self.limits.handshake_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(from_connection(to, e)),
            Err(_) => {
                return Err(TransportError::Connect {
                    peer: to,
                    why: format!("no handshake with {addr} within the timeout"),
                });
            }
        };
        debug!(node = %self.node_id, peer = %to, %addr, "connected");
        *peer.conn.lock() = Some(conn.clone());
        // The connection carries traffic both ways: serve what the peer opens on it.
        let weak = self.weak();
        let span = info_span!("conn", node = %self.node_id, peer = %to, dir = "out");
        tokio::spawn(serve_bi(weak.clone(), conn.clone(), to).instrument(span.clone()));
        tokio::spawn(serve_uni(weak, conn.clone(), to).instrument(span));
        Ok(conn)
    }

    fn weak(&self) -> Weak<Inner> {
        self.me.clone()
    }

    /// Sends one request (or stream header plus payload) on a fresh stream and reads the reply. The caller
    /// bounds it with the deadline and holds the peer's in-flight slot.
    async fn remote_request(
        &self,
        to: NodeId,
        peer: &Peer,
        header: Header,
        body: Body,
        payload: Option<Bytes>,
    ) -> Result<Message, TransportError> {
        if body.len() > self.limits.max_message_bytes {
            return Err(TransportError::MessageTooLarge {
                size: body.len() as u64,
                limit: self.limits.max_message_bytes as u64,
            });
        }
        if payload.is_none() && body.len() <= self.limits.lane_body_limit.min(frame::LANE_BODY_MAX)
        {
            return self.lane_request(to, peer, header, body).await;
        }
        let (mut send, mut recv, _) = self.open_bi(to, peer).await?;
        let written = write_frame(&mut send, &header, body, payload).await;
        if let Err(e) = written {
            // A receiver that refuses a payload answers with an error frame and stops reading: prefer its answer.
            if let Ok(Ok((h, buf))) =
                tokio::time::timeout(Duration::from_secs(1), read_frame(&mut recv, &self.limits))
                    .await
                && h.frame_type() == Some(FrameType::Error)
            {
                return Err(TransportError::from_remote(h.kind, &buf[HEADER_LEN..]));
            }
            return Err(write_error(to, e));
        }
        let _ = send.finish();
        let (h, buf) = read_frame(&mut recv, &self.limits)
            .await
            .map_err(|e| e.with_peer(to))?;
        if h.source != to.0 || h.dest != self.node_id.0 || h.request_id != header.request_id {
            return Err(TransportError::malformed(
                "response does not match the request",
            ));
        }
        match h.frame_type() {
            Some(FrameType::Response) => {
                Ok(Message::from_frame(h, buf, HEADER_LEN, Instant::now()))
            }
            Some(FrameType::Error) => Err(TransportError::from_remote(h.kind, &buf[HEADER_LEN..])),
            _ => Err(TransportError::malformed(
                "unexpected frame type in response",
            )),
        }
    }
}

impl Inner {
    /// The way one-way messages to `to` take on `conn`: a local link where the peer has one on this host,
    /// else a fresh unidirectional QUIC stream (on a new connection if `conn` turns out dead).
    async fn oneway_stream(
        &self,
        to: NodeId,
        peer: &Peer,
        conn: quinn::Connection,
    ) -> Result<OnewayStream, TransportError> {
        if self.local_links
            && let Some(link) =
                crate::local::dial(self.node_id, to, &conn, self.limits.handshake_timeout).await
        {
            debug!(node = %self.node_id, peer = %to, "one-way messages take a local link");
            return Ok(OnewayStream {
                conn: conn.stable_id(),
                send: OnewaySink::Local(link),
            });
        }
        match conn.open_uni().await {
            Ok(send) => Ok(OnewayStream {
                conn: conn.stable_id(),
                send: OnewaySink::Quic(send),
            }),
            Err(_) => {
                peer.forget(&conn);
                let conn = self.connection(to, peer).await?;
                let send = conn.open_uni().await.map_err(|e| from_connection(to, e))?;
                Ok(OnewayStream {
                    conn: conn.stable_id(),
                    send: OnewaySink::Quic(send),
                })
            }
        }
    }

    /// A fresh bidirectional stream to `to`, and the id of the connection it is on.
    async fn open_bi(
        &self,
        to: NodeId,
        peer: &Peer,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, usize), TransportError> {
        let conn = self.connection(to, peer).await?;
        match conn.open_bi().await {
            Ok((send, recv)) => Ok((send, recv, conn.stable_id())),
            Err(_) => {
                // The connection died since we last used it and nothing was sent yet: dial once more.
                peer.forget(&conn);
                let conn = self.connection(to, peer).await?;
                let (send, recv) = conn.open_bi().await.map_err(|e| from_connection(to, e))?;
                Ok((send, recv, conn.stable_id()))
            }
        }
    }

    /// The live lane to `to`, opened if there is none.
    ///
    /// A lane follows the peer's current connection: when that is replaced (the peer restarted, moved, or
    /// dialled us anew), requests move to a lane on the new one at once instead of waiting for the old
    /// connection to time out.
    async fn lane(&self, to: NodeId, peer: &Peer) -> Result<Arc<ClientLane>, TransportError> {
        let usable =
            |l: &&Arc<ClientLane>, conn: Option<usize>| !l.is_dead() && Some(l.conn_id) == conn;
        if let Some(l) = peer.live_lane() {
            return Ok(l);
        }
        let (send, recv, conn_id) = self.open_bi(to, peer).await?;
        let open = self.header(
            FrameType::Lane,
            0,
            to,
            Duration::ZERO,
            TraceContext::default(),
            0,
        );
        let lane = Arc::new(ClientLane::start(
            send,
            recv,
            Bytes::from(frame::encode_head(&open, 0)),
            conn_id,
            self.node_id,
            to,
            self.limits.clone(),
        ));
        let mut slot = peer.lane.lock();
        match slot.as_ref().filter(|l| usable(l, Some(conn_id))) {
            // Another request opened one meanwhile: use that and let ours close (its writer finishes once
            // this last handle drops).
            Some(other) => Ok(other.clone()),
            None => {
                *slot = Some(lane.clone());
                Ok(lane)
            }
        }
    }

    /// A small request on the peer's lane. A lane found dead before the request went out is replaced once.
    async fn lane_request(
        &self,
        to: NodeId,
        peer: &Peer,
        header: Header,
        mut body: Body,
    ) -> Result<Message, TransportError> {
        let head = lane_head(&header);
        for _ in 0..2 {
            let lane = self.lane(to, peer).await?;
            match lane.call(head, body) {
                Ok((rx, pending)) => {
                    let reply = rx.await;
                    pending.done();
                    return reply.unwrap_or(Err(TransportError::Closed));
                }
                Err(NotSent(b)) => body = b,
            }
        }
        Err(TransportError::Connect {
            peer: to,
            why: "the lane to the peer closed twice before the request could be sent".into(),
        })
    }
}

/// The lane frame head of a request.
fn lane_head(header: &Header) -> LaneHead {
    LaneHead {
        frame: FrameType::Request,
        kind: header.kind,
        request_id: header.request_id,
        budget_us: header.budget_us,
        trace: header.trace(),
    }
}

/// Writes one frame (and, for streams, the raw payload after it) without copying the body or payload.
async fn write_frame(
    send: &mut quinn::SendStream,
    header: &Header,
    body: Body,
    payload: Option<Bytes>,
) -> Result<(), quinn::WriteError> {
    let head = Bytes::from(frame::encode_head(header, body.len()));
    match payload {
        None => send.write_all_chunks(&mut [head, body]).await,
        Some(p) => send.write_all_chunks(&mut [head, body, p]).await,
    }
}

fn write_error(peer: NodeId, e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::ConnectionLost(c) => from_connection(peer, c),
        quinn::WriteError::Stopped(code) => TransportError::Connect {
            peer,
            why: format!("peer stopped the stream (code {code})"),
        },
        other => TransportError::Connect {
            peer,
            why: other.to_string(),
        },
    }
}

/// Reads one frame: the prefix (checked against the limits before allocating), then header and body with one
/// copy into one 16-byte-aligned buffer. Returns the decoded header and that buffer (header at 0, body at
/// `HEADER_LEN`).
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
) -> Result<(Header, Bytes), TransportError> {
    read_frame_or_end(recv, limits).await?.ok_or_else(|| {
        TransportError::malformed(format!("truncated frame prefix (0 of {PREFIX_LEN} bytes)"))
    })
}

/// As [`read_frame`], but a stream that ends cleanly where the next frame would start gives `None`: one-way
/// streams carry any number of frames.
pub(crate) async fn read_frame_or_end(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
) -> Result<Option<(Header, Bytes)>, TransportError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(TransportError::malformed(format!(
                "truncated frame prefix ({n} of {PREFIX_LEN} bytes)"
            )));
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    let p = frame::decode_prefix(&prefix, limits)?;
    let total = p.header_len + p.body_len;
    let mut buf = AlignedVec::<16>::with_capacity(total);
    while buf.len() < total {
        match recv
            .read_chunk(total - buf.len(), true)
            .await
            .map_err(read_error)?
        {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => {
                return Err(TransportError::malformed(format!(
                    "truncated frame ({} of {total} bytes)",
                    buf.len()
                )));
            }
        }
    }
    let header = frame::decode_header(&buf)?;
    if !matches!(
        header.frame_type(),
        Some(FrameType::Stream | FrameType::Lane | FrameType::Oneway)
    ) {
        // Everything but a stream header, a lane opening or a one-way message is alone on its stream. Reading the end (already here: the sender
        // finishes right after writing) also lets quinn free the stream without a STOP_SENDING round.
        if recv
            .read_chunk(1, true)
            .await
            .map_err(read_error)?
            .is_some()
        {
            return Err(TransportError::malformed("bytes after the frame"));
        }
    }
    Ok(Some((header, Bytes::from_owner(buf))))
}

/// Guards the one-way stream while a frame is written on it: unless the write completed, the stream is reset and
/// taken out of its slot, since a torn frame must not be followed by other frames on the same stream.
struct ResetUnlessWritten<'a> {
    slot: &'a mut Option<OnewayStream>,
    written: bool,
}

impl Drop for ResetUnlessWritten<'_> {
    fn drop(&mut self) {
        if !self.written
            && let Some(s) = self.slot.take()
            && let OnewaySink::Quic(mut send) = s.send
        {
            let _ = send.reset(close::STREAM_MALFORMED);
        }
        // A local link is closed by dropping it; its reader sees the torn frame and the end.
    }
}

async fn accept_loop(weak: Weak<Inner>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(inner) = weak.upgrade() else { break };
        if inner.closing.load(Ordering::Acquire) {
            incoming.refuse();
            continue;
        }
        tokio::spawn(async move { inner.handshake(incoming).await });
    }
}

impl Inner {
    /// Completes an incoming handshake and routes the connection by ALPN.
    async fn handshake(self: Arc<Inner>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(self.limits.handshake_timeout, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // A peer without a valid certificate ends here; other peers are unaffected.
                warn!(node = %self.node_id, %remote, cause = %e, "incoming handshake refused");
                return;
            }
            Err(_) => {
                warn!(node = %self.node_id, %remote, "incoming handshake timed out");
                return;
            }
        };
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        if alpn.as_deref() == Some(tls::ALPN_JOIN) {
            match &self.join {
                Some(auth) => crate::join::serve(auth.clone(), conn, self.node_id).await,
                None => conn.close(close::JOIN_REFUSED, b"this node does not accept joins"),
            }
            return;
        }
        let leaf = conn
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| certs.first().cloned());
        let Some(leaf) = leaf else {
            // Only a head (optional client auth, for joins) gets this far without a certificate.
            warn!(node = %self.node_id, %remote, "mesh connection without client certificate refused");
            conn.close(close::NO_CLIENT_CERT, b"client certificate required");
            return;
        };
        let peer = match tls::node_id_from_cert(&leaf) {
            Ok(p) => p,
            Err(e) => {
                conn.close(close::NO_CLIENT_CERT, e.to_string().as_bytes());
                return;
            }
        };
        debug!(node = %self.node_id, %peer, %remote, "accepted");
        let entry = self
            .peers
            .entry(peer)
            .or_insert_with(|| Arc::new(Peer::new(Some(remote))))
            .clone();
        {
            let mut addr = entry.addr.lock();
            if addr.is_none() {
                *addr = Some(remote);
            }
        }
        // Newest wins: after a restart the peer's new connection replaces the dead one at once.
        *entry.conn.lock() = Some(conn.clone());
        let weak = self.weak();
        let span = info_span!("conn", node = %self.node_id, %peer, dir = "in");
        drop(self);
        tokio::spawn(serve_uni(weak.clone(), conn.clone(), peer).instrument(span.clone()));
        serve_bi(weak, conn, peer).instrument(span).await;
    }

    fn connection_lost(
        &self,
        peer: NodeId,
        conn: &quinn::Connection,
        why: &quinn::ConnectionError,
    ) {
        let current = self.peers.get(&peer).is_some_and(|p| p.forget(conn));
        if current && !self.closing.load(Ordering::Acquire) {
            debug!(node = %self.node_id, %peer, cause = %why, "peer lost");
            self.handler.on_peer_lost(peer);
        }
    }

    /// Sends a reply frame on a request's stream.
    async fn respond(&self, send: &mut quinn::SendStream, req: &Header, reply: Reply) {
        let (header, body) = reply.answer(self.node_id, req);
        if let Err(e) = write_frame(send, &header, body, None).await {
            debug!(node = %self.node_id, cause = %e, "reply not delivered");
        }
        let _ = send.finish();
    }

    async fn reject(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        req: &Header,
        code: ErrorCode,
        why: String,
    ) {
        let _ = recv.stop(close::STREAM_MALFORMED);
        self.respond(send, req, Reply::Err { code, text: why })
            .await;
    }

    /// Serves one incoming bidirectional stream: a request or a streamed payload.
    async fn serve_request(
        self: Arc<Inner>,
        peer: NodeId,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        self.active.fetch_add(1, Ordering::AcqRel);
        let active = Active(&self);
        let blank = Header::plain(FrameType::Error, 0, 0, peer, self.node_id);
        let (header, buf) = match read_frame(&mut recv, &self.limits).await {
            Ok(f) => f,
            Err(e) => {
                warn!(node = %self.node_id, %peer, cause = %e, "bad request frame");
                let code = match e {
                    TransportError::MessageTooLarge { .. } => ErrorCode::TooLarge,
                    _ => ErrorCode::Malformed,
                };
                self.reject(&mut send, &mut recv, &blank, code, e.to_string())
                    .await;
                return;
            }
        };
        if header.source != peer.0 || header.dest != self.node_id.0 {
            let why = "envelope source or destination does not match the authenticated connection"
                .to_string();
            self.reject(&mut send, &mut recv, &header, ErrorCode::Malformed, why)
                .await;
            return;
        }
        if self.closing.load(Ordering::Acquire) {
            self.reject(
                &mut send,
                &mut recv,
                &header,
                ErrorCode::ShuttingDown,
                "node is shutting down".into(),
            )
            .await;
            return;
        }
        if header.frame_type() == Some(FrameType::Lane) {
            // A lane lives as long as its connection: shutdown waits for the requests on it, not for it.
            drop(active);
            self.serve_lane(peer, send, recv).await;
            return;
        }
        let received = Instant::now();
        let (responder, rx) = Responder::new();
        match header.frame_type() {
            Some(FrameType::Request) => {
                self.handler.on_request(
                    Message::from_frame(header, buf, HEADER_LEN, received),
                    responder,
                );
            }
            Some(FrameType::Stream) => {
                if header.payload_len > self.limits.max_stream_payload_bytes {
                    let e = TransportError::MessageTooLarge {
                        size: header.payload_len,
                        limit: self.limits.max_stream_payload_bytes,
                    };
                    drop(responder);
                    self.reject(
                        &mut send,
                        &mut recv,
                        &header,
                        ErrorCode::TooLarge,
                        e.to_string(),
                    )
                    .await;
                    return;
                }
                let msg = Message::from_frame(header, buf, HEADER_LEN, received);
                let incoming =
                    IncomingStream::new(Source::Remote(recv), header.payload_len, responder);
                self.handler.on_stream(msg, incoming);
            }
            _ => {
                drop(responder);
                let why = format!("frame type {} not valid on a request stream", header.frame);
                self.reject(&mut send, &mut recv, &header, ErrorCode::Malformed, why)
                    .await;
                return;
            }
        }
        let mut rx = rx;
        let reply = match (rx.try_recv(), header.budget_us) {
            // Answered inline (the common case for cheap handlers): no timer needed.
            (Ok(reply), _) => Ok(reply),
            (Err(tokio::sync::oneshot::error::TryRecvError::Closed), _) => Ok(Reply::Err {
                code: ErrorCode::Dropped,
                text: "handler went away".into(),
            }),
            (Err(_), 0) => rx.await,
            (Err(_), us) => {
                match tokio::time::timeout_at((received + Duration::from_micros(us)).into(), rx)
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Ok(Reply::Err {
                        code: ErrorCode::Timeout,
                        text: "handler missed the deadline".into(),
                    }),
                }
            }
        };
        let reply = reply.unwrap_or(Reply::Err {
            code: ErrorCode::Dropped,
            text: "handler went away".into(),
        });
        self.respond(&mut send, &header, reply).await;
    }

    /// Serves a lane: reads request frames until the requester finishes it, hands each to the handler, and
    /// lets the lane's writer send the replies. The handler's deadline is the requester's to enforce.
    async fn serve_lane(
        self: Arc<Inner>,
        peer: NodeId,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        // Replies not yet written, at most as many as a requester may have in flight: at the bound this task
        // stops reading, and QUIC flow control holds the requester back.
        let gate = Gate::new(
            lane::start_server_writer(send),
            &self.limits,
            ActiveCount(self.clone()),
        );
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        loop {
            let chunk = match recv.read_chunk(usize::MAX, true).await {
                Ok(Some(c)) => c,
                // Finished by the requester, or the connection is gone: either way nothing more comes.
                Ok(None) | Err(_) => return,
            };
            if let Err(e) = reader.push(&chunk.bytes, &self.limits, &mut frames) {
                warn!(node = %self.node_id, %peer, cause = %e, "bad frame on a lane; closing it");
                let code = match e {
                    TransportError::MessageTooLarge { .. } => ErrorCode::TooLarge,
                    _ => ErrorCode::Malformed,
                };
                gate.send(lane::error_frame(0, code, e.to_string()));
                let _ = recv.stop(close::STREAM_MALFORMED);
                return;
            }
            let received = Instant::now();
            for (head, body) in frames.drain(..) {
                if head.frame != FrameType::Request {
                    let why = format!("frame type {} not valid on a lane", head.frame as u8);
                    warn!(node = %self.node_id, %peer, %why, "bad frame on a lane; closing it");
                    gate.send(lane::error_frame(0, ErrorCode::Malformed, why));
                    let _ = recv.stop(close::STREAM_MALFORMED);
                    return;
                }
                if self.closing.load(Ordering::Acquire) {
                    gate.send(lane::error_frame(
                        head.request_id,
                        ErrorCode::ShuttingDown,
                        "node is shutting down".into(),
                    ));
                    continue;
                }
                let hold = match gate.try_take() {
                    Some(h) => h,
                    None => gate.take().await,
                };
                // Source and destination are the lane's ends: the peer the connection authenticated, and us.
                let msg = Message::from_frame(head.header(peer, self.node_id), body, 0, received);
                self.handler
                    .on_request(msg, Responder::lane(LaneReply::new(head, hold)));
            }
        }
    }

    /// Serves one incoming unidirectional stream: one-way messages, one after another until the sender finishes
    /// the stream, each handed to the handler before the next is read (that is what keeps them in order). A bad
    /// frame ends the stream; the messages before it were delivered.
    async fn serve_oneway(self: Arc<Inner>, peer: NodeId, mut recv: quinn::RecvStream) {
        loop {
            let (header, buf) = match read_frame_or_end(&mut recv, &self.limits).await {
                Ok(Some(f)) => f,
                Ok(None) => return,
                // The stream stays open for the connection's life, so its end is usually the connection's.
                Err(e) if !matches!(e, TransportError::Malformed { .. }) => return,
                Err(e) => {
                    warn!(node = %self.node_id, %peer, cause = %e, "bad one-way frame");
                    let _ = recv.stop(close::STREAM_MALFORMED);
                    return;
                }
            };
            if header.source != peer.0
                || header.dest != self.node_id.0
                || header.frame_type() != Some(FrameType::Oneway)
            {
                warn!(node = %self.node_id, %peer, "one-way frame with wrong type or addresses dropped");
                let _ = recv.stop(close::STREAM_MALFORMED);
                return;
            }
            self.handler
                .on_oneway(Message::from_frame(header, buf, HEADER_LEN, Instant::now()));
        }
    }
}

/// Accepts local links (see `local.rs`) until the mesh shuts down or is dropped.
async fn local_accept_loop(
    weak: Weak<Inner>,
    listener: tokio::net::UnixListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let handshaking = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Some(inner) = weak.upgrade() else { return };
        match accepted {
            Ok((stream, _)) => {
                // A local process that connects and says nothing holds a task until the handshake timeout:
                // bound how many may, and close the others at once.
                if handshaking.load(Ordering::Acquire) >= MAX_LOCAL_HANDSHAKES {
                    debug!(node = %inner.node_id, "too many local link handshakes at once; one refused");
                    continue;
                }
                handshaking.fetch_add(1, Ordering::AcqRel);
                let counted = Handshaking(handshaking.clone());
                let stop = stop.clone();
                tokio::spawn(inner.serve_local(stream, stop, counted));
            }
            Err(e) => {
                // Out of descriptors, usually: back off instead of spinning on the error.
                warn!(node = %inner.node_id, cause = %e, "accepting a local link failed");
                drop(inner);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Local link handshakes in progress at once, at most.
const MAX_LOCAL_HANDSHAKES: usize = 64;

/// One local link handshake in progress; counted until dropped.
struct Handshaking(Arc<AtomicUsize>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// Serves one local link: its handshake, then its one-way messages in order until it ends, the mesh shuts
    /// down, or a frame breaks a rule. Holds the handler, not the mesh, so that dropping the mesh ends it.
    async fn serve_local(
        self: Arc<Inner>,
        mut stream: tokio::net::UnixStream,
        mut stop: tokio::sync::watch::Receiver<bool>,
        handshaking: Handshaking,
    ) {
        let me = self.node_id;
        let accepted = tokio::time::timeout(
            self.limits.handshake_timeout,
            crate::local::accept(&mut stream, me, |n| {
                self.peers.get(&n).and_then(|p| p.live())
            }),
        )
        .await;
        drop(handshaking);
        let peer = match accepted {
            Ok(Ok(peer)) => peer,
            Ok(Err(why)) => {
                warn!(node = %me, %why, "local link refused");
                return;
            }
            Err(_) => {
                warn!(node = %me, "local link handshake timed out");
                return;
            }
        };
        debug!(node = %me, %peer, "local link accepted");
        let handler = self.handler.clone();
        let limits = self.limits.clone();
        drop(self);
        if *stop.borrow_and_update() {
            return;
        }
        let read = crate::local::read_frames(stream, peer, me, &limits, |m| handler.on_oneway(m));
        let ended = tokio::select! {
            r = read => r,
            _ = stop.changed() => Ok(()),
        };
        if let Err(e) = ended {
            warn!(node = %me, %peer, cause = %e, "bad frame on a local link; closing it");
        }
    }
}

async fn serve_bi(weak: Weak<Inner>, conn: quinn::Connection, peer: NodeId) {
    let why = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let Some(inner) = weak.upgrade() else { return };
                tokio::spawn(inner.serve_request(peer, send, recv));
            }
            Err(e) => break e,
        }
    };
    if let Some(inner) = weak.upgrade() {
        inner.connection_lost(peer, &conn, &why);
    }
}

async fn serve_uni(weak: Weak<Inner>, conn: quinn::Connection, peer: NodeId) {
    while let Ok(recv) = conn.accept_uni().await {
        let Some(inner) = weak.upgrade() else { return };
        tokio::spawn(inner.serve_oneway(peer, recv));
    }
}
