//! Runs evolution strategies sequentially in one thread and prints the learning curve: the
//! reference the distributed `examples/es.rs` is compared against. Not a benchmark of oxray.
//!
//! Usage: `cargo run -p oxray-apps --release --example es_local -- [ENV] [SEED] [STEPS]`
//! (defaults `CartPole-v1 0 200`). With `ES_OUT=DIR` set, writes `DIR/<env>.csv` and `DIR/<env>.png`.

use oxray_apps::es::{EsConfig, run_local_with};
use oxray_apps::report;

fn main() {
    let mut args = std::env::args().skip(1);
    let env = args.next().unwrap_or_else(|| "CartPole-v1".to_owned());
    let mut config = match EsConfig::from_name(&env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}: {:?}", std::error::Error::source(&e));
            std::process::exit(2);
        }
    };
    if let Some(seed) = args.next().and_then(|s| s.parse().ok()) {
        config.seed = seed;
    }
    if let Some(steps) = args.next().and_then(|s| s.parse().ok()) {
        config.steps = steps;
    }
    // Tuning knobs, for experiments only.
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
    if let Some(v) = var("ES_LR") {
        config.lr = v as f32;
    }
    if let Some(v) = var("ES_SIGMA") {
        config.sigma = v as f32;
    }
    if let Some(v) = var("ES_HIDDEN") {
        config.hidden = v as u32;
    }
    if let Some(v) = var("ES_POP") {
        config.population = v as u32;
    }
    if let Some(v) = var("ES_L2") {
        config.l2 = v as f32;
    }
    println!("{config:?}");
    let mut env_steps = 0u64;
    let result = run_local_with(config, |s| {
        env_steps += s.env_steps;
        println!(
            "step {:>3}  mean {:>8.2}  max {:>8.2}  eval {:>8.2}  |θ| {:.3}",
            s.step,
            s.mean_reward,
            s.max_reward,
            s.eval_reward.unwrap_or(f32::NAN),
            s.param_norm
        );
    });
    match result {
        Ok(curve) => {
            let elapsed = curve.points.last().map_or(0.0, |p| p.elapsed_s);
            println!(
                "solved_at {:?}  best eval {:?}  elapsed {:.3}s  steps {}  worker env steps {} ({:.2} M/s of wall time, eval included)",
                curve.solved_at,
                curve.best_eval(),
                elapsed,
                curve.points.len(),
                env_steps,
                env_steps as f64 / elapsed.max(1e-9) / 1e6,
            );
            if let Ok(dir) = std::env::var("ES_OUT") {
                let base = std::path::Path::new(&dir).join(curve.env.name());
                let written = report::save_csv(&curve, &base.with_extension("csv"))
                    .and_then(|()| report::save_curve_png(&curve, &base.with_extension("png")));
                match written {
                    Ok(()) => println!("wrote {}.csv and .png", base.display()),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
