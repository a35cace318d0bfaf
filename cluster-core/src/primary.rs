//! The primary: forking workers, the registry of live workers, and the event stream.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::process::{ChildStderr, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::{self, Incoming, Outbox, Reader};
use crate::config::{Config, Heartbeat, RespawnPolicy, SchedulingPolicy, Settings};
use crate::error::{Error, ErrorKind};
use crate::event::{Event, ExitStatus, WorkerState};
use crate::message::{Message, pair_fingerprint};
use crate::servers::Servers;
use crate::sys;
use crate::wire::{Control, Wire};

/// The crate version both sides compare in the handshake.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The primary's handle on the cluster: fork workers, list them, read events, disconnect.
///
/// `P` is the type of messages workers send to the primary, `W` the type the primary sends to
/// workers. Cloning is cheap; all clones drive the same cluster.
pub struct Primary<P = (), W = ()> {
    inner: Arc<Inner<P, W>>,
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
            .field("workers", &self.inner.registry.len())
            .finish()
    }
}

pub(crate) struct Inner<P, W> {
    config: Config,
    settings: Mutex<Settings>,
    frozen: AtomicBool,
    next_id: AtomicU32,
    registry: Arc<Registry<W>>,
    events_tx: mpsc::UnboundedSender<Delivery<P, W>>,
    events_rx: tokio::sync::Mutex<EventInbox<P, W>>,
    closing: AtomicBool,
    respawn: Mutex<Option<RespawnState>>,
    /// The settings of the last worker that came online.
    good_settings: Mutex<Option<Settings>>,
    /// An exit owed once `main` returns: code and last line.
    exit: Mutex<Option<(i32, String)>>,
    /// Workers of the configured count not forked yet: they start on first use of the handle,
    /// so the primary's own code (a banner, `setup_primary`) runs before any worker.
    pending: std::sync::atomic::AtomicUsize,
    respawns: AtomicU64,
    exe: Option<std::fs::File>,
    argv0: OsString,
    fingerprint: u64,
    pub(crate) servers: Arc<Servers>,
}

/// What travels from the tasks that see events to `next_event`: one event, or all the messages
/// decoded from one read of a worker's channel, handed over at once.
enum Delivery<P, W> {
    One(Event<P, W>),
    Many(Vec<Event<P, W>>),
}

/// `next_event`'s side: the channel and the rest of the last batch.
struct EventInbox<P, W> {
    rx: mpsc::UnboundedReceiver<Delivery<P, W>>,
    buf: VecDeque<Event<P, W>>,
}

impl<P, W> EventInbox<P, W> {
    fn put(&mut self, d: Delivery<P, W>) {
        match d {
            Delivery::One(ev) => self.buf.push_back(ev),
            Delivery::Many(evs) => self.buf.extend(evs),
        }
    }

    /// The next event already here, without waiting.
    fn pop(&mut self) -> Option<Event<P, W>> {
        if self.buf.is_empty() {
            match self.rx.try_recv() {
                Ok(Delivery::One(ev)) => return Some(ev),
                Ok(d) => self.put(d),
                Err(_) => return None,
            }
        }
        self.buf.pop_front()
    }
}

struct RespawnState {
    policy: RespawnPolicy,
    backoff: Duration,
    crashes: VecDeque<Instant>,
}

pub(crate) struct Registry<W> {
    map: Mutex<BTreeMap<u32, WorkerRef<W>>>,
    /// Workers not yet both disconnected and exited, whether or not still in `map`.
    live: watch::Sender<usize>,
    /// The same workers, for shutdown: a disconnected worker may still need a SIGKILL.
    alive: Mutex<BTreeMap<u32, WorkerRef<W>>>,
}

impl<W> Registry<W> {
    /// Every worker not yet both disconnected and exited, including those already out of `map`.
    fn alive(&self) -> Vec<WorkerRef<W>> {
        self.alive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn remove(&self, id: u32) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

impl<P: Message, W: Message> Primary<P, W> {
    /// Starts the primary side: opens the handle on our own executable. Call inside a tokio
    /// runtime; `#[cluster::main]` does this for you.
    pub fn new(config: Config) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (live, _) = watch::channel(0);
        // The handle keeps the binary we were started from, even if a package upgrade replaces
        // the file on disk: workers always run the primary's own version.
        let exe = if cfg!(target_os = "linux") {
            std::fs::File::open("/proc/self/exe").ok()
        } else {
            None
        };
        let servers = Servers::new(config.scheduling);
        Primary {
            inner: Arc::new(Inner {
                config,
                settings: Mutex::new(Settings::default()),
                frozen: AtomicBool::new(false),
                next_id: AtomicU32::new(1),
                registry: Arc::new(Registry {
                    map: Mutex::new(BTreeMap::new()),
                    live,
                    alive: Mutex::new(BTreeMap::new()),
                }),
                events_tx,
                events_rx: tokio::sync::Mutex::new(EventInbox {
                    rx: events_rx,
                    buf: VecDeque::new(),
                }),
                closing: AtomicBool::new(false),
                respawn: Mutex::new(None),
                good_settings: Mutex::new(None),
                exit: Mutex::new(None),
                pending: std::sync::atomic::AtomicUsize::new(0),
                respawns: AtomicU64::new(0),
                exe,
                argv0: std::env::args_os()
                    .next()
                    .unwrap_or_else(|| "cluster-worker".into()),
                fingerprint: pair_fingerprint::<P, W>(),
                servers,
            }),
        }
    }

    /// Sets the number of workers started on first use of the handle.
    pub(crate) fn set_initial_workers(&self, n: usize) {
        self.inner.pending.store(n, Ordering::Relaxed);
    }

    /// Forks the configured workers, once, on first use of the handle.
    fn ensure_started(&self) {
        let n = self.inner.pending.swap(0, Ordering::Relaxed);
        if n == 0 {
            return;
        }
        let mut started = Vec::new();
        for _ in 0..n {
            match self.fork() {
                Ok(w) => started.push(w),
                Err(error) => self.inner.emit(Event::Error {
                    worker: None,
                    error,
                }),
            }
        }
        // Tell a service manager we serve once the first workers are ready: listening, or
        // online for a moment without a server.
        tokio::spawn(async move {
            loop {
                let ready = started.iter().all(|w| {
                    let st = w.shared.lock();
                    st.state == WorkerState::Listening
                        || (st.state == WorkerState::Online
                            && st
                                .last_pong
                                .is_some_and(|t| t.elapsed() > Duration::from_millis(500)))
                        || st.dead
                });
                if ready {
                    crate::notify::ready();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    /// Makes the primary obey the signals of a production process manager:
    ///
    /// | signal | effect |
    /// |---|---|
    /// | SIGTERM, SIGINT | graceful [`shutdown`](Self::shutdown) with `grace`; afterwards `next_event` returns `None`. If workers remain after `grace` they are killed and the primary exits with code 1; a second SIGINT forces it at once |
    /// | SIGHUP | rolling [`reload`](Self::reload) |
    /// | SIGTTIN / SIGTTOU | one worker more / fewer (the newest leaves gracefully) |
    pub fn handle_signals(&self, grace: Duration) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut ttin = signal(SignalKind::from_raw(nix::libc::SIGTTIN))?;
        let mut ttou = signal(SignalKind::from_raw(nix::libc::SIGTTOU))?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => {
                        let m = me.clone();
                        tokio::spawn(async move {
                            if let Err(error) = m.reload(grace).await {
                                m.inner.emit(Event::Error { worker: None, error });
                            }
                        });
                    }
                    _ = ttin.recv() => {
                        if let Err(error) = me.fork() {
                            me.inner.emit(Event::Error { worker: None, error });
                        }
                    }
                    _ = ttou.recv() => {
                        if let Some(w) = me.workers().last() {
                            w.disconnect();
                        }
                    }
                }
            }
            // The exit is owed before the stragglers are killed: once they are gone the event
            // stream ends and `main` returns, and `run` must find it then.
            let clean = tokio::select! {
                clean = me.shutdown_owing(grace, true) => clean,
                _ = int.recv() => me.shutdown_owing(Duration::ZERO, true).await,
            };
            if !clean {
                // `main` normally returns now that the event stream ended; if it does not,
                // exit anyway.
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Some((code, message)) = me.take_exit() {
                    eprintln!("cluster: {message}");
                    std::process::exit(code);
                }
            }
        });
        Ok(())
    }

    /// Changes the scheduling policy; only before the first fork, as Node freezes it then.
    pub fn set_scheduling_policy(&self, policy: SchedulingPolicy) -> Result<(), Error> {
        if self.inner.frozen.load(Ordering::Relaxed) {
            return Err(Error::new(
                ErrorKind::Io,
                "the scheduling policy is frozen once the first worker is forked or `setup_primary` ran",
            ));
        }
        self.inner.servers.set_policy(policy);
        Ok(())
    }

    /// Starts a worker with the primary's environment.
    pub fn fork(&self) -> Result<WorkerRef<W>, Error> {
        self.fork_with_env(std::iter::empty::<(OsString, OsString)>())
    }

    /// Starts a worker with `env` merged over the primary's environment (Node's `fork(env)`).
    ///
    /// The worker is in [`workers`](Self::workers) when this returns, and `Event::Fork` is queued.
    pub fn fork_with_env<I, K, V>(&self, env: I) -> Result<WorkerRef<W>, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let inner = &self.inner;
        inner.frozen.store(true, Ordering::Relaxed);
        inner.closing.store(false, Ordering::Relaxed);
        let settings = inner
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);

        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| {
            Error::io(
                ErrorKind::Spawn,
                format!("cannot create the channel for worker {id}"),
                e,
            )
        })?;

        let mut cmd;
        let exe_fd;
        match (&settings.exec, &inner.exe) {
            (Some(path), _) => {
                cmd = tokio::process::Command::new(path);
                exe_fd = None;
            }
            (None, Some(exe)) => {
                cmd = tokio::process::Command::new(sys::exe_path());
                std::os::unix::process::CommandExt::arg0(cmd.as_std_mut(), &inner.argv0);
                exe_fd = Some(exe.as_raw_fd());
            }
            (None, None) => {
                let path = std::env::current_exe().map_err(|e| {
                    Error::io(ErrorKind::Spawn, "cannot find the primary's executable", e)
                })?;
                cmd = tokio::process::Command::new(path);
                exe_fd = None;
            }
        }
        match &settings.args {
            Some(args) => cmd.args(args),
            None => cmd.args(std::env::args_os().skip(1)),
        };
        cmd.envs(env);
        cmd.env("CLUSTER_WORKER_ID", id.to_string());
        if let Some(cwd) = &settings.cwd {
            cmd.current_dir(cwd);
        }
        if let Some(uid) = settings.uid {
            cmd.uid(uid);
        }
        if let Some(gid) = settings.gid {
            cmd.gid(gid);
        }
        if settings.silent {
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
        }
        cmd.stdin(std::process::Stdio::null());
        let chan_fd = theirs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before `exec` and only makes
        // async-signal-safe system calls (see `sys::child_setup`); it captures two integers.
        unsafe {
            cmd.pre_exec(move || sys::child_setup(chan_fd, exe_fd));
        }
        let program = settings.exec.as_ref().map_or_else(
            || "the primary's own executable".to_owned(),
            |p| format!("`{}`", p.display()),
        );
        let mut child = cmd.spawn().map_err(|e| {
            Error::io(
                ErrorKind::Spawn,
                format!("cannot start worker {id} from {program}"),
                e,
            )
        })?;
        drop(theirs);
        let pid = child.id().unwrap_or(0);

        let stream = channel::into_stream(ours.into())
            .map_err(|e| Error::io(ErrorKind::Spawn, "cannot register the channel", e))?;
        let outbox = channel::spawn_writer(
            stream.clone(),
            inner.config.max_frame,
            inner.config.outbox_limit,
        );
        let registry = Arc::downgrade(&inner.registry);
        let shared = Arc::new(WorkerShared {
            id,
            pid,
            outbox,
            st: Mutex::new(WState::default()),
            remove: Box::new(move |id| {
                if let Some(r) = registry.upgrade() {
                    r.remove(id)
                }
            }),
            stdout: Mutex::new(child.stdout.take()),
            stderr: Mutex::new(child.stderr.take()),
            started: Instant::now(),
            settings: settings.clone(),
            msgs_in: AtomicU64::new(0),
            msgs_out: AtomicU64::new(0),
            conns: AtomicU64::new(0),
        });
        let worker = WorkerRef {
            shared,
            _w: PhantomData,
        };
        inner
            .registry
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, worker.clone());
        inner
            .registry
            .alive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, worker.clone());
        inner.registry.live.send_modify(|n| *n += 1);
        inner.emit(Event::Fork {
            worker: worker.clone(),
        });

        let (read_done_tx, read_done_rx) = oneshot::channel();
        let reader = Reader::new(stream, inner.config.max_frame);
        tokio::spawn(read_worker(
            self.inner.clone(),
            worker.clone(),
            reader,
            read_done_tx,
        ));
        let inner2 = self.inner.clone();
        let w2 = worker.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => ExitStatus::from_std(s),
                Err(_) => ExitStatus::Code(-1),
            };
            // The channel ends with the process; let the reader deliver what the worker said
            // before it died, so `Exit` follows its messages and `Disconnect`.
            let _ = tokio::time::timeout(Duration::from_secs(2), read_done_rx).await;
            inner2.on_exit(&w2, status);
            Primary { inner: inner2 }.after_exit(&w2, status);
        });
        Ok(worker)
    }

    /// Changes the settings of later forks (Node's `setupPrimary`): cumulative, and queues
    /// `Event::Setup` with the result. Workers already running are unaffected.
    pub fn setup_primary(&self, change: impl FnOnce(&mut Settings)) -> Settings {
        let mut s = self
            .inner
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        change(&mut s);
        let now = s.clone();
        drop(s);
        self.inner.frozen.store(true, Ordering::Relaxed);
        self.inner.emit(Event::Setup {
            settings: now.clone(),
        });
        now
    }
}

impl<P: Message, W: Message> Primary<P, W> {
    /// The settings in force for the next fork.
    pub fn settings(&self) -> Settings {
        self.inner
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The scheduling policy for shared server ports.
    pub fn scheduling_policy(&self) -> SchedulingPolicy {
        self.inner.servers.policy()
    }

    /// Live workers by id: those not yet both disconnected and exited. A worker disconnected
    /// from the primary side leaves at once.
    pub fn workers(&self) -> Vec<WorkerRef<W>> {
        self.ensure_started();
        self.inner
            .registry
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The live worker with this id.
    pub fn worker(&self, id: u32) -> Option<WorkerRef<W>> {
        self.inner
            .registry
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// The next event. Returns `None` once [`disconnect`](Self::disconnect) has completed and
    /// every queued event was read (a later `fork` opens the stream again).
    pub async fn next_event(&self) -> Option<Event<P, W>> {
        if self.inner.pending.load(Ordering::Relaxed) != 0 {
            self.ensure_started();
        }
        // The hot path under message load: an event is already queued and nobody else reads.
        if let Ok(mut inbox) = self.inner.events_rx.try_lock() {
            if let Some(ev) = inbox.pop() {
                return Some(ev);
            }
        }
        let mut inbox = self.inner.events_rx.lock().await;
        let mut live = self.inner.registry.live.subscribe();
        loop {
            if let Some(ev) = inbox.pop() {
                return Some(ev);
            }
            if self.inner.closing.load(Ordering::Relaxed) && *live.borrow_and_update() == 0 {
                return None;
            }
            tokio::select! {
                d = inbox.rx.recv() => match d {
                    Some(d) => inbox.put(d),
                    None => return None,
                },
                r = live.changed() => if r.is_err() { return None },
            }
        }
    }

    /// Disconnects every connected worker (Node's `cluster.disconnect()`) and completes once
    /// every worker has disconnected and exited; at once when there are none.
    pub async fn disconnect(&self) {
        self.inner.pending.store(0, Ordering::Relaxed);
        self.inner.closing.store(true, Ordering::Relaxed);
        // Wake a `next_event` that waits: with no worker left it must now end.
        self.inner.registry.live.send_modify(|_| {});
        for w in self.workers() {
            if w.is_connected() {
                w.disconnect();
            }
        }
        self.wait_for_exits().await;
    }

    /// Records the exit the process owes once `main` returns (see `run`).
    fn set_exit(&self, code: i32, message: String) {
        let mut e = self.inner.exit.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some((code, message));
        }
    }

    /// The exit owed by a forced shutdown or a crash loop, if any.
    pub(crate) fn take_exit(&self) -> Option<(i32, String)> {
        self.inner
            .exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Stops the cluster for good: owes exit `code` with `message` as the last line, shuts
    /// down, and lets the event stream end so `main` sees the last events and returns; if `main`
    /// does not return soon after, exits anyway.
    fn stop_with(&self, code: i32, message: String, grace: Duration) {
        self.set_exit(code, message);
        let me = self.clone();
        tokio::spawn(async move {
            me.shutdown(grace).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            if let Some((code, message)) = me.take_exit() {
                eprintln!("cluster: {message}");
                std::process::exit(code);
            }
        });
    }

    /// Replaces workers that exit unplanned, with backoff and a crash-loop guard (see
    /// [`RespawnPolicy`]). Off by default, as in Node.
    pub fn set_respawn(&self, policy: Option<RespawnPolicy>) {
        *self.inner.respawn.lock().unwrap_or_else(|p| p.into_inner()) =
            policy.map(|policy| RespawnState {
                policy,
                backoff: policy.min_backoff,
                crashes: VecDeque::new(),
            });
    }

    /// Applies the respawn policy after a worker's exit.
    fn after_exit(&self, w: &WorkerRef<W>, status: ExitStatus) {
        if w.exited_after_disconnect() == Some(true)
            || w.shared.lock().probation
            || self.inner.closing.load(Ordering::Relaxed)
        {
            return;
        }
        let mut guard = self.inner.respawn.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rs) = guard.as_mut() else { return };
        let now = Instant::now();
        let policy = rs.policy;
        rs.crashes.push_back(now);
        while rs
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.crash_window)
        {
            rs.crashes.pop_front();
        }
        let limit = policy.crash_limit.max(self.inner.registry.len() + 1);
        if rs.crashes.len() >= limit {
            let crashes = rs.crashes.len();
            *guard = None;
            drop(guard);
            let last = w
                .last_error()
                .unwrap_or_else(|| format!("exited with status {status}"));
            let message = format!(
                "crash loop: {crashes} workers failed within {}s; stopping the cluster. Last error (worker {}): {}",
                policy.crash_window.as_secs(),
                w.id(),
                last.replace('\n', "; ")
            );
            self.inner.emit(Event::Error {
                worker: None,
                error: Error::new(ErrorKind::CrashLoop, message.clone()),
            });
            self.stop_with(1, message, Duration::from_secs(10));
            return;
        }
        if w.uptime() >= policy.reset_after {
            rs.backoff = policy.min_backoff;
        }
        let delay = rs.backoff;
        rs.backoff = (rs.backoff * 2).min(policy.max_backoff);
        drop(guard);
        tracing::info!(
            worker.id = w.id(),
            worker.pid = w.pid(),
            delay_ms = delay.as_millis() as u64,
            "respawning worker"
        );
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if me.inner.closing.load(Ordering::Relaxed) {
                return;
            }
            me.inner.respawns.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = me.fork() {
                me.inner.emit(Event::Error {
                    worker: None,
                    error,
                });
            }
        });
    }

    /// Watches liveness: pings every online worker each `interval`; a worker silent for
    /// `timeout`, or not online `boot_timeout` after its fork, is reported with
    /// `Event::Error` (kind `Unresponsive`) and killed with SIGKILL (the respawn policy, if
    /// any, replaces it).
    pub fn set_heartbeat(&self, hb: Heartbeat) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(hb.interval);
            let mut seq = 0u64;
            loop {
                tick.tick().await;
                seq += 1;
                let alive: Vec<WorkerRef<W>> = me.inner.registry.alive();
                for w in alive {
                    let (state, connected, last) = {
                        let st = w.shared.lock();
                        (st.state, st.connected, st.last_pong)
                    };
                    if !connected || w.is_dead() {
                        continue;
                    }
                    let silent = match (state, last) {
                        (WorkerState::None, _) if w.uptime() > hb.boot_timeout => Some(format!(
                            "worker {} did not come online within {}s of its fork; killing it",
                            w.id(),
                            hb.boot_timeout.as_secs()
                        )),
                        (WorkerState::Online | WorkerState::Listening, Some(t))
                            if t.elapsed() > hb.timeout =>
                        {
                            Some(format!(
                                "worker {} did not answer heartbeats for {}s; killing it",
                                w.id(),
                                hb.timeout.as_secs()
                            ))
                        }
                        _ => None,
                    };
                    if let Some(msg) = silent {
                        me.inner.emit(Event::Error {
                            worker: Some(w.clone()),
                            error: Error::new(ErrorKind::Unresponsive, msg),
                        });
                        let _ = w.kill_with(nix::sys::signal::Signal::SIGKILL);
                    } else if matches!(state, WorkerState::Online | WorkerState::Listening) {
                        let _ = w
                            .shared
                            .outbox
                            .send(&Wire::<()>::Control(Control::Ping(seq)), vec![]);
                    }
                }
            }
        });
    }

    /// Sets the number of workers: forks the missing ones, or gracefully disconnects the newest
    /// until `n` remain (what SIGTTIN and SIGTTOU do one at a time). Returns the workers forked.
    pub fn scale_to(&self, n: usize) -> Result<Vec<WorkerRef<W>>, Error> {
        self.ensure_started();
        let live: Vec<WorkerRef<W>> = self
            .workers()
            .into_iter()
            .filter(|w| w.is_connected())
            .collect();
        let mut forked = Vec::new();
        if live.len() < n {
            for _ in live.len()..n {
                forked.push(self.fork()?);
            }
        } else {
            for w in live.iter().rev().take(live.len() - n) {
                w.disconnect();
            }
        }
        Ok(forked)
    }

    /// A snapshot of the cluster: every live worker's pid, state, uptime, connections and
    /// messages, and how many workers the respawn policy replaced.
    pub fn stats(&self) -> Stats {
        let alive: Vec<WorkerRef<W>> = self.inner.registry.alive();
        Stats {
            workers: alive
                .iter()
                .map(|w| {
                    let (messages_in, messages_out) = w.message_counts();
                    WorkerStats {
                        id: w.id(),
                        pid: w.pid(),
                        state: w.state(),
                        uptime: w.uptime(),
                        connections: w.shared.conns.load(Ordering::Relaxed),
                        messages_in,
                        messages_out,
                    }
                })
                .collect(),
            forked: u64::from(self.inner.next_id.load(Ordering::Relaxed) - 1),
            respawns: self.inner.respawns.load(Ordering::Relaxed),
        }
    }

    /// Graceful shutdown: disconnects every worker (their servers stop taking connections and
    /// in-flight work finishes), waits up to `grace` for all to exit, then SIGKILLs the
    /// stragglers. Returns `true` when every worker left within `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shutdown_owing(grace, false).await
    }

    /// [`shutdown`](Self::shutdown); with `owe_exit`, stragglers make the process owe exit 1,
    /// recorded before they are killed.
    async fn shutdown_owing(&self, grace: Duration, owe_exit: bool) -> bool {
        crate::notify::stopping();
        self.inner.pending.store(0, Ordering::Relaxed);
        self.inner.closing.store(true, Ordering::Relaxed);
        if tokio::time::timeout(grace, self.disconnect()).await.is_ok() {
            return true;
        }
        let stragglers: Vec<WorkerRef<W>> = self.inner.registry.alive();
        if owe_exit {
            self.set_exit(
                1,
                format!(
                    "shutdown did not finish within {grace:?}; the remaining workers were killed"
                ),
            );
        }
        for w in stragglers {
            let _ = w.kill_with(nix::sys::signal::Signal::SIGKILL);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.wait_for_exits()).await;
        false
    }

    /// Zero-downtime rolling reload: for each worker in turn, forks its replacement, waits until
    /// the replacement listens (or is online, for a worker without servers), then disconnects
    /// the old one and waits for its exit (SIGKILL after `grace`). When a replacement fails to
    /// start within `grace`, the reload stops with an error and the old workers keep serving.
    pub async fn reload(&self, grace: Duration) -> Result<(), Error> {
        crate::notify::reloading();
        let result = self.reload_each(grace).await;
        crate::notify::ready();
        result
    }

    async fn reload_each(&self, grace: Duration) -> Result<(), Error> {
        for old in self.workers() {
            if !old.is_connected() {
                continue;
            }
            let listening = old.state() == WorkerState::Listening;
            tracing::info!(
                worker.id = old.id(),
                worker.pid = old.pid(),
                "reload: starting a replacement"
            );
            let new = self.fork()?;
            // Under `reuseport` the replacement shares the old worker's socket, so connections
            // the kernel queued there are served, not reset when the old one leaves.
            self.inner.servers.inherit_slot(new.id(), old.id());
            // Until it is ready, a replacement that dies is the reload's failure to report, not
            // a crash for the respawn policy (which would fork the broken build again).
            new.shared.lock().probation = true;
            let ready = tokio::time::timeout(grace, async {
                loop {
                    let st = new.state();
                    if new.is_dead() || !new.is_connected() {
                        return false;
                    }
                    if st == WorkerState::Listening || (!listening && st == WorkerState::Online) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap_or(false);
            if !ready {
                let _ = new.kill_with(nix::sys::signal::Signal::SIGKILL);
                // Respawns must not use the build that just failed: back to the settings of
                // the workers that serve.
                let good = self
                    .inner
                    .good_settings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if let Some(good) = good {
                    self.setup_primary(|s| *s = good);
                }
                return Err(Error::new(
                    ErrorKind::Spawn,
                    format!(
                        "reload stopped: replacement worker {} did not become ready; the old workers keep serving and the settings are back to theirs",
                        new.id()
                    ),
                ));
            }
            new.shared.lock().probation = false;
            tracing::info!(
                worker.id = old.id(),
                replacement = new.id(),
                "reload: replacement ready, disconnecting the old worker"
            );
            old.disconnect();
            let gone = tokio::time::timeout(grace, async {
                while !old.is_dead() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            if gone.is_err() {
                let _ = old.kill_with(nix::sys::signal::Signal::SIGKILL);
            }
        }
        Ok(())
    }

    /// Waits until every worker has both disconnected and exited.
    pub async fn wait_for_exits(&self) {
        let mut live = self.inner.registry.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }
}

impl<P: Message, W: Message> Inner<P, W> {
    /// Hands over the messages of one read at once (one wake-up for the consumer).
    fn emit_batch(&self, batch: &mut Vec<Event<P, W>>) {
        match batch.len() {
            0 => {}
            1 => self.emit(batch.pop().expect("one event")),
            _ => {
                for ev in batch.iter() {
                    trace_event(ev);
                }
                let _ = self.events_tx.send(Delivery::Many(std::mem::take(batch)));
            }
        }
    }

    fn emit(&self, ev: Event<P, W>) {
        trace_event(&ev);
        let _ = self.events_tx.send(Delivery::One(ev));
    }

    /// Marks the channel closed; the worker leaves the registry if it has also exited.
    fn on_disconnect(&self, w: &WorkerRef<W>) {
        let finished = {
            let mut st = w.shared.lock();
            if !st.connected {
                return;
            }
            st.connected = false;
            st.state = WorkerState::Disconnected;
            st.exited_after_disconnect = Some(st.voluntary);
            st.dead
        };
        w.shared.outbox.abort();
        self.servers.worker_gone(w.id());
        if finished {
            self.finish(w);
        }
        self.emit(Event::Disconnect { worker: w.clone() });
        if finished {
            self.release(w);
        }
    }

    fn on_exit(&self, w: &WorkerRef<W>, status: ExitStatus) {
        let disconnected = {
            let mut st = w.shared.lock();
            st.dead = true;
            st.status = Some(status);
            st.state = WorkerState::Dead;
            st.exited_after_disconnect = Some(st.voluntary);
            !st.connected
        };
        if disconnected {
            self.finish(w);
        }
        self.emit(Event::Exit {
            worker: w.clone(),
            status,
        });
        if disconnected {
            self.release(w);
        }
    }

    /// Both disconnected and exited: the worker leaves the registry, before its last event.
    fn finish(&self, w: &WorkerRef<W>) {
        self.registry.remove(w.id());
        self.registry
            .alive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&w.id());
    }

    /// After the worker's last event is queued: it no longer counts as live, so a
    /// `next_event` that ends the stream once nobody is left cannot miss that event.
    fn release(&self, _w: &WorkerRef<W>) {
        self.registry.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Every lifecycle event is also a structured `tracing` event, with the worker's id and pid as
/// fields, so a subscriber sees the cluster's life without code of its own.
fn trace_event<P, W>(ev: &Event<P, W>) {
    use tracing::{debug, error, info, trace, warn};
    let (id, pid) = ev.worker().map_or((0, 0), |w| (w.id(), w.pid()));
    match ev {
        Event::Fork { .. } => info!(worker.id = id, worker.pid = pid, "worker forked"),
        Event::Online { .. } => info!(worker.id = id, worker.pid = pid, "worker online"),
        Event::Listening { address, .. } => {
            info!(worker.id = id, worker.pid = pid, address = %address, "worker listening")
        }
        Event::Disconnect { .. } => debug!(worker.id = id, worker.pid = pid, "worker disconnected"),
        Event::Exit { worker, status } => {
            if worker.exited_after_disconnect() == Some(true) {
                info!(worker.id = id, worker.pid = pid, status = %status, "worker exited")
            } else {
                warn!(worker.id = id, worker.pid = pid, status = %status, last_error = worker.last_error(), "worker died")
            }
        }
        Event::Message { .. } => trace!(worker.id = id, worker.pid = pid, "message"),
        Event::Error { error, .. } => {
            error!(worker.id = id, worker.pid = pid, kind = ?error.kind(), error = %error, "cluster error")
        }
        Event::Setup { .. } => debug!("settings changed"),
    }
}

async fn read_worker<P: Message, W: Message>(
    inner: Arc<Inner<P, W>>,
    w: WorkerRef<W>,
    mut reader: Reader,
    done: oneshot::Sender<()>,
) {
    let id = w.id();
    let who = format!("worker {id}");
    let mut online = false;
    let mut refused = false;
    let mut batch: Vec<Event<P, W>> = Vec::new();
    let outcome = loop {
        // Messages decoded from one read go out together, before anything else is emitted and
        // before the next read.
        if !batch.is_empty() && (!reader.has_frame() || batch.len() >= 1024) {
            inner.emit_batch(&mut batch);
        }
        let incoming = match reader.next::<P>().await {
            Ok(i) => i,
            Err(e) => break Err(e.into_error(&who)),
        };
        match incoming {
            Incoming::Eof => break Ok(()),
            Incoming::Frame(_, _) if refused => {}
            Incoming::Frame(
                Wire::Control(Control::Hello {
                    version,
                    fingerprint,
                }),
                _,
            ) if !online => {
                if version != VERSION || fingerprint != inner.fingerprint {
                    let reason = format!(
                        "{who} was built with other message types or another version of cluster \
                         (worker: version {version}, message fingerprint {fingerprint:#018x}; \
                         primary: version {VERSION}, message fingerprint {:#018x}); refusing it",
                        inner.fingerprint
                    );
                    let _ = w.shared.outbox.send(
                        &Wire::<()>::Control(Control::Refuse {
                            reason: reason.clone(),
                        }),
                        vec![],
                    );
                    w.shared.outbox.close();
                    refused = true;
                    inner.emit(Event::Error {
                        worker: Some(w.clone()),
                        error: Error::new(ErrorKind::Handshake, reason),
                    });
                    continue;
                }
                online = true;
                let _ = w
                    .shared
                    .outbox
                    .send(&Wire::<()>::Control(Control::Welcome), vec![]);
                {
                    let mut st = w.shared.lock();
                    st.state = WorkerState::Online;
                    st.last_pong = Some(Instant::now());
                }
                // These settings start workers that work: a failed reload returns to them.
                *inner
                    .good_settings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(w.shared.settings.clone());
                inner.emit(Event::Online { worker: w.clone() });
            }
            Incoming::Frame(_, _) if !online => {
                break Err(Error::new(
                    ErrorKind::Handshake,
                    format!("{who} sent a message before the handshake"),
                ));
            }
            Incoming::Frame(Wire::User { msg, handle }, fds) => {
                w.shared.msgs_in.fetch_add(1, Ordering::Relaxed);
                let handle = if handle { fds.into_iter().next() } else { None };
                batch.push(Event::Message {
                    worker: w.clone(),
                    msg,
                    handle,
                });
            }
            Incoming::Frame(Wire::Control(c), fds) => match c {
                Control::Disconnecting => {
                    let mut st = w.shared.lock();
                    st.voluntary = true;
                    st.exited_after_disconnect = Some(true);
                }
                Control::Ping(n) => {
                    let _ = w
                        .shared
                        .outbox
                        .send(&Wire::<()>::Control(Control::Pong(n)), vec![]);
                }
                Control::Pong(_) => w.shared.lock().last_pong = Some(Instant::now()),
                Control::Fatal { message } => w.shared.lock().last_error = Some(message),
                Control::Listening { addr } => {
                    w.shared.lock().state = WorkerState::Listening;
                    inner.emit_batch(&mut batch);
                    inner.emit(Event::Listening {
                        worker: w.clone(),
                        address: addr,
                    });
                }
                other => {
                    if let Control::Accepted { n, .. } = &other {
                        w.shared.conns.fetch_add(u64::from(*n), Ordering::Relaxed);
                    }
                    inner.servers.handle(id, &w.shared.outbox, other, fds)
                }
            },
        }
    };
    inner.emit_batch(&mut batch);
    if let Err(error) = outcome {
        inner.emit(Event::Error {
            worker: Some(w.clone()),
            error,
        });
    }
    drop(reader);
    inner.on_disconnect(&w);
    let _ = done.send(());
}

/// A snapshot of the cluster, from [`Primary::stats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Stats {
    /// Live workers (not yet both disconnected and exited), by id.
    pub workers: Vec<WorkerStats>,
    /// Workers forked since start.
    pub forked: u64,
    /// Workers started by the respawn policy.
    pub respawns: u64,
}

/// One worker in [`Stats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Worker id.
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Time since its fork.
    pub uptime: Duration,
    /// Connections the primary handed it (round-robin) and it took.
    pub connections: u64,
    /// Typed messages it sent to the primary.
    pub messages_in: u64,
    /// Typed messages the primary sent it.
    pub messages_out: u64,
}

/// A table, one worker per line.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} workers, {} forked, {} respawned",
            self.workers.len(),
            self.forked,
            self.respawns
        )?;
        writeln!(
            f,
            "{:>4} {:>8} {:>12} {:>10} {:>12} {:>10} {:>10}",
            "id", "pid", "state", "uptime", "connections", "msgs in", "msgs out"
        )?;
        for w in &self.workers {
            writeln!(
                f,
                "{:>4} {:>8} {:>12} {:>9}s {:>12} {:>10} {:>10}",
                w.id,
                w.pid,
                w.state.to_string(),
                w.uptime.as_secs(),
                w.connections,
                w.messages_in,
                w.messages_out
            )?;
        }
        Ok(())
    }
}

/// The primary's handle on one worker (Node's `Worker` in the primary).
pub struct WorkerRef<W = ()> {
    pub(crate) shared: Arc<WorkerShared>,
    _w: PhantomData<fn(W)>,
}

impl<W> Clone for WorkerRef<W> {
    fn clone(&self) -> Self {
        WorkerRef {
            shared: self.shared.clone(),
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

pub(crate) struct WorkerShared {
    id: u32,
    pid: u32,
    pub(crate) outbox: Arc<Outbox>,
    st: Mutex<WState>,
    remove: Box<dyn Fn(u32) + Send + Sync>,
    stdout: Mutex<Option<ChildStdout>>,
    stderr: Mutex<Option<ChildStderr>>,
    started: Instant,
    /// The settings this worker was forked with.
    settings: Settings,
    msgs_in: AtomicU64,
    msgs_out: AtomicU64,
    conns: AtomicU64,
}

impl WorkerShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, WState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct WState {
    state: WorkerState,
    connected: bool,
    dead: bool,
    status: Option<ExitStatus>,
    voluntary: bool,
    exited_after_disconnect: Option<bool>,
    last_pong: Option<Instant>,
    last_error: Option<String>,
    /// A reload's replacement not yet ready: never respawned.
    probation: bool,
}

impl Default for WState {
    fn default() -> Self {
        WState {
            state: WorkerState::None,
            connected: true,
            dead: false,
            status: None,
            voluntary: false,
            exited_after_disconnect: None,
            last_pong: None,
            last_error: None,
            probation: false,
        }
    }
}

impl<W: Message> WorkerRef<W> {
    /// Sends a typed message to the worker, waiting while the messages it has not read yet
    /// hold [`Config::outbox_limit`] bytes (a worker that does not read pushes back on its own
    /// sender only). Fails when the channel is closed (the worker is dead or disconnected) or
    /// the message exceeds the frame limit; dropped before it is ready, it sends nothing.
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
        self.shared.msgs_out.fetch_add(1, Ordering::Relaxed);
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
            shared.msgs_out.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

impl<W> WorkerRef<W> {
    /// The worker's id: 1 for the first worker, never reused.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// Where the worker is in its life.
    pub fn state(&self) -> WorkerState {
        self.shared.lock().state
    }

    /// Whether the channel is open (Node's `isConnected()`).
    pub fn is_connected(&self) -> bool {
        self.shared.lock().connected
    }

    /// Whether the process has exited (Node's `isDead()`).
    pub fn is_dead(&self) -> bool {
        self.shared.lock().dead
    }

    /// `None` until the worker disconnects or exits; then `Some(true)` when it left on purpose
    /// (a `disconnect()` from either side, or its own `kill()`), `Some(false)` otherwise.
    pub fn exited_after_disconnect(&self) -> Option<bool> {
        self.shared.lock().exited_after_disconnect
    }

    /// What the worker reported just before it exited: the error its code returned, or its
    /// panic.
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().last_error.clone()
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.shared.lock().status
    }

    /// How long ago the worker was forked.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Typed messages received from and sent to this worker.
    pub fn message_counts(&self) -> (u64, u64) {
        (
            self.shared.msgs_in.load(Ordering::Relaxed),
            self.shared.msgs_out.load(Ordering::Relaxed),
        )
    }

    /// Asks the worker to close its servers and its channel, and removes it from
    /// [`Primary::workers`] at once. Once it is gone, `exited_after_disconnect()` is `Some(true)`.
    /// Repeated calls do nothing.
    pub fn disconnect(&self) -> &Self {
        {
            let mut st = self.shared.lock();
            if !st.connected || st.voluntary {
                return self;
            }
            st.voluntary = true;
        }
        let _ = self
            .shared
            .outbox
            .send(&Wire::<()>::Control(Control::Disconnect), vec![]);
        (self.shared.remove)(self.id());
        self
    }

    /// Sends SIGTERM at once, with no disconnect handshake (Node's `worker.kill()`); afterwards
    /// `exited_after_disconnect()` is `Some(false)` unless a disconnect came first.
    pub fn kill(&self) -> Result<(), Error> {
        self.kill_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends `signal` to the worker process at once.
    pub fn kill_with(&self, signal: nix::sys::signal::Signal) -> Result<(), Error> {
        if self.is_dead() || self.pid() == 0 {
            return Err(Error::new(
                ErrorKind::ChannelClosed,
                format!("worker {} has already exited", self.id()),
            ));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).map_err(|e| {
            Error::io(
                ErrorKind::Io,
                format!("cannot signal worker {}", self.id()),
                e.into(),
            )
        })
    }

    /// The worker's stdout, when [`Settings::silent`] was set at fork; once.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.shared
            .stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The worker's stderr, when [`Settings::silent`] was set at fork; once.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.shared
            .stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Keeps `Weak` in scope for the registry callback.
#[allow(dead_code)]
type RegistryRef<W> = Weak<Registry<W>>;
