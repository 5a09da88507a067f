//! oxray's scheduler: the placement policy and local dispatch, as sans-IO cores.
//!
//! Work in progress; see the module docs.

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
pub use policy::{Decision, InfeasibleReason, Policy, PolicyConfig, Strategy, TaskRequest, decide};
pub use resources::{
    LabelOp, LabelSelector, Labels, Quantity, ResourceError, ResourceKind, ResourceSet,
};
pub use view::{ClusterView, FunctionId, NodeInfo, ObjectId, PlacementGroupId, TaskId, ViewDelta};
