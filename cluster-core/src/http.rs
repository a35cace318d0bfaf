//! HTTP/1.1 serving with the drain built in: [`serve`] runs a hyper service on a cluster
//! listener until the worker disconnects (a reload, a scale-down, a shutdown), then drains
//! without failing a request.
//!
//! During the drain, every response carries `Connection: close`, so a keep-alive client learns
//! that this connection ends with the answer it is reading and opens its next one to another
//! worker; no connection is closed under a client that may be sending. Connections still idle
//! after [`DrainOptions::idle_grace`] are closed; requests in flight always finish.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;

use crate::net::TcpListener;

/// How `serve` treats slow and idle clients, and how it drains.
#[derive(Debug, Clone, Copy)]
pub struct DrainOptions {
    /// How long a keep-alive connection may stay idle during the drain before it is closed
    /// (default 2 s; at most half the grace the primary gives the worker to leave). Clients that
    /// send within it get their answer with `Connection: close`.
    pub idle_grace: Duration,
    /// How long a client has to send a request's headers, counted from the start of the
    /// connection or the end of the previous response (default 30 s; `None`: no limit). A client
    /// that trickles, stalls in its headers or sits idle on a keep-alive connection that long is
    /// closed, so slow clients cannot hold a worker's connections, or its drain, for ever.
    pub header_read_timeout: Option<Duration>,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            idle_grace: Duration::from_secs(2),
            header_read_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// How long idle connections may stay during this drain: the configured grace, but at most half
/// of what the primary gave this worker to leave (a shutdown's or a reload's grace), so that one
/// idle keep-alive client never turns a clean exit into a kill.
fn idle_grace(options: DrainOptions) -> Duration {
    let within = crate::worker::link().and_then(|l| l.drain_within());
    within.map_or(options.idle_grace, |w| options.idle_grace.min(w / 2))
}

/// Serves `handler` on `listener` until the worker disconnects, then drains; returns once
/// every connection has ended.
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use http_body_util::Full;
/// use hyper::body::Bytes;
///
/// let listener = cluster_core::net::TcpListener::bind("0.0.0.0:8000").await?;
/// cluster_core::http::serve(listener, |_req| async {
///     hyper::Response::new(Full::new(Bytes::from_static(b"hello world\n")))
/// })
/// .await
/// # }
/// ```
pub async fn serve<H, F, B>(listener: TcpListener, handler: H) -> io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with(listener, handler, DrainOptions::default()).await
}

/// [`serve`] with explicit drain options.
pub async fn serve_with<H, F, B>(
    listener: TcpListener,
    handler: H,
    options: DrainOptions,
) -> io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let draining = Arc::new(AtomicBool::new(false));
    let graceful = GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    // Connections still open, so the drain waits for the last one to end instead of polling.
    let (open, _) = tokio::sync::watch::channel(0usize);
    let open = Arc::new(open);
    // Connections that have not sent a whole request yet, which hyper's graceful shutdown does
    // not close (it closes only a connection between requests): a slow or stalled client would
    // hold the drain until the header timeout. Pruned as connections end.
    let mut fresh: Vec<(tokio::task::AbortHandle, Arc<AtomicBool>)> = Vec::new();
    while let Some(conn) = listener.next().await {
        let stream = match conn {
            Ok((stream, _)) => stream,
            // One failed accept concerns one client only.
            Err(_) => continue,
        };
        let handler = handler.clone();
        let draining = draining.clone();
        let asked = Arc::new(AtomicBool::new(false));
        let seen = asked.clone();
        let service = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            let draining = draining.clone();
            seen.store(true, Ordering::Relaxed);
            async move {
                let mut res = handler(req).await;
                if draining.load(Ordering::Relaxed) {
                    // hyper closes the connection after a response that says so.
                    res.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(res)
            }
        });
        let conn = http1.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let guard = Open::new(open.clone());
        let task = tokio::spawn(async move {
            let _open = guard;
            let _ = conn.await;
        });
        if fresh.len() >= 64 && fresh.len().is_power_of_two() {
            fresh.retain(|(task, asked)| !task.is_finished() && !asked.load(Ordering::Relaxed));
        }
        fresh.push((task.abort_handle(), asked));
    }
    // The listener closed: the worker is leaving. Answer what comes with `Connection: close`,
    // give idle keep-alive connections a moment to send, then close the rest once idle.
    draining.store(true, Ordering::Relaxed);
    let mut left = open.subscribe();
    let _ = tokio::time::timeout(idle_grace(options), left.wait_for(|n| *n == 0)).await;
    // A connection that never sent a whole request has nothing in flight: close it now.
    for (task, asked) in fresh {
        if !asked.load(Ordering::Relaxed) {
            task.abort();
        }
    }
    graceful.shutdown().await;
    Ok(())
}

/// Counts an open connection until dropped (also when its task is aborted).
struct Open(Arc<tokio::sync::watch::Sender<usize>>);

impl Open {
    fn new(open: Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        open.send_modify(|n| *n += 1);
        Open(open)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that stalls in its headers is closed after the header timeout, while a normal
    /// request on the same server is answered.
    #[tokio::test]
    async fn a_client_stalled_in_its_headers_is_closed_by_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = DrainOptions {
            header_read_timeout: Some(Duration::from_millis(300)),
            ..DrainOptions::default()
        };
        tokio::spawn(serve_with(
            listener,
            |_req| async { Response::new(http_body_util::Full::new(&b"ok"[..])) },
            options,
        ));
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: ")
            .await
            .unwrap();
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), ok.read_to_end(&mut answer))
            .await
            .expect("the normal request is answered")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        let started = tokio::time::Instant::now();
        let mut rest = Vec::new();
        // The server closes the stalled connection (hyper may answer 408 first).
        tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
            .await
            .expect("the stalled client is closed")
            .ok();
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
