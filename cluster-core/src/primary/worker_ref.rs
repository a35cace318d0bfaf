//! The primary's handle on one worker: a view of the status the supervisor publishes, and the
//! few actions that need no supervisor (a signal, a frame on the worker's channel).

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{ChildStderr, ChildStdout};
use tokio::sync::watch;

use super::policy::Life;
use crate::channel::Outbox;
use crate::dispatch::Servers;
use crate::error::{Error, ErrorKind};
use crate::event::{ExitStatus, WorkerState};
use crate::message::Message;
use crate::signal::Signal;
use crate::wire::{Control, Wire};

/// What the supervisor publishes about one worker; it alone writes it.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) life: Life,
    /// `None` until the worker disconnects or exits; then whether it left on purpose.
    pub(crate) exited_after_disconnect: Option<bool>,
    /// What the worker reported just before it exited.
    pub(crate) last_error: Option<String>,
}

/// Per-message counters; each has one writer (the reader task, or the sender).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) msgs_in: AtomicU64,
    pub(crate) msgs_out: AtomicU64,
    pub(crate) conns: AtomicU64,
}

pub(crate) struct WorkerShared {
    pub(crate) id: u32,
    pub(crate) pid: u32,
    pub(crate) outbox: Arc<Outbox>,
    /// The shared ports, told before this worker is asked to leave.
    servers: Arc<Servers>,
    pub(crate) status: watch::Receiver<Status>,
    /// Set once by [`WorkerRef::disconnect`]: the user asked this worker to leave. The
    /// handle owns this fact (the supervisor reads it when the worker goes), so the worker
    /// leaves [`Primary::workers`](crate::Primary::workers) at the call, without a round trip.
    pub(crate) leaving: AtomicBool,
    /// Taken once by the user; a std mutex, held only to move the value out.
    stdout: Mutex<Option<ChildStdout>>,
    stderr: Mutex<Option<ChildStderr>>,
    pub(crate) started: Instant,
    pub(crate) counters: Counters,
    /// When the worker last answered a heartbeat, in milliseconds after `started`; written by
    /// its reader alone (a pong needs no round trip through the supervisor).
    pub(crate) last_pong_ms: AtomicU64,
    /// The sequence number of the last heartbeat sent; only a `Pong` of that number counts.
    /// Written by the supervisor alone.
    pub(crate) last_ping: AtomicU64,
    /// The reader waits for the user to read this worker's messages: the worker may be silent
    /// because of us. Written by the reader alone.
    pub(crate) parked: AtomicBool,
    /// The process was reaped: its pid may belong to another process now. Written by the task
    /// that waits for it, before it reports the exit.
    pub(crate) reaped: AtomicBool,
}

impl WorkerShared {
    pub(crate) fn new(
        id: u32,
        pid: u32,
        outbox: Arc<Outbox>,
        servers: Arc<Servers>,
        status: watch::Receiver<Status>,
        stdout: Option<ChildStdout>,
        stderr: Option<ChildStderr>,
    ) -> Self {
        WorkerShared {
            id,
            pid,
            outbox,
            servers,
            status,
            leaving: AtomicBool::new(false),
            stdout: Mutex::new(stdout),
            stderr: Mutex::new(stderr),
            started: Instant::now(),
            counters: Counters::default(),
            last_pong_ms: AtomicU64::new(0),
            last_ping: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            reaped: AtomicBool::new(false),
        }
    }

    /// Records a sign of life (a pong, the handshake) now.
    pub(crate) fn heard(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_pong_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the worker last answered, or forked if it never did.
    pub(crate) fn since_heard(&self) -> Duration {
        let at = Duration::from_millis(self.last_pong_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(at)
    }
}

/// The primary's handle on one worker (Node's `Worker` in the primary).
///
/// A handle that came with an [`Event`](crate::Event) answers [`state`](Self::state) as of
/// that event, as Node's handlers (which run at the event) see it: a handler of `Disconnect`
/// that awaits something first still reads `disconnected`. Handles from
/// [`Primary::workers`](crate::Primary::workers), [`Primary::fork`](crate::Primary::fork) or
/// [`current`](Self::current) read the latest state. Every other query is live.
pub struct WorkerRef<W = ()> {
    pub(crate) shared: Arc<WorkerShared>,
    /// The state at the event this handle came with.
    moment: Option<WorkerState>,
    _w: PhantomData<fn(W)>,
}

/// Tells the worker to leave within `grace`.
fn send_disconnect(shared: &WorkerShared, grace: Option<Duration>) {
    let within_ms = grace.map(|g| u64::try_from(g.as_millis()).unwrap_or(u64::MAX));
    let _ = shared.outbox.send(
        &Wire::<()>::Control(Control::Disconnect { within_ms }),
        vec![],
    );
}

impl<W> Clone for WorkerRef<W> {
    fn clone(&self) -> Self {
        WorkerRef {
            shared: self.shared.clone(),
            moment: self.moment,
            _w: PhantomData,
        }
    }
}

impl<W> PartialEq for WorkerRef<W> {
    fn eq(&self, other: &Self) -> bool {
        self.shared.id == other.shared.id
    }
}

impl<W> Eq for WorkerRef<W> {}

impl<W> fmt::Debug for WorkerRef<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerRef")
            .field("id", &self.shared.id)
            .field("pid", &self.shared.pid)
            .field("state", &self.state())
            .finish()
    }
}

impl<W> WorkerRef<W> {
    pub(crate) fn new(shared: Arc<WorkerShared>) -> Self {
        WorkerRef {
            shared,
            moment: None,
            _w: PhantomData,
        }
    }

    /// This handle, answering as of an event in state `state`.
    pub(crate) fn at(&self, state: WorkerState) -> Self {
        WorkerRef {
            moment: Some(state),
            ..self.clone()
        }
    }

    /// The same worker, answering with its latest state.
    pub fn current(&self) -> Self {
        WorkerRef {
            moment: None,
            ..self.clone()
        }
    }

    /// The worker's id: 1 for the first worker, never reused.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// Where the worker is in its life: as of the event this handle came with, if any (see
    /// the type's docs), otherwise now.
    pub fn state(&self) -> WorkerState {
        self.moment
            .unwrap_or_else(|| self.shared.status.borrow().life.state())
    }

    /// Whether the channel is open (Node's `isConnected()`).
    pub fn is_connected(&self) -> bool {
        self.shared.status.borrow().life.connected()
    }

    /// Whether the process has exited (Node's `isDead()`).
    pub fn is_dead(&self) -> bool {
        self.shared.status.borrow().life.status().is_some()
    }

    /// `None` until the worker disconnects or exits; then `Some(true)` when it left on purpose
    /// (a `disconnect()` from either side, or its own `kill()`), `Some(false)` otherwise.
    pub fn exited_after_disconnect(&self) -> Option<bool> {
        self.shared.status.borrow().exited_after_disconnect
    }

    /// What the worker reported just before it exited: the error its code returned, or its
    /// panic.
    pub fn last_error(&self) -> Option<String> {
        self.shared.status.borrow().last_error.clone()
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.shared.status.borrow().life.status()
    }

    /// How long ago the worker was forked.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Typed messages received from and sent to this worker.
    pub fn message_counts(&self) -> (u64, u64) {
        let c = &self.shared.counters;
        (
            c.msgs_in.load(Ordering::Relaxed),
            c.msgs_out.load(Ordering::Relaxed),
        )
    }

    /// Completes once the worker's published status satisfies `f` (or the supervisor is
    /// gone); a wait on the change, never a poll.
    pub(crate) async fn wait_until(&self, mut f: impl FnMut(&Status) -> bool) {
        let mut rx = self.shared.status.clone();
        let _ = rx.wait_for(|s| f(s)).await;
    }

    /// Whether [`disconnect`](Self::disconnect) was called.
    pub(crate) fn leaving(&self) -> bool {
        self.shared.leaving.load(Ordering::Relaxed)
    }

    /// Asks the worker to close its servers and its channel, and removes it from
    /// [`Primary::workers`](crate::Primary::workers) at once. Once it is gone,
    /// `exited_after_disconnect()` is `Some(true)`. Repeated calls do nothing.
    pub fn disconnect(&self) -> &Self {
        self.disconnect_within(None);
        self
    }

    /// [`disconnect`](Self::disconnect), telling the worker how long it has before it is
    /// killed, so that its drain ends inside that time.
    pub(crate) fn disconnect_within(&self, grace: Option<Duration>) {
        if !self.is_connected() || self.shared.leaving.swap(true, Ordering::Relaxed) {
            return;
        }
        self.shared.servers.before_leave(self.id());
        send_disconnect(&self.shared, grace);
    }

    /// [`disconnect_within`](Self::disconnect_within), the `Disconnect` itself sent after
    /// `settle`: the worker is out of `workers()` at once, but keeps taking the connections
    /// handed to it meanwhile (a shutdown lets the round-robin queue empty this way).
    pub(crate) fn disconnect_after(&self, grace: Option<Duration>, settle: Duration) {
        if !self.is_connected() || self.shared.leaving.swap(true, Ordering::Relaxed) {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(settle).await;
            send_disconnect(&shared, grace);
        });
    }

    /// Sends SIGTERM at once, with no disconnect handshake (Node's `worker.kill()`); afterwards
    /// `exited_after_disconnect()` is `Some(false)` unless a disconnect came first.
    pub fn kill(&self) -> Result<(), Error> {
        self.kill_with(Signal::SIGTERM)
    }

    /// Sends `signal` to the worker process at once.
    pub fn kill_with(&self, signal: Signal) -> Result<(), Error> {
        if self.is_dead() || self.pid() == 0 || self.shared.reaped.load(Ordering::Relaxed) {
            return Err(Error::new(
                ErrorKind::ChannelClosed,
                format!("worker {} has already exited", self.id()),
            ));
        }
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        signal
            .to_nix()
            .and_then(|s| nix::sys::signal::kill(pid, s))
            .map_err(|e| {
                Error::io(
                    ErrorKind::Io,
                    format!("cannot signal worker {}", self.id()),
                    e.into(),
                )
            })
    }

    /// The worker's stdout, when [`Settings::silent`](crate::Settings::silent) was set at
    /// fork; once.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.shared
            .stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The worker's stderr, when [`Settings::silent`](crate::Settings::silent) was set at
    /// fork; once.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.shared
            .stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

impl<W: Message> WorkerRef<W> {
    /// Sends a typed message to the worker, waiting while the messages it has not read yet
    /// hold [`Config::outbox_limit`](crate::Config::outbox_limit) bytes (a worker that does not
    /// read pushes back on its own sender only). Fails when the channel is closed (the worker
    /// is dead or disconnected) or the message exceeds the frame limit; dropped before it is
    /// ready, it sends nothing.
    ///
    /// An `async fn` in effect; the future borrows `self` but not `msg`, so it is `Send`
    /// whatever `W` is.
    pub fn send<'a>(
        &'a self,
        msg: &W,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + use<'a, W> {
        self.send_frame(msg, None)
    }

    /// Sends a message with a descriptor (a socket, a file) the worker receives with it;
    /// waits for room like [`WorkerRef::send`].
    pub fn send_with_handle<'a>(
        &'a self,
        msg: &W,
        handle: OwnedFd,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + use<'a, W> {
        self.send_frame(msg, Some(handle))
    }

    /// Sends a typed message if the worker's channel has room now; otherwise fails with
    /// [`ErrorKind::Full`] and sends nothing. For code that cannot wait (a sync callback, a
    /// thread) or would rather drop a message than wait.
    pub fn try_send(&self, msg: &W) -> Result<(), Error> {
        self.shared
            .outbox
            .try_send_user(msg, None)
            .map_err(|e| e.into_error(self.id()))?;
        self.shared
            .counters
            .msgs_out
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn send_frame<'a>(
        &'a self,
        msg: &W,
        handle: Option<OwnedFd>,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + use<'a, W> {
        let shared = &self.shared;
        let sent = shared.outbox.send_user(msg, handle);
        async move {
            sent.await.map_err(|e| e.into_error(shared.id))?;
            shared.counters.msgs_out.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}
