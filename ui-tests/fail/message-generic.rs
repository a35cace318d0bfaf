#[cluster::message]
struct Envelope<T> {
    body: T,
}

fn main() {}
