//! End-to-end learning tests of the ES core: the sequential runner must actually solve the tasks,
//! deterministically. Not timing tests: speed is printed by the `es_local` example, never asserted.
//!
//! Debug builds run the same CartPole and Acrobot checks (a few seconds); the Pendulum run needs
//! an optimised build and is skipped in debug (`cfg!(debug_assertions)`).

use oxray_apps::env::EnvKind;
use oxray_apps::es::{Curve, EsConfig, EsState, Worker, evaluate_policy, run_local};

/// Everything but the wall-clock column.
fn shape(c: &Curve) -> Vec<(u32, f32, f32, Option<f32>)> {
    c.points
        .iter()
        .map(|p| (p.step, p.mean_reward, p.max_reward, p.eval_reward))
        .collect()
}

#[test]
fn cartpole_reaches_475_within_200_steps_with_20_workers() {
    let config = EsConfig::new(EnvKind::CartPole);
    assert_eq!((config.population, config.steps, config.seed), (20, 200, 0));
    let curve = run_local(config.clone()).unwrap();
    let solved = curve
        .solved_at
        .expect("CartPole-v1 not solved in 200 steps");
    assert!(solved < 200);
    let last = curve.points.last().unwrap();
    assert!(last.eval_reward.unwrap() >= 475.0, "{last:?}");
    // The first step's evaluation is far from solved: learning happened.
    assert!(
        curve.points[0].eval_reward.unwrap() < 200.0,
        "{:?}",
        curve.points[0]
    );
    // Fresh episodes (seeds never used in training) agree that the final policy balances.
    let fresh = evaluate_policy(&config, &curve.params, 20, 0xfeed).unwrap();
    assert!(fresh >= 450.0, "held-out mean {fresh}");
    // Same seed, same run.
    let again = run_local(config).unwrap();
    assert_eq!(shape(&curve), shape(&again));
    assert_eq!(curve.params, again.params);
}

#[test]
fn acrobot_reaches_minus_100() {
    let curve = run_local(EsConfig::new(EnvKind::Acrobot)).unwrap();
    assert!(curve.solved_at.is_some(), "best {:?}", curve.best_eval());
    assert!(curve.best_eval().unwrap() >= -100.0);
}

#[test]
fn pendulum_reaches_minus_200_in_release() {
    if cfg!(debug_assertions) {
        eprintln!("skipped in debug builds: run with --release");
        return;
    }
    let config = EsConfig::new(EnvKind::Pendulum);
    let curve = run_local(config.clone()).unwrap();
    let first = curve.points[0].eval_reward.unwrap();
    assert!(first < -900.0, "untrained pendulum already at {first}");
    assert!(curve.solved_at.is_some(), "best {:?}", curve.best_eval());
    let fresh = evaluate_policy(&config, &curve.params, 20, 0xbeef).unwrap();
    assert!(fresh > -350.0, "held-out mean {fresh}");
}

/// The driver/worker split used with real actors, mimicked here with out-of-order results and
/// one worker lost every step: still solves CartPole.
#[test]
fn split_driver_and_workers_with_losses_still_learns() {
    let config = EsConfig::new(EnvKind::CartPole);
    let mut state = EsState::new(config.clone()).unwrap();
    let mut workers: Vec<Worker> = (0..20)
        .map(|_| Worker::from_config(&config).unwrap())
        .collect();
    let mut solved = false;
    while !state.finished() && !solved {
        let tasks = state.next_tasks();
        let mut results: Vec<_> = tasks
            .iter()
            .zip(&mut workers)
            .map(|(&t, w)| w.evaluate(state.params(), t).unwrap())
            .collect();
        // Lose the worker whose index is the step number mod 20, and reverse arrival order.
        results.remove(state.step() as usize % 20);
        results.reverse();
        let stats = state.update(&results).unwrap();
        assert_eq!(stats.pairs, 19);
        solved = stats.solved;
    }
    assert!(solved, "not solved after {} steps", state.step());
}

/// The report files from a real run: the CSV has one row per step and ends at the solving step,
/// the PNG is a real PNG.
#[test]
fn real_run_writes_csv_and_png() {
    use oxray_apps::report::{save_csv, save_curve_png};
    let curve = run_local(EsConfig::new(EnvKind::CartPole)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (csv, png) = (dir.path().join("es.csv"), dir.path().join("es.png"));
    save_csv(&curve, &csv).unwrap();
    save_curve_png(&curve, &png).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "step,mean_reward,eval_reward,elapsed_s");
    assert_eq!(rows.len(), curve.points.len() + 1);
    let last: Vec<&str> = rows[rows.len() - 1].split(',').collect();
    assert_eq!(last[0].parse::<u32>().unwrap(), curve.solved_at.unwrap());
    assert!(last[2].parse::<f32>().unwrap() >= 475.0);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 2000);
}
