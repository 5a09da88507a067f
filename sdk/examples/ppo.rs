//! PPO on CartPole-v1 with oxray: rollout-worker actors gather experience with the current policy,
//! a learner actor turns it into clipped-surrogate updates, and the driver only moves refs and
//! prints progress.
//!
//! ```text
//! learner = Learner.remote(seed)
//! workers = [RolloutWorker.remote(seed, i) for i in range(N)]   # each keeps its env running
//! loop:
//!     policy = learner.policy.remote()                           # a ref, straight to the workers
//!     batch = get([w.rollout.remote(policy, T) for w in workers])
//!     stats = get(learner.update.remote(batch))                  # GAE, K epochs of minibatch Adam
//! ```
//!
//! The networks are hand-written two-hidden-layer tanh MLPs with manual backprop (no framework:
//! this machine has two cores and the nets have ~5k parameters); the hyper-parameters follow the
//! usual CartPole PPO recipe (γ 0.99, λ 0.95, clip 0.2, 4 epochs, 4 minibatches, lr 2.5e-4 annealed,
//! entropy 0.01, grad-norm clip 0.5). Time-limit truncation bootstraps from the critic instead of
//! counting as a failure. Solved means both the mean return of the last 20 training episodes (the
//! stochastic policy, as RLlib reports it) and the greedy policy's mean over 10 evaluation
//! episodes reach 475; the run stops there and reports env timesteps per second.
//!
//! Deterministic for a given `--seed`: workers and learner seed their own generators, and the
//! rollouts are combined in worker order.
//!
//! ```text
//! cargo run --release --example ppo                      # 4 workers x 128 steps per iteration
//! cargo run --release --example ppo -- --workers 8 --seed 3
//! cargo run --release --example ppo -- --quick
//! ```
//!
//! Cluster use is as for the `es` example (`-- start --head`, `-- start --address A --token T`,
//! then the driver with `OXRAY_ADDRESS`/`OXRAY_TOKEN`).
//!
//! Measured (2-core VM under load, embedded, release, defaults): seeds 1–4 all solve, after
//! 138,752 / 143,872 / 174,080 / 184,320 env steps (27–68 s wall, ~3–5k env timesteps/s). The
//! learner's single thread is the bottleneck (~90% of the time); rollouts take ~7%.
//!
//! What this is not: a general RL library (discrete actions, CartPole only, no observation
//! normalisation, no vectorised envs inside a worker).

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use oxray::{ActorHandle, ActorOptions, Strategy};
use oxray_apps::env::{Action, Env, EnvKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Observation width of CartPole.
const OBS: usize = 4;
/// Discrete actions of CartPole.
const ACTIONS: usize = 2;
/// Hidden width of both networks.
const HIDDEN: usize = 64;
/// Most rollout workers.
const MAX_WORKERS: usize = 256;
/// Most steps one worker collects per iteration (bounds the message and the learner's batch).
const MAX_ROLLOUT: u32 = 16_384;
/// Iterations in a `--quick` run.
const QUICK_ITERS: u32 = 3;
/// Greedy evaluation episodes behind "solved".
const EVAL_EPISODES: u32 = 10;
/// CartPole-v1's threshold.
const THRESHOLD: f32 = 475.0;
/// Training episodes whose mean return decides "solved" (with the greedy evaluation).
const RECENT: usize = 20;

/// PPO hyper-parameters (the learner's; workers need none).
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PpoConfig {
    /// Discount.
    pub gamma: f32,
    /// GAE's λ.
    pub lambda: f32,
    /// Ratio clip ε.
    pub clip: f32,
    /// Passes over each batch.
    pub epochs: u32,
    /// Minibatches per pass.
    pub minibatches: u32,
    /// Adam step size at the start (annealed linearly to 0 over `iterations`).
    pub lr: f32,
    /// Entropy bonus weight.
    pub ent_coef: f32,
    /// Value loss weight.
    pub vf_coef: f32,
    /// Global gradient-norm limit.
    pub max_grad_norm: f32,
    /// Iterations the learning rate anneals over.
    pub iterations: u32,
    /// Seed of the initial weights and the minibatch shuffles.
    pub seed: u64,
}

/// PPO with rollout-worker actors and a learner actor on CartPole-v1.
#[derive(Debug, Parser)]
#[command(name = "ppo")]
struct Args {
    /// Rollout-worker actors.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Env steps each worker collects per iteration.
    #[arg(long, default_value_t = 128)]
    steps: u32,
    /// Most iterations (the run stops once solved).
    #[arg(long, default_value_t = 500)]
    iterations: u32,
    /// The seed everything derives from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A smoke run: 3 iterations.
    #[arg(long)]
    quick: bool,
}

// ---------------------------------------------------------------------------------------------
// A tiny MLP with manual backprop.

/// Layer sizes of a tanh MLP with a linear output; parameters live in one flat vector, layer by
/// layer, each as a row-major `out x in` matrix followed by `out` biases.
#[derive(Debug, Clone, Copy)]
struct Net {
    sizes: [usize; 4],
}

impl Net {
    const fn new(out: usize) -> Net {
        Net {
            sizes: [OBS, HIDDEN, HIDDEN, out],
        }
    }

    fn num_params(&self) -> usize {
        self.sizes.windows(2).map(|w| (w[0] + 1) * w[1]).sum()
    }

    /// Uniform init with the variance of N(0, gain²/fan_in); `out_gain` scales the last layer
    /// (small for the policy so it starts near uniform).
    fn init(&self, rng: &mut StdRng, out_gain: f32) -> Vec<f32> {
        let mut p = Vec::with_capacity(self.num_params());
        let layers = self.sizes.len() - 1;
        for (l, w) in self.sizes.windows(2).enumerate() {
            let gain = if l + 1 == layers { out_gain } else { 1.0 };
            let a = gain * (3.0 / w[0] as f32).sqrt();
            p.extend((0..w[0] * w[1]).map(|_| rng.random_range(-a..a)));
            p.extend(std::iter::repeat_n(0.0, w[1]));
        }
        p
    }

    /// Forward pass; `acts[l]` receives layer `l`'s output (`acts[0]` is the input).
    fn forward(&self, p: &[f32], x: &[f32], acts: &mut [Vec<f32>; 4]) {
        acts[0].clear();
        acts[0].extend_from_slice(x);
        let mut at = 0;
        for l in 0..3 {
            let (fan_in, out) = (self.sizes[l], self.sizes[l + 1]);
            let w = &p[at..at + fan_in * out];
            let b = &p[at + fan_in * out..at + (fan_in + 1) * out];
            at += (fan_in + 1) * out;
            let (inp, rest) = acts.split_at_mut(l + 1);
            let y = &mut rest[0];
            y.clear();
            for (row, bias) in w.chunks_exact(fan_in).zip(b) {
                let z = dot(row, &inp[l]) + bias;
                y.push(if l < 2 { z.tanh() } else { z });
            }
        }
    }

    /// Adds d(loss)/d(params) to `g`, given d(loss)/d(output) and the activations of `forward`.
    /// `scratch` holds the back-propagated error between layers (kept by the caller so the hot
    /// loop does not allocate).
    fn backward(
        &self,
        p: &[f32],
        acts: &[Vec<f32>; 4],
        dout: &[f32],
        g: &mut [f32],
        scratch: &mut [Vec<f32>; 2],
    ) {
        let mut offsets = [0usize; 3];
        let mut at = 0;
        for (l, o) in offsets.iter_mut().enumerate() {
            *o = at;
            at += (self.sizes[l] + 1) * self.sizes[l + 1];
        }
        let [delta, prev] = scratch;
        delta.clear();
        delta.extend_from_slice(dout);
        for l in (0..3).rev() {
            let (fan_in, out) = (self.sizes[l], self.sizes[l + 1]);
            let at = offsets[l];
            let input = &acts[l];
            for (j, d) in delta.iter().enumerate() {
                let row = &mut g[at + j * fan_in..at + (j + 1) * fan_in];
                for (gw, x) in row.iter_mut().zip(input) {
                    *gw += d * x;
                }
                g[at + fan_in * out + j] += d;
            }
            if l > 0 {
                // Through the weights, then through tanh: d tanh = 1 − tanh².
                let w = &p[at..at + fan_in * out];
                prev.clear();
                prev.resize(fan_in, 0.0);
                for (row, d) in w.chunks_exact(fan_in).zip(delta.iter()) {
                    for (pv, wv) in prev.iter_mut().zip(row) {
                        *pv += d * wv;
                    }
                }
                for (pv, a) in prev.iter_mut().zip(input) {
                    *pv *= 1.0 - a * a;
                }
                std::mem::swap(delta, prev);
            }
        }
    }
}

/// Dot product with eight independent partial sums, so the compiler can use SIMD lanes (one
/// serial chain of float additions may not be reordered).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

const POLICY: Net = Net::new(ACTIONS);
const CRITIC: Net = Net::new(1);

fn empty_acts() -> [Vec<f32>; 4] {
    [Vec::new(), Vec::new(), Vec::new(), Vec::new()]
}

/// Log-softmax of two logits.
fn log_softmax(logits: &[f32]) -> [f32; ACTIONS] {
    let m = logits[0].max(logits[1]);
    let lse = m + ((logits[0] - m).exp() + (logits[1] - m).exp()).ln();
    [logits[0] - lse, logits[1] - lse]
}

// ---------------------------------------------------------------------------------------------
// Rollout workers.

/// What a worker sends back for one iteration.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Rollout {
    /// Observations, `steps x 4`.
    pub obs: Vec<f32>,
    /// Actions taken.
    pub actions: Vec<u8>,
    /// Log-probability of each action under the policy that took it.
    pub logp: Vec<f32>,
    /// Rewards.
    pub rewards: Vec<f32>,
    /// 0: the episode goes on; 1: terminated (pole fell); 2: truncated (time limit).
    pub ends: Vec<u8>,
    /// The observation after each truncated step, in order (the critic bootstraps from it).
    pub truncated_obs: Vec<f32>,
    /// The observation after the last step (to bootstrap an unfinished episode).
    pub last_obs: Vec<f32>,
    /// Returns of the episodes that ended during this rollout.
    pub episode_returns: Vec<f32>,
}

/// A rollout worker: a CartPole that keeps running across iterations.
#[derive(Debug)]
pub struct RolloutWorker {
    env: Box<dyn Env>,
    rng: StdRng,
    obs: Vec<f32>,
    episode_return: f32,
}

#[oxray::actor]
impl RolloutWorker {
    /// Worker `index` of a run seeded with `seed`.
    pub fn new(seed: u64, index: u32) -> Self {
        let mut rng = StdRng::seed_from_u64(
            seed ^ (u64::from(index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let mut env = EnvKind::CartPole.make();
        let obs = env.reset(&mut rng);
        RolloutWorker {
            env,
            rng,
            obs,
            episode_return: 0.0,
        }
    }

    /// Collects `steps` env steps with the stochastic policy `params`.
    pub fn rollout(&mut self, params: Vec<f32>, steps: u32) -> Result<Rollout, String> {
        if params.len() != POLICY.num_params() || !params.iter().all(|p| p.is_finite()) {
            return Err(format!(
                "policy needs {} finite parameters, got {}",
                POLICY.num_params(),
                params.len()
            ));
        }
        if steps == 0 || steps > MAX_ROLLOUT {
            return Err(format!("steps must be in 1..={MAX_ROLLOUT}"));
        }
        let n = steps as usize;
        let mut out = Rollout {
            obs: Vec::with_capacity(n * OBS),
            actions: Vec::with_capacity(n),
            logp: Vec::with_capacity(n),
            rewards: Vec::with_capacity(n),
            ends: Vec::with_capacity(n),
            truncated_obs: Vec::new(),
            last_obs: Vec::new(),
            episode_returns: Vec::new(),
        };
        let mut acts = empty_acts();
        for _ in 0..n {
            POLICY.forward(&params, &self.obs, &mut acts);
            let lp = log_softmax(&acts[3]);
            let a = usize::from(self.rng.random::<f32>() >= lp[0].exp());
            let step = self
                .env
                .step(Action::Discrete(a as u32))
                .map_err(|e| e.to_string())?;
            out.obs.extend_from_slice(&self.obs);
            out.actions.push(a as u8);
            out.logp.push(lp[a]);
            out.rewards.push(step.reward);
            self.episode_return += step.reward;
            if step.done() {
                out.ends.push(if step.terminated { 1 } else { 2 });
                if !step.terminated {
                    out.truncated_obs.extend_from_slice(&step.obs);
                }
                out.episode_returns.push(self.episode_return);
                self.episode_return = 0.0;
                self.obs = self.env.reset(&mut self.rng);
            } else {
                out.ends.push(0);
                self.obs = step.obs;
            }
        }
        out.last_obs = self.obs.clone();
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The learner.

/// What one update reports.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct UpdateStats {
    /// Samples in the batch.
    pub samples: u32,
    /// Mean clipped-surrogate loss over the last epoch.
    pub policy_loss: f32,
    /// Mean value loss over the last epoch.
    pub value_loss: f32,
    /// Mean policy entropy over the last epoch.
    pub entropy: f32,
    /// Fraction of samples whose ratio was clipped in the last epoch.
    pub clip_frac: f32,
}

/// The learner: both networks, Adam state, and the run's generator.
#[derive(Debug)]
pub struct Learner {
    config: PpoConfig,
    /// Policy parameters followed by critic parameters (one Adam over both).
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
    updates: u32,
    rng: StdRng,
}

/// One training sample after GAE.
#[derive(Debug, Clone, Copy)]
struct Sample {
    obs: [f32; OBS],
    action: usize,
    logp: f32,
    advantage: f32,
    ret: f32,
}

#[oxray::actor]
impl Learner {
    /// A learner with fresh networks.
    pub fn new(config: PpoConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut params = POLICY.init(&mut rng, 0.01);
        params.extend(CRITIC.init(&mut rng, 1.0));
        let n = params.len();
        Learner {
            config,
            params,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
            updates: 0,
            rng,
        }
    }

    /// The current policy parameters (what the workers act with).
    pub fn policy(&self) -> Vec<f32> {
        self.params[..POLICY.num_params()].to_vec()
    }

    /// Mean return of the greedy policy over `episodes` episodes seeded from `seed`.
    pub fn evaluate(&self, episodes: u32, seed: u64) -> Result<f32, String> {
        let policy = &self.params[..POLICY.num_params()];
        let mut env = EnvKind::CartPole.make();
        let mut acts = empty_acts();
        let mut total = 0.0f64;
        for i in 0..episodes.max(1) {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(u64::from(i)));
            let (ret, _) = oxray_apps::env::rollout(env.as_mut(), &mut rng, |obs| {
                POLICY.forward(policy, obs, &mut acts);
                Action::Discrete(u32::from(acts[3][1] > acts[3][0]))
            })
            .map_err(|e| e.to_string())?;
            total += ret;
        }
        Ok((total / f64::from(episodes.max(1))) as f32)
    }

    /// One PPO update from the workers' rollouts.
    pub fn update(&mut self, rollouts: Vec<Rollout>) -> Result<UpdateStats, String> {
        let mut samples = Vec::new();
        for (i, r) in rollouts.iter().enumerate() {
            self.gae(r, &mut samples)
                .map_err(|e| format!("rollout {i}: {e}"))?;
        }
        if samples.is_empty() {
            return Err("no samples".into());
        }
        let c = self.config.clone();
        let frac = 1.0 - self.updates as f32 / c.iterations.max(1) as f32;
        let lr = c.lr * frac.max(0.0);
        self.updates += 1;
        let n = samples.len();
        let mb = n.div_ceil(c.minibatches.max(1) as usize);
        let mut order: Vec<usize> = (0..n).collect();
        let mut stats = UpdateStats {
            samples: n as u32,
            policy_loss: 0.0,
            value_loss: 0.0,
            entropy: 0.0,
            clip_frac: 0.0,
        };
        let np = POLICY.num_params();
        let mut grad = vec![0.0f32; self.params.len()];
        let (mut pa, mut ca) = (empty_acts(), empty_acts());
        let mut scratch = [Vec::new(), Vec::new()];
        for epoch in 0..c.epochs {
            // Fisher–Yates with the learner's own generator: reproducible shuffles.
            for i in (1..n).rev() {
                order.swap(i, self.rng.random_range(0..=i));
            }
            let last = epoch + 1 == c.epochs;
            let (mut pl, mut vl, mut ent, mut clipped) = (0.0f64, 0.0f64, 0.0f64, 0usize);
            for chunk in order.chunks(mb) {
                grad.iter_mut().for_each(|g| *g = 0.0);
                // Advantages normalised per minibatch.
                let mean =
                    chunk.iter().map(|&i| samples[i].advantage).sum::<f32>() / chunk.len() as f32;
                let var = chunk
                    .iter()
                    .map(|&i| (samples[i].advantage - mean).powi(2))
                    .sum::<f32>()
                    / chunk.len() as f32;
                let std = var.sqrt() + 1e-8;
                let scale = 1.0 / chunk.len() as f32;
                let (pp, cp) = self.params.split_at(np);
                let (gp, gc) = grad.split_at_mut(np);
                for &i in chunk {
                    let s = &samples[i];
                    let adv = (s.advantage - mean) / std;
                    POLICY.forward(pp, &s.obs, &mut pa);
                    let lp = log_softmax(&pa[3]);
                    let p = [lp[0].exp(), lp[1].exp()];
                    let h = -(p[0] * lp[0] + p[1] * lp[1]);
                    let ratio = (lp[s.action] - s.logp).exp();
                    let unclipped = -adv * ratio;
                    let clipped_obj = -adv * ratio.clamp(1.0 - c.clip, 1.0 + c.clip);
                    // The max of the two picks the gradient: through the ratio, or none at all.
                    let g_lp = if unclipped >= clipped_obj {
                        -adv * ratio
                    } else {
                        clipped += 1;
                        0.0
                    };
                    let mut dlogits = [0.0f32; ACTIONS];
                    for (k, d) in dlogits.iter_mut().enumerate() {
                        let onehot = if k == s.action { 1.0 } else { 0.0 };
                        // d(−ent_coef·H)/dlogit_k = ent_coef · p_k · (log p_k + H).
                        *d = (g_lp * (onehot - p[k]) + c.ent_coef * p[k] * (lp[k] + h)) * scale;
                    }
                    POLICY.backward(pp, &pa, &dlogits, gp, &mut scratch);
                    CRITIC.forward(cp, &s.obs, &mut ca);
                    let err = ca[3][0] - s.ret;
                    CRITIC.backward(cp, &ca, &[c.vf_coef * err * scale], gc, &mut scratch);
                    if last {
                        pl += f64::from(unclipped.max(clipped_obj));
                        vl += f64::from(0.5 * err * err);
                        ent += f64::from(h);
                    }
                }
                self.adam(&mut grad, lr);
            }
            if last {
                stats.policy_loss = (pl / n as f64) as f32;
                stats.value_loss = (vl / n as f64) as f32;
                stats.entropy = (ent / n as f64) as f32;
                stats.clip_frac = clipped as f32 / n as f32;
            }
        }
        if !self.params.iter().all(|p| p.is_finite()) {
            return Err("the update diverged (non-finite parameters)".into());
        }
        Ok(stats)
    }
}

impl Learner {
    /// Generalised advantage estimates and returns for one worker's rollout, appended to `out`.
    fn gae(&self, r: &Rollout, out: &mut Vec<Sample>) -> Result<(), String> {
        let n = r.actions.len();
        let truncations = r.ends.iter().filter(|&&e| e == 2).count();
        if r.obs.len() != n * OBS
            || r.logp.len() != n
            || r.rewards.len() != n
            || r.ends.len() != n
            || r.last_obs.len() != OBS
            || r.truncated_obs.len() != truncations * OBS
            || r.actions.iter().any(|&a| a as usize >= ACTIONS)
            || r.ends.iter().any(|&e| e > 2)
        {
            return Err("malformed rollout".into());
        }
        let critic = &self.params[POLICY.num_params()..];
        let mut acts = empty_acts();
        let mut value = |obs: &[f32]| {
            CRITIC.forward(critic, obs, &mut acts);
            acts[3][0]
        };
        let values: Vec<f32> = r.obs.chunks_exact(OBS).map(&mut value).collect();
        let last_value = value(&r.last_obs);
        // A truncated episode did not fail: its last reward gets the critic's estimate of what
        // would have followed, and the episode then ends as any other.
        let mut rewards = r.rewards.clone();
        let mut tail = r.truncated_obs.chunks_exact(OBS);
        for (t, &e) in r.ends.iter().enumerate() {
            if e == 2
                && let Some(obs) = tail.next()
            {
                rewards[t] += self.config.gamma * value(obs);
            }
        }
        let (g, l) = (self.config.gamma, self.config.lambda);
        let mut adv = vec![0.0f32; n];
        let mut running = 0.0f32;
        for t in (0..n).rev() {
            let go_on = if r.ends[t] == 0 { 1.0 } else { 0.0 };
            let next = if t + 1 == n {
                last_value
            } else {
                values[t + 1]
            };
            let delta = rewards[t] + g * next * go_on - values[t];
            running = delta + g * l * go_on * running;
            adv[t] = running;
        }
        for t in 0..n {
            let mut obs = [0.0f32; OBS];
            obs.copy_from_slice(&r.obs[t * OBS..(t + 1) * OBS]);
            out.push(Sample {
                obs,
                action: usize::from(r.actions[t]),
                logp: r.logp[t],
                advantage: adv[t],
                ret: adv[t] + values[t],
            });
        }
        Ok(())
    }

    /// Clips the gradient's global norm, then takes one Adam step (descending).
    fn adam(&mut self, grad: &mut [f32], lr: f32) {
        let norm = grad.iter().map(|g| g * g).sum::<f32>().sqrt();
        if norm > self.config.max_grad_norm {
            let k = self.config.max_grad_norm / norm;
            grad.iter_mut().for_each(|g| *g *= k);
        }
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        self.t = self.t.saturating_add(1);
        let c1 = 1.0 - B1.powi(self.t);
        let c2 = 1.0 - B2.powi(self.t);
        for (((p, g), m), v) in self
            .params
            .iter_mut()
            .zip(grad.iter())
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = B1 * *m + (1.0 - B1) * g;
            *v = B2 * *v + (1.0 - B2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + 1e-5);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

fn main() {
    oxray::run_node_if_requested();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.workers == 0 || args.workers > MAX_WORKERS {
        bail!("--workers must be in 1..={MAX_WORKERS}");
    }
    if args.steps == 0 || args.steps > MAX_ROLLOUT {
        bail!("--steps must be in 1..={MAX_ROLLOUT}");
    }
    let iterations = if args.quick {
        args.iterations.min(QUICK_ITERS)
    } else {
        args.iterations
    };
    let config = PpoConfig {
        gamma: 0.99,
        lambda: 0.95,
        clip: 0.2,
        epochs: 4,
        minibatches: 4,
        lr: 2.5e-4,
        ent_coef: 0.01,
        vf_coef: 0.5,
        max_grad_norm: 0.5,
        iterations,
        seed: args.seed,
    };
    oxray::init().context("starting oxray")?;
    println!(
        "PPO on CartPole-v1: {} workers x {} steps per iteration, up to {} iterations, seed {}",
        args.workers, args.steps, iterations, args.seed
    );
    let start = Instant::now();
    let opts = ActorOptions::new()
        .num_cpus(0.05)
        .strategy(Strategy::Spread);
    let learner = Learner::remote_with(&opts, config)?;
    let workers: Vec<ActorHandle<RolloutWorker>> = (0..args.workers)
        .map(|i| RolloutWorker::remote_with(&opts, args.seed, i as u32))
        .collect::<oxray::Result<_>>()?;

    let mut recent: std::collections::VecDeque<f32> = std::collections::VecDeque::new();
    let mut env_steps = 0u64;
    let mut solved = None;
    let mut best_eval = f32::NEG_INFINITY;
    let (mut t_rollout, mut t_learn) = (0.0f64, 0.0f64);
    let mut last_train_mean = 0.0f32;
    for it in 0..iterations {
        let t0 = Instant::now();
        // The learner's answer goes to the workers as a ref; the driver never holds the weights.
        let policy = learner.policy();
        let refs: Vec<_> = workers
            .iter()
            .map(|w| w.rollout(&policy, args.steps))
            .collect();
        let mut rollouts = Vec::with_capacity(refs.len());
        for (i, r) in oxray::get_all(&refs)?.into_iter().enumerate() {
            rollouts.push(r.map_err(|e| anyhow::anyhow!("worker {i}: {e}"))?);
        }
        for r in &rollouts {
            env_steps += r.actions.len() as u64;
            for &ret in &r.episode_returns {
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back(ret);
            }
        }
        let t1 = Instant::now();
        t_rollout += (t1 - t0).as_secs_f64();
        let stats = learner
            .update(rollouts)
            .get()?
            .map_err(|e| anyhow::anyhow!("learner: {e}"))?;
        t_learn += t1.elapsed().as_secs_f64();
        let train_mean = if recent.is_empty() {
            0.0
        } else {
            recent.iter().sum::<f32>() / recent.len() as f32
        };
        last_train_mean = train_mean;
        // Greedy evaluation: whenever the training mean is at the threshold (the solved check
        // needs it), and every tenth iteration for the log.
        let eval = if train_mean >= THRESHOLD || it % 10 == 0 || it + 1 == iterations {
            let e = learner
                .evaluate(
                    EVAL_EPISODES,
                    args.seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add(u64::from(it)),
                )
                .get()?
                .map_err(|e| anyhow::anyhow!("learner: {e}"))?;
            best_eval = best_eval.max(e);
            Some(e)
        } else {
            None
        };
        let elapsed = start.elapsed().as_secs_f64();
        if it % 10 == 0 || train_mean >= THRESHOLD {
            println!(
                "iter {it:>4}  steps {env_steps:>7}  train return (last 20) {train_mean:6.1}  eval {}  entropy {:.3}  clip {:.3}  vloss {:.2}  {elapsed:.1}s",
                eval.map_or("   -  ".to_string(), |e| format!("{e:6.1}")),
                stats.entropy,
                stats.clip_frac,
                stats.value_loss
            );
        }
        // Solved as RLlib counts it (the training episodes' mean return), and the greedy policy
        // must agree, so neither a lucky evaluation nor a lucky streak of episodes is enough.
        if recent.len() == RECENT
            && train_mean >= THRESHOLD
            && let Some(e) = eval
            && e >= THRESHOLD
        {
            solved = Some((it, env_steps, elapsed, train_mean, e));
            break;
        }
    }
    let total = start.elapsed().as_secs_f64();
    println!(
        "{env_steps} env steps in {total:.2}s: {:.0} env timesteps/s (rollouts + learning; {t_rollout:.2}s gathering rollouts, {t_learn:.2}s in updates)",
        env_steps as f64 / total.max(1e-9)
    );
    match solved {
        Some((it, steps, t, train, e)) => println!(
            "SOLVED: mean return of the last {RECENT} training episodes {train:.1} >= {THRESHOLD} (greedy eval {e:.1}) at iteration {it} after {steps} env steps, {t:.2}s"
        ),
        None => println!(
            "NOT SOLVED after {iterations} iterations: mean return of the last {RECENT} training episodes {last_train_mean:.1}, best greedy eval {best_eval:.1}; both must reach {THRESHOLD}"
        ),
    }
    for w in &workers {
        oxray::kill(w);
    }
    oxray::kill(&learner);
    oxray::shutdown();
    Ok(())
}
