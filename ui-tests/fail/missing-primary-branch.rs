#[cluster::main(workers = 1)]
async fn main() {
    #[worker(worker)]
    {
        let _ = worker.id();
    }
}
