#[cluster::main(workers = 1)]
fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
