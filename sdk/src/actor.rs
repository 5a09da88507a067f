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

/// How an actor handle travels inside a value: the actor's id and its node. Not used directly.
#[doc(hidden)]
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub struct ActorW {
    id: u128,
    node: u128,
}

impl<A: ActorClass> ActorHandle<A> {
    fn wire(&self) -> ActorW {
        ActorW {
            id: self.core.id(),
            node: self.core.node(),
        }
    }
}

// A handle passed to a task or an actor (or nested in a value) is archived as (actor, node); the receiver gets a
// working typed handle to the same actor. The class is the handle's type parameter, so it is checked at compile
// time on both sides.
impl<A: ActorClass> rkyv::Archive for ActorHandle<A> {
    type Archived = ArchivedActorW;
    type Resolver = ActorWResolver;
    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        self.wire().resolve(resolver, out)
    }
}

impl<A: ActorClass, S: rkyv::rancor::Fallible + ?Sized> rkyv::Serialize<S> for ActorHandle<A>
where
    ActorW: rkyv::Serialize<S>,
{
    fn serialize(&self, s: &mut S) -> Result<Self::Resolver, S::Error> {
        self.wire().serialize(s)
    }
}

impl<A: ActorClass, D: rkyv::rancor::Fallible + ?Sized> rkyv::Deserialize<ActorHandle<A>, D>
    for ArchivedActorW
where
    D::Error: rkyv::rancor::Source,
{
    fn deserialize(&self, _: &mut D) -> Result<ActorHandle<A>, D::Error> {
        ActorCore::resolve(self.id.to_native(), self.node.to_native(), A::NAME)
            .map(ActorHandle::from_core)
            .map_err(<D::Error as rkyv::rancor::Source>::new)
    }
}
