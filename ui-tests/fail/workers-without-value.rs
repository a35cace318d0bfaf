#[cluster::main(workers 4, scheduling = "shared")]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
