//! End-to-end tests of the async server and client in one process: embedded mode, a 3-member cluster on
//! [`LocalNet`] with leader isolation, watch resume without loss or duplication, slow watchers told to
//! resync, and limits surfacing as typed errors. Real files and real fsync throughout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use oxray_gcs::client::{ClientConfig, GcsClient, GcsError};
use oxray_gcs::server::{GcsServer, LocalNet, ServerConfig};
use oxray_gcs::shard::{Expect, Limits, ValidateError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_round_trip_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (server, client) = GcsServer::embedded(dir.path()).unwrap();
        let w = client.put("kv/a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(w.revision, 1);
        client.put("kv/b", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(&client.get("kv/a").await.unwrap().unwrap().value[..], b"1");
        let c = client
            .cas(
                "kv/a",
                Expect::Value(Bytes::from_static(b"nope")),
                Some(Bytes::from_static(b"x")),
            )
            .await
            .unwrap();
        assert!(!c.succeeded);
        let c = client
            .cas("kv/c", Expect::Absent, Some(Bytes::from_static(b"3")))
            .await
            .unwrap();
        assert!(c.succeeded);
        assert!(client.delete("kv/b").await.unwrap().succeeded);
        let (kvs, rev) = client.scan_prefix("kv/").await.unwrap();
        assert_eq!(
            kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
            vec![b"kv/a".to_vec(), b"kv/c".to_vec()]
        );
        assert_eq!(rev, 4);
        assert!(matches!(
            client.put("", Bytes::new()).await,
            Err(GcsError::Invalid(ValidateError::EmptyKey))
        ));
        assert!(matches!(
            client.put(vec![b'k'; 5000], Bytes::new()).await,
            Err(GcsError::Invalid(ValidateError::KeyTooLarge { .. }))
        ));
        server.shutdown();
    }
    let (_server, client) = GcsServer::embedded(dir.path()).unwrap();
    assert_eq!(&client.get("kv/c").await.unwrap().unwrap().value[..], b"3");
    assert_eq!(client.get("kv/b").await.unwrap(), None);
    // Revisions continue after a restart.
    assert_eq!(client.put("kv/d", Bytes::new()).await.unwrap().revision, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_history_then_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = GcsServer::embedded(dir.path()).unwrap();
    for i in 0..5 {
        client
            .put(format!("nodes/{i}"), Bytes::from(i.to_string()))
            .await
            .unwrap();
        client
            .put(format!("other/{i}"), Bytes::new())
            .await
            .unwrap();
    }
    let mut w = client.watch("nodes/", 2).unwrap();
    let mut revs = Vec::new();
    for _ in 0..4 {
        let e = w
            .next_timeout(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(e.key.starts_with(b"nodes/"));
        revs.push(e.revision);
    }
    assert_eq!(revs, vec![3, 5, 7, 9]);
    client.delete("nodes/0").await.unwrap();
    let e = w
        .next_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.key.as_slice(), e.value.clone(), e.revision),
        (&b"nodes/0"[..], None, 11)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watcher_is_told_to_resync() {
    let dir = tempfile::tempdir().unwrap();
    let net = LocalNet::new();
    let mut cfg = ServerConfig::new(1, vec![1], 1, dir.path());
    cfg.replica.limits = Limits {
        history_events: 16,
        ..Limits::default()
    };
    let server = GcsServer::start(cfg, net.clone()).unwrap();
    net.add(1, server.clone());
    let client = GcsClient::new(
        net.clone(),
        vec![1],
        1,
        ClientConfig {
            watch_buffer: 4,
            ..ClientConfig::default()
        },
    );
    let mut w = client.watch("t/", 0).unwrap();
    for i in 0..64 {
        client.put(format!("t/{i}"), Bytes::new()).await.unwrap();
    }
    // The consumer never read while 64 changes went by; the server kept nothing for it.
    let mut seen = Vec::new();
    let err = loop {
        match w
            .next_timeout(Duration::from_secs(5))
            .await
            .expect("stream ends with an error")
        {
            Ok(e) => seen.push(e.revision),
            Err(e) => break e,
        }
    };
    let GcsError::Compacted { oldest } = err else {
        panic!("{err}")
    };
    assert!(oldest >= 64 - 16, "{oldest}");
    assert!(seen.windows(2).all(|p| p[1] == p[0] + 1), "{seen:?}");
    // Resync: a scan gives the state and a revision to resume from.
    let (kvs, rev) = client.scan_prefix("t/").await.unwrap();
    assert_eq!(kvs.len(), 64);
    let mut w = client.watch("t/", rev).unwrap();
    client.put("t/x", Bytes::new()).await.unwrap();
    assert_eq!(
        w.next_timeout(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap()
            .revision,
        rev + 1
    );
}

struct Cluster {
    net: Arc<LocalNet>,
    servers: Vec<GcsServer>,
    _dir: tempfile::TempDir,
}

fn cluster(shards: u32) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let net = LocalNet::new();
    let members = vec![1, 2, 3];
    let mut servers = Vec::new();
    for m in &members {
        let mut cfg = ServerConfig::new(
            *m,
            members.clone(),
            shards,
            dir.path().join(format!("m{m}")),
        );
        cfg.tick = Duration::from_millis(10);
        let s = GcsServer::start(cfg, net.clone()).unwrap();
        net.add(*m, s.clone());
        servers.push(s);
    }
    Cluster {
        net,
        servers,
        _dir: dir,
    }
}

async fn leader_of(c: &Cluster, shard: u32) -> u64 {
    leader_other_than(c, shard, 0).await
}

/// The member leading `shard`, skipping `not`: an isolated old leader still believes it leads until
/// check-quorum deposes it (up to two election timeouts), so asking it proves nothing about the others.
async fn leader_other_than(c: &Cluster, shard: u32, not: u64) -> u64 {
    for _ in 0..500 {
        for s in c.servers.iter().filter(|s| s.member() != not) {
            let st = s.status().await;
            if st[shard as usize].is_leader {
                return s.member();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader for shard {shard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_leader_isolation_without_losing_writes_or_events() {
    let c = cluster(2);
    let client = GcsClient::new(c.net.clone(), vec![1, 2, 3], 2, ClientConfig::default());
    let shard = client.shard_map().shard_of(b"jobs/");
    let mut watch = client.watch("jobs/", 0).unwrap();
    let mut acked = BTreeMap::new();
    for i in 0..20 {
        let w = client
            .put(format!("jobs/{i}"), Bytes::from(i.to_string()))
            .await
            .unwrap();
        acked.insert(i, w.revision);
    }
    let old = leader_of(&c, shard).await;
    c.net.isolate(old);
    // Writes keep succeeding once a new leader is elected (the client rediscovers it).
    for i in 20..40 {
        let w = client
            .put(format!("jobs/{i}"), Bytes::from(i.to_string()))
            .await
            .unwrap();
        acked.insert(i, w.revision);
    }
    // A member other than the isolated one leads (this panics if none does within 5 s).
    leader_other_than(&c, shard, old).await;
    c.net.heal();
    for i in 40..50 {
        let w = client
            .put(format!("jobs/{i}"), Bytes::from(i.to_string()))
            .await
            .unwrap();
        acked.insert(i, w.revision);
    }
    // Every acknowledged write is there.
    let (kvs, _) = client.scan_prefix("jobs/").await.unwrap();
    assert_eq!(kvs.len(), 50);
    for kv in &kvs {
        let i: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
        assert_eq!(kv.mod_revision, acked[&i]);
    }
    // The watcher saw each change exactly once, in order, across the leader change.
    let mut revs = Vec::new();
    while revs.len() < 50 {
        let e = watch
            .next_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        revs.push(e.revision);
    }
    let mut expected: Vec<u64> = acked.values().copied().collect();
    expected.sort_unstable();
    assert_eq!(revs, expected);
    assert!(
        watch
            .next_timeout(Duration::from_millis(200))
            .await
            .is_none(),
        "no duplicates"
    );
    for s in &c.servers {
        s.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_many_shards() {
    let c = cluster(4);
    let client = GcsClient::new(c.net.clone(), vec![1, 2, 3], 4, ClientConfig::default());
    let mut tasks = Vec::new();
    for t in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                client
                    .put(format!("t{t}/{i}"), Bytes::from_static(b"v"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A prefix without '/' spans shards: the scan fans out and merges in key order.
    let (kvs, rev) = client.scan_prefix("t").await.unwrap();
    assert_eq!(kvs.len(), 320);
    assert_eq!(rev, 0);
    assert!(kvs.windows(2).all(|p| p[0].key < p[1].key));
    assert!(matches!(
        client.watch("t", 0),
        Err(GcsError::WatchSpansShards(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_tables() {
    use oxray_gcs::tables::*;
    use oxray_transport::NodeId;
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = GcsServer::embedded(dir.path()).unwrap();
    let t = Tables::new(client.clone());
    let node = NodeInfo {
        node: NodeId(42),
        address: "127.0.0.1:7000".into(),
        resources: vec![("CPU".into(), 4.0)],
        labels: vec![],
        state: NodeState::Alive,
        heartbeat_ms: 1,
    };
    let id = Tables::node_id(node.node);
    assert!(t.nodes.insert_new(&id, &node).await.unwrap());
    assert!(
        !t.nodes.insert_new(&id, &node).await.unwrap(),
        "second insert refused"
    );
    let (list, rev) = t.nodes.list().await.unwrap();
    assert_eq!(list.len(), 1);
    let mut watch = t.nodes.watch(rev).unwrap();
    let cur = t.nodes.get(&id).await.unwrap().unwrap();
    let dead = NodeInfo {
        state: NodeState::Dead,
        ..node.clone()
    };
    assert!(t.nodes.update(&id, cur.mod_revision, &dead).await.unwrap());
    assert!(
        !t.nodes.update(&id, cur.mod_revision, &node).await.unwrap(),
        "stale revision refused"
    );
    let ev = watch.next().await.unwrap().unwrap();
    assert_eq!(ev.id, id);
    assert_eq!(ev.value.unwrap().state, NodeState::Dead);

    assert!(t.register_actor_name("ns", "counter", 9).await.unwrap());
    assert!(!t.register_actor_name("ns", "counter", 10).await.unwrap());
    assert_eq!(t.lookup_actor_name("ns", "counter").await.unwrap(), Some(9));
    assert!(!t.unregister_actor_name("ns", "counter", 10).await.unwrap());
    assert!(t.unregister_actor_name("ns", "counter", 9).await.unwrap());

    t.kv_put("app", "a", Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert_eq!(
        t.kv_list("app").await.unwrap(),
        vec![("a".to_string(), Bytes::from_static(b"1"))]
    );
    // A foreign value in a typed table is a decode error, not a panic.
    client
        .put("jobs/bad", Bytes::from_static(b"xx"))
        .await
        .unwrap();
    assert!(matches!(
        t.jobs.get("bad").await,
        Err(TableError::Decode { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_fails_with_timeout_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let net = LocalNet::new();
    let server =
        GcsServer::start(ServerConfig::new(1, vec![1], 1, dir.path()), net.clone()).unwrap();
    net.add(1, server.clone());
    let client = GcsClient::new(net.clone(), vec![1], 1, ClientConfig::default())
        .with_timeout(Duration::from_millis(300));
    client.put("kv/a", Bytes::new()).await.unwrap();
    net.isolate(1);
    let t0 = std::time::Instant::now();
    match client.put("kv/b", Bytes::new()).await {
        Err(GcsError::Timeout {
            outcome_unknown, ..
        }) => assert!(outcome_unknown, "a write's fate is unknown"),
        other => panic!("{other:?}"),
    }
    match client.get("kv/a").await {
        Err(GcsError::Timeout {
            outcome_unknown, ..
        }) => assert!(!outcome_unknown),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "deadline respected");
    net.heal();
    assert!(client.get("kv/a").await.unwrap().is_some());
    // A stopped server surfaces as an error too, never a hang.
    server.shutdown();
    assert!(matches!(
        client.get("kv/a").await,
        Err(GcsError::Timeout { .. })
    ));
}
