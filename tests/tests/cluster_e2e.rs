//! Three real node processes on loopback, a driver in this process: the SDK end to end across processes.
//!
//! One test function on purpose: the driver's runtime is per process, and the cluster takes a moment to start.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use oxray::pg::{PlacementStrategy, placement_group, remove_placement_group};
use oxray::{ActorOptions, Error, Strategy, TaskOptions};
use oxray_tests::harness::{TestCluster, wait_until};
use oxray_tests::*;

const NODE: &str = env!("CARGO_BIN_EXE_oxray-test-node");

/// The `oxray` CLI binary, built beside this test by `cargo nextest run --workspace`.
fn oxray_cli() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let cli = dir.join("oxray");
    assert!(
        cli.exists(),
        "{} not built: run the tests with --workspace",
        cli.display()
    );
    cli
}

#[test]
fn three_node_cluster_end_to_end() {
    // Tiny values are kept by id here, as any other, so that refs nested in values resolve from their owners
    // (carrying is checked in `borrowers.rs`).
    // SAFETY: set before any thread of this test process reads the environment (nextest runs one test per process).
    unsafe { std::env::set_var("OXRAY_CARRY_MAX", "0") };
    link();
    // 3 s of silence declares a node dead: long enough that a node starved by a loaded CI machine is not.
    let mut cluster = TestCluster::start(NODE, 1, &["--dead-after-ms", "3000"]);
    cluster.add_node(1, &[]);
    let doomed = cluster.add_node(1, &[]);
    oxray::connect(&cluster.address, &cluster.token).expect("driver connects");

    // A value task and a ref-passing, task-spawning task graph.
    assert_eq!(add::remote(40, 2).unwrap().get().unwrap(), 42);
    let total = tree_sum::remote(0, 200)
        .unwrap()
        .get_timeout(Duration::from_secs(60))
        .unwrap();
    assert_eq!(total, (0..200).sum::<i64>());

    // The driver has no CPUs: work lands on the three nodes, and spreads when they are busy.
    let refs: Vec<_> = (0..12).map(|_| where_am_i::remote(150).unwrap()).collect();
    let nodes: HashSet<String> = oxray::get_all(&refs).unwrap().into_iter().collect();
    assert!(nodes.len() >= 2, "tasks did not spread: {nodes:?}");

    // A large result and a ref to it as an argument of another task on another node.
    let big = make_vec::remote(1_000_000).unwrap();
    let s = sum_vec::remote(&big).unwrap().get().unwrap();
    assert_eq!(s, (0..1_000_000u64).map(|i| i as f32 as f64).sum::<f64>());
    assert_eq!(big.view().unwrap().len(), 1_000_000);

    // A value larger than any message (the transport's limit is 64 MiB), passed by value: it is put into the
    // driver's store and streamed to the node that runs the task.
    let huge: Vec<f32> = (0..20_000_000u64).map(|i| (i % 1000) as f32).collect();
    let expected: f64 = huge.iter().map(|x| *x as f64).sum();
    assert_eq!(
        sum_vec::remote(huge)
            .unwrap()
            .get_timeout(Duration::from_secs(120))
            .unwrap(),
        expected
    );

    // A remote panic comes back as a typed error with its message.
    match fail_with::remote("remote boom".to_string()).unwrap().get() {
        Err(Error::TaskFailed { message, .. }) => assert_eq!(message, "remote boom"),
        other => panic!("unexpected {other:?}"),
    }

    // An actor on another node: calls from one caller run in order, even though they travel concurrently.
    let rec = Recorder::remote_with(&ActorOptions::new().name("recorder"), 0).unwrap();
    let lens: Vec<_> = (1..=300).map(|i| rec.record(i)).collect();
    assert_eq!(
        oxray::get_all(&lens).unwrap(),
        (2..=301).collect::<Vec<usize>>()
    );
    assert_eq!(rec.seen().get().unwrap(), (0..=300).collect::<Vec<u64>>());
    let same = oxray::get_actor::<Recorder>("recorder").unwrap();
    assert_eq!(same.record(1000).get().unwrap(), 302);
    // A handle passed to a task on any node reaches the same actor.
    let via: Vec<_> = (0..3)
        .map(|i| record_via::remote(rec.clone(), 2000 + i).unwrap())
        .collect();
    let via = oxray::get_all(&via).unwrap();
    assert_eq!(
        via.iter().map(|(n, _)| *n).max(),
        Some(305),
        "calls through passed handles: {via:?}"
    );

    // Refs made on another node come back nested in a result and resolve from their owner; refs owned here travel
    // nested in an argument and resolve over there.
    let made: Vec<oxray::ObjectRef<u64>> = make_refs::remote(5).unwrap().get().unwrap();
    assert_eq!(oxray::get_all(&made).unwrap(), vec![0, 10, 20, 30, 40]);
    let mine: Vec<oxray::ObjectRef<u64>> = (1..=10u64).map(|i| oxray::put(&i).unwrap()).collect();
    assert_eq!(sum_refs::remote(mine).unwrap().get().unwrap(), 55);
    let chained = make_refs::remote(4).unwrap();
    assert_eq!(sum_refs::remote(&chained).unwrap().get().unwrap(), 60);
    // Once this process holds none of those refs, the nodes that made them free them.
    drop((made, chained));
    let me = oxray::node_state().unwrap().node.id;
    let mut left = usize::MAX;
    let freed = wait_until(Duration::from_secs(15), || {
        let s = oxray::node::cluster_state(&cluster.address, &cluster.token).unwrap();
        left = s
            .nodes
            .iter()
            .filter(|n| n.node.id != me)
            .map(|n| n.objects.len())
            .sum();
        left == 0
    });
    assert!(
        freed,
        "{left} objects left on the nodes after every ref was dropped"
    );
    assert!(matches!(
        oxray::get_actor::<Recorder>("nobody"),
        Err(Error::ActorNotFound(_))
    ));

    // The user KV lives in the GCS on the head: a write from the driver is read by a task on another node.
    oxray::kv::put("config/lr", b"0.01").unwrap();
    assert_eq!(
        kv_read::remote("config/lr".to_string())
            .unwrap()
            .get()
            .unwrap(),
        Some(b"0.01".to_vec())
    );
    // A killed actor's name is free again.
    let temp = Recorder::remote_with(&ActorOptions::new().name("temp"), 0).unwrap();
    assert_eq!(temp.record(1).get().unwrap(), 2);
    assert!(
        Recorder::remote_with(&ActorOptions::new().name("temp"), 0).is_err(),
        "name reused while alive"
    );
    oxray::kill(&temp);
    assert!(wait_until(Duration::from_secs(10), || {
        Recorder::remote_with(&ActorOptions::new().name("temp"), 0).is_ok()
    }));

    // Actors die with the process that created them, unless detached: a driver creates one of each and exits.
    let out = std::process::Command::new(NODE)
        .args(["drive-and-exit", &cluster.address, &cluster.token])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ready"),
        "short-lived driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || matches!(
            oxray::get_actor::<Recorder>("ephemeral"),
            Err(Error::ActorNotFound(_))
        )),
        "an actor outlived its creator"
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    let keeper = oxray::get_actor::<Recorder>("keeper").expect("detached actor gone");
    assert_eq!(keeper.seen().get().unwrap(), vec![2, 20]);

    // Cancelling a task queued on another node: its ref fails at once, and it never runs there.
    let blockers: Vec<_> = (0..6).map(|_| where_am_i::remote(1200).unwrap()).collect();
    let victim = mark::remote("cancelled-task-ran".to_string()).unwrap();
    assert!(oxray::cancel(&victim), "cancel found no task");
    assert!(matches!(
        victim.get_timeout(Duration::from_secs(1)),
        Err(Error::Cancelled)
    ));
    oxray::get_all(&blockers).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        oxray::kv::get("cancelled-task-ran").unwrap(),
        None,
        "a cancelled task ran"
    );
    // And a task waiting for a node that fits.
    let never = add::remote_with(&TaskOptions::new().num_gpus(8.0), 1, 1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(oxray::cancel(&never));
    assert!(matches!(never.get(), Err(Error::Cancelled)));

    // An infeasible task waits, visibly, until a node that fits joins.
    let gpu_task = add::remote_with(&TaskOptions::new().num_gpus(1.0), 1, 1).unwrap();
    assert!(matches!(
        gpu_task.get_timeout(Duration::from_millis(700)),
        Err(Error::GetTimeout(_))
    ));
    let state = oxray::node::cluster_state(&cluster.address, &cluster.token).unwrap();
    assert!(
        state.nodes.iter().map(|n| n.node.infeasible).sum::<usize>() >= 1,
        "infeasible task not reported"
    );
    cluster.add_node(1, &["--num-gpus", "1"]);
    assert_eq!(gpu_task.get_timeout(Duration::from_secs(30)).unwrap(), 2);

    // Placement groups: STRICT_SPREAD puts each bundle on its own node, and tasks in a bundle run there.
    let one_cpu = oxray::Resources {
        num_cpus: 1.0,
        ..Default::default()
    };
    let pg = placement_group(vec![one_cpu.clone(); 3], PlacementStrategy::StrictSpread).unwrap();
    assert!(
        pg.wait(Duration::from_secs(20)),
        "placement group never reserved"
    );
    let nodes = pg.bundle_nodes().unwrap();
    assert_eq!(
        nodes.iter().collect::<HashSet<_>>().len(),
        3,
        "bundles share a node: {nodes:?}"
    );
    for (i, node) in nodes.iter().enumerate() {
        let opts = TaskOptions::new().strategy(Strategy::PlacementGroup {
            group: pg.id(),
            bundle: Some(i),
        });
        assert_eq!(
            &where_am_i::remote_with(&opts, 0).unwrap().get().unwrap(),
            node
        );
    }
    // Every bundle is listed by its node. A node too busy to answer at once is marked unreachable, not
    // silently dropped, so the count is asked for until every node reports.
    let bundles = || {
        let s = oxray::node::cluster_state(&cluster.address, &cluster.token).unwrap();
        let all = s.members.iter().all(|m| !m.alive || m.reachable);
        (all, s.nodes.iter().map(|n| n.bundles.len()).sum::<usize>())
    };
    let mut seen = (false, 0);
    assert!(
        wait_until(Duration::from_secs(20), || {
            seen = bundles();
            seen.0
        }),
        "a node never reported its state"
    );
    assert_eq!(seen.1, 3, "bundles listed");
    // More strictly spread bundles than nodes: it waits, reserving nothing.
    let too_big = placement_group(vec![one_cpu; 9], PlacementStrategy::StrictSpread).unwrap();
    assert!(!too_big.wait(Duration::from_millis(800)));
    remove_placement_group(&too_big).unwrap();
    remove_placement_group(&pg).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            seen = bundles();
            seen.0
        }),
        "a node never reported its state"
    );
    assert_eq!(seen.1, 0, "bundles left after removal");

    // The CLI's view: every node listed, the named actor listed.
    let state = oxray::node::cluster_state(&cluster.address, &cluster.token).unwrap();
    assert_eq!(
        state
            .members
            .iter()
            .filter(|m| m.alive && m.cpus > 0.0)
            .count(),
        4
    );
    assert!(
        state
            .nodes
            .iter()
            .flat_map(|n| &n.actors)
            .any(|a| a.name.as_deref() == Some("recorder"))
    );

    // The `oxray` CLI against the running cluster: people's table and scripts' JSON.
    let cli = oxray_cli();
    let run = |args: &[&str], address: &str| {
        std::process::Command::new(&cli)
            .args(args)
            .args(["--address", address, "--token", &cluster.token])
            .output()
            .unwrap()
    };
    let status = run(&["status"], &cluster.address);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "oxray status failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    // The short-lived driver is listed dead.
    assert!(text.contains("nodes: 5 alive, 1 dead"), "{text}");
    let json = run(&["status", "--json"], &cluster.address);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json is JSON");
    assert_eq!(v["members"].as_array().map(|m| m.len()), Some(6), "{v}");
    assert_eq!(
        v["gcs"][0]["shards"][0]["is_leader"],
        serde_json::Value::Bool(true),
        "the head's GCS replica leads: {}",
        v["gcs"]
    );
    let listed = run(&["list", "actors", "--json"], &cluster.address);
    let actors: serde_json::Value =
        serde_json::from_slice(&listed.stdout).expect("list actors --json is JSON");
    assert!(
        actors
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "recorder"),
        "{actors}"
    );
    let bad = run(&["status"], "127.0.0.1:1");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is `start --head` running"),
        "unhelpful error"
    );

    // An actor with restarts, on the node about to die, with a call in flight when it dies.
    let doomed_id = cluster.node_id(doomed).to_string();
    let phoenix = Recorder::remote_with(
        &ActorOptions::new()
            .name("phoenix")
            .max_restarts(1)
            .max_task_retries(1)
            .strategy(Strategy::NodeAffinity {
                node: u128::from_str_radix(&doomed_id, 16).unwrap(),
                soft: true,
            }),
        7,
    )
    .unwrap();
    assert_eq!(phoenix.node().get().unwrap(), doomed_id);
    assert_eq!(phoenix.record(8).get().unwrap(), 2);
    // A strictly spread placement group with a bundle on every CPU node, the doomed one included.
    let quarter = oxray::Resources {
        num_cpus: 0.25,
        ..Default::default()
    };
    let spread = placement_group(vec![quarter; 4], PlacementStrategy::StrictSpread).unwrap();
    assert!(
        spread.wait(Duration::from_secs(20)),
        "4-node group never held"
    );
    assert!(spread.bundle_nodes().unwrap().contains(&doomed_id));
    let in_flight = phoenix.nap(1500);
    std::thread::sleep(Duration::from_millis(200));

    // A killed node is declared dead within the bound (3 s of silence, checked every 300 ms), plus slack for a
    // loaded machine.
    cluster.kill(doomed);
    let t = Instant::now();
    let dead = wait_until(Duration::from_secs(20), || {
        oxray::node::cluster_state(&cluster.address, &cluster.token)
            .map(|s| {
                s.members
                    .iter()
                    .filter(|m| !m.alive && m.cpus > 0.0)
                    .count()
                    == 1
            })
            .unwrap_or(false)
    });
    assert!(dead, "killed node never declared dead");
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "declared dead only after {:?}",
        t.elapsed()
    );
    // Work still runs on the survivors. Half a CPU: the group holds a quarter of each 1-CPU node, and nodes admit
    // tasks by what is free, so a whole-CPU task would wait for the group to go.
    assert_eq!(
        add::remote_with(&TaskOptions::new().num_cpus(0.5), 2, 2)
            .unwrap()
            .get_timeout(Duration::from_secs(30))
            .unwrap(),
        4
    );
    // The actor was restarted elsewhere (its constructor ran again: state is fresh), the call in flight was retried
    // there, and its name leads to the new incarnation.
    assert_eq!(in_flight.get_timeout(Duration::from_secs(30)).unwrap(), 1);
    assert_eq!(phoenix.seen().get().unwrap(), vec![7]);
    assert_ne!(phoenix.node().get().unwrap(), doomed_id);
    let by_name = oxray::get_actor::<Recorder>("phoenix").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || by_name.seen().get().is_ok()
            || oxray::get_actor::<Recorder>("phoenix")
                .map(|h| h.seen().get().is_ok())
                .unwrap_or(false)),
        "restarted actor not reachable by name"
    );
    // The group's lost bundle cannot go anywhere (every survivor already holds one of its bundles) until a node
    // joins; then it is placed there and the group is whole again, the other bundles where they were.
    let before = spread.bundle_nodes().unwrap();
    assert!(
        !spread.wait(Duration::from_millis(500)),
        "bundle placed twice on a node"
    );
    let fresh = cluster.add_node(1, &[]);
    assert!(
        spread.wait(Duration::from_secs(20)),
        "lost bundle never placed again"
    );
    let after = spread.bundle_nodes().unwrap();
    assert!(
        after.contains(&cluster.node_id(fresh).to_string()),
        "{after:?}"
    );
    assert!(!after.contains(&doomed_id));
    assert_eq!(after.iter().collect::<HashSet<_>>().len(), 4);
    let kept = before.iter().zip(&after).filter(|(b, a)| b == a).count();
    assert_eq!(kept, 3, "surviving bundles moved: {before:?} -> {after:?}");
    remove_placement_group(&spread).unwrap();

    // Without restarts left, the next death is final.
    oxray::kill(&phoenix);
    assert!(matches!(
        phoenix.seen().get_timeout(Duration::from_secs(10)),
        Err(Error::ActorDied { .. })
    ));
}
