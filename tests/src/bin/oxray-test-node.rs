//! A node binary with the test functions compiled in: `oxray-test-node start --head` / `start --address ...`.

fn main() {
    oxray_tests::link();
    oxray::run_node_if_requested();
    eprintln!(
        "usage: oxray-test-node start (--head | --address HOST:PORT --token TOKEN) [--num-cpus N]"
    );
    std::process::exit(2);
}
