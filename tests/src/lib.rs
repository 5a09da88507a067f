//! Functions and actors shared by the multi-process tests: compiled into both the test node binary
//! (`oxray-test-node`) and the test drivers, so they register under the same names on every node.

use std::time::Duration;

pub mod harness;

/// Call from every binary that must have these functions registered (keeps the linker from dropping them).
pub fn link() {}

/// Adds two numbers.
#[oxray::remote]
pub fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Sums `lo..hi` by splitting in halves as nested tasks, passing refs down as arguments.
#[oxray::remote]
pub fn tree_sum(lo: i64, hi: i64) -> i64 {
    if hi - lo <= 4 {
        return (lo..hi).sum();
    }
    let mid = (lo + hi) / 2;
    let left = tree_sum::remote(lo, mid).expect("submit");
    let right = tree_sum::remote(mid, hi).expect("submit");
    // The two halves go to `add` as refs: resolved before `add` runs, wherever it runs.
    add::remote(&left, &right)
        .expect("submit")
        .get()
        .expect("sum")
}

/// Sleeps, then names the node it ran on.
#[oxray::remote]
pub fn where_am_i(sleep_ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(sleep_ms));
    oxray::node_state().map(|s| s.node.id).unwrap_or_default()
}

/// Sleeps; returns when it started and ended (microseconds since the Unix epoch on the node's clock).
#[oxray::remote]
pub fn span(sleep_ms: u64) -> (u64, u64) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    };
    let start = now();
    std::thread::sleep(Duration::from_millis(sleep_ms));
    (start, now())
}

/// Returns a vector of `n` floats (a large result when `n` is large).
#[oxray::remote]
pub fn make_vec(n: u64) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

/// Sums a vector (takes a ref to a large object as its argument).
#[oxray::remote]
pub fn sum_vec(v: Vec<f32>) -> f64 {
    v.iter().map(|x| *x as f64).sum()
}

/// Panics with the given message.
#[oxray::remote]
pub fn fail_with(msg: String) -> u8 {
    panic!("{msg}")
}

/// Reads a key of the user KV (from whichever node runs this).
#[oxray::remote]
pub fn kv_read(key: String) -> Option<Vec<u8>> {
    oxray::kv::get(&key).expect("kv get")
}

/// An actor that records the calls it receives, in order.
#[derive(Debug)]
pub struct Recorder {
    seen: Vec<u64>,
}

#[oxray::actor]
impl Recorder {
    /// A recorder that starts with `first`.
    pub fn new(first: u64) -> Self {
        Recorder { seen: vec![first] }
    }
    /// Records `v` and returns how many values it holds.
    pub fn record(&mut self, v: u64) -> usize {
        self.seen.push(v);
        self.seen.len()
    }
    /// Everything recorded.
    pub fn seen(&self) -> Vec<u64> {
        self.seen.clone()
    }
    /// Sleeps, then returns how many values it holds (a call that is in flight for a while).
    pub fn nap(&mut self, ms: u64) -> usize {
        std::thread::sleep(Duration::from_millis(ms));
        self.seen.len()
    }
    /// The node hosting this actor.
    pub fn node(&self) -> String {
        oxray::node_state().map(|s| s.node.id).unwrap_or_default()
    }
}

/// An actor that keeps the `Recorder` handle it was created with and calls through it: a handle that outlives a
/// restart of the actor it names.
#[derive(Debug)]
pub struct Relay {
    rec: oxray::ActorHandle<Recorder>,
}

#[oxray::actor]
impl Relay {
    /// A relay to `rec`.
    pub fn new(rec: oxray::ActorHandle<Recorder>) -> Self {
        Relay { rec }
    }
    /// Records `v` through the kept handle: (values held, the recorder's node), or the error as text.
    pub fn relay(&mut self, v: u64) -> Result<(usize, String), String> {
        let n = self.rec.record(v).get().map_err(|e| e.to_string())?;
        let at = self.rec.node().get().map_err(|e| e.to_string())?;
        Ok((n, at))
    }
}

/// Puts `n` values on the node it runs on and returns refs to them (owned by that node).
#[oxray::remote]
pub fn make_refs(n: u64) -> Vec<oxray::ObjectRef<u64>> {
    (0..n)
        .map(|i| oxray::put(&(i * 10)).expect("put"))
        .collect()
}

/// Gets every nested ref (wherever its owner is) and sums the values.
#[oxray::remote]
pub fn sum_refs(refs: Vec<oxray::ObjectRef<u64>>) -> u64 {
    refs.iter().map(|r| r.get().expect("nested get")).sum()
}

/// Records `v` through a handle it was passed, and says where it ran.
#[oxray::remote]
pub fn record_via(rec: oxray::ActorHandle<Recorder>, v: u64) -> (usize, String) {
    let n = rec.record(v).get().expect("call through a passed handle");
    (
        n,
        oxray::node_state().map(|s| s.node.id).unwrap_or_default(),
    )
}

/// Writes `key` to the cluster KV: a visible trace that the task ran.
#[oxray::remote]
pub fn mark(key: String) -> bool {
    oxray::kv::put(&key, b"ran").is_ok()
}

/// A `Sync` actor for `max_concurrency`: `meet` returns only once `parties` calls are inside it at once.
#[derive(Debug)]
pub struct Meeting {
    barrier: std::sync::Barrier,
    bumps: std::sync::atomic::AtomicU64,
    inflight: std::sync::atomic::AtomicU64,
}

#[oxray::actor]
impl Meeting {
    /// A meeting of `parties` calls.
    pub fn new(parties: u64) -> Self {
        Meeting {
            barrier: std::sync::Barrier::new(parties as usize),
            bumps: std::sync::atomic::AtomicU64::new(0),
            inflight: std::sync::atomic::AtomicU64::new(0),
        }
    }
    /// Waits until `parties` calls are here; returns the name of the thread it ran on.
    pub fn meet(&self) -> String {
        self.barrier.wait();
        std::thread::current().name().unwrap_or("").to_string()
    }
    /// Counts a call after a short nap.
    pub fn bump(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        self.inflight.fetch_add(1, SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        self.inflight.fetch_sub(1, SeqCst);
        self.bumps.fetch_add(1, SeqCst) + 1
    }
    /// Runs alone: (calls counted, calls inside `bump` now).
    pub fn snapshot(&mut self) -> (u64, u64) {
        (*self.bumps.get_mut(), *self.inflight.get_mut())
    }
    /// The node hosting this actor.
    pub fn node(&self) -> String {
        oxray::node_state().map(|s| s.node.id).unwrap_or_default()
    }
}

/// An async actor whose state is not `Sync`: its `async fn(&self)` calls interleave on the actor's thread.
#[derive(Debug)]
pub struct Gather {
    barrier: tokio::sync::Barrier,
    arrived: std::cell::Cell<u64>,
}

#[oxray::actor]
impl Gather {
    /// A gathering of `parties` calls.
    pub fn new(parties: u64) -> Self {
        Gather {
            barrier: tokio::sync::Barrier::new(parties as usize),
            arrived: std::cell::Cell::new(0),
        }
    }
    /// Waits, without blocking the thread, until `parties` calls are here; returns how many came before it.
    pub async fn meet(&self) -> u64 {
        let before = self.arrived.get();
        self.arrived.set(before + 1);
        self.barrier.wait().await;
        before
    }
}

/// Finds the `Recorder` named `name` from whichever node runs this, records `v` there, and says where it lives.
#[oxray::remote]
pub fn record_named(name: String, v: u64) -> (usize, String) {
    let h = oxray::get_actor::<Recorder>(&name).expect("lookup by name");
    (
        h.record(v)
            .get()
            .expect("call through the looked-up handle"),
        h.node().get().expect("node of the looked-up actor"),
    )
}

/// Keeps refs it was handed inside an argument, beyond the call that brought them: a borrower of their objects.
#[derive(Debug, Default)]
pub struct Keeper {
    kept: Vec<oxray::ObjectRef<Vec<u64>>>,
}

#[oxray::actor]
impl Keeper {
    /// An empty keeper.
    pub fn new() -> Self {
        Keeper::default()
    }
    /// Stores the refs; returns how many it holds.
    pub fn keep(&mut self, refs: Vec<oxray::ObjectRef<Vec<u64>>>) -> usize {
        self.kept.extend(refs);
        self.kept.len()
    }
    /// Sums every element of every kept value: an error if an owner freed an object this actor still holds.
    pub fn total(&self) -> Result<u64, String> {
        let mut sum = 0;
        for r in &self.kept {
            sum += r.get().map_err(|e| e.to_string())?.iter().sum::<u64>();
        }
        Ok(sum)
    }
    /// Drops the kept refs.
    pub fn clear(&mut self) -> usize {
        self.kept.clear();
        0
    }
}

/// Hands refs it was given on to a keeper (on another node), then lets go of them: the owner → A → B chain.
#[oxray::remote]
pub fn pass_on(refs: Vec<oxray::ObjectRef<Vec<u64>>>, keeper: oxray::ActorHandle<Keeper>) -> usize {
    keeper.keep(refs).get().expect("keeper call")
}

/// Sums a vector and names the node it ran on (a reader of a large argument, for locality tests).
#[oxray::remote]
pub fn sum_where(v: Vec<f32>) -> (f64, String) {
    (
        v.iter().map(|x| *x as f64).sum(),
        oxray::node_state().map(|s| s.node.id).unwrap_or_default(),
    )
}

/// An actor built from a (large) vector: where it is placed shows whether creation honours locality.
#[derive(Debug)]
pub struct Holder {
    len: usize,
}

#[oxray::actor]
impl Holder {
    /// Keeps only the length of `v`.
    pub fn new(v: Vec<f32>) -> Self {
        Holder { len: v.len() }
    }
    /// The vector's length.
    pub fn size(&self) -> usize {
        self.len
    }
    /// The node hosting this actor.
    pub fn node(&self) -> String {
        oxray::node_state().map(|s| s.node.id).unwrap_or_default()
    }
}

/// A checksum of bytes (FNV-1a over 8-byte words, then the tail): cheap enough for tens of MiB.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x100_0000_01b3);
    }
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Puts `len` bytes (a pattern from `seed`) on the node it runs on, which owns them; returns the ref and the bytes'
/// checksum.
#[oxray::remote]
pub fn make_blob(len: u64, seed: u64) -> (oxray::ObjectRef<Vec<u8>>, u64) {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let sum = checksum(&bytes);
    (oxray::put(&bytes).expect("put"), sum)
}

/// The checksum of a blob (read wherever this runs), and the node it ran on.
#[oxray::remote]
pub fn blob_sum(blob: Vec<u8>) -> (u64, String) {
    (
        checksum(&blob),
        oxray::node_state().map(|s| s.node.id).unwrap_or_default(),
    )
}

/// The transfer counters of the node this runs on: (pulled, failed, fetches, active).
#[oxray::remote]
pub fn transfer_stats() -> (u64, u64, u64, u64) {
    let t = oxray::node_state().expect("node state").node.transfer;
    (t.pulled, t.failed, t.fetches, t.active)
}
