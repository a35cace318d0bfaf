//! An ordinary axum app on every core: the router is unchanged, only the listener is the
//! cluster's, and the server stops gracefully when its worker disconnects.
//!
//! ```sh
//! PORT=8000 CLUSTER_WORKERS=4 cargo run --release --features axum --example axum_app
//! curl -i http://127.0.0.1:8000/         # 200, `hello from worker <id>`, and `x-worker-id`
//! curl -i http://127.0.0.1:8000/health   # 200, `ok`
//! ```
//!
//! A worker that dies unplanned is replaced. SIGTERM or SIGINT to the primary drains the
//! workers (in-flight requests finish, then each worker's `axum::serve` returns) and exits 0.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::middleware::map_response;
use axum::response::Response;
use axum::routing::get;
use cluster::{Event, RespawnPolicy};
use tracing_subscriber::EnvFilter;

/// `GET /`: says which worker answered.
async fn hello(State(worker): State<u32>) -> String {
    format!("hello from worker {worker}\n")
}

/// `GET /health`: the worker is up.
async fn health() -> &'static str {
    "ok\n"
}

/// The app, as it would be in a single-process server.
fn app(worker: u32) -> Router {
    Router::new()
        .route("/", get(hello))
        .route("/health", get(health))
        .with_state(worker)
        .layer(map_response(move |mut res: Response| async move {
            res.headers_mut()
                .insert("x-worker-id", HeaderValue::from(worker));
            res
        }))
}

#[cluster::main(workers = "auto")]
async fn main() -> anyhow::Result<()> {
    // The cluster's lifecycle (and axum's accept errors) on stderr; `RUST_LOG=info` shows
    // every step.
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
        // Replace crashed workers; SIGTERM/SIGINT drain them (SIGHUP reloads, SIGTTIN/SIGTTOU
        // scale), then `next_event` gives `None`.
        cluster.set_respawn(Some(RespawnPolicy::default())).await;
        cluster.handle_signals(Duration::from_secs(30))?;
        while let Some(event) = cluster.next_event().await {
            match event {
                Event::Exit { worker, status }
                    if worker.exited_after_disconnect() != Some(true) =>
                {
                    println!("worker {} died ({status}). Restarting...", worker.pid());
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
        // Completes when the worker disconnects: axum stops accepting, finishes in-flight
        // requests, and `serve` returns.
        let closed = listener.closed();
        axum::serve(listener, app(worker.id()))
            .with_graceful_shutdown(closed)
            .await?;
    }
    Ok(())
}
