//! A tiny feed-forward policy over a flat parameter vector, the thing ES perturbs.
//!
//! What this is: [`PolicySpec`] (the shape: linear, or one `tanh` hidden layer) and [`Policy`], which
//! maps an observation to an [`Action`] using a borrowed `&[f32]` of parameters, so that the same
//! buffers serve every perturbed copy without allocating. Discrete spaces take the arg-max of one
//! score per action; a continuous action is `tanh` squashed into `[low, high]`.
//!
//! What this is not: no gradients, no batching across observations (see [`crate::serving`] for a
//! batched MLP), no observation normalisation (the classic-control tasks do not need it).

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::env::{Action, ActionSpace, EnvKind};
use crate::es::EsError;

/// The shape of a policy network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicySpec {
    /// Observation length.
    pub obs_dim: usize,
    /// Width of the single `tanh` hidden layer; 0 makes the policy linear.
    pub hidden: usize,
    /// What the policy must output.
    pub action: ActionSpace,
}

impl PolicySpec {
    /// The spec for environment `env` with a hidden layer of `hidden` units (0: linear).
    pub fn for_env(env: EnvKind, hidden: usize) -> PolicySpec {
        let e = env.make();
        PolicySpec {
            obs_dim: e.obs_dim(),
            hidden,
            action: e.action_space(),
        }
    }

    /// Number of outputs (scores or the one continuous value).
    pub fn outputs(&self) -> usize {
        self.action.policy_outputs()
    }

    /// Length of the flat parameter vector: weights then biases, layer by layer.
    pub fn num_params(&self) -> usize {
        let out = self.outputs();
        if self.hidden == 0 {
            out * (self.obs_dim + 1)
        } else {
            self.hidden * (self.obs_dim + 1) + out * (self.hidden + 1)
        }
    }

    /// Starting parameters: zeros for a linear policy (every action scores the same, which ES breaks
    /// at once); for an MLP, hidden weights ~ N(0, 1/fan_in) drawn from `seed` so units differ, and a
    /// zero output layer so the first policy is neutral.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut p = vec![0.0; self.num_params()];
        if self.hidden > 0 {
            let mut rng = StdRng::seed_from_u64(seed);
            let scale = 1.0 / (self.obs_dim as f32).sqrt();
            let w1 = self.hidden * self.obs_dim;
            crate::es::fill_normal(&mut rng, &mut p[..w1]);
            for w in &mut p[..w1] {
                *w *= scale;
            }
        }
        p
    }

    /// Checks that `params` fits this spec.
    ///
    /// # Errors
    /// [`EsError::ParamsLength`] on a length mismatch, [`EsError::NonFiniteParams`] on NaN or ±∞.
    pub fn check(&self, params: &[f32]) -> Result<(), EsError> {
        if params.len() != self.num_params() {
            return Err(EsError::ParamsLength {
                expected: self.num_params(),
                got: params.len(),
            });
        }
        if !params.iter().all(|v| v.is_finite()) {
            return Err(EsError::NonFiniteParams);
        }
        Ok(())
    }
}

/// A policy evaluator: the spec plus scratch buffers, reused across calls.
#[derive(Debug, Clone)]
pub struct Policy {
    spec: PolicySpec,
    hidden: Vec<f32>,
    out: Vec<f32>,
}

impl Policy {
    /// An evaluator for `spec`.
    pub fn new(spec: PolicySpec) -> Policy {
        Policy {
            spec,
            hidden: vec![0.0; spec.hidden],
            out: vec![0.0; spec.outputs()],
        }
    }

    /// The shape.
    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// The action for `obs` under `params`. The caller has checked `params` with
    /// [`PolicySpec::check`]; a short `params` or `obs` panics (a bug, never input from afar).
    pub fn act(&mut self, params: &[f32], obs: &[f32]) -> Action {
        let PolicySpec {
            obs_dim,
            hidden,
            action,
        } = self.spec;
        debug_assert_eq!(params.len(), self.spec.num_params());
        debug_assert_eq!(obs.len(), obs_dim);
        if hidden == 0 {
            dense(params, obs, &mut self.out, |v| v);
        } else {
            let (l1, l2) = params.split_at(hidden * (obs_dim + 1));
            dense(l1, obs, &mut self.hidden, f32::tanh);
            dense(l2, &self.hidden, &mut self.out, |v| v);
        }
        match action {
            ActionSpace::Discrete { .. } => Action::Discrete(argmax(&self.out)),
            ActionSpace::Continuous { low, high } => {
                let t = self.out[0].tanh();
                Action::Continuous(low + (high - low) * 0.5 * (t + 1.0))
            }
        }
    }
}

/// `out = f(W x + b)` with `W` row-major (`out.len()` rows of `x.len()`) followed by `b` in `p`.
fn dense(p: &[f32], x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    let n = x.len();
    let (w, b) = p.split_at(out.len() * n);
    for (i, o) in out.iter_mut().enumerate() {
        let row = &w[i * n..(i + 1) * n];
        let dot: f32 = row.iter().zip(x).map(|(a, b)| a * b).sum();
        *o = f(dot + b[i]);
    }
}

/// Index of the first largest score (ties go to the lower action, deterministically).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_counts() {
        let cp = PolicySpec::for_env(EnvKind::CartPole, 0);
        assert_eq!(cp.num_params(), 2 * 5);
        let cp = PolicySpec::for_env(EnvKind::CartPole, 8);
        assert_eq!(cp.num_params(), 8 * 5 + 2 * 9);
        let pe = PolicySpec::for_env(EnvKind::Pendulum, 16);
        assert_eq!(pe.num_params(), 16 * 4 + 17);
        assert_eq!(pe.init_params(1).len(), pe.num_params());
    }

    #[test]
    fn linear_policy_by_hand() {
        let spec = PolicySpec::for_env(EnvKind::CartPole, 0);
        let mut p = Policy::new(spec);
        // Row 0 scores action 0 as -θ, row 1 scores action 1 as +θ: push towards the lean.
        let params = [0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        assert_eq!(p.act(&params, &[0.0, 0.0, 0.1, 0.0]), Action::Discrete(1));
        assert_eq!(p.act(&params, &[0.0, 0.0, -0.1, 0.0]), Action::Discrete(0));
        // A tie goes to action 0.
        assert_eq!(p.act(&params, &[0.0; 4]), Action::Discrete(0));
        // Biases are the last `outputs` entries.
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(p.act(&bias, &[0.0; 4]), Action::Discrete(1));
    }

    #[test]
    fn mlp_policy_by_hand() {
        let spec = PolicySpec::for_env(EnvKind::Pendulum, 1);
        let mut p = Policy::new(spec);
        // h = tanh(1·cos + 0 + 0 + 0.5); u = 2·tanh(2h − 0.1)
        let params = [1.0, 0.0, 0.0, 0.5, 2.0, -0.1];
        let Action::Continuous(u) = p.act(&params, &[1.0, 0.0, 0.0]) else {
            panic!()
        };
        let want = 2.0 * (2.0 * 1.5f32.tanh() - 0.1).tanh();
        assert!((u - want).abs() < 1e-6, "{u} vs {want}");
    }

    #[test]
    fn check_rejects_bad_params() {
        let spec = PolicySpec::for_env(EnvKind::CartPole, 0);
        assert!(matches!(
            spec.check(&[0.0; 3]),
            Err(EsError::ParamsLength {
                expected: 10,
                got: 3
            })
        ));
        let mut p = vec![0.0; 10];
        p[4] = f32::NAN;
        assert!(matches!(spec.check(&p), Err(EsError::NonFiniteParams)));
        assert!(spec.check(&[0.0; 10]).is_ok());
    }
}
