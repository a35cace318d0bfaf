//! Listeners that share server ports across the cluster.
//!
//! In a worker, [`TcpListener::bind`] asks the primary for the server: all workers binding the
//! same address share one port (port 0 included), served by the scheduling policy. Outside a
//! cluster (in the primary, or a program not started by one) it is a plain bind. Accepted
//! connections are ordinary [`tokio::net::TcpStream`]s, so hyper, axum and tonic work unchanged.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::net::ToSocketAddrs;
use tokio::sync::{OwnedMutexGuard, mpsc, watch};

use crate::wire::{Control, Grant, PolicyWire};
use crate::worker::{Link, link};

/// An address a cluster server listens on, as `Event::Listening` reports it.
///
/// The channel carries it as it is, hence the serde derives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ListenAddress {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A UDP socket.
    Udp(SocketAddr),
    /// A Unix-domain stream listener.
    Unix(PathBuf),
}

/// The socket address (`127.0.0.1:8000`) or the path.
impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(a) | ListenAddress::Udp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl ListenAddress {
    /// The socket address, for TCP and UDP.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            ListenAddress::Tcp(a) | ListenAddress::Udp(a) => Some(*a),
            ListenAddress::Unix(_) => None,
        }
    }

    /// The port, for TCP and UDP.
    pub fn port(&self) -> Option<u16> {
        self.socket_addr().map(|a| a.port())
    }
}

/// A registration of this worker's listener with the primary; unregisters on drop.
struct Registration {
    link: &'static Arc<Link>,
    addr: ListenAddress,
    index: u32,
    server: Option<u32>,
    /// Whether the primary must hear about the close.
    notify: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(server) = self.server {
            self.link
                .rr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&server);
        }
        let mut idx = self.link.indexes.lock().unwrap_or_else(|p| p.into_inner());
        let present = idx.get_mut(&self.addr).is_some_and(|v| {
            let before = v.len();
            v.retain(|i| *i != self.index);
            before != v.len()
        });
        drop(idx);
        // After a disconnect the link already told the primary about every listener.
        if present && self.notify {
            self.link.control(
                Control::CloseServer {
                    addr: self.addr.clone(),
                    index: self.index,
                },
                vec![],
            );
        }
    }
}

/// Asks the primary for the server on `addr`; returns the grant, the bound address, the
/// descriptors that came with it and the registration.
async fn query(
    link: &'static Arc<Link>,
    addr: ListenAddress,
) -> io::Result<(Grant, ListenAddress, Vec<OwnedFd>, Registration)> {
    if link.is_disconnecting() {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "cluster: the worker is disconnecting",
        ));
    }
    let index = {
        let mut idx = link.indexes.lock().unwrap_or_else(|p| p.into_inner());
        let used = idx.entry(addr.clone()).or_default();
        // Node's listen index: the lowest not in use by this worker on this address.
        let mut i = 0;
        while used.contains(&i) {
            i += 1;
        }
        used.push(i);
        i
    };
    let mut reg = Registration {
        link,
        addr: addr.clone(),
        index,
        server: None,
        notify: true,
    };
    let policy = PolicyWire::RoundRobin; // the primary decides; this is only a hint
    let (result, fds) = link
        .query(|req| Control::QueryServer {
            req,
            addr: addr.clone(),
            index,
            policy,
        })
        .await
        .map_err(io::Error::from)?;
    match result {
        Ok((grant, bound)) => {
            if let Grant::RoundRobin { server } = grant {
                reg.server = Some(server);
            }
            Ok((grant, bound, fds, reg))
        }
        Err((errno, msg)) => {
            // A failed key is forgotten on both sides, so a retry can succeed later.
            let kind = if errno != 0 {
                io::Error::from_raw_os_error(errno).kind()
            } else {
                io::ErrorKind::Other
            };
            // Dropping the registration frees the index; the primary already forgot the key.
            reg.notify = false;
            drop(reg);
            Err(io::Error::new(
                kind,
                format!("cluster: cannot listen on {addr}: {msg}"),
            ))
        }
    }
}

fn announce(link: &Link, bound: &ListenAddress) {
    link.control(
        Control::Listening {
            addr: bound.clone(),
        },
        vec![],
    );
}

/// Whether a handed-over connection is already non-blocking (as tokio needs it).
fn is_nonblocking(fd: &OwnedFd) -> bool {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), FcntlArg::F_GETFL)
        .is_ok_and(|f| OFlag::from_bits_truncate(f).contains(OFlag::O_NONBLOCK))
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "cluster: listener closed because the worker is disconnecting",
    )
}

type HandoffQueue = mpsc::UnboundedReceiver<OwnedFd>;

/// Connections handed over by the primary (round-robin), with the acknowledgement it needs.
#[derive(Debug)]
struct Handoff {
    /// An async mutex: concurrent `accept`s queue for the receiver in order, each woken in turn.
    rx: Arc<tokio::sync::Mutex<HandoffQueue>>,
    server: u32,
}

enum Source<L> {
    Own(L),
    Handoff(Handoff),
}

/// The two stream listeners of tokio, as [`Acceptor`] uses them.
trait OsListener {
    type Stream;
    type Addr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, Self::Addr)>>;
}

impl OsListener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, Self::Addr)>> {
        tokio::net::TcpListener::poll_accept(self, cx)
    }
}

impl OsListener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, Self::Addr)>> {
        tokio::net::UnixListener::poll_accept(self, cx)
    }
}

/// A connection as the listener's source gives it: accepted here, or handed over (and already
/// acknowledged) by the primary.
enum Accepted<L: OsListener> {
    Own(L::Stream, L::Addr),
    Handed(OwnedFd),
}

/// What `poll_accept` must keep between calls to be woken: the disconnect, and a place in the
/// queue for the hand-off receiver while an `accept` holds it.
#[derive(Default)]
struct Polling {
    closed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    lock: Option<Pin<Box<dyn Future<Output = OwnedMutexGuard<HandoffQueue>> + Send>>>,
}

/// Where a stream listener's connections come from, and when it stops: the part the TCP and
/// Unix listeners share.
struct Acceptor<L> {
    // Fields drop in order: the poller's queued lock and the source (the listening socket or
    // the hand-off queue) go before the registration tells the primary the server is closed.
    /// A std mutex: only `poll_next` takes it, and never across an `.await`.
    polling: Mutex<Polling>,
    source: Source<L>,
    closing: Option<watch::Receiver<bool>>,
    reg: Option<Registration>,
}

impl<L: OsListener> Acceptor<L> {
    fn own(listener: L) -> Self {
        Acceptor {
            polling: Mutex::default(),
            source: Source::Own(listener),
            closing: None,
            reg: None,
        }
    }

    fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let closing = self.closing.clone();
        async move {
            match closing {
                // The sender lives as long as the worker's link; an error means it is gone.
                Some(mut c) => drop(c.wait_for(|v| *v).await),
                None => std::future::pending().await,
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.closing.as_ref().is_some_and(|c| *c.borrow())
    }

    /// Acknowledges a handed-over connection to the primary.
    fn acknowledge(&self, h: &Handoff, fd: OwnedFd) -> Accepted<L> {
        if let Some(reg) = &self.reg {
            // Joins an `Accepted` still queued for the primary, if any: one frame acknowledges
            // a whole run of connections.
            let _ = reg.link.outbox.send_accepted(h.server);
        }
        // Already non-blocking: the primary accepts with `SOCK_NONBLOCK`, and the flag lives
        // on the open file, which descriptor passing shares.
        debug_assert!(is_nonblocking(&fd));
        Accepted::Handed(fd)
    }

    /// The next connection, or `None` once the worker is disconnecting.
    async fn next(&self) -> Option<io::Result<Accepted<L>>> {
        let fut = async {
            match &self.source {
                Source::Own(l) => l.accept().await.map(|(s, a)| Accepted::Own(s, a)),
                Source::Handoff(h) => {
                    let fd = h.rx.lock().await.recv().await.ok_or_else(closed)?;
                    Ok(self.acknowledge(h, fd))
                }
            }
        };
        if self.closing.is_none() {
            return Some(fut.await);
        }
        if self.is_closed() {
            return None;
        }
        tokio::select! {
            r = fut => match r {
                Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
                r => Some(r),
            },
            () = self.closed() => None,
        }
    }

    /// [`next`](Self::next) as a poll; only the last caller's waker is kept.
    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Accepted<L>>>> {
        let mut polling = self.polling.lock().unwrap_or_else(|p| p.into_inner());
        if self.closing.is_some() {
            let closed = polling
                .closed
                .get_or_insert_with(|| Box::pin(self.closed()));
            if self.is_closed() || closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        let h = match &self.source {
            Source::Own(l) => {
                return l
                    .poll_accept(cx)
                    .map(|r| Some(r.map(|(s, a)| Accepted::Own(s, a))));
            }
            Source::Handoff(h) => h,
        };
        // The receiver, without waiting in line when no `accept` holds it.
        let mut rx = match polling.lock.take() {
            Some(mut lock) => match lock.as_mut().poll(cx) {
                Poll::Ready(rx) => rx,
                Poll::Pending => {
                    polling.lock = Some(lock);
                    return Poll::Pending;
                }
            },
            None => match h.rx.clone().try_lock_owned() {
                Ok(rx) => rx,
                Err(_) => {
                    let mut lock = Box::pin(h.rx.clone().lock_owned());
                    if let Poll::Ready(rx) = lock.as_mut().poll(cx) {
                        rx
                    } else {
                        polling.lock = Some(lock);
                        return Poll::Pending;
                    }
                }
            },
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(fd)) => Poll::Ready(Some(Ok(self.acknowledge(h, fd)))),
            // The link is gone: the worker is disconnecting.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

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
        let (grant, bound, fds, reg) = query(link, ListenAddress::Tcp(addr)).await?;
        let local = bound.socket_addr().unwrap_or(addr);
        let source = match grant {
            Grant::RoundRobin { server } => Source::Handoff(Handoff {
                rx: Arc::new(tokio::sync::Mutex::new(link.take_handoff(server))),
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
            Accepted::Own(stream, peer) => Ok((stream, peer)),
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

/// A UDP socket shared by every worker of the cluster (always one socket, as in Node).
pub struct UdpSocket {
    socket: tokio::net::UdpSocket,
    _reg: Option<Registration>,
}

impl std::fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSocket")
            .field("socket", &self.socket)
            .finish()
    }
}

impl UdpSocket {
    /// Binds `addr`: the primary's shared socket in a worker, a plain socket elsewhere.
    pub async fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<Self> {
        let addr = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind"))?;
        let Some(link) = link() else {
            return Ok(UdpSocket {
                socket: tokio::net::UdpSocket::bind(addr).await?,
                _reg: None,
            });
        };
        let (_, bound, fds, reg) = query(link, ListenAddress::Udp(addr)).await?;
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| io::Error::other("cluster: the primary sent no socket"))?;
        let std = std::net::UdpSocket::from(fd);
        std.set_nonblocking(true)?;
        announce(link, &bound);
        Ok(UdpSocket {
            socket: tokio::net::UdpSocket::from_std(std)?,
            _reg: Some(reg),
        })
    }
}

impl std::ops::Deref for UdpSocket {
    type Target = tokio::net::UdpSocket;

    fn deref(&self) -> &tokio::net::UdpSocket {
        &self.socket
    }
}

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
    pub async fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = std::path::absolute(path.as_ref())?;
        let Some(link) = link() else {
            let l = tokio::net::UnixListener::bind(&path)?;
            return Ok(UnixListener {
                inner: Acceptor::own(l),
                path,
            });
        };
        let (grant, _bound, fds, reg) = query(link, ListenAddress::Unix(path.clone())).await?;
        let source = match grant {
            Grant::RoundRobin { server } => Source::Handoff(Handoff {
                rx: Arc::new(tokio::sync::Mutex::new(link.take_handoff(server))),
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
    /// [`TcpListener::closed`]); outside a cluster it never completes.
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
        Accepted::Own(stream, peer) => Ok((stream, peer)),
        Accepted::Handed(fd) => {
            let stream = tokio::net::UnixStream::from_std(fd.into())?;
            // Unlike TCP's, a Unix socket keeps its peer's address after the peer closed.
            let peer = stream.peer_addr()?;
            Ok((stream, peer))
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
