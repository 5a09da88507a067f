#[derive(Debug)]
pub struct Counter {
    n: u64,
}

#[oxray::actor]
impl Counter {
    pub fn new() -> Self {
        Counter { n: 0 }
    }
    pub fn incr(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
}

fn main() {
    oxray::init().unwrap();
    let c = Counter::remote().unwrap();
    let _ = c.decr();
}
