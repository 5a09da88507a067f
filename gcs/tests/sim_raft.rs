//! Deterministic simulation of 3- and 5-replica shards: virtual time, a seeded network that drops, delays,
//! reorders, duplicates and partitions, replicas that crash and restart from their files, and clients whose
//! histories are checked for linearizability.
//!
//! Everything random comes from one seeded RNG and time is a tick counter, so a failing seed replays exactly;
//! the seed is printed on failure. `OXRAY_SIM_SEEDS=N` runs N seeds per test (four tests; by default 2 x 50
//! seeds of 3 replicas and 2 x 25 of 5 in release, a tenth of that in debug builds); `OXRAY_SIM_SEED=S`
//! replays one seed (in every test, so filter by cluster size);
//! `OXRAY_SIM_TIMING=1` prints history sizes and checker time.
//!
//! This is not a benchmark and asserts no timing; it asserts safety (linearizable histories, replicas that
//! converge to identical state) and liveness after faults heal.

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::Bytes;
use oxray_gcs::linearizability::{self, Operation, Output, RegOp};
use oxray_gcs::replica::{Query, Replica, ReplicaConfig, ReplicaError, Reply, raft_logger};
use oxray_gcs::shard::{Command, Expect, Limits, Op};
use protobuf::Message as _;
use raft::prelude::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FAULT_TICKS: u64 = 700;
const HEAL_TICKS: u64 = 400;
const KEYS: u64 = 3;
const CLIENTS: usize = 4;
/// A request without an answer for this long is re-sent (same seq).
const RESEND_TICKS: u64 = 15;
/// An operation unanswered for this long is abandoned with an unknown outcome.
const GIVE_UP_TICKS: u64 = 120;

#[derive(Debug, Clone)]
struct InFlight {
    op: RegOp,
    cmd_seq: u64,
    invoke: u64,
    started: u64,
    last_sent: u64,
    token: u64,
}

#[derive(Debug)]
struct Client {
    id: u64,
    seq: u64,
    target: usize,
    current: Option<(u64, InFlight)>,
    next_at: u64,
    last_seen: HashMap<u64, Option<u64>>,
}

struct Sim {
    rng: StdRng,
    now: u64,
    event: u64,
    n: usize,
    dir: tempfile::TempDir,
    replicas: Vec<Option<Replica>>,
    down_until: Vec<u64>,
    group: Vec<u8>,
    heal_at: u64,
    net: Vec<(u64, u64, Vec<u8>)>,
    msg_seq: u64,
    clients: Vec<Client>,
    tokens: HashMap<u64, usize>,
    next_token: u64,
    next_value: u64,
    history: Vec<Operation>,
    faults: bool,
}

fn cfg(id: u64, n: usize) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(id, (1..=n as u64).collect());
    c.wal.fsync = false; // A crash here is a dropped `Replica`: synced and unsynced writes both survive.
    c.wal.segment_bytes = 16 << 10;
    c.snapshot_entries = 40;
    c.limits = Limits {
        history_events: 64,
        ..Limits::default()
    };
    c
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        let mut replicas = Vec::new();
        for i in 0..n {
            replicas.push(Some(open(&dir.path().join(i.to_string()), i, n)));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let clients = (0..CLIENTS)
            .map(|c| Client {
                id: 1000 + c as u64,
                seq: 0,
                target: rng.random_range(0..n),
                current: None,
                next_at: 0,
                last_seen: HashMap::new(),
            })
            .collect();
        Sim {
            rng,
            now: 0,
            event: 0,
            n,
            dir,
            replicas,
            down_until: vec![0; n],
            group: vec![0; n],
            heal_at: 0,
            net: Vec::new(),
            msg_seq: 0,
            clients,
            tokens: HashMap::new(),
            next_token: 1,
            next_value: 1,
            history: Vec::new(),
            faults: true,
        }
    }

    fn path(&self, i: usize) -> PathBuf {
        self.dir.path().join(i.to_string())
    }

    fn tick(&mut self) {
        self.now += 1;
        self.inject_faults();
        for r in self.replicas.iter_mut().flatten() {
            r.tick();
        }
        self.deliver();
        self.run_clients();
        self.pump();
    }

    fn inject_faults(&mut self) {
        if !self.faults {
            return;
        }
        // Partitions: split the replicas into two random groups for a while.
        if self.heal_at <= self.now {
            self.group.iter_mut().for_each(|g| *g = 0);
            if self.rng.random_bool(0.01) {
                for g in self.group.iter_mut() {
                    *g = self.rng.random_range(0..2);
                }
                self.heal_at = self.now + self.rng.random_range(20..120);
            }
        }
        // Crashes: keep a majority up so the cluster can make progress.
        let down = self.replicas.iter().filter(|r| r.is_none()).count();
        if down < (self.n - 1) / 2 && self.rng.random_bool(0.006) {
            let i = self.rng.random_range(0..self.n);
            if self.replicas[i].is_some() {
                self.replicas[i] = None;
                self.down_until[i] = self.now + self.rng.random_range(10..80);
            }
        }
        for i in 0..self.n {
            if self.replicas[i].is_none() && self.down_until[i] <= self.now {
                self.replicas[i] = Some(open(&self.path(i), i, self.n));
            }
        }
    }

    fn heal(&mut self) {
        self.faults = false;
        self.group.iter_mut().for_each(|g| *g = 0);
        for i in 0..self.n {
            if self.replicas[i].is_none() {
                self.replicas[i] = Some(open(&self.path(i), i, self.n));
            }
        }
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].0 <= now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|d| (d.0, d.1));
        for (_, _, bytes) in due {
            // Messages travel encoded, as they would on a real wire.
            let Ok(msg) = Message::parse_from_bytes(&bytes) else {
                continue;
            };
            let to = msg.to as usize - 1;
            if let Some(r) = self.replicas.get_mut(to).and_then(Option::as_mut) {
                r.step(msg);
            }
        }
    }

    fn send(&mut self, msg: Message) {
        let from = msg.from as usize - 1;
        let to = msg.to as usize - 1;
        if to >= self.n || self.group[from] != self.group[to] {
            return;
        }
        if self.faults && self.rng.random_bool(0.03) {
            return;
        }
        let bytes = msg.write_to_bytes().unwrap();
        let copies = if self.faults && self.rng.random_bool(0.02) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faults {
                self.rng.random_range(0..4)
            } else {
                1
            };
            self.msg_seq += 1;
            self.net
                .push((self.now + delay, self.msg_seq, bytes.clone()));
        }
    }

    fn pump(&mut self) {
        for _ in 0..3 {
            let mut outbox = Vec::new();
            let mut done = Vec::new();
            for r in self.replicas.iter_mut().flatten() {
                r.handle_ready();
                outbox.extend(r.take_messages());
                done.extend(r.take_completions());
            }
            for m in outbox {
                self.send(m);
            }
            for c in done {
                self.complete(c.token, c.result);
            }
        }
    }

    fn stamp(&mut self) -> u64 {
        self.event += 1;
        self.event
    }

    fn run_clients(&mut self) {
        for ci in 0..self.clients.len() {
            let now = self.now;
            if let Some((key, f)) = self.clients[ci].current.clone() {
                if now - f.started > GIVE_UP_TICKS {
                    self.history.push(Operation {
                        key,
                        op: f.op,
                        invoke: f.invoke,
                        ret: 0,
                        output: Output::Unknown,
                    });
                    self.tokens.remove(&f.token);
                    self.clients[ci].current = None;
                    self.clients[ci].next_at = now + 1;
                } else if now - f.last_sent > RESEND_TICKS {
                    let target = self.rng.random_range(0..self.n);
                    self.clients[ci].target = target;
                    self.submit(ci);
                }
                continue;
            }
            if self.clients[ci].next_at > now
                || (!self.faults && now > FAULT_TICKS + HEAL_TICKS / 2)
            {
                continue;
            }
            let key = self.rng.random_range(0..KEYS);
            let op = match self.rng.random_range(0..10) {
                0..=3 => RegOp::Read,
                4..=6 => {
                    self.next_value += 1;
                    RegOp::Write(self.next_value)
                }
                7 => RegOp::Delete,
                _ => {
                    self.next_value += 1;
                    let expect = self.clients[ci].last_seen.get(&key).copied().flatten();
                    RegOp::Cas {
                        expect,
                        new: self.next_value,
                    }
                }
            };
            let invoke = self.stamp();
            self.clients[ci].seq += 1;
            let cmd_seq = self.clients[ci].seq;
            self.clients[ci].current = Some((
                key,
                InFlight {
                    op,
                    cmd_seq,
                    invoke,
                    started: now,
                    last_sent: now,
                    token: 0,
                },
            ));
            self.submit(ci);
        }
    }

    fn submit(&mut self, ci: usize) {
        let Some((key, mut f)) = self.clients[ci].current.clone() else {
            return;
        };
        self.tokens.remove(&f.token);
        let token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(token, ci);
        f.token = token;
        f.last_sent = self.now;
        let client = self.clients[ci].id;
        let target = self.clients[ci].target;
        self.clients[ci].current = Some((key, f.clone()));
        let Some(r) = self.replicas[target].as_mut() else {
            return; // Sent to a crashed replica: lost, re-sent after RESEND_TICKS.
        };
        let k = format!("reg/{key}").into_bytes();
        let val = |v: u64| Bytes::from(v.to_string());
        match f.op {
            RegOp::Read => r.read(token, Query::Get { key: k }),
            op => {
                let op = match op {
                    RegOp::Write(v) => Op::Put {
                        key: k,
                        value: val(v),
                    },
                    RegOp::Delete => Op::Delete { key: k },
                    RegOp::Cas { expect, new } => Op::Cas {
                        key: k,
                        expect: expect.map_or(Expect::Absent, |e| Expect::Value(val(e))),
                        new: Some(val(new)),
                    },
                    RegOp::Read => unreachable!(),
                };
                r.propose(
                    token,
                    Command {
                        client,
                        seq: f.cmd_seq,
                        op,
                    },
                );
            }
        }
    }

    fn complete(&mut self, token: u64, result: Result<Reply, ReplicaError>) {
        let Some(ci) = self.tokens.remove(&token) else {
            return;
        };
        let Some((key, f)) = self.clients[ci].current.clone() else {
            return;
        };
        if f.token != token {
            return;
        }
        match result {
            Ok(reply) => {
                let output = match (f.op, reply) {
                    (RegOp::Read, Reply::Get { kv, .. }) => {
                        let v = kv.map(|kv| {
                            std::str::from_utf8(&kv.value)
                                .unwrap()
                                .parse::<u64>()
                                .unwrap()
                        });
                        self.clients[ci].last_seen.insert(key, v);
                        Output::Value(v)
                    }
                    (RegOp::Write(_), Reply::Write(_)) => Output::Done,
                    (_, Reply::Write(w)) => Output::Flag(w.succeeded),
                    (op, reply) => panic!("reply {reply:?} for {op:?}"),
                };
                let ret = self.stamp();
                self.history.push(Operation {
                    key,
                    op: f.op,
                    invoke: f.invoke,
                    ret,
                    output,
                });
                self.clients[ci].current = None;
                self.clients[ci].next_at = self.now + self.rng.random_range(0..3);
            }
            Err(ReplicaError::NotLeader { leader })
            | Err(ReplicaError::LeadershipLost { leader }) => {
                // Retry the same seq where the hint points (or anywhere), on the next tick.
                self.clients[ci].target = match leader {
                    Some(l) => l as usize - 1,
                    None => self.rng.random_range(0..self.n),
                };
                if let Some((_, f)) = self.clients[ci].current.as_mut() {
                    // Resend on the next tick.
                    f.last_sent = self.now.saturating_sub(RESEND_TICKS);
                }
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

fn open(path: &std::path::Path, i: usize, n: usize) -> Replica {
    Replica::open(cfg(i as u64 + 1, n), path, &raft_logger()).unwrap()
}

fn run_seed(seed: u64, n: usize) {
    let mut sim = Sim::new(seed, n);
    while sim.now < FAULT_TICKS {
        sim.tick();
    }
    sim.heal();
    while sim.now < FAULT_TICKS + HEAL_TICKS {
        sim.tick();
    }
    // Abandon whatever is still open (unknown outcome).
    for c in &sim.clients {
        if let Some((key, f)) = &c.current {
            sim.history.push(Operation {
                key: *key,
                op: f.op,
                invoke: f.invoke,
                ret: 0,
                output: Output::Unknown,
            });
        }
    }
    let acked = sim
        .history
        .iter()
        .filter(|o| o.output != Output::Unknown)
        .count();
    assert!(
        acked > 20,
        "seed {seed}: too little progress ({acked} acknowledged ops)"
    );
    let t0 = std::time::Instant::now();
    let chk = linearizability::check(&sim.history);
    if std::env::var("OXRAY_SIM_TIMING").is_ok() {
        eprintln!(
            "seed {seed}: {} ops, check {:?}",
            sim.history.len(),
            t0.elapsed()
        );
    }
    if let Err(e) = chk {
        panic!("seed {seed} (n={n}): {e}\nhistory: {:#?}", sim.history);
    }
    // After healing, every replica converges to the same state.
    let states: Vec<_> = sim
        .replicas
        .iter()
        .map(|r| r.as_ref().unwrap().state().encode_snapshot())
        .collect();
    let summary: Vec<_> = sim
        .replicas
        .iter()
        .flatten()
        .map(|r| {
            (
                r.id(),
                r.state().applied_index(),
                r.state().revision(),
                r.is_leader(),
            )
        })
        .collect();
    for (i, s) in states.iter().enumerate() {
        assert!(
            s == &states[0],
            "seed {seed} (n={n}): replica {} diverged from replica 1: (id, applied, revision, leader) {summary:?}",
            i + 1
        );
    }
    assert!(
        sim.replicas
            .iter()
            .flatten()
            .filter(|r| r.is_leader())
            .count()
            == 1,
        "seed {seed}: no single leader after healing"
    );
}

fn seeds(default: u64) -> u64 {
    std::env::var("OXRAY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn run_many(n: usize, default: u64, base: u64) {
    let count = seeds(default);
    // `OXRAY_SIM_SEED=S` replays exactly one seed.
    let range = match std::env::var("OXRAY_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(s) => s..s + 1,
        None => base..base + count,
    };
    for seed in range {
        let res = std::panic::catch_unwind(|| run_seed(seed, n));
        if let Err(e) = res {
            eprintln!(
                "simulation failed: seed {seed}, replicas {n}; rerun with this seed to reproduce"
            );
            std::panic::resume_unwind(e);
        }
    }
}

/// Seeds per test: hundreds in release (CI) across the four tests, a tenth in debug builds where each seed
/// is ~10x slower. Split in halves so nextest runs them in parallel and each stays well under 20 s.
fn default_seeds(release: u64) -> u64 {
    if cfg!(debug_assertions) {
        (release / 10).max(2)
    } else {
        release
    }
}

#[test]
fn sim_three_replicas_a() {
    run_many(3, default_seeds(50), 1);
}

#[test]
fn sim_three_replicas_b() {
    run_many(3, default_seeds(50), 5_001);
}

#[test]
fn sim_five_replicas_a() {
    run_many(5, default_seeds(25), 10_001);
}

#[test]
fn sim_five_replicas_b() {
    run_many(5, default_seeds(25), 15_001);
}
