//! The per-process runtime: the owner's object table, the worker pool, the actors hosted here, and the path every
//! submission takes (local execution now; a remote node when the cluster layer places it elsewhere).
//!
//! One `Runtime` per process, installed by `init`/`connect` and reached through [`current`]. The hot path (submit →
//! execute → complete) takes no global lock: the object table is a `DashMap`, the node's queue and the pool have one
//! short mutex each, and an actor's mailbox is a `flume` channel.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::arg::{Arg, ArgKind};
use crate::cluster::{Cluster, Outgoing};
use crate::error::{Error, Result};
use crate::node_queue::{NodeQueue, TaskJob};
use crate::object::{Entry, ObjectId, ObjectRef, ObjectTable, RefInner, rand_u128};
use crate::options::{ActorOptions, TaskOptions};
use crate::pool::WorkerPool;
use crate::registry::{self, ActorClassEntry, Args, FunctionEntry};
use crate::value::{self, Value};
use crate::wire::{self, CreateW, TaskW, kind};
use oxray_scheduler::{BundleKey, Decision, PlacementGroupId, ResourceSet};
use oxray_transport::NodeId;

/// How a runtime is configured.
#[derive(Debug, Clone)]
pub struct Config {
    /// CPUs this node offers tasks (default: the machine's cores). A task holds its `num_cpus` (fractions
    /// allowed) while it runs, so at most this many CPUs' worth of tasks run at once.
    pub num_cpus: usize,
    /// GPUs this node offers tasks (default: none).
    pub num_gpus: f64,
    /// Custom resources this node offers tasks, e.g. `{"disk": 1.0}` (default: none). A task that needs one waits
    /// until enough of it is free.
    pub resources: std::collections::BTreeMap<String, f64>,
    /// Upper bound on worker threads, counting those blocked in `get`.
    pub max_worker_threads: usize,
    /// This node's object store: where values of 100 KiB and more live (memory limit, spill directory).
    pub object_store: oxray_objstore::StoreConfig,
    /// Threads of the I/O runtime (QUIC, batching, timers) when oxray starts its own; `OXRAY_IO_THREADS` overrides
    /// the default of one per four cores, at least one.
    pub io_threads: usize,
    /// How long a thread waiting for a reply due within microseconds spins before it parks: parking and waking an
    /// idle CPU costs a large part of a round trip between processes. In a process alone, a `get` and idle workers
    /// and actors spin; on a cluster, the I/O thread spins after each lone call or result instead. The default is
    /// 100 µs on machines of up to 4 cores, where it makes synchronous calls up to ~1.6x faster, and zero (off) on
    /// larger ones, where it did not help and cost throughput. `OXRAY_SPIN_US` overrides it; zero turns spinning
    /// off.
    pub spin: Duration,
    /// The largest `put` value (archive bytes) whose refs carry the value itself, so that nothing is kept for it by
    /// id: no table entry, no borrow notices, no fetch. Objects are immutable, so a copy riding with each ref is the
    /// same object. Such an object is not listed among the node's objects. The default is 64 bytes; values over 256
    /// bytes (`oxray_objstore::SMALL_ARCHIVE`) are never carried. `OXRAY_CARRY_MAX` overrides it; zero turns carrying
    /// off.
    pub carry_max: usize,
    /// Whether one-way traffic (task and actor call batches, results) with other nodes of this host goes over a
    /// Unix socket instead of QUIC. The socket is authenticated both ways by keying material of the nodes' QUIC
    /// connection, so only the two ends of that connection can use it; requests, object transfers and failure
    /// detection stay on QUIC. On 2 cores it took synchronous actor calls between two processes from about 16k to
    /// 24k per second. Default on; `OXRAY_LOCAL_LINKS=0` turns it off.
    pub local_links: bool,
}

impl Default for Config {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Config {
            num_cpus: cpus,
            num_gpus: 0.0,
            resources: std::collections::BTreeMap::new(),
            // Threads blocked in `get` hold no CPU slot, so deep task graphs need many: a thread costs little
            // memory until it runs (its stack is reserved, not touched), and the cap only guards against runaways.
            max_worker_threads: (cpus * 64).max(1024),
            object_store: oxray_objstore::StoreConfig::from_system(),
            // One thread per process on small machines: a round trip then wakes one I/O thread per side instead of
            // two (tokio wakes an idle sibling for every task it schedules). Measured on 2 cores, 1:1 actor calls
            // sync: 6.5 context switches and ~85-107 µs of CPU per call with one thread, 12-14 and ~100-121 µs
            // with two. Larger machines get more, for the throughput of many peers.
            io_threads: std::env::var("OXRAY_IO_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or((cpus / 4).max(1)),
            spin: std::env::var("OXRAY_SPIN_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(crate::spin::default_limit(cpus), Duration::from_micros),
            carry_max: std::env::var("OXRAY_CARRY_MAX")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(64),
            local_links: std::env::var("OXRAY_LOCAL_LINKS").map_or(true, |v| v != "0"),
        }
    }
}

/// Which task a cancellation flag belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum CancelKey {
    Local(ObjectId),
    Remote(u128, u64),
}

/// A task as the owner records it, for `list tasks` and `cancel`.
#[derive(Debug, Clone)]
pub(crate) struct TaskRecord {
    pub(crate) name: String,
    pub(crate) state: &'static str,
}

pub(crate) struct Runtime {
    pub(crate) node: u128,
    /// See [`Config::carry_max`].
    carry_max: usize,
    pub(crate) objects: Arc<ObjectTable>,
    pub(crate) pool: Arc<WorkerPool>,
    /// Decides when a task placed here starts: it holds its resources while it runs (see `node_queue`).
    pub(crate) local: Arc<NodeQueue>,
    /// Actors hosted by this process, by id.
    pub(crate) actors: DashMap<u128, Arc<ActorHost>>,
    /// Named actors known to this process (the GCS holds the cluster-wide directory in cluster mode).
    pub(crate) named: DashMap<String, ActorCore>,
    /// Cancellation flags of tasks queued or running here, by return object (tasks this process owns) or by
    /// (owner, call) (tasks sent by other nodes).
    /// The flag's task id is the one `local` knows it by.
    pub(crate) cancels: DashMap<CancelKey, (Arc<AtomicBool>, u128)>,
    /// Cancels of remote tasks that arrived before the task, with when they arrived.
    early_cancels: Mutex<std::collections::HashMap<CancelKey, Instant>>,
    /// `early_cancels.len()`, read without the lock on every task dispatch.
    early_cancel_count: AtomicUsize,
    pub(crate) tasks: DashMap<u128, TaskRecord>,
    pub(crate) tokio: tokio::runtime::Handle,
    /// Placement groups created by this process, by id.
    pub(crate) pgs: DashMap<u128, crate::pg::PlacementGroup>,
    /// Bundles reserved on this node: (group, bundle index) → thousandths of a CPU held.
    pub(crate) bundles: DashMap<(u128, u32), u64>,
    /// The GCS's tables (named actors, the actor directory, the user KV), through a client.
    pub(crate) gcs: OnceLock<oxray_gcs::tables::Tables>,
    /// The GCS replica hosted by this process (embedded mode, or the head), kept alive with the runtime.
    pub(crate) gcs_server: OnceLock<oxray_gcs::GcsServer>,
    /// The embedded GCS's directory, removed at shutdown.
    pub(crate) gcs_tempdir: OnceLock<std::path::PathBuf>,
    /// Set when this process is a node of a cluster (`connect`, `start`).
    pub(crate) cluster: OnceLock<Arc<Cluster>>,
    /// Kept so the runtime's threads live as long as this process's oxray runtime.
    _tokio: Option<Arc<tokio::runtime::Runtime>>,
}

static CURRENT: RwLock<Option<Arc<Runtime>>> = RwLock::new(None);

/// The installed runtime, or `NotInitialized`.
pub(crate) fn current() -> Result<Arc<Runtime>> {
    CURRENT.read().clone().ok_or(Error::NotInitialized)
}

pub(crate) fn is_initialized() -> bool {
    CURRENT.read().is_some()
}

/// Installs a runtime for this process. A second call keeps the first runtime.
pub(crate) fn install(config: Config) -> Result<Arc<Runtime>> {
    install_as(config, None)
}

/// Installs a runtime whose node id is `node` (the mesh identity's id in cluster mode).
pub(crate) fn install_as(config: Config, node: Option<u128>) -> Result<Arc<Runtime>> {
    let mut cur = CURRENT.write();
    if let Some(rt) = cur.as_ref() {
        return Ok(rt.clone());
    }
    let (handle, owned) = match tokio::runtime::Handle::try_current() {
        Ok(h) => (h, None),
        Err(_) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.io_threads.max(1))
                .thread_name("oxray-io")
                .enable_all()
                .build()
                .map_err(|e| Error::Cluster(format!("cannot start the I/O runtime: {e}")))?;
            (rt.handle().clone(), Some(Arc::new(rt)))
        }
    };
    crate::spin::set_limit(
        config.spin,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let pool = WorkerPool::unslotted("oxray", config.num_cpus, config.max_worker_threads);
    let total =
        crate::cluster::resource_set(config.num_cpus as f64, config.num_gpus, &config.resources);
    let rt = Arc::new(Runtime {
        node: node.unwrap_or_else(rand_u128),
        carry_max: config.carry_max,
        objects: Arc::new(ObjectTable::new(oxray_objstore::ObjectStore::new(
            config.object_store.clone(),
        ))),
        local: NodeQueue::new(total, pool.clone()),
        pool,
        actors: DashMap::new(),
        named: DashMap::new(),
        cancels: DashMap::new(),
        early_cancels: Mutex::new(std::collections::HashMap::new()),
        early_cancel_count: AtomicUsize::new(0),
        tasks: DashMap::new(),
        tokio: handle,
        pgs: DashMap::new(),
        bundles: DashMap::new(),
        gcs: OnceLock::new(),
        gcs_server: OnceLock::new(),
        gcs_tempdir: OnceLock::new(),
        cluster: OnceLock::new(),
        _tokio: owned,
    });
    *cur = Some(rt.clone());
    Ok(rt)
}

impl Runtime {
    /// On a cluster, the I/O thread spins instead of the callers and workers (see [`crate::spin::spin_io_instead`]),
    /// but only on the I/O runtime oxray owns: a caller's own tokio runtime is not ours to keep busy (its callers
    /// keep spinning then).
    pub(crate) fn spin_io_instead(&self) {
        if self._tokio.is_some() {
            crate::spin::spin_io_instead(&self.tokio);
        }
    }
}

/// Starts the one-replica GCS of the embedded default in a fresh temporary directory.
pub(crate) fn start_embedded_gcs(rt: &Arc<Runtime>) -> Result<()> {
    if rt.gcs.get().is_some() {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!(
        "oxray-{}-{:x}",
        std::process::id(),
        rand_u128() as u64
    ));
    let _enter = rt.tokio.enter();
    let (server, client) = oxray_gcs::GcsServer::embedded(&dir).map_err(|e| {
        Error::Cluster(format!(
            "cannot start the embedded GCS in {}: {e}",
            dir.display()
        ))
    })?;
    let _ = rt.gcs_tempdir.set(dir);
    let _ = rt.gcs_server.set(server);
    let _ = rt.gcs.set(oxray_gcs::tables::Tables::new(client));
    Ok(())
}

/// Removes the runtime: pending work is dropped, actors stop.
pub(crate) fn uninstall() {
    let rt = CURRENT.write().take();
    if let Some(rt) = rt {
        rt.pool.shutdown();
        for a in rt.actors.iter() {
            a.value().kill("the runtime shut down");
        }
        rt.actors.clear();
        if let Some(dir) = rt.gcs_tempdir.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
        // The tokio runtime may not be dropped inside an async context; park it on a plain thread.
        if let Some(tok) = &rt._tokio {
            let tok = tok.clone();
            drop(rt);
            std::thread::spawn(move || drop(tok));
        }
    }
}

/// Where a finished task's or call's result goes: the local owner's entry, or back over the mesh.
pub(crate) enum Done {
    Entry(Arc<Entry>),
    /// Back to the owner on another node, batched with other results.
    Remote {
        cluster: Arc<Cluster>,
        owner: NodeId,
        call: u64,
        /// The result's object id, for a task: a large result is then also kept here as a secondary copy (the
        /// owner learns so from `OK_KEPT`), so tasks that read it can run here without moving it.
        keep: Option<ObjectId>,
    },
}

impl Done {
    pub(crate) fn complete(self, result: Result<Bytes>) {
        self.complete_holding(result, Vec::new())
    }

    /// Completes with a value that has `nested` refs inside: they stay alive as long as the result may be read.
    pub(crate) fn complete_holding(self, result: Result<Bytes>, nested: Vec<Arc<RefInner>>) {
        match self {
            Done::Entry(e) => {
                if result.is_ok() {
                    e.hold(nested);
                }
                e.complete(result)
            }
            Done::Remote {
                cluster,
                owner,
                call,
                keep,
            } => cluster.send_result_holding(owner, call, result, nested, keep),
        }
    }
}

/// Tells `node` that the result of `call` it lent refs for is gone (from `Entry`'s drop).
pub(crate) fn release_lent(node: u128, call: u64) {
    if let Ok(rt) = current()
        && let Some(cl) = rt.cluster.get()
    {
        cl.release(node, call);
    }
}

/// Tells `node` to drop its secondary copy of `id` (from `Entry`'s drop: the owner no longer names the object).
pub(crate) fn free_copy(node: u128, id: ObjectId) {
    if let Ok(rt) = current()
        && let Some(cl) = rt.cluster.get()
    {
        cl.free_copy(node, id);
    }
}

/// A task owned here on its way to a node.
struct NewTask {
    task: u128,
    function: &'static str,
    sig: u64,
    attempts: u32,
    args: Vec<Arg>,
    entry: Arc<Entry>,
}

/// A ref read out of a value on this node: its own object if this node owns it, else one fetched from its owner.
pub(crate) fn borrow_ref(id: u128, owner: u128) -> Result<Arc<RefInner>> {
    let rt = current()?;
    if owner == rt.node || owner == 0 {
        return Ok(match rt.objects.lookup(ObjectId(id)) {
            Some(entry) => RefInner::owned(entry, rt.node, &rt.objects),
            None => {
                let e = Entry::new(ObjectId(id));
                e.complete(Err(Error::ObjectLost(ObjectId(id).to_string())));
                RefInner::borrowed(e, rt.node)
            }
        });
    }
    let Some(cl) = rt.cluster.get() else {
        return Err(Error::Cluster(format!(
            "object {} is owned by another node, and this process is not in a cluster",
            ObjectId(id)
        )));
    };
    // A ref read out of a lent value holds the value's leases, and the lender keeps the object while they live:
    // nothing to announce (a result of 10,000 refs would otherwise cost 20,000 notices).
    if let Some(leases) = crate::object::current_leases() {
        return Ok(RefInner::remote(ObjectId(id), owner, Some(leases), false));
    }
    // Announced before the ref exists; the call's result waits for the owner's ack, so whoever sent the value
    // (the owner, or a third node passing the ref on) drops its own ref only once the borrow is registered.
    cl.borrow(owner, ObjectId(id));
    Ok(RefInner::remote(ObjectId(id), owner, None, true))
}

/// A ref borrowed from `owner` is gone (see [`borrow_ref`]).
pub(crate) fn unborrow(owner: u128, id: ObjectId) {
    if let Ok(rt) = current()
        && let Some(cl) = rt.cluster.get()
    {
        cl.unborrow(owner, id);
    }
}

/// Starts fetching `entry`'s value from its owner (a remote ref's first use).
pub(crate) fn start_fetch(entry: &Arc<Entry>, owner: u128) {
    match current() {
        Ok(rt) => match rt.cluster.get() {
            Some(cl) => cl.fetch_into(&rt, entry.clone(), owner),
            None => entry.complete(Err(Error::NotInitialized)),
        },
        Err(e) => entry.complete(Err(e)),
    }
}

/// Waits for an object from any thread; a pool worker lends its CPU to the node's queue while it waits.
pub(crate) fn wait_blocking(entry: &Arc<Entry>, deadline: Option<Instant>) -> Result<Bytes> {
    // The get of one ref, typically right after its task or call was sent: a reply due within microseconds arrives
    // sooner than a park and wake would take, so spin for it first. (Waits over many refs do not: their replies
    // come in a stream that the I/O thread must process, and a spinning waiter would take CPU from it.)
    let mut value = None;
    crate::spin::until(|| {
        value = entry.try_value();
        value.is_some()
    });
    if let Some(v) = value {
        return v;
    }
    match current() {
        Ok(rt) => rt.local.blocking(|| entry.wait_blocking(deadline)),
        Err(_) => entry.wait_blocking(deadline),
    }
}

/// Waits for `entries` in order, up to the first that fails, with a pool worker's CPU lent once for the whole wait:
/// lending and taking it back per entry goes through the node's queue each time, and a worker that takes its CPU back
/// over-commits the node, which holds new tasks back until repaid.
pub(crate) fn wait_in_order<'a>(entries: impl Iterator<Item = &'a Arc<Entry>>) {
    let mut pending = entries.filter(|e| !e.is_ready()).peekable();
    if pending.peek().is_none() {
        return;
    }
    let wait = || {
        for e in pending {
            if e.wait_blocking(None).is_err() {
                break;
            }
        }
    };
    match current() {
        Ok(rt) => rt.local.blocking(wait),
        Err(_) => wait(),
    }
}

impl Runtime {
    /// A new pending object owned by this process, and the ref the caller gets.
    fn new_owned(&self, id: ObjectId) -> (Arc<Entry>, Arc<RefInner>) {
        let entry = Entry::new(id);
        self.objects.insert(entry.clone());
        let inner = RefInner::owned(entry.clone(), self.node, &self.objects);
        (entry, inner)
    }

    fn owned_ref<T>(&self, entry: Arc<Entry>) -> ObjectRef<T> {
        self.objects.insert(entry.clone());
        ObjectRef::from_inner(RefInner::owned(entry, self.node, &self.objects))
    }

    /// Stores an already-encoded value this process owns: adopted by the store (no copy) when large.
    /// `nested` are the refs inside the value, kept alive as long as the object.
    pub(crate) fn put_encoded<T>(
        &self,
        bytes: Bytes,
        nested: Vec<Arc<RefInner>>,
    ) -> Result<ObjectRef<T>> {
        let store = self.objects.store();
        // The thread's xorshift: `ObjectId::random` draws from a cryptographic generator, a tenth of a small put.
        let id = ObjectId(rand_u128());
        let entry = if store.config().is_inline(bytes.len()) {
            Entry::ready(id, bytes)
        } else {
            let len = bytes.len();
            store
                .put_aligned(id, bytes)
                .map_err(crate::object::store_error)?;
            Entry::stored(id, store.clone(), len)
        };
        entry.hold(nested);
        Ok(self.owned_ref(entry))
    }

    /// Stores a value this process owns: small ones inline, large ones serialized once, straight into a (warm,
    /// pooled) buffer of the node's object store. A value whose archive fits in a few hundred bytes (most puts) is
    /// serialized in one pass; a larger one is counted in that pass and written in the next.
    pub(crate) fn put<T: Value>(&self, value: &T) -> Result<ObjectRef<T>> {
        let store = self.objects.store();
        crate::object::clear_contained();
        let len = match oxray_objstore::archive_if_small(value).map_err(Error::Serialization)? {
            Ok(small) if store.config().is_inline(small.len()) => {
                let nested = crate::object::take_contained();
                if small.len() <= self.carry_max && nested.is_empty() {
                    // A tiny value rides with its refs: no table entry, nothing to free (see `Config::carry_max`).
                    let entry = Entry::ready(ObjectId(rand_u128()), Bytes::from_owner(small));
                    return Ok(ObjectRef::from_inner(RefInner::carried(entry, self.node)));
                }
                return self.put_encoded(Bytes::from_owner(small), nested);
            }
            Ok(small) => small.len(),
            Err(len) => len,
        };
        if store.config().is_inline(len) {
            let bytes = value::encode(value)?;
            return self.put_encoded(bytes, crate::object::take_contained());
        }
        let id = ObjectId::random();
        store
            .put_counted(id, value, len)
            .map_err(crate::object::store_error)?;
        let entry = Entry::stored(id, store.clone(), len);
        // Refs nested in the value live as long as it does (each was recorded once per serialization pass).
        entry.hold(crate::object::take_contained());
        Ok(self.owned_ref(entry))
    }

    /// Submits a remote function call. Returns at once; the result arrives in the returned ref.
    pub(crate) fn submit_task<R>(
        self: &Arc<Self>,
        function: &'static str,
        sig: u64,
        args: Vec<Arg>,
        opts: &TaskOptions,
    ) -> Result<ObjectRef<R>> {
        let task = rand_u128();
        let (entry, inner) = self.new_owned(ObjectId::for_task_return(task, 0));
        let attempts = if opts.retry_exceptions {
            opts.max_retries + 1
        } else {
            1
        };
        let t = NewTask {
            task,
            function,
            sig,
            attempts,
            args,
            entry,
        };
        let Some(cl) = self.cluster.get() else {
            self.run_task_here(t, opts)?;
            return Ok(ObjectRef::from_inner(inner));
        };
        let pg = self.pg_target(&opts.strategy)?;
        if pg.is_none() && opts.strategy == crate::options::Strategy::Default {
            // Locality needs each large argument's size and holders, which a ref still being computed does not
            // have yet: wait for it, then place (as Ray's owner resolves a task's dependencies before it asks for a
            // node). Refs owned elsewhere are not waited for: only their owner would know.
            let pending = self.pending_owned_args(&t.args);
            if !pending.is_empty() {
                self.place_when_ready(cl, t, opts.clone(), pending);
                return Ok(ObjectRef::from_inner(inner));
            }
        }
        self.place_task(cl, pg, t, opts)?;
        Ok(ObjectRef::from_inner(inner))
    }

    /// The entries of ref arguments owned here whose values are still being computed.
    fn pending_owned_args(&self, args: &[Arg]) -> Vec<Arc<Entry>> {
        args.iter()
            .filter_map(|a| match &a.0 {
                ArgKind::Ref(r)
                    if (r.owner == self.node || r.owner == 0) && !r.entry.is_ready() =>
                {
                    Some(r.entry.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Places `t` once `pending` (its arguments owned here) are known. Cancellable meanwhile: it waits as a parked
    /// task of the cluster.
    fn place_when_ready(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        t: NewTask,
        opts: TaskOptions,
        pending: Vec<Arc<Entry>>,
    ) {
        let (rt, cl) = (self.clone(), cl.clone());
        let id = t.entry.id;
        cl.hold_parked(id);
        self.tokio.spawn(async move {
            for e in pending {
                // A failed argument is reported by the task itself when it resolves its arguments.
                let _ = e.wait_async().await;
            }
            if !cl.take_parked(id) {
                return; // Cancelled while it waited.
            }
            let entry = t.entry.clone();
            if let Err(e) = rt.place_task(&cl, None, t, &opts) {
                entry.complete(Err(e));
            }
        });
    }

    /// Decides where `t` runs (in the bundle `pg` names, if any) and sends it there, or runs it here.
    fn place_task(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        pg: Option<(u128, u128)>,
        t: NewTask,
        opts: &TaskOptions,
    ) -> Result<()> {
        let fid = crate::cluster::function_id(t.function, t.sig);
        let decision = match pg {
            Some((node, _)) if node == self.node => Decision::RunLocal,
            Some((node, _)) => Decision::Spill(NodeId(node)),
            None => cl.decide(self, fid, &opts.resources, &opts.strategy, &t.args),
        };
        if matches!(decision, Decision::RunLocal) {
            return self.run_task_here(t, opts);
        }
        let spec = TaskW {
            task: t.task,
            function: t.function.to_string(),
            sig: t.sig,
            owner: self.node,
            name: opts.name.clone().unwrap_or_else(|| t.function.to_string()),
            attempts: t.attempts,
            args: Cluster::wire_args(&t.args, self.node),
            cpu: 0,
            gpu: 0,
            memory: 0,
            custom: Vec::new(),
            pg: 0,
            bundle: 0,
        }
        .with_demand(&crate::cluster::demand(&opts.resources))
        .in_bundle(crate::cluster::bundle_of(&opts.strategy));
        let out = Outgoing {
            spec,
            args: t.args,
            entry: t.entry,
            retries: opts.max_retries,
            function: fid,
            res: opts.resources.clone(),
            strategy: opts.strategy.clone(),
        };
        match decision {
            Decision::Spill(n) | Decision::RunInBundle { node: n, .. } if n.0 != self.node => {
                cl.submit_remote(self, n, out);
            }
            Decision::Infeasible(why) => cl.park_until_feasible(self, out, why.to_string()),
            _ => cl.park_until_feasible(self, out, "every fitting node is busy".into()),
        }
        Ok(())
    }

    /// Runs a task owned here on this node's pool.
    fn run_task_here(self: &Arc<Self>, t: NewTask, opts: &TaskOptions) -> Result<()> {
        let f = registry::function(t.function, t.sig)?;
        let name = opts.name.clone().unwrap_or_else(|| t.function.to_string());
        let key = CancelKey::Local(t.entry.id);
        let demand = crate::cluster::demand(&opts.resources);
        let bundle = crate::cluster::bundle_of(&opts.strategy);
        self.dispatch(
            f,
            name,
            t.args,
            t.attempts,
            Done::Entry(t.entry),
            Some(key),
            (demand, bundle),
        );
        Ok(())
    }

    /// Runs a task for another node (or a parked one) on this node's pool.
    pub(crate) fn run_here(
        self: &Arc<Self>,
        f: Result<&'static FunctionEntry>,
        args: Vec<Arg>,
        attempts: u32,
        done: Done,
        demand: (ResourceSet, Option<BundleKey>),
    ) {
        let f = match f {
            Ok(f) => f,
            Err(e) => return done.complete(Err(e)),
        };
        // A task sent by another node can be cancelled by its owner until it starts.
        let key = match &done {
            Done::Remote { owner, call, .. } => Some(CancelKey::Remote(owner.0, *call)),
            Done::Entry(_) => None,
        };
        self.dispatch(f, f.name.to_string(), args, attempts, done, key, demand);
    }

    /// Queues a task on this node once its ref arguments are ready; it starts when `demand` is free here (in its
    /// placement-group bundle, if it names one).
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        self: &Arc<Self>,
        f: &'static FunctionEntry,
        name: String,
        args: Vec<Arg>,
        attempts: u32,
        done: Done,
        cancel: Option<CancelKey>,
        (demand, bundle): (ResourceSet, Option<BundleKey>),
    ) {
        let rt = self.clone();
        let task = rand_u128();
        self.tasks.insert(
            task,
            TaskRecord {
                name,
                state: "PENDING",
            },
        );
        let flag = cancel.map(|key| {
            // The map is almost always empty: look without taking its lock on every task.
            let early = matches!(key, CancelKey::Remote(..))
                && self.early_cancel_count.load(Ordering::Acquire) > 0
                && self.take_early_cancel(&key);
            let flag = Arc::new(AtomicBool::new(early));
            self.cancels.insert(key, (flag.clone(), task));
            (key, flag)
        });
        // Arguments that are refs still being computed are awaited here, off the pool: a task holds a worker thread
        // only once it can run. Waiting on a thread instead lets a wide task graph (every `add` of a tree waiting
        // for its halves) use up the pool's threads while the tasks it waits for sit in the queue.
        let waiting: Vec<Arc<Entry>> = args
            .iter()
            .filter_map(|a| match &a.0 {
                ArgKind::Ref(r) if !r.used().is_ready() => Some(r.entry.clone()),
                _ => None,
            })
            .collect();
        let local = self.local.clone();
        let job: TaskJob = Box::new(move |refused: Option<Error>| {
            let cancelled = flag
                .as_ref()
                .is_some_and(|(_, f)| f.load(Ordering::Acquire));
            let (result, nested) = if cancelled {
                (Err(Error::Cancelled), Vec::new())
            } else if let Some(e) = refused {
                (Err(e), Vec::new())
            } else {
                if let Some(mut t) = rt.tasks.get_mut(&task) {
                    t.state = "RUNNING";
                }
                crate::object::clear_contained();
                let result = rt.run_function(f, &args, attempts);
                // Refs serialized into the result (the last encode on this thread) must outlive it.
                (result, crate::object::take_contained())
            };
            rt.tasks.remove(&task);
            if let Some((key, _)) = flag {
                rt.cancels.remove(&key);
            }
            done.complete_holding(result, nested);
        });
        if waiting.is_empty() {
            return local.submit(task, demand, bundle, job);
        }
        self.tokio.spawn(async move {
            for e in waiting {
                // A failed argument is reported by the task itself when it resolves its arguments.
                let _ = e.wait_async().await;
            }
            local.submit(task, demand, bundle, job);
        });
    }

    fn run_function(
        &self,
        f: &'static registry::FunctionEntry,
        args: &[Arg],
        attempts: u32,
    ) -> Result<Bytes> {
        let mut last = Err(Error::Cancelled);
        for _ in 0..attempts.max(1) {
            let resolved = resolve_args(args)?;
            last = crate::object::decoding(arg_entries(args), || {
                catch_task(f.name, self.node, || (f.invoke)(Args::new(resolved)))
            });
            if last.is_ok() {
                break;
            }
        }
        last
    }

    /// Creates an actor, here or on the node the scheduler picks.
    pub(crate) fn create_actor(
        self: &Arc<Self>,
        class: &'static str,
        sig: u64,
        args: Vec<Arg>,
        opts: &ActorOptions,
    ) -> Result<ActorCore> {
        let id = rand_u128();
        let pg = self.pg_target(&opts.strategy)?;
        // In a placement group the bundle already holds the actor's resources.
        let held = if pg.is_some() {
            crate::options::Resources {
                num_cpus: 0.0,
                ..crate::options::Resources::default()
            }
        } else {
            opts.resources.clone()
        };
        if let Some(cl) = self.cluster.get() {
            let target = match pg {
                Some((node, _)) => (node != self.node).then_some(NodeId(node)),
                None => {
                    let fid = crate::cluster::function_id(class, sig);
                    match cl.decide_actor(self, fid, &opts.resources, &opts.strategy, &args) {
                        Decision::RunLocal => None,
                        Decision::Spill(n) | Decision::RunInBundle { node: n, .. } => Some(n),
                        Decision::Wait => {
                            return Err(Error::Infeasible(format!(
                                "every node that could host {class} is busy; try again"
                            )));
                        }
                        Decision::Infeasible(why) => {
                            return Err(Error::Infeasible(format!("actor {class}: {why}")));
                        }
                    }
                }
            };
            if let Some(n) = target {
                if let Some(name) = &opts.name {
                    crate::control::register_named(self, name, id, class, n.0, opts.max_restarts)?;
                } else if opts.max_restarts > 0 {
                    crate::control::register_restartable(self, id, class, n.0, opts.max_restarts)?;
                }
                let spec = CreateW {
                    actor: id,
                    class: class.to_string(),
                    sig,
                    name: opts.name.clone(),
                    cpus: held.num_cpus,
                    gpus: held.num_gpus,
                    custom: held.custom.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    pg: pg.map(|p| p.1).unwrap_or(0),
                    owner: self.node,
                    detached: opts.detached,
                    max_concurrency: concurrency(opts),
                    args: Cluster::wire_args(&args, self.node),
                };
                let restart = (opts.max_restarts > 0).then(|| RestartSpec {
                    spec: spec.clone(),
                    args: args.clone(),
                    function: crate::cluster::function_id(class, sig),
                    res: opts.resources.clone(),
                    strategy: opts.strategy.clone(),
                    left: opts.max_restarts,
                    done: 0,
                    task_retries: opts.max_task_retries,
                });
                let created = cl.create_remote(self, n, spec, args);
                let ra = RemoteActor::new(id, n, created, restart);
                if ra.restart.is_some() {
                    cl.watch_restartable(&ra);
                }
                return Ok(ActorCore::new(id, class, Location::Remote(ra)));
            }
        }
        let entry = registry::class(class, sig)?;
        if let Some(name) = &opts.name {
            // Hosted here, so restarted by nobody: this process's death is the actor's.
            crate::control::register_named(self, name, id, class, self.node, 0)?;
        }
        let host = ActorHost::spawn(
            self.clone(),
            id,
            entry,
            args,
            HostTerms {
                name: opts.name.clone(),
                demand: crate::cluster::demand(&held),
                pg: pg.map(|p| p.1),
                owner: self.node,
                detached: opts.detached,
                max_concurrency: concurrency(opts),
            },
        )?;
        self.actors.insert(id, host.clone());
        let core = ActorCore::local(id, class, host);
        if let Some(name) = &opts.name {
            self.named.insert(name.clone(), core.clone());
        }
        Ok(core)
    }

    /// Hosts an actor created by another node.
    pub(crate) fn host_actor(
        self: &Arc<Self>,
        spec: &wire::ArchivedCreateW,
        args: Vec<Arg>,
    ) -> Result<()> {
        let entry = registry::class(spec.class.as_str(), spec.sig.to_native())?;
        let id = spec.actor.to_native();
        let name = spec.name.as_ref().map(|n| n.to_string());
        let pg = Some(spec.pg.to_native()).filter(|p| *p != 0);
        let host = ActorHost::spawn(
            self.clone(),
            id,
            entry,
            args,
            HostTerms {
                name,
                demand: crate::cluster::resource_set(
                    spec.cpus.to_native(),
                    spec.gpus.to_native(),
                    &spec
                        .custom
                        .iter()
                        .map(|t| (t.0.to_string(), t.1.to_native()))
                        .collect(),
                ),
                pg,
                owner: spec.owner.to_native(),
                detached: spec.detached,
                max_concurrency: spec.max_concurrency.to_native(),
            },
        )?;
        self.actors.insert(id, host);
        Ok(())
    }

    /// The node hosting the bundle a placement-group strategy names, and the group; `None` for other strategies.
    fn pg_target(&self, s: &crate::options::Strategy) -> Result<Option<(u128, u128)>> {
        match s {
            crate::options::Strategy::PlacementGroup { group, bundle } => {
                match crate::pg::PlacementGroup::node_of(self, *group, *bundle) {
                    Some(n) => Ok(Some((n, *group))),
                    None => Err(Error::Infeasible(format!(
                        "placement group {:x} is unknown to this process or not reserved yet (call pg.wait() first)",
                        group >> 80
                    ))),
                }
            }
            _ => Ok(None),
        }
    }

    /// Kills the actors whose owner was `node` (declared dead), except detached ones: nobody can reach them any
    /// more unless they have a name, and a non-detached actor's lifetime is its creator's.
    pub(crate) fn owner_died(&self, node: u128) {
        for a in self.actors.iter() {
            if a.owner == node && !a.detached && a.is_alive() {
                tracing::info!(actor = %short(a.id), owner = %short(node), "actor's owner died; stopping it");
                a.kill("its owner died (create it with ActorOptions::detached to keep it)");
            }
        }
    }

    /// Holds a placement group's bundles on this node, all or none: the node's queue reserves them, and tasks in
    /// them draw on the reservation.
    pub(crate) fn hold_bundles(&self, hold: &crate::pg::BundleHold) -> Result<()> {
        let bundles: Vec<(BundleKey, ResourceSet)> = hold
            .bundles
            .iter()
            .map(|(i, c)| {
                let key = BundleKey {
                    pg: PlacementGroupId(hold.pg),
                    index: *i,
                };
                (
                    key,
                    crate::cluster::resource_set(*c, 0.0, &Default::default()),
                )
            })
            .collect();
        self.local
            .hold_bundles(&bundles)
            .map_err(|why| Error::Infeasible(format!("node {}: {why}", short(self.node))))?;
        for (i, c) in &hold.bundles {
            self.bundles
                .insert((hold.pg, *i), (c.max(0.0) * 1000.0).round() as u64);
        }
        Ok(())
    }

    /// Releases bundles and kills the actors placed in their group on this node.
    pub(crate) fn release_bundles(&self, hold: &crate::pg::BundleHold) -> Result<()> {
        for (i, _) in &hold.bundles {
            self.bundles.remove(&(hold.pg, *i));
            self.local.release_bundle(BundleKey {
                pg: PlacementGroupId(hold.pg),
                index: *i,
            });
        }
        for a in self.actors.iter() {
            if a.pg == Some(hold.pg) {
                a.kill("its placement group was removed");
            }
        }
        Ok(())
    }

    /// Finds a named actor through the GCS's directory.
    pub(crate) fn lookup_actor(self: &Arc<Self>, name: &str) -> Result<ActorCore> {
        if let Some(c) = self.named.get(name)
            && c.is_alive()
        {
            return Ok(c.clone());
        }
        let mut n = crate::control::lookup_named(self, name)?;
        // The directory may still name the node of an incarnation that died: its creator records the new one
        // shortly after it restarts the actor. Wait for that (bounded) rather than hand out a handle to a dead node.
        if let Some(cl) = self.cluster.get() {
            let deadline = Instant::now() + RESTART_LOOKUP_WAIT;
            while cl.node_known_dead(n.node) {
                if n.restarts >= n.max_restarts {
                    return Err(Error::ActorDied {
                        actor: short(n.actor),
                        reason: format!(
                            "the node hosting {name:?} died and it has no restarts left"
                        ),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(Error::ActorDied {
                        actor: short(n.actor),
                        reason: format!(
                            "the node hosting {name:?} died and no restarted incarnation was recorded within {RESTART_LOOKUP_WAIT:?}"
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
                n = crate::control::lookup_named(self, name)?;
            }
        }
        let class: &'static str =
            registry::class_name(&n.class).ok_or_else(|| Error::UnknownFunction {
                name: n.class.clone(),
                why: "actor class not compiled into this node's binary".into(),
            })?;
        if let Some(host) = self.actors.get(&n.actor) {
            return Ok(ActorCore::local(n.actor, class, host.clone()));
        }
        if n.node == self.node || self.cluster.get().is_none() {
            return Err(Error::ActorNotFound(name.to_string()));
        }
        let created = Entry::ready(ObjectId::random(), Bytes::new());
        Ok(ActorCore::remote(n.actor, class, NodeId(n.node), created))
    }

    /// Cancels the task producing `id`, here or on the node it was sent to: its ref fails with `Cancelled` at once.
    /// A task that has not started never runs; a running one finishes, but its result is discarded (threads cannot
    /// be interrupted safely).
    pub(crate) fn cancel(&self, id: ObjectId) -> bool {
        if let Some(c) = self.cancels.get(&CancelKey::Local(id)) {
            let (flag, task) = (c.0.clone(), c.1);
            drop(c);
            flag.store(true, Ordering::Release);
            if let Some(e) = self.objects.lookup(id) {
                e.complete(Err(Error::Cancelled));
            }
            // A task still waiting for resources need not wait for them only to be skipped.
            self.local.cancel(task);
            return true;
        }
        self.cluster.get().is_some_and(|cl| cl.cancel(id))
    }

    /// The owner `owner` cancelled its call `call` sent here: skip it if it has not started. A cancel that arrives
    /// before its task is remembered for a while (they travel in separate messages).
    pub(crate) fn cancel_remote(&self, owner: u128, call: u64) {
        let key = CancelKey::Remote(owner, call);
        if let Some(c) = self.cancels.get(&key) {
            let (flag, task) = (c.0.clone(), c.1);
            drop(c);
            flag.store(true, Ordering::Release);
            self.local.cancel(task);
            return;
        }
        let now = Instant::now();
        let mut early = self.early_cancels.lock();
        early.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        early.insert(key, now);
        self.early_cancel_count
            .store(early.len(), Ordering::Release);
    }

    fn take_early_cancel(&self, key: &CancelKey) -> bool {
        let mut early = self.early_cancels.lock();
        let found = early.remove(key).is_some();
        self.early_cancel_count
            .store(early.len(), Ordering::Release);
        found
    }
}

/// How long a name lookup waits for the directory to name a restarted actor's new node, once the node it names
/// is known dead (the creator re-places the actor when it learns of the death, then records the move).
pub(crate) const RESTART_LOOKUP_WAIT: Duration = Duration::from_secs(10);

/// An actor's `max_concurrency` as it travels: at least 1.
fn concurrency(opts: &ActorOptions) -> u32 {
    u32::try_from(opts.max_concurrency.max(1)).unwrap_or(u32::MAX)
}

/// The entries of the ref arguments (whose leases the call's decoding holds).
pub(crate) fn arg_entries(args: &[Arg]) -> impl Iterator<Item = &Arc<Entry>> {
    args.iter().filter_map(|a| match &a.0 {
        ArgKind::Ref(r) => Some(&r.entry),
        ArgKind::Value(_) => None,
    })
}

/// Resolves arguments to their bytes, waiting for referenced objects (releasing the CPU slot while waiting).
pub(crate) fn resolve_args(args: &[Arg]) -> Result<Vec<Bytes>> {
    args.iter()
        .map(|a| match &a.0 {
            ArgKind::Value(b) => Ok(b.clone()),
            ArgKind::Ref(r) => wait_blocking(r.used(), None),
        })
        .collect()
}

/// Runs user code, turning a panic into a `TaskFailed` carrying the panic message.
fn catch_task(name: &str, node: u128, f: impl FnOnce() -> Result<Bytes>) -> Result<Bytes> {
    catch_task_named(|| name.to_string(), node, f)
}

/// As `catch_task`, with the task's name built only if it failed (the name is not free for actor methods).
fn catch_task_named(
    name: impl FnOnce() -> String,
    node: u128,
    f: impl FnOnce() -> Result<Bytes>,
) -> Result<Bytes> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(task_error(name, node, e)),
        Err(panic) => Err(panic_error(name, node, panic)),
    }
}

/// The error a task or method returned, as a `TaskFailed` (one that already is, from a nested task, is kept).
pub(crate) fn task_error(name: impl FnOnce() -> String, node: u128, e: Error) -> Error {
    match e {
        e @ Error::TaskFailed { .. } => e,
        e => Error::TaskFailed {
            task: name(),
            node: short(node),
            message: e.to_string(),
        },
    }
}

/// A panic of user code, as a `TaskFailed` carrying the panic message.
pub(crate) fn panic_error(
    name: impl FnOnce() -> String,
    node: u128,
    panic: Box<dyn Any + Send>,
) -> Error {
    let message = if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked with a non-string payload".to_string()
    };
    Error::TaskFailed {
        task: name(),
        node: short(node),
        message,
    }
}

pub(crate) fn short(id: u128) -> String {
    format!("{:012x}", id >> 80)
}

pub(crate) enum ActorMsg {
    Call {
        method: u32,
        args: Vec<Arg>,
        done: Done,
    },
}

/// An actor hosted by this process: its thread owns the actor's state. With `max_concurrency` 1 it runs calls one
/// at a time, in the order they arrive on its mailbox; above 1 the thread serves calls concurrently
/// (`crate::concurrent`).
pub(crate) struct ActorHost {
    pub(crate) id: u128,
    pub(crate) class: &'static ActorClassEntry,
    pub(crate) name: Option<String>,
    tx: flume::Sender<ActorMsg>,
    /// Calls that may run at once (at least 1).
    pub(crate) max_concurrency: usize,
    /// The actor's thread: a concurrent actor's thread parks between events, and a new call wakes it.
    thread: OnceLock<std::thread::Thread>,
    /// Why the actor is dead, once it is. Checked before each call so `kill` takes effect at the next call.
    dead: Mutex<Option<String>>,
    killed: AtomicBool,
    pub(crate) calls: AtomicU64,
    /// What the actor holds from the node's queue (`num_cpus`, `num_gpus`, custom resources) while alive: asked
    /// for by the actor's thread before its constructor runs, dropped when it dies.
    demand: ResourceSet,
    lease: Mutex<Option<crate::node_queue::Lease>>,
    /// The placement group the actor was placed in: removing the group kills it.
    pub(crate) pg: Option<u128>,
    /// The node (driver or worker) that created the actor: unless detached, the actor dies with it.
    pub(crate) owner: u128,
    pub(crate) detached: bool,
}

/// How an actor is hosted: its name, what it holds, whose it is, and how many calls it may run at once.
struct HostTerms {
    name: Option<String>,
    /// Resources held while alive (empty in a placement group, whose bundle holds them).
    demand: ResourceSet,
    pg: Option<u128>,
    owner: u128,
    detached: bool,
    max_concurrency: u32,
}

impl ActorHost {
    fn spawn(
        rt: Arc<Runtime>,
        id: u128,
        class: &'static ActorClassEntry,
        args: Vec<Arg>,
        terms: HostTerms,
    ) -> Result<Arc<Self>> {
        let HostTerms {
            name,
            demand,
            pg,
            owner,
            detached,
            max_concurrency,
        } = terms;
        let (tx, rx) = flume::unbounded::<ActorMsg>();
        let host = Arc::new(ActorHost {
            id,
            class,
            name,
            tx,
            // 0 (from an old or hostile peer) means the default: one at a time.
            max_concurrency: (max_concurrency as usize).max(1),
            thread: OnceLock::new(),
            dead: Mutex::new(None),
            killed: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            demand,
            lease: Mutex::new(None),
            pg,
            owner,
            detached,
        });
        let h = host.clone();
        let thread = std::thread::Builder::new()
            .name(format!("actor-{}", short(id)))
            .spawn(move || h.run(rt, args, rx))
            .map_err(|e| Error::Cluster(format!("cannot start the actor's thread: {e}")))?;
        let _ = host.thread.set(thread.thread().clone());
        Ok(host)
    }

    fn run(self: Arc<Self>, rt: Arc<Runtime>, args: Vec<Arg>, rx: flume::Receiver<ActorMsg>) {
        // The actor starts at once and holds its resources from when they are free (at once, unless placement
        // sent it here on a stale view): waiting for them could wait for good (a task here blocked on this
        // actor, or the actor that holds them living as long), so a stale placement over-commits the node for a
        // while instead, and tasks queued after the lease wait for it.
        if !self.demand.is_empty() {
            let host = Arc::downgrade(&self);
            let asked = rt.local.lease(self.id, self.demand.clone(), move |lease| {
                if let Some(h) = host.upgrade()
                    && h.is_alive()
                {
                    *h.lease.lock() = Some(lease);
                }
                // Dead meanwhile: the lease is dropped here, and what it held goes back.
            });
            if let Err(e) = asked {
                self.die(format!("its resources cannot be held on this node: {e}"));
                self.drain(&rx);
                return;
            }
        }
        let constructed = resolve_args(&args).and_then(|resolved| {
            let mut state: Option<Box<dyn Any + Send>> = None;
            let name = self.class.name;
            catch_task(name, rt.node, || {
                state = Some((self.class.construct)(Args::new(resolved))?);
                Ok(Bytes::new())
            })
            .map(|_| state)
        });
        let mut state = match constructed {
            Ok(Some(s)) => s,
            Ok(None) => unreachable!("constructor returned Ok without a state"),
            Err(e) => {
                self.die(format!("its constructor failed: {e}"));
                self.drain(&rx);
                return;
            }
        };
        if self.max_concurrency > 1 {
            crate::concurrent::serve(&self, &rt, &mut state, &rx);
        } else {
            // Spin briefly before blocking: a synchronous caller's next call comes within microseconds.
            let next = || {
                let mut msg = None;
                crate::spin::until(|| {
                    msg = rx.try_recv().ok();
                    msg.is_some() || rx.is_disconnected()
                });
                msg.map_or_else(|| rx.recv(), Ok)
            };
            while let Ok(msg) = next() {
                if !self.is_alive() {
                    self.fail(msg);
                    continue;
                }
                let ActorMsg::Call { method, args, done } = msg;
                self.run_exclusive(&rt, state.as_mut(), method, args, done);
            }
        }
        drop(state);
    }

    /// Runs one call with the state to itself, on this thread.
    pub(crate) fn run_exclusive(
        &self,
        rt: &Runtime,
        state: &mut (dyn Any + Send),
        method: u32,
        args: Vec<Arg>,
        done: Done,
    ) {
        let result = self.method(method).and_then(|m| {
            resolve_args(&args).and_then(|resolved| {
                crate::object::clear_contained();
                crate::object::decoding(arg_entries(&args), || {
                    catch_task_named(
                        || self.method_name(m),
                        rt.node,
                        || (m.invoke)(state, Args::new(resolved)),
                    )
                })
            })
        });
        self.calls.fetch_add(1, Ordering::Relaxed);
        done.complete_holding(result, crate::object::take_contained());
    }

    /// Runs one call of a plain `&self` method through a shared reference (on this thread, whichever it is).
    pub(crate) fn run_shared(
        &self,
        rt: &Runtime,
        state: &(dyn Any + Send),
        m: &'static registry::MethodEntry,
        shared: registry::SharedInvoke,
        args: Vec<Arg>,
        done: Done,
    ) {
        let result = resolve_args(&args).and_then(|resolved| {
            crate::object::clear_contained();
            crate::object::decoding(arg_entries(&args), || {
                catch_task_named(
                    || self.method_name(m),
                    rt.node,
                    || shared(state, Args::new(resolved)),
                )
            })
        });
        self.calls.fetch_add(1, Ordering::Relaxed);
        done.complete_holding(result, crate::object::take_contained());
    }

    /// Method number `method` of this actor's class.
    pub(crate) fn method(&self, method: u32) -> Result<&'static registry::MethodEntry> {
        self.class
            .methods
            .get(method as usize)
            .ok_or_else(|| Error::UnknownFunction {
                name: format!("{}#{method}", self.class.name),
                why: "no such method".into(),
            })
    }

    /// `Class::method`, as failures name it.
    pub(crate) fn method_name(&self, m: &registry::MethodEntry) -> String {
        format!("{}::{}", self.class.name, m.name)
    }

    /// Why calls to this dead actor fail.
    pub(crate) fn error(&self) -> Error {
        let reason = self
            .dead
            .lock()
            .clone()
            .unwrap_or_else(|| "it was killed".into());
        Error::ActorDied {
            actor: short(self.id),
            reason,
        }
    }

    pub(crate) fn fail(&self, msg: ActorMsg) {
        let ActorMsg::Call { done, .. } = msg;
        done.complete(Err(self.error()));
    }

    fn drain(&self, rx: &flume::Receiver<ActorMsg>) {
        // Keep failing calls until every sender is gone, so no caller ever waits on a dead actor.
        while let Ok(msg) = rx.recv() {
            self.fail(msg);
        }
    }

    fn die(&self, reason: String) {
        let mut d = self.dead.lock();
        if d.is_none() {
            *d = Some(reason);
            // Tasks queued here may start on what the actor held.
            drop(self.lease.lock().take());
            // A dead actor's name is free again, as in Ray.
            if let (Some(name), Ok(rt)) = (&self.name, current()) {
                rt.named.remove(name);
                crate::control::unregister_named(&rt, name, self.id);
            }
        }
        self.killed.store(true, Ordering::Release);
    }

    pub(crate) fn kill(&self, reason: &str) {
        self.die(reason.to_string());
    }

    pub(crate) fn is_alive(&self) -> bool {
        !self.killed.load(Ordering::Acquire)
    }

    pub(crate) fn call(&self, method: u32, args: Vec<Arg>, done: Done) {
        if self.killed.load(Ordering::Acquire) {
            done.complete(Err(self.error()));
            return;
        }
        if let Err(flume::SendError(msg)) = self.tx.send(ActorMsg::Call { method, args, done }) {
            self.fail(msg);
            return;
        }
        // A concurrent actor's thread parks while it waits for calls, futures and helper threads alike; an
        // unpark after the send cannot be lost (it leaves a token if the thread is not parked yet).
        if self.max_concurrency > 1
            && let Some(t) = self.thread.get()
        {
            t.unpark();
        }
    }
}

/// The untyped part of an actor handle: which actor, and how to reach it.
#[derive(Clone)]
pub struct ActorCore {
    inner: Arc<ActorCoreInner>,
}

enum Location {
    Local(Arc<ActorHost>),
    Remote(Arc<RemoteActor>),
}

struct ActorCoreInner {
    id: u128,
    class: &'static str,
    location: Location,
}

/// An actor on another node, as one family of handles sees it: where its current incarnation lives, and (on the
/// creator's handles of an actor with `max_restarts`) how to build it again.
pub(crate) struct RemoteActor {
    pub(crate) id: u128,
    at: Mutex<Incarnation>,
    pub(crate) restart: Option<Mutex<RestartSpec>>,
    /// Killed through this handle family: later calls fail here at once instead of racing the kill message.
    killed: AtomicBool,
}

/// One life of a remote actor.
struct Incarnation {
    node: NodeId,
    /// Completes once the actor exists there (calls wait for it).
    created: Arc<Entry>,
    /// This handle family's identity as a caller of this incarnation: the host orders calls per (actor, caller) by
    /// `seq`, so a new incarnation starts a new caller at 0.
    caller: u128,
    seq: u64,
}

/// What the creator keeps to restart an actor whose node died.
pub(crate) struct RestartSpec {
    pub(crate) spec: CreateW,
    pub(crate) args: Vec<Arg>,
    pub(crate) function: u64,
    pub(crate) res: crate::options::Resources,
    pub(crate) strategy: crate::options::Strategy,
    pub(crate) left: u32,
    pub(crate) done: u32,
    pub(crate) task_retries: u32,
}

/// A call ready to send to a remote actor's current incarnation.
pub(crate) struct Route {
    pub(crate) node: NodeId,
    pub(crate) created: Arc<Entry>,
    pub(crate) caller: u128,
    pub(crate) seq: u64,
}

impl RemoteActor {
    pub(crate) fn new(
        id: u128,
        node: NodeId,
        created: Arc<Entry>,
        restart: Option<RestartSpec>,
    ) -> Arc<Self> {
        Arc::new(RemoteActor {
            id,
            at: Mutex::new(Incarnation {
                node,
                created,
                caller: rand_u128(),
                seq: 0,
            }),
            restart: restart.map(Mutex::new),
            killed: AtomicBool::new(false),
        })
    }

    pub(crate) fn node(&self) -> NodeId {
        self.at.lock().node
    }

    /// Where the next call goes, with its place in this handle family's order.
    pub(crate) fn route(&self) -> Route {
        let mut at = self.at.lock();
        let seq = at.seq;
        at.seq += 1;
        Route {
            node: at.node,
            created: at.created.clone(),
            caller: at.caller,
            seq,
        }
    }

    /// Moves the handle family to a new incarnation on `node`.
    pub(crate) fn moved(&self, node: NodeId, created: Arc<Entry>) {
        *self.at.lock() = Incarnation {
            node,
            created,
            caller: rand_u128(),
            seq: 0,
        };
    }

    /// Moves the handle family to the incarnation on `node` (which exists: the directory recorded it) unless it has
    /// already left `dead`.
    pub(crate) fn moved_from(&self, dead: NodeId, node: NodeId) {
        let mut at = self.at.lock();
        if at.node == dead {
            *at = Incarnation {
                node,
                created: Entry::ready(ObjectId::random(), Bytes::new()),
                caller: rand_u128(),
                seq: 0,
            };
        }
    }

    /// Retries a call gets after a restart (0 when the actor cannot restart).
    pub(crate) fn task_retries(&self) -> u32 {
        self.restart
            .as_ref()
            .map(|r| r.lock().task_retries)
            .unwrap_or(0)
    }

    fn created(&self) -> Arc<Entry> {
        self.at.lock().created.clone()
    }
}

impl std::fmt::Debug for ActorCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Actor({} {})", self.inner.class, short(self.inner.id))
    }
}

impl ActorCore {
    fn new(id: u128, class: &'static str, location: Location) -> Self {
        ActorCore {
            inner: Arc::new(ActorCoreInner {
                id,
                class,
                location,
            }),
        }
    }

    fn local(id: u128, class: &'static str, host: Arc<ActorHost>) -> Self {
        Self::new(id, class, Location::Local(host))
    }

    fn remote(id: u128, class: &'static str, node: NodeId, created: Arc<Entry>) -> Self {
        Self::new(
            id,
            class,
            Location::Remote(RemoteActor::new(id, node, created, None)),
        )
    }

    /// The actor's id.
    pub fn id(&self) -> u128 {
        self.inner.id
    }

    /// The actor's class name.
    pub fn class(&self) -> &'static str {
        self.inner.class
    }

    /// Calls method number `method` (declaration order) with `args`. Never fails here: a dead actor or a bad
    /// argument fails the returned ref.
    pub fn call<R>(&self, method: u32, args: Result<Vec<Arg>>) -> ObjectRef<R> {
        let rt = match current() {
            Ok(rt) => rt,
            Err(e) => return failed_ref(e),
        };
        let (entry, inner) = rt.new_owned(ObjectId::for_task_return(rand_u128(), 0));
        let args = match args {
            Ok(a) => a,
            Err(e) => {
                entry.complete(Err(e));
                return ObjectRef::from_inner(inner);
            }
        };
        match &self.inner.location {
            Location::Local(host) => host.call(method, args, Done::Entry(entry)),
            Location::Remote(ra) if ra.killed.load(Ordering::Acquire) => {
                entry.complete(Err(Error::ActorDied {
                    actor: short(ra.id),
                    reason: "it was killed with oxray::kill".into(),
                }))
            }
            Location::Remote(ra) => match rt.cluster.get() {
                Some(cl) => {
                    let retries = ra.task_retries();
                    cl.call_remote(&rt, ra, method, args, entry, retries);
                }
                None => entry.complete(Err(Error::NotInitialized)),
            },
        }
        ObjectRef::from_inner(inner)
    }

    pub(crate) fn kill(&self) {
        match &self.inner.location {
            Location::Local(host) => host.kill("it was killed with oxray::kill"),
            Location::Remote(ra) => {
                ra.killed.store(true, Ordering::Release);
                // A killed actor is not restarted.
                if let Some(r) = &ra.restart {
                    r.lock().left = 0;
                }
                if let Ok(rt) = current()
                    && let Some(cl) = rt.cluster.get()
                {
                    cl.send_oneway(
                        &rt,
                        ra.node(),
                        kind::KILL_ACTOR,
                        wire::id_bytes(self.inner.id),
                    );
                }
            }
        }
    }

    /// The node hosting the actor (this process's node for a local one).
    pub(crate) fn node(&self) -> u128 {
        match &self.inner.location {
            Location::Local(_) => current().map(|rt| rt.node).unwrap_or(0),
            Location::Remote(ra) => ra.node().0,
        }
    }

    /// A handle of class `class` to actor `id` on `node`, read out of a value on this node. Calls through it are
    /// ordered among themselves (it is a caller of its own).
    pub(crate) fn resolve(id: u128, node: u128, class: &'static str) -> Result<ActorCore> {
        let rt = current()?;
        if let Some(host) = rt.actors.get(&id) {
            return Ok(ActorCore::local(id, class, host.clone()));
        }
        let created = Entry::new(ObjectId::random());
        if node == rt.node || node == 0 || rt.cluster.get().is_none() {
            created.complete(Err(Error::ActorDied {
                actor: short(id),
                reason: "it no longer exists on the node that hosted it".into(),
            }));
        } else {
            created.complete(Ok(Bytes::new()));
        }
        Ok(ActorCore::remote(id, class, NodeId(node), created))
    }

    pub(crate) fn is_alive(&self) -> bool {
        match &self.inner.location {
            Location::Local(host) => host.is_alive(),
            Location::Remote(ra) => {
                !ra.killed.load(Ordering::Acquire)
                    && !matches!(ra.created().try_value(), Some(Err(_)))
                    && current()
                        .ok()
                        .and_then(|rt| rt.cluster.get().map(|cl| cl.node_alive(ra.node().0)))
                        .unwrap_or(false)
            }
        }
    }
}

/// Runs an async control request to completion from any thread (blocking the caller, never an I/O thread).
pub(crate) fn block_on_io<T: Send + 'static>(
    tokio: &tokio::runtime::Handle,
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    tokio.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| Error::Cluster("the I/O runtime stopped".into()))?
}

/// A ref that is already failed, for errors found before anything was submitted.
pub(crate) fn failed_ref<R>(e: Error) -> ObjectRef<R> {
    let entry = Entry::new(ObjectId::random());
    entry.complete(Err(e));
    ObjectRef::from_inner(RefInner::borrowed(entry, 0))
}

/// Waits until `num_returns` of `refs` are ready or `timeout` passes; returns the first `num_returns` (at most)
/// ready indices, in order.
pub(crate) fn wait_indices(
    entries: &[Arc<Entry>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> Vec<usize> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let want = num_returns.min(entries.len());
    let mut ready: Vec<bool> = entries.iter().map(|e| e.is_ready()).collect();
    let satisfied = |ready: &[bool]| ready.iter().filter(|r| **r).count() >= want;
    // A bounded back-off poll: it keeps entries free of multi-object waiter lists, and costs at most 2 ms of
    // extra latency per round.
    let poll = |ready: &mut Vec<bool>| {
        let mut sleep = Duration::from_micros(20);
        loop {
            for (i, e) in entries.iter().enumerate() {
                if !ready[i] && e.is_ready() {
                    ready[i] = true;
                }
            }
            if satisfied(ready) {
                break;
            }
            if let Some(d) = deadline
                && Instant::now() >= d
            {
                break;
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(2));
        }
    };
    let no_wait = satisfied(&ready) || timeout.is_some_and(|t| t.is_zero());
    match current() {
        // The CPU is lent once for the whole wait, not per nap: each lend and take-back goes through the queue.
        Ok(rt) if !no_wait => rt.local.blocking(|| poll(&mut ready)),
        _ => poll(&mut ready),
    }
    ready
        .iter()
        .enumerate()
        .filter(|(_, is)| **is)
        .map(|(i, _)| i)
        .take(want)
        .collect()
}

/// Wakes the thread that polls a future in [`poll_here`].
struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Drives `f` to completion on this thread, parking between polls.
pub(crate) fn poll_here<F: std::future::Future>(f: F) -> F::Output {
    let waker = std::task::Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        // A wake between the poll and here leaves the token set, so this returns at once.
        std::thread::park();
    }
}
