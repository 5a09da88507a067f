//! Evolution strategies (Salimans et al., 2017, "Evolution Strategies as a Scalable Alternative to
//! Reinforcement Learning"), split the way the lecture pseudocode splits it between a driver and
//! N workers.
//!
//! ```text
//! driver                                   worker i (an actor holding a `Worker`)
//! ------                                   --------------------------------------
//! state = EsState::new(config)             w = Worker::from_config(&config)
//! loop:
//!   tasks = state.next_tasks()   ─────►    r = w.evaluate(state.params(), task)
//!   stats = state.update(&results) ◄────   (θ+σε and θ−σε on the same start state)
//! ```
//!
//! Only seeds and two rewards cross the wire: a worker regenerates its perturbation ε from
//! `noise_seed`, and the driver regenerates the same ε when it combines the results. The update
//! uses mirrored sampling, centred-rank fitness shaping (ties share their mean rank), weight decay
//! and Adam. Everything is a deterministic function of [`EsConfig::seed`]: results may arrive in any
//! order or be missing (a lost worker), and the update is the same for the same set of results.
//!
//! With oxray the worker side becomes an actor along these lines (a sketch; the SDK is not a
//! dependency of this crate):
//!
//! ```text
//! pub struct EsWorker { w: Worker }
//! #[oxray::actor]
//! impl EsWorker {
//!     pub fn new(config: EsConfig) -> Self { EsWorker { w: Worker::from_config(&config).expect("validated by the driver") } }
//!     pub fn evaluate(&mut self, params: Vec<f32>, task: Task) -> Result<WorkerResult, String> {
//!         self.w.evaluate(&params, task).map_err(|e| e.to_string())
//!     }
//! }
//! // driver: let p = oxray::put(&state.params().to_vec())?;  one `evaluate(&p, task)` per worker,
//! // oxray::get_all, drop the Err results (or retry them), state.update(&oks)?
//! ```
//!
//! What this is not: no clock, no threads, no network — [`run_local`] is the one driver here, a
//! sequential loop used by tests and as the reference for the distributed example; it is the only
//! function that reads the clock (for `elapsed_s`). No shared noise table (regenerating ε per
//! seed costs microseconds for these policy sizes), no observation normalisation.

use std::collections::HashMap;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::env::{Env, EnvError, EnvKind, rollout};
use crate::policy::{Policy, PolicySpec};

/// Most mirrored pairs per step a config may ask for (bounds driver memory and update time).
pub const MAX_POPULATION: u32 = 65_536;
/// Widest hidden layer a config may ask for.
pub const MAX_HIDDEN: u32 = 1024;
/// Most evaluation episodes per step.
pub const MAX_EVAL_EPISODES: u32 = 10_000;
/// Most ES steps per run.
pub const MAX_STEPS: u32 = 1_000_000;

/// Errors of ES workers and drivers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EsError {
    /// An environment refused a call; with a policy from [`PolicySpec`] this means an unknown
    /// environment name (from the network) or a bug.
    #[error("environment error")]
    Env(#[from] EnvError),
    /// The parameter vector does not fit the policy shape. Remedy: send the params of an `EsState`
    /// built from the same config (same env and `hidden`).
    #[error("expected {expected} parameters, got {got}")]
    ParamsLength {
        /// What the policy shape needs.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// Some parameter is NaN or infinite. Remedy: check the sender; a diverged run must restart.
    #[error("parameters contain a non-finite value")]
    NonFiniteParams,
    /// The configuration is out of range; the message names the field and its limit.
    #[error("invalid es config: {0}")]
    InvalidConfig(&'static str),
    /// A result names a task that the current step did not issue (a stale answer from an earlier
    /// step, or a forged one). Remedy: drop it; it is not retryable.
    #[error(
        "result for noise seed {noise_seed:#x} / episode seed {episode_seed:#x} was not issued for step {step}"
    )]
    UnknownTask {
        /// The step the driver is at.
        step: u32,
        /// The result's noise seed.
        noise_seed: u64,
        /// The result's episode seed.
        episode_seed: u64,
    },
    /// Two results for one task. Remedy: deduplicate retried tasks before calling `update`.
    #[error("two results for noise seed {noise_seed:#x}")]
    DuplicateResult {
        /// The repeated noise seed.
        noise_seed: u64,
    },
    /// `update` got no results; ES needs at least one pair.
    #[error("no results to update from")]
    NoResults,
    /// A reward is NaN or infinite (these environments never produce one, so the result is corrupt).
    #[error("non-finite reward for noise seed {noise_seed:#x}")]
    NonFiniteReward {
        /// The result's noise seed.
        noise_seed: u64,
    },
}

/// Everything that defines an ES run. Cheap to send: the worker actors are built from it.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct EsConfig {
    /// The task.
    pub env: EnvKind,
    /// Hidden-layer width of the policy; 0 for a linear policy.
    pub hidden: u32,
    /// Mirrored pairs per step: one task per worker per step with the default 20 workers, i.e.
    /// `2 * population` episodes.
    pub population: u32,
    /// Standard deviation of the parameter perturbation.
    pub sigma: f32,
    /// Adam step size.
    pub lr: f32,
    /// L2 weight decay coefficient (pulls parameters towards 0 to keep them in tanh's useful range).
    pub l2: f32,
    /// Most ES steps to run.
    pub steps: u32,
    /// The one seed every random choice derives from.
    pub seed: u64,
    /// Episodes of the unperturbed policy evaluated after each update; 0 skips evaluation.
    pub eval_episodes: u32,
    /// Whether [`run_local`] stops at the first step whose evaluation reaches the threshold.
    pub stop_when_solved: bool,
}

impl EsConfig {
    /// Defaults tuned for `env`, up to 200 steps, seed 0.
    ///
    /// - CartPole-v1: linear policy, 20 pairs (one per worker of 20); solves (eval ≥ 475) in 10–61
    ///   steps for seeds 0–9.
    /// - Acrobot-v1: linear policy, 20 pairs; reaches −100 within a few steps — the task is easy for
    ///   a linear policy, which is why Pendulum is the demo's harder task.
    /// - Pendulum-v1: 16 tanh units, 40 pairs (two per worker of 20), lr 0.1; reaches −200 in
    ///   57–152 steps for nine of the seeds 0–9, while seed 4 sticks in a local optimum near −600
    ///   (ES on Pendulum with so small a population is not fully reliable, and we do not hide it).
    pub fn new(env: EnvKind) -> EsConfig {
        let base = EsConfig {
            env,
            hidden: 0,
            population: 20,
            sigma: 0.1,
            lr: 0.05,
            l2: 0.001,
            steps: 200,
            seed: 0,
            eval_episodes: 10,
            stop_when_solved: true,
        };
        match env {
            EnvKind::CartPole => base,
            EnvKind::Acrobot => EsConfig { hidden: 0, ..base },
            EnvKind::Pendulum => EsConfig {
                hidden: 16,
                population: 40,
                lr: 0.1,
                ..base
            },
        }
    }

    /// [`EsConfig::new`] for a Gymnasium id.
    ///
    /// # Errors
    /// [`EsError::Env`] with [`EnvError::UnknownEnv`] for an unknown name.
    pub fn from_name(env_name: &str) -> Result<EsConfig, EsError> {
        Ok(EsConfig::new(EnvKind::from_name(env_name)?))
    }

    /// The policy shape this config trains.
    pub fn policy_spec(&self) -> PolicySpec {
        PolicySpec::for_env(self.env, self.hidden as usize)
    }

    /// Checks every field against its limit.
    ///
    /// # Errors
    /// [`EsError::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> Result<(), EsError> {
        if self.population == 0 || self.population > MAX_POPULATION {
            return Err(EsError::InvalidConfig("population must be in 1..=65536"));
        }
        if self.hidden > MAX_HIDDEN {
            return Err(EsError::InvalidConfig("hidden must be at most 1024"));
        }
        check_sigma(self.sigma)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(EsError::InvalidConfig("lr must be finite and positive"));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return Err(EsError::InvalidConfig("l2 must be finite and non-negative"));
        }
        if self.steps > MAX_STEPS {
            return Err(EsError::InvalidConfig("steps must be at most 1000000"));
        }
        if self.eval_episodes > MAX_EVAL_EPISODES {
            return Err(EsError::InvalidConfig(
                "eval_episodes must be at most 10000",
            ));
        }
        Ok(())
    }
}

fn check_sigma(sigma: f32) -> Result<(), EsError> {
    if sigma.is_finite() && sigma > 0.0 {
        Ok(())
    } else {
        Err(EsError::InvalidConfig("sigma must be finite and positive"))
    }
}

/// One unit of worker work: evaluate `θ ± σ·ε(noise_seed)` on the episode `episode_seed` starts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Task {
    /// Seeds the perturbation ε.
    pub noise_seed: u64,
    /// Seeds the environment's start state (shared by both mirrored episodes).
    pub episode_seed: u64,
}

/// What a worker sends back for one [`Task`].
#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WorkerResult {
    /// The task's noise seed.
    pub noise_seed: u64,
    /// The task's episode seed.
    pub episode_seed: u64,
    /// Return of the episode with `θ + σε`.
    pub reward_pos: f32,
    /// Return of the episode with `θ − σε`.
    pub reward_neg: f32,
    /// Environment steps taken by both episodes together.
    pub env_steps: u32,
}

/// SplitMix64's finaliser: a cheap bijective mix, so distinct inputs give distinct seeds.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Derives a child seed from a parent and a label (step, index, purpose).
fn derive(parent: u64, label: u64) -> u64 {
    splitmix(parent ^ splitmix(label))
}

const SALT_NOISE: u64 = 1;
const SALT_EPISODE: u64 = 2;
const SALT_EVAL: u64 = 3;
const SALT_INIT: u64 = 4;

/// Fills `out` with standard normal samples (Box–Muller, in `f64` for accuracy in the tails).
pub(crate) fn fill_normal(rng: &mut StdRng, out: &mut [f32]) {
    fill_normal_with(rng, out);
}

/// [`fill_normal`] for any generator.
pub(crate) fn fill_normal_with(rng: &mut impl Rng, out: &mut [f32]) {
    for pair in out.chunks_mut(2) {
        // 1 − U lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        pair[0] = (r * c) as f32;
        if let Some(second) = pair.get_mut(1) {
            *second = (r * s) as f32;
        }
    }
}

/// The perturbation ε for `noise_seed`: `n` standard normal values, identical on every machine.
pub fn noise(noise_seed: u64, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    fill_noise(noise_seed, &mut v);
    v
}

fn fill_noise(noise_seed: u64, out: &mut [f32]) {
    fill_normal(&mut StdRng::seed_from_u64(noise_seed), out);
}

/// The worker side: one environment and scratch buffers, kept for the life of an actor.
#[derive(Debug)]
pub struct Worker {
    env: Box<dyn Env>,
    policy: Policy,
    sigma: f32,
    eps: Vec<f32>,
    theta: Vec<f32>,
}

impl Worker {
    /// A worker for `env` with a policy of `hidden` units (0: linear) and perturbation scale `sigma`.
    ///
    /// # Errors
    /// [`EsError::InvalidConfig`] for a non-positive or non-finite `sigma` or too wide a layer.
    pub fn new(env: EnvKind, hidden: u32, sigma: f32) -> Result<Worker, EsError> {
        check_sigma(sigma)?;
        if hidden > MAX_HIDDEN {
            return Err(EsError::InvalidConfig("hidden must be at most 1024"));
        }
        let spec = PolicySpec::for_env(env, hidden as usize);
        let n = spec.num_params();
        Ok(Worker {
            env: env.make(),
            policy: Policy::new(spec),
            sigma,
            eps: vec![0.0; n],
            theta: vec![0.0; n],
        })
    }

    /// A worker for the run `config` describes.
    ///
    /// # Errors
    /// [`EsError::InvalidConfig`] if the config does not validate.
    pub fn from_config(config: &EsConfig) -> Result<Worker, EsError> {
        config.validate()?;
        Worker::new(config.env, config.hidden, config.sigma)
    }

    /// Runs the mirrored pair for `task` around `params`.
    ///
    /// # Errors
    /// [`EsError::ParamsLength`] or [`EsError::NonFiniteParams`] for params that do not fit.
    pub fn evaluate(&mut self, params: &[f32], task: Task) -> Result<WorkerResult, EsError> {
        self.policy.spec().check(params)?;
        fill_noise(task.noise_seed, &mut self.eps);
        let mut rewards = [0.0f32; 2];
        let mut env_steps = 0u32;
        for (sign, reward) in [1.0f32, -1.0].into_iter().zip(&mut rewards) {
            for ((t, p), e) in self.theta.iter_mut().zip(params).zip(&self.eps) {
                *t = p + sign * self.sigma * e;
            }
            let (ret, steps) = run_episode(
                self.env.as_mut(),
                &mut self.policy,
                &self.theta,
                task.episode_seed,
            )?;
            *reward = ret as f32;
            env_steps = env_steps.saturating_add(steps);
        }
        Ok(WorkerResult {
            noise_seed: task.noise_seed,
            episode_seed: task.episode_seed,
            reward_pos: rewards[0],
            reward_neg: rewards[1],
            env_steps,
        })
    }

    /// The return of one episode of the unperturbed policy `params` (for evaluation).
    ///
    /// # Errors
    /// As [`Worker::evaluate`].
    pub fn episode(&mut self, params: &[f32], episode_seed: u64) -> Result<f32, EsError> {
        self.policy.spec().check(params)?;
        let (ret, _) = run_episode(self.env.as_mut(), &mut self.policy, params, episode_seed)?;
        Ok(ret as f32)
    }
}

fn run_episode(
    env: &mut dyn Env,
    policy: &mut Policy,
    params: &[f32],
    episode_seed: u64,
) -> Result<(f64, u32), EnvError> {
    let mut rng = StdRng::seed_from_u64(episode_seed);
    rollout(env, &mut rng, |obs| policy.act(params, obs))
}

/// The worker side as one call, with the default policy shape of [`EsConfig::new`] for `env_name`.
///
/// Actors should prefer a long-lived [`Worker`] (it keeps its buffers); this is the stateless form.
///
/// # Errors
/// [`EsError::Env`] for an unknown name, [`EsError::InvalidConfig`] for a bad `sigma`,
/// [`EsError::ParamsLength`]/[`EsError::NonFiniteParams`] for params of another shape.
pub fn evaluate(
    env_name: &str,
    params: &[f32],
    noise_seed: u64,
    sigma: f32,
    episode_seed: u64,
) -> Result<WorkerResult, EsError> {
    let config = EsConfig::from_name(env_name)?;
    Worker::new(config.env, config.hidden, sigma)?.evaluate(
        params,
        Task {
            noise_seed,
            episode_seed,
        },
    )
}

/// Mean return of the unperturbed `params` over `episodes` episodes seeded from `seed`.
///
/// # Errors
/// As [`Worker::evaluate`]; [`EsError::InvalidConfig`] for zero or too many episodes.
pub fn evaluate_policy(
    config: &EsConfig,
    params: &[f32],
    episodes: u32,
    seed: u64,
) -> Result<f32, EsError> {
    if episodes == 0 || episodes > MAX_EVAL_EPISODES {
        return Err(EsError::InvalidConfig("eval episodes must be in 1..=10000"));
    }
    let mut w = Worker::from_config(config)?;
    let mut total = 0.0f64;
    for i in 0..episodes {
        total += f64::from(w.episode(params, derive(seed, u64::from(i)))?);
    }
    Ok((total / f64::from(episodes)) as f32)
}

/// Adam (Kingma and Ba, 2015), ascending.
#[derive(Debug, Clone)]
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    const BETA1: f32 = 0.9;
    const BETA2: f32 = 0.999;
    const EPS: f32 = 1e-8;

    fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// Moves `theta` up the gradient estimate `g` by about `lr` per coordinate.
    fn ascend(&mut self, theta: &mut [f32], g: &[f32], lr: f32) {
        self.t = self.t.saturating_add(1);
        let bias = (1.0 - Self::BETA2.powi(self.t)).sqrt() / (1.0 - Self::BETA1.powi(self.t));
        for i in 0..theta.len() {
            self.m[i] = Self::BETA1 * self.m[i] + (1.0 - Self::BETA1) * g[i];
            self.v[i] = Self::BETA2 * self.v[i] + (1.0 - Self::BETA2) * g[i] * g[i];
            theta[i] += lr * bias * self.m[i] / (self.v[i].sqrt() + Self::EPS);
        }
    }
}

/// Ranks of `x` scaled into `[−0.5, 0.5]`; equal values share the mean of their ranks, so a pair
/// whose two episodes scored the same (common at CartPole's 500 cap) pushes nowhere.
pub fn centered_ranks(x: &[f32]) -> Vec<f32> {
    let n = x.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0f32; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f32 / 2.0;
        for &k in &idx[i..=j] {
            ranks[k] = mean_rank / (n - 1) as f32 - 0.5;
        }
        i = j + 1;
    }
    ranks
}

/// What one ES step did.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StepStats {
    /// The step just completed (0-based).
    pub step: u32,
    /// Mean return of the perturbed episodes.
    pub mean_reward: f32,
    /// Best perturbed return.
    pub max_reward: f32,
    /// Worst perturbed return.
    pub min_reward: f32,
    /// Mean return of the updated, unperturbed policy (`None` when `eval_episodes` is 0).
    pub eval_reward: Option<f32>,
    /// Mirrored pairs that contributed (fewer than `population` if some were lost).
    pub pairs: u32,
    /// Environment steps the workers took.
    pub env_steps: u64,
    /// Euclidean norm of the parameters after the update.
    pub param_norm: f32,
    /// Whether `eval_reward` reached the environment's solved threshold.
    pub solved: bool,
}

/// The driver side: parameters, optimiser state and the step counter. No I/O, no clock.
#[derive(Debug)]
pub struct EsState {
    config: EsConfig,
    params: Vec<f32>,
    adam: Adam,
    step: u32,
    /// Evaluates the unperturbed policy on the driver after each update.
    evaluator: Worker,
}

impl EsState {
    /// A fresh run: initial parameters derived from `config.seed`.
    ///
    /// # Errors
    /// [`EsError::InvalidConfig`] if the config does not validate.
    pub fn new(config: EsConfig) -> Result<EsState, EsError> {
        config.validate()?;
        let spec = config.policy_spec();
        let params = spec.init_params(derive(config.seed, SALT_INIT));
        Ok(EsState {
            evaluator: Worker::from_config(&config)?,
            adam: Adam::new(params.len()),
            params,
            step: 0,
            config,
        })
    }

    /// The run's configuration.
    pub fn config(&self) -> &EsConfig {
        &self.config
    }

    /// The current policy parameters: send these with every task of this step.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Steps completed so far (the step the next `update` completes).
    pub fn step(&self) -> u32 {
        self.step
    }

    /// Whether `step` has reached `config.steps`.
    pub fn finished(&self) -> bool {
        self.step >= self.config.steps
    }

    /// The `population` tasks of the current step, a pure function of the seed and the step number.
    pub fn next_tasks(&self) -> Vec<Task> {
        self.tasks_for(self.step)
    }

    /// The tasks of any `step` (a pure function of the seed and the step), for drivers that want to
    /// look ahead; `update` accepts only the current step's.
    pub fn tasks_for(&self, step: u32) -> Vec<Task> {
        let noise = derive(derive(self.config.seed, SALT_NOISE), u64::from(step));
        let episode = derive(derive(self.config.seed, SALT_EPISODE), u64::from(step));
        (0..u64::from(self.config.population))
            .map(|i| Task {
                noise_seed: derive(noise, i),
                episode_seed: derive(episode, i),
            })
            .collect()
    }

    /// Combines the workers' results for the current step into one Adam step, then evaluates the
    /// new policy. Results may come in any order; a subset is fine (lost workers).
    ///
    /// # Errors
    /// [`EsError::NoResults`], [`EsError::UnknownTask`], [`EsError::DuplicateResult`] or
    /// [`EsError::NonFiniteReward`], or [`EsError::NonFiniteParams`] if the step diverged; the state
    /// is unchanged on error.
    pub fn update(&mut self, results: &[WorkerResult]) -> Result<StepStats, EsError> {
        if results.is_empty() {
            return Err(EsError::NoResults);
        }
        let issued: HashMap<Task, usize> = self
            .next_tasks()
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i))
            .collect();
        let mut slots: Vec<Option<&WorkerResult>> = vec![None; issued.len()];
        for r in results {
            let task = Task {
                noise_seed: r.noise_seed,
                episode_seed: r.episode_seed,
            };
            let Some(&i) = issued.get(&task) else {
                return Err(EsError::UnknownTask {
                    step: self.step,
                    noise_seed: r.noise_seed,
                    episode_seed: r.episode_seed,
                });
            };
            if !(r.reward_pos.is_finite() && r.reward_neg.is_finite()) {
                return Err(EsError::NonFiniteReward {
                    noise_seed: r.noise_seed,
                });
            }
            if slots[i].replace(r).is_some() {
                return Err(EsError::DuplicateResult {
                    noise_seed: r.noise_seed,
                });
            }
        }
        // Issue order, not arrival order, so the float sums below are reproducible.
        let ordered: Vec<&WorkerResult> = slots.into_iter().flatten().collect();
        let rewards: Vec<f32> = ordered
            .iter()
            .flat_map(|r| [r.reward_pos, r.reward_neg])
            .collect();
        let shaped = centered_ranks(&rewards);

        let n = self.params.len();
        let mut grad = vec![0.0f32; n];
        let mut eps = vec![0.0f32; n];
        for (k, r) in ordered.iter().enumerate() {
            let w = shaped[2 * k] - shaped[2 * k + 1];
            if w == 0.0 {
                continue;
            }
            fill_noise(r.noise_seed, &mut eps);
            for (g, e) in grad.iter_mut().zip(&eps) {
                *g += w * e;
            }
        }
        let scale = 1.0 / (rewards.len() as f32 * self.config.sigma);
        for (g, p) in grad.iter_mut().zip(&self.params) {
            *g = *g * scale - self.config.l2 * p;
        }
        // Step a copy, evaluate it, and only then commit: an error leaves the state as it was.
        let mut params = self.params.clone();
        let mut adam = self.adam.clone();
        adam.ascend(&mut params, &grad, self.config.lr);
        let stats_step = self.step;
        let eval_reward = if self.config.eval_episodes > 0 {
            let seed = derive(derive(self.config.seed, SALT_EVAL), u64::from(stats_step));
            let mut total = 0.0f64;
            for i in 0..self.config.eval_episodes {
                total += f64::from(
                    self.evaluator
                        .episode(&params, derive(seed, u64::from(i)))?,
                );
            }
            Some((total / f64::from(self.config.eval_episodes)) as f32)
        } else {
            // The evaluator would have caught a diverged step; without it, check here.
            if !params.iter().all(|p| p.is_finite()) {
                return Err(EsError::NonFiniteParams);
            }
            None
        };
        self.params = params;
        self.adam = adam;
        self.step += 1;
        let sum: f64 = rewards.iter().map(|&r| f64::from(r)).sum();
        Ok(StepStats {
            step: stats_step,
            mean_reward: (sum / rewards.len() as f64) as f32,
            max_reward: rewards.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            min_reward: rewards.iter().copied().fold(f32::INFINITY, f32::min),
            eval_reward,
            pairs: ordered.len() as u32,
            env_steps: ordered.iter().map(|r| u64::from(r.env_steps)).sum(),
            param_norm: self.params.iter().map(|p| p * p).sum::<f32>().sqrt(),
            solved: eval_reward.is_some_and(|e| e >= self.config.env.solved_threshold()),
        })
    }
}

/// Everything needed to resume a run exactly: what a driver writes to disk or the object store so
/// that a restarted driver continues where it stopped.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct EsCheckpoint {
    /// The run's configuration.
    pub config: EsConfig,
    /// Steps completed.
    pub step: u32,
    /// Policy parameters.
    pub params: Vec<f32>,
    /// Adam's first-moment estimate.
    pub adam_m: Vec<f32>,
    /// Adam's second-moment estimate.
    pub adam_v: Vec<f32>,
    /// Adam's step count.
    pub adam_t: i32,
}

impl EsState {
    /// A snapshot from which [`EsState::restore`] continues bit-for-bit identically.
    pub fn checkpoint(&self) -> EsCheckpoint {
        EsCheckpoint {
            config: self.config.clone(),
            step: self.step,
            params: self.params.clone(),
            adam_m: self.adam.m.clone(),
            adam_v: self.adam.v.clone(),
            adam_t: self.adam.t,
        }
    }

    /// Resumes from a checkpoint (which may come from disk or the network, so it is checked).
    ///
    /// # Errors
    /// [`EsError::InvalidConfig`] for a bad config, a step beyond `config.steps`, or a negative
    /// Adam count; [`EsError::ParamsLength`] if any vector has the wrong length;
    /// [`EsError::NonFiniteParams`] if any holds NaN or ±∞ (or a negative second moment).
    pub fn restore(cp: EsCheckpoint) -> Result<EsState, EsError> {
        let mut state = EsState::new(cp.config)?;
        if cp.step > state.config.steps || cp.adam_t < 0 {
            return Err(EsError::InvalidConfig(
                "checkpoint step or adam count out of range",
            ));
        }
        let n = state.params.len();
        for v in [&cp.params, &cp.adam_m, &cp.adam_v] {
            if v.len() != n {
                return Err(EsError::ParamsLength {
                    expected: n,
                    got: v.len(),
                });
            }
            if !v.iter().all(|x| x.is_finite()) {
                return Err(EsError::NonFiniteParams);
            }
        }
        if cp.adam_v.iter().any(|&x| x < 0.0) {
            return Err(EsError::NonFiniteParams);
        }
        state.step = cp.step;
        state.params = cp.params;
        state.adam = Adam {
            m: cp.adam_m,
            v: cp.adam_v,
            t: cp.adam_t,
        };
        Ok(state)
    }
}

/// One point of a learning curve.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CurvePoint {
    /// ES step (0-based).
    pub step: u32,
    /// Mean perturbed return.
    pub mean_reward: f32,
    /// Best perturbed return.
    pub max_reward: f32,
    /// Mean return of the unperturbed policy, if evaluated.
    pub eval_reward: Option<f32>,
    /// Seconds since the run started, measured by the driver.
    pub elapsed_s: f64,
}

/// A learning curve: what a run did, step by step.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Curve {
    /// The task.
    pub env: EnvKind,
    /// The solved threshold the run aimed at.
    pub threshold: f32,
    /// One point per step.
    pub points: Vec<CurvePoint>,
    /// The first step whose evaluation reached the threshold.
    pub solved_at: Option<u32>,
    /// The final parameters.
    pub params: Vec<f32>,
}

impl Curve {
    /// An empty curve for `env`.
    pub fn new(env: EnvKind) -> Curve {
        Curve {
            env,
            threshold: env.solved_threshold(),
            points: Vec::new(),
            solved_at: None,
            params: Vec::new(),
        }
    }

    /// Appends the stats of one step, measured `elapsed_s` after the start.
    pub fn push(&mut self, stats: &StepStats, elapsed_s: f64) {
        if stats.solved && self.solved_at.is_none() {
            self.solved_at = Some(stats.step);
        }
        self.points.push(CurvePoint {
            step: stats.step,
            mean_reward: stats.mean_reward,
            max_reward: stats.max_reward,
            eval_reward: stats.eval_reward,
            elapsed_s,
        });
    }

    /// The best evaluation reached.
    pub fn best_eval(&self) -> Option<f32> {
        self.points
            .iter()
            .filter_map(|p| p.eval_reward)
            .reduce(f32::max)
    }
}

/// Runs ES sequentially in this thread, workers and driver alike; `on_step` sees every step's stats
/// (for progress output). Stops after `config.steps`, or once solved if `config.stop_when_solved`.
///
/// # Errors
/// [`EsError::InvalidConfig`] for a bad config; nothing else is expected.
pub fn run_local_with(
    config: EsConfig,
    mut on_step: impl FnMut(&StepStats),
) -> Result<Curve, EsError> {
    let start = Instant::now();
    let mut workers = Worker::from_config(&config)?;
    let mut state = EsState::new(config)?;
    let mut curve = Curve::new(state.config().env);
    while !state.finished() {
        let results = state
            .next_tasks()
            .into_iter()
            .map(|t| workers.evaluate(state.params(), t))
            .collect::<Result<Vec<_>, _>>()?;
        let stats = state.update(&results)?;
        curve.push(&stats, start.elapsed().as_secs_f64());
        on_step(&stats);
        if stats.solved && state.config().stop_when_solved {
            break;
        }
    }
    curve.params = state.params().to_vec();
    Ok(curve)
}

/// [`run_local_with`] without a progress callback.
///
/// # Errors
/// As [`run_local_with`].
pub fn run_local(config: EsConfig) -> Result<Curve, EsError> {
    run_local_with(config, |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(env: EnvKind) -> EsConfig {
        EsConfig {
            eval_episodes: 0,
            population: 8,
            ..EsConfig::new(env)
        }
    }

    #[test]
    fn noise_is_deterministic_and_standard_normal() {
        assert_eq!(noise(5, 101), noise(5, 101));
        assert_ne!(noise(5, 101), noise(6, 101));
        // A prefix of a longer draw is the shorter draw (pairs are generated in order).
        assert_eq!(noise(5, 100)[..], noise(5, 101)[..100]);
        let v = noise(9, 200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        let beyond_2 = v.iter().filter(|x| x.abs() > 2.0).count() as f64 / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        // P(|Z| > 2) = 0.0455.
        assert!((beyond_2 - 0.0455).abs() < 0.003, "tail {beyond_2}");
    }

    #[test]
    fn centered_ranks_by_hand() {
        assert_eq!(centered_ranks(&[1.0, 3.0, 2.0]), vec![-0.5, 0.5, 0.0]);
        // Ties share the mean rank: ranks (0.5, 0.5, 2.5, 2.5) / 3 − 0.5.
        let r = centered_ranks(&[1.0, 1.0, 5.0, 5.0]);
        let want = [
            0.5 / 3.0 - 0.5,
            0.5 / 3.0 - 0.5,
            2.5 / 3.0 - 0.5,
            2.5 / 3.0 - 0.5,
        ];
        for (a, b) in r.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{r:?}");
        }
        assert_eq!(centered_ranks(&[7.0]), vec![0.0]);
        assert!(centered_ranks(&[]).is_empty());
    }

    #[test]
    fn worker_runs_both_mirrored_episodes() {
        let config = small(EnvKind::CartPole);
        let state = EsState::new(config.clone()).unwrap();
        let task = state.next_tasks()[3];
        let mut w = Worker::from_config(&config).unwrap();
        let r = w.evaluate(state.params(), task).unwrap();
        assert_eq!(
            (r.noise_seed, r.episode_seed),
            (task.noise_seed, task.episode_seed)
        );
        // Rebuild the two perturbed policies by hand and run them as plain episodes.
        let eps = noise(task.noise_seed, state.params().len());
        let plus: Vec<f32> = state
            .params()
            .iter()
            .zip(&eps)
            .map(|(p, e)| p + config.sigma * e)
            .collect();
        let minus: Vec<f32> = state
            .params()
            .iter()
            .zip(&eps)
            .map(|(p, e)| p - config.sigma * e)
            .collect();
        assert_eq!(r.reward_pos, w.episode(&plus, task.episode_seed).unwrap());
        assert_eq!(r.reward_neg, w.episode(&minus, task.episode_seed).unwrap());
        assert!(
            r.env_steps as f32 == r.reward_pos + r.reward_neg,
            "CartPole pays 1 per step"
        );
        // The stateless form agrees with the long-lived worker.
        let free = evaluate(
            "CartPole-v1",
            state.params(),
            task.noise_seed,
            config.sigma,
            task.episode_seed,
        )
        .unwrap();
        assert_eq!(free, r);
    }

    #[test]
    fn worker_rejects_bad_input() {
        let mut w = Worker::new(EnvKind::CartPole, 0, 0.1).unwrap();
        let t = Task {
            noise_seed: 1,
            episode_seed: 2,
        };
        assert_eq!(
            w.evaluate(&[0.0; 3], t),
            Err(EsError::ParamsLength {
                expected: 10,
                got: 3
            })
        );
        assert_eq!(
            w.evaluate(&[f32::INFINITY; 10], t),
            Err(EsError::NonFiniteParams)
        );
        assert!(matches!(
            evaluate("Nope-v0", &[0.0; 10], 1, 0.1, 2),
            Err(EsError::Env(EnvError::UnknownEnv(_)))
        ));
        assert!(matches!(
            evaluate("CartPole-v1", &[0.0; 10], 1, -0.1, 2),
            Err(EsError::InvalidConfig(_))
        ));
        assert!(matches!(
            Worker::new(EnvKind::CartPole, 0, f32::NAN),
            Err(EsError::InvalidConfig(_))
        ));
    }

    #[test]
    fn config_limits() {
        let ok = EsConfig::new(EnvKind::CartPole);
        assert!(ok.validate().is_ok());
        for bad in [
            EsConfig {
                population: 0,
                ..ok.clone()
            },
            EsConfig {
                population: MAX_POPULATION + 1,
                ..ok.clone()
            },
            EsConfig {
                hidden: MAX_HIDDEN + 1,
                ..ok.clone()
            },
            EsConfig {
                sigma: 0.0,
                ..ok.clone()
            },
            EsConfig {
                lr: f32::NAN,
                ..ok.clone()
            },
            EsConfig {
                l2: -1.0,
                ..ok.clone()
            },
            EsConfig {
                steps: MAX_STEPS + 1,
                ..ok.clone()
            },
            EsConfig {
                eval_episodes: MAX_EVAL_EPISODES + 1,
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(EsError::InvalidConfig(_))),
                "{bad:?}"
            );
            assert!(EsState::new(bad.clone()).is_err());
            assert!(Worker::from_config(&bad).is_err());
        }
    }

    #[test]
    fn tasks_are_distinct_and_depend_on_seed_and_step() {
        let mut state = EsState::new(small(EnvKind::CartPole)).unwrap();
        let t0 = state.next_tasks();
        assert_eq!(t0.len(), 8);
        let mut seeds: Vec<u64> = t0
            .iter()
            .flat_map(|t| [t.noise_seed, t.episode_seed])
            .collect();
        seeds.sort_unstable();
        seeds.dedup();
        assert_eq!(seeds.len(), 16);
        let other = EsState::new(EsConfig {
            seed: 1,
            ..small(EnvKind::CartPole)
        })
        .unwrap();
        assert_ne!(other.next_tasks(), t0);
        let results: Vec<_> = {
            let mut w = Worker::from_config(state.config()).unwrap();
            t0.iter()
                .map(|&t| w.evaluate(state.params(), t).unwrap())
                .collect()
        };
        state.update(&results).unwrap();
        assert_eq!(state.step(), 1);
        assert_ne!(state.next_tasks(), t0);
    }

    /// Fabricated results for a known fitness, f(θ) = −|θ − target|², with no environment involved:
    /// the update must walk the parameters to the target.
    fn quadratic_results(state: &EsState, target: &[f32]) -> Vec<WorkerResult> {
        let sigma = state.config().sigma;
        let f = |theta: Vec<f32>| -> f32 {
            -theta
                .iter()
                .zip(target)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
        };
        state
            .next_tasks()
            .into_iter()
            .map(|t| {
                let eps = noise(t.noise_seed, state.params().len());
                let at = |sign: f32| {
                    state
                        .params()
                        .iter()
                        .zip(&eps)
                        .map(|(p, e)| p + sign * sigma * e)
                        .collect()
                };
                WorkerResult {
                    noise_seed: t.noise_seed,
                    episode_seed: t.episode_seed,
                    reward_pos: f(at(1.0)),
                    reward_neg: f(at(-1.0)),
                    env_steps: 0,
                }
            })
            .collect()
    }

    #[test]
    fn update_climbs_a_known_fitness() {
        let config = EsConfig {
            population: 20,
            lr: 0.05,
            l2: 0.0,
            ..small(EnvKind::CartPole)
        };
        let mut state = EsState::new(config).unwrap();
        let target: Vec<f32> = (0..10).map(|i| i as f32 / 5.0 - 1.0).collect();
        let dist = |s: &EsState| {
            s.params()
                .iter()
                .zip(&target)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        let start = dist(&state);
        for _ in 0..300 {
            let results = quadratic_results(&state, &target);
            let stats = state.update(&results).unwrap();
            assert_eq!(stats.pairs, 20);
            assert_eq!(stats.eval_reward, None);
        }
        let end = dist(&state);
        assert!(end < 0.1 * start, "distance {start} -> {end}");
    }

    #[test]
    fn update_ignores_arrival_order_and_accepts_a_subset() {
        let config = small(EnvKind::CartPole);
        let target = [0.3f32; 10];
        let mut a = EsState::new(config.clone()).unwrap();
        let mut b = EsState::new(config.clone()).unwrap();
        let results = quadratic_results(&a, &target);
        let mut shuffled = results.clone();
        shuffled.reverse();
        shuffled.swap(1, 5);
        assert_eq!(a.update(&results).unwrap(), b.update(&shuffled).unwrap());
        assert_eq!(a.params(), b.params());
        // A lost worker: five of eight pairs still make a step.
        let part = quadratic_results(&a, &target);
        let stats = a.update(&part[..5]).unwrap();
        assert_eq!(stats.pairs, 5);
        assert_eq!(a.step(), 2);
    }

    #[test]
    fn bad_results_are_errors_and_leave_the_state_alone() {
        let mut state = EsState::new(small(EnvKind::CartPole)).unwrap();
        let good = quadratic_results(&state, &[1.0; 10]);
        let before = state.params().to_vec();
        let mut stale = good.clone();
        stale[2].episode_seed ^= 1;
        let mut dup = good.clone();
        dup.push(good[0]);
        let mut nan = good.clone();
        nan[4].reward_neg = f32::NAN;
        assert_eq!(state.update(&[]), Err(EsError::NoResults));
        assert!(matches!(
            state.update(&stale),
            Err(EsError::UnknownTask { step: 0, .. })
        ));
        assert!(matches!(
            state.update(&dup),
            Err(EsError::DuplicateResult { .. })
        ));
        assert!(matches!(
            state.update(&nan),
            Err(EsError::NonFiniteReward { .. })
        ));
        assert_eq!(state.params(), &before[..]);
        assert_eq!(state.step(), 0);
        // Results of step 0 are stale at step 1.
        state.update(&good).unwrap();
        assert!(matches!(
            state.update(&good),
            Err(EsError::UnknownTask { step: 1, .. })
        ));
    }

    #[test]
    fn equal_rewards_give_no_step() {
        // Every episode scores the same: all ranks tie, the gradient is zero and so is the move
        // (l2 = 0), whatever the noise.
        let config = EsConfig {
            l2: 0.0,
            ..small(EnvKind::CartPole)
        };
        let mut state = EsState::new(config).unwrap();
        let before = state.params().to_vec();
        let results: Vec<WorkerResult> = state
            .next_tasks()
            .into_iter()
            .map(|t| WorkerResult {
                noise_seed: t.noise_seed,
                episode_seed: t.episode_seed,
                reward_pos: 500.0,
                reward_neg: 500.0,
                env_steps: 1000,
            })
            .collect();
        let stats = state.update(&results).unwrap();
        assert_eq!(state.params(), &before[..]);
        assert_eq!(
            (stats.mean_reward, stats.max_reward, stats.min_reward),
            (500.0, 500.0, 500.0)
        );
        assert_eq!(stats.env_steps, 8000);
    }

    #[test]
    fn checkpoint_resumes_bit_for_bit() {
        let config = EsConfig {
            eval_episodes: 2,
            ..small(EnvKind::CartPole)
        };
        let run = |state: &mut EsState, steps: u32| {
            let mut w = Worker::from_config(state.config()).unwrap();
            let mut out = Vec::new();
            for _ in 0..steps {
                let results: Vec<_> = state
                    .next_tasks()
                    .into_iter()
                    .map(|t| w.evaluate(state.params(), t).unwrap())
                    .collect();
                out.push(state.update(&results).unwrap());
            }
            out
        };
        let mut straight = EsState::new(config.clone()).unwrap();
        let all = run(&mut straight, 6);
        let mut first = EsState::new(config).unwrap();
        let head = run(&mut first, 3);
        // Through rkyv bytes, as a driver would store it.
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&first.checkpoint()).unwrap();
        let cp = rkyv::from_bytes::<EsCheckpoint, rkyv::rancor::Error>(&bytes).unwrap();
        let mut resumed = EsState::restore(cp).unwrap();
        assert_eq!(resumed.step(), 3);
        let tail = run(&mut resumed, 3);
        assert_eq!([head, tail].concat(), all);
        assert_eq!(resumed.params(), straight.params());
    }

    #[test]
    fn corrupt_checkpoints_are_rejected() {
        let good = EsState::new(small(EnvKind::CartPole)).unwrap().checkpoint();
        let mut short = good.clone();
        short.adam_v.pop();
        assert!(matches!(
            EsState::restore(short),
            Err(EsError::ParamsLength { .. })
        ));
        let mut nan = good.clone();
        nan.adam_m[0] = f32::NAN;
        assert_eq!(EsState::restore(nan).unwrap_err(), EsError::NonFiniteParams);
        let mut neg = good.clone();
        neg.adam_v[0] = -1.0;
        assert_eq!(EsState::restore(neg).unwrap_err(), EsError::NonFiniteParams);
        let mut late = good.clone();
        late.step = late.config.steps + 1;
        assert!(matches!(
            EsState::restore(late),
            Err(EsError::InvalidConfig(_))
        ));
        assert!(EsState::restore(good).is_ok());
    }

    #[test]
    fn wire_types_round_trip_through_rkyv() {
        let config = EsConfig::new(EnvKind::Pendulum);
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&config).unwrap();
        let archived = rkyv::access::<ArchivedEsConfig, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(archived.population, 40);
        let back: EsConfig = rkyv::deserialize::<_, rkyv::rancor::Error>(archived).unwrap();
        assert_eq!(back, config);

        let r = WorkerResult {
            noise_seed: 1,
            episode_seed: 2,
            reward_pos: 3.5,
            reward_neg: -1.0,
            env_steps: 9,
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&r).unwrap();
        let archived = rkyv::access::<ArchivedWorkerResult, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(archived.reward_pos, 3.5);
        assert_eq!(
            rkyv::deserialize::<WorkerResult, rkyv::rancor::Error>(archived).unwrap(),
            r
        );
        // Truncated bytes from a peer are an error, not a panic.
        assert!(rkyv::access::<ArchivedEsConfig, rkyv::rancor::Error>(&bytes[..3]).is_err());
    }
}
