#[cluster::main(workers = 1, scheduling = "random")]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
