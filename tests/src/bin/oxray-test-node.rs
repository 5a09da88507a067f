//! A node binary with the test functions compiled in: `oxray-test-node start --head` / `start --address ...`.
//!
//! `oxray-test-node drive-and-exit ADDRESS TOKEN` is a short-lived driver for lifetime tests: it connects, creates
//! a named actor `ephemeral` and a named detached actor `keeper`, prints `ready`, and exits without any goodbye.

use oxray::ActorOptions;
use oxray_tests::Recorder;

fn main() {
    oxray_tests::link();
    oxray::run_node_if_requested();
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "drive-and-exit" {
        oxray::connect(&args[2], &args[3]).expect("connect");
        let e = Recorder::remote_with(&ActorOptions::new().name("ephemeral"), 1).expect("create");
        let k = Recorder::remote_with(&ActorOptions::new().name("keeper").detached(), 2)
            .expect("create");
        // Both exist before this process goes.
        e.record(10).get().expect("ephemeral answers");
        k.record(20).get().expect("keeper answers");
        println!("ready");
        std::process::exit(0);
    }
    eprintln!(
        "usage: oxray-test-node start (--head | --address HOST:PORT --token TOKEN) [--num-cpus N]"
    );
    std::process::exit(2);
}
