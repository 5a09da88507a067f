//! `PullManager`: the decisions of pulling objects from other nodes — which copy to ask, deduplication, admission,
//! retries, and when to give up with `ObjectLost`.
//!
//! A sans-IO core in the style of quinn-proto: inputs are method calls that carry the current time (`now`), outputs
//! are [`PullAction`]s taken with [`PullManager::poll_action`], and [`PullManager::poll_timeout`] says when to call
//! [`PullManager::handle_timeout`] next. It moves no bytes, reserves no memory and reads no clock; the network driver does those and reports back. Every pull ends in exactly one `Complete` or `Fail`: a pull
//! with no copy left fails with [`PullError::ObjectLost`], never hangs.
//!
//! Lifecycle of one pull: `request` → queued → admitted (bytes in flight under the budget) → `Reserve` (driver makes
//! room in the store, spilling if needed) → `Fetch` from one source (driver streams chunks into the reserved buffer,
//! reporting `progress`) → `fetch_done` → `Complete`. A failed or stalled fetch moves to the next source; a store
//! with no room is retried after a pause, a bounded number of times.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::{NodeId, ObjectId};

/// Bounds and pacing of pulls.
#[derive(Clone, Debug)]
pub struct PullConfig {
    /// Most object bytes being pulled at once, all pulls together. A single larger object is still admitted when
    /// nothing else is in flight, so no object is too big to pull. Default 1 GiB.
    pub max_inflight_bytes: u64,
    /// Most pulls in flight at once. Default 64.
    pub max_inflight_pulls: usize,
    /// Fetch attempts per source before moving to the next copy. Default 2.
    pub attempts_per_source: u32,
    /// A fetch that makes no progress for this long is cancelled and counted as a failure. Default 10 s.
    pub stall_timeout: Duration,
    /// Pause before asking the store for room again after it had none. Default 100 ms.
    pub room_retry_interval: Duration,
    /// Times to ask for room before failing the pull with [`PullError::StoreFull`]. Default 50.
    pub max_room_retries: u32,
    /// Most pulls queued (admitted or not); more requests fail at once with [`PullError::TooManyPulls`].
    /// Default 100 000.
    pub max_queued_pulls: usize,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            max_inflight_bytes: 1 << 30,
            max_inflight_pulls: 64,
            attempts_per_source: 2,
            stall_timeout: Duration::from_secs(10),
            room_retry_interval: Duration::from_millis(100),
            max_room_retries: 50,
            max_queued_pulls: 100_000,
        }
    }
}

/// Why a pull failed for good.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// Every known copy failed (or none was known). The owner may rebuild the object from lineage.
    #[error("object {id} is lost: no copy could be pulled (tried {tried:?})")]
    ObjectLost {
        /// The object.
        id: ObjectId,
        /// Sources tried, in order.
        tried: Vec<NodeId>,
    },
    /// The local store had no room for the object, even after waiting. Retryable later.
    #[error("no room in the local store for object {id} ({size} bytes)")]
    StoreFull {
        /// The object.
        id: ObjectId,
        /// Its size.
        size: u64,
    },
    /// Too many pulls are queued already; the request was refused. Retryable later.
    #[error("too many pulls queued; refused object {id}")]
    TooManyPulls {
        /// The object.
        id: ObjectId,
    },
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullAction {
    /// Reserve `size` bytes in the local store (evicting or spilling first), then call
    /// [`PullManager::room_reserved`] or [`PullManager::room_denied`].
    Reserve {
        /// The object.
        id: ObjectId,
        /// Bytes to reserve.
        size: u64,
    },
    /// Fetch the object from `source` into the reserved buffer. Report with `progress`, `fetch_done` or
    /// `fetch_failed`, quoting `fetch` so that reports about an abandoned fetch are ignored.
    Fetch {
        /// The object.
        id: ObjectId,
        /// The node to pull from.
        source: NodeId,
        /// Object size.
        size: u64,
        /// Token of this fetch attempt.
        fetch: u64,
    },
    /// Abandon fetch `fetch` (stalled, or the pull was cancelled); its later reports are ignored.
    Cancel {
        /// The object.
        id: ObjectId,
        /// Token of the abandoned fetch.
        fetch: u64,
    },
    /// The object is in the store: wake its waiters.
    Complete {
        /// The object.
        id: ObjectId,
    },
    /// The pull failed for good: release its reservation (if any) and wake waiters with the error.
    Fail {
        /// The object.
        id: ObjectId,
        /// Why.
        error: PullError,
    },
}

/// Whether a request started a new pull or joined one already running.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    /// A new pull was queued.
    Started,
    /// A pull of this object was already running: the caller waits for the same outcome (deduplicated).
    Joined,
    /// Refused (see the `Fail` action emitted).
    Refused,
}

#[derive(Debug)]
enum State {
    Queued,
    Reserving,
    WaitingRoom {
        retry_at: Instant,
    },
    Fetching {
        source: NodeId,
        fetch: u64,
        deadline: Instant,
    },
}

#[derive(Debug)]
struct Pull {
    size: u64,
    /// Known copies, in the order they will be tried (rotated per object so pulls spread across copies).
    sources: Vec<NodeId>,
    attempts: BTreeMap<NodeId, u32>,
    tried: Vec<NodeId>,
    room_retries: u32,
    state: State,
}

/// The pull decision core. See the module docs.
#[derive(Debug)]
pub struct PullManager {
    config: PullConfig,
    pulls: BTreeMap<ObjectId, Pull>,
    queue: VecDeque<ObjectId>,
    inflight_bytes: u64,
    inflight_pulls: usize,
    next_fetch: u64,
    actions: VecDeque<PullAction>,
}

impl PullManager {
    /// A manager with the given bounds.
    pub fn new(config: PullConfig) -> Self {
        PullManager {
            config,
            pulls: BTreeMap::new(),
            queue: VecDeque::new(),
            inflight_bytes: 0,
            inflight_pulls: 0,
            next_fetch: 1,
            actions: VecDeque::new(),
        }
    }

    /// Asks for object `id` of `size` bytes, held by `sources`. A second request for an object already being pulled
    /// joins it (its new sources are added).
    pub fn request(
        &mut self,
        id: ObjectId,
        size: u64,
        sources: &[NodeId],
        now: Instant,
    ) -> Requested {
        if self.pulls.contains_key(&id) {
            self.add_sources(id, sources);
            return Requested::Joined;
        }
        if self.pulls.len() >= self.config.max_queued_pulls {
            self.actions.push_back(PullAction::Fail {
                id,
                error: PullError::TooManyPulls { id },
            });
            return Requested::Refused;
        }
        let mut list: Vec<NodeId> = Vec::new();
        for s in sources {
            if !list.contains(s) {
                list.push(*s);
            }
        }
        if !list.is_empty() {
            // Rotate by the object id so that many pulls with the same copy set do not all hit the first node.
            let start = (id.0 % list.len() as u128) as usize;
            list.rotate_left(start);
        }
        let pull = Pull {
            size,
            sources: list,
            attempts: BTreeMap::new(),
            tried: Vec::new(),
            room_retries: 0,
            state: State::Queued,
        };
        self.pulls.insert(id, pull);
        self.queue.push_back(id);
        self.admit(now);
        Requested::Started
    }

    /// More copies of `id` became known (e.g. the owner answered with new locations).
    pub fn add_sources(&mut self, id: ObjectId, sources: &[NodeId]) {
        if let Some(pull) = self.pulls.get_mut(&id) {
            for s in sources {
                if !pull.sources.contains(s) {
                    pull.sources.push(*s);
                }
            }
        }
    }

    /// The store reserved room for `id`: start fetching from the first usable source.
    pub fn room_reserved(&mut self, id: ObjectId, now: Instant) {
        if matches!(
            self.pulls.get(&id).map(|p| &p.state),
            Some(State::Reserving)
        ) {
            self.fetch_next(id, now);
        }
    }

    /// The store had no room for `id`: retry after `room_retry_interval`, or fail after `max_room_retries`.
    pub fn room_denied(&mut self, id: ObjectId, now: Instant) {
        let Some(pull) = self.pulls.get_mut(&id) else {
            return;
        };
        if !matches!(pull.state, State::Reserving) {
            return;
        }
        pull.room_retries += 1;
        if pull.room_retries > self.config.max_room_retries {
            let size = pull.size;
            self.finish(id, Some(PullError::StoreFull { id, size }), now);
            return;
        }
        pull.state = State::WaitingRoom {
            retry_at: now + self.config.room_retry_interval,
        };
    }

    /// Bytes of fetch `fetch` arrived: the fetch is alive (resets its stall deadline).
    pub fn progress(&mut self, id: ObjectId, fetch: u64, now: Instant) {
        if let Some(Pull {
            state: State::Fetching {
                fetch: f, deadline, ..
            },
            ..
        }) = self.pulls.get_mut(&id)
            && *f == fetch
        {
            *deadline = now + self.config.stall_timeout;
        }
    }

    /// Fetch `fetch` delivered the whole object, checked, into the store.
    pub fn fetch_done(&mut self, id: ObjectId, fetch: u64, now: Instant) {
        if self.is_current(id, fetch) {
            self.finish(id, None, now);
        }
    }

    /// Fetch `fetch` failed (source gone, object missing there, corrupted chunk, stream error): try again or move
    /// to the next copy.
    pub fn fetch_failed(&mut self, id: ObjectId, fetch: u64, now: Instant) {
        if self.is_current(id, fetch) {
            self.fetch_next(id, now);
        }
    }

    /// `node` died or left: it is no longer a source, and a fetch from it fails now rather than at its stall timeout.
    pub fn node_lost(&mut self, node: NodeId, now: Instant) {
        let ids: Vec<ObjectId> = self.pulls.keys().copied().collect();
        for id in ids {
            let Some(pull) = self.pulls.get_mut(&id) else {
                continue;
            };
            pull.sources.retain(|s| *s != node);
            if let State::Fetching { source, fetch, .. } = pull.state
                && source == node
            {
                self.actions.push_back(PullAction::Cancel { id, fetch });
                self.fetch_next(id, now);
            }
        }
    }

    /// The caller no longer wants `id`: abandon its pull (the driver releases the reservation). No `Fail` is
    /// emitted for it.
    pub fn cancel(&mut self, id: ObjectId, now: Instant) {
        let Some(pull) = self.pulls.remove(&id) else {
            return;
        };
        if let State::Fetching { fetch, .. } = pull.state {
            self.actions.push_back(PullAction::Cancel { id, fetch });
        }
        self.release(&pull);
        self.queue.retain(|q| *q != id);
        self.admit(now);
    }

    /// Handles every deadline at or before `now`: room retries and stalled fetches.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ids: Vec<ObjectId> = self.pulls.keys().copied().collect();
        for id in ids {
            let Some(pull) = self.pulls.get_mut(&id) else {
                continue;
            };
            match pull.state {
                State::WaitingRoom { retry_at } if retry_at <= now => {
                    pull.state = State::Reserving;
                    self.actions.push_back(PullAction::Reserve {
                        id,
                        size: pull.size,
                    });
                }
                State::Fetching {
                    deadline, fetch, ..
                } if deadline <= now => {
                    self.actions.push_back(PullAction::Cancel { id, fetch });
                    self.fetch_next(id, now);
                }
                _ => {}
            }
        }
    }

    /// The earliest deadline, if any: call [`PullManager::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pulls
            .values()
            .filter_map(|p| match p.state {
                State::WaitingRoom { retry_at } => Some(retry_at),
                State::Fetching { deadline, .. } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<PullAction> {
        self.actions.pop_front()
    }

    /// Whether a pull of `id` is in progress.
    pub fn contains(&self, id: ObjectId) -> bool {
        self.pulls.contains_key(&id)
    }

    /// Pulls not yet finished.
    pub fn active(&self) -> usize {
        self.pulls.len()
    }

    /// Pulls admitted (reserving room or fetching) and not yet finished.
    pub fn inflight_pulls(&self) -> usize {
        self.inflight_pulls
    }

    /// Bytes admitted and not yet finished.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }

    fn is_current(&self, id: ObjectId, fetch: u64) -> bool {
        matches!(self.pulls.get(&id), Some(Pull { state: State::Fetching { fetch: f, .. }, .. }) if *f == fetch)
    }

    /// Admits queued pulls while the in-flight budget allows (always at least one).
    fn admit(&mut self, now: Instant) {
        let _ = now;
        while let Some(&id) = self.queue.front() {
            let Some(pull) = self.pulls.get_mut(&id) else {
                self.queue.pop_front();
                continue;
            };
            let fits = self.inflight_pulls == 0
                || (self.inflight_pulls < self.config.max_inflight_pulls
                    && self.inflight_bytes + pull.size <= self.config.max_inflight_bytes);
            if !fits {
                break;
            }
            self.queue.pop_front();
            self.inflight_bytes += pull.size;
            self.inflight_pulls += 1;
            pull.state = State::Reserving;
            self.actions.push_back(PullAction::Reserve {
                id,
                size: pull.size,
            });
        }
    }

    /// Starts a fetch from the next usable source, or fails the pull with `ObjectLost` if none is left.
    fn fetch_next(&mut self, id: ObjectId, now: Instant) {
        let Some(pull) = self.pulls.get_mut(&id) else {
            return;
        };
        let limit = self.config.attempts_per_source;
        // Stay on the current source while it has attempts left, so a transient error does not skip a good copy.
        let current = match pull.state {
            State::Fetching { source, .. } => Some(source),
            _ => None,
        };
        let usable = |s: &NodeId, pull: &Pull| pull.attempts.get(s).copied().unwrap_or(0) < limit;
        let next = current
            .filter(|s| pull.sources.contains(s) && usable(s, pull))
            .or_else(|| pull.sources.iter().copied().find(|s| usable(s, pull)));
        let Some(source) = next else {
            let tried = pull.tried.clone();
            self.finish(id, Some(PullError::ObjectLost { id, tried }), now);
            return;
        };
        *pull.attempts.entry(source).or_insert(0) += 1;
        if !pull.tried.contains(&source) {
            pull.tried.push(source);
        }
        let fetch = self.next_fetch;
        self.next_fetch += 1;
        pull.state = State::Fetching {
            source,
            fetch,
            deadline: now + self.config.stall_timeout,
        };
        self.actions.push_back(PullAction::Fetch {
            id,
            source,
            size: pull.size,
            fetch,
        });
    }

    fn release(&mut self, pull: &Pull) {
        if !matches!(pull.state, State::Queued) {
            self.inflight_bytes -= pull.size;
            self.inflight_pulls -= 1;
        }
    }

    fn finish(&mut self, id: ObjectId, error: Option<PullError>, now: Instant) {
        let Some(pull) = self.pulls.remove(&id) else {
            return;
        };
        self.release(&pull);
        self.queue.retain(|q| *q != id);
        self.actions.push_back(match error {
            None => PullAction::Complete { id },
            Some(error) => PullAction::Fail { id, error },
        });
        self.admit(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    fn drain(m: &mut PullManager) -> Vec<PullAction> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    #[test]
    fn happy_path_and_dedup() {
        let now = Instant::now();
        let mut m = PullManager::new(PullConfig::default());
        let id = ObjectId(4);
        assert_eq!(m.request(id, 100, &[A, B], now), Requested::Started);
        assert_eq!(m.request(id, 100, &[B], now), Requested::Joined);
        assert_eq!(drain(&mut m), vec![PullAction::Reserve { id, size: 100 }]);
        m.room_reserved(id, now);
        // Object 4 over two sources rotates to index 0: A first.
        let [
            PullAction::Fetch {
                source: A, fetch, ..
            },
        ] = drain(&mut m)[..]
        else {
            panic!("one fetch from A")
        };
        m.fetch_done(id, fetch, now);
        assert_eq!(drain(&mut m), vec![PullAction::Complete { id }]);
        assert_eq!((m.active(), m.inflight_bytes()), (0, 0));
        m.fetch_done(id, fetch, now);
        assert!(drain(&mut m).is_empty(), "late reports are ignored");
    }

    #[test]
    fn failed_sources_are_retried_then_the_object_is_lost() {
        let now = Instant::now();
        let mut m = PullManager::new(PullConfig {
            attempts_per_source: 1,
            ..PullConfig::default()
        });
        let id = ObjectId(2);
        m.request(id, 10, &[A, B], now);
        m.room_reserved(id, now);
        let mut sources = Vec::new();
        loop {
            match drain(&mut m).pop() {
                Some(PullAction::Fetch { source, fetch, .. }) => {
                    sources.push(source);
                    m.fetch_failed(id, fetch, now);
                }
                Some(PullAction::Fail { error, .. }) => {
                    assert_eq!(
                        error,
                        PullError::ObjectLost {
                            id,
                            tried: sources.clone()
                        }
                    );
                    break;
                }
                Some(PullAction::Reserve { .. }) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sources.len(), 2);
        // No source at all: lost at once, after the reservation.
        let lonely = ObjectId(3);
        m.request(lonely, 10, &[], now);
        m.room_reserved(lonely, now);
        assert!(matches!(
            drain(&mut m).last(),
            Some(PullAction::Fail {
                error: PullError::ObjectLost { .. },
                ..
            })
        ));
    }

    #[test]
    fn stalls_and_dead_nodes_move_to_the_next_copy() {
        let t0 = Instant::now();
        let cfg = PullConfig {
            stall_timeout: Duration::from_secs(1),
            ..PullConfig::default()
        };
        let mut m = PullManager::new(cfg);
        let id = ObjectId(0);
        m.request(id, 10, &[A, B], t0);
        m.room_reserved(id, t0);
        let [
            _,
            PullAction::Fetch {
                source: A, fetch, ..
            },
        ] = drain(&mut m)[..]
        else {
            panic!("fetch from A")
        };
        m.progress(id, fetch, t0 + Duration::from_millis(900));
        m.handle_timeout(t0 + Duration::from_millis(1500));
        assert!(drain(&mut m).is_empty(), "progress pushed the deadline out");
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_millis(1900)));
        m.handle_timeout(t0 + Duration::from_secs(2));
        let acts = drain(&mut m);
        assert_eq!(acts[0], PullAction::Cancel { id, fetch });
        // A stalled once and still has an attempt left.
        let PullAction::Fetch {
            source: A,
            fetch: f2,
            ..
        } = acts[1]
        else {
            panic!("retry A")
        };
        m.node_lost(A, t0 + Duration::from_secs(2));
        let acts = drain(&mut m);
        assert_eq!(acts[0], PullAction::Cancel { id, fetch: f2 });
        assert!(matches!(acts[1], PullAction::Fetch { source: B, .. }));
    }

    #[test]
    fn admission_bounds_bytes_in_flight_and_room_is_retried() {
        let t0 = Instant::now();
        let cfg = PullConfig {
            max_inflight_bytes: 100,
            max_room_retries: 1,
            ..PullConfig::default()
        };
        let mut m = PullManager::new(cfg);
        m.request(ObjectId(1), 60, &[A], t0);
        m.request(ObjectId(2), 60, &[A], t0);
        m.request(ObjectId(3), 500, &[A], t0);
        assert_eq!(
            drain(&mut m),
            vec![PullAction::Reserve {
                id: ObjectId(1),
                size: 60
            }]
        );
        m.room_denied(ObjectId(1), t0);
        m.handle_timeout(t0 + Duration::from_millis(100));
        assert_eq!(
            drain(&mut m),
            vec![PullAction::Reserve {
                id: ObjectId(1),
                size: 60
            }]
        );
        m.room_denied(ObjectId(1), t0 + Duration::from_millis(100));
        let acts = drain(&mut m);
        assert!(matches!(
            acts[0],
            PullAction::Fail {
                error: PullError::StoreFull { .. },
                ..
            }
        ));
        assert_eq!(
            acts[1],
            PullAction::Reserve {
                id: ObjectId(2),
                size: 60
            }
        );
        m.cancel(ObjectId(2), t0);
        // The 500-byte object exceeds the budget but is admitted alone.
        assert_eq!(
            drain(&mut m),
            vec![PullAction::Reserve {
                id: ObjectId(3),
                size: 500
            }]
        );
    }

    #[derive(Clone, Debug)]
    enum Ev {
        Request(u8, Vec<u8>),
        Room(bool),
        Outcome(u8),
        Tick(u16),
        NodeLost(u8),
        Cancel(u8),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u8..6, proptest::collection::vec(0u8..4, 0..4)).prop_map(|(o, s)| Ev::Request(o, s)),
            proptest::bool::ANY.prop_map(Ev::Room),
            (0u8..3).prop_map(Ev::Outcome),
            (0u16..3000).prop_map(Ev::Tick),
            (0u8..4).prop_map(Ev::NodeLost),
            (0u8..6).prop_map(Ev::Cancel),
        ]
    }

    proptest! {
        /// A simulated driver: every pull ends in exactly one Complete or Fail (or an explicit cancel), budgets
        /// hold, and once events stop, failing everything drains all pulls (no hang).
        #[test]
        fn every_pull_terminates(events in proptest::collection::vec(ev(), 0..80)) {
            let t0 = Instant::now();
            let cfg = PullConfig { max_inflight_bytes: 250, max_inflight_pulls: 3, attempts_per_source: 2,
                stall_timeout: Duration::from_secs(1), room_retry_interval: Duration::from_millis(50),
                max_room_retries: 3, max_queued_pulls: 5 };
            let mut m = PullManager::new(cfg);
            let mut now = t0;
            let mut open: BTreeSet<u128> = BTreeSet::new();
            let mut reserving: Vec<ObjectId> = Vec::new();
            let mut fetching: BTreeMap<u64, ObjectId> = BTreeMap::new();
            let step = |m: &mut PullManager, open: &mut BTreeSet<u128>, reserving: &mut Vec<ObjectId>,
                            fetching: &mut BTreeMap<u64, ObjectId>| -> Result<(), TestCaseError> {
                while let Some(a) = m.poll_action() {
                    match a {
                        PullAction::Reserve { id, .. } => reserving.push(id),
                        PullAction::Fetch { id, fetch, .. } => { fetching.retain(|_, v| *v != id); fetching.insert(fetch, id); }
                        PullAction::Cancel { fetch, .. } => { fetching.remove(&fetch); }
                        PullAction::Complete { id } | PullAction::Fail { id, .. } => {
                            prop_assert!(open.remove(&id.0), "second outcome for {}", id);
                            reserving.retain(|r| *r != id);
                            fetching.retain(|_, v| *v != id);
                        }
                    }
                }
                // Budgets: at most 3 pulls admitted, and over 250 bytes only when a single large pull runs alone.
                prop_assert!(m.inflight_pulls() <= 3);
                prop_assert!(m.inflight_bytes() <= 250 || m.inflight_pulls() == 1, "{} bytes in {} pulls", m.inflight_bytes(), m.inflight_pulls());
                Ok(())
            };
            for e in events {
                match e {
                    Ev::Request(o, srcs) => {
                        let srcs: Vec<NodeId> = srcs.into_iter().map(|s| NodeId(s.into())).collect();
                        let size = 40 + u64::from(o) * 40;
                        match m.request(ObjectId(o.into()), size, &srcs, now) {
                            Requested::Started => { prop_assert!(open.insert(o.into())); }
                            Requested::Joined => prop_assert!(open.contains(&o.into())),
                            Requested::Refused => { open.insert(o.into()); }
                        }
                    }
                    Ev::Room(ok) => if let Some(id) = reserving.pop() {
                        if ok { m.room_reserved(id, now) } else { m.room_denied(id, now) }
                    },
                    Ev::Outcome(k) => if let Some((&fetch, &id)) = fetching.iter().next() {
                        fetching.remove(&fetch);
                        match k { 0 => m.fetch_done(id, fetch, now), 1 => m.fetch_failed(id, fetch, now), _ => m.progress(id, fetch, now) }
                        if k == 2 { fetching.insert(fetch, id); }
                    },
                    Ev::Tick(ms) => { now += Duration::from_millis(ms.into()); m.handle_timeout(now); }
                    Ev::NodeLost(n) => m.node_lost(NodeId(n.into()), now),
                    Ev::Cancel(o) => { m.cancel(ObjectId(o.into()), now); open.remove(&u128::from(o)); reserving.retain(|r| r.0 != u128::from(o)); }
                }
                step(&mut m, &mut open, &mut reserving, &mut fetching)?;
            }
            // Wind down: the driver grants room and every source fails; everything must end.
            for _ in 0..200 {
                if open.is_empty() { break; }
                while let Some(id) = reserving.pop() { m.room_reserved(id, now); }
                let f: Vec<(u64, ObjectId)> = fetching.iter().map(|(k, v)| (*k, *v)).collect();
                for (fetch, id) in f { fetching.remove(&fetch); m.fetch_failed(id, fetch, now); }
                now += Duration::from_secs(2);
                m.handle_timeout(now);
                step(&mut m, &mut open, &mut reserving, &mut fetching)?;
            }
            prop_assert!(open.is_empty(), "pulls never ended: {:?}", open);
            prop_assert_eq!(m.active(), 0);
            prop_assert_eq!(m.inflight_bytes(), 0);
        }
    }
}
