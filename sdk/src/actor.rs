//! Typed actor handles.

use std::fmt;
use std::marker::PhantomData;

use crate::runtime::ActorCore;

/// An actor class: implemented by `#[oxray::actor]` on the type's `impl` block. Not implemented by hand.
pub trait ActorClass: Sized + 'static {
    /// The registered name, `module::path::Type`.
    const NAME: &'static str;
    /// The hash of the constructor's and methods' signatures.
    const SIG: u64;
    /// The generated type with one typed method per actor method; [`ActorHandle`] derefs to it.
    type Methods: From<ActorCore> + Clone;
}

/// A typed handle to a running actor: `handle.method(args)` returns an `ObjectRef` of the method's result.
///
/// Cheap to clone; every clone names the same actor. Calls made through one handle (from one thread) run in the
/// order they were made. Dropping a handle does not stop the actor: use [`crate::kill`] for that.
pub struct ActorHandle<A: ActorClass> {
    methods: A::Methods,
    core: ActorCore,
    _class: PhantomData<fn() -> A>,
}

impl<A: ActorClass> ActorHandle<A> {
    #[doc(hidden)]
    pub fn from_core(core: ActorCore) -> Self {
        ActorHandle {
            methods: A::Methods::from(core.clone()),
            core,
            _class: PhantomData,
        }
    }

    /// The actor's id.
    pub fn id(&self) -> u128 {
        self.core.id()
    }

    /// The untyped core (for `kill` and the runtime).
    #[doc(hidden)]
    pub fn core(&self) -> &ActorCore {
        &self.core
    }

    /// Whether the actor is still alive, as far as this process knows.
    pub fn is_alive(&self) -> bool {
        self.core.is_alive()
    }
}

impl<A: ActorClass> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        ActorHandle {
            methods: self.methods.clone(),
            core: self.core.clone(),
            _class: PhantomData,
        }
    }
}

impl<A: ActorClass> fmt::Debug for ActorHandle<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActorHandle<{}>({:?})", A::NAME, self.core)
    }
}

impl<A: ActorClass> std::ops::Deref for ActorHandle<A> {
    type Target = A::Methods;
    fn deref(&self) -> &A::Methods {
        &self.methods
    }
}
