const WORKERS: usize = 4;

#[cluster::main(workers = WORKERS)]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
