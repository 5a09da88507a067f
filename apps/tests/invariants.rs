//! Property tests: environment invariants under arbitrary action sequences, and the ES driver's
//! refusal to panic on arbitrary (hostile) worker results and configs.

use oxray_apps::env::{Action, ActionSpace, EnvKind};
use oxray_apps::es::{EsConfig, EsState, WorkerResult, evaluate};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn kind() -> impl Strategy<Value = EnvKind> {
    prop::sample::select(EnvKind::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any in-space action sequence keeps observations finite and within the documented ranges,
    /// and episodes end by the time limit.
    #[test]
    fn observations_stay_in_range(k in kind(), seed in any::<u64>(), actions in prop::collection::vec(any::<u32>(), 1..600)) {
        let mut env = k.make();
        let mut obs = env.reset(&mut StdRng::seed_from_u64(seed));
        prop_assert_eq!(obs.len(), env.obs_dim());
        let space = env.action_space();
        for (t, a) in actions.iter().enumerate() {
            let action = match space {
                ActionSpace::Discrete { n } => Action::Discrete(a % n),
                ActionSpace::Continuous { low, high } => {
                    Action::Continuous(low + (high - low) * (*a as f32 / u32::MAX as f32) * 1.5)
                }
            };
            let step = env.step(action).unwrap();
            prop_assert!(step.obs.iter().all(|v| v.is_finite()), "{:?}", step.obs);
            prop_assert!(step.reward.is_finite());
            match k {
                EnvKind::Pendulum => {
                    prop_assert!(step.obs[2].abs() <= 8.0);
                    prop_assert!(step.reward <= 0.0 && step.reward >= -16.3);
                }
                EnvKind::Acrobot => {
                    prop_assert!(step.obs[4].abs() <= 4.0 * std::f32::consts::PI + 1e-4);
                    prop_assert!(step.obs[5].abs() <= 9.0 * std::f32::consts::PI + 1e-4);
                    prop_assert!(step.reward == -1.0 || (step.reward == 0.0 && step.terminated));
                }
                EnvKind::CartPole => prop_assert_eq!(step.reward, 1.0),
            }
            prop_assert!(t < 500, "episode longer than any time limit");
            obs = step.obs.clone();
            if step.done() {
                break;
            }
        }
        prop_assert!(!obs.is_empty());
    }

    /// Whatever a peer sends as results, `update` returns (an error or stats) and never panics;
    /// an error leaves the parameters untouched.
    #[test]
    fn update_survives_garbage(
        results in prop::collection::vec(
            (any::<u64>(), any::<u64>(), any::<f32>(), any::<f32>(), any::<u32>()), 0..12),
        use_real_seeds in any::<bool>(),
    ) {
        let config = EsConfig { eval_episodes: 0, population: 6, ..EsConfig::new(EnvKind::CartPole) };
        let mut state = EsState::new(config).unwrap();
        let tasks = state.next_tasks();
        let results: Vec<WorkerResult> = results
            .into_iter()
            .enumerate()
            .map(|(i, (n, e, p, m, s))| {
                let (noise_seed, episode_seed) = if use_real_seeds {
                    let t = tasks[i % tasks.len()];
                    (t.noise_seed, t.episode_seed)
                } else {
                    (n, e)
                };
                WorkerResult { noise_seed, episode_seed, reward_pos: p, reward_neg: m, env_steps: s }
            })
            .collect();
        let before = state.params().to_vec();
        match state.update(&results) {
            Ok(stats) => {
                prop_assert!(stats.pairs as usize == results.len());
                prop_assert!(state.params().iter().all(|p| p.is_finite()));
            }
            Err(_) => prop_assert_eq!(state.params(), &before[..]),
        }
    }

    /// The worker entry point refuses bad input with an error, never a panic.
    #[test]
    fn evaluate_survives_garbage(name in "[A-Za-z-]{0,12}v?1?", len in 0usize..40, sigma in any::<f32>(), fill in any::<f32>()) {
        let params = vec![fill; len];
        let _ = evaluate(&name, &params, 1, sigma, 2);
        let _ = evaluate("CartPole-v1", &params, 1, sigma, 2);
    }
}
