//! Options for tasks and actors, with the names a Ray user expects.

use std::collections::BTreeMap;

/// Where a task or actor may run.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum Strategy {
    /// Local first, spilling to other nodes when this one is busy or lacks resources.
    #[default]
    Default,
    /// Spread over nodes as evenly as possible.
    Spread,
    /// On the given node (by id as shown in `oxray status`); if `soft`, elsewhere when that node cannot take it.
    NodeAffinity {
        /// The node's id.
        node: u128,
        /// Whether another node may be used when this one is unavailable.
        soft: bool,
    },
    /// Inside a bundle of a placement group (`bundle: None` means any bundle).
    PlacementGroup {
        /// The placement group's id.
        group: u128,
        /// The bundle index, or any.
        bundle: Option<usize>,
    },
}

/// Resource demand and placement of a task or actor.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    /// CPUs (fractions allowed). Tasks default to 1, actors to 0 while running (as in Ray).
    pub num_cpus: f64,
    /// GPUs (fractions allowed).
    pub num_gpus: f64,
    /// Memory in bytes.
    pub memory: u64,
    /// Custom named resources.
    pub custom: BTreeMap<String, f64>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            num_cpus: 1.0,
            num_gpus: 0.0,
            memory: 0,
            custom: BTreeMap::new(),
        }
    }
}

/// Options of one remote function call: `my_fn::remote_with(&TaskOptions::new().num_cpus(2.0), ...)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskOptions {
    /// Resources the task needs while it runs.
    pub resources: Resources,
    /// Times to re-run the task if its worker or node dies (and, with `retry_exceptions`, if it fails).
    pub max_retries: u32,
    /// Also retry when the task itself panics or returns an error. Only for idempotent tasks.
    pub retry_exceptions: bool,
    /// A name shown in `oxray list tasks`.
    pub name: Option<String>,
    /// Where the task may run.
    pub strategy: Strategy,
}

impl TaskOptions {
    /// The defaults: 1 CPU, no retries, default strategy.
    pub fn new() -> Self {
        TaskOptions::default()
    }
    /// Sets the CPUs the task needs.
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.resources.num_cpus = n;
        self
    }
    /// Sets the GPUs the task needs.
    pub fn num_gpus(mut self, n: f64) -> Self {
        self.resources.num_gpus = n;
        self
    }
    /// Sets the memory (bytes) the task needs.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.resources.memory = bytes;
        self
    }
    /// Adds a custom resource demand.
    pub fn resource(mut self, name: &str, amount: f64) -> Self {
        self.resources.custom.insert(name.to_string(), amount);
        self
    }
    /// Sets how often the task is retried.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
    /// Retries on application errors too (the task must be idempotent).
    pub fn retry_exceptions(mut self, yes: bool) -> Self {
        self.retry_exceptions = yes;
        self
    }
    /// Names the task.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }
    /// Sets the scheduling strategy.
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }
}

/// Options of an actor: `Worker::remote_with(&ActorOptions::new().name("w1"), ...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorOptions {
    /// Resources held for the actor's lifetime (default: none, as in Ray).
    pub resources: Resources,
    /// Registers the actor under this name, for `get_actor`.
    pub name: Option<String>,
    /// Detached actors outlive the driver that created them.
    pub detached: bool,
    /// Times the actor is restarted after it dies unexpectedly.
    pub max_restarts: u32,
    /// Times a call is retried on a restarted actor.
    pub max_task_retries: u32,
    /// Calls that may run at once (default 1: one at a time, in each caller's order). See
    /// [`ActorOptions::max_concurrency`].
    pub max_concurrency: usize,
    /// Where the actor may run.
    pub strategy: Strategy,
}

impl Default for ActorOptions {
    fn default() -> Self {
        ActorOptions {
            resources: Resources {
                num_cpus: 0.0,
                ..Resources::default()
            },
            name: None,
            detached: false,
            max_restarts: 0,
            max_task_retries: 0,
            max_concurrency: 1,
            strategy: Strategy::Default,
        }
    }
}

impl ActorOptions {
    /// The defaults: no resources held, anonymous, owned by its creator.
    pub fn new() -> Self {
        ActorOptions::default()
    }
    /// Names the actor.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }
    /// Makes the actor outlive its creator.
    pub fn detached(mut self) -> Self {
        self.detached = true;
        self
    }
    /// Sets the CPUs held by the actor.
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.resources.num_cpus = n;
        self
    }
    /// Sets the GPUs held by the actor.
    pub fn num_gpus(mut self, n: f64) -> Self {
        self.resources.num_gpus = n;
        self
    }
    /// Adds a custom resource held by the actor.
    pub fn resource(mut self, name: &str, amount: f64) -> Self {
        self.resources.custom.insert(name.to_string(), amount);
        self
    }
    /// Sets how often the actor is restarted.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }
    /// Sets how often a call is retried after a restart.
    pub fn max_task_retries(mut self, n: u32) -> Self {
        self.max_task_retries = n;
        self
    }
    /// Sets how many calls may run at once (Ray's `max_concurrency`; values below 1 mean 1).
    ///
    /// With 1, the default, the actor runs one call at a time, and calls made through one handle run in the order
    /// they were made, wherever the actor lives.
    ///
    /// Above 1, up to `n` calls are in flight at once and calls may finish in any order. What may overlap follows
    /// the methods' receivers, so the state is never aliased mutably:
    /// - `async fn(&self)` methods interleave on the actor's thread, like Ray's async actors: a call that awaits
    ///   lets the others run. The actor type need not be `Sync`. A call that blocks its thread (a blocking `get`,
    ///   a sleep) holds up the others meanwhile.
    /// - plain `fn(&self)` methods run on up to `n` threads of the actor (at most 256), like Ray's threaded
    ///   actors, when the type is `Sync` (keep mutable state in atomics or a `Mutex`). For a type that is not
    ///   `Sync` they run on the actor's thread, one at a time.
    /// - `&mut self` methods run alone: the actor waits until the calls in flight are done, runs the call, and
    ///   starts the calls made after it only then.
    ///
    /// ```
    /// use std::sync::Barrier;
    ///
    /// pub struct Meeting {
    ///     barrier: Barrier,
    /// }
    ///
    /// #[oxray::actor]
    /// impl Meeting {
    ///     pub fn new(parties: u64) -> Self {
    ///         Meeting { barrier: Barrier::new(parties as usize) }
    ///     }
    ///     /// Returns once `parties` calls are inside at once: with one call at a time it would never return.
    ///     pub fn meet(&self) -> bool {
    ///         self.barrier.wait().is_leader()
    ///     }
    /// }
    ///
    /// fn main() -> oxray::Result<()> {
    ///     oxray::init()?;
    ///     let m = Meeting::remote_with(&oxray::ActorOptions::new().max_concurrency(4), 4)?;
    ///     let calls: Vec<_> = (0..4).map(|_| m.meet()).collect();
    ///     let leaders = oxray::get_all(&calls)?.into_iter().filter(|l| *l).count();
    ///     assert_eq!(leaders, 1);
    ///     Ok(())
    /// }
    /// ```
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n.max(1);
        self
    }
    /// Sets the scheduling strategy.
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }
}
