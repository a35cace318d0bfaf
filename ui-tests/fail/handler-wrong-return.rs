#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on(online)]
        async fn on_online(_: &cluster::Primary, worker: cluster::WorkerRef) -> u32 {
            worker.id()
        }
    }
    #[worker]
    {}
}
