#[cluster::message(crate = "my_cluster")]
enum ToPrimary {
    Hello,
}

fn main() {}
