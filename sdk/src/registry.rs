//! The function table: every `#[oxray::remote]` function and `#[oxray::actor]` class in this binary, collected at
//! link time with `inventory`.
//!
//! Entries are keyed by a stable name (`module::path::name`) and carry a signature hash computed by the macro from
//! the argument and return types, so two binaries that disagree about a function's types refuse to run it instead of
//! misreading its bytes. This module only looks entries up; it runs nothing.

use std::any::Any;
use std::collections::HashMap;
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

/// One method of an actor class.
#[derive(Debug)]
pub struct MethodEntry {
    /// The method's name.
    pub name: &'static str,
    /// Decodes the arguments, calls the method on the actor's state, encodes the result.
    pub invoke: fn(&mut (dyn Any + Send), Args) -> Result<Bytes>,
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
