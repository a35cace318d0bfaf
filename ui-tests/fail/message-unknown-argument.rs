#[cluster::message(serde = "::serde")]
enum ToPrimary {
    Hello,
}

fn main() {}
