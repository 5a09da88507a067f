//! Starting real node processes on loopback for tests: a head, workers, and clean-up on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster of `oxray-test-node` processes. Dropping it kills them all.
#[derive(Debug)]
pub struct TestCluster {
    /// The head's address.
    pub address: String,
    /// The cluster token.
    pub token: String,
    /// The head's data dir (holds cluster.json).
    pub data_dir: tempfile::TempDir,
    children: Vec<Child>,
    /// Short node ids as printed by `start`, by index (empty for the head).
    node_ids: Vec<String>,
    /// Each child's command line after the binary, so [`TestCluster::restart`] can start it again.
    args: Vec<Vec<String>>,
    binary: PathBuf,
}

fn read_line_with(child: &mut Child, prefix: &str, timeout: Duration) -> String {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let want = prefix.to_string();
    std::thread::spawn(move || {
        let mut found = None;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if found.is_none() && line.starts_with(&want) {
                found = Some(line[want.len()..].trim().to_string());
                let _ = tx.send(found.clone().unwrap_or_default());
            }
        }
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("node did not print {prefix:?} within {timeout:?}"))
}

impl TestCluster {
    /// Starts a head with `head_cpus` CPUs. `binary` is the node executable (`env!("CARGO_BIN_EXE_oxray-test-node")`).
    pub fn start(binary: &str, head_cpus: u32, extra: &[&str]) -> TestCluster {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<String> = ["start", "--head", "--num-cpus", &head_cpus.to_string()]
            .into_iter()
            .map(String::from)
            .collect();
        args.push("--data-dir".into());
        args.push(data_dir.path().display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(binary)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn head");
        let address = read_line_with(&mut child, "address:", Duration::from_secs(30));
        let token_path = data_dir.path().join("cluster.json");
        let deadline = Instant::now() + Duration::from_secs(10);
        let token = loop {
            if let Ok(text) = std::fs::read_to_string(&token_path)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(t) = v["token"].as_str()
            {
                break t.to_string();
            }
            assert!(Instant::now() < deadline, "head wrote no cluster.json");
            std::thread::sleep(Duration::from_millis(20));
        };
        TestCluster {
            address,
            token,
            data_dir,
            children: vec![child],
            node_ids: vec![String::new()],
            args: vec![args],
            binary: PathBuf::from(binary),
        }
    }

    /// Starts a worker node; returns its index (for `kill`).
    pub fn add_node(&mut self, cpus: u32, extra: &[&str]) -> usize {
        let mut args: Vec<String> = [
            "start",
            "--address",
            &self.address,
            "--token",
            &self.token,
            "--num-cpus",
            &cpus.to_string(),
        ]
        .into_iter()
        .map(String::from)
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, id) = self.spawn_node(&args);
        self.children.push(child);
        self.node_ids.push(id);
        self.args.push(args);
        self.children.len() - 1
    }

    /// Starts a node process; returns it and the node id it printed.
    fn spawn_node(&self, args: &[String]) -> (Child, String) {
        let mut child = Command::new(&self.binary)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        let id = read_line_with(&mut child, "node:", Duration::from_secs(30));
        (child, id)
    }

    /// Starts worker node `index` again with the command line it was first started with (kill it first).
    pub fn restart(&mut self, index: usize) {
        assert!(
            index > 0,
            "restart is for worker nodes; the head prints no `node:` line"
        );
        let args = self.args[index].clone();
        let (child, id) = self.spawn_node(&args);
        self.children[index] = child;
        // A restarted process is a new node (the failure detector's deaths are final).
        self.node_ids[index] = id;
    }

    /// Kills the head and starts it again on the same address with the same data dir (CA, token, GCS log).
    pub fn restart_head(&mut self) {
        self.kill(0);
        let port = self
            .address
            .rsplit(':')
            .next()
            .expect("address has a port")
            .to_string();
        let mut args = self.args[0].clone();
        args.extend(["--port".to_string(), port]);
        let mut child = Command::new(&self.binary)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn head");
        let address = read_line_with(&mut child, "address:", Duration::from_secs(30));
        assert_eq!(address, self.address, "head came back on another address");
        self.children[0] = child;
    }

    /// The short node id of worker `index` (as `status` prints it).
    pub fn node_id(&self, index: usize) -> &str {
        &self.node_ids[index]
    }

    /// SIGKILLs node `index` (0 is the head).
    pub fn kill(&mut self, index: usize) {
        let _ = self.children[index].kill();
        let _ = self.children[index].wait();
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes; whether it returned true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Task options that pin a task to the node whose short id is `node` (as [`TestCluster::node_id`] gives it).
pub fn on(node: &str) -> oxray::TaskOptions {
    oxray::TaskOptions::new().strategy(oxray::Strategy::NodeAffinity {
        node: u128::from_str_radix(node, 16).expect("a node id in hex"),
        soft: false,
    })
}
