//! Prints the single-thread throughput of `Mlp::forward_batch` for a few batch sizes: the
//! compute-only ceiling that the distributed serving example can be compared against. Not a test:
//! nothing is asserted.
//!
//! Usage: `cargo run -p oxray-apps --release --example serving_bench -- [SIZES]` where SIZES is a
//! comma-separated layer list (default `784,256,256,10`).

use std::hint::black_box;
use std::time::Instant;

use oxray_apps::serving::Mlp;

fn main() {
    let sizes: Vec<u32> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "784,256,256,10".to_owned())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let model = match Mlp::random(&sizes, 7) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "model {sizes:?}: {} params, {} MACs per row",
        model.params().len(),
        model.flops_per_row()
    );
    println!(
        "{:>6} {:>12} {:>12} {:>10}",
        "batch", "rows/s", "us/batch", "GFLOP/s"
    );
    for batch in [1usize, 8, 64, 512] {
        let xs: Vec<f32> = (0..batch * model.input_dim())
            .map(|i| (i as f32 * 0.01).sin())
            .collect();
        // Warm up, then time enough batches for about 0.3 s.
        let _ = model.forward_batch(&xs, batch);
        let mut iters = 0u64;
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < 0.3 {
            black_box(model.forward_batch(black_box(&xs), batch).ok());
            iters += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let rows = iters as f64 * batch as f64;
        println!(
            "{:>6} {:>12.0} {:>12.1} {:>10.2}",
            batch,
            rows / secs,
            secs / iters as f64 * 1e6,
            rows * 2.0 * model.flops_per_row() as f64 / secs / 1e9
        );
    }
}
