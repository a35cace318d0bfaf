//! Node's second cluster example: workers tell the primary about every request, the primary
//! keeps the count and prints it every second.
//!
//! ```sh
//! PORT=8000 CLUSTER_WORKERS=4 cargo run --release --example count_requests
//! ```

use std::convert::Infallible;
use std::time::Duration;

use cluster::Event;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tracing_subscriber::EnvFilter;

/// From a worker to the primary.
#[cluster::message]
enum ToPrimary {
    /// One request was served.
    NotifyRequest,
}

#[cluster::main(workers = "auto", messages(to_primary = ToPrimary))]
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
        let mut num_reqs: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => println!("numReqs = {num_reqs}"),
                event = cluster.next_event() => match event {
                    Some(Event::Message { msg: ToPrimary::NotifyRequest, .. }) => num_reqs += 1,
                    Some(_) => {}
                    None => break,
                },
            }
        }
    }
    #[worker(worker)]
    {
        let listener = cluster::net::TcpListener::bind(("0.0.0.0", port)).await?;
        while let Some(conn) = listener.next().await {
            let Ok((stream, _)) = conn else { continue };
            let worker = worker.clone();
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let worker = worker.clone();
                async move {
                    // Counted before the response goes out, so the count is exact once a
                    // client has its answer.
                    let _ = worker.send(&ToPrimary::NotifyRequest).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"hello world\n",
                    ))))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
    Ok(())
}
