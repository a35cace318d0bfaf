// The handler form of the primary branch: `#[on(event)]` functions, called by an event loop the
// macro adds after the branch's statements; the loop ends when `next_event` does.
use std::sync::atomic::{AtomicBool, Ordering};

use cluster::{ExitStatus, Primary, WorkerRef};

static ONLINE: AtomicBool = AtomicBool::new(false);

#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on(online)]
        async fn on_online(cluster: &Primary, worker: WorkerRef) {
            assert_eq!(worker.id(), 1);
            ONLINE.store(true, Ordering::SeqCst);
            // Completes once the worker exited; its events stay queued for the loop, which then
            // ends.
            cluster.disconnect().await;
        }

        #[on(exit)]
        async fn on_exit(
            _: &Primary,
            worker: WorkerRef,
            status: ExitStatus,
        ) -> std::io::Result<()> {
            assert_eq!(worker.id(), 1);
            assert!(status.success(), "worker exited with {status}");
            Ok(())
        }

        // A trailing expression before the loop the macro adds.
        println!("primary {} is running", std::process::id())
    }
    #[worker(worker)]
    {
        // Until the primary disconnects.
        while worker.recv().await.is_some() {}
    }
    assert!(cluster::is_worker() || ONLINE.load(Ordering::SeqCst));
}
