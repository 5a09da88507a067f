//! Growing a shard's Raft group by membership changes, in process and deterministic (no clock, no sockets):
//! replicas step each other's messages directly, and time is a tick loop.
//!
//! A group starts as one voter, takes writes, and grows to three by adding each new replica as a learner
//! (which catches up through a snapshot, since the leader's log is compacted by then) and promoting it once
//! caught up, one change at a time, with writes going on between the changes. Then every replica is dropped
//! and reopened from its files: each comes back with three voters (from snapshot metadata and the
//! conf-change entries after it), so the first member alone can no longer elect itself, and two of the three
//! make a quorum again with every acknowledged write present.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use oxray_gcs::replica::{
    Completion, MemberChange, Replica, ReplicaConfig, ReplicaError, Reply, raft_logger,
};
use oxray_gcs::shard::{Command, Op};

fn cfg(id: u64, peers: Vec<u64>) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(id, peers);
    c.wal.fsync = false;
    // Small, so the leader has compacted the log before the learners join and they need a snapshot.
    c.snapshot_entries = 8;
    c
}

/// Opens replica `id` in `root/<id>`: the first member starts as the lone voter, the others with no
/// membership (they learn it from the leader). An existing directory keeps what it holds either way.
fn open(root: &Path, id: u64) -> Replica {
    let peers = if id == 1 { vec![1] } else { Vec::new() };
    Replica::open(cfg(id, peers), &root.join(id.to_string()), &raft_logger()).unwrap()
}

struct Group {
    replicas: BTreeMap<u64, Replica>,
    done: Vec<Completion>,
    seq: u64,
}

impl Group {
    /// Runs every replica's Ready loop and delivers messages until nothing moves, `ticks` times with a tick.
    fn run(&mut self, ticks: usize) {
        for _ in 0..ticks {
            for r in self.replicas.values_mut() {
                r.tick();
            }
            self.settle();
        }
    }

    fn settle(&mut self) {
        for _ in 0..50 {
            let mut msgs = Vec::new();
            for r in self.replicas.values_mut() {
                r.handle_ready();
                msgs.extend(r.take_messages());
                self.done.extend(r.take_completions());
            }
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if let Some(r) = self.replicas.get_mut(&m.to) {
                    r.step(m);
                }
            }
        }
    }

    fn leader(&self) -> Option<u64> {
        self.replicas
            .values()
            .find(|r| r.is_leader())
            .map(|r| r.id())
    }

    /// Writes `n` keys `<round>/<i>` through the leader and checks each was acknowledged.
    fn write(&mut self, round: &str, n: u64) {
        let leader = self.leader().expect("a leader");
        self.done.clear();
        for i in 0..n {
            self.seq += 1;
            let cmd = Command {
                client: 1,
                seq: self.seq,
                op: Op::Put {
                    key: format!("{round}/{i}").into_bytes(),
                    value: Bytes::from(format!("{round}/{i}")),
                },
            };
            let r = self.replicas.get_mut(&leader).unwrap();
            r.propose(self.seq, cmd);
            self.settle();
        }
        self.run(3);
        let acked = self
            .done
            .iter()
            .filter(|c| matches!(c.result, Ok(Reply::Write(_))))
            .count();
        assert_eq!(acked as u64, n, "writes of {round}: {:?}", self.done);
    }

    fn change(&mut self, change: MemberChange) {
        let leader = self.leader().expect("a leader");
        self.replicas
            .get_mut(&leader)
            .unwrap()
            .change_membership(change)
            .unwrap_or_else(|e| panic!("{change:?} refused: {e}"));
    }

    fn voters(&self, id: u64) -> Vec<u64> {
        let mut v = self.replicas[&id].conf_state().voters.clone();
        v.sort_unstable();
        v
    }

    fn learners(&self, id: u64) -> Vec<u64> {
        self.replicas[&id].conf_state().learners.clone()
    }

    /// Every key written in `rounds` (round, count) is on replica `id`'s applied state.
    fn has_all(&self, id: u64, rounds: &[(&str, u64)]) {
        let st = self.replicas[&id].state();
        for (round, n) in rounds {
            for i in 0..*n {
                let key = format!("{round}/{i}");
                let kv = st
                    .get(key.as_bytes())
                    .unwrap_or_else(|| panic!("replica {id} lacks {key}"));
                assert_eq!(&kv.value[..], key.as_bytes());
            }
        }
    }
}

#[test]
fn one_voter_grows_to_three_and_restarts_with_three() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut g = Group {
        replicas: BTreeMap::from([(1, open(root, 1))]),
        done: Vec::new(),
        seq: 0,
    };
    g.run(25);
    assert_eq!(g.leader(), Some(1), "a lone voter leads");
    g.write("alone", 30);
    assert!(
        g.replicas[&1]
            .storage()
            .latest_snapshot()
            .get_metadata()
            .index
            > 8,
        "the log was compacted before anyone joined"
    );

    let mut rounds = vec![("alone", 30)];
    for new in [2, 3] {
        g.replicas.insert(new, open(root, new));
        g.change(MemberChange::AddLearner(new));
        // One change at a time: a second proposal while the first is in flight is refused, not dropped.
        assert_eq!(
            g.replicas
                .get_mut(&1)
                .unwrap()
                .change_membership(MemberChange::Promote(new)),
            Err(ReplicaError::ChangePending)
        );
        g.run(5);
        assert_eq!(g.learners(1), vec![new]);
        assert_eq!(
            g.learners(new),
            vec![new],
            "the learner learned its membership"
        );
        // The learner caught up (through the snapshot) and follows further writes.
        let round = if new == 2 {
            "with-learner-2"
        } else {
            "with-learner-3"
        };
        g.write(round, 10);
        rounds.push((round, 10));
        g.has_all(new, &rounds);
        assert!(!g.replicas[&new].is_leader());

        // A learner is not a voter: promoting a non-learner is refused.
        assert!(matches!(
            g.replicas
                .get_mut(&1)
                .unwrap()
                .change_membership(MemberChange::Promote(9)),
            Err(ReplicaError::BadChange(_))
        ));
        g.change(MemberChange::Promote(new));
        g.run(5);
        let expect: Vec<u64> = (1..=new).collect();
        for id in 1..=new {
            assert_eq!(g.voters(id), expect, "voters as replica {id} sees them");
            assert!(g.learners(id).is_empty());
        }
        let round = if new == 2 {
            "two-voters"
        } else {
            "three-voters"
        };
        g.write(round, 10);
        rounds.push((round, 10));
    }
    // Leadership moves to another voter on request (the multi-process tests use it to kill a non-head leader).
    g.change(MemberChange::TransferLeader(2));
    g.run(10);
    assert_eq!(g.leader(), Some(2), "leadership moved to member 2");
    // Enough writes that every replica snapshots after the last conf change: the membership must then come
    // back from snapshot metadata, not only from conf-change entries in the log.
    g.write("after-growth", 20);
    rounds.push(("after-growth", 20));
    for id in 1..=3 {
        g.has_all(id, &rounds);
    }

    // Everyone stops; member 1 restarts alone. With three voters on disk it cannot elect itself.
    drop(g);
    let mut g = Group {
        replicas: BTreeMap::from([(1, open(root, 1))]),
        done: Vec::new(),
        seq: 1000,
    };
    g.run(60);
    assert_eq!(g.voters(1), vec![1, 2, 3], "member 1 kept the membership");
    assert_eq!(g.leader(), None, "one voter of three elected itself");

    // With member 3 back there is a quorum again, and nothing acknowledged was lost.
    g.replicas.insert(3, open(root, 3));
    g.run(60);
    assert!(g.leader().is_some(), "two of three voters elect a leader");
    assert_eq!(g.voters(3), vec![1, 2, 3], "member 3 kept the membership");
    g.write("restarted", 10);
    rounds.push(("restarted", 10));
    for id in [1, 3] {
        g.has_all(id, &rounds);
    }
}
