//! `CartPole-v1`: a pole hinged on a cart that moves along a frictionless track (Barto, Sutton and
//! Anderson, 1983), with Gymnasium's constants and explicit Euler integration.
//!
//! Not modelled: the optional semi-implicit integrator and Sutton–Barto reward variant Gymnasium
//! offers as options; this is the default `CartPole-v1`.

use rand::RngCore;

use super::{Action, ActionSpace, Env, EnvError, Obs, Step, uniform};

const GRAVITY: f64 = 9.8;
const MASS_CART: f64 = 1.0;
const MASS_POLE: f64 = 0.1;
const TOTAL_MASS: f64 = MASS_CART + MASS_POLE;
/// Half the pole's length, as Gymnasium defines `length`.
const HALF_LENGTH: f64 = 0.5;
const POLE_MASS_LENGTH: f64 = MASS_POLE * HALF_LENGTH;
const FORCE_MAG: f64 = 10.0;
/// Seconds per step.
const TAU: f64 = 0.02;
const X_THRESHOLD: f64 = 2.4;
/// 12 degrees.
const THETA_THRESHOLD: f64 = 12.0 * 2.0 * std::f64::consts::PI / 360.0;
/// The `TimeLimit` of `CartPole-v1`.
pub const MAX_STEPS: u32 = 500;

/// The cart-pole environment. State `(x, ẋ, θ, θ̇)`; action 0 pushes left, 1 pushes right.
#[derive(Debug, Clone, Default)]
pub struct CartPole {
    /// `None` until the first reset.
    state: Option<[f64; 4]>,
    steps: u32,
    done: bool,
}

impl CartPole {
    /// A cart-pole that must be reset before stepping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts an episode from a given state (tests and demos); `reset` draws it instead.
    pub fn reset_to(&mut self, state: [f64; 4]) -> Obs {
        self.state = Some(state);
        self.steps = 0;
        self.done = false;
        obs(&state)
    }

    /// The exact internal state, `None` before the first reset.
    pub fn state(&self) -> Option<[f64; 4]> {
        self.state
    }
}

fn obs(s: &[f64; 4]) -> Obs {
    s.iter().map(|&v| v as f32).collect()
}

impl Env for CartPole {
    fn name(&self) -> &'static str {
        "CartPole-v1"
    }

    fn obs_dim(&self) -> usize {
        4
    }

    fn action_space(&self) -> ActionSpace {
        ActionSpace::Discrete { n: 2 }
    }

    fn reset(&mut self, rng: &mut dyn RngCore) -> Obs {
        let mut s = [0.0; 4];
        for v in &mut s {
            *v = uniform(rng, -0.05, 0.05);
        }
        self.reset_to(s)
    }

    fn step(&mut self, action: Action) -> Result<Step, EnvError> {
        let [x, x_dot, theta, theta_dot] = self.state.ok_or(EnvError::NotReset)?;
        if self.done {
            return Err(EnvError::EpisodeOver);
        }
        let force = match action {
            Action::Discrete(1) => FORCE_MAG,
            Action::Discrete(0) => -FORCE_MAG,
            _ => {
                return Err(EnvError::InvalidAction {
                    action,
                    space: self.action_space(),
                });
            }
        };
        let (sin, cos) = theta.sin_cos();
        let temp = (force + POLE_MASS_LENGTH * theta_dot * theta_dot * sin) / TOTAL_MASS;
        let theta_acc = (GRAVITY * sin - cos * temp)
            / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos * cos / TOTAL_MASS));
        let x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS;
        // Explicit Euler: positions advance with the old velocities.
        let next = [
            x + TAU * x_dot,
            x_dot + TAU * x_acc,
            theta + TAU * theta_dot,
            theta_dot + TAU * theta_acc,
        ];
        self.state = Some(next);
        self.steps += 1;
        let terminated = next[0].abs() > X_THRESHOLD || next[2].abs() > THETA_THRESHOLD;
        // Like Gymnasium's `TimeLimit`, the limit flags truncation even on a terminal step.
        let truncated = self.steps >= MAX_STEPS;
        self.done = terminated || truncated;
        // Gymnasium pays 1 on every step, including the one on which the pole falls.
        Ok(Step {
            obs: obs(&next),
            reward: 1.0,
            terminated,
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// From rest, pushing right: temp = 10/1.1 = 100/11, θ̈ = −(100/11) / (0.5 (4/3 − 0.1/1.1)) = −600/41,
    /// ẍ = 100/11 + (0.05/1.1)(600/41) = 4400/451 (worked by hand from the published equations).
    #[test]
    fn first_push_from_rest_matches_hand_computation() {
        let mut env = CartPole::new();
        env.reset_to([0.0; 4]);
        let s1 = env.step(Action::Discrete(1)).unwrap();
        let [x, xd, th, thd] = env.state().unwrap();
        close(x, 0.0);
        close(xd, 0.02 * 4400.0 / 451.0);
        close(th, 0.0);
        close(thd, -0.02 * 600.0 / 41.0);
        assert_eq!(s1.reward, 1.0);
        assert!(!s1.done());
        // Second step: positions move with the velocities of step one (Euler), accelerations now
        // see θ̇ ≠ 0 but sin θ = 0, so they are unchanged: the same push gives the same increments.
        env.step(Action::Discrete(1)).unwrap();
        let [x, xd, th, thd] = env.state().unwrap();
        close(x, 0.02 * 0.02 * 4400.0 / 451.0);
        close(xd, 2.0 * 0.02 * 4400.0 / 451.0);
        close(th, -0.02 * 0.02 * 600.0 / 41.0);
        close(thd, -2.0 * 0.02 * 600.0 / 41.0);
    }

    /// A tilted pole at rest, pushed left: θ = 0.1, force = −10.
    #[test]
    fn tilted_pole_matches_hand_computation() {
        let mut env = CartPole::new();
        env.reset_to([0.0, 0.0, 0.1, 0.0]);
        env.step(Action::Discrete(0)).unwrap();
        let (s, c) = (0.1f64.sin(), 0.1f64.cos());
        let temp = -10.0 / 1.1;
        let th_acc = (9.8 * s - c * temp) / (0.5 * (4.0 / 3.0 - 0.1 * c * c / 1.1));
        let x_acc = temp - 0.05 * th_acc * c / 1.1;
        let [x, xd, th, thd] = env.state().unwrap();
        close(x, 0.0);
        close(xd, 0.02 * x_acc);
        close(th, 0.1);
        close(thd, 0.02 * th_acc);
        // Pushing left under a pole leaning right makes it fall faster (θ̈ > 0 and larger than gravity alone).
        assert!(th_acc > 9.8 * s / (0.5 * (4.0 / 3.0 - 0.1 * c * c / 1.1)));
    }

    #[test]
    fn terminates_past_twelve_degrees_and_past_the_track_edge() {
        let mut env = CartPole::new();
        // θ̇ large enough that one Euler step crosses 12° (0.20944 rad).
        env.reset_to([0.0, 0.0, 0.2, 1.0]);
        let s = env.step(Action::Discrete(1)).unwrap();
        assert!(s.terminated && !s.truncated);
        assert_eq!(s.reward, 1.0);
        env.reset_to([2.39, 1.0, 0.0, 0.0]);
        assert!(env.step(Action::Discrete(1)).unwrap().terminated);
        env.reset_to([-2.39, -1.0, 0.0, 0.0]);
        assert!(env.step(Action::Discrete(0)).unwrap().terminated);
    }

    #[test]
    fn truncates_at_500_steps() {
        let mut env = CartPole::new();
        let mut rng = StdRng::seed_from_u64(0);
        let mut obs = env.reset(&mut rng);
        // A hand-tuned PD controller on angle and angular velocity keeps the pole up for a long time;
        // this test only needs it to outlast the limit for this start state.
        for i in 1..=MAX_STEPS {
            let push = obs[2] + 0.5 * obs[3] + 0.01 * obs[0] + 0.05 * obs[1] > 0.0;
            let s = env.step(Action::Discrete(u32::from(push))).unwrap();
            assert!(!s.terminated, "fell at step {i}");
            assert_eq!(s.truncated, i == MAX_STEPS);
            obs = s.obs;
        }
    }

    #[test]
    fn reset_draws_within_five_hundredths() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut env = CartPole::new();
        for _ in 0..1000 {
            let o = env.reset(&mut rng);
            assert!(o.iter().all(|v| v.abs() <= 0.05), "{o:?}");
        }
    }
}
