//! Stability soak: a 3-replica shard group under steady write load must keep its first leader.
//!
//! Three members on [`LocalNet`] in one process, production settings (20 ms ticks, pre-vote, check-quorum,
//! real fsync), and `OXRAY_SOAK_CLIENTS` (default 32) writers putting as fast as they can for
//! `OXRAY_SOAK_SECS` seconds (default 10, so the CI suite stays fast; the figure is
//! `OXRAY_SOAK_SECS=600`). Every second a sampler reads every member's status. The test asserts:
//! - no leader election after the first one: every sample sees the same leader and the same term on every
//!   member, and the term at the end equals the term at the start;
//! - no failed write: every put returns `Ok` (the client's own retries would hide a lost leader, but not
//!   the term change, which is checked separately);
//! - the group made progress and every member applied every acknowledged write by the end.
//!
//! Keys are overwritten in a bounded set (`soak/{writer}/{0..256}`), so the state and the memory stay flat
//! over a long run while the log keeps being snapshotted and compacted, which is part of what is soaked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxray_gcs::client::{ClientConfig, GcsClient};
use oxray_gcs::server::{GcsServer, LocalNet, ServerConfig, ShardStatus};

const MEMBERS: [u64; 3] = [1, 2, 3];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

async fn statuses(servers: &[GcsServer]) -> Vec<ShardStatus> {
    let mut out = Vec::new();
    for s in servers {
        out.extend(s.status().await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_keeps_the_first_leader() {
    let secs = env_u64("OXRAY_SOAK_SECS", 10);
    let writers = env_u64("OXRAY_SOAK_CLIENTS", 32) as usize;
    let dir = tempfile::tempdir().unwrap();
    let net = LocalNet::new();
    let mut servers = Vec::new();
    for &m in &MEMBERS {
        // Defaults on purpose: the soak checks the settings a cluster runs with.
        let cfg = ServerConfig::new(m, MEMBERS.to_vec(), 1, dir.path().join(format!("m{m}")));
        let s = GcsServer::start(cfg, net.clone()).unwrap();
        net.add(m, s.clone());
        servers.push(s);
    }
    let client = GcsClient::new(net.clone(), MEMBERS.to_vec(), 1, ClientConfig::default());
    // The initial election: wait for the first acknowledged write, then take the leader and term it made.
    client.put("soak/start", Bytes::new()).await.unwrap();
    let first = statuses(&servers).await;
    let leader = first
        .iter()
        .find(|s| s.is_leader)
        .map(|s| (s.leader, s.term))
        .expect("a leader after the first write");
    let (leader_id, term) = (leader.0.unwrap(), leader.1);
    eprintln!("soak: {secs} s, {writers} writers, leader {leader_id} in term {term}");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (client, stop, ok) = (client.clone(), stop.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let value = Bytes::from(vec![b'v'; 100]);
            let mut failures = Vec::new();
            let mut worst = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match client
                    .put(format!("soak/{w}/{}", i % 256), value.clone())
                    .await
                {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(format!("writer {w} put {i}: {e}")),
                }
                worst = worst.max(t0.elapsed());
                i += 1;
            }
            (failures, worst)
        }));
    }

    let start = Instant::now();
    let mut violations = Vec::new();
    let mut last_ok = 0;
    let mut stalled_secs = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for st in statuses(&servers).await {
            if st.term != term || st.leader != Some(leader_id) {
                violations.push(format!(
                    "at {:.1} s member status {st:?} (expected leader {leader_id}, term {term})",
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        let now_ok = ok.load(Ordering::Relaxed);
        if now_ok == last_ok {
            stalled_secs += 1;
        }
        last_ok = now_ok;
        if secs >= 60 && start.elapsed().as_secs().is_multiple_of(60) {
            eprintln!(
                "soak: {:.0} s, {now_ok} writes acknowledged",
                start.elapsed().as_secs_f64()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut worst = Duration::ZERO;
    for t in tasks {
        let (f, w) = t.await.unwrap();
        failures.extend(f);
        worst = worst.max(w);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let writes = ok.load(Ordering::Relaxed);
    // A final write through the client, then every member must reach its revision (all caught up).
    let last = client.put("soak/end", Bytes::new()).await.unwrap();
    let mut caught_up = false;
    for _ in 0..500 {
        let st = statuses(&servers).await;
        if st.len() == MEMBERS.len() && st.iter().all(|s| s.revision >= last.revision) {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = statuses(&servers).await;
    eprintln!(
        "soak: {writes} writes in {elapsed:.1} s ({:.0}/s), slowest {:.1} ms, {} failed, {} status violations, \
         {stalled_secs} one-second samples without progress, end statuses {end:?}",
        writes as f64 / elapsed,
        worst.as_secs_f64() * 1e3,
        failures.len(),
        violations.len()
    );
    for s in &servers {
        s.shutdown();
    }
    assert!(
        failures.is_empty(),
        "failed writes: {:?}",
        &failures[..failures.len().min(10)]
    );
    assert!(
        violations.is_empty(),
        "leader or term changed: {:?}",
        &violations[..violations.len().min(10)]
    );
    assert!(
        end.iter().all(|s| s.term == term),
        "term moved from {term}: {end:?}"
    );
    assert!(writes > 0, "no write was acknowledged");
    assert!(
        caught_up,
        "not every member applied the last write: {end:?}"
    );
}
