#[oxray::remote]
fn double(x: u64) -> u64 {
    x * 2
}

fn main() {
    oxray::init().unwrap();
    let s = oxray::put(&String::from("not a number")).unwrap();
    let _ = double::remote(&s);
}
