//! Linearizability of the whole async stack (client retries and redirects, exactly-once dedup, server
//! threads, Raft, storage with real fsync) under leader isolation: concurrent clients on a 3-member
//! [`LocalNet`] cluster record their histories, which the WGL checker must accept.
//!
//! Unlike `sim_raft.rs` this runs in real time, so it is not replayable; it complements the deterministic
//! simulation by covering the code the simulation bypasses (client, wire, server). `OXRAY_SOAK=1` runs longer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxray_gcs::client::{ClientConfig, GcsClient, GcsError};
use oxray_gcs::linearizability::{self, Operation, Output, RegOp};
use oxray_gcs::server::{GcsServer, LocalNet, ServerConfig};
use oxray_gcs::shard::Expect;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

const KEYS: u64 = 3;

fn parse(v: &[u8]) -> u64 {
    std::str::from_utf8(v).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_histories_are_linearizable_under_leader_isolation() {
    let run_for = if std::env::var("OXRAY_SOAK").is_ok() {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(3)
    };
    let dir = tempfile::tempdir().unwrap();
    let net = LocalNet::new();
    let mut servers = Vec::new();
    for m in 1..=3u64 {
        let mut cfg = ServerConfig::new(m, vec![1, 2, 3], 1, dir.path().join(format!("m{m}")));
        cfg.tick = Duration::from_millis(10);
        cfg.replica.snapshot_entries = 50; // exercise snapshots and compaction too
        let s = GcsServer::start(cfg, net.clone()).unwrap();
        net.add(m, s.clone());
        servers.push(s);
    }
    let clock = Arc::new(AtomicU64::new(0));
    let history = Arc::new(Mutex::new(Vec::<Operation>::new()));
    let next_value = Arc::new(AtomicU64::new(1));
    let end = Instant::now() + run_for;
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");

    let mut tasks = Vec::new();
    for c in 0..6u64 {
        let client = GcsClient::new(
            net.clone(),
            vec![1, 2, 3],
            1,
            ClientConfig {
                call_timeout: Duration::from_secs(2),
                attempt_timeout: Duration::from_millis(300),
                ..ClientConfig::default()
            },
        );
        let (clock, history, next_value) = (clock.clone(), history.clone(), next_value.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ c);
            let mut last_seen = [None::<u64>; KEYS as usize];
            while Instant::now() < end {
                let key = rng.random_range(0..KEYS);
                let k = format!("lin/{key}");
                let op = match rng.random_range(0..10) {
                    0..=3 => RegOp::Read,
                    4..=6 => RegOp::Write(next_value.fetch_add(1, Ordering::Relaxed)),
                    7 => RegOp::Delete,
                    _ => RegOp::Cas {
                        expect: last_seen[key as usize],
                        new: next_value.fetch_add(1, Ordering::Relaxed),
                    },
                };
                let invoke = clock.fetch_add(1, Ordering::SeqCst);
                let output = match op {
                    RegOp::Read => match client.get(k).await {
                        Ok(kv) => {
                            let v = kv.map(|kv| parse(&kv.value));
                            last_seen[key as usize] = v;
                            Output::Value(v)
                        }
                        Err(GcsError::Timeout { .. }) => continue,
                        Err(e) => panic!("read: {e}"),
                    },
                    RegOp::Write(v) => match client.put(k, Bytes::from(v.to_string())).await {
                        Ok(_) => Output::Done,
                        Err(GcsError::Timeout { .. }) => Output::Unknown,
                        Err(e) => panic!("write: {e}"),
                    },
                    RegOp::Delete => match client.delete(k).await {
                        Ok(w) => Output::Flag(w.succeeded),
                        Err(GcsError::Timeout { .. }) => Output::Unknown,
                        Err(e) => panic!("delete: {e}"),
                    },
                    RegOp::Cas { expect, new } => {
                        let e = expect.map_or(Expect::Absent, |v| {
                            Expect::Value(Bytes::from(v.to_string()))
                        });
                        match client.cas(k, e, Some(Bytes::from(new.to_string()))).await {
                            Ok(w) => Output::Flag(w.succeeded),
                            Err(GcsError::Timeout { .. }) => Output::Unknown,
                            Err(e) => panic!("cas: {e}"),
                        }
                    }
                };
                let ret = clock.fetch_add(1, Ordering::SeqCst);
                history.lock().push(Operation {
                    key,
                    op,
                    invoke,
                    ret,
                    output,
                });
            }
        }));
    }

    // Faults: cut a random member (often the leader) off for a while, then heal, until the end.
    let faults = {
        let net = net.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..300))).await;
                net.isolate(rng.random_range(1..=3));
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..500))).await;
                net.heal();
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    faults.await.unwrap();
    let history = history.lock().clone();
    let acked = history
        .iter()
        .filter(|o| o.output != Output::Unknown)
        .count();
    eprintln!("{} operations, {acked} acknowledged", history.len());
    assert!(acked > 50, "too little progress: {acked}");
    if let Err(e) = linearizability::check(&history) {
        panic!("seed {seed}: {e}");
    }
    for s in &servers {
        s.shutdown();
    }
}
