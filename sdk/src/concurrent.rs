//! Serving an actor's calls concurrently, for actors created with `ActorOptions::max_concurrency` above 1.
//!
//! Rust's borrow rules decide what may overlap, so nothing here aliases a `&mut` of the actor's state:
//! - An `async fn(&self)` method's future is polled on the actor's thread, interleaved with the other calls in
//!   flight (Ray's async actor). The state need not be `Sync`: every reference to it stays on this thread.
//! - A plain `fn(&self)` method runs on a helper thread when the state's type is `Sync` (Ray's threaded actor). For
//!   a state that is not `Sync` it runs on the actor's thread, between polls of the futures.
//! - A `&mut self` method runs alone: the actor stops taking calls, waits until every call in flight is done, and
//!   runs it with the state to itself. Calls behind it in the mailbox wait for it, so it also orders them.
//!
//! The state is lent to the helper threads with `std::thread::scope` for one *shared phase*. The phase ends when a
//! `&mut self` call must run, and leaving the scope joins the helpers, so the state is exclusively ours again. At
//! most `max_concurrency` calls are in flight at once (futures plus helper calls).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;

use crate::arg::Arg;
use crate::error::{Error, Result};
use crate::object::RefInner;
use crate::registry::{Args, LocalCall, MethodEntry, SharedInvoke, StartCall};
use crate::runtime::{
    ActorHost, ActorMsg, Done, Runtime, arg_entries, panic_error, resolve_args, short, task_error,
};

/// The most helper threads one actor starts for plain `&self` methods: beyond that, such calls wait for a helper
/// (async calls need no thread of their own). A bound on threads, not on `max_concurrency`.
pub(crate) const MAX_HELPER_THREADS: usize = 256;

/// Serves calls until the mailbox closes.
pub(crate) fn serve(
    host: &ActorHost,
    rt: &Arc<Runtime>,
    state: &mut Box<dyn Any + Send>,
    rx: &flume::Receiver<ActorMsg>,
) {
    while let Some((method, args, done)) = shared_phase(host, rt, &**state, rx) {
        host.run_exclusive(rt, state.as_mut(), method, args, done);
    }
}

/// Sets a flag and wakes the actor's thread: the waker of one future in flight.
struct Flag {
    woken: AtomicBool,
    thread: std::thread::Thread,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// An async call in flight on the actor's thread.
struct InFlight<'s> {
    fut: LocalCall<'s>,
    flag: Arc<Flag>,
    waker: Waker,
    m: &'static MethodEntry,
    /// Kept until the call completes, as a call that runs alone keeps its arguments.
    _args: Vec<Arg>,
    done: Done,
    /// Refs serialized by the call so far: those nested in its result must outlive it.
    nested: Vec<Arc<RefInner>>,
}

/// A plain `&self` call for a helper thread.
struct Job {
    m: &'static MethodEntry,
    shared: SharedInvoke,
    args: Vec<Arg>,
    done: Done,
}

/// Serves calls that share the state until a `&mut self` call must run (returned, after every other call in flight
/// has finished) or the mailbox closes (`None`).
fn shared_phase<'s>(
    host: &ActorHost,
    rt: &Arc<Runtime>,
    state: &'s (dyn Any + Send),
    rx: &flume::Receiver<ActorMsg>,
) -> Option<(u32, Vec<Arg>, Done)> {
    let n = host.max_concurrency;
    let view = (host.class.sync_view)(state);
    let me = std::thread::current();
    // Futures are polled inside the I/O runtime's context, so tokio timers and sockets work in async methods.
    let _io = rt.tokio.enter();
    // Plain calls handed to helper threads and not finished yet.
    let running = &AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (jobs, queue) = flume::unbounded::<Job>();
        let mut helpers = 0usize;
        let mut futures: Vec<InFlight<'s>> = Vec::new();
        // The `&mut self` call that ends this phase, once one arrives: no call behind it starts before it ran.
        let mut exclusive: Option<(u32, Vec<Arg>, Done)> = None;
        let mut closed = false;
        loop {
            let mut busy = false;
            let mut i = 0;
            while i < futures.len() {
                if futures[i].flag.woken.swap(false, Ordering::AcqRel) {
                    busy = true;
                    if let Some(result) = poll(host, rt, &mut futures[i]) {
                        let f = futures.swap_remove(i);
                        host.calls.fetch_add(1, Ordering::Relaxed);
                        f.done.complete_holding(result, f.nested);
                        continue;
                    }
                }
                i += 1;
            }
            while exclusive.is_none()
                && !closed
                && futures.len() + running.load(Ordering::Acquire) < n
            {
                let msg = match rx.try_recv() {
                    Ok(msg) => msg,
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                };
                busy = true;
                if !host.is_alive() {
                    host.fail(msg);
                    continue;
                }
                let ActorMsg::Call { method, args, done } = msg;
                let m = match host.method(method) {
                    Ok(m) => m,
                    Err(e) => {
                        done.complete(Err(e));
                        continue;
                    }
                };
                match (m.start, m.shared, view) {
                    (Some(start), _, _) => {
                        if let Some(f) = begin(host, rt, state, m, start, args, done, &me) {
                            futures.push(f);
                        }
                    }
                    (None, Some(shared), Some(view)) => {
                        let now = running.fetch_add(1, Ordering::AcqRel) + 1;
                        // Every queued job needs a free helper, or a call waiting on another (a barrier) would
                        // wait forever: start one while the calls outnumber the helpers.
                        if now > helpers && helpers < MAX_HELPER_THREADS.min(n) {
                            let queue = queue.clone();
                            let me = me.clone();
                            let started = std::thread::Builder::new()
                                .name(format!("actor-{}-{helpers}", short(host.id)))
                                .spawn_scoped(scope, move || {
                                    while let Ok(job) = queue.recv() {
                                        if host.is_alive() {
                                            host.run_shared(
                                                rt, view, job.m, job.shared, job.args, job.done,
                                            );
                                        } else {
                                            job.done.complete(Err(host.error()));
                                        }
                                        running.fetch_sub(1, Ordering::AcqRel);
                                        me.unpark();
                                    }
                                });
                            match started {
                                Ok(_) => helpers += 1,
                                Err(e) if helpers == 0 => {
                                    running.fetch_sub(1, Ordering::AcqRel);
                                    done.complete(Err(Error::TaskFailed {
                                        task: host.method_name(m),
                                        node: short(rt.node),
                                        message: format!("cannot start a thread for the call: {e}"),
                                    }));
                                    continue;
                                }
                                // The call waits for one of the helpers already running.
                                Err(e) => tracing::warn!(
                                    actor = %short(host.id), error = %e,
                                    "cannot start another thread for a concurrent actor"
                                ),
                            }
                        }
                        // The receiver lives in this scope, so the send cannot fail.
                        let _ = jobs.send(Job {
                            m,
                            shared,
                            args,
                            done,
                        });
                    }
                    // Not `Sync`: no other thread may see the state, but on this thread a shared reference can sit
                    // beside the futures' shared references.
                    (None, Some(shared), None) => host.run_shared(rt, state, m, shared, args, done),
                    (None, None, _) => exclusive = Some((method, args, done)),
                }
            }
            if futures.is_empty() && running.load(Ordering::Acquire) == 0 {
                if exclusive.is_some() {
                    return exclusive;
                }
                if closed {
                    return None;
                }
            }
            // Each event (a woken future, a new call, a helper's finished call) unparks this thread after it
            // happened, so nothing is missed between the checks above and the park.
            if !busy {
                // With nothing in flight, only a new call can come: a synchronous caller's next one comes within
                // microseconds, so spin for it before parking. (With calls in flight, their wake-ups would wait
                // out the spin: park at once.)
                let idle = futures.is_empty() && running.load(Ordering::Acquire) == 0;
                if !(idle && crate::spin::until(|| !rx.is_empty() || rx.is_disconnected())) {
                    std::thread::park();
                }
            }
        }
    })
}

/// Decodes an async call's arguments and creates its future (not polled yet: it starts woken).
#[allow(clippy::too_many_arguments)]
fn begin<'s>(
    host: &ActorHost,
    rt: &Runtime,
    state: &'s (dyn Any + Send),
    m: &'static MethodEntry,
    start: StartCall,
    args: Vec<Arg>,
    done: Done,
    me: &std::thread::Thread,
) -> Option<InFlight<'s>> {
    // A ref argument not ready yet is waited for here, holding up the actor's other calls meanwhile (as a call
    // that runs alone would).
    let resolved = match resolve_args(&args) {
        Ok(r) => r,
        Err(e) => {
            host.calls.fetch_add(1, Ordering::Relaxed);
            done.complete(Err(e));
            return None;
        }
    };
    crate::object::clear_contained();
    let started = crate::object::decoding(arg_entries(&args), || {
        std::panic::catch_unwind(AssertUnwindSafe(|| start(state, Args::new(resolved))))
    });
    let fut = match started {
        Ok(Ok(fut)) => fut,
        Ok(Err(e)) => {
            host.calls.fetch_add(1, Ordering::Relaxed);
            done.complete(Err(task_error(|| host.method_name(m), rt.node, e)));
            return None;
        }
        Err(panic) => {
            host.calls.fetch_add(1, Ordering::Relaxed);
            done.complete(Err(panic_error(|| host.method_name(m), rt.node, panic)));
            return None;
        }
    };
    let flag = Arc::new(Flag {
        woken: AtomicBool::new(true),
        thread: me.clone(),
    });
    Some(InFlight {
        fut,
        waker: Waker::from(flag.clone()),
        flag,
        m,
        _args: args,
        done,
        nested: crate::object::take_contained(),
    })
}

/// Polls one async call; its result once it finished.
fn poll(host: &ActorHost, rt: &Runtime, f: &mut InFlight<'_>) -> Option<Result<Bytes>> {
    let mut cx = Context::from_waker(&f.waker);
    crate::object::clear_contained();
    let out = std::panic::catch_unwind(AssertUnwindSafe(|| f.fut.as_mut().poll(&mut cx)));
    f.nested.extend(crate::object::take_contained());
    match out {
        Ok(Poll::Pending) => None,
        Ok(Poll::Ready(Ok(b))) => Some(Ok(b)),
        Ok(Poll::Ready(Err(e))) => Some(Err(task_error(|| host.method_name(f.m), rt.node, e))),
        Err(panic) => Some(Err(panic_error(|| host.method_name(f.m), rt.node, panic))),
    }
}
