//! Arguments of remote calls: a value, or a reference to an object that is resolved before the call runs.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::Result;
use crate::object::{ObjectRef, RefInner};
use crate::value::{self, Value};

/// One argument of a remote call, ready to travel. Opaque: made by [`IntoArg`].
#[derive(Clone)]
pub struct Arg(pub(crate) ArgKind);

#[derive(Clone)]
pub(crate) enum ArgKind {
    /// The value itself, encoded.
    Value(Bytes),
    /// An object; the callee receives its value once it is ready.
    Ref(Arc<RefInner>),
}

impl std::fmt::Debug for Arg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ArgKind::Value(b) => write!(f, "Arg::Value({} bytes)", b.len()),
            ArgKind::Ref(r) => write!(f, "Arg::Ref({})", r.entry.id),
        }
    }
}

/// Anything that can be passed where a remote function or actor method expects a `T`: a `T`, an `ObjectRef<T>`
/// or a `&ObjectRef<T>`. This is how `add::remote(1, x_ref)` type-checks both forms.
pub trait IntoArg<T> {
    /// Encodes the argument.
    fn into_arg(self) -> Result<Arg>;
}

impl<T: Value> IntoArg<T> for T {
    fn into_arg(self) -> Result<Arg> {
        // A large value is put into the store once and passed as a ref (as Ray does above 100 KiB): the call
        // message stays small, and a callee on another node pulls the value instead of it riding in a batch.
        crate::object::clear_contained();
        let bytes = value::encode(&self)?;
        let nested = crate::object::take_contained();
        // A value with refs nested in it goes the same way: its object then keeps those refs alive until the
        // call is done with it.
        if (!oxray_objstore::is_inline(bytes.len()) || !nested.is_empty())
            && let Ok(rt) = crate::runtime::current()
        {
            // The encoded buffer is adopted by the store as it is: no second copy.
            return Ok(Arg(ArgKind::Ref(rt.put_encoded::<T>(bytes, nested)?.inner)));
        }
        Ok(Arg(ArgKind::Value(bytes)))
    }
}

impl<T: Value> IntoArg<T> for ObjectRef<T> {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg(ArgKind::Ref(self.inner)))
    }
}

impl<T: Value> IntoArg<T> for &ObjectRef<T> {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg(ArgKind::Ref(self.inner.clone())))
    }
}
