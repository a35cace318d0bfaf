#[cluster::main(workers = 0)]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
