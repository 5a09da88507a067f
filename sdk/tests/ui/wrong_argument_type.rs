#[oxray::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {
    oxray::init().unwrap();
    let _ = add::remote("one", 2);
}
