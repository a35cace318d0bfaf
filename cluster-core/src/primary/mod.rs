//! The primary: a handle that sends commands to the supervisor task and reads what it
//! publishes.
//!
//! - [`supervisor`]: the one task that owns the lifecycle state.
//! - [`reader`]: one task per worker reading its channel.
//! - [`events`]: the bounded event queue to `next_event`.
//! - [`spawn`]: starting a worker process.
//! - [`worker_ref`]: the handle on one worker.
//! - [`policy`]: the pure rules (lifecycle, backoff, crash loop, heartbeat).
//! - [`signals`], [`stats`]: signal handling and the cluster's snapshot.

mod events;
mod logs;
mod policy;
mod reader;
mod rollout;
mod signals;
mod spawn;
mod stats;
mod supervisor;
pub(crate) mod upgrade;
mod worker_ref;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

pub use stats::{Stats, WorkerStats};
pub use worker_ref::WorkerRef;

use events::Inbox;
pub(crate) use supervisor::Scale;
use supervisor::{COMMANDS, Command, REPORTS, Supervisor, View};

use crate::config::{Config, Heartbeat, RespawnPolicy, SchedulingPolicy, Settings};
use crate::dispatch::Servers;
use crate::error::{Error, ErrorKind};
use crate::message::{Message, pair_fingerprint};
pub use events::Event;

/// The primary's handle on the cluster: fork workers, list them, read events, disconnect.
///
/// `P` is the type of messages workers send to the primary, `W` the type the primary sends to
/// workers. Cloning is cheap; all clones drive the same cluster, whose state one supervisor
/// task owns: the handle's methods send it commands and read what it publishes.
pub struct Primary<P = (), W = ()> {
    inner: Arc<Handle<P, W>>,
}

struct Handle<P, W> {
    commands: mpsc::Sender<Command<W>>,
    view: watch::Receiver<View<W>>,
    /// The consumer's side of the event queue; a tokio mutex because `next_event` holds it
    /// across its wait, so that concurrent readers take events one at a time.
    inbox: tokio::sync::Mutex<Inbox<P, W>>,
    /// Whether a handle asked for the configured workers yet (on its first use).
    started: AtomicBool,
    servers: Arc<Servers>,
    /// For errors the handle's own tasks meet (a reload from SIGHUP).
    errors: events::EventTx<P, W>,
}

impl<P, W> Clone for Primary<P, W> {
    fn clone(&self) -> Self {
        Primary {
            inner: self.inner.clone(),
        }
    }
}

impl<P, W> fmt::Debug for Primary<P, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Primary")
            .field("workers", &self.inner.view.borrow().workers.len())
            .finish()
    }
}

/// The supervisor is gone: only when the runtime is shutting down.
fn gone() -> Error {
    Error::new(
        ErrorKind::ChannelClosed,
        "the cluster's supervisor has stopped",
    )
}

impl<P: Message, W: Message> Primary<P, W> {
    /// Starts the primary side: spawns the supervisor task and opens the handle on our own
    /// executable. Call inside a tokio runtime; `#[cluster::main]` does this for you.
    pub fn new(config: Config) -> Self {
        Self::with_workers(config, 0)
    }

    /// A primary that forks `n` workers on the first use of the handle.
    pub(crate) fn with_workers(config: Config, n: usize) -> Self {
        let (events, inbox) = events::queue();
        let (view_tx, view) = watch::channel(View::default());
        let (commands, commands_rx) = mpsc::channel(COMMANDS);
        let (reports, reports_rx) = mpsc::channel(REPORTS);
        let myself = commands.downgrade();
        let servers = Servers::new(config.scheduling);
        let supervisor = Supervisor::new(
            config,
            n,
            pair_fingerprint::<P, W>(),
            servers.clone(),
            events.clone(),
            reports,
            view_tx,
            myself,
        );
        tokio::spawn(supervisor.run(commands_rx, reports_rx));
        Primary {
            inner: Arc::new(Handle {
                commands,
                view,
                inbox: tokio::sync::Mutex::new(inbox),
                started: AtomicBool::new(false),
                servers,
                errors: events,
            }),
        }
    }

    /// Sends a command and waits for its reply; `None` if the supervisor is gone.
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command<W>) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inner.commands.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Forks the configured workers, once, on first use of the handle.
    async fn ensure_started(&self) {
        if !self.inner.started.swap(true, Ordering::Relaxed) {
            let _ = self.inner.commands.send(Command::Start).await;
        }
    }

    /// The same for a method that cannot wait: the workers start as soon as the supervisor
    /// runs, and are not yet in what this call returns.
    fn ensure_started_now(&self) {
        if !self.inner.started.swap(true, Ordering::Relaxed)
            && self.inner.commands.try_send(Command::Start).is_err()
        {
            // The queue is full of earlier commands: leave the start to the next async call.
            self.inner.started.store(false, Ordering::Relaxed);
        }
    }

    /// Forks the configured workers now, if no use of the handle did yet, and returns the live
    /// workers (the configured ones among them).
    pub async fn start(&self) -> Vec<WorkerRef<W>> {
        self.ensure_started().await;
        // A round trip: every command sent before this one, the start included, is done.
        let _ = self.call(|reply| Command::Sync { reply }).await;
        self.workers()
    }

    /// Makes the primary obey the signals of a production process manager:
    ///
    /// | signal | effect |
    /// |---|---|
    /// | SIGTERM, SIGINT, SIGQUIT | graceful [`shutdown`](Self::shutdown) with `grace`; afterwards `next_event` returns `None`. If workers remain after `grace` they are killed and the primary exits with code 1; a second SIGINT forces it at once |
    /// | SIGHUP | rolling [`reload`](Self::reload) |
    /// | SIGUSR2 | full [`upgrade`](Self::upgrade), the primary included; the outcome is a line on stderr (`cluster: upgrade done: ..` or `cluster: upgrade failed: ..`, the latter also an `Error` event) |
    /// | SIGTTIN / SIGTTOU | one worker more / fewer (the newest leaves gracefully) |
    /// | SIGUSR1 | [`Event::ReopenLogs`]: reopen the log files the application writes |
    ///
    /// None of them terminates the primary by their default action any more.
    pub fn handle_signals(&self, grace: Duration) -> std::io::Result<()> {
        signals::handle(self.clone(), grace)
    }

    /// Changes the scheduling policy; only before the first fork, as Node freezes it then.
    pub async fn set_scheduling_policy(&self, policy: SchedulingPolicy) -> Result<(), Error> {
        self.call(|reply| Command::SetPolicy { policy, reply })
            .await
            .unwrap_or_else(|| Err(gone()))
    }

    /// Starts a worker with the primary's environment.
    pub async fn fork(&self) -> Result<WorkerRef<W>, Error> {
        self.fork_with_env(std::iter::empty::<(OsString, OsString)>())
            .await
    }

    /// Starts a worker with `env` merged over the primary's environment (Node's `fork(env)`).
    ///
    /// The worker is in [`workers`](Self::workers) when this returns, and `Event::Fork` is queued.
    pub async fn fork_with_env<I, K, V>(&self, env: I) -> Result<WorkerRef<W>, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let env = env
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .collect();
        self.fork_as(env, false, None).await
    }

    async fn fork_as(
        &self,
        env: Vec<(OsString, OsString)>,
        probation: bool,
        inherit: Option<u32>,
    ) -> Result<WorkerRef<W>, Error> {
        self.ensure_started().await;
        self.call(|reply| Command::Fork {
            env,
            probation,
            inherit,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(gone()))
    }

    /// Changes the settings of later forks (Node's `setupPrimary`): cumulative, and queues
    /// `Event::Setup` with the result. Workers already running are unaffected. Two calls at
    /// the same time from different tasks: the last one wins.
    pub async fn setup_primary(&self, change: impl FnOnce(&mut Settings)) -> Settings {
        let mut settings = self.settings();
        change(&mut settings);
        let now = settings.clone();
        let _ = self.call(|reply| Command::Setup { settings, reply }).await;
        now
    }

    /// The settings in force for the next fork.
    pub fn settings(&self) -> Settings {
        self.inner.view.borrow().settings.clone()
    }

    /// The scheduling policy for shared server ports.
    pub fn scheduling_policy(&self) -> SchedulingPolicy {
        self.inner.servers.policy()
    }

    /// Live workers by id: those not yet both disconnected and exited. A worker disconnected
    /// from the primary side leaves at once.
    ///
    /// The configured workers start on the first use of the handle; when this call is that
    /// first use, they are not in its answer yet (use [`start`](Self::start) to wait for them).
    pub fn workers(&self) -> Vec<WorkerRef<W>> {
        self.ensure_started_now();
        self.inner.view.borrow().listed().cloned().collect()
    }

    /// The live worker with this id.
    pub fn worker(&self, id: u32) -> Option<WorkerRef<W>> {
        self.inner
            .view
            .borrow()
            .listed()
            .find(|w| w.id() == id)
            .cloned()
    }

    /// The next event. Returns `None` once [`disconnect`](Self::disconnect) has completed and
    /// every queued event was read (a later `fork` opens the stream again).
    pub async fn next_event(&self) -> Option<Event<P, W>> {
        // The hot path under message load: an event is already queued and nobody else reads.
        if let Ok(mut inbox) = self.inner.inbox.try_lock() {
            if let Some(ev) = inbox.pop() {
                return Some(ev);
            }
        }
        self.ensure_started().await;
        let mut inbox = self.inner.inbox.lock().await;
        let mut view = self.inner.view.clone();
        loop {
            // The view first: the supervisor queues a worker's last event before it publishes
            // that nobody is left, so a view that says "done" read before an empty queue means
            // the stream really ended.
            let done = {
                let v = view.borrow_and_update();
                v.closing && v.workers.is_empty()
            };
            if let Some(ev) = inbox.pop() {
                return Some(ev);
            }
            if done {
                return None;
            }
            tokio::select! {
                more = inbox.fill() => if !more { return None },
                changed = view.changed() => if changed.is_err() { return None },
            }
        }
    }

    /// Disconnects every connected worker (Node's `cluster.disconnect()`) and completes once
    /// every worker has disconnected and exited; at once when there are none.
    pub async fn disconnect(&self) {
        // Not a first use: a cluster told to leave does not start its workers.
        self.inner.started.store(true, Ordering::Relaxed);
        if self.inner.commands.send(Command::Close).await.is_ok() {
            self.wait_for_exits().await;
        }
    }

    /// The exit owed by a forced shutdown or a crash loop, if any.
    pub(crate) fn take_exit(&self) -> Option<(i32, String)> {
        self.inner.view.borrow().exit.clone()
    }

    /// Replaces workers that exit unplanned, with backoff and a crash-loop guard (see
    /// [`RespawnPolicy`]). Off by default, as in Node.
    pub async fn set_respawn(&self, policy: Option<RespawnPolicy>) {
        let _ = self.call(|reply| Command::Respawn { policy, reply }).await;
    }

    /// Watches liveness: pings every online worker each `interval`; a worker silent for
    /// `timeout`, or not online `boot_timeout` after its fork, is reported with
    /// `Event::Error` (kind `Unresponsive`) and killed with SIGKILL (the respawn policy, if
    /// any, replaces it).
    pub async fn set_heartbeat(&self, heartbeat: Heartbeat) {
        let _ = self
            .call(|reply| Command::Heartbeat { heartbeat, reply })
            .await;
    }

    /// Sets the number of workers: forks the missing ones, or gracefully disconnects the newest
    /// until `n` remain (what SIGTTIN and SIGTTOU do one at a time). Returns the workers forked.
    /// Asked during a rolling reload, it applies once the rollout is done (so the rollout's one
    /// replacement at a time holds); scale requests made meanwhile combine into one.
    pub async fn scale_to(&self, n: usize) -> Result<Vec<WorkerRef<W>>, Error> {
        self.scale(Scale::To(n)).await
    }

    pub(crate) async fn scale(&self, to: Scale) -> Result<Vec<WorkerRef<W>>, Error> {
        self.ensure_started().await;
        self.call(|reply| Command::Scale { to, reply })
            .await
            .unwrap_or_else(|| Err(gone()))
    }

    /// A snapshot of the cluster: every live worker's pid, state, uptime, connections and
    /// messages, and how many workers the respawn policy replaced.
    pub fn stats(&self) -> Stats {
        Stats::of(&self.inner.view.borrow())
    }

    /// Graceful shutdown: disconnects every worker (their servers stop taking connections and
    /// in-flight work finishes), waits up to `grace` for all to exit, then SIGKILLs the
    /// stragglers. Returns `true` when every worker left within `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shutdown_as(grace, false, false).await
    }

    /// [`shutdown`](Self::shutdown); with `owe_exit`, stragglers make the process owe exit 1,
    /// recorded before they are killed; with `exit_after`, the process exits with that code if
    /// `main` does not return soon after.
    async fn shutdown_as(&self, grace: Duration, owe_exit: bool, exit_after: bool) -> bool {
        self.inner.started.store(true, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let command = Command::Shutdown {
            grace,
            owe_exit,
            exit_after,
            reply: Some(tx),
        };
        if self.inner.commands.send(command).await.is_err() {
            return false;
        }
        let clean = rx.await.unwrap_or(false);
        if clean {
            // Every exit is queued; the view says nobody is left once the last one is.
            self.wait_for_exits().await;
        }
        clean
    }

    /// Zero-downtime rolling reload: for each worker in turn, forks its replacement, waits until
    /// the replacement listens (or is online, for a worker without servers), then disconnects
    /// the old one and waits for its exit (SIGKILL after `grace`). When a replacement fails to
    /// start within `grace`, the reload stops with an error and the old workers keep serving.
    ///
    /// One rollout runs at a time: a reload asked for while one runs waits for it, and all the
    /// reloads asked for meanwhile share one more rollout after it (so every worker ends on the
    /// settings of the last request, with one replacement at a time). A shutdown cancels it: no
    /// replacement is forked once the cluster is closing.
    pub async fn reload(&self, grace: Duration) -> Result<(), Error> {
        self.call(|reply| Command::Reload { grace, reply })
            .await
            .unwrap_or_else(|| Err(gone()))
    }

    /// Full upgrade, the primary included (what SIGUSR2 does under
    /// [`handle_signals`](Self::handle_signals)): starts the binary now at the path this
    /// primary was started from as a new primary, handing it every listening socket, the
    /// worker count and the scheduling policy. The new primary forks its own workers; once all
    /// of them are ready (listening, or online for a moment without a server) this primary
    /// hands the service over (`MAINPID=` to systemd), drains its workers under `grace` and
    /// its event stream ends, so `main` returns. No port closes during the switch: both
    /// primaries accept on the same sockets until the old one is gone. Returns the new
    /// primary's pid.
    ///
    /// A new primary that exits, or whose workers are not all ready within `grace`, is stopped
    /// (SIGTERM, SIGKILL after 5 s) and this primary serves on as before: `ErrorKind::Upgrade`.
    /// An upgrade asked for while one runs, during a rolling reload or a shutdown is refused
    /// (`ErrorKind::InvalidState`), as is a reload while an upgrade runs. Unlike a
    /// [`reload`](Self::reload), an upgrade can bring in a build with other message types or
    /// another version of cluster: no worker of the old primary talks to the new one.
    pub async fn upgrade(&self, grace: Duration) -> Result<u32, Error> {
        self.ensure_started().await;
        self.call(|reply| Command::Upgrade { grace, reply })
            .await
            .unwrap_or_else(|| Err(gone()))
    }

    /// Waits until every worker has both disconnected and exited.
    pub async fn wait_for_exits(&self) {
        let mut view = self.inner.view.clone();
        let _ = view.wait_for(|v| v.workers.is_empty()).await;
    }
}
