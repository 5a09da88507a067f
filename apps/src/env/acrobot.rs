//! `Acrobot-v1`: two links hanging from a fixed pivot, torque applied only at the joint between them
//! (Sutton 1996; Sutton and Barto's book dynamics), integrated with one classical Runge–Kutta step of
//! 0.2 s per action, as Gymnasium does.
//!
//! Not modelled: torque noise (Gymnasium's default is zero) and the "NIPS paper" variant of the
//! equations (Gymnasium's default is the book's, used here).

use std::f64::consts::PI;

use rand::RngCore;

use super::{Action, ActionSpace, Env, EnvError, Obs, Step, uniform};

const DT: f64 = 0.2;
const L1: f64 = 1.0;
const M1: f64 = 1.0;
const M2: f64 = 1.0;
/// Distance from each joint to its link's centre of mass.
const LC1: f64 = 0.5;
const LC2: f64 = 0.5;
/// Moment of inertia of each link.
const MOI: f64 = 1.0;
const G: f64 = 9.8;
const MAX_VEL_1: f64 = 4.0 * PI;
const MAX_VEL_2: f64 = 9.0 * PI;
const TORQUES: [f64; 3] = [-1.0, 0.0, 1.0];
/// The `TimeLimit` of `Acrobot-v1`.
pub const MAX_STEPS: u32 = 500;

/// The acrobot. State `(θ1, θ2, θ̇1, θ̇2)`, θ1 = 0 hanging down; actions 0, 1, 2 apply torque −1, 0, +1.
/// Observation `(cos θ1, sin θ1, cos θ2, sin θ2, θ̇1, θ̇2)`. Reward −1 per step, 0 on the step the
/// tip rises one link length above the pivot, which ends the episode.
#[derive(Debug, Clone, Default)]
pub struct Acrobot {
    /// `None` until the first reset.
    state: Option<[f64; 4]>,
    steps: u32,
    done: bool,
}

impl Acrobot {
    /// An acrobot that must be reset before stepping.
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

fn obs(&[t1, t2, d1, d2]: &[f64; 4]) -> Obs {
    vec![
        t1.cos() as f32,
        t1.sin() as f32,
        t2.cos() as f32,
        t2.sin() as f32,
        d1 as f32,
        d2 as f32,
    ]
}

/// Time derivative of the state under joint torque `a` (the book's equations).
fn derivs(&[t1, t2, d1, d2]: &[f64; 4], a: f64) -> [f64; 4] {
    let (s2, c2) = t2.sin_cos();
    let m11 = M1 * LC1 * LC1 + M2 * (L1 * L1 + LC2 * LC2 + 2.0 * L1 * LC2 * c2) + 2.0 * MOI;
    let m12 = M2 * (LC2 * LC2 + L1 * LC2 * c2) + MOI;
    let phi2 = M2 * LC2 * G * (t1 + t2 - PI / 2.0).cos();
    let phi1 = -M2 * L1 * LC2 * d2 * d2 * s2 - 2.0 * M2 * L1 * LC2 * d2 * d1 * s2
        + (M1 * LC1 + M2 * L1) * G * (t1 - PI / 2.0).cos()
        + phi2;
    let dd2 = (a + m12 / m11 * phi1 - M2 * L1 * LC2 * d1 * d1 * s2 - phi2)
        / (M2 * LC2 * LC2 + MOI - m12 * m12 / m11);
    let dd1 = -(m12 * dd2 + phi1) / m11;
    [d1, d2, dd1, dd2]
}

/// One classical RK4 step of length `DT`.
fn rk4(s: &[f64; 4], a: f64) -> [f64; 4] {
    let add = |x: &[f64; 4], k: &[f64; 4], h: f64| std::array::from_fn(|i| x[i] + h * k[i]);
    let k1 = derivs(s, a);
    let k2 = derivs(&add(s, &k1, DT / 2.0), a);
    let k3 = derivs(&add(s, &k2, DT / 2.0), a);
    let k4 = derivs(&add(s, &k3, DT), a);
    std::array::from_fn(|i| s[i] + DT / 6.0 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]))
}

/// Wraps an angle into `[−π, π]` by whole turns, like Gymnasium's `wrap`.
fn wrap(mut x: f64) -> f64 {
    // Bounded: velocities are clipped, so one step moves an angle by far less than many turns;
    // the loop cap only guards against non-finite input.
    for _ in 0..64 {
        if x > PI {
            x -= 2.0 * PI;
        } else if x < -PI {
            x += 2.0 * PI;
        } else {
            break;
        }
    }
    x
}

impl Env for Acrobot {
    fn name(&self) -> &'static str {
        "Acrobot-v1"
    }

    fn obs_dim(&self) -> usize {
        6
    }

    fn action_space(&self) -> ActionSpace {
        ActionSpace::Discrete { n: 3 }
    }

    fn reset(&mut self, rng: &mut dyn RngCore) -> Obs {
        // Gymnasium stores the start state as float32; round the same way so episodes agree.
        let s = std::array::from_fn(|_| f64::from(uniform(rng, -0.1, 0.1) as f32));
        self.reset_to(s)
    }

    fn step(&mut self, action: Action) -> Result<Step, EnvError> {
        let s = self.state.ok_or(EnvError::NotReset)?;
        if self.done {
            return Err(EnvError::EpisodeOver);
        }
        let torque = match action {
            Action::Discrete(i) if (i as usize) < TORQUES.len() => TORQUES[i as usize],
            _ => {
                return Err(EnvError::InvalidAction {
                    action,
                    space: self.action_space(),
                });
            }
        };
        let mut ns = rk4(&s, torque);
        ns[0] = wrap(ns[0]);
        ns[1] = wrap(ns[1]);
        ns[2] = ns[2].clamp(-MAX_VEL_1, MAX_VEL_1);
        ns[3] = ns[3].clamp(-MAX_VEL_2, MAX_VEL_2);
        self.state = Some(ns);
        self.steps += 1;
        // Tip height above the pivot is −cos θ1 − cos(θ1 + θ2); done when it exceeds one link.
        let terminated = -ns[0].cos() - (ns[1] + ns[0]).cos() > 1.0;
        // Like Gymnasium's `TimeLimit`, the limit flags truncation even on a terminal step.
        let truncated = self.steps >= MAX_STEPS;
        self.done = terminated || truncated;
        Ok(Step {
            obs: obs(&ns),
            reward: if terminated { 0.0 } else { -1.0 },
            terminated,
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64; 4], b: &[f64; 4]) {
        for i in 0..4 {
            assert!((a[i] - b[i]).abs() < 1e-12, "component {i}: {a:?} vs {b:?}");
        }
    }

    /// Reference values computed with an independent float64 transcription of the book equations and
    /// RK4 (plain Python `math`, transcribed separately from Gymnasium's `acrobot.py` equations).
    #[test]
    fn rk4_steps_match_reference_values() {
        let mut env = Acrobot::new();
        env.reset_to([0.0; 4]);
        let want = [
            [
                -0.013262967177227795,
                0.03428722934738544,
                -0.12866185280996106,
                0.33450108998660194,
            ],
            [
                -0.0484896538093726,
                0.12748779480535294,
                -0.2132848732767469,
                0.5754630640496233,
            ],
            [
                -0.06723706338620503,
                0.18553771278886602,
                0.030714304370452555,
                -0.0064477093097422555,
            ],
        ];
        for (a, w) in [2, 2, 0].into_iter().zip(want) {
            let s = env.step(Action::Discrete(a)).unwrap();
            assert_eq!(s.reward, -1.0);
            assert!(!s.done());
            close(&env.state().unwrap(), &w);
        }
        env.reset_to([0.05, -0.03, 0.1, -0.2]);
        let want = [
            [
                0.06229716776017948,
                -0.060277457483501294,
                0.01965494848919759,
                -0.09586656406569591,
            ],
            [
                0.07052212043647649,
                -0.10098137547605046,
                0.059526478757651116,
                -0.30261948793286947,
            ],
            [
                0.05792017443852545,
                -0.10796411618632011,
                -0.18281695457454927,
                0.2313822876642408,
            ],
        ];
        for (a, w) in [1, 0, 2].into_iter().zip(want) {
            env.step(Action::Discrete(a)).unwrap();
            close(&env.state().unwrap(), &w);
        }
    }

    /// Hanging straight down at rest with no torque is an equilibrium: gravity terms are
    /// cos(−π/2) ≈ 0 and every velocity term vanishes.
    #[test]
    fn resting_equilibrium_stays_put() {
        let d = derivs(&[0.0; 4], 0.0);
        assert!(d.iter().all(|v| v.abs() < 1e-14), "{d:?}");
        // With torque +1 at the joint only, the elbow accelerates positively and the shoulder reacts
        // negatively (d2 > 0, so θ̈1 = −d2·θ̈2/d1 < 0).
        let d = derivs(&[0.0; 4], 1.0);
        assert_eq!(d[0], 0.0);
        assert!(d[3] > 0.0 && d[2] < 0.0, "{d:?}");
    }

    #[test]
    fn terminates_when_tip_is_above_one_link() {
        let mut env = Acrobot::new();
        // Both links pointing straight up: tip height 2 > 1.
        env.reset_to([PI - 0.01, 0.0, 0.0, 0.0]);
        let s = env.step(Action::Discrete(1)).unwrap();
        assert!(s.terminated);
        assert_eq!(s.reward, 0.0);
        assert_eq!(env.step(Action::Discrete(1)), Err(EnvError::EpisodeOver));
    }

    #[test]
    fn angles_wrap_and_velocities_clip() {
        assert!((wrap(PI + 0.5) - (-PI + 0.5)).abs() < 1e-12);
        assert!((wrap(-3.0 * PI - 0.5) - (PI - 0.5)).abs() < 1e-12);
        assert!(wrap(f64::NAN).is_nan());
        let mut env = Acrobot::new();
        env.reset_to([0.0, 0.0, 100.0, -100.0]);
        let _ = env.step(Action::Discrete(1)).unwrap();
        let [t1, t2, d1, d2] = env.state().unwrap();
        assert!(d1.abs() <= MAX_VEL_1 && d2.abs() <= MAX_VEL_2);
        assert!(t1.abs() <= PI && t2.abs() <= PI);
    }
}
