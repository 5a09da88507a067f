//! Becoming a cluster node: `start --head`, `start --address`, `connect`, and the CLI's view of a cluster.
//!
//! Any binary built on oxray becomes a node by calling [`run_node_if_requested`] first thing in `main`: when the
//! process was started as `myapp start ...` it runs as a node until stopped; otherwise `main` goes on as a
//! driver. A cluster is therefore started with the user's own binary, so every node has the user's functions.
//!
//! Security: the head creates the cluster CA once (key files 0600 in its data dir) and a join token. A node proves
//! the token to obtain a certificate; every mesh connection is then mutually authenticated TLS.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use oxray_transport::tls::{ClusterCa, JoinAuthority, JoinToken, NodeIdentity};
use oxray_transport::{Handler, Limits, Mesh, MeshConfig, Message, NodeId, Responder};
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, NodeHandler, NodeSettings};
use crate::error::{Error, Result};
use crate::runtime::{self, Config, block_on_io};
use crate::wire::{ClusterState, kind};

/// Prints a line for whoever started the node, ignoring a closed stdout: the parent may stop reading once it has
/// the address and token, and a node must not die for that.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The GCS member id of the head's replica. The head is always member 1; `--gcs` nodes host members 2, 3, ...
const GCS_MEMBER: u64 = 1;

/// The GCS group size a new cluster grows to when `--gcs-replicas` is not given: three voters survive the loss
/// of one. The head starts as the lone voter (writable at once) and `--gcs` nodes join it.
const DEFAULT_GCS_REPLICAS: u32 = 3;

/// How often the head's coordinator looks at the group when nothing wakes it earlier (a claim does).
const GROW_EVERY: Duration = Duration::from_millis(300);

/// A learner counts as caught up once its applied index is this close to the leader's: promoting it then
/// adds a voter that can take part in the next commits at once instead of holding them back.
const CATCH_UP_ENTRIES: u64 = 64;

/// Shards of a cluster's GCS. One, as in embedded mode: the GCS holds cluster metadata, far from the load one
/// Raft group can carry, and every member and client must agree on the number (it fixes the key-to-shard map).
const GCS_SHARDS: u32 = 1;

/// How long one GCS control exchange (member table, slot claim, status) may take.
const GCS_CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The head's record of its GCS group (`<data dir>/gcs-members.json`).
///
/// The group grows by Raft membership changes: the head starts as the lone voter, member 1, and each `--gcs`
/// node claims a slot with a claim key it generated and persisted first. A new key gets a new member id (ids are
/// never reused) while the group is below its target; a key seen before gets its member back. The member id
/// and its log are the replica's lasting identity; the node hosting it is whichever process last claimed it (a
/// restarted replica joins under a new node id, because a node id's death is final in the failure detector), so
/// the table of hosting nodes is versioned and handed to everyone who asks. Whether a member votes is Raft's
/// business (its conf state, see `grow_gcs`), not this file's.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GcsGroup {
    /// The number of voters the head grows the group to.
    target: u32,
    /// Bumped on every change of `members`.
    version: u64,
    /// Member id → hosting node id (hex).
    members: BTreeMap<u64, String>,
    /// Claim key (hex) → member id.
    claims: BTreeMap<String, u64>,
    /// The id the next new member gets.
    next_member: u64,
}

/// What the head answers a slot claim with (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimReply {
    /// The member this node hosts.
    member: u64,
    /// Version of `members`.
    version: u64,
    /// The whole group: member id → hosting node id (hex), this node included.
    members: BTreeMap<u64, String>,
}

/// What a `--gcs` node keeps in `<data dir>/gcs-replica/member.json` beside its claim key and log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReplicaFile {
    /// The member this data dir's log belongs to.
    member: u64,
    /// Hex SHA-256 of the cluster CA, so a data dir is never reused for another cluster.
    ca: String,
}

fn hex_node(n: NodeId) -> String {
    format!("{:032x}", n.0)
}

fn parse_node(s: &str) -> Result<NodeId> {
    u128::from_str_radix(s, 16)
        .map(NodeId)
        .map_err(|_| Error::Cluster(format!("bad node id {s:?} in the GCS member table")))
}

fn parse_members(m: &BTreeMap<u64, String>) -> Result<BTreeMap<u64, NodeId>> {
    let out = m
        .iter()
        .map(|(k, v)| Ok((*k, parse_node(v)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    if out.len() > oxray_gcs::mesh::MAX_MEMBERS
        || !out.contains_key(&GCS_MEMBER)
        || out.contains_key(&0)
    {
        return Err(Error::Cluster(format!(
            "bad GCS member table: members {:?}",
            out.keys().collect::<Vec<_>>()
        )));
    }
    Ok(out)
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Group sizes `--gcs-replicas` accepts. Odd only: an even group survives no more failures than the odd one below
/// it and needs a larger quorum. At most 7: more voters only slow commits down.
fn check_replicas(n: u32) -> Result<()> {
    let why = match n {
        1 | 3 | 5 | 7 => return Ok(()),
        0 => "a GCS needs at least one replica".to_string(),
        n if n > 7 => "more than 7 voters only slow every commit down".to_string(),
        n => format!(
            "an even group survives no more failures than {} replicas and needs a larger quorum",
            n - 1
        ),
    };
    Err(Error::InvalidArgument(format!(
        "--gcs-replicas {n} is not possible: use 1, 3, 5 or 7 ({why})"
    )))
}

/// Writes `data` to `path` so that a crash leaves either the old file or the new one: a temporary file, fsynced,
/// renamed over `path`, and the directory fsynced.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| Error::Cluster(format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    write_private(&tmp, data)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Cluster(format!("{} is unreadable: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Cluster(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// The head's GCS group: the one persisted in `dir`, or a new one with the head (`head`) as its only member,
/// growing to `asked` voters (default [`DEFAULT_GCS_REPLICAS`]). A restarted head may raise the target; it
/// cannot lower it below the members the group already has (removing members is not built).
fn head_group(dir: &Path, head: NodeId, asked: Option<u32>) -> Result<GcsGroup> {
    if let Some(n) = asked {
        check_replicas(n)?;
    }
    let path = dir.join("gcs-members.json");
    let save = |g: &GcsGroup| {
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(g).map_err(|e| Error::Cluster(e.to_string()))?,
        )
    };
    if let Ok(text) = std::fs::read(&path)
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text)
        && v.get("replicas").is_some()
    {
        return Err(Error::Cluster(format!(
            "{} holds a fixed-size GCS group from an older oxray; start the cluster with a fresh --data-dir",
            path.display()
        )));
    }
    if let Some(mut g) = read_json::<GcsGroup>(&path)? {
        let members = parse_members(&g.members)?;
        if members[&GCS_MEMBER] != head || g.next_member <= *members.keys().max().unwrap_or(&1) {
            return Err(Error::Cluster(format!(
                "{} is inconsistent",
                path.display()
            )));
        }
        if let Some(n) = asked
            && n != g.target
        {
            if (n as usize) < members.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} holds a GCS of {} members; --gcs-replicas {n} would need members removed, which is                      not supported (start the head with --gcs-replicas {} or more)",
                    dir.display(),
                    members.len(),
                    members.len().max(3) | 1
                )));
            }
            g.target = n;
            save(&g)?;
        }
        return Ok(g);
    }
    let g = GcsGroup {
        target: asked.unwrap_or(DEFAULT_GCS_REPLICAS),
        version: 1,
        members: BTreeMap::from([(GCS_MEMBER, hex_node(head))]),
        claims: BTreeMap::new(),
        next_member: GCS_MEMBER + 1,
    };
    save(&g)?;
    Ok(g)
}

/// The head's answer to a slot claim: the claimant's member (the same one again for a key seen before, a new one
/// while the group is below its target), now hosted by the claiming node `from` (mesh-authenticated). The change
/// is persisted before the answer leaves, then put in the head's own table, and the coordinator is woken to add
/// the new member to the Raft group. The body is a 16-byte claim key; it comes from the network and is checked.
fn claim_slot(
    state: &parking_lot::Mutex<GcsGroup>,
    path: &Path,
    table: &oxray_gcs::mesh::MemberTable,
    from: NodeId,
    body: &[u8],
) -> std::result::Result<bytes::Bytes, String> {
    let key: [u8; 16] = body
        .try_into()
        .map_err(|_| format!("a claim key is 16 bytes, not {}", body.len()))?;
    let key = hex_bytes(&key);
    let mut g = state.lock();
    let member = match g.claims.get(&key) {
        Some(m) => *m,
        None if g.members.len() >= g.target as usize => {
            return Err(format!(
                "the GCS already has its {} replicas (the target set by the head's --gcs-replicas); run this                  node without --gcs",
                g.target
            ));
        }
        None => g.next_member,
    };
    if g.members.get(&member) != Some(&hex_node(from)) || !g.claims.contains_key(&key) {
        let mut next = g.clone();
        next.claims.insert(key, member);
        next.members.insert(member, hex_node(from));
        next.next_member = next.next_member.max(member + 1);
        next.version += 1;
        let members = parse_members(&next.members).map_err(|e| e.to_string())?;
        let json = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
        write_atomic(path, &json).map_err(|e| e.to_string())?;
        table.update(next.version, members);
        *g = next;
        tracing::info!(node = %from, member, version = g.version, "GCS replica slot claimed");
    }
    let reply = ClaimReply {
        member,
        version: g.version,
        members: g.members.clone(),
    };
    serde_json::to_vec(&reply)
        .map(bytes::Bytes::from)
        .map_err(|e| e.to_string())
}

/// The head's coordinator: grows the GCS group to its target by Raft membership changes, one at a time. Every
/// member in the table that is not yet in the group is added as a learner; a learner is promoted to voter once
/// it has caught up with the leader. Promotions wait until enough learners are caught up to reach the next odd
/// size, so the group spends only the moment between two promotions at an even size (an even group survives no
/// more failures than the odd one below it and needs a larger quorum). Only the head proposes membership
/// changes (the members obey `KIND_CHANGE` from it alone), so two changes never race; the leader refuses a
/// second one while the first is in flight anyway.
fn spawn_gcs_coordinator(
    rt: &runtime::Runtime,
    mesh: Mesh,
    server: oxray_gcs::GcsServer,
    table: Arc<oxray_gcs::mesh::MemberTable>,
    kick: Arc<tokio::sync::Notify>,
) {
    let weak = Arc::downgrade(&table);
    drop(table);
    rt.tokio.spawn(async move {
        loop {
            tokio::select! {
                _ = kick.notified() => {}
                _ = tokio::time::sleep(GROW_EVERY) => {}
            }
            let Some(table) = weak.upgrade() else { return };
            for shard in 0..GCS_SHARDS {
                if let Err(why) = grow_gcs(&mesh, &server, &table, shard).await {
                    tracing::debug!(shard, cause = %why, "GCS group not grown this round");
                }
            }
        }
    });
}

/// One round of the coordinator for `shard`: at most one membership change proposed (see
/// [`spawn_gcs_coordinator`]).
async fn grow_gcs(
    mesh: &Mesh,
    server: &oxray_gcs::GcsServer,
    table: &oxray_gcs::mesh::MemberTable,
    shard: u32,
) -> std::result::Result<(), String> {
    use oxray_gcs::replica::{MemberChange, ReplicaError};
    let status_of = |node: NodeId| async move {
        oxray_gcs::mesh::fetch_status(mesh, node, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|s| s.shard == shard)
            .ok_or_else(|| format!("no shard {shard}"))
    };
    let (_, members) = table.snapshot();
    let own = server
        .status()
        .await
        .into_iter()
        .find(|s| s.shard == shard)
        .ok_or("no status")?;
    let leader = own.leader.ok_or("no leader")?;
    let leader_node = *members
        .get(&leader)
        .ok_or_else(|| format!("leader {leader} is not in the table"))?;
    let ls = if leader == server.member() {
        own
    } else {
        status_of(leader_node).await?
    };
    if !ls.is_leader {
        return Err(format!("member {leader} no longer leads"));
    }
    let change = if let Some(&m) = members
        .keys()
        .find(|m| !ls.voters.contains(m) && !ls.learners.contains(m))
    {
        MemberChange::AddLearner(m)
    } else {
        let mut ready = Vec::new();
        for &m in &ls.learners {
            if let Some(&node) = members.get(&m)
                && let Ok(s) = status_of(node).await
                && s.applied + CATCH_UP_ENTRIES >= ls.applied
            {
                ready.push(m);
            }
        }
        let Some(&first) = ready.first() else {
            return Ok(());
        };
        if ls.voters.len() % 2 == 1 && ready.len() < 2 {
            return Ok(());
        }
        MemberChange::Promote(first)
    };
    match oxray_gcs::mesh::propose_change(mesh, leader_node, shard, change, GCS_CONTROL_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?
    {
        Ok(()) => {
            tracing::info!(shard, ?change, "GCS membership change proposed");
            Ok(())
        }
        Err(ReplicaError::ChangePending) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// What a node needs to join: the head's join token and the head's node id, printed by `start --head` as one
/// string (`<join token>~<head id>`).
#[derive(Clone, Debug)]
pub struct ClusterToken {
    /// Proves the right to a certificate, and pins the cluster CA.
    pub join: JoinToken,
    /// The head's node id (its certificate names it).
    pub head: NodeId,
}

impl std::fmt::Display for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}~{:032x}", self.join, self.head.0)
    }
}

impl FromStr for ClusterToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "bad cluster token: {why} (copy it from `start --head`)"
            ))
        };
        let (join, head) = s.trim().rsplit_once('~').ok_or_else(|| bad("no head id"))?;
        let head = u128::from_str_radix(head, 16).map_err(|_| bad("head id is not hex"))?;
        let join = JoinToken::from_str(join).map_err(|e| bad(&e.to_string()))?;
        Ok(ClusterToken {
            join,
            head: NodeId(head),
        })
    }
}

/// Where a running cluster can be reached; written by the head to `<data dir>/cluster.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterAddress {
    /// The head's mesh address.
    pub address: String,
    /// The cluster token.
    pub token: String,
}

/// How to start a head node.
#[derive(Clone, Debug)]
pub struct HeadOptions {
    /// Address to bind (port 0 picks one).
    pub bind: SocketAddr,
    /// Where the CA, the token and `cluster.json` live.
    pub data_dir: PathBuf,
    /// Resources offered and timing.
    pub settings: NodeSettings,
    /// The GCS group size to grow to (1, 3, 5 or 7). `None`: what the data dir holds, else 3.
    pub gcs_replicas: Option<u32>,
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            data_dir: default_data_dir(),
            settings: NodeSettings::default(),
            gcs_replicas: None,
        }
    }
}

/// `$OXRAY_DATA_DIR`, else `$HOME/.oxray`.
pub fn default_data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("OXRAY_DATA_DIR") {
        return PathBuf::from(d);
    }
    std::env::var("HOME")
        .map(|h| PathBuf::from(h).join(".oxray"))
        .unwrap_or_else(|_| PathBuf::from(".oxray"))
}

fn mesh_limits() -> Limits {
    // Benchmarks keep tens of thousands of tasks in flight to one node; `Busy` is still handled by backing off.
    Limits {
        max_inflight_per_peer: 1 << 16,
        ..Limits::default()
    }
}

/// The head's certificate and key, kept in `<data dir>/head-identity/`: a head restarted with the same key derives
/// the same QUIC stateless-reset key, so nodes holding a connection to its previous process learn at once that it
/// is gone and reconnect, instead of waiting for the idle timeout.
fn head_identity(dir: &Path, ca: &ClusterCa, node: NodeId) -> Result<NodeIdentity> {
    let id_dir = dir.join("head-identity");
    if let Ok(identity) = NodeIdentity::load(&id_dir)
        && identity.node_id() == node
        && identity.ca_der() == ca.cert_der()
    {
        return Ok(identity);
    }
    let identity = ca
        .issue(node)
        .map_err(|e| Error::Cluster(format!("cannot issue the head's certificate: {e}")))?;
    std::fs::create_dir_all(&id_dir)
        .map_err(|e| Error::Cluster(format!("cannot create {}: {e}", id_dir.display())))?;
    identity
        .save(&id_dir)
        .map_err(|e| Error::Cluster(format!("cannot save the head's certificate: {e}")))?;
    Ok(identity)
}

/// The head's node id, kept in `<data dir>/head-id` from its first start.
fn head_id(dir: &Path) -> Result<NodeId> {
    let path = dir.join("head-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return u128::from_str_radix(text.trim(), 16)
            .map(NodeId)
            .map_err(|_| {
                Error::Cluster(format!(
                    "{} is not a node id: remove it to start a new cluster",
                    path.display()
                ))
            });
    }
    let node = NodeId::random();
    write_private(&path, format!("{:032x}", node.0).as_bytes())?;
    Ok(node)
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Cluster(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| Error::Cluster(format!("cannot write {}: {e}", path.display())))
}

/// Starts this process as the head node of a new cluster (or of the cluster whose CA is in `data_dir`).
pub fn start_head(opts: HeadOptions) -> Result<ClusterAddress> {
    let dir = &opts.data_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Cluster(format!("cannot create {}: {e}", dir.display())))?;
    let ca_dir = dir.join("ca");
    let ca = if ca_dir.join("ca.pem").exists() {
        ClusterCa::load(&ca_dir)
            .map_err(|e| Error::Cluster(format!("cannot load the cluster CA: {e}")))?
    } else {
        std::fs::create_dir_all(&ca_dir).map_err(|e| Error::Cluster(e.to_string()))?;
        let ca = ClusterCa::generate()
            .map_err(|e| Error::Cluster(format!("cannot create the cluster CA: {e}")))?;
        ca.save(&ca_dir)
            .map_err(|e| Error::Cluster(format!("cannot save the cluster CA: {e}")))?;
        ca
    };
    let token_path = dir.join("join-token");
    let join = match std::fs::read_to_string(&token_path)
        .ok()
        .and_then(|t| JoinToken::from_str(t.trim()).ok())
    {
        Some(t) if t.ca_fingerprint() == ca.fingerprint() => t,
        _ => {
            let t = ca.join_token();
            write_private(&token_path, t.to_string().as_bytes())?;
            t
        }
    };
    // The head keeps its node id across restarts (the id is in every node's token, and the GCS member table
    // names it; the head is the failure detector, so no detector ever declares it dead). A head restarted on the
    // same address is then reconnected to by the nodes, which register again.
    let node = head_id(dir)?;
    let group = head_group(dir, node, opts.gcs_replicas)?;
    let table = oxray_gcs::mesh::MemberTable::new(group.version, parse_members(&group.members)?);
    let identity = head_identity(dir, &ca, node)?;
    let config = config_for(&opts.settings);
    let local_links = config.local_links;
    let rt = runtime::install_as(config, Some(node.0))?;
    let handler = NodeHandler::new();
    let cfg = MeshConfig {
        bind: opts.bind,
        identity,
        limits: mesh_limits(),
        join_secret: Some(JoinAuthority {
            ca,
            token: join.clone(),
        }),
        local_links,
    };
    let h: Arc<dyn Handler> = handler.clone();
    let mesh = block_on_io(&rt.tokio, async move {
        Mesh::bind(cfg, h)
            .await
            .map_err(|e| Error::Cluster(format!("cannot bind the mesh endpoint: {e}")))
    })?;
    // The head hosts GCS member 1 (durable in the data dir) and serves it to the other nodes over the mesh.
    let gcs_dir = dir.join("gcs");
    let cannot = |e: oxray_gcs::server::StartError| {
        Error::Cluster(format!(
            "cannot start the GCS in {}: {e}",
            gcs_dir.display()
        ))
    };
    let service = oxray_gcs::mesh::GcsService::with_table(table.clone());
    let (server, client) = if group.target == 1 && group.members.len() == 1 {
        // A GCS that stays single: the head's own calls need not cross the mesh.
        let _enter = rt.tokio.enter();
        oxray_gcs::GcsServer::embedded(&gcs_dir).map_err(cannot)?
    } else {
        // The head starts as the lone voter, so the GCS is writable at once; a data dir that already holds a
        // grown group keeps its membership, and is writable once a majority of it runs.
        let (server, client) =
            start_member(&rt, &mesh, GCS_MEMBER, vec![GCS_MEMBER], &table, &gcs_dir)
                .map_err(cannot)?;
        service.set_coordinator(node);
        let kick = Arc::new(tokio::sync::Notify::new());
        let state = parking_lot::Mutex::new(group);
        let path = dir.join("gcs-members.json");
        let (t, k) = (table.clone(), kick.clone());
        // Runs on the mesh's handler thread and fsyncs there: claims come once per replica start, so this
        // rare short block is simpler than handing the file write to another thread.
        service.set_claim_handler(Arc::new(move |from, body| {
            let r = claim_slot(&state, &path, &t, from, body);
            k.notify_one();
            r
        }));
        spawn_gcs_coordinator(&rt, mesh.clone(), server.clone(), table.clone(), kick);
        (server, client)
    };
    service.attach(server.clone());
    handler.serve_gcs(service);
    let _ = rt.gcs_server.set(server);
    let _ = rt.gcs.set(oxray_gcs::tables::Tables::new(client));
    let cluster = Cluster::new(
        mesh,
        node,
        opts.settings.clone(),
        true,
        rt.tokio.clone(),
        rt.objects.store().clone(),
    );
    let _ = rt.cluster.set(cluster.clone());
    handler.attach(&rt);
    rt.spin_io_instead();
    let (cl, rt2) = (cluster.clone(), rt.clone());
    block_on_io(&rt.tokio, async move { cl.register(&rt2).await })?;
    cluster.spawn_reaper(&rt);
    let addr = ClusterAddress {
        address: cluster.addr.to_string(),
        token: ClusterToken { join, head: node }.to_string(),
    };
    let json = serde_json::to_vec_pretty(&addr).map_err(|e| Error::Cluster(e.to_string()))?;
    write_private(&dir.join("cluster.json"), &json)?;
    tracing::info!(address = %addr.address, "head node started");
    Ok(addr)
}

/// Starts GCS member `member` of the group in `table`, stored in `dir`, with Raft over `mesh`, and a client that
/// knows the whole group (it finds the leader by following NotLeader hints). A new `dir` starts with `voters`
/// (the head alone, or none for a member joining the running group); an existing one keeps its membership.
fn start_member(
    rt: &runtime::Runtime,
    mesh: &Mesh,
    member: u64,
    voters: Vec<u64>,
    table: &Arc<oxray_gcs::mesh::MemberTable>,
    dir: &Path,
) -> std::result::Result<(oxray_gcs::GcsServer, oxray_gcs::GcsClient), oxray_gcs::server::StartError>
{
    let _enter = rt.tokio.enter();
    let peers = oxray_gcs::mesh::MeshPeers::with_table(table.clone());
    let server = oxray_gcs::GcsServer::start(
        oxray_gcs::ServerConfig::new(member, voters, GCS_SHARDS, dir),
        peers.clone(),
    )?;
    peers.attach(mesh.clone());
    Ok((server, gcs_client(mesh, table)))
}

fn gcs_client(mesh: &Mesh, table: &Arc<oxray_gcs::mesh::MemberTable>) -> oxray_gcs::GcsClient {
    let connector = oxray_gcs::mesh::MeshConnector::with_table(
        mesh.clone(),
        table.clone(),
        Duration::from_secs(2),
    );
    oxray_gcs::GcsClient::new(
        connector,
        table.snapshot().1.keys().copied().collect(),
        GCS_SHARDS,
        oxray_gcs::ClientConfig::default(),
    )
}

/// Keeps a node's member table current: asks the head for it whenever a holder suspects it is stale (a call or
/// a Raft send failed, a Raft message came from or went to a member the table does not name), and every 10 s
/// regardless. Every node runs one, since a one-member group may grow.
fn spawn_table_refresh(
    rt: &runtime::Runtime,
    mesh: Mesh,
    head: NodeId,
    table: Arc<oxray_gcs::mesh::MemberTable>,
) {
    let weak = Arc::downgrade(&table);
    drop(table);
    rt.tokio.spawn(async move {
        while let Some(table) = weak.upgrade() {
            tokio::select! {
                _ = table.stale() => {}
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            match oxray_gcs::mesh::fetch_members(&mesh, head, Duration::from_secs(2)).await {
                Ok((version, members)) => {
                    if table.update(version, members) {
                        tracing::info!(version, "GCS member table updated");
                    }
                }
                Err(e) => tracing::debug!(cause = %e, "cannot refresh the GCS member table"),
            }
            drop(table);
            // At most a few refreshes a second, however many failures signal.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// A `--gcs` node's replica directory, locked, with its claim key and (after its first claim) its member id.
#[derive(Debug)]
struct ReplicaDir {
    dir: PathBuf,
    key: u128,
    member: Option<u64>,
    ca: String,
}

/// Held for the life of the process (the OS drops it at exit, SIGKILL included), so two processes can never
/// host the same replica from one data dir.
static REPLICA_LOCK: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Opens `<data_dir>/gcs-replica/`: locks it, and loads or creates the claim key. The key is persisted before it
/// is ever sent, so a node that crashed mid-claim claims the same slot when started again.
fn open_replica_dir(data_dir: &Path, token: &ClusterToken) -> Result<ReplicaDir> {
    let dir = data_dir.join("gcs-replica");
    let io = |what: &str, e: std::io::Error| {
        Error::Cluster(format!("cannot {what} {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(&dir).map_err(|e| io("create", e))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(|e| io("lock", e))?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            return Err(Error::Cluster(format!(
                "another process hosts the GCS replica in {} (give each --gcs node its own --data-dir)",
                dir.display()
            )));
        }
        Err(e) => return Err(io("lock", e.into())),
    }
    let _ = REPLICA_LOCK.set(lock);
    let ca = hex_bytes(&token.join.ca_fingerprint());
    let member = match read_json::<ReplicaFile>(&dir.join("member.json"))? {
        Some(f) if f.ca != ca => {
            return Err(Error::Cluster(format!(
                "{} holds a GCS replica of another cluster; give this node a fresh --data-dir",
                dir.display()
            )));
        }
        Some(f) => Some(f.member),
        None => None,
    };
    let key_path = dir.join("claim-key");
    let key = match std::fs::read_to_string(&key_path)
        .ok()
        .and_then(|k| u128::from_str_radix(k.trim(), 16).ok())
    {
        Some(k) => k,
        None if member.is_some() => {
            return Err(Error::Cluster(format!(
                "{} has lost its claim key; this replica cannot take its slot back",
                dir.display()
            )));
        }
        None => {
            let k = NodeId::random().0;
            write_atomic(&key_path, format!("{k:032x}").as_bytes())?;
            k
        }
    };
    Ok(ReplicaDir {
        dir,
        key,
        member,
        ca,
    })
}

/// Claims (or takes back) this node's replica slot from the head, over this node's own mesh, so the head records
/// the authenticated node id as the slot's host. Returns the member id and the member table.
async fn claim_replica_slot(
    mesh: &Mesh,
    head: NodeId,
    rd: &ReplicaDir,
) -> Result<(u64, Arc<oxray_gcs::mesh::MemberTable>)> {
    let reply = oxray_gcs::mesh::claim(
        mesh,
        head,
        bytes::Bytes::copy_from_slice(&rd.key.to_be_bytes()),
        GCS_CONTROL_TIMEOUT,
    )
    .await
    .map_err(|e| Error::Cluster(format!("cannot get a GCS replica slot: {e}")))?;
    let reply: ClaimReply = serde_json::from_slice(&reply)
        .map_err(|e| Error::Cluster(format!("bad GCS slot answer: {e}")))?;
    let members = parse_members(&reply.members)?;
    if reply.member == GCS_MEMBER || members.get(&reply.member) != Some(&mesh.node_id()) {
        return Err(Error::Cluster(format!(
            "bad GCS slot answer: member {}",
            reply.member
        )));
    }
    match rd.member {
        Some(m) if m != reply.member => {
            return Err(Error::Cluster(format!(
                "{} holds the log of member {m}, but the head gave this node member {}",
                rd.dir.display(),
                reply.member
            )));
        }
        Some(_) => tracing::info!(
            member = reply.member,
            "resuming GCS replica from its data dir"
        ),
        None => {
            let file = ReplicaFile {
                member: reply.member,
                ca: rd.ca.clone(),
            };
            write_atomic(
                &rd.dir.join("member.json"),
                &serde_json::to_vec_pretty(&file).map_err(|e| Error::Cluster(e.to_string()))?,
            )?;
            tracing::info!(member = reply.member, "claimed a GCS replica slot");
        }
    }
    Ok((
        reply.member,
        oxray_gcs::mesh::MemberTable::new(reply.version, members),
    ))
}

fn config_for(settings: &NodeSettings) -> Config {
    Config {
        // What the node's queue admits tasks by: a driver offers none, so it runs only tasks that need no CPU.
        num_cpus: settings.num_cpus.max(0.0).ceil() as usize,
        num_gpus: settings.num_gpus,
        resources: settings.resources.clone(),
        ..Config::default()
    }
}

/// Joins the cluster at `address` as a worker node (with `settings.num_cpus` CPUs) or a driver (0 CPUs).
pub fn join_cluster(address: &str, token: &str, settings: NodeSettings) -> Result<()> {
    join_inner(address, token, settings, None)
}

/// Joins the cluster at `address` as [`join_cluster`] does, and hosts one of its GCS replicas, kept in
/// `<data_dir>/gcs-replica/`. The first time, this claims a free replica slot from the head; afterwards it takes
/// the same slot back (under this process's new node id), reopens its durable log and catches up from the leader.
pub fn join_as_gcs_replica(
    address: &str,
    token: &str,
    settings: NodeSettings,
    data_dir: &Path,
) -> Result<()> {
    join_inner(address, token, settings, Some(data_dir))
}

fn join_inner(
    address: &str,
    token: &str,
    settings: NodeSettings,
    replica_dir: Option<&Path>,
) -> Result<()> {
    let addr: SocketAddr = address.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{address:?} is not HOST:PORT (an IP address and a port)"
        ))
    })?;
    let token = ClusterToken::from_str(token)?;
    let replica = replica_dir
        .map(|d| open_replica_dir(d, &token))
        .transpose()?;
    let node = NodeId::random();
    let config = config_for(&settings);
    let local_links = config.local_links;
    let rt = runtime::install_as(config, Some(node.0))?;
    if rt.node != node.0 || rt.cluster.get().is_some() {
        return Err(Error::InvalidArgument(
            "this process already runs oxray; call shutdown() first".into(),
        ));
    }
    let join = token.join.clone();
    let identity = block_on_io(&rt.tokio, async move {
        oxray_transport::join(addr, &join, node).await.map_err(|e| {
            Error::Cluster(format!("cannot join the cluster at {addr}: {e} (is `start --head` running, and is the token right?)"))
        })
    })?;
    let bind_ip = if addr.ip().is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let handler = NodeHandler::new();
    let cfg = MeshConfig {
        bind: SocketAddr::new(bind_ip, 0),
        identity,
        limits: mesh_limits(),
        join_secret: None,
        local_links,
    };
    let h: Arc<dyn Handler> = handler.clone();
    let mesh = block_on_io(&rt.tokio, async move {
        Mesh::bind(cfg, h)
            .await
            .map_err(|e| Error::Cluster(format!("cannot bind the mesh endpoint: {e}")))
    })?;
    mesh.add_peer(token.head, addr);
    let head = token.head;
    let table = match replica {
        Some(rd) => {
            let m = mesh.clone();
            let (member, table, dir) = block_on_io(&rt.tokio, async move {
                let (member, table) = claim_replica_slot(&m, head, &rd).await?;
                Ok((member, table, rd.dir))
            })?;
            let gcs_dir = dir.join("gcs");
            // No voters in a new dir: the leader sends the log (or a snapshot) once the head's coordinator has
            // added this member as a learner, and the membership comes with it.
            let (server, client) = start_member(&rt, &mesh, member, Vec::new(), &table, &gcs_dir)
                .map_err(|e| {
                Error::Cluster(format!(
                    "cannot start the GCS replica in {}: {e}",
                    gcs_dir.display()
                ))
            })?;
            let service = oxray_gcs::mesh::GcsService::with_table(table.clone());
            service.set_coordinator(head);
            service.attach(server.clone());
            handler.serve_gcs(service);
            let _ = rt.gcs_server.set(server);
            let _ = rt.gcs.set(oxray_gcs::tables::Tables::new(client));
            table
        }
        None => {
            // Every node's client knows the whole group, so it keeps working when any minority of it is down.
            let m = mesh.clone();
            let (version, members) = block_on_io(&rt.tokio, async move {
                oxray_gcs::mesh::fetch_members(&m, head, GCS_CONTROL_TIMEOUT)
                    .await
                    .map_err(|e| {
                        Error::Cluster(format!(
                            "cannot get the GCS member table from the head: {e}"
                        ))
                    })
            })?;
            let table = oxray_gcs::mesh::MemberTable::new(version, members);
            let _ = rt
                .gcs
                .set(oxray_gcs::tables::Tables::new(gcs_client(&mesh, &table)));
            table
        }
    };
    spawn_table_refresh(&rt, mesh.clone(), head, table);
    let cluster = Cluster::new(
        mesh,
        head,
        settings,
        false,
        rt.tokio.clone(),
        rt.objects.store().clone(),
    );
    let _ = rt.cluster.set(cluster.clone());
    handler.attach(&rt);
    rt.spin_io_instead();
    let rt2 = rt.clone();
    block_on_io(&rt.tokio, async move { cluster.register(&rt2).await })
}

/// Joins a running cluster as a driver: this process submits work and runs none (unless `num_cpus` says so).
///
/// `init()` does the same when `OXRAY_ADDRESS` and `OXRAY_TOKEN` are set, so an unchanged binary runs on a cluster.
pub fn connect(address: &str, token: &str) -> Result<()> {
    join_cluster(
        address,
        token,
        NodeSettings {
            num_cpus: 0.0,
            ..NodeSettings::default()
        },
    )
}

/// One GCS member as [`gcs_status`] reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcsMemberStatus {
    /// Member id (the head is 1).
    pub member: u64,
    /// The node hosting it (hex).
    pub node: String,
    /// Its shard replicas; empty when `error` is set.
    pub shards: Vec<GcsShardStatus>,
    /// Why the member did not answer.
    pub error: Option<String>,
}

/// One shard replica's Raft state, as its member reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcsShardStatus {
    /// Shard number.
    pub shard: u32,
    /// Whether this member leads the shard.
    pub is_leader: bool,
    /// The leader as this member knows it.
    pub leader: Option<u64>,
    /// Raft term.
    pub term: u64,
    /// Last Raft index applied by this member.
    pub applied: u64,
    /// KV revision this member has applied up to.
    pub revision: u64,
    /// The group's voters, as of what this member applied.
    pub voters: Vec<u64>,
    /// The group's learners (members catching up before they vote), as of what this member applied.
    pub learners: Vec<u64>,
}

fn shard_status(s: oxray_gcs::server::ShardStatus) -> GcsShardStatus {
    GcsShardStatus {
        shard: s.shard,
        is_leader: s.is_leader,
        leader: s.leader,
        term: s.term,
        applied: s.applied,
        revision: s.revision,
        voters: s.voters,
        learners: s.learners,
    }
}

/// Asks every GCS member of the cluster this process belongs to for its Raft state (each answers for itself, so a
/// lagging or restarted replica shows its own applied index). A member that does not answer within 2 s is
/// listed with its error.
pub fn gcs_status() -> Result<Vec<GcsMemberStatus>> {
    let rt = runtime::current()?;
    let Some(cl) = rt.cluster.get().cloned() else {
        let server = rt.gcs_server.get().cloned().ok_or_else(|| {
            Error::Cluster("this process runs no GCS (nothing has used it yet)".into())
        })?;
        let node = hex_node(NodeId(rt.node));
        return block_on_io(&rt.tokio, async move {
            Ok(vec![GcsMemberStatus {
                member: server.member(),
                node,
                shards: server
                    .status()
                    .await
                    .into_iter()
                    .map(shard_status)
                    .collect(),
                error: None,
            }])
        });
    };
    block_on_io(&rt.tokio, async move {
        let (_, members) = oxray_gcs::mesh::fetch_members(&cl.mesh, cl.head, GCS_CONTROL_TIMEOUT)
            .await
            .map_err(|e| {
                Error::Cluster(format!(
                    "cannot get the GCS member table from the head: {e}"
                ))
            })?;
        let mut out = Vec::new();
        for (member, node) in members {
            let r = oxray_gcs::mesh::fetch_status(&cl.mesh, node, Duration::from_secs(2)).await;
            let (shards, error) = match r {
                Ok(s) => (s.into_iter().map(shard_status).collect(), None),
                Err(e) => (Vec::new(), Some(e.to_string())),
            };
            out.push(GcsMemberStatus {
                member,
                node: hex_node(node),
                shards,
                error,
            });
        }
        Ok(out)
    })
}

/// Asks the GCS leader (of every shard) to hand its leadership to voter `to`. Nothing is lost either way: the
/// transfer happens once `to` has caught up, and if it never does the old leader stays. Returns once the leader
/// was asked; watch [`gcs_status`] for the outcome. Any cluster node may ask (it changes no membership).
pub fn gcs_transfer_leader(to: u64) -> Result<()> {
    let rt = runtime::current()?;
    let cl = rt
        .cluster
        .get()
        .cloned()
        .ok_or_else(|| Error::Cluster("not part of a cluster".into()))?;
    block_on_io(&rt.tokio, async move {
        let (_, members) = oxray_gcs::mesh::fetch_members(&cl.mesh, cl.head, GCS_CONTROL_TIMEOUT)
            .await
            .map_err(|e| Error::Cluster(format!("cannot get the GCS member table: {e}")))?;
        for shard in 0..GCS_SHARDS {
            let mut leader = None;
            for node in members.values() {
                if let Ok(st) =
                    oxray_gcs::mesh::fetch_status(&cl.mesh, *node, Duration::from_secs(2)).await
                    && st.iter().any(|s| s.shard == shard && s.is_leader)
                {
                    leader = Some(*node);
                    break;
                }
            }
            let node =
                leader.ok_or_else(|| Error::Cluster(format!("GCS shard {shard} has no leader")))?;
            let change = oxray_gcs::replica::MemberChange::TransferLeader(to);
            oxray_gcs::mesh::propose_change(&cl.mesh, node, shard, change, GCS_CONTROL_TIMEOUT)
                .await
                .map_err(|e| Error::Cluster(format!("gcs: {e}")))?
                .map_err(|e| Error::Cluster(format!("gcs: {e}")))?;
        }
        Ok(())
    })
}

/// A handler for short-lived CLI endpoints: they serve nothing.
struct NoService;
impl Handler for NoService {
    fn on_request(&self, _msg: Message, reply: Responder) {
        reply.error("this endpoint serves nothing");
    }
}

/// A temporary endpoint connected to the head, for the CLI (no node is registered).
async fn head_link(address: &str, token: &str) -> Result<(Mesh, NodeId)> {
    let addr: SocketAddr = address.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{address:?} is not HOST:PORT (an IP address and a port)"
        ))
    })?;
    let token = ClusterToken::from_str(token)?;
    let me = NodeId::random();
    let identity = oxray_transport::join(addr, &token.join, me)
        .await
        .map_err(|e| {
            Error::Cluster(format!(
                "no cluster at {addr}: {e} (is `start --head` running, and is the token right?)"
            ))
        })?;
    let bind_ip = if addr.ip().is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let cfg = MeshConfig::new(SocketAddr::new(bind_ip, 0), identity);
    let mesh = Mesh::bind(cfg, Arc::new(NoService))
        .await
        .map_err(|e| Error::Cluster(e.to_string()))?;
    mesh.add_peer(token.head, addr);
    Ok((mesh, token.head))
}

fn cli_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Cluster(format!("cannot start a runtime: {e}")))
}

/// The whole cluster's state, as the head gathers it (for `oxray status` and `oxray list`).
pub fn cluster_state(address: &str, token: &str) -> Result<ClusterState> {
    cli_runtime()?.block_on(async {
        let (mesh, head) = head_link(address, token).await?;
        let state = state_via(&mesh, head, address).await;
        mesh.shutdown().await;
        state
    })
}

async fn state_via(mesh: &Mesh, head: NodeId, address: &str) -> Result<ClusterState> {
    let msg = mesh
        .request(
            head,
            kind::CLUSTER_STATE,
            bytes::Bytes::new(),
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| Error::Cluster(format!("the head at {address} did not answer: {e}")))?;
    serde_json::from_slice(msg.body()).map_err(|e| Error::Cluster(format!("bad state reply: {e}")))
}

/// [`cluster_state`] and every GCS member's own status (for `oxray status`), over one connection to the
/// cluster. The GCS part is best effort: if the head cannot give its member table, it is that error.
pub fn cluster_and_gcs_state(
    address: &str,
    token: &str,
) -> Result<(ClusterState, Result<Vec<GcsMemberStatus>>)> {
    cli_runtime()?.block_on(async {
        let (mesh, head) = head_link(address, token).await?;
        let state = state_via(&mesh, head, address).await;
        let gcs = match &state {
            Ok(s) => gcs_members_via(&mesh, head, s).await,
            Err(e) => Err(e.clone()),
        };
        mesh.shutdown().await;
        Ok((state?, gcs))
    })
}

/// Asks each GCS member for its status through a CLI endpoint, which learns where members listen from the
/// head's membership list (short ids there).
async fn gcs_members_via(
    mesh: &Mesh,
    head: NodeId,
    state: &ClusterState,
) -> Result<Vec<GcsMemberStatus>> {
    let (_, members) = oxray_gcs::mesh::fetch_members(mesh, head, GCS_CONTROL_TIMEOUT)
        .await
        .map_err(|e| Error::Cluster(format!("cannot get the GCS member table: {e}")))?;
    let mut out = Vec::new();
    for (member, node) in members {
        let listed = state
            .members
            .iter()
            .find(|m| m.id == crate::runtime::short(node.0) && m.alive);
        let r = match listed.and_then(|m| m.address.parse::<SocketAddr>().ok()) {
            _ if node == head => {
                oxray_gcs::mesh::fetch_status(mesh, node, Duration::from_secs(2)).await
            }
            Some(addr) => {
                mesh.add_peer(node, addr);
                oxray_gcs::mesh::fetch_status(mesh, node, Duration::from_secs(2)).await
            }
            None if node.0 == 0 => Err(oxray_gcs::client::CallError::Unreachable(
                "slot not claimed yet".into(),
            )),
            None => Err(oxray_gcs::client::CallError::Unreachable(
                "its node is not alive".into(),
            )),
        };
        let (shards, error) = match r {
            Ok(s) => (s.into_iter().map(shard_status).collect(), None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        out.push(GcsMemberStatus {
            member,
            node: hex_node(node),
            shards,
            error,
        });
    }
    Ok(out)
}

/// Stops every node of the cluster (the head forwards the request, then exits).
pub fn stop_cluster(address: &str, token: &str) -> Result<()> {
    cli_runtime()?.block_on(async {
        let (mesh, head) = head_link(address, token).await?;
        mesh.send(head, kind::STOP, bytes::Bytes::new())
            .await
            .map_err(|e| Error::Cluster(format!("cannot reach the head at {address}: {e}")))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        mesh.shutdown().await;
        Ok(())
    })
}

/// Reads `<data dir>/cluster.json`, written by `start --head`.
pub fn read_cluster_address(data_dir: &Path) -> Result<ClusterAddress> {
    let path = data_dir.join("cluster.json");
    let text = std::fs::read_to_string(&path).map_err(|_| {
        Error::Cluster(format!(
            "no cluster found: {} does not exist (start one with `start --head`, or pass --address and --token)",
            path.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Cluster(format!("{} is unreadable: {e}", path.display())))
}

/// The `start` command line shared by every oxray binary.
#[derive(Debug, clap::Parser)]
#[command(about = "Run this binary as an oxray cluster node")]
pub struct StartArgs {
    /// Start a new cluster with this node as its head.
    #[arg(long)]
    pub head: bool,
    /// Port for the head to listen on (0 picks one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// IP address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// How many GCS replicas the cluster grows to (1, 3, 5 or 7; head only; default 3, or what the data dir
    /// holds). The head starts as the only one, so the GCS is writable at once; each node started with `--gcs`
    /// is added as a learner, catches up, and becomes a voter, until the group has this many. 1 keeps the GCS
    /// on the head alone.
    #[arg(long)]
    pub gcs_replicas: Option<u32>,
    /// Host one of the cluster's GCS replicas on this (joining) node, kept in `<data dir>/gcs-replica/`, while
    /// the group is below its target. Restarted with the same data dir, it resumes the same replica.
    #[arg(long)]
    pub gcs: bool,
    /// The head's address, to join a cluster.
    #[arg(long)]
    pub address: Option<String>,
    /// The cluster token printed by `start --head`.
    #[arg(long, env = "OXRAY_TOKEN")]
    pub token: Option<String>,
    /// CPUs offered to tasks (default: all cores).
    #[arg(long)]
    pub num_cpus: Option<f64>,
    /// GPUs offered.
    #[arg(long, default_value_t = 0.0)]
    pub num_gpus: f64,
    /// Custom resources as JSON, e.g. '{"accelerator": 1}'.
    #[arg(long)]
    pub resources: Option<String>,
    /// Where the head keeps its CA, token, GCS and cluster.json; with `--gcs`, where the node keeps its replica.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Milliseconds of silence after which the head declares a node dead.
    #[arg(long, default_value_t = 3000)]
    pub dead_after_ms: u64,
}

/// Starts a node as `args` say, prints how to reach it, and blocks until the cluster is stopped.
pub fn run_start(args: StartArgs) -> Result<()> {
    let mut settings = NodeSettings {
        dead_after: Duration::from_millis(args.dead_after_ms),
        ..NodeSettings::default()
    };
    if let Some(n) = args.num_cpus {
        settings.num_cpus = n;
    }
    settings.num_gpus = args.num_gpus;
    if let Some(r) = &args.resources {
        settings.resources = serde_json::from_str(r).map_err(|e| {
            Error::InvalidArgument(format!("--resources must be a JSON object of numbers: {e}"))
        })?;
    }
    if let Some(n) = args.gcs_replicas {
        check_replicas(n)?;
        if !args.head {
            return Err(Error::InvalidArgument(
                "--gcs-replicas is set when starting the head; give a joining node --gcs to host a replica"
                    .into(),
            ));
        }
    }
    if args.head {
        // The head always hosts member 1, so `--gcs` adds nothing there.
        let opts = HeadOptions {
            bind: SocketAddr::new(args.bind, args.port),
            data_dir: args.data_dir.unwrap_or_else(default_data_dir),
            settings,
            gcs_replicas: args.gcs_replicas,
        };
        let dir = opts.data_dir.clone();
        let addr = start_head(opts)?;
        say!("oxray head node started");
        if let Ok(Some(g)) = read_json::<GcsGroup>(&dir.join("gcs-members.json")) {
            let missing = (g.target as usize).saturating_sub(g.members.len());
            if missing > 0 {
                say!(
                    "gcs: {} of {} replicas; this node hosts member 1, and the group grows as {missing} more \
                     nodes join with --gcs",
                    g.members.len(),
                    g.target,
                );
            } else {
                say!("gcs: {} replicas", g.target);
            }
        }
        say!("address: {}", addr.address);
        say!("token: {}", addr.token);
        say!(
            "join with: start --address {} --token {}",
            addr.address,
            addr.token
        );
    } else {
        let address = args.address.ok_or_else(|| {
            Error::InvalidArgument(
                "give --head to start a cluster, or --address to join one".into(),
            )
        })?;
        let token = args
            .token
            .ok_or_else(|| Error::InvalidArgument("--token is required to join".into()))?;
        if args.gcs {
            let dir = args.data_dir.unwrap_or_else(default_data_dir);
            join_as_gcs_replica(&address, &token, settings, &dir)?;
        } else {
            join_cluster(&address, &token, settings)?;
        }
        let rt = runtime::current()?;
        say!("oxray node started");
        say!("node: {}", crate::runtime::short(rt.node));
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

/// If this process was started as `<binary> start ...`, runs it as a cluster node and never returns;
/// otherwise returns so `main` goes on. Call it first thing in `main`.
///
/// ```no_run
/// fn main() -> oxray::Result<()> {
///     oxray::run_node_if_requested();
///     oxray::init()?; // a driver: embedded, or on the cluster named by OXRAY_ADDRESS / OXRAY_TOKEN
///     Ok(())
/// }
/// ```
pub fn run_node_if_requested() {
    let mut argv = std::env::args_os();
    let prog = argv.next();
    if argv.next().as_deref() != Some(std::ffi::OsStr::new("start")) {
        return;
    }
    use clap::Parser;
    let args = StartArgs::parse_from(prog.into_iter().chain(argv));
    init_logging();
    if let Err(e) = run_start(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
