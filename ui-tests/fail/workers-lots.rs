#[cluster::main(workers = "lots")]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
