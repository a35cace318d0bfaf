//! Expansions raise no lints: rustc's warnings here, clippy's pedantic set under clippy.
#![deny(warnings)]
#![deny(clippy::pedantic)]

use cluster::{ExitStatus, Primary, WorkerRef};

/// From a worker to the primary.
#[cluster::message]
#[derive(Debug)]
enum ToPrimary {
    /// A greeting with the worker's id.
    Hello(u32),
}

/// From the primary to a worker.
#[cluster::message]
#[derive(Debug)]
struct ToWorker {
    stop: bool,
}

#[cluster::main(
    workers = 1,
    scheduling = "shared",
    messages(to_primary = ToPrimary, to_worker = ToWorker)
)]
async fn main() -> Result<(), cluster::Error> {
    #[primary(cluster)]
    {
        #[on(message)]
        async fn on_message(
            _: &Primary<ToPrimary, ToWorker>,
            worker: WorkerRef<ToWorker>,
            msg: ToPrimary,
        ) -> Result<(), cluster::Error> {
            let ToPrimary::Hello(n) = msg;
            assert_eq!(n, worker.id());
            worker.send(&ToWorker { stop: true }).await
        }

        #[on(exit)]
        async fn on_exit(
            cluster: &Primary<ToPrimary, ToWorker>,
            _: WorkerRef<ToWorker>,
            status: ExitStatus,
        ) {
            assert!(status.success());
            cluster.disconnect().await;
        }
    }
    #[worker(worker)]
    {
        worker.send(&ToPrimary::Hello(worker.id())).await?;
        while let Some(msg) = worker.recv().await {
            if msg.stop {
                break;
            }
        }
    }
    Ok(())
}
