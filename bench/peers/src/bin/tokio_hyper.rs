//! The single-process peer: tokio's multi-thread runtime (one thread per CPU) and hyper 1,
//! serving exactly what `examples/hello_http` serves: `hello world\n` and `x-worker-id`.
//!
//! `PORT=8000 tokio_hyper`

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("tokio_hyper {} listening on {port}", std::process::id());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
            let mut res = Response::new(Full::new(Bytes::from_static(b"hello world\n")));
            res.headers_mut()
                .insert("x-worker-id", hyper::header::HeaderValue::from_static("0"));
            Ok::<_, Infallible>(res)
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
