use cluster::{Primary, WorkerRef};

#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on(exit)]
        async fn on_exit(_: &Primary, worker: WorkerRef) {
            println!("worker {} exited", worker.id());
        }
    }
    #[worker]
    {}
}
