#[cluster::main(workers = 1, scheduling = RoundRobin)]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
