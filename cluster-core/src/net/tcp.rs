//! The TCP listener whose port the cluster shares.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::net::ToSocketAddrs;

use super::acceptor::{Accepted, Acceptor, Handoff, Source};
use super::{ListenAddress, announce, closed, query};
use crate::wire::Grant;
use crate::worker::link;

/// A TCP listener whose port is shared by every worker of the cluster.
pub struct TcpListener {
    inner: Acceptor<tokio::net::TcpListener>,
    local: SocketAddr,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("local_addr", &self.local)
            .finish()
    }
}

impl TcpListener {
    /// Binds `addr`: through the primary in a worker, directly elsewhere.
    ///
    /// Errors name the address: `cluster: cannot listen on 0.0.0.0:8000: Address in use (os error 98)`.
    pub async fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<Self> {
        let mut last = None;
        for a in tokio::net::lookup_host(addr).await? {
            match Self::bind_one(a).await {
                Ok(l) => return Ok(l),
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
    }

    async fn bind_one(addr: SocketAddr) -> io::Result<Self> {
        let Some(link) = link() else {
            let l = tokio::net::TcpListener::bind(addr).await?;
            let local = l.local_addr()?;
            return Ok(TcpListener {
                inner: Acceptor::own(l),
                local,
            });
        };
        let (grant, bound, fds, reg) = query(link, ListenAddress::Tcp(addr), None).await?;
        let local = bound.socket_addr().unwrap_or(addr);
        let source = match grant {
            Grant::RoundRobin { server } => Source::Handoff(Handoff {
                rx: Arc::new(tokio::sync::Mutex::new(link.handoffs.take(server))),
                server,
            }),
            Grant::Handle => {
                let fd = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| io::Error::other("cluster: the primary sent no socket"))?;
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                Source::Own(tokio::net::TcpListener::from_std(std)?)
            }
        };
        announce(link, &bound);
        Ok(TcpListener {
            inner: Acceptor {
                polling: Mutex::default(),
                source,
                closing: Some(link.closing.subscribe()),
                drain: Default::default(),
                reg: Some(reg),
            },
            local,
        })
    }

    /// The address this listener serves; the real port, also after binding port 0.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// A future that completes once the worker is disconnecting (this listener then gives no
    /// more connections); outside a cluster it never completes.
    ///
    /// It owns what it needs, so it can be taken before the listener is moved into a server:
    /// `axum::serve(listener, app).with_graceful_shutdown(closed)` stops taking connections,
    /// lets in-flight requests finish and returns when the worker disconnects.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.closed()
    }

    /// The next connection. After the worker starts to disconnect it fails with
    /// `ErrorKind::NotConnected`; [`next`](Self::next) gives `None` instead.
    pub async fn accept(&self) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
        self.next().await.unwrap_or_else(|| Err(closed()))
    }

    /// The next connection, or `None` once the worker is disconnecting and the listener closed.
    pub async fn next(&self) -> Option<io::Result<(tokio::net::TcpStream, SocketAddr)>> {
        let accepted = self.inner.next().await?;
        Some(accepted.and_then(|a| self.connection(a)))
    }

    /// Polls for the next connection, as [`accept`](Self::accept) waits for it (tokio's
    /// `TcpListener::poll_accept`).
    ///
    /// Only the waker of the most recent call is woken, so one task at a time should poll; the
    /// `async` methods may be shared by many.
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(tokio::net::TcpStream, SocketAddr)>> {
        self.inner.poll_next(cx).map(|accepted| {
            accepted
                .unwrap_or_else(|| Err(closed()))
                .and_then(|a| self.connection(a))
        })
    }

    fn connection(
        &self,
        accepted: Accepted<tokio::net::TcpListener>,
    ) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
        match accepted {
            Accepted::Own(stream, peer) => {
                if let Some(link) = crate::worker::link() {
                    link.served();
                }
                Ok((stream, peer))
            }
            Accepted::Handed(fd) => {
                let std = std::net::TcpStream::from(fd);
                // A client that reset already has no peer address any more; the connection
                // still is one, and its first read says what happened.
                let peer = std.peer_addr().unwrap_or(self.local);
                Ok((tokio::net::TcpStream::from_std(std)?, peer))
            }
        }
    }
}

/// `axum::serve(listener, app)` on a cluster listener (cargo feature `axum`).
///
/// As axum's own listeners do, `accept` never fails: connection errors are skipped, others
/// (`EMFILE`, ...) are logged as a `tracing` error and retried after a second. Once the worker
/// is disconnecting it never completes; pair it with
/// `.with_graceful_shutdown(listener.closed())` so the server stops and the worker exits.
#[cfg(feature = "axum")]
impl axum::serve::Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.next().await {
                Some(Ok(conn)) => return conn,
                Some(Err(e)) => {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        tracing::error!(address = %self.local, error = %e, "accept error; retrying in 1s");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_poll_accept_outside_a_cluster() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = std::future::poll_fn(|cx| listener.poll_accept(cx))
            .await
            .unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(stream.peer_addr().unwrap(), peer);
    }
}
