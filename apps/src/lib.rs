//! The compute of oxray's demo applications, with no runtime in it.
//!
//! What this is: pure, deterministic library code that the examples run inside oxray actors and
//! tasks. Every random choice comes from a seed passed in; nothing here reads the clock (except
//! the sequential reference driver [`es::run_local`], for its `elapsed_s` column), the network or
//! a global RNG, and nothing here depends on the runtime crates. Types that cross the wire derive
//! rkyv's `Archive`.
//!
//! What this is not: a reinforcement-learning or deep-learning library. The policies and models
//! are deliberately tiny and hand-written.
//!
//! # Contents
//! - [`env`](mod@env): CartPole-v1, Acrobot-v1 and Pendulum-v1 with Gymnasium's published dynamics.
//! - [`policy`]: a linear or one-hidden-layer policy over a flat parameter vector.
//! - [`es`]: evolution strategies, worker side ([`es::Worker`], [`es::evaluate`]) and driver side
//!   ([`es::EsState`]), plus the sequential runner [`es::run_local`].
//! - [`report`]: the learning curve as CSV and as a PNG plot.
//! - [`ps`]: a parameter server for linear and logistic regression on generated, sharded data.
//! - [`serving`]: a small MLP with batched inference for the model-serving example.
//!
//! # Walkthrough: ES as the lecture pseudocode has it
//!
//! The driver owns an [`es::EsState`]; each worker actor owns an [`es::Worker`] built from the same
//! [`es::EsConfig`]. Per step the driver hands out tasks (two seeds each) together with the current
//! parameters, the workers return two rewards each, and the driver combines them:
//!
//! ```
//! use oxray_apps::env::EnvKind;
//! use oxray_apps::es::{Curve, EsConfig, EsState, Worker};
//!
//! let config = EsConfig::new(EnvKind::CartPole); // 20 workers, up to 200 steps, seed 0
//! let mut state = EsState::new(config.clone())?;
//! // In the distributed example each of these lives in its own actor.
//! let mut workers: Vec<Worker> =
//!     (0..config.population).map(|_| Worker::from_config(&config)).collect::<Result<_, _>>()?;
//! let mut curve = Curve::new(config.env);
//! while !state.finished() {
//!     // 1. The driver issues one task per worker: only seeds cross the wire, plus the params.
//!     let tasks = state.next_tasks();
//!     // 2. Each worker runs θ+σε and θ−σε on the same start state and returns both returns.
//!     let results = tasks
//!         .iter()
//!         .zip(&mut workers)
//!         .map(|(&task, w)| w.evaluate(state.params(), task))
//!         .collect::<Result<Vec<_>, _>>()?;
//!     // 3. The driver ranks the returns, rebuilds each ε from its seed, and takes an Adam step.
//!     let stats = state.update(&results)?;
//!     curve.push(&stats, 0.0);
//!     if stats.solved {
//!         break; // mean evaluation return ≥ 475 over 10 episodes
//!     }
//! }
//! assert!(curve.solved_at.is_some());
//! # Ok::<(), oxray_apps::es::EsError>(())
//! ```
//!
//! [`report::save_csv`] and [`report::save_curve_png`] then write the curve out.

pub mod env;
pub mod es;
pub mod policy;
pub mod ps;
pub mod report;
pub mod serving;
