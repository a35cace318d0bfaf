//! Where a stream listener's connections come from: its own socket, or the primary's
//! round-robin hand-offs; the part the TCP and Unix listeners share.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, mpsc, watch};

use super::{Registration, closed, is_nonblocking};
use crate::socket;
use crate::worker::Handed;

/// Out of descriptors, an accept waits this long before it tries again, doubling up to
/// [`MAX_PAUSE`] (as the primary's accept loop does), instead of spinning on `EMFILE`: the
/// connection stays in the kernel's queue meanwhile.
const MIN_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Once the worker disconnects, a listener of its own socket accepts what the kernel queued on
/// it before it closes: until no connection came for [`DRAIN_QUIET`], for [`DRAIN_MAX`] at
/// most. The primary has stopped the socket taking new connections where nobody else serves it
/// (see `dispatch::Servers::before_leave`), so the queue empties and nothing on it is reset;
/// where others still serve it, this worker just takes its share a moment longer.
const DRAIN_QUIET: Duration = Duration::from_millis(20);
const DRAIN_MAX: Duration = Duration::from_millis(500);

/// Says that the worker is out of descriptors: once per wait, so at most once a second.
fn warn_exhausted(e: &io::Error, pause: Duration) {
    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "accept: out of descriptors; waiting");
}

pub(super) type HandoffQueue = mpsc::UnboundedReceiver<Handed>;

/// Connections handed over by the primary (round-robin), with the acknowledgement it needs.
#[derive(Debug)]
pub(super) struct Handoff {
    /// An async mutex: concurrent `accept`s queue for the receiver in order, each woken in turn.
    pub(super) rx: Arc<tokio::sync::Mutex<HandoffQueue>>,
    pub(super) server: u32,
}

pub(super) enum Source<L> {
    Own(L),
    Handoff(Handoff),
}

/// The two stream listeners of tokio, as [`Acceptor`] uses them.
pub(super) trait OsListener {
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
pub(super) enum Accepted<L: OsListener> {
    Own(L::Stream, L::Addr),
    Handed(OwnedFd),
}

/// What `poll_accept` must keep between calls to be woken: the disconnect, and a place in the
/// queue for the hand-off receiver while an `accept` holds it.
#[derive(Default)]
pub(super) struct Polling {
    pub(super) closed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    pub(super) lock: Option<Pin<Box<dyn Future<Output = OwnedMutexGuard<HandoffQueue>> + Send>>>,
    /// While out of descriptors: the wait before the next accept, and the one after it.
    pub(super) pause: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(super) delay: Duration,
    /// While draining: the end of the quiet wait for the next queued connection.
    pub(super) quiet: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The drain of the accept queue after the disconnect (see [`DRAIN_QUIET`]).
#[derive(Default)]
pub(super) struct Drain {
    /// When it must end; set when it starts.
    until: std::sync::OnceLock<tokio::time::Instant>,
    done: std::sync::atomic::AtomicBool,
}

impl Drain {
    /// How long to wait for the next queued connection now; `None` once the drain is over.
    fn wait(&self) -> Option<Duration> {
        if self.done.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let until = *self
            .until
            .get_or_init(|| tokio::time::Instant::now() + DRAIN_MAX);
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            self.end();
            return None;
        }
        Some(left.min(DRAIN_QUIET))
    }

    fn end(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where a stream listener's connections come from, and when it stops: the part the TCP and
/// Unix listeners share.
pub(super) struct Acceptor<L> {
    // Fields drop in order: the poller's queued lock and the source (the listening socket or
    // the hand-off queue) go before the registration tells the primary the server is closed.
    /// A std mutex: only `poll_next` takes it, and never across an `.await`.
    pub(super) polling: Mutex<Polling>,
    pub(super) source: Source<L>,
    pub(super) closing: Option<watch::Receiver<bool>>,
    pub(super) drain: Drain,
    pub(super) reg: Option<Registration>,
}

impl<L: OsListener> Acceptor<L> {
    pub(super) fn own(listener: L) -> Self {
        Acceptor {
            polling: Mutex::default(),
            source: Source::Own(listener),
            closing: None,
            drain: Drain::default(),
            reg: None,
        }
    }

    pub(super) fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let closing = self.closing.clone();
        async move {
            match closing {
                // The sender lives as long as the worker's link; an error means it is gone.
                Some(mut c) => drop(c.wait_for(|v| *v).await),
                None => std::future::pending().await,
            }
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closing.as_ref().is_some_and(|c| *c.borrow())
    }

    /// Acknowledges a handed-over connection to the primary.
    pub(super) fn acknowledge(&self, h: &Handoff, fd: OwnedFd) -> Accepted<L> {
        if let Some(reg) = &self.reg {
            // Joins an `Accepted` still queued for the primary, if any: one frame acknowledges
            // a whole run of connections.
            reg.link.accepted(h.server);
        }
        // Already non-blocking: the primary accepts with `SOCK_NONBLOCK`, and the flag lives
        // on the open file, which descriptor passing shares.
        debug_assert!(is_nonblocking(&fd));
        Accepted::Handed(fd)
    }

    /// Tells the primary that a connection it handed over did not arrive, in order with the
    /// acknowledgements, so it knows which one to hand to another worker.
    fn report_lost(&self, h: &Handoff) {
        if let Some(reg) = &self.reg {
            reg.link.lost(h.server);
        }
    }

    /// The next connection, or `None` once the worker is disconnecting.
    pub(super) async fn next(&self) -> Option<io::Result<Accepted<L>>> {
        let fut = async {
            match &self.source {
                Source::Own(l) => {
                    let mut pause = MIN_PAUSE;
                    loop {
                        match l.accept().await {
                            Err(e) if socket::is_fd_exhaustion(&e) => {
                                warn_exhausted(&e, pause);
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(MAX_PAUSE);
                            }
                            r => break r.map(|(s, a)| Accepted::Own(s, a)),
                        }
                    }
                }
                Source::Handoff(h) => {
                    let mut rx = h.rx.lock().await;
                    loop {
                        match rx.recv().await.ok_or_else(closed)? {
                            Handed::Conn(fd) => break Ok(self.acknowledge(h, fd)),
                            Handed::Lost => self.report_lost(h),
                        }
                    }
                }
            }
        };
        if self.closing.is_none() {
            return Some(fut.await);
        }
        if !self.is_closed() {
            tokio::select! {
                r = fut => return match r {
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
                    r => Some(r),
                },
                () = self.closed() => {}
            }
        }
        self.drain_next().await
    }

    /// After the disconnect: the next connection still queued on our own socket, if one comes
    /// within the drain's quiet wait.
    async fn drain_next(&self) -> Option<io::Result<Accepted<L>>> {
        let Source::Own(l) = &self.source else {
            return None;
        };
        let wait = self.drain.wait()?;
        match tokio::time::timeout(wait, l.accept()).await {
            Ok(Ok((s, a))) => Some(Ok(Accepted::Own(s, a))),
            // Quiet, or an error: the queue is as empty as it will get.
            _ => {
                self.drain.end();
                None
            }
        }
    }

    /// [`drain_next`](Self::drain_next) as a poll.
    fn poll_drain(
        &self,
        polling: &mut Polling,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Accepted<L>>>> {
        let Source::Own(l) = &self.source else {
            return Poll::Ready(None);
        };
        loop {
            if let Some(quiet) = polling.quiet.as_mut() {
                match l.poll_accept(cx) {
                    Poll::Ready(Ok((s, a))) => {
                        polling.quiet = None;
                        return Poll::Ready(Some(Ok(Accepted::Own(s, a))));
                    }
                    Poll::Ready(Err(_)) => {}
                    Poll::Pending if quiet.as_mut().poll(cx).is_pending() => return Poll::Pending,
                    Poll::Pending => {}
                }
                polling.quiet = None;
                self.drain.end();
                return Poll::Ready(None);
            }
            let Some(wait) = self.drain.wait() else {
                return Poll::Ready(None);
            };
            polling.quiet = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }

    /// [`next`](Self::next) as a poll; only the last caller's waker is kept.
    pub(super) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Accepted<L>>>> {
        let mut polling = self.polling.lock().unwrap_or_else(|p| p.into_inner());
        if self.closing.is_some() {
            let closed = polling
                .closed
                .get_or_insert_with(|| Box::pin(self.closed()));
            if self.is_closed() || closed.as_mut().poll(cx).is_ready() {
                return self.poll_drain(&mut polling, cx);
            }
        }
        let h = match &self.source {
            Source::Own(l) => loop {
                if let Some(pause) = polling.pause.as_mut() {
                    if pause.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    polling.pause = None;
                }
                match l.poll_accept(cx) {
                    Poll::Ready(Err(e)) if socket::is_fd_exhaustion(&e) => {
                        let next = polling.delay.clamp(MIN_PAUSE, MAX_PAUSE);
                        warn_exhausted(&e, next);
                        polling.delay = next * 2;
                        polling.pause = Some(Box::pin(tokio::time::sleep(next)));
                    }
                    Poll::Ready(r) => {
                        polling.delay = MIN_PAUSE;
                        return Poll::Ready(Some(r.map(|(s, a)| Accepted::Own(s, a))));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            },
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
        loop {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(Handed::Conn(fd))) => {
                    return Poll::Ready(Some(Ok(self.acknowledge(h, fd))));
                }
                Poll::Ready(Some(Handed::Lost)) => self.report_lost(h),
                // The link is gone: the worker is disconnecting.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
