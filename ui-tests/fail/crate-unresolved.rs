#[cluster::main(crate = "my_cluster", workers = 1)]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
