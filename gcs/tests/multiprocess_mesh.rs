//! Three GCS member processes on loopback over the real QUIC mesh (mutual TLS), with the leader killed by
//! SIGKILL in the middle of a stream of writes, then restarted from its files.
//!
//! Asserts: every acknowledged write is present with its value and revision; the watcher saw every change
//! exactly once and in order across the failover; the restarted member rejoins from disk and helps form a
//! quorum after another member is killed.
//!
//! `OXRAY_SOAK=1` repeats the kill-and-restart round five times.
//!
//! The member processes are this same test binary re-run with `OXRAY_GCS_CHILD` set (see [`child_member`]),
//! so no extra binary is needed. Ports are chosen by binding to `:0` and released just before the children
//! bind them (a small race on a busy machine, reported as a start failure, not as a wrong result).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxray_gcs::client::{ClientConfig, GcsClient, GcsError};
use oxray_gcs::mesh::{GcsService, MeshConnector, MeshPeers};
use oxray_gcs::server::{GcsServer, ServerConfig};
use oxray_transport::tls::{ClusterCa, NodeIdentity};
use oxray_transport::{Handler, Mesh, MeshConfig, Message, NodeId, Responder};

const MEMBERS: u64 = 3;

fn node_of(member: u64) -> NodeId {
    NodeId(0x6c5_0000 + u128::from(member))
}

fn members_map() -> BTreeMap<u64, NodeId> {
    (1..=MEMBERS).map(|m| (m, node_of(m))).collect()
}

/// Entry point of a member process; a no-op in the parent.
#[test]
fn child_member() {
    let Ok(spec) = std::env::var("OXRAY_GCS_CHILD") else {
        return;
    };
    // spec: member;dir;addr1,addr2,addr3
    let parts: Vec<&str> = spec.split(';').collect();
    let member: u64 = parts[0].parse().unwrap();
    let dir = PathBuf::from(parts[1]);
    let addrs: Vec<SocketAddr> = parts[2].split(',').map(|a| a.parse().unwrap()).collect();
    // Exit when the parent goes away (its end of our stdin closes), so a killed test leaves no orphans.
    std::thread::spawn(|| {
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let identity = NodeIdentity::load(&dir.join(format!("id{member}"))).unwrap();
        let service = GcsService::new(members_map());
        let mesh = Mesh::bind(
            MeshConfig::new(addrs[member as usize - 1], identity),
            service.clone(),
        )
        .await
        .unwrap();
        for m in 1..=MEMBERS {
            if m != member {
                mesh.add_peer(node_of(m), addrs[m as usize - 1]);
            }
        }
        let peers = MeshPeers::new(members_map());
        peers.attach(mesh.clone());
        let mut cfg = ServerConfig::new(
            member,
            (1..=MEMBERS).collect(),
            2,
            dir.join(format!("data{member}")),
        );
        cfg.tick = Duration::from_millis(20);
        let server = GcsServer::start(cfg, peers).unwrap();
        service.attach(server);
        // Serve until killed.
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

struct NoRequests;
impl Handler for NoRequests {
    fn on_request(&self, _msg: Message, reply: Responder) {
        reply.error("client node serves nothing");
    }
}

fn free_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

fn spawn_member(member: u64, dir: &Path, addrs: &[SocketAddr]) -> Child {
    let list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    Command::new(std::env::current_exe().unwrap())
        .args(["child_member", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            "OXRAY_GCS_CHILD",
            format!("{member};{};{list}", dir.display()),
        )
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

struct Members {
    children: BTreeMap<u64, Child>,
}

impl Drop for Members {
    fn drop(&mut self) {
        for c in self.children.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `jobs/{i}` for i in `range`, recording acknowledged revisions and unknown outcomes.
async fn write_range(
    client: &GcsClient,
    range: std::ops::Range<u64>,
    acked: &mut BTreeMap<u64, u64>,
    unknown: &mut BTreeSet<u64>,
) {
    for i in range {
        match client
            .put(format!("jobs/{i}"), Bytes::from(i.to_string()))
            .await
        {
            Ok(w) => {
                acked.insert(i, w.revision);
            }
            Err(GcsError::Timeout { .. }) => {
                unknown.insert(i);
            }
            Err(e) => panic!("write {i}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_and_restart_from_disk() {
    if std::env::var("OXRAY_GCS_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    for m in 1..=MEMBERS {
        let d = dir.path().join(format!("id{m}"));
        std::fs::create_dir_all(&d).unwrap();
        ca.issue(node_of(m)).unwrap().save(&d).unwrap();
    }
    let addrs: Vec<SocketAddr> = (0..MEMBERS).map(|_| free_addr()).collect();
    let mut members = Members {
        children: (1..=MEMBERS)
            .map(|m| (m, spawn_member(m, dir.path(), &addrs)))
            .collect(),
    };

    let me = NodeId(0x6c5_ffff);
    let mesh = Mesh::bind(
        MeshConfig::new("127.0.0.1:0".parse().unwrap(), ca.issue(me).unwrap()),
        Arc::new(NoRequests),
    )
    .await
    .unwrap();
    for m in 1..=MEMBERS {
        mesh.add_peer(node_of(m), addrs[m as usize - 1]);
    }
    let connector = MeshConnector::new(mesh.clone(), members_map(), Duration::from_secs(1));
    let client = GcsClient::new(
        connector,
        (1..=MEMBERS).collect(),
        2,
        ClientConfig {
            call_timeout: Duration::from_secs(8),
            ..ClientConfig::default()
        },
    );
    let shard = client.shard_map().shard_of(b"jobs/");
    let mut watch = client.watch("jobs/", 0).unwrap();
    let (mut acked, mut unknown) = (BTreeMap::new(), BTreeSet::new());

    // One kill-and-restart round by default; OXRAY_SOAK=1 runs five.
    let rounds = if std::env::var("OXRAY_SOAK").is_ok() {
        5
    } else {
        1
    };
    let mut next = 0u64;
    let mut restarted = 0;
    for round in 0..rounds {
        write_range(&client, next..next + 100, &mut acked, &mut unknown).await;
        next += 100;
        let leader = client.leader_hint(shard).expect("a leader answered");
        // SIGKILL the leader mid-stream: a writer task keeps going while it dies.
        let writer = {
            let client = client.clone();
            let range = next..next + 100;
            tokio::spawn(async move {
                let (mut a, mut u) = (BTreeMap::new(), BTreeSet::new());
                write_range(&client, range, &mut a, &mut u).await;
                (a, u)
            })
        };
        next += 100;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let started = Instant::now();
        members.children.get_mut(&leader).unwrap().kill().unwrap();
        members.children.get_mut(&leader).unwrap().wait().unwrap();
        let (a, u) = writer.await.unwrap();
        acked.extend(a);
        unknown.extend(u);
        let new_leader = client.leader_hint(shard).expect("a new leader answered");
        assert_ne!(new_leader, leader);
        eprintln!(
            "round {round}: 100 writes finished {:?} after the kill; new leader {new_leader}",
            started.elapsed()
        );
        // Restart the killed member from its files.
        members
            .children
            .insert(leader, spawn_member(leader, dir.path(), &addrs));
        write_range(&client, next..next + 50, &mut acked, &mut unknown).await;
        next += 50;
        tokio::time::sleep(Duration::from_secs(1)).await; // let it catch up
        restarted = leader;
    }
    // Kill a member other than the restarted one: the restarted one must now help form the quorum.
    let victim = match client.leader_hint(shard) {
        Some(l) if l != restarted => l,
        _ => (1..=MEMBERS).find(|&m| m != restarted).unwrap(),
    };
    members.children.get_mut(&victim).unwrap().kill().unwrap();
    members.children.get_mut(&victim).unwrap().wait().unwrap();
    write_range(&client, next..next + 50, &mut acked, &mut unknown).await;

    // Every acknowledged write is present with the acknowledged revision.
    let (kvs, _) = client.scan_prefix("jobs/").await.unwrap();
    let stored: BTreeMap<u64, u64> = kvs
        .iter()
        .map(|kv| {
            (
                std::str::from_utf8(&kv.value).unwrap().parse().unwrap(),
                kv.mod_revision,
            )
        })
        .collect();
    for (i, rev) in &acked {
        assert_eq!(
            stored.get(i),
            Some(rev),
            "acknowledged write {i} lost or changed"
        );
    }
    for i in stored.keys() {
        assert!(
            acked.contains_key(i) || unknown.contains(i),
            "write {i} appeared from nowhere"
        );
    }
    // The watcher saw every stored change once, in revision order.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < stored.len() && Instant::now() < deadline {
        if let Some(e) = watch.next_timeout(Duration::from_secs(2)).await {
            seen.push(e.unwrap().revision);
        }
    }
    let mut expected: Vec<u64> = stored.values().copied().collect();
    expected.sort_unstable();
    assert_eq!(seen, expected, "watch missed or repeated events");
    assert!(
        watch
            .next_timeout(Duration::from_millis(300))
            .await
            .is_none()
    );
    eprintln!("{} acknowledged, {} unknown", acked.len(), unknown.len());
    mesh.shutdown().await;
}
