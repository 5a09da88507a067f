//! # oxray: typed remote tasks and actors
//!
//! oxray runs Rust functions and stateful actors across a cluster of processes, Ray-style, with the types checked by
//! the compiler. `oxray::init()` runs the whole system inside your process (the embedded default);
//! any binary built on oxray can also become a cluster node.
//!
//! ```
//! #[oxray::remote]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! pub struct Counter {
//!     total: i64,
//! }
//!
//! #[oxray::actor]
//! impl Counter {
//!     pub fn new(start: i64) -> Self {
//!         Counter { total: start }
//!     }
//!     pub fn add(&mut self, n: i64) -> i64 {
//!         self.total += n;
//!         self.total
//!     }
//! }
//!
//! fn main() -> oxray::Result<()> {
//!     oxray::init()?;
//!     let sum = add::remote(1, 2)?;                 // an ObjectRef<i64>, returned at once
//!     let twice = add::remote(&sum, &sum)?;         // refs as arguments are resolved before the task runs
//!     assert_eq!(twice.get()?, 6);
//!
//!     let counter = Counter::remote(10)?;           // an ActorHandle<Counter>
//!     let refs: Vec<_> = (1..=3).map(|n| counter.add(n)).collect();
//!     assert_eq!(oxray::get_all(&refs)?, vec![11, 13, 16]); // calls from one caller run in order
//!     Ok(())
//! }
//! ```
//!
//! ## Map of the crate
//! - [`remote`] and [`actor`]: the attributes that register functions and actor classes (at link time) and generate
//!   typed `remote` entry points.
//! - [`ObjectRef`]: a typed future value; `get`, `get_timeout`, `get_async`, and `view` (zero-copy archived form).
//! - [`ActorHandle`]: a typed handle whose methods submit calls.
//! - [`put`], [`get_all`], [`wait`], [`cancel`], [`kill`], [`get_actor`]: the module-level functions Ray users know.
//! - [`TaskOptions`], [`ActorOptions`]: resources, retries, names, lifetimes, strategies.
//! - [`Error`]: every failure as a typed value.

// Lets the macros' `::oxray::...` paths resolve inside this crate too (the benchmark functions use them).
extern crate self as oxray;

mod actor;
mod arg;
mod batch;
pub mod bench;
mod cluster;
mod concurrent;
mod control;
mod error;
pub mod node;
mod node_queue;
mod object;
mod options;
pub mod pg;
mod pool;
mod registry;
mod runtime;
mod spin;
pub mod state;
mod value;
mod wire;

use std::sync::Arc;
use std::time::Duration;

/// mimalloc as the global allocator (feature `mimalloc`, on by default). Puts, refs and calls allocate and free
/// small blocks on different threads (a worker allocates, the I/O thread frees when a release arrives), which glibc's
/// malloc serves slowly: it took about a third of a node's instructions on the small-object rows.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use actor::{ActorClass, ActorHandle};
pub use arg::{Arg, IntoArg};
pub use cluster::NodeSettings;
pub use control::kv;
pub use error::{Error, Result};
pub use node::{connect, run_node_if_requested};
pub use object::{ObjectId, ObjectRef, ObjectView};
pub use options::{ActorOptions, Resources, Strategy, TaskOptions};
pub use oxray_macros::{actor, remote};
pub use oxray_objstore::StoreConfig;
pub use runtime::{ActorCore, Config};
pub use value::Value;

/// Starts oxray in this process.
///
/// With `OXRAY_ADDRESS` and `OXRAY_TOKEN` set, it joins that cluster as a driver (see [`connect`]); otherwise it
/// starts the embedded default: the whole system in this process, with one CPU slot per core.
/// Calling it again is harmless (the first runtime stays).
pub fn init() -> Result<()> {
    if is_initialized() {
        return Ok(());
    }
    if let (Ok(addr), Ok(token)) = (std::env::var("OXRAY_ADDRESS"), std::env::var("OXRAY_TOKEN")) {
        return connect(&addr, &token);
    }
    init_with(Config::default())
}

/// As [`init`], with explicit settings.
pub fn init_with(config: Config) -> Result<()> {
    let rt = runtime::install(config)?;
    if rt.cluster.get().is_none() {
        runtime::start_embedded_gcs(&rt)?;
    }
    Ok(())
}

/// Whether `init` (or `connect`) has been called.
pub fn is_initialized() -> bool {
    runtime::is_initialized()
}

/// Stops this process's runtime: queued tasks are dropped and actors stop. A later `init` starts afresh.
pub fn shutdown() {
    runtime::uninstall();
}

/// Stores a value and returns a ref to it, to pass to many tasks without copying it into each call.
///
/// A value of at most [`Config::carry_max`] archive bytes (64 by default) travels with its refs instead: such a ref
/// is never fetched, and the object outlives the process that put it.
///
/// ```
/// oxray::init()?;
/// let big = oxray::put(&vec![1.5f32; 1000])?;
/// assert_eq!(big.view()?.len(), 1000);          // read in place, no deserialization
/// assert_eq!(big.get()?[999], 1.5);
/// # Ok::<(), oxray::Error>(())
/// ```
pub fn put<T: Value>(value: &T) -> Result<ObjectRef<T>> {
    runtime::current()?.put(value)
}

/// Gets every ref's value, in order; fails with the first error.
///
/// ```
/// oxray::init()?;
/// let refs = vec![oxray::put(&1u32)?, oxray::put(&2u32)?];
/// assert_eq!(oxray::get_all(&refs)?, vec![1, 2]);
/// # Ok::<(), oxray::Error>(())
/// ```
pub fn get_all<T: Value>(refs: &[ObjectRef<T>]) -> Result<Vec<T>> {
    runtime::wait_in_order(refs.iter().map(|r| r.inner.used()));
    refs.iter().map(ObjectRef::get).collect()
}

/// Async form of [`get_all`].
pub async fn get_all_async<T: Value>(refs: &[ObjectRef<T>]) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        out.push(r.get_async().await?);
    }
    Ok(out)
}

/// Waits until `num_returns` of `refs` are ready (value or error) or `timeout` passes.
///
/// Returns `(ready, not_ready)`, each in the order of `refs`, as Ray's `ray.wait` does.
///
/// ```
/// use std::time::Duration;
/// oxray::init()?;
/// let refs = vec![oxray::put(&1u8)?, oxray::put(&2u8)?];
/// let (ready, rest) = oxray::wait(&refs, 1, Some(Duration::from_secs(1)));
/// assert_eq!((ready.len(), rest.len()), (1, 1));
/// # Ok::<(), oxray::Error>(())
/// ```
pub fn wait<T>(
    refs: &[ObjectRef<T>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>) {
    // The common case, a loop that waits for one ref at a time while results stream in: the first `num_returns`
    // ready refs are already there, found in order without scanning past them (a full scan per call made a wait
    // over 1,000 refs one by one quadratic in lock-taking checks).
    let want = num_returns.min(refs.len());
    let mut ready = Vec::with_capacity(want);
    for (i, r) in refs.iter().enumerate() {
        if ready.len() == want {
            break;
        }
        if r.inner.used().is_ready() {
            ready.push(i);
        }
    }
    if ready.len() < want {
        let entries: Vec<_> = refs.iter().map(|r| r.inner.used().clone()).collect();
        ready = runtime::wait_indices(&entries, num_returns, timeout);
    }
    let mut rest = Vec::with_capacity(refs.len() - ready.len());
    let mut next = ready.iter().copied().peekable();
    for (i, r) in refs.iter().enumerate() {
        if next.peek() == Some(&i) {
            next.next();
        } else {
            rest.push(r.clone());
        }
    }
    (ready.into_iter().map(|i| refs[i].clone()).collect(), rest)
}

/// Cancels the task that produces `r`: if it has not started, it never runs; either way `r` fails with
/// [`Error::Cancelled`]. Returns whether a pending or running task was found.
pub fn cancel<T>(r: &ObjectRef<T>) -> bool {
    runtime::current()
        .map(|rt| rt.cancel(r.id()))
        .unwrap_or(false)
}

/// Kills an actor: calls not yet started fail with [`Error::ActorDied`]; a call already running finishes.
pub fn kill<A: ActorClass>(actor: &ActorHandle<A>) {
    actor.core().kill();
}

/// Looks up a named actor (created with `ActorOptions::name`). Fails if there is none, or if it is of another class.
pub fn get_actor<A: ActorClass>(name: &str) -> Result<ActorHandle<A>> {
    let rt = runtime::current()?;
    let core = rt.lookup_actor(name)?;
    if core.class() != A::NAME {
        return Err(Error::InvalidArgument(format!(
            "actor {name:?} is a {}, not a {}",
            core.class(),
            A::NAME
        )));
    }
    Ok(ActorHandle::from_core(core))
}

/// A snapshot of this process's node: load, actors, unfinished tasks, owned objects.
pub fn node_state() -> Result<state::NodeState> {
    let rt = runtime::current()?;
    Ok(state::snapshot(&rt, None))
}

/// What the macros expand to. Not a public API: names here change without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{ActorClassEntry, Args, FunctionEntry, LocalCall, MethodEntry};
    pub use crate::value::{encode, fnv1a};
    pub use bytes::Bytes;
    pub use inventory;

    use super::*;

    /// Submits a registered function.
    pub fn submit_task<R>(
        name: &'static str,
        sig: u64,
        args: Result<Vec<Arg>>,
        opts: &TaskOptions,
    ) -> Result<ObjectRef<R>> {
        let rt = runtime::current()?;
        rt.submit_task(name, sig, args?, opts)
    }

    /// Creates an actor of a registered class.
    pub fn create_actor<A: ActorClass>(
        args: Result<Vec<Arg>>,
        opts: &ActorOptions,
    ) -> Result<ActorHandle<A>> {
        let rt = runtime::current()?;
        let core = rt.create_actor(A::NAME, A::SIG, args?, opts)?;
        Ok(ActorHandle::from_core(core))
    }

    /// Downcasts an actor's state (the macro knows the concrete type).
    pub fn state<A: 'static>(state: &mut (dyn std::any::Any + Send)) -> Result<&mut A> {
        state
            .downcast_mut::<A>()
            .ok_or_else(|| Error::Serialization("actor state has the wrong type".into()))
    }

    /// Downcasts an actor's state for a `&self` method.
    pub fn state_ref<A: 'static>(state: &(dyn std::any::Any + Send)) -> Result<&A> {
        state
            .downcast_ref::<A>()
            .ok_or_else(|| Error::Serialization("actor state has the wrong type".into()))
    }

    /// Asks whether an actor type is `Sync`, by method resolution on a concrete type: with both `ViewSync` and
    /// `ViewNotSync` in scope, `(&SyncProbe(state)).sync_view()` resolves to `ViewSync` (no auto-ref needed) when
    /// `A: Sync`, and to `ViewNotSync` (one auto-ref) otherwise. The macro knows the concrete type, so this needs
    /// no specialization and no `Sync` bound on actor types that never run calls in parallel.
    #[derive(Debug)]
    pub struct SyncProbe<'a, A>(pub &'a A);

    /// The `Sync` arm of [`SyncProbe`].
    pub trait ViewSync<'a> {
        /// The state as a `Sync` object.
        fn sync_view(&self) -> Option<&'a (dyn std::any::Any + Send + Sync)>;
    }

    impl<'a, A: std::any::Any + Send + Sync> ViewSync<'a> for SyncProbe<'a, A> {
        fn sync_view(&self) -> Option<&'a (dyn std::any::Any + Send + Sync)> {
            Some(self.0)
        }
    }

    /// The fallback arm of [`SyncProbe`], for state types that are not `Sync`.
    pub trait ViewNotSync<'a> {
        /// Always `None`: the state may not be shared between threads.
        fn sync_view(&self) -> Option<&'a (dyn std::any::Any + Send + Sync)>;
    }

    impl<'a, A> ViewNotSync<'a> for &SyncProbe<'a, A> {
        fn sync_view(&self) -> Option<&'a (dyn std::any::Any + Send + Sync)> {
            None
        }
    }

    /// Boxes a freshly constructed actor state.
    pub fn boxed<A: Send + 'static>(a: A) -> Box<dyn std::any::Any + Send> {
        Box::new(a)
    }

    /// Runs an async actor method to completion on the calling (actor) thread.
    pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
        match runtime::current() {
            Ok(rt) => {
                // Polled right here, inside the runtime's context so tokio timers and sockets work (the runtime's
                // own threads drive them). Cheaper than `Handle::block_on`, which matters for methods that finish
                // without waiting: most calls to an async actor.
                let _context = rt.tokio.enter();
                crate::runtime::poll_here(f)
            }
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f),
        }
    }

    /// Keeps `Arc` reachable from macro output without a direct dependency.
    pub type Shared<T> = Arc<T>;
}
