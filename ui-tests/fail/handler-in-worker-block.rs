use cluster::{Primary, WorkerRef};

#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        cluster.disconnect().await;
    }
    #[worker]
    {
        #[on(online)]
        async fn on_online(_: &Primary, worker: WorkerRef) {
            println!("worker {} online", worker.id());
        }
    }
}
