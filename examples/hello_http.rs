//! Node's first cluster example, production-grade: every worker serves HTTP on one shared port.
//!
//! ```sh
//! PORT=8000 CLUSTER_WORKERS=4 cargo run --release --example hello_http
//! curl -i http://127.0.0.1:8000/    # 200, `hello world`, and `x-worker-id`
//! ```
//!
//! A worker that dies unplanned is replaced. The primary obeys SIGTERM/SIGINT (graceful
//! shutdown), SIGHUP (rolling reload to the build at the binary's path), SIGUSR2 (full
//! upgrade, the primary included), SIGTTIN/SIGTTOU (one worker more/fewer). A line on its
//! stdin prints the workers' table.

use std::time::Duration;

use cluster::{Event, Heartbeat, RespawnPolicy};
use http_body_util::Full;
use hyper::Response;
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use tracing_subscriber::EnvFilter;

#[cluster::main(workers = "auto")]
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
        println!("Primary {} is running", std::process::id());
        let grace = Duration::from_secs(
            std::env::var("CLUSTER_SHUTDOWN_TIMEOUT")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(30),
        );
        // Production defaults: replace crashed workers (with backoff and a crash-loop guard),
        // kill workers that stop answering, and obey SIGTERM/SIGINT/SIGHUP/SIGTTIN/SIGTTOU.
        cluster.set_respawn(Some(RespawnPolicy::default())).await;
        cluster.set_heartbeat(Heartbeat::default()).await;
        cluster.handle_signals(grace)?;
        // A line on stdin (`stats`, or just Enter in a terminal) prints a table of the workers:
        // pid, state, uptime, connections, messages. (SIGUSR2 is the full upgrade.)
        // A thread of its own reads stdin: a read that never returns must not hold the exit
        // (tokio's `stdin()` would, at the runtime's shutdown).
        let (line_tx, mut lines) = tokio::sync::mpsc::channel::<()>(1);
        std::thread::spawn(move || {
            for _ in std::io::stdin().lines().map_while(Result::ok) {
                if line_tx.blocking_send(()).is_err() {
                    break;
                }
            }
        });
        let mut reading = true;
        loop {
            let event = tokio::select! {
                event = cluster.next_event() => event,
                line = lines.recv(), if reading => {
                    match line {
                        Some(()) => print!("{}", cluster.stats()),
                        None => reading = false,
                    }
                    continue;
                }
            };
            let Some(event) = event else { break };
            match event {
                Event::Exit { worker, status }
                    if worker.exited_after_disconnect() != Some(true) =>
                {
                    println!("worker {} died ({status}). Restarting...", worker.pid());
                }
                Event::Error { worker, error } => {
                    let who = worker.map_or("primary".to_owned(), |w| format!("worker {}", w.id()));
                    eprintln!("{who}: {error}");
                }
                _ => {}
            }
        }
        println!("all workers exited");
    }
    #[worker(worker)]
    {
        let listener = cluster::net::TcpListener::bind(("0.0.0.0", port)).await?;
        println!("Worker {} started", std::process::id());
        let id = HeaderValue::from(worker.id());
        // Serves until this worker is disconnected (reload, scale-down, shutdown), then drains:
        // in-flight requests finish and keep-alive clients are told `Connection: close`.
        cluster::http::serve(listener, move |_req| {
            let id = id.clone();
            async move {
                let mut res = Response::new(Full::new(Bytes::from_static(b"hello world\n")));
                res.headers_mut().insert("x-worker-id", id);
                res
            }
        })
        .await?;
    }
    Ok(())
}
