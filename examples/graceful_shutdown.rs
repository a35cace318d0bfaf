//! Node's third cluster example, typed: as soon as a worker listens, the primary sends it a
//! `Shutdown` message and disconnects it; if it has not exited 2 s later, it is killed.
//!
//! ```sh
//! PORT=8000 cargo run --release --example graceful_shutdown
//! ```

use std::time::Duration;

use cluster::Event;
use tokio::io::AsyncReadExt;
use tracing_subscriber::EnvFilter;

/// From the primary to a worker.
#[cluster::message]
enum ToWorker {
    /// Close your connections gracefully.
    Shutdown,
}

#[cluster::main(workers = 1, messages(to_worker = ToWorker))]
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
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);

    #[primary(cluster)]
    {
        while let Some(event) = cluster.next_event().await {
            match event {
                Event::Listening { worker, address } => {
                    println!("worker {} listening on {address}", worker.id());
                    worker.send(&ToWorker::Shutdown).await?;
                    worker.disconnect();
                    let w = worker.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        if !w.is_dead() {
                            println!("worker {} did not exit in time; killing it", w.id());
                            let _ = w.kill();
                        }
                    });
                }
                Event::Exit { worker, status } => {
                    println!("worker {} exited ({status})", worker.id());
                    if cluster.workers().is_empty() {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    #[worker(worker)]
    {
        let listener = cluster::net::TcpListener::bind(("0.0.0.0", port)).await?;
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(async move {
            while let Some(conn) = listener.next().await {
                let Ok((mut socket, _)) = conn else { continue };
                let mut done = done_rx.clone();
                // Connections never end on their own; they close when shutdown begins.
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        tokio::select! {
                            r = socket.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                            _ = done.wait_for(|d| *d) => break,
                        }
                    }
                });
            }
        });
        if let Some(ToWorker::Shutdown) = worker.recv().await {
            // Initiate a graceful close of every connection.
            done_tx.send_replace(true);
        }
        let _ = server.await;
    }
    Ok(())
}
