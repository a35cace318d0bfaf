//! The supervisor: one task that owns the cluster's lifecycle state.
//!
//! It alone holds the registry of workers and their lifecycle, the settings (and the last that
//! started a worker that came online), the respawn and crash-loop state, the heartbeat, an
//! ongoing shutdown and the exit the process owes. It `select!`s over commands from the handles,
//! reports from the per-worker readers and process waiters, the heartbeat tick and its own
//! deadlines, and publishes what the handles read: a [`View`] of the cluster and a
//! [`Status`] per worker. It never waits on a worker or on the user: events go to the queue
//! without waiting, frames to a worker's outbox without waiting.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Interval;

use super::events::Event;
use super::events::EventTx;
use super::policy::{Fact, Life, Pulse, Respawn, Verdict, pulse};
use super::reader::{ReaderTask, Report};
use super::spawn::Launcher;
use super::worker_ref::{Status, WorkerRef, WorkerShared};
use crate::channel::{self, Reader};
use crate::config::{Config, Heartbeat, RespawnPolicy, SchedulingPolicy, Settings};
use crate::dispatch::Servers;
use crate::error::{Error, ErrorKind};
use crate::event::{ExitStatus, WorkerState};
use crate::message::Message;
use crate::wire::{Control, Wire};

/// How long the exit of a process waits for its channel to close, so that `Exit` follows the
/// messages the worker sent before it died, and its `Disconnect`.
const EXIT_WAITS_FOR_CHANNEL: Duration = Duration::from_secs(2);

/// A worker online this long without a server counts as ready (for `READY=1`).
const READY_WITHOUT_SERVER: Duration = Duration::from_millis(500);

/// After a forced stop, how long `main` has to return before the process exits anyway.
const EXIT_ANYWAY_AFTER: Duration = Duration::from_secs(5);

/// After the stragglers of a shutdown are killed, how long to wait for their exits.
const REAP_AFTER_KILL: Duration = Duration::from_secs(5);

/// How long a crash loop's shutdown lets workers finish.
const CRASH_LOOP_GRACE: Duration = Duration::from_secs(10);

/// Capacity of the command queue; a handle that finds it full waits (commands come from the
/// user's own code, never from a worker).
pub(crate) const COMMANDS: usize = 64;

/// Capacity of the readers' report queue. A reader that finds it full waits, and so stops
/// reading its worker's channel: a worker that floods the primary with pongs or lifecycle
/// frames is slowed down alone.
pub(crate) const REPORTS: usize = 256;

/// Where a reload's outcome goes.
pub(crate) type ReloadReply = oneshot::Sender<Result<(), Error>>;

/// Where an upgrade's outcome goes: the new primary's pid.
pub(crate) type UpgradeReply = oneshot::Sender<Result<u32, Error>>;

/// Where a scale request's outcome goes: the workers it forked.
pub(crate) type ScaleReply<W> = oneshot::Sender<Result<Vec<WorkerRef<W>>, Error>>;

/// A worker count asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scale {
    /// Exactly this many connected workers.
    To(usize),
    /// This many more (or fewer) than are connected when it applies.
    By(isize),
}

impl Scale {
    /// This request, then `next`: one request with the effect of both.
    fn then(self, next: Scale) -> Scale {
        match (self, next) {
            (_, Scale::To(n)) => Scale::To(n),
            (Scale::To(n), Scale::By(d)) => Scale::To(n.saturating_add_signed(d)),
            (Scale::By(a), Scale::By(b)) => Scale::By(a.saturating_add(b)),
        }
    }
}

/// What a handle asks of the supervisor; each carries its reply.
pub(crate) enum Command<W> {
    /// Fork the configured workers, once (the first use of a handle).
    Start,
    /// Nothing: the reply says every earlier command is done.
    Sync {
        reply: oneshot::Sender<()>,
    },
    Fork {
        env: Vec<(OsString, OsString)>,
        /// A reload's replacement: until [`Command::Trust`], its death is the reload's to
        /// report, not a crash to respawn.
        probation: bool,
        /// Under `reuseport`, the worker whose socket slot the new one shares.
        inherit: Option<u32>,
        reply: oneshot::Sender<Result<WorkerRef<W>, Error>>,
    },
    Trust {
        id: u32,
    },
    Setup {
        settings: Settings,
        reply: oneshot::Sender<()>,
    },
    /// Back to the settings of the last worker that came online (a failed reload).
    RestoreSettings,
    SetPolicy {
        policy: SchedulingPolicy,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Respawn {
        policy: Option<RespawnPolicy>,
        reply: oneshot::Sender<()>,
    },
    Heartbeat {
        heartbeat: Heartbeat,
        reply: oneshot::Sender<()>,
    },
    /// A rolling reload (see [`Primary::reload`](crate::Primary::reload)).
    Reload {
        grace: Duration,
        reply: ReloadReply,
    },
    /// The running rollout ended.
    RolloutDone {
        result: Result<(), Error>,
    },
    /// A full upgrade (see [`Primary::upgrade`](crate::Primary::upgrade)).
    Upgrade {
        grace: Duration,
        reply: UpgradeReply,
    },
    /// The new primary of the running upgrade serves, or failed and is gone.
    UpgradeDone {
        result: Result<super::upgrade::Handover, Error>,
    },
    /// Set the worker count (after the running rollout, if one runs).
    Scale {
        to: Scale,
        reply: ScaleReply<W>,
    },
    /// Disconnect every worker and let the event stream end once all are gone.
    Close,
    /// [`Command::Close`], then SIGKILL whoever is left after `grace`; replies whether all
    /// left in time.
    Shutdown {
        grace: Duration,
        /// Stragglers make the process owe exit 1 (recorded before they are killed).
        owe_exit: bool,
        /// Exit the process if an exit is owed and `main` has not returned soon after.
        exit_after: bool,
        reply: Option<oneshot::Sender<bool>>,
    },
}

/// What the handles read of the cluster, published on every change.
#[derive(Debug)]
pub(crate) struct View<W> {
    /// Workers not yet both disconnected and exited, by id.
    pub(crate) workers: Vec<WorkerRef<W>>,
    pub(crate) settings: Settings,
    pub(crate) closing: bool,
    pub(crate) forked: u64,
    pub(crate) respawns: u64,
    /// The exit the process owes once `main` returns: code and last line.
    pub(crate) exit: Option<(i32, String)>,
}

impl<W> View<W> {
    /// The workers `Primary::workers` lists: those the user did not ask to leave.
    pub(crate) fn listed(&self) -> impl Iterator<Item = &WorkerRef<W>> {
        self.workers.iter().filter(|w| !w.leaving())
    }
}

impl<W> Default for View<W> {
    fn default() -> Self {
        View {
            workers: Vec::new(),
            settings: Settings::default(),
            closing: false,
            forked: 0,
            respawns: 0,
            exit: None,
        }
    }
}

struct Entry<W> {
    worker: WorkerRef<W>,
    status: watch::Sender<Status>,
    /// The settings it was forked with.
    settings: Settings,
    /// The worker said it leaves on purpose.
    said_leaving: bool,
    probation: bool,
    online_at: Option<Instant>,
    /// The process exited while its channel was open: the exit waits for the channel to close,
    /// until the deadline.
    exit_pending: Option<(ExitStatus, Instant)>,
}

impl<W> Entry<W> {
    fn life(&self) -> Life {
        self.status.borrow().life
    }

    fn voluntary(&self) -> bool {
        self.said_leaving || self.worker.leaving()
    }
}

/// An upgrade waiting for its new primary.
struct Upgrading {
    pid: u32,
    grace: Duration,
    replies: Vec<UpgradeReply>,
    /// Stops the new primary (a shutdown came first).
    cancel: Option<oneshot::Sender<()>>,
}

struct Stopping {
    kill_at: Instant,
    /// Set once the stragglers were killed: when to stop waiting for their exits.
    give_up_at: Option<Instant>,
    owe_exit: bool,
    exit_after: bool,
    replies: Vec<oneshot::Sender<bool>>,
    grace: Duration,
}

pub(crate) struct Supervisor<P, W> {
    config: Config,
    launcher: Launcher,
    fingerprint: u64,
    servers: Arc<Servers>,
    events: EventTx<P, W>,
    reports: mpsc::Sender<Report>,
    view: watch::Sender<View<W>>,

    entries: BTreeMap<u32, Entry<W>>,
    next_id: u32,
    settings: Settings,
    /// The settings of the last worker that came online: a failed reload returns to them.
    good_settings: Option<Settings>,
    /// The scheduling policy can no longer change (a fork or `setup_primary` happened).
    frozen: bool,
    closing: bool,
    /// Workers of the configured count not forked yet: they start on the first use of a
    /// handle, so the primary's own start-up code runs before any worker.
    initial: usize,
    /// The first workers, until all are ready (then the service manager hears `READY=1`).
    awaiting_ready: Option<Vec<u32>>,
    respawn: Option<Respawn>,
    respawns: u64,
    /// Forks the respawn policy owes, when.
    due_forks: Vec<Instant>,
    heartbeat: Option<(Heartbeat, Interval)>,
    ping_seq: u64,
    stopping: Option<Stopping>,
    exit: Option<(i32, String)>,
    exit_at: Option<Instant>,
    /// The callers of the rollout that runs, if one does.
    rollout: Option<Vec<ReloadReply>>,
    /// The reloads asked for while it runs: one more rollout, with the last grace asked for.
    next_rollout: Option<(Duration, Vec<ReloadReply>)>,
    /// Scale requests that came during a rollout, combined: applied when it ends.
    pending_scale: Option<(Scale, Vec<ScaleReply<W>>)>,
    /// The running upgrade.
    upgrade: Option<Upgrading>,
    /// The new primary serves: this one drains, and holds the status channel until it exits.
    handover: Option<super::upgrade::Handover>,
    /// To hand a rollout the command queue without keeping the supervisor alive by it.
    myself: mpsc::WeakSender<Command<W>>,
}

impl<P: Message, W: Message> Supervisor<P, W> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        initial: usize,
        fingerprint: u64,
        servers: Arc<Servers>,
        events: EventTx<P, W>,
        reports: mpsc::Sender<Report>,
        view: watch::Sender<View<W>>,
        myself: mpsc::WeakSender<Command<W>>,
    ) -> Self {
        Supervisor {
            config,
            launcher: Launcher::new(),
            fingerprint,
            servers,
            events,
            reports,
            view,
            entries: BTreeMap::new(),
            next_id: 1,
            settings: Settings::default(),
            good_settings: None,
            frozen: false,
            closing: false,
            initial,
            awaiting_ready: None,
            respawn: None,
            respawns: 0,
            due_forks: Vec::new(),
            heartbeat: None,
            ping_seq: 0,
            stopping: None,
            exit: None,
            exit_at: None,
            rollout: None,
            next_rollout: None,
            pending_scale: None,
            upgrade: None,
            handover: None,
            myself,
        }
    }

    /// Runs until every handle is gone and no worker is left.
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command<W>>,
        mut reports: mpsc::Receiver<Report>,
    ) {
        let mut handles = true;
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                // No `biased`: a worker flooding reports must not starve commands and timers.
                Some(report) = reports.recv() => self.on_report(report),
                command = commands.recv(), if handles => match command {
                    Some(command) => self.on_command(command),
                    None => handles = false,
                },
                _ = tick(&mut self.heartbeat) => self.on_heartbeat(),
                _ = sleep_until(deadline), if deadline.is_some() => self.on_deadline(),
            }
            if !handles && self.entries.is_empty() {
                return;
            }
        }
    }

    fn publish(&self) {
        let workers = self.entries.values().map(|e| e.worker.clone()).collect();
        self.view.send_replace(View {
            workers,
            settings: self.settings.clone(),
            closing: self.closing,
            forked: u64::from(self.next_id - 1),
            respawns: self.respawns,
            exit: self.exit.clone(),
        });
    }

    fn on_command(&mut self, command: Command<W>) {
        match command {
            Command::Start => self.start(),
            Command::Sync { reply } => {
                let _ = reply.send(());
            }
            Command::Fork {
                env,
                probation,
                inherit,
                reply,
            } => {
                // A rollout's replacement is never forked once the cluster is closing; a fork
                // of the user's opens the cluster again.
                let r = if probation && self.closing {
                    Err(super::rollout::cancelled())
                } else if self.stopping.is_some() {
                    Err(Error::new(
                        ErrorKind::InvalidState,
                        "the cluster is shutting down: no worker is forked until the shutdown ends",
                    ))
                } else {
                    self.closing = false;
                    self.fork(&env, probation, inherit)
                };
                let _ = reply.send(r);
            }
            Command::Reload { grace, reply } => {
                if self.closing {
                    let _ = reply.send(Err(super::rollout::cancelled()));
                } else if let Some(Upgrading { pid, .. }) = &self.upgrade {
                    let _ = reply.send(Err(Error::new(
                        ErrorKind::InvalidState,
                        format!(
                            "reload refused: an upgrade to a new primary (pid {pid}) is running"
                        ),
                    )));
                } else if self.rollout.is_some() {
                    let next = self.next_rollout.get_or_insert_with(|| (grace, Vec::new()));
                    next.0 = grace;
                    next.1.push(reply);
                } else {
                    self.start_rollout(grace, vec![reply]);
                }
            }
            Command::RolloutDone { result } => {
                match &result {
                    Ok(()) => {
                        tracing::info!("reload: done, every worker replaced");
                        self.launcher.promote();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload: failed");
                        self.launcher.discard_candidate();
                    }
                }
                for reply in self.rollout.take().into_iter().flatten() {
                    let copy = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Error::new(e.kind(), e.to_string())),
                    };
                    let _ = reply.send(copy);
                }
                if let Some((to, replies)) = self.pending_scale.take() {
                    self.scale(to, replies);
                }
                if let Some((grace, replies)) = self.next_rollout.take() {
                    self.start_rollout(grace, replies);
                }
            }
            Command::Upgrade { grace, reply } => match self.start_upgrade(grace) {
                Ok(()) => {
                    if let Some(u) = &mut self.upgrade {
                        u.replies.push(reply);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::UpgradeDone { result } => self.upgrade_done(result),
            Command::Scale { to, reply } => {
                if self.rollout.is_some() {
                    let (pending, mut replies) = self
                        .pending_scale
                        .take()
                        .map_or((to, Vec::new()), |(p, r)| (p.then(to), r));
                    replies.push(reply);
                    self.pending_scale = Some((pending, replies));
                } else {
                    self.scale(to, vec![reply]);
                }
            }
            Command::Trust { id } => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.probation = false;
                }
            }
            Command::Setup { settings, reply } => {
                self.set_settings(settings);
                let _ = reply.send(());
            }
            Command::RestoreSettings => {
                if let Some(good) = self.good_settings.clone() {
                    self.set_settings(good);
                }
            }
            Command::SetPolicy { policy, reply } => {
                let r = if self.frozen {
                    Err(Error::new(
                        ErrorKind::InvalidState,
                        "the scheduling policy is frozen once the first worker is forked or `setup_primary` ran",
                    ))
                } else {
                    self.servers.set_policy(policy);
                    Ok(())
                };
                let _ = reply.send(r);
            }
            Command::Respawn { policy, reply } => {
                self.respawn = policy.map(Respawn::new);
                if self.respawn.is_none() {
                    self.due_forks.clear();
                }
                let _ = reply.send(());
            }
            Command::Heartbeat { heartbeat, reply } => {
                // `interval` refuses a zero period.
                let every = heartbeat.interval.max(Duration::from_millis(1));
                self.heartbeat = Some((heartbeat, tokio::time::interval(every)));
                let _ = reply.send(());
            }
            Command::Close => self.close(None),
            Command::Shutdown {
                grace,
                owe_exit,
                exit_after,
                reply,
            } => self.shutdown(grace, owe_exit, exit_after, reply),
        }
    }

    /// Forks or disconnects workers until `to` connected ones remain (the newest leave first).
    fn scale(&mut self, to: Scale, replies: Vec<ScaleReply<W>>) {
        if self.stopping.is_some() {
            for reply in replies {
                let _ = reply.send(Err(Error::new(
                    ErrorKind::InvalidState,
                    "the cluster is shutting down: its size does not change",
                )));
            }
            return;
        }
        let live: Vec<WorkerRef<W>> = self
            .entries
            .values()
            .filter(|e| e.life().connected() && !e.worker.leaving())
            .map(|e| e.worker.clone())
            .collect();
        let n = match to {
            Scale::To(n) => n,
            Scale::By(d) => live.len().saturating_add_signed(d),
        };
        let mut result = Ok(Vec::new());
        if live.len() < n {
            // As a fork of the user's, more workers open a closed cluster again.
            self.closing = false;
            for _ in live.len()..n {
                match self.fork(&[], false, None) {
                    Ok(w) => {
                        if let Ok(forked) = &mut result {
                            forked.push(w);
                        }
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        } else {
            for w in live.iter().rev().take(live.len() - n) {
                w.disconnect();
            }
            // Leaving workers are out of `workers()` at once.
            self.publish();
        }
        for reply in replies {
            let copy = match &result {
                Ok(forked) => Ok(forked.clone()),
                Err(e) => Err(Error::new(e.kind(), e.to_string())),
            };
            let _ = reply.send(copy);
        }
    }

    fn start_rollout(&mut self, grace: Duration, replies: Vec<ReloadReply>) {
        tracing::info!(workers = self.entries.len(), "reload: starting");
        let Some(commands) = self.myself.upgrade() else {
            return;
        };
        if let Err(e) = self.launcher.open_candidate() {
            tracing::error!(error = %e, "reload refused");
            for reply in replies {
                let _ = reply.send(Err(Error::new(e.kind(), e.to_string())));
            }
            return;
        }
        self.rollout = Some(replies);
        let rollout = super::rollout::Rollout {
            commands,
            view: self.view.subscribe(),
            grace,
        };
        tokio::spawn(rollout.run());
    }

    /// Starts the binary at the primary's path as a new primary, with every listening socket.
    fn start_upgrade(&mut self, grace: Duration) -> Result<(), Error> {
        let refused =
            |why: String| Error::new(ErrorKind::InvalidState, format!("upgrade refused: {why}"));
        if let Some(Upgrading { pid, .. }) = &self.upgrade {
            return Err(refused(format!(
                "an upgrade is already running (new primary pid {pid})"
            )));
        }
        if self.closing || self.stopping.is_some() {
            return Err(refused("the cluster is shutting down".to_owned()));
        }
        if self.rollout.is_some() {
            return Err(refused(
                "a rolling reload is running; ask again once it is done".to_owned(),
            ));
        }
        let Some(commands) = self.myself.upgrade() else {
            return Err(refused("the cluster's supervisor is stopping".to_owned()));
        };
        let path = super::upgrade::binary(self.launcher.path())?;
        let workers = self
            .entries
            .values()
            .filter(|e| e.life().connected() && !e.worker.leaving())
            .count();
        // systemd's sockets first, in use or not, then the cluster's own.
        let (mut sockets, ours): (Vec<_>, Vec<_>) =
            self.servers.sockets().into_iter().partition(|(_, s, _)| *s);
        let (spare_systemd, spare_ours): (Vec<_>, Vec<_>) = crate::systemd::unused()
            .into_iter()
            .partition(|(_, o, _)| *o == crate::systemd::Origin::Systemd);
        sockets.extend(spare_systemd.into_iter().map(|(fd, _, n)| (fd, true, n)));
        let from_systemd = sockets.len();
        sockets.extend(ours);
        sockets.extend(spare_ours.into_iter().map(|(fd, _, n)| (fd, false, n)));
        let names: Vec<_> = sockets
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, n))| Some((i, n.clone()?)))
            .collect();
        let fds: Vec<_> = sockets.into_iter().map(|(fd, _, _)| fd).collect();
        // From the fork on two primaries serve these sockets: neither may stop them taking
        // connections, shut them down or unlink them (a worker closing one meanwhile included).
        crate::systemd::lend(&fds);
        let started = super::upgrade::spawn(
            &path,
            workers,
            self.servers.policy(),
            &fds,
            from_systemd,
            &names,
        )
        .inspect_err(|_| crate::systemd::reclaim())?;
        crate::systemd::notify::reloading();
        let pid = started.pid;
        tracing::info!(
            new_primary.pid = pid,
            path = %path.display(),
            sockets = fds.len(),
            workers,
            "upgrade: started the new primary"
        );
        let (cancel, cancelled) = oneshot::channel();
        tokio::spawn(async move {
            let result = started.outcome(grace, cancelled).await;
            let _ = commands.send(Command::UpgradeDone { result }).await;
        });
        self.upgrade = Some(Upgrading {
            pid,
            grace,
            replies: Vec::new(),
            cancel: Some(cancel),
        });
        Ok(())
    }

    fn upgrade_done(&mut self, result: Result<super::upgrade::Handover, Error>) {
        let Some(Upgrading {
            pid,
            grace,
            replies,
            ..
        }) = self.upgrade.take()
        else {
            return;
        };
        let result = match result {
            // A shutdown came first: no hand-over; the new primary stops.
            Ok(_) if self.stopping.is_some() => {
                stop_by_pid(pid);
                Err(Error::new(
                    ErrorKind::Upgrade,
                    format!(
                        "upgrade cancelled: this primary is shutting down; the new primary (pid {pid}) is stopped too"
                    ),
                ))
            }
            other => other,
        };
        match result {
            Ok(handover) => {
                tracing::info!(
                    new_primary.pid = pid,
                    "upgrade: the new primary's workers are ready; this primary drains and exits"
                );
                crate::systemd::notify::hand_over(pid);
                self.handover = Some(handover);
                for reply in replies {
                    let _ = reply.send(Ok(pid));
                }
                self.shutdown(grace, true, true, None);
            }
            Err(e) => {
                crate::systemd::reclaim();
                crate::systemd::notify::ready();
                tracing::error!(new_primary.pid = pid, error = %e, "upgrade failed");
                for reply in replies {
                    let _ = reply.send(Err(Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }

    fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
        self.frozen = true;
        self.publish();
        self.events.emit(Event::Setup {
            settings: self.settings.clone(),
        });
    }

    fn start(&mut self) {
        let n = std::mem::take(&mut self.initial);
        if n == 0 {
            return;
        }
        let mut ids = Vec::new();
        for _ in 0..n {
            match self.fork(&[], false, None) {
                Ok(w) => ids.push(w.id()),
                Err(error) => self.events.emit(Event::Error {
                    worker: None,
                    error,
                }),
            }
        }
        self.awaiting_ready = Some(ids);
        self.check_ready();
    }

    fn fork(
        &mut self,
        env: &[(OsString, OsString)],
        probation: bool,
        inherit: Option<u32>,
    ) -> Result<WorkerRef<W>, Error> {
        self.frozen = true;
        let id = self.next_id;
        self.next_id += 1;
        if let Some(old) = inherit {
            // Under `reuseport` the replacement shares the old worker's socket, so connections
            // the kernel queued there are served, not reset when the old one leaves.
            self.servers.inherit_slot(id, old);
        }
        let mut spawned = match self.launcher.spawn(id, &self.settings, env, probation) {
            Ok(s) => s,
            Err(e) => {
                self.servers.worker_gone(id);
                self.publish();
                return Err(e);
            }
        };
        let outbox = channel::spawn_writer(
            spawned.stream.clone(),
            self.config.max_frame,
            self.config.outbox_limit,
        );
        let (status, status_rx) = watch::channel(Status {
            life: Life::Forked,
            exited_after_disconnect: None,
            last_error: None,
        });
        let (mut stdout, mut stderr) = (spawned.child.stdout.take(), spawned.child.stderr.take());
        if let (false, Some(template)) = (self.settings.silent, &self.settings.log_prefix) {
            let prefix = super::logs::prefix(template, id);
            if let Some(fd) = stdout.take().and_then(|s| s.into_owned_fd().ok()) {
                super::logs::copy(fd, super::logs::Stream::Stdout, prefix.clone());
            }
            if let Some(fd) = stderr.take().and_then(|s| s.into_owned_fd().ok()) {
                super::logs::copy(fd, super::logs::Stream::Stderr, prefix);
            }
        }
        let shared = WorkerShared::new(
            id,
            spawned.pid,
            outbox,
            self.servers.clone(),
            status_rx,
            stdout,
            stderr,
        );
        let worker = WorkerRef::new(Arc::new(shared));
        self.entries.insert(
            id,
            Entry {
                worker: worker.clone(),
                status,
                settings: self.settings.clone(),
                said_leaving: false,
                probation,
                online_at: None,
                exit_pending: None,
            },
        );
        self.publish();
        self.events.emit(Event::Fork {
            worker: worker.at(WorkerState::None),
        });

        let reader = ReaderTask {
            worker: worker.clone(),
            reader: Reader::new(spawned.stream, self.config.max_frame),
            events: self.events.clone(),
            reports: self.reports.clone(),
            servers: self.servers.clone(),
            rules: Arc::new(crate::dispatch::BindRules::new(
                self.settings.bind.clone(),
                spawned.user.take(),
            )),
            fingerprint: self.fingerprint,
            budget: super::events::budget(self.config.outbox_limit),
            limit: self.config.outbox_limit,
        };
        tokio::spawn(reader.run());
        let reports = self.reports.clone();
        let mut child = spawned.child;
        let waited = worker.shared.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => ExitStatus::from_std(s),
                Err(_) => ExitStatus::Code(-1),
            };
            // Reaped: no signal may go to this pid any more.
            waited
                .reaped
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = reports.send(Report::Exited { id, status }).await;
        });
        Ok(worker)
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Online { id, ack } => {
                if let Some(e) = self.entries.get_mut(&id) {
                    if let Some(life) = e.life().next(Fact::Online) {
                        let now = Instant::now();
                        e.status.send_modify(|s| s.life = life);
                        e.online_at = Some(now);
                        // These settings start workers that work: a failed reload returns
                        // to them.
                        self.good_settings = Some(e.settings.clone());
                        self.events.emit(Event::Online {
                            worker: e.worker.at(life.state()),
                        });
                    }
                }
                let _ = ack.send(());
                self.check_ready();
            }
            Report::Listening { id, address, ack } => {
                if let Some(e) = self.entries.get_mut(&id) {
                    let life = e.life();
                    // A worker may listen on several servers: one event each.
                    if let Some(next) = life.next(Fact::Listening) {
                        e.status.send_modify(|s| s.life = next);
                    }
                    let life = e.life();
                    if life.connected() {
                        self.events.emit(Event::Listening {
                            worker: e.worker.at(life.state()),
                            address,
                        });
                    }
                }
                let _ = ack.send(());
                self.check_ready();
            }
            Report::Fatal { id, message } => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.status.send_modify(|s| s.last_error = Some(message));
                }
            }
            Report::Disconnecting { id } => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.said_leaving = true;
                }
            }
            Report::Closed { id, error } => {
                if let Some(error) = error {
                    let worker = self.entries.get(&id).map(|e| e.worker.current());
                    self.events.emit(Event::Error { worker, error });
                }
                self.disconnected(id);
                let pending = self.entries.get(&id).and_then(|e| e.exit_pending);
                if let Some((status, _)) = pending {
                    self.exited(id, status);
                }
            }
            Report::Exited { id, status } => {
                let Some(e) = self.entries.get_mut(&id) else {
                    return;
                };
                if e.life().connected() {
                    e.exit_pending = Some((status, later(EXIT_WAITS_FOR_CHANNEL)));
                } else {
                    self.exited(id, status);
                }
            }
        }
    }

    /// The channel of worker `id` closed.
    fn disconnected(&mut self, id: u32) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let Some(life) = e.life().next(Fact::Disconnected) else {
            return;
        };
        let voluntary = e.voluntary();
        e.status.send_modify(|s| {
            s.life = life;
            s.exited_after_disconnect = Some(voluntary);
        });
        e.worker.shared.outbox.abort();
        let worker = e.worker.at(life.state());
        self.servers.worker_gone(id);
        self.events.emit(Event::Disconnect { worker });
        self.check_ready();
    }

    /// The process of worker `id` exited, and its channel is closed or waited for long enough.
    fn exited(&mut self, id: u32, status: ExitStatus) {
        // A channel that outlived the wait: the worker is gone all the same.
        self.disconnected(id);
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        let voluntary = e.voluntary();
        let life = e
            .life()
            .next(Fact::Exited(status))
            .unwrap_or(Life::Dead(status));
        e.status.send_modify(|s| {
            s.life = life;
            s.exited_after_disconnect = Some(voluntary);
        });
        self.events.emit(Event::Exit {
            worker: e.worker.at(life.state()),
            status,
        });
        // After the last event is queued: a `next_event` that ends the stream once nobody is
        // left cannot miss it.
        self.publish();
        if !(voluntary || e.probation || self.closing) {
            self.after_crash(&e.worker, status, e.online_at.is_some());
        }
        self.check_ready();
        self.check_stopped();
    }

    /// Applies the respawn policy after an unplanned exit.
    fn after_crash(&mut self, w: &WorkerRef<W>, status: ExitStatus, was_online: bool) {
        let Some(respawn) = self.respawn.as_mut() else {
            return;
        };
        let now = Instant::now();
        match respawn.on_crash(now, w.uptime(), was_online, self.entries.len()) {
            Verdict::RespawnAfter(delay) => {
                tracing::info!(
                    worker.id = w.id(),
                    worker.pid = w.pid(),
                    delay_ms = delay.as_millis() as u64,
                    "respawning worker"
                );
                self.due_forks.push(later(delay));
            }
            Verdict::CrashLoop { crashes } => {
                let window = respawn.policy().crash_window;
                self.respawn = None;
                self.due_forks.clear();
                let last = w
                    .last_error()
                    .unwrap_or_else(|| format!("exited with status {status}"));
                let message = format!(
                    "crash loop: {crashes} workers failed within {}s; stopping the cluster. Last error (worker {}): {}",
                    window.as_secs(),
                    w.id(),
                    last.replace('\n', "; ")
                );
                self.events.emit(Event::Error {
                    worker: None,
                    error: Error::new(ErrorKind::CrashLoop, message.clone()),
                });
                self.owe_exit(1, message);
                self.shutdown(CRASH_LOOP_GRACE, false, true, None);
            }
        }
    }

    fn owe_exit(&mut self, code: i32, message: String) {
        if self.exit.is_none() {
            self.exit = Some((code, message));
            self.publish();
        }
    }

    /// Disconnects every worker; `grace` is how long they have before they are killed, if
    /// that is so.
    fn close(&mut self, grace: Option<Duration>) {
        self.initial = 0;
        self.closing = true;
        self.due_forks.clear();
        // The running rollout sees `closing` and stops; the one that would follow never starts,
        // nor does a scale that waited for it.
        for reply in self.next_rollout.take().into_iter().flat_map(|(_, r)| r) {
            let _ = reply.send(Err(super::rollout::cancelled()));
        }
        for reply in self.pending_scale.take().into_iter().flat_map(|(_, r)| r) {
            let _ = reply.send(Err(super::rollout::cancelled()));
        }
        // Nobody will serve the shared ports: they stop taking new connections first, so the
        // workers can accept what is queued on them and close them empty. Under round-robin
        // the primary accepts what is queued and the workers take it before they are told to
        // leave (after the disconnect they take no more).
        let settle = self.servers.before_close();
        for e in self.entries.values() {
            if e.life().connected() {
                match settle {
                    Some(settle) => e.worker.disconnect_after(grace, settle),
                    None => e.worker.disconnect_within(grace),
                }
            }
        }
        // Wakes a `next_event` that waits: with no worker left it must now end.
        self.publish();
    }

    fn shutdown(
        &mut self,
        grace: Duration,
        owe_exit: bool,
        exit_after: bool,
        reply: Option<oneshot::Sender<bool>>,
    ) {
        if let Some(u) = &mut self.upgrade {
            // The new primary of a running upgrade goes too: its task stops (SIGTERM, then
            // SIGKILL) and reaps it.
            if let Some(cancel) = u.cancel.take() {
                let _ = cancel.send(());
            }
        }
        if self.stopping.is_none() {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                workers = self.entries.len(),
                "shutdown: disconnecting every worker"
            );
        }
        crate::systemd::notify::stopping();
        self.close(Some(grace));
        let kill_at = later(grace);
        match &mut self.stopping {
            Some(s) => {
                // A second, shorter shutdown (a second SIGINT) hurries the first.
                if kill_at < s.kill_at && s.give_up_at.is_none() {
                    s.kill_at = kill_at;
                    s.grace = grace;
                }
                s.owe_exit |= owe_exit;
                s.exit_after |= exit_after;
                s.replies.extend(reply);
            }
            None => {
                self.stopping = Some(Stopping {
                    kill_at,
                    give_up_at: None,
                    owe_exit,
                    exit_after,
                    replies: reply.into_iter().collect(),
                    grace,
                })
            }
        }
        self.check_stopped();
    }

    /// Ends a shutdown once nobody is left.
    fn check_stopped(&mut self) {
        if self.entries.is_empty() && self.stopping.is_some() {
            let clean = self
                .stopping
                .as_ref()
                .is_some_and(|s| s.give_up_at.is_none());
            self.stopped(clean);
        }
    }

    fn stopped(&mut self, clean: bool) {
        let Some(s) = self.stopping.take() else {
            return;
        };
        if clean {
            tracing::info!("shutdown: done, every worker left in time");
        } else {
            tracing::warn!("shutdown: done, stragglers were killed");
        }
        for r in s.replies {
            let _ = r.send(clean);
        }
        if s.exit_after && self.exit.is_some() {
            // `main` normally returns now that the event stream ended; if it does not,
            // exit anyway.
            self.exit_at = Some(Instant::now() + EXIT_ANYWAY_AFTER);
        }
    }

    fn on_heartbeat(&mut self) {
        let Some((hb, _)) = &self.heartbeat else {
            return;
        };
        let hb = *hb;
        self.ping_seq += 1;
        let mut unresponsive = Vec::new();
        for e in self.entries.values() {
            let w = &e.worker;
            // A worker whose messages wait for the user cannot be heard either: not its fault.
            let since = if w.shared.parked.load(std::sync::atomic::Ordering::Relaxed) {
                Duration::ZERO
            } else {
                w.shared.since_heard()
            };
            match pulse(&hb, e.life(), w.uptime(), since) {
                Pulse::Skip => {}
                Pulse::Ping => {
                    w.shared
                        .last_ping
                        .store(self.ping_seq, std::sync::atomic::Ordering::Relaxed);
                    let _ = w
                        .shared
                        .outbox
                        .send(&Wire::<()>::Control(Control::Ping(self.ping_seq)), vec![]);
                }
                Pulse::NoBoot => unresponsive.push((
                    w.clone(),
                    format!(
                        "worker {} did not come online within {}s of its fork; killing it",
                        w.id(),
                        hb.boot_timeout.as_secs()
                    ),
                )),
                Pulse::Silent => unresponsive.push((
                    w.clone(),
                    format!(
                        "worker {} did not answer heartbeats for {}s; killing it",
                        w.id(),
                        hb.timeout.as_secs()
                    ),
                )),
            }
        }
        for (w, message) in unresponsive {
            self.events.emit(Event::Error {
                worker: Some(w.clone()),
                error: Error::new(ErrorKind::Unresponsive, message),
            });
            // The respawn policy, if any, replaces it.
            let _ = w.kill_with(crate::signal::Signal::SIGKILL);
        }
    }

    /// The earliest of the supervisor's own deadlines.
    fn next_deadline(&self) -> Option<Instant> {
        let forks = self.due_forks.iter().copied();
        let exits = self
            .entries
            .values()
            .filter_map(|e| e.exit_pending.map(|(_, at)| at));
        let ready = self.awaiting_ready.iter().flatten().filter_map(|id| {
            let e = self.entries.get(id)?;
            (e.life() == Life::Online)
                .then_some(e.online_at? + READY_WITHOUT_SERVER + Duration::from_millis(1))
        });
        let stop = self
            .stopping
            .as_ref()
            .map(|s| s.give_up_at.unwrap_or(s.kill_at));
        forks
            .chain(exits)
            .chain(ready)
            .chain(stop)
            .chain(self.exit_at)
            .min()
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        let due = self.due_forks.iter().filter(|t| **t <= now).count();
        self.due_forks.retain(|t| *t > now);
        for _ in 0..due {
            if self.closing {
                break;
            }
            self.respawns += 1;
            if let Err(error) = self.fork(&[], false, None) {
                self.events.emit(Event::Error {
                    worker: None,
                    error,
                });
            }
        }
        // The reader of a worker whose messages wait for the user still has them to deliver:
        // its exit waits on, or `Exit` would overtake them.
        for e in self.entries.values_mut() {
            if let Some((status, at)) = e.exit_pending
                && at <= now
                && e.worker
                    .shared
                    .parked
                    .load(std::sync::atomic::Ordering::Relaxed)
            {
                e.exit_pending = Some((status, later(EXIT_WAITS_FOR_CHANNEL)));
            }
        }
        let late: Vec<(u32, ExitStatus)> = self
            .entries
            .iter()
            .filter_map(|(id, e)| match e.exit_pending {
                Some((status, at)) if at <= now => Some((*id, status)),
                _ => None,
            })
            .collect();
        for (id, status) in late {
            self.exited(id, status);
        }
        self.check_ready();
        if let Some(s) = &mut self.stopping {
            match s.give_up_at {
                None if s.kill_at <= now => {
                    s.give_up_at = Some(now + REAP_AFTER_KILL);
                    let (owe, grace) = (s.owe_exit, s.grace);
                    if owe {
                        self.owe_exit(
                            1,
                            format!(
                                "shutdown did not finish within {grace:?}; the remaining workers were killed"
                            ),
                        );
                    }
                    for e in self.entries.values() {
                        let _ = e.worker.kill_with(crate::signal::Signal::SIGKILL);
                    }
                }
                Some(at) if at <= now => self.stopped(false),
                _ => {}
            }
        }
        if self.exit_at.is_some_and(|at| at <= now) {
            if let Some((code, message)) = &self.exit {
                eprintln!("cluster: {message}");
                std::process::exit(*code);
            }
            self.exit_at = None;
        }
    }

    /// Tells a service manager we serve once the first workers are ready: listening, or online
    /// for a moment without a server, or gone.
    fn check_ready(&mut self) {
        let Some(ids) = &self.awaiting_ready else {
            return;
        };
        let mut gone = None;
        // The new primary of an upgrade whose old workers served sockets: its own must listen.
        let must_listen = super::upgrade::must_listen();
        let ready = ids.iter().all(|id| match self.entries.get(id) {
            None => {
                gone.get_or_insert(*id);
                true
            }
            Some(e) => match e.life() {
                Life::Listening => true,
                Life::Online => {
                    !must_listen
                        && e.online_at
                            .is_some_and(|t| t.elapsed() > READY_WITHOUT_SERVER)
                }
                _ => false,
            },
        });
        if ready {
            self.awaiting_ready = None;
            crate::systemd::notify::ready();
            // The new primary of an upgrade tells the old one.
            super::upgrade::settled(
                gone.map(|id| format!("its worker {id} exited before it was ready")),
            );
        }
    }
}

/// SIGTERM to the new primary of an upgrade whose hand-over came too late (its `Child` is
/// still held, so the pid is not reaped and cannot be another process's).
fn stop_by_pid(pid: u32) {
    if pid != 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// `now + d`, or a deadline far enough to mean never when that overflows (`Duration::MAX`).
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

async fn tick(heartbeat: &mut Option<(Heartbeat, Interval)>) {
    match heartbeat {
        Some((_, interval)) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
