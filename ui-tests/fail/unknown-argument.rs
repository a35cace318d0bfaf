#[cluster::main(workers = 1, threads = 4)]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
