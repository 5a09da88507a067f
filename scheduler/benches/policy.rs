//! Scheduler decision throughput at cluster scale.
//!
//! Prints two figures for a 1,000-node cluster (single thread):
//! - `sim_decisions_per_s`: policy decisions per second inside the whole simulator (a million
//!   tasks: real `LocalQueue`s, event queue and batched view updates included);
//! - `policy_decisions_per_s`: `Policy::decide` alone on a randomly loaded view.
//!
//! Usage: `cargo bench -p oxray-scheduler --bench policy [-- --json] [--nodes N] [--tasks N]`.
//! With `--json` it prints one JSON object and nothing else. Not a criterion benchmark: one long
//! run per figure is more telling here than many short samples.

use oxray_scheduler::sim::{measure_decisions_per_s, measure_policy_decisions_per_s};

fn arg_value(args: &[String], name: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.replace('_', "").parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let nodes = arg_value(&args, "--nodes").unwrap_or(1_000);
    let tasks = arg_value(&args, "--tasks").unwrap_or(1_000_000);
    let seed = 1;

    let policy = measure_policy_decisions_per_s(nodes, tasks, seed);
    let sim = measure_decisions_per_s(nodes, tasks, seed);
    if json {
        let out = serde_json::json!({
            "sim_decisions_per_s": sim.round(),
            "policy_decisions_per_s": policy.round(),
            "nodes": nodes,
            "tasks": tasks,
        });
        println!("{out}");
    } else {
        println!("scheduler policy benchmark: {nodes} nodes, {tasks} tasks, 1 thread");
        println!(
            "  sim_decisions_per_s    {sim:>14.0}  (whole simulator: queues, events, view updates)"
        );
        println!("  policy_decisions_per_s {policy:>14.0}  (Policy::decide alone, random load)");
    }
}
