use cluster::{Primary, WorkerRef};

#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on(online)]
        fn on_online(_: &Primary, worker: WorkerRef) {
            println!("worker {} online", worker.id());
        }
    }
    #[worker]
    {}
}
