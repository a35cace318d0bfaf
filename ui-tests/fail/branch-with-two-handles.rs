#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster, primary)]
    {}
    #[worker]
    {}
}
