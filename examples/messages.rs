//! Typed messages both ways: the primary sends every worker 1000 `Ping`s, each worker answers
//! each with a `Pong` of the same number; then the primary disconnects the cluster.
//!
//! ```sh
//! CLUSTER_WORKERS=3 cargo run --release --example messages
//! ```

use std::collections::HashMap;

use cluster::Event;
use tracing_subscriber::EnvFilter;

const PINGS: u32 = 1000;

/// From the primary to a worker.
#[cluster::message]
#[derive(Debug)]
enum ToWorker {
    Ping(u32),
}

/// From a worker to the primary.
#[cluster::message]
#[derive(Debug)]
enum ToPrimary {
    Pong(u32),
}

#[cluster::main(workers = "auto", messages(to_primary = ToPrimary, to_worker = ToWorker))]
async fn main() -> anyhow::Result<()> {
    // Logs of the cluster's life (fork, online, exit, respawn, reload) on stderr; `RUST_LOG`
    // picks the level (`RUST_LOG=info` shows every lifecycle step).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal, never in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    #[primary(cluster)]
    {
        let expected = cluster.start().await.len();
        // Next expected pong per worker: answers must come back complete and in order.
        let mut next: HashMap<u32, u32> = HashMap::new();
        let mut done = 0;
        while done < expected {
            let Some(event) = cluster.next_event().await else {
                break;
            };
            match event {
                Event::Online { worker } => {
                    for n in 0..PINGS {
                        worker.send(&ToWorker::Ping(n)).await?;
                    }
                }
                Event::Message {
                    worker,
                    msg: ToPrimary::Pong(n),
                    ..
                } => {
                    let want = next.entry(worker.id()).or_insert(0);
                    anyhow::ensure!(
                        n == *want,
                        "worker {} answered {n}, expected {want}",
                        worker.id()
                    );
                    *want += 1;
                    if *want == PINGS {
                        println!("worker {} answered {PINGS} pings", worker.id());
                        done += 1;
                    }
                }
                Event::Exit { worker, status } => {
                    anyhow::bail!("worker {} exited early ({status})", worker.id());
                }
                _ => {}
            }
        }
        cluster.disconnect().await;
        println!("all workers exited after disconnect");
    }
    #[worker(worker)]
    {
        while let Some(ToWorker::Ping(n)) = worker.recv().await {
            worker.send(&ToPrimary::Pong(n)).await?;
        }
    }
    Ok(())
}
