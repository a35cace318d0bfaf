#[cluster::message]
fn hello() -> u32 {
    1
}

fn main() {}
