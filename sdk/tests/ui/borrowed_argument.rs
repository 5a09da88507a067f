#[oxray::remote]
fn total(v: &[f32]) -> f32 {
    v.iter().sum()
}

fn main() {}
