//! The worker side: the handshake, the reader of control and user messages, the worker's handle.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::channel::{self, Counted, Incoming, Outbox, Reader};
use crate::error::Error;
use crate::message::{Message, pair_fingerprint};
use crate::room::Room;
use crate::wire::VERSION;
use crate::wire::{BindAddr, Control, Grant, Wire};

/// The reply to a server query: the grant and bound address or the OS error, plus descriptors.
pub(crate) type ServerAnswer = (Result<(Grant, BindAddr), (i32, String)>, Vec<OwnedFd>);

/// The untyped link of a worker process to its primary; `cluster::net` finds it here.
pub(crate) struct Link {
    pub(crate) id: u32,
    pub(crate) outbox: Arc<Outbox>,
    disconnecting: AtomicBool,
    /// Flips to true when the worker disconnects: listeners stop accepting.
    pub(crate) closing: watch::Sender<bool>,
    /// The grace the primary gave with its `Disconnect`, in milliseconds (0: none said).
    drain_within: std::sync::atomic::AtomicU64,
    next_req: AtomicU32,
    queries: Mutex<HashMap<u32, oneshot::Sender<ServerAnswer>>>,
    /// Connections the primary handed over, per round-robin server.
    pub(crate) handoffs: Handoffs,
    /// Open listeners per address, for Node's per-worker listen index.
    pub(crate) indexes: Mutex<HashMap<BindAddr, Vec<u32>>>,
    /// Room for more descriptors: the primary hands over no connection while there is none.
    room: Arc<Room>,
}

/// An entry of a round-robin server's hand-off queue, in the order the primary sent them.
#[derive(Debug)]
pub(crate) enum Handed {
    Conn(OwnedFd),
    /// A connection whose descriptor the kernel dropped (we are at our descriptor limit): the
    /// listener tells the primary, in order with its acknowledgements, and it hands the
    /// connection to another worker.
    Lost,
}

/// The connections the primary hands this worker for its round-robin servers: one queue per
/// server, opened by the reader when the grant arrives (in stream order, as `Conn` frames may
/// follow the grant before the listener's task runs), taken once by that listener, closed when
/// it closes. A std mutex: short sections, never held across an await.
#[derive(Default)]
pub(crate) struct Handoffs(Mutex<HashMap<u32, Handoff>>);

struct Handoff {
    tx: mpsc::UnboundedSender<Handed>,
    /// Until the listener takes it.
    rx: Option<mpsc::UnboundedReceiver<Handed>>,
}

impl Handoffs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Handoff>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The grant for `server` arrived.
    fn open(&self, server: u32) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(server, Handoff { tx, rx: Some(rx) });
    }

    /// A connection for `server`. With no listener any more, it is dropped: the primary hands
    /// it to another worker when our `CloseServer` reaches it, so dropping our copy loses
    /// nothing.
    fn deliver(&self, server: u32, conn: Handed) {
        if let Some(h) = self.lock().get(&server) {
            let _ = h.tx.send(conn);
        }
    }

    /// The listener of `server` takes its queue (a fresh one if the grant was not seen).
    pub(crate) fn take(&self, server: u32) -> mpsc::UnboundedReceiver<Handed> {
        let mut map = self.lock();
        if let Some(rx) = map.get_mut(&server).and_then(|h| h.rx.take()) {
            return rx;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        map.insert(server, Handoff { tx, rx: None });
        rx
    }

    /// The listener of `server` closed.
    pub(crate) fn close(&self, server: u32) {
        self.lock().remove(&server);
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

static LINK: OnceLock<Arc<Link>> = OnceLock::new();

/// The link of this process, when it is a worker.
pub(crate) fn link() -> Option<&'static Arc<Link>> {
    LINK.get()
}

impl Link {
    /// Sends a control frame; a closed channel is not an error here (the worker is leaving).
    pub(crate) fn control(&self, c: Control, fds: Vec<OwnedFd>) -> bool {
        self.outbox.send(&Wire::<()>::Control(c), fds).is_ok()
    }

    /// Acknowledges one connection of round-robin server `server`: the primary may let go of
    /// its copy. Acknowledgements queued back to back merge into one frame.
    pub(crate) fn accepted(&self, server: u32) {
        let _ = self.outbox.send_counted(Counted::Accepted(server), |n| {
            Wire::<()>::Control(Control::Accepted { server, n })
        });
    }

    /// Counts one connection the worker accepted on a socket of its own, for the primary's
    /// figures.
    pub(crate) fn served(&self) {
        let _ = self.outbox.send_counted(Counted::Served, |n| {
            Wire::<()>::Control(Control::Served { n })
        });
    }

    /// Tells the primary that the next connection of `server` it handed over did not arrive.
    pub(crate) fn lost(&self, server: u32) {
        let _ = self.outbox.send_counted(Counted::Lost(server), |n| {
            Wire::<()>::Control(Control::Lost { server, n })
        });
    }

    /// Asks the primary for a server and waits for the answer.
    pub(crate) async fn query(
        &self,
        c: impl FnOnce(u32) -> Control,
    ) -> Result<ServerAnswer, Error> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.queries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req, tx);
        if !self.control(c(req), vec![]) {
            self.queries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req);
            return Err(Error::closed(self.id));
        }
        rx.await.map_err(|_| Error::closed(self.id))
    }

    /// How long the primary gives this worker to leave, once told to: its grace, if it said.
    #[cfg(feature = "http")]
    pub(crate) fn drain_within(&self) -> Option<std::time::Duration> {
        match self.drain_within.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    pub(crate) fn is_disconnecting(&self) -> bool {
        self.disconnecting.load(Ordering::Relaxed)
    }

    /// Closes the servers, then the channel, once; `voluntary` tells the primary it was our idea.
    fn begin_disconnect(&self, voluntary: bool) {
        if self.disconnecting.swap(true, Ordering::Relaxed) {
            return;
        }
        if voluntary {
            self.control(Control::Disconnecting, vec![]);
        }
        // Listeners see this, stop accepting and unregister (their frames go before the close).
        self.closing.send_replace(true);
        self.handoffs.clear();
        let indexes: Vec<(BindAddr, u32)> = self
            .indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .flat_map(|(a, v)| v.into_iter().map(move |i| (a.clone(), i)))
            .collect();
        for (addr, index) in indexes {
            self.control(Control::CloseServer { addr, index }, vec![]);
        }
        self.outbox.close();
    }

    /// Tells the primary why this worker is about to exit.
    pub(crate) fn report_fatal(&self, message: String) {
        self.control(Control::Fatal { message }, vec![]);
    }

    /// Sends what is queued and closes the channel; bounded in time.
    pub(crate) async fn flush(&self) {
        self.outbox.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.outbox.finished()).await;
    }
}

/// Messages from the primary waiting for `recv`. The channel itself is unbounded, but each
/// message holds its share of the inbox's byte budget until `recv` takes it: when the budget
/// is spent, the reader stops reading the socket (see [`read_primary`]).
type Inbox<W> = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Inbound<W>>>>;

/// A message from the primary, the descriptor that came with it, and its room in the inbox.
struct Inbound<W> {
    msg: W,
    fd: Option<OwnedFd>,
    _room: OwnedSemaphorePermit,
}

/// This worker's own handle (Node's `cluster.worker`): its id, typed messages both ways,
/// `disconnect` and `kill`.
pub struct Worker<P = (), W = ()> {
    link: Arc<Link>,
    inbox: Inbox<W>,
    _p: PhantomData<fn(P)>,
}

impl<P, W> Clone for Worker<P, W> {
    fn clone(&self) -> Self {
        Worker {
            link: self.link.clone(),
            inbox: self.inbox.clone(),
            _p: PhantomData,
        }
    }
}

impl<P, W> fmt::Debug for Worker<P, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker").field("id", &self.link.id).finish()
    }
}

impl<P: Message, W: Message> Worker<P, W> {
    /// Connects to the primary over `channel` and passes the handshake; exits the process with a
    /// clear message when the primary refuses this worker. `limit` bounds the bytes of user
    /// messages waiting in each direction ([`Config::outbox_limit`](crate::Config)).
    pub(crate) async fn start(id: u32, channel: OwnedFd, config: &crate::config::Config) -> Self {
        let (max_frame, limit) = (config.max_frame, config.outbox_limit);
        let wait = config.handshake_timeout;
        let stream = match channel::into_stream(channel) {
            Ok(s) => s,
            Err(e) => fatal(&format!("worker {id}: cannot use the channel: {e}")),
        };
        let outbox = channel::spawn_writer(stream.clone(), max_frame, limit);
        let (closing, _) = watch::channel(false);
        let link = Arc::new(Link {
            id,
            outbox,
            disconnecting: AtomicBool::new(false),
            closing,
            drain_within: std::sync::atomic::AtomicU64::new(0),
            next_req: AtomicU32::new(0),
            queries: Mutex::new(HashMap::new()),
            handoffs: Handoffs::default(),
            indexes: Mutex::new(HashMap::new()),
            room: Arc::new(Room::new()),
        });
        let _ = LINK.set(link.clone());
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let (hello_tx, hello_rx) = oneshot::channel();
        link.control(
            Control::Hello {
                version: VERSION.to_owned(),
                fingerprint: pair_fingerprint::<P, W>(),
            },
            vec![],
        );
        let reader = Reader::new(stream, max_frame);
        let room = InboxRoom::new(limit);
        tokio::spawn(read_primary::<W>(
            link.clone(),
            reader,
            inbox_tx,
            room,
            hello_tx,
        ));
        match tokio::time::timeout(wait, hello_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(reason))) => fatal(&format!("worker {id} refused by the primary: {reason}")),
            // Not a clean end: this worker never ran, and whoever watches its exit should know.
            Ok(Err(_)) => fatal(&format!(
                "worker {id}: the channel to the primary closed during the handshake"
            )),
            Err(_) => fatal(&format!(
                "worker {id}: the primary did not answer the handshake within {wait:?}"
            )),
        }
        Worker {
            link,
            inbox: Arc::new(tokio::sync::Mutex::new(inbox_rx)),
            _p: PhantomData,
        }
    }

    /// Sends a typed message to the primary, where it arrives as `Event::Message`. Waits while
    /// the messages the primary has not read yet hold
    /// [`Config::outbox_limit`](crate::Config::outbox_limit) bytes; fails when the channel is
    /// closed or the message exceeds the frame limit. Dropped before it is ready, it sends
    /// nothing.
    ///
    /// An `async fn` in effect; the future borrows `self` but not `msg`, so it is `Send`
    /// whatever `P` is.
    pub fn send<'a>(
        &'a self,
        msg: &P,
    ) -> impl Future<Output = Result<(), Error>> + Send + use<'a, P, W> {
        self.send_frame(msg, None)
    }

    /// Sends a message with a descriptor the primary receives in `Event::Message::handle`;
    /// waits for room like [`Worker::send`].
    pub fn send_with_handle<'a>(
        &'a self,
        msg: &P,
        handle: OwnedFd,
    ) -> impl Future<Output = Result<(), Error>> + Send + use<'a, P, W> {
        self.send_frame(msg, Some(handle))
    }

    /// Sends a typed message if the channel has room now; otherwise fails with
    /// [`ErrorKind::Full`](crate::ErrorKind::Full) and sends nothing. For code that cannot wait (a sync callback, a
    /// thread) or would rather drop a message than wait.
    pub fn try_send(&self, msg: &P) -> Result<(), Error> {
        self.link
            .outbox
            .try_send_user(msg, None)
            .map_err(|e| e.into_error(self.link.id))
    }

    fn send_frame<'a>(
        &'a self,
        msg: &P,
        handle: Option<OwnedFd>,
    ) -> impl Future<Output = Result<(), Error>> + Send + use<'a, P, W> {
        let link = &self.link;
        let sent = link.outbox.send_user(msg, handle);
        async move { sent.await.map_err(|e| e.into_error(link.id)) }
    }

    /// The next message from the primary; `None` once the worker is disconnecting and every
    /// message sent before was read.
    pub async fn recv(&self) -> Option<W> {
        self.recv_with_handle().await.map(|(m, _)| m)
    }

    /// The next message with the descriptor that came with it, if any.
    pub async fn recv_with_handle(&self) -> Option<(W, Option<OwnedFd>)> {
        let next = self.inbox.lock().await.recv().await;
        // Taking it frees its room in the inbox: the reader may read on.
        next.map(|m| (m.msg, m.fd))
    }
}

impl<P, W> Worker<P, W> {
    /// This worker's id (Node's `cluster.worker.id`), equal to the `CLUSTER_WORKER_ID` it was
    /// started with.
    pub fn id(&self) -> u32 {
        self.link.id
    }

    /// Whether the channel to the primary is open.
    pub fn is_connected(&self) -> bool {
        self.link.outbox.is_open()
    }

    /// Leaves the cluster on purpose: closes this worker's servers and then the channel. The
    /// primary sees `exited_after_disconnect() == Some(true)`. The process keeps running until
    /// its code returns, so in-flight work can finish.
    pub async fn disconnect(&self) {
        self.link.begin_disconnect(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.link.outbox.finished()).await;
    }

    /// Disconnects and exits with code 0 (Node's worker-side `kill()`).
    pub async fn kill(&self) -> ! {
        self.disconnect().await;
        std::process::exit(0)
    }
}

/// The byte budget of the inbox: permits are bytes of messages not yet taken by `recv`.
struct InboxRoom {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl InboxRoom {
    fn new(limit: usize) -> Self {
        // At least one permit, so a limit of 0 still lets messages through one at a time.
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        InboxRoom {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Waits until a message of `len` bytes fits. One larger than the whole budget takes all
    /// of it: it waits for an empty inbox, then goes alone.
    async fn reserve(&self, len: usize) -> OwnedSemaphorePermit {
        let n = len.clamp(1, self.limit) as u32;
        self.permits
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the inbox semaphore is never closed")
    }
}

/// Reads everything the primary sends. User messages go to the inbox while it has room; when
/// it is full this task stops reading until `recv` takes some, so the socket buffer fills and
/// the primary's `send` for this worker waits: the primary's memory stays bounded by this
/// worker's limit. Control frames behind the unread messages wait too (the stream has one
/// order): a worker that leaves its messages unread for long answers heartbeats late.
async fn read_primary<W: Message>(
    link: Arc<Link>,
    mut reader: Reader,
    inbox: mpsc::UnboundedSender<Inbound<W>>,
    room: InboxRoom,
    hello: oneshot::Sender<Result<(), String>>,
) {
    let mut hello = Some(hello);
    let mut inbox = Some(inbox);
    loop {
        match reader.next::<W>().await {
            Ok(Incoming::Frame(Wire::Control(c), fds)) => match c {
                Control::Welcome => {
                    if let Some(h) = hello.take() {
                        let _ = h.send(Ok(()));
                    }
                }
                // Exit here, not in the task awaiting the handshake: the primary closes the
                // channel right after, and the end of the channel must not read as its death.
                Control::Refuse { reason } => fatal(&format!(
                    "worker {} refused by the primary: {reason}",
                    link.id
                )),
                Control::Disconnect { within_ms } => {
                    inbox = None;
                    if let Some(ms) = within_ms {
                        link.drain_within.store(ms.max(1), Ordering::Relaxed);
                    }
                    link.begin_disconnect(false);
                }
                Control::ServerReply { req, mut result } => {
                    if reader.last_lost() > 0 {
                        result = Err((
                            nix::libc::EMFILE,
                            "the listening socket did not arrive: this worker is at its \
                             descriptor limit"
                                .to_owned(),
                        ));
                    }
                    // Register the handoff queue now, in stream order: `Conn` frames for this
                    // server may come right behind the grant, before the listener's task runs.
                    if let Ok((Grant::RoundRobin { server }, _)) = &result {
                        link.handoffs.open(*server);
                    }
                    let tx = link
                        .queries
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&req);
                    if let Some(tx) = tx {
                        let _ = tx.send((result, fds));
                    }
                }
                Control::Conn { server } => match fds.into_iter().next() {
                    Some(fd) => {
                        link.room
                            .received(std::os::fd::AsRawFd::as_raw_fd(&fd), &link.outbox);
                        link.handoffs.deliver(server, Handed::Conn(fd));
                    }
                    None if reader.last_lost() > 0 => {
                        link.room.exhausted(&link.outbox);
                        link.handoffs.deliver(server, Handed::Lost);
                    }
                    None => {}
                },
                Control::Ping(n) => {
                    link.control(Control::Pong(n), vec![]);
                }
                _ => {}
            },
            Ok(Incoming::Frame(Wire::User { msg, handle }, fds)) => {
                if reader.last_lost() > 0 {
                    tracing::error!(
                        "a message from the primary lost its descriptor: this worker is at its \
                         descriptor limit"
                    );
                }
                if let Some(tx) = &inbox {
                    let fd = if handle { fds.into_iter().next() } else { None };
                    // A worker whose handles are all dropped reads no more: its messages are
                    // dropped rather than waited for, so the channel stays read.
                    let permit = tokio::select! {
                        p = room.reserve(reader.last_len()) => p,
                        () = tx.closed() => continue,
                    };
                    let _ = tx.send(Inbound {
                        msg,
                        fd,
                        _room: permit,
                    });
                }
            }
            Ok(Incoming::Eof) => break,
            Err(e) => {
                eprintln!("cluster: {}", e.into_error("the primary"));
                break;
            }
        }
    }
    drop(inbox);
    // Node's rule: a channel that closes without a disconnect of ours means the primary is
    // gone (or dropped us); the worker leaves at once rather than live on as an orphan.
    if !link.is_disconnecting() {
        std::process::exit(0);
    }
}

/// Prints `cluster: <message>` and exits with code 1.
pub(crate) fn fatal(msg: &str) -> ! {
    eprintln!("cluster: {msg}");
    std::process::exit(1)
}

// A worker's handle moves into spawned tasks and is shared between them.
const _: fn() = || {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Worker<(), ()>>();
};

// A message type need not be `Sync` for a task that sends it to be spawned.
const _: () = {
    #[allow(dead_code)]
    fn send_is_send<P: Message>(w: &Worker<P, ()>, msg: &P, fd: OwnedFd) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&w.send(msg));
        is_send(&w.send_with_handle(msg, fd));
    }
};
