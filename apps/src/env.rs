//! Reinforcement-learning environments with the published Gymnasium dynamics, written in Rust.
//!
//! What this is: the [`Env`] trait (reset with a caller-owned RNG, step with an [`Action`]) and three
//! classic-control tasks whose equations, constants, start distributions, termination and truncation
//! rules follow Gymnasium's `CartPole-v1`, `Acrobot-v1` and `Pendulum-v1`:
//!
//! | name | obs | actions | episode | solved at |
//! |---|---|---|---|---|
//! | [`CartPole`] `CartPole-v1` | 4 | 2 discrete | ≤ 500 steps | 475 (official) |
//! | [`Acrobot`] `Acrobot-v1` | 6 | 3 discrete | ≤ 500 steps | −100 (official) |
//! | [`Pendulum`] `Pendulum-v1` | 3 | 1 continuous in [−2, 2] | 200 steps | −200 (ours, see below) |
//!
//! Acrobot is the "harder" task of the ES demo: it has an official threshold, so "solved" means what
//! Gymnasium means, and its reward is sparse (−1 per step until the tip swings above the bar), unlike
//! CartPole's. Pendulum has no official threshold; the best results commonly cited are around −140 to
//! −150 mean return, so we call −200 (mean over evaluation episodes) "solved" and say so.
//!
//! What this is not: no rendering, no vectorised environments, no wrappers beyond the time limit,
//! which each environment applies itself (`truncated` in [`Step`]). Environments never own an RNG:
//! the start state is drawn from the generator passed to [`Env::reset`], so a seed fixes an episode.
//! Internal state is `f64` like Gymnasium's Python floats; observations are `f32` like its arrays.

mod acrobot;
mod cartpole;
mod pendulum;

pub use acrobot::Acrobot;
pub use cartpole::CartPole;
pub use pendulum::Pendulum;

use rand::RngCore;

/// An observation vector (length [`Env::obs_dim`]).
pub type Obs = Vec<f32>;

/// The actions an environment accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActionSpace {
    /// Actions `0..n`.
    Discrete {
        /// Number of actions.
        n: u32,
    },
    /// One real-valued action in `[low, high]`; values outside are clipped by the environment.
    Continuous {
        /// Lowest accepted value.
        low: f32,
        /// Highest accepted value.
        high: f32,
    },
}

impl ActionSpace {
    /// How many outputs a policy needs for this space (one score per discrete action, else one).
    pub fn policy_outputs(&self) -> usize {
        match *self {
            ActionSpace::Discrete { n } => n as usize,
            ActionSpace::Continuous { .. } => 1,
        }
    }
}

/// One action, matching the environment's [`ActionSpace`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Index of a discrete action.
    Discrete(u32),
    /// A one-dimensional continuous action.
    Continuous(f32),
}

/// What one [`Env::step`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The observation after the step.
    pub obs: Obs,
    /// The reward of this step.
    pub reward: f32,
    /// The episode ended inside the task (pole fell, tip swung up).
    pub terminated: bool,
    /// The episode hit its step limit.
    pub truncated: bool,
}

impl Step {
    /// Whether the episode is over for any reason; the caller must [`Env::reset`] before stepping again.
    pub fn done(&self) -> bool {
        self.terminated || self.truncated
    }
}

/// Errors of environments.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvError {
    /// The name is not one of [`EnvKind::ALL`]. Remedy: use a listed Gymnasium id such as `CartPole-v1`.
    #[error("unknown environment {0:?}")]
    UnknownEnv(String),
    /// `step` was called before the first `reset`. Remedy: call `reset` first.
    #[error("step called before reset")]
    NotReset,
    /// `step` was called after the episode ended. Remedy: call `reset` once `done()` is true.
    #[error("step called after the episode ended")]
    EpisodeOver,
    /// The action does not belong to the action space (wrong kind or index out of range, or NaN).
    #[error("action {action:?} is not in the action space {space:?}")]
    InvalidAction {
        /// The rejected action.
        action: Action,
        /// The space it should have come from.
        space: ActionSpace,
    },
}

/// A simulated task: the interface ES workers drive.
pub trait Env: Send + std::fmt::Debug {
    /// The Gymnasium id, e.g. `"CartPole-v1"`.
    fn name(&self) -> &'static str;
    /// Length of every observation.
    fn obs_dim(&self) -> usize;
    /// The actions `step` accepts.
    fn action_space(&self) -> ActionSpace;
    /// Starts a new episode with a start state drawn from `rng`; returns the first observation.
    fn reset(&mut self, rng: &mut dyn RngCore) -> Obs;
    /// Advances one time step.
    ///
    /// # Errors
    /// [`EnvError::NotReset`], [`EnvError::EpisodeOver`] or [`EnvError::InvalidAction`].
    fn step(&mut self, action: Action) -> Result<Step, EnvError>;
}

/// The environments this crate implements, by Gymnasium id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum EnvKind {
    /// `CartPole-v1`.
    CartPole,
    /// `Acrobot-v1`.
    Acrobot,
    /// `Pendulum-v1`.
    Pendulum,
}

impl EnvKind {
    /// Every kind, in a fixed order.
    pub const ALL: [EnvKind; 3] = [EnvKind::CartPole, EnvKind::Acrobot, EnvKind::Pendulum];

    /// Parses a Gymnasium id (`"CartPole-v1"`, `"Acrobot-v1"`, `"Pendulum-v1"`).
    ///
    /// # Errors
    /// [`EnvError::UnknownEnv`] for anything else (the name may come from the network).
    pub fn from_name(name: &str) -> Result<EnvKind, EnvError> {
        EnvKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| EnvError::UnknownEnv(name.chars().take(64).collect()))
    }

    /// The Gymnasium id.
    pub fn name(self) -> &'static str {
        match self {
            EnvKind::CartPole => "CartPole-v1",
            EnvKind::Acrobot => "Acrobot-v1",
            EnvKind::Pendulum => "Pendulum-v1",
        }
    }

    /// Mean evaluation return at which we call the task solved (see the module docs for Pendulum's).
    pub fn solved_threshold(self) -> f32 {
        match self {
            EnvKind::CartPole => 475.0,
            EnvKind::Acrobot => -100.0,
            EnvKind::Pendulum => -200.0,
        }
    }

    /// A fresh environment of this kind (not yet reset).
    pub fn make(self) -> Box<dyn Env> {
        match self {
            EnvKind::CartPole => Box::new(CartPole::new()),
            EnvKind::Acrobot => Box::new(Acrobot::new()),
            EnvKind::Pendulum => Box::new(Pendulum::new()),
        }
    }
}

impl std::fmt::Display for EnvKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EnvKind {
    type Err = EnvError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EnvKind::from_name(s)
    }
}

/// Draws uniformly from `[low, high)` the way NumPy's `uniform` does (`low + (high - low) * u`).
fn uniform(rng: &mut dyn RngCore, low: f64, high: f64) -> f64 {
    use rand::Rng;
    low + (high - low) * rng.random::<f64>()
}

/// Runs one episode with `act` choosing actions; returns the undiscounted return and the step count.
///
/// # Errors
/// Whatever [`Env::step`] reports (an action outside the space).
pub fn rollout(
    env: &mut dyn Env,
    rng: &mut dyn RngCore,
    mut act: impl FnMut(&[f32]) -> Action,
) -> Result<(f64, u32), EnvError> {
    let mut obs = env.reset(rng);
    let mut total = 0.0f64;
    let mut steps = 0u32;
    loop {
        let step = env.step(act(&obs))?;
        total += f64::from(step.reward);
        steps += 1;
        if step.done() {
            return Ok((total, steps));
        }
        obs = step.obs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for k in EnvKind::ALL {
            assert_eq!(EnvKind::from_name(k.name()), Ok(k));
            let env = k.make();
            assert_eq!(env.name(), k.name());
        }
        assert!(matches!(
            EnvKind::from_name("CartPole-v0"),
            Err(EnvError::UnknownEnv(_))
        ));
        let long = "x".repeat(10_000);
        match EnvKind::from_name(&long) {
            Err(EnvError::UnknownEnv(n)) => assert_eq!(n.len(), 64),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn step_before_reset_and_after_done_are_errors() {
        for k in EnvKind::ALL {
            let mut env = k.make();
            let a = match env.action_space() {
                ActionSpace::Discrete { .. } => Action::Discrete(0),
                ActionSpace::Continuous { .. } => Action::Continuous(0.0),
            };
            assert_eq!(env.step(a), Err(EnvError::NotReset));
            let mut rng = StdRng::seed_from_u64(3);
            env.reset(&mut rng);
            let mut n = 0;
            loop {
                n += 1;
                if env.step(a).unwrap().done() {
                    break;
                }
            }
            assert!(n <= 500, "{k} ran {n} steps");
            assert_eq!(env.step(a), Err(EnvError::EpisodeOver));
            env.reset(&mut rng);
            assert!(env.step(a).is_ok());
        }
    }

    #[test]
    fn wrong_actions_are_rejected() {
        let mut rng = StdRng::seed_from_u64(1);
        for k in EnvKind::ALL {
            let mut env = k.make();
            env.reset(&mut rng);
            let bad = match env.action_space() {
                ActionSpace::Discrete { n } => [Action::Discrete(n), Action::Continuous(0.0)],
                ActionSpace::Continuous { .. } => {
                    [Action::Continuous(f32::NAN), Action::Discrete(0)]
                }
            };
            for a in bad {
                assert!(
                    matches!(env.step(a), Err(EnvError::InvalidAction { .. })),
                    "{k} {a:?}"
                );
            }
        }
    }

    #[test]
    fn same_seed_same_episode() {
        for k in EnvKind::ALL {
            let run = |seed| {
                let mut env = k.make();
                let mut rng = StdRng::seed_from_u64(seed);
                let mut t = 0u32;
                rollout(env.as_mut(), &mut rng, |obs| {
                    t += 1;
                    match k {
                        EnvKind::Pendulum => Action::Continuous(obs[0]),
                        EnvKind::CartPole => Action::Discrete(u32::from(obs[2] > 0.0)),
                        EnvKind::Acrobot => Action::Discrete(t % 3),
                    }
                })
                .unwrap()
            };
            assert_eq!(run(7), run(7));
            let first = |seed| k.make().reset(&mut StdRng::seed_from_u64(seed));
            assert_eq!(first(7), first(7));
            assert_ne!(first(7), first(8));
        }
    }
}
