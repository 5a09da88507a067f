//! The adapter between the GCS's network seams and the QUIC mesh (`oxray-transport`).
//!
//! - [`MeshPeers`] implements [`PeerNetwork`]: Raft messages go out as one-way mesh messages of kind
//!   [`KIND_RAFT`] to the member's node; those above [`STREAM_THRESHOLD`] (snapshots) are streamed
//!   ([`KIND_RAFT_STREAM`]) so they are not bound by the transport's message size limit.
//! - [`MeshConnector`] implements [`Connector`]: client requests are mesh requests of kind [`KIND_REQUEST`].
//! - [`GcsService`] answers both on the receiving node. A node whose mesh serves other things too routes
//!   these kinds to [`GcsService::on_request`] / [`GcsService::on_oneway`] from its own handler; a mesh that
//!   serves only the GCS can use [`GcsService`] directly as its [`Handler`].
//!
//! Bodies are the encodings of [`crate::wire`]; nothing here makes decisions.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use oxray_transport::{Handler, Mesh, Message, NodeId, Responder};

use crate::client::{CallError, Connector};
use crate::server::{GcsServer, PeerNetwork};
use crate::wire::{Request, Response};

/// Mesh message kind of a client request to a GCS member (answered with [`KIND_RESPONSE`]).
pub const KIND_REQUEST: u16 = 0x0300;
/// Mesh message kind of a GCS member's answer.
pub const KIND_RESPONSE: u16 = 0x0301;
/// Mesh message kind of a one-way Raft message between GCS members.
pub const KIND_RAFT: u16 = 0x0302;
/// Mesh stream kind of a large Raft message (a snapshot) streamed between GCS members.
pub const KIND_RAFT_STREAM: u16 = 0x0303;

/// Raft messages larger than this (in practice only snapshots) are streamed rather than sent as one mesh
/// message, which the transport caps at `max_message_bytes` (64 MiB by default).
pub const STREAM_THRESHOLD: usize = 8 << 20;

/// Sends Raft traffic over the mesh. Member ids map to node ids through a fixed table.
#[derive(Debug)]
pub struct MeshPeers {
    mesh: OnceLock<Mesh>,
    members: BTreeMap<u64, NodeId>,
    runtime: tokio::runtime::Handle,
}

impl MeshPeers {
    /// A peer network over `members` (member id → node id). Call [`MeshPeers::attach`] once the mesh is
    /// bound (the mesh needs its handler first, and the handler needs the server, which needs this).
    /// Must be created inside a tokio runtime: sends are spawned on it.
    pub fn new(members: BTreeMap<u64, NodeId>) -> Arc<MeshPeers> {
        Arc::new(MeshPeers {
            mesh: OnceLock::new(),
            members,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Sets the mesh to send through (later calls are ignored).
    pub fn attach(&self, mesh: Mesh) {
        let _ = self.mesh.set(mesh);
    }
}

impl PeerNetwork for MeshPeers {
    fn send_raft(&self, to: u64, msg: Bytes) {
        let (Some(mesh), Some(node)) = (self.mesh.get(), self.members.get(&to)) else {
            return;
        };
        let mesh = mesh.clone();
        let node = *node;
        // Called from a shard thread: hand the send to the runtime. Failures are dropped; Raft retransmits.
        self.runtime.spawn(async move {
            let res = if msg.len() > STREAM_THRESHOLD {
                mesh.send_stream(node, KIND_RAFT_STREAM, Bytes::new(), msg)
                    .await
                    .map(drop)
            } else {
                mesh.send(node, KIND_RAFT, msg).await
            };
            if let Err(e) = res {
                tracing::debug!(to = %node, cause = %e, "raft send failed");
            }
        });
    }
}

/// Calls GCS members over the mesh.
#[derive(Debug, Clone)]
pub struct MeshConnector {
    mesh: Mesh,
    members: BTreeMap<u64, NodeId>,
    timeout: Duration,
}

impl MeshConnector {
    /// A connector over `mesh` to `members` (member id → node id); each request waits at most `timeout`
    /// (the client also applies its own deadlines; this bounds one attempt on the wire).
    pub fn new(
        mesh: Mesh,
        members: BTreeMap<u64, NodeId>,
        timeout: Duration,
    ) -> Arc<MeshConnector> {
        Arc::new(MeshConnector {
            mesh,
            members,
            timeout,
        })
    }
}

impl Connector for MeshConnector {
    fn call(
        &self,
        member: u64,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, CallError>> + Send + '_>> {
        Box::pin(async move {
            let node = *self
                .members
                .get(&member)
                .ok_or_else(|| CallError::Unreachable(format!("unknown member {member}")))?;
            let reply = self
                .mesh
                .request(node, KIND_REQUEST, req.encode(), self.timeout)
                .await
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            if reply.kind() != KIND_RESPONSE {
                return Err(CallError::BadResponse(format!(
                    "message kind {:#x}",
                    reply.kind()
                )));
            }
            Response::decode(reply.body()).map_err(|e| CallError::BadResponse(e.to_string()))
        })
    }
}

/// Serves GCS requests and Raft messages arriving over the mesh for one member.
///
/// A Raft message is accepted only if the mesh-authenticated sender is the node of the member the message
/// claims to come from, so a node that is not a member cannot vote or append.
#[derive(Debug)]
pub struct GcsService {
    /// Replaceable, so a member restarted in-process (from its files) can take over the same endpoint.
    server: parking_lot::RwLock<Option<GcsServer>>,
    members: BTreeMap<u64, NodeId>,
}

impl GcsService {
    /// A service for a cluster of `members` (member id → node id), with no server yet (requests fail until
    /// [`GcsService::attach`]).
    pub fn new(members: BTreeMap<u64, NodeId>) -> Arc<GcsService> {
        Arc::new(GcsService {
            server: parking_lot::RwLock::new(None),
            members,
        })
    }

    /// Sets (or replaces) the server to dispatch to.
    pub fn attach(&self, server: GcsServer) {
        *self.server.write() = Some(server);
    }

    /// Stops dispatching (requests fail, Raft messages are dropped) and returns the server that was attached.
    pub fn detach(&self) -> Option<GcsServer> {
        self.server.write().take()
    }

    /// Whether `kind` is one of the GCS's message kinds.
    pub fn handles(kind: u16) -> bool {
        matches!(kind, KIND_REQUEST | KIND_RAFT | KIND_RAFT_STREAM)
    }
}

impl Handler for GcsService {
    fn on_request(&self, msg: Message, reply: Responder) {
        if msg.kind() != KIND_REQUEST {
            reply.error(format!("gcs: unexpected request kind {:#x}", msg.kind()));
            return;
        }
        let Some(server) = self.server.read().clone() else {
            reply.error("gcs: member not started");
            return;
        };
        tokio::spawn(async move {
            let resp = server.handle_bytes(msg.body()).await;
            reply.send(KIND_RESPONSE, resp);
        });
    }

    fn on_oneway(&self, msg: Message) {
        if msg.kind() == KIND_RAFT {
            self.deliver(msg.source(), msg.body());
        }
    }

    fn on_stream(&self, header: Message, mut incoming: oxray_transport::IncomingStream) {
        if header.kind() != KIND_RAFT_STREAM {
            incoming.error(format!("gcs: unexpected stream kind {:#x}", header.kind()));
            return;
        }
        if !self.members.values().any(|n| *n == header.source()) {
            incoming.error("gcs: streams are accepted from members only");
            return;
        }
        let this = GcsService {
            server: parking_lot::RwLock::new(self.server.read().clone()),
            members: self.members.clone(),
        };
        tokio::spawn(async move {
            match incoming.read_all().await {
                Ok(body) => {
                    this.deliver(header.source(), &body);
                    incoming.reply(KIND_RESPONSE, Bytes::new());
                }
                Err(e) => tracing::debug!(cause = %e, "raft stream failed"),
            }
        });
    }
}

impl GcsService {
    /// Delivers an encoded Raft message if `source` is the node of the member it claims to come from.
    fn deliver(&self, source: NodeId, body: &[u8]) {
        let Some(server) = self.server.read().clone() else {
            return;
        };
        match crate::wire::decode_raft(body) {
            Ok((shard, m)) if self.members.get(&m.from) == Some(&source) => {
                server.deliver(shard, m)
            }
            Ok((_, m)) => {
                tracing::warn!(source = %source, claimed = m.from, "raft message from a non-member dropped");
            }
            Err(e) => {
                tracing::debug!(source = %source, cause = %e, "malformed raft message dropped")
            }
        }
    }
}
