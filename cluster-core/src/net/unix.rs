//! The Unix-domain listener the cluster shares.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use super::acceptor::{Accepted, Acceptor, Handoff, Source};
use super::{ListenAddress, announce, closed, query};
use crate::wire::Grant;
use crate::worker::link;

/// A Unix-domain stream listener shared by every worker of the cluster.
pub struct UnixListener {
    inner: Acceptor<tokio::net::UnixListener>,
    path: PathBuf,
}

impl std::fmt::Debug for UnixListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixListener")
            .field("path", &self.path)
            .finish()
    }
}

impl UnixListener {
    /// Binds `path` (made absolute in a worker, so every worker names the same socket).
    ///
    /// In a worker the primary creates the socket file (see
    /// [`BindPolicy`](crate::BindPolicy)): owned by the worker's user and group when it runs as
    /// another user than the primary, with the permission bits `0o666` less the primary's
    /// umask unless [`bind_with_mode`](Self::bind_with_mode) chose them. A stale socket file
    /// at the path (left by a process that died: connecting is refused) is replaced; any other
    /// file there fails the bind with `AddrInUse` and stays.
    pub async fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::bind_as(path.as_ref(), None).await
    }

    /// [`bind`](Self::bind), with the socket file's permission bits set to `mode` (such as
    /// `0o660`; at most `0o777`) before it takes any connection. Node's `readableAll` and
    /// `writableAll` are `0o644` and `0o622` over the owner's `0o600`, so both are `0o666`.
    /// Only the first worker's mode counts for a socket that several workers share.
    pub async fn bind_with_mode(path: impl AsRef<Path>, mode: u32) -> io::Result<Self> {
        if mode > 0o777 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("socket file mode {mode:#o} has bits beyond 0o777"),
            ));
        }
        Self::bind_as(path.as_ref(), Some(mode)).await
    }

    async fn bind_as(path: &Path, mode: Option<u32>) -> io::Result<Self> {
        let path = std::path::absolute(path)?;
        let Some(link) = link() else {
            let l = tokio::net::UnixListener::bind(&path)?;
            if let Some(mode) = mode {
                // Outside a cluster: after the bind (the file exists only from then on).
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(mode),
                )?;
            }
            return Ok(UnixListener {
                inner: Acceptor::own(l),
                path,
            });
        };
        let (grant, _bound, fds, reg) =
            query(link, ListenAddress::Unix(path.clone()), mode).await?;
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
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Source::Own(tokio::net::UnixListener::from_std(std)?)
            }
        };
        announce(link, &ListenAddress::Unix(path.clone()));
        Ok(UnixListener {
            inner: Acceptor {
                polling: Mutex::default(),
                source,
                closing: Some(link.closing.subscribe()),
                drain: Default::default(),
                reg: Some(reg),
            },
            path,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A future that completes once the worker is disconnecting (see
    /// [`TcpListener::closed`](super::TcpListener::closed)); outside a cluster it never completes.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.closed()
    }

    /// The next connection and its peer's address. After the worker starts to disconnect it
    /// fails with `ErrorKind::NotConnected`; [`next`](Self::next) gives `None` instead.
    pub async fn accept(
        &self,
    ) -> io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)> {
        self.next().await.unwrap_or_else(|| Err(closed()))
    }

    /// The next connection, or `None` once the worker is disconnecting and the listener closed.
    pub async fn next(
        &self,
    ) -> Option<io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)>> {
        let accepted = self.inner.next().await?;
        Some(accepted.and_then(connection))
    }

    /// Polls for the next connection, as [`accept`](Self::accept) waits for it (tokio's
    /// `UnixListener::poll_accept`).
    ///
    /// Only the waker of the most recent call is woken, so one task at a time should poll; the
    /// `async` methods may be shared by many.
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)>> {
        self.inner.poll_next(cx).map(|accepted| {
            accepted
                .unwrap_or_else(|| Err(closed()))
                .and_then(connection)
        })
    }
}

fn connection(
    accepted: Accepted<tokio::net::UnixListener>,
) -> io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)> {
    match accepted {
        Accepted::Own(stream, peer) => {
            if let Some(link) = crate::worker::link() {
                link.served();
            }
            Ok((stream, peer))
        }
        Accepted::Handed(fd) => {
            let stream = tokio::net::UnixStream::from_std(fd.into())?;
            // Unlike TCP's, a Unix socket keeps its peer's address after the peer closed.
            let peer = stream.peer_addr()?;
            Ok((stream, peer))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_accept_gives_the_peer_address() {
        let dir = std::env::temp_dir().join(format!("cluster-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("accept.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).await.unwrap();
        let _a = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert!(peer.is_unnamed());
        let _b = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (_, peer) = listener.next().await.unwrap().unwrap();
        assert!(peer.is_unnamed());
        let _c = tokio::net::UnixStream::connect(&path).await.unwrap();
        let polled = std::future::poll_fn(|cx| listener.poll_accept(cx)).await;
        assert!(polled.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
