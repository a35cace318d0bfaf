// Handlers under a `#[primary]` without a name: the macro names the handle itself.
use cluster::{Primary, WorkerRef};

#[cluster::main(workers = 1)]
async fn main() {
    #[primary]
    {
        #[on(online)]
        async fn on_online(cluster: &Primary, _: WorkerRef) {
            cluster.disconnect().await;
        }
    }
    #[worker]
    {}
}
