//! Lifecycle probe: fork-to-online, fork-to-listening, kill-to-listening (respawn with zero
//! backoff) and the RSS of an idle worker that serves HTTP like `examples/hello_http`.
//!
//! One worker at a time. Each of `LIFE_ROUNDS` rounds SIGKILLs the worker, forks its
//! replacement the moment `Event::Exit` arrives, and times the replacement from the kill and
//! from its fork. Prints one line `RESULT {json}`. `PORT` picks the (loopback) port.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use cluster::{Event, Signal};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cluster::main(workers = 1)]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);

    #[primary(cluster)]
    {
        let rounds: usize = std::env::var("LIFE_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        let deadline = Instant::now() + Duration::from_secs(60);
        let next = || async {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, cluster.next_event()).await {
                Ok(Some(ev)) => Ok(ev),
                Ok(None) => anyhow::bail!("no more events"),
                Err(_) => anyhow::bail!("timed out"),
            }
        };
        // The first worker: wait until it listens, let it settle, measure its RSS.
        let mut current = loop {
            if let Event::Listening { worker, .. } = next().await? {
                break worker;
            }
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_worker = rss_kib(current.pid());
        let rss_primary = rss_kib(std::process::id());
        let (mut to_online, mut to_listening, mut respawn) = (vec![], vec![], vec![]);
        for _ in 0..rounds {
            let t_kill = Instant::now();
            current.kill_with(Signal::SIGKILL)?;
            let t_fork = loop {
                if let Event::Exit { worker, .. } = next().await?
                    && worker == current
                {
                    let t = Instant::now();
                    current = cluster.fork().await?;
                    break t;
                }
            };
            loop {
                match next().await? {
                    Event::Online { worker } if worker == current => {
                        to_online.push(t_fork.elapsed().as_secs_f64() * 1e3);
                    }
                    Event::Listening { worker, .. } if worker == current => {
                        to_listening.push(t_fork.elapsed().as_secs_f64() * 1e3);
                        respawn.push(t_kill.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "RESULT {{\"system\":\"cluster\",\"rounds\":{rounds},\"fork_to_online_ms\":{:.2},\"fork_to_listening_ms\":{:.2},\"kill_to_listening_ms\":{:.2},\"worker_rss_kib\":{rss_worker},\"primary_rss_kib\":{rss_primary}}}",
            median(to_online),
            median(to_listening),
            median(respawn)
        );
        cluster.disconnect().await;
    }
    #[worker(worker)]
    {
        let listener = cluster::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let id = worker.id().to_string();
        while let Some(conn) = listener.next().await {
            let Ok((stream, _)) = conn else { continue };
            let id = id.clone();
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let id = id.clone();
                async move {
                    let mut res = Response::new(Full::new(Bytes::from_static(b"hello world\n")));
                    res.headers_mut().insert(
                        "x-worker-id",
                        id.parse().expect("a number is a header value"),
                    );
                    Ok::<_, Infallible>(res)
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
