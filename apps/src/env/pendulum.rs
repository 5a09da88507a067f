//! `Pendulum-v1`: swing a frictionless pendulum up and hold it upright with a limited torque,
//! with Gymnasium's constants (g = 10, m = 1, l = 1, dt = 0.05, max speed 8, max torque 2).
//!
//! Not modelled: the `g` constructor option; the episode always lasts 200 steps (the `TimeLimit`),
//! and the task never terminates on its own.

use std::f64::consts::PI;

use rand::RngCore;

use super::{Action, ActionSpace, Env, EnvError, Obs, Step, uniform};

const G: f64 = 10.0;
const MASS: f64 = 1.0;
const LENGTH: f64 = 1.0;
const DT: f64 = 0.05;
const MAX_SPEED: f64 = 8.0;
const MAX_TORQUE: f64 = 2.0;
/// The `TimeLimit` of `Pendulum-v1`.
pub const MAX_STEPS: u32 = 200;

/// The pendulum environment. State `(θ, θ̇)` with θ = 0 upright; observation `(cos θ, sin θ, θ̇)`.
#[derive(Debug, Clone, Default)]
pub struct Pendulum {
    /// `None` until the first reset.
    state: Option<[f64; 2]>,
    steps: u32,
}

impl Pendulum {
    /// A pendulum that must be reset before stepping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts an episode from a given `(θ, θ̇)` (tests and demos); `reset` draws it instead.
    pub fn reset_to(&mut self, state: [f64; 2]) -> Obs {
        self.state = Some(state);
        self.steps = 0;
        obs(&state)
    }

    /// The exact internal state, `None` before the first reset.
    pub fn state(&self) -> Option<[f64; 2]> {
        self.state
    }
}

fn obs(&[th, thdot]: &[f64; 2]) -> Obs {
    vec![th.cos() as f32, th.sin() as f32, thdot as f32]
}

/// Maps an angle into `[−π, π)` like Gymnasium's `angle_normalize` (Python's `%` is never negative).
fn angle_normalize(x: f64) -> f64 {
    (x + PI).rem_euclid(2.0 * PI) - PI
}

impl Env for Pendulum {
    fn name(&self) -> &'static str {
        "Pendulum-v1"
    }

    fn obs_dim(&self) -> usize {
        3
    }

    fn action_space(&self) -> ActionSpace {
        ActionSpace::Continuous {
            low: -MAX_TORQUE as f32,
            high: MAX_TORQUE as f32,
        }
    }

    fn reset(&mut self, rng: &mut dyn RngCore) -> Obs {
        let th = uniform(rng, -PI, PI);
        let thdot = uniform(rng, -1.0, 1.0);
        self.reset_to([th, thdot])
    }

    fn step(&mut self, action: Action) -> Result<Step, EnvError> {
        let [th, thdot] = self.state.ok_or(EnvError::NotReset)?;
        if self.steps >= MAX_STEPS {
            return Err(EnvError::EpisodeOver);
        }
        let u = match action {
            Action::Continuous(u) if !u.is_nan() => f64::from(u).clamp(-MAX_TORQUE, MAX_TORQUE),
            _ => {
                return Err(EnvError::InvalidAction {
                    action,
                    space: self.action_space(),
                });
            }
        };
        // The cost uses the state before the step, as Gymnasium computes it.
        let cost = angle_normalize(th).powi(2) + 0.1 * thdot * thdot + 0.001 * u * u;
        let new_thdot = (thdot
            + (3.0 * G / (2.0 * LENGTH) * th.sin() + 3.0 / (MASS * LENGTH * LENGTH) * u) * DT)
            .clamp(-MAX_SPEED, MAX_SPEED);
        let new_th = th + new_thdot * DT;
        let next = [new_th, new_thdot];
        self.state = Some(next);
        self.steps += 1;
        Ok(Step {
            obs: obs(&next),
            reward: -cost as f32,
            terminated: false,
            truncated: self.steps >= MAX_STEPS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// Upright at rest with full torque: cost = 0.001·2² = 0.004; θ̇' = (15·sin 0 + 3·2)·0.05 = 0.3;
    /// θ' = 0.3·0.05 = 0.015.
    #[test]
    fn upright_full_torque_matches_hand_computation() {
        let mut env = Pendulum::new();
        env.reset_to([0.0, 0.0]);
        let s = env.step(Action::Continuous(2.0)).unwrap();
        assert!((f64::from(s.reward) + 0.004).abs() < 1e-9);
        let [th, thd] = env.state().unwrap();
        close(thd, 0.3);
        close(th, 0.015);
        assert_eq!(
            s.obs,
            vec![0.015f64.cos() as f32, 0.015f64.sin() as f32, 0.3]
        );
        // Second step: cost = 0.015² + 0.1·0.3² + 0.001·4; θ̇'' = 0.3 + (15 sin 0.015 + 6)·0.05.
        let s = env.step(Action::Continuous(2.0)).unwrap();
        let cost = 0.015f64.powi(2) + 0.1 * 0.09 + 0.004;
        assert!((f64::from(s.reward) + cost).abs() < 1e-7);
        let thd2 = 0.3 + (15.0 * 0.015f64.sin() + 6.0) * 0.05;
        let [th, thd] = env.state().unwrap();
        close(thd, thd2);
        close(th, 0.015 + thd2 * 0.05);
    }

    /// Horizontal at rest, no torque: θ̇' = 15·sin(π/2)·0.05 = 0.75, cost = (π/2)².
    #[test]
    fn gravity_alone_matches_hand_computation() {
        let mut env = Pendulum::new();
        env.reset_to([PI / 2.0, 0.0]);
        let s = env.step(Action::Continuous(0.0)).unwrap();
        assert!((f64::from(s.reward) + (PI / 2.0).powi(2)).abs() < 1e-6);
        let [th, thd] = env.state().unwrap();
        close(thd, 0.75);
        close(th, PI / 2.0 + 0.0375);
    }

    #[test]
    fn torque_and_speed_are_clipped_and_angle_normalized_in_cost() {
        let mut env = Pendulum::new();
        env.reset_to([0.0, 7.9]);
        // Torque 50 is clipped to 2: cost uses u = 2; θ̇ would be 7.9 + 0.3 = 8.2, clipped to 8.
        let s = env.step(Action::Continuous(50.0)).unwrap();
        assert!((f64::from(s.reward) + (0.1 * 7.9 * 7.9 + 0.004)).abs() < 1e-5);
        assert_eq!(env.state().unwrap()[1], 8.0);
        // θ = 2π + 0.1 costs like θ = 0.1.
        env.reset_to([2.0 * PI + 0.1, 0.0]);
        let s = env.step(Action::Continuous(0.0)).unwrap();
        assert!((f64::from(s.reward) + 0.01).abs() < 1e-6);
        assert!((angle_normalize(-PI - 0.1) - (PI - 0.1)).abs() < 1e-12);
    }

    #[test]
    fn always_truncates_at_200() {
        let mut env = Pendulum::new();
        env.reset_to([1.0, 0.0]);
        for i in 1..=MAX_STEPS {
            let s = env.step(Action::Continuous(0.0)).unwrap();
            assert!(!s.terminated);
            assert_eq!(s.truncated, i == MAX_STEPS);
        }
    }
}
