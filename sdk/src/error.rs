//! The errors a user of oxray sees, as typed values.
//!
//! Errors are `Clone` because one failed object may be read by many `get`s, and they carry strings rather than
//! sources because they cross process boundaries.

use std::time::Duration;

/// The result type of every fallible oxray call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a task, an actor call or an object access.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Error {
    /// The remote function or actor method panicked or returned an error.
    /// `message` is the panic message; `task` names the function, `node` where it ran.
    #[error("task {task} failed on node {node}: {message}")]
    TaskFailed {
        /// Function or `Class::method` name.
        task: String,
        /// The node that ran it.
        node: String,
        /// The panic or error message.
        message: String,
    },
    /// The actor is dead (killed, its node died, or its constructor failed), so the call cannot run.
    #[error("actor {actor} died: {reason}")]
    ActorDied {
        /// The actor's id.
        actor: String,
        /// Why it died.
        reason: String,
    },
    /// Every copy of the object is gone and it could not be rebuilt.
    #[error("object {0} was lost: no copy is left")]
    ObjectLost(String),
    /// The node's object store cannot hold the object: it is larger than the store, or everything in the store is
    /// in use and nothing can be spilled. The message says what holds the memory.
    #[error("object store full: {0}")]
    ObjectStoreFull(String),
    /// The process that owned the object died, so its value can never be produced.
    #[error("object {0} is unavailable: its owner died")]
    OwnerDied(String),
    /// `get` (or `wait`) ran out of time before the object was ready. Retryable: the object may still arrive.
    #[error("timed out after {0:?} waiting for the object")]
    GetTimeout(Duration),
    /// No node in the cluster can ever satisfy the task's hard requirements as the cluster stands.
    #[error("infeasible: {0}")]
    Infeasible(String),
    /// The task was cancelled before it produced a result.
    #[error("task was cancelled")]
    Cancelled,
    /// No actor is registered under this name.
    #[error("no actor named {0:?}")]
    ActorNotFound(String),
    /// A function or actor class is not compiled into the node that was asked to run it, or its signature differs.
    #[error("function {name} is not available: {why}")]
    UnknownFunction {
        /// The registered name.
        name: String,
        /// What does not match (missing, or a different signature hash).
        why: String,
    },
    /// An argument or result could not be encoded or failed validation.
    #[error("serialization failed: {0}")]
    Serialization(String),
    /// `init` or `connect` was not called (or `shutdown` already was).
    #[error("oxray is not initialized: call oxray::init() or oxray::connect(addr) first")]
    NotInitialized,
    /// A cluster-level failure: the network, the GCS or a node.
    #[error("cluster error: {0}")]
    Cluster(String),
    /// Bad input from the caller (an option out of range, a name in use, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::GetTimeout(_) | Error::Cluster(_))
    }
}
