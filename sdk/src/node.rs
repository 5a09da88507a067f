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

use oxray_transport::tls::{ClusterCa, JoinAuthority, JoinToken};
use oxray_transport::{Handler, Limits, Mesh, MeshConfig, Message, NodeId, Responder};
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, NodeHandler, NodeSettings};
use crate::error::{Error, Result};
use crate::runtime::{self, Config, block_on_io};
use crate::wire::{ClusterState, kind};

/// The GCS member id of the head's replica (this build runs one replica, on the head).
const GCS_MEMBER: u64 = 1;

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
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            data_dir: default_data_dir(),
            settings: NodeSettings::default(),
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
    let node = NodeId::random();
    let identity = ca
        .issue(node)
        .map_err(|e| Error::Cluster(format!("cannot issue the head's certificate: {e}")))?;
    let rt = runtime::install_as(config_for(&opts.settings), Some(node.0))?;
    let handler = NodeHandler::new();
    let cfg = MeshConfig {
        bind: opts.bind,
        identity,
        limits: mesh_limits(),
        join_secret: Some(JoinAuthority {
            ca,
            token: join.clone(),
        }),
    };
    let h: Arc<dyn Handler> = handler.clone();
    let mesh = block_on_io(&rt.tokio, async move {
        Mesh::bind(cfg, h)
            .await
            .map_err(|e| Error::Cluster(format!("cannot bind the mesh endpoint: {e}")))
    })?;
    // The head hosts the GCS replica (durable in the data dir) and serves it to the other nodes over the mesh.
    let gcs_dir = dir.join("gcs");
    let (server, client) = {
        let _enter = rt.tokio.enter();
        oxray_gcs::GcsServer::embedded(&gcs_dir).map_err(|e| {
            Error::Cluster(format!(
                "cannot start the GCS in {}: {e}",
                gcs_dir.display()
            ))
        })?
    };
    let service = oxray_gcs::mesh::GcsService::new(BTreeMap::from([(GCS_MEMBER, node)]));
    service.attach(server.clone());
    handler.serve_gcs(service);
    let _ = rt.gcs_server.set(server);
    let _ = rt.gcs.set(oxray_gcs::tables::Tables::new(client));
    let cluster = Cluster::new(mesh, node, opts.settings.clone(), true, rt.tokio.clone());
    let _ = rt.cluster.set(cluster.clone());
    handler.attach(&rt);
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

fn config_for(settings: &NodeSettings) -> Config {
    Config {
        num_cpus: settings.num_cpus.ceil().max(1.0) as usize,
        ..Config::default()
    }
}

/// Joins the cluster at `address` as a worker node (with `settings.num_cpus` CPUs) or a driver (0 CPUs).
pub fn join_cluster(address: &str, token: &str, settings: NodeSettings) -> Result<()> {
    let addr: SocketAddr = address.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{address:?} is not HOST:PORT (an IP address and a port)"
        ))
    })?;
    let token = ClusterToken::from_str(token)?;
    let node = NodeId::random();
    let rt = runtime::install_as(config_for(&settings), Some(node.0))?;
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
    };
    let h: Arc<dyn Handler> = handler.clone();
    let mesh = block_on_io(&rt.tokio, async move {
        Mesh::bind(cfg, h)
            .await
            .map_err(|e| Error::Cluster(format!("cannot bind the mesh endpoint: {e}")))
    })?;
    mesh.add_peer(token.head, addr);
    let connector = oxray_gcs::mesh::MeshConnector::new(
        mesh.clone(),
        BTreeMap::from([(GCS_MEMBER, token.head)]),
        Duration::from_secs(2),
    );
    let client = oxray_gcs::GcsClient::new(
        connector,
        vec![GCS_MEMBER],
        1,
        oxray_gcs::ClientConfig::default(),
    );
    let _ = rt.gcs.set(oxray_gcs::tables::Tables::new(client));
    let cluster = Cluster::new(mesh, token.head, settings, false, rt.tokio.clone());
    let _ = rt.cluster.set(cluster.clone());
    handler.attach(&rt);
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
        let msg = mesh
            .request(
                head,
                kind::CLUSTER_STATE,
                bytes::Bytes::new(),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| Error::Cluster(format!("the head at {address} did not answer: {e}")))?;
        let state = serde_json::from_slice(msg.body())
            .map_err(|e| Error::Cluster(format!("bad state reply: {e}")));
        mesh.shutdown().await;
        state
    })
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
    /// GCS replicas to run. This build runs one replica, on the head; other values are refused.
    #[arg(long, default_value_t = 1)]
    pub gcs_replicas: u32,
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
    /// Where the head keeps its CA, token and cluster.json.
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
    if args.gcs_replicas != 1 {
        // Multi-replica groups work inside the gcs crate (tested with 3 processes), but `start` cannot place them
        // on other nodes yet: refuse rather than run with less fault tolerance than asked for.
        return Err(Error::InvalidArgument(format!(
            "--gcs-replicas {} is not supported yet: this build runs one GCS replica, on the head",
            args.gcs_replicas
        )));
    }
    if args.head {
        let opts = HeadOptions {
            bind: SocketAddr::new(args.bind, args.port),
            data_dir: args.data_dir.unwrap_or_else(default_data_dir),
            settings,
        };
        let addr = start_head(opts)?;
        println!("oxray head node started");
        println!("address: {}", addr.address);
        println!("token: {}", addr.token);
        println!(
            "join with: start --address {} --token {}",
            addr.address, addr.token
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
        join_cluster(&address, &token, settings)?;
        let rt = runtime::current()?;
        println!("oxray node started");
        println!("node: {}", crate::runtime::short(rt.node));
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
