// Only `messages`: `workers` defaults to `"auto"`; `CLUSTER_WORKERS` is not needed for that,
// and the primary disconnects at once, so the test stays fast on any machine.
#[cluster::message]
enum ToWorker {
    Stop,
}

#[cluster::main(messages(to_worker = ToWorker))]
async fn main() {
    #[primary(cluster)]
    {
        for worker in cluster.workers() {
            let _ = worker.send(&ToWorker::Stop).await;
        }
        cluster.disconnect().await;
    }
    #[worker(worker)]
    {
        // The primary's `Stop`, or the end of the channel at disconnect.
        let _ = worker.recv().await;
    }
}
