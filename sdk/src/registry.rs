//! The function table: every `#[oxray::remote]` function and `#[oxray::actor]` class in this binary, collected at
//! link time with `inventory`.
//!
//! Entries are keyed by a stable name (`module::path::name`) and carry a signature hash computed by the macro from
//! the argument and return types, so two binaries that disagree about a function's types refuse to run it instead of
//! misreading its bytes. This module only looks entries up; it runs nothing.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::value::{self, Value};

/// The resolved arguments of one call, in order, each an aligned rkyv archive.
#[derive(Debug)]
pub struct Args {
    items: std::vec::IntoIter<Bytes>,
    position: usize,
}

impl Args {
    pub(crate) fn new(items: Vec<Bytes>) -> Self {
        Args {
            items: items.into_iter(),
            position: 0,
        }
    }

    /// Decodes the next argument as a `T`.
    #[allow(clippy::should_implement_trait)] // generic over the decoded type: not an iterator
    pub fn next<T: Value>(&mut self) -> Result<T> {
        self.position += 1;
        let bytes = self.items.next().ok_or_else(|| {
            Error::Serialization(format!("argument {} is missing", self.position))
        })?;
        value::decode::<T>(&bytes)
            .map_err(|e| Error::Serialization(format!("argument {}: {e}", self.position)))
    }

    /// Fails if arguments are left over (a caller built with a different signature).
    pub fn finish(self) -> Result<()> {
        if self.items.len() == 0 {
            Ok(())
        } else {
            Err(Error::Serialization(format!(
                "{} unexpected extra arguments",
                self.items.len()
            )))
        }
    }
}

/// A remote function, as registered by `#[oxray::remote]`.
#[derive(Debug)]
pub struct FunctionEntry {
    /// `module::path::name`.
    pub name: &'static str,
    /// Hash of the argument and return types.
    pub sig: u64,
    /// Decodes the arguments, calls the function, encodes the result.
    pub invoke: fn(Args) -> Result<Bytes>,
}

/// One call of an `async fn(&self)` actor method: arguments decoded, the method's future not yet polled, the result
/// encoded when it completes. Polled on the actor's thread only, so it need not be `Send`.
pub type LocalCall<'a> = Pin<Box<dyn Future<Output = Result<Bytes>> + 'a>>;

/// A plain `&self` actor method: decodes the arguments, calls the method through a shared reference, encodes.
pub type SharedInvoke = fn(&(dyn Any + Send), Args) -> Result<Bytes>;

/// An `async fn(&self)` actor method: decodes the arguments and returns the call's future.
pub type StartCall = fn(&(dyn Any + Send), Args) -> Result<LocalCall<'_>>;

/// One method of an actor class.
///
/// Every method has `invoke`, which takes the state exclusively (calls one at a time). A method taking `&self` also
/// has the form that takes a shared reference, which is what lets calls overlap when the actor's `max_concurrency`
/// is above 1: `shared` for a plain method, `start` for an `async` one.
#[derive(Debug)]
pub struct MethodEntry {
    /// The method's name.
    pub name: &'static str,
    /// Decodes the arguments, calls the method on the actor's state, encodes the result.
    pub invoke: fn(&mut (dyn Any + Send), Args) -> Result<Bytes>,
    /// A plain `&self` method through a shared reference to the state.
    pub shared: Option<SharedInvoke>,
    /// An `async fn(&self)` method: decodes the arguments and returns the call's future.
    pub start: Option<StartCall>,
}

/// An actor class, as registered by `#[oxray::actor]`.
#[derive(Debug)]
pub struct ActorClassEntry {
    /// `module::path::Type`.
    pub name: &'static str,
    /// Hash of the constructor's and every method's signature.
    pub sig: u64,
    /// Runs the constructor.
    pub construct: fn(Args) -> Result<Box<dyn Any + Send>>,
    /// The methods, in declaration order (calls name them by index).
    pub methods: &'static [MethodEntry],
    /// The state as `Sync`, when its type is (`None` otherwise): only then may `&self` methods run on several
    /// threads at once.
    pub sync_view: fn(&(dyn Any + Send)) -> Option<&(dyn Any + Send + Sync)>,
}

inventory::collect!(FunctionEntry);
inventory::collect!(ActorClassEntry);

struct Registry {
    functions: HashMap<&'static str, &'static FunctionEntry>,
    classes: HashMap<&'static str, &'static ActorClassEntry>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        functions: inventory::iter::<FunctionEntry>
            .into_iter()
            .map(|f| (f.name, f))
            .collect(),
        classes: inventory::iter::<ActorClassEntry>
            .into_iter()
            .map(|c| (c.name, c))
            .collect(),
    })
}

/// Looks a function up by name and checks its signature.
pub(crate) fn function(name: &str, sig: u64) -> Result<&'static FunctionEntry> {
    let f = registry()
        .functions
        .get(name)
        .ok_or_else(|| Error::UnknownFunction {
            name: name.to_string(),
            why: "not compiled into this node's binary".into(),
        })?;
    if f.sig != sig {
        return Err(Error::UnknownFunction {
            name: name.to_string(),
            why: format!(
                "signature mismatch (caller {sig:016x}, this node {:016x})",
                f.sig
            ),
        });
    }
    Ok(f)
}

/// Looks an actor class up by name and checks its signature.
pub(crate) fn class(name: &str, sig: u64) -> Result<&'static ActorClassEntry> {
    let c = registry()
        .classes
        .get(name)
        .ok_or_else(|| Error::UnknownFunction {
            name: name.to_string(),
            why: "actor class not compiled into this node's binary".into(),
        })?;
    if c.sig != sig {
        return Err(Error::UnknownFunction {
            name: name.to_string(),
            why: format!(
                "actor signature mismatch (caller {sig:016x}, this node {:016x})",
                c.sig
            ),
        });
    }
    Ok(c)
}

/// The `'static` name of a class compiled into this binary.
pub(crate) fn class_name(name: &str) -> Option<&'static str> {
    registry().classes.get(name).map(|c| c.name)
}

/// Every function and class id in this binary, as announced to the cluster.
pub(crate) fn table() -> Vec<(String, u64)> {
    let r = registry();
    let mut out: Vec<(String, u64)> = r
        .functions
        .values()
        .map(|f| (f.name.to_string(), f.sig))
        .collect();
    out.extend(r.classes.values().map(|c| (c.name.to_string(), c.sig)));
    out.sort();
    out
}
