#[cluster::main(workers = "4")]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
