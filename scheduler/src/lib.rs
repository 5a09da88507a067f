//! oxray's scheduler: where and when tasks run, as sans-IO cores (Ray's raylet "brain").
//!
//! Every type here is a deterministic state machine or a pure function. Nothing in this crate
//! opens a socket, touches a file, reads the clock or a global RNG: time is a `u64` argument
//! (milliseconds or microseconds, as each API says) and randomness comes from an RNG the caller
//! passes in. The node runtime in the SDK crate owns all of that and drives these cores.
//! (The one exception is [`sim::measure_decisions_per_s`] and its sibling, which time the cores
//! for benchmarks.)
//!
//! # Table of contents
//! - [`resources`]: fixed-point [`Quantity`], [`ResourceSet`] (CPU, GPU, memory, custom), node
//!   [`Labels`] and [`LabelSelector`]s.
//! - [`view`]: the [`ClusterView`] (nodes, availability, queue lengths, function tables, object
//!   locations, placement groups), updated by batches of [`ViewDelta`]s.
//! - [`policy`]: [`Policy::decide`] / [`decide`]: `RunLocal`, `Spill`, `RunInBundle`, `Wait` or
//!   `Infeasible` for one [`TaskRequest`]. The hot path; allocation-free in the common case.
//! - [`local`]: [`LocalQueue`], one node's queue and exact resource accounting: dispatch,
//!   blocked workers lending their CPU, cancellation, bundle reservations, parked infeasible tasks.
//! - [`pg`]: placement-group [`pg::plan`]ning (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD) and the
//!   two-phase [`PgCoordinator`] that reserves bundles all-or-nothing.
//! - [`failure`]: [`FailureDetector`], heartbeats in, dead nodes out.
//! - [`sim`]: a seeded discrete-event simulator of a whole cluster on these cores.
//!
//! # Walkthrough: one task on one node
//!
//! ```
//! use oxray_scheduler::*;
//! use oxray_transport::NodeId;
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! const FUNC: FunctionId = 7; // the task's function (its registered signature hash)
//! let me = NodeId(1);
//! let mut rng = SmallRng::seed_from_u64(1); // the runtime's seeded RNG
//!
//! // 1. The runtime keeps a view of the cluster, fed by GCS/peer updates in batches.
//! let mut view = ClusterView::new();
//! let total = ResourceSet::try_from_pairs([("CPU", 4.0), ("GPU", 1.0)])?;
//! view.apply([ViewDelta::NodeJoined(NodeInfo::new(me, total.clone()).with_functions([FUNC]))]);
//!
//! // 2. Each node owns a local queue with its exact resources.
//! let mut queue = LocalQueue::new(total, LocalQueueConfig::default());
//!
//! // 3. A task arrives: the policy says where it should run.
//! let req = TaskRequest::new(FUNC, ResourceSet::try_from_pairs([("CPU", 0.5)])?);
//! let policy = Policy::new(PolicyConfig::default());
//! match policy.decide(&view, me, &req, &mut rng) {
//!     Decision::RunLocal => queue.enqueue(LocalTask::new(TaskId(1), req.resources.clone()))?,
//!     Decision::Spill(_other) => { /* forward the task to that node */ }
//!     Decision::Wait => { /* keep it; decide again when the view changes */ }
//!     Decision::Infeasible(reason) => { /* report `reason`, park it with queue.park_infeasible */ }
//!     Decision::RunInBundle { .. } => { /* placement-group task: enqueue with its bundle */ }
//! }
//!
//! // 4. Drain dispatches after every input; start a worker for each.
//! assert_eq!(queue.poll_dispatch(), Some(Dispatch::Start(TaskId(1))));
//! assert_eq!(queue.poll_dispatch(), None);
//!
//! // 5. The worker blocks in `get` (its CPU is lent out), resumes, and finishes.
//! queue.block(TaskId(1))?;
//! assert_eq!(queue.unblock(TaskId(1))?, Unblock::Resumed);
//! queue.finish(TaskId(1))?;
//!
//! // 6. Report the node's state so peers' views follow.
//! view.apply([ViewDelta::Resources {
//!     node: me,
//!     seq: 1,
//!     available: queue.available().clone(),
//!     queue_len: queue.queue_len() as u32,
//! }]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Placement groups follow the same pattern: [`PgCoordinator::create`], then
//! [`PgCoordinator::poll`] with the time, send each [`PgCoordinator::poll_command`] to its node
//! (which calls [`LocalQueue::prepare_bundles`] / [`LocalQueue::commit_bundle`] /
//! [`LocalQueue::release_bundle`]) and feed the replies back with
//! [`PgCoordinator::on_prepared`] / [`PgCoordinator::on_committed`].
//!
//! **Architecture Invariant:** no module of this crate performs I/O, reads a clock (outside the
//! two benchmark helpers in [`sim`]) or uses a global RNG; all state can be rebuilt from the
//! view deltas and the runtime's task table.

#![warn(missing_docs)]

pub mod failure;
pub mod local;
pub mod pg;
pub mod policy;
pub mod resources;
pub mod sim;
pub mod view;

pub use failure::{FailureConfig, FailureDetector, Heartbeat};
pub use local::{
    BundleError, BundleKey, BundleRelease, Cancel, Dispatch, LocalError, LocalQueue,
    LocalQueueConfig, LocalTask, Unblock,
};
pub use pg::{
    PgCommand, PgConfig, PgCoordinator, PgError, PgEvent, PgPhase, PgStrategy, PlacementGroupSpec,
    PlanError,
};
pub use policy::{
    Decision, InfeasibleReason, Policy, PolicyConfig, Strategy, TaskArg, TaskRequest, decide,
};
pub use resources::{
    LabelOp, LabelSelector, Labels, Quantity, ResourceError, ResourceKind, ResourceSet,
};
pub use view::{ClusterView, FunctionId, NodeInfo, ObjectId, PlacementGroupId, TaskId, ViewDelta};
