#[cluster::main(workers = 1, workers = 2)]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
