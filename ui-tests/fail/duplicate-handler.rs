use cluster::{Primary, WorkerRef};

#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on(online)]
        async fn first(_: &Primary, worker: WorkerRef) {
            println!("worker {} online", worker.id());
        }
        #[on(online)]
        async fn second(_: &Primary, worker: WorkerRef) {
            println!("worker {} online again", worker.id());
        }
    }
    #[worker]
    {}
}
