#[cluster::main(workers = 1)]
async fn main(args: Vec<String>) {
    #[primary]
    {
        let _ = args;
    }
    #[worker]
    {}
}
