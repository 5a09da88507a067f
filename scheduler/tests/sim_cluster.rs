//! Whole-cluster simulations driving the real cores: scale (1,000 nodes, a million tasks in
//! release), no starvation, locality, and infeasible tasks placed when capacity arrives.
//! Outcomes only; speed is the `policy` benchmark's business.

use oxray_scheduler::sim::{Join, Sim, SimConfig, Workload};

/// Full scale in release; a smaller cluster in debug builds, where the same code runs ~30x slower.
fn scale() -> (usize, usize) {
    if cfg!(debug_assertions) {
        (200, 50_000)
    } else {
        (1_000, 1_000_000)
    }
}

#[test]
fn thousand_nodes_million_tasks_none_starve() {
    let (nodes, tasks) = scale();
    let seed = 42;
    let r = Sim::new(SimConfig {
        nodes,
        tasks,
        seed,
        ..Default::default()
    })
    .run();
    println!("seed {seed}: {r:#?}");
    assert_eq!(r.submitted, tasks, "seed {seed}");
    assert_eq!(r.completed, tasks, "seed {seed}");
    assert_eq!(r.starved, 0, "seed {seed}");
    assert!(r.decisions >= tasks as u64);
    // Large arguments pull their tasks: far above the 1/nodes a random placement would give.
    let hit = r.locality_hits as f64 / r.locality_tasks.max(1) as f64;
    assert!(hit > 0.5, "seed {seed}: locality hit rate {hit}");
}

#[test]
fn overload_still_completes_every_task() {
    // Offered load above capacity: queues and waits grow, but nothing is lost or stuck.
    let seed = 7;
    let r = Sim::new(SimConfig {
        nodes: 50,
        tasks: 20_000,
        utilization: 1.5,
        seed,
        ..Default::default()
    })
    .run();
    println!("seed {seed}: {r:#?}");
    assert_eq!(r.completed, 20_000, "seed {seed}");
    assert_eq!(r.starved, 0, "seed {seed}");
    assert!(
        r.waits > 0 || r.spills > 0,
        "seed {seed}: overload should have spilled or waited"
    );
}

#[test]
fn locality_is_honoured_at_moderate_load() {
    let seed = 11;
    let workload = Workload {
        cpu1: 0,
        cpu_half: 0,
        cpu2: 0,
        large_arg: 1,
        gpu1: 0,
        spread: 0,
        special: 0,
        nested: 0,
    };
    let r = Sim::new(SimConfig {
        nodes: 100,
        tasks: 20_000,
        utilization: 0.4,
        workload,
        seed,
        ..Default::default()
    })
    .run();
    println!("seed {seed}: {r:#?}");
    assert_eq!(r.completed, 20_000);
    let hit = r.locality_hits as f64 / r.locality_tasks as f64;
    assert!(hit > 0.9, "seed {seed}: locality hit rate {hit}");
}

#[test]
fn infeasible_tasks_are_reported_then_placed_when_capacity_arrives() {
    let seed = 5;
    let workload = Workload {
        special: 2,
        ..Workload::default()
    };
    let joins = vec![Join {
        at_us: 50_000,
        cpus: 8,
        special: 4,
    }];
    let r = Sim::new(SimConfig {
        nodes: 30,
        tasks: 5_000,
        workload,
        joins,
        seed,
        ..Default::default()
    })
    .run();
    println!("seed {seed}: {r:#?}");
    assert!(r.infeasible_reported > 0, "seed {seed}");
    assert_eq!(
        r.infeasible_then_completed, r.infeasible_reported,
        "seed {seed}"
    );
    assert_eq!(r.completed, 5_000, "seed {seed}");
    assert_eq!(r.still_infeasible, 0);
}

#[test]
fn infeasible_tasks_stay_reported_without_capacity() {
    let seed = 9;
    let workload = Workload {
        special: 2,
        ..Workload::default()
    };
    let r = Sim::new(SimConfig {
        nodes: 10,
        tasks: 1_000,
        workload,
        seed,
        ..Default::default()
    })
    .run();
    assert!(r.still_infeasible > 0, "seed {seed}");
    assert_eq!(r.still_infeasible, r.infeasible_reported, "seed {seed}");
    assert_eq!(r.completed + r.still_infeasible, 1_000, "seed {seed}");
    assert_eq!(r.starved, 0, "seed {seed}");
}

#[test]
fn nested_tasks_on_a_saturated_cluster_do_not_deadlock() {
    // Every task blocks on a child it submits; offered load above capacity keeps every pool full
    // of parents. Without blocked workers lending their CPU the children could never start.
    let seed = 13;
    let workload = Workload {
        cpu1: 0,
        cpu_half: 0,
        cpu2: 0,
        large_arg: 0,
        gpu1: 0,
        spread: 0,
        special: 0,
        nested: 1,
    };
    let r = Sim::new(SimConfig {
        nodes: 20,
        tasks: 5_000,
        utilization: 1.3,
        workload,
        seed,
        ..Default::default()
    })
    .run();
    println!("seed {seed}: {r:#?}");
    assert_eq!(r.children, 5_000, "seed {seed}");
    assert_eq!(r.completed, 10_000, "seed {seed}");
    assert_eq!(r.starved, 0, "seed {seed}");
}
