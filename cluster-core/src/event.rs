//! Lifecycle events, exit statuses and worker states.

use std::fmt;
use std::os::fd::OwnedFd;

use crate::config::Settings;
use crate::error::Error;
use crate::net::ListenAddress;
use crate::primary::WorkerRef;
use crate::signal::Signal;

/// What happened in the cluster, in Node's order for each worker:
/// `Fork`, `Online`, `Listening` (once per server), then `Disconnect` and `Exit`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<P = (), W = ()> {
    /// A worker process was started.
    Fork {
        /// The worker.
        worker: WorkerRef<W>,
    },
    /// The worker's runtime started and passed the handshake; user code runs next.
    Online {
        /// The worker.
        worker: WorkerRef<W>,
    },
    /// A server in the worker is listening.
    Listening {
        /// The worker.
        worker: WorkerRef<W>,
        /// Where it listens; the real port, also for port 0.
        address: ListenAddress,
    },
    /// The channel to the worker has closed.
    Disconnect {
        /// The worker.
        worker: WorkerRef<W>,
    },
    /// The worker process has exited and was reaped.
    Exit {
        /// The worker.
        worker: WorkerRef<W>,
        /// Its exit code or the signal that ended it.
        status: ExitStatus,
    },
    /// A typed message from a worker.
    Message {
        /// The sender.
        worker: WorkerRef<W>,
        /// The message.
        msg: P,
        /// A descriptor sent with it, if any.
        handle: Option<OwnedFd>,
    },
    /// Something went wrong with a worker (a broken frame, a refused handshake) or in the primary.
    Error {
        /// The worker concerned, if any.
        worker: Option<WorkerRef<W>>,
        /// What went wrong.
        error: Error,
    },
    /// The settings changed through [`Primary::setup_primary`](crate::Primary::setup_primary).
    Setup {
        /// The settings now in force for later forks.
        settings: Settings,
    },
}

impl<P, W> Event<P, W> {
    /// The worker the event is about, if any.
    pub fn worker(&self) -> Option<&WorkerRef<W>> {
        match self {
            Event::Fork { worker }
            | Event::Online { worker }
            | Event::Listening { worker, .. }
            | Event::Disconnect { worker }
            | Event::Exit { worker, .. }
            | Event::Message { worker, .. } => Some(worker),
            Event::Error { worker, .. } => worker.as_ref(),
            Event::Setup { .. } => None,
        }
    }

    /// The event's name as Node spells it (`"fork"`, `"online"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Fork { .. } => "fork",
            Event::Online { .. } => "online",
            Event::Listening { .. } => "listening",
            Event::Disconnect { .. } => "disconnect",
            Event::Exit { .. } => "exit",
            Event::Message { .. } => "message",
            Event::Error { .. } => "error",
            Event::Setup { .. } => "setup",
        }
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it (the number).
    Signal(i32),
}

impl ExitStatus {
    pub(crate) fn from_std(s: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => ExitStatus::Code(c),
            (None, Some(sig)) => ExitStatus::Signal(sig),
            (None, None) => ExitStatus::Code(-1),
        }
    }

    /// The exit code, when it exited normally.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(c),
            ExitStatus::Signal(_) => None,
        }
    }

    /// The signal's name, such as `"SIGKILL"`, when a signal ended it.
    pub fn signal_name(self) -> Option<&'static str> {
        match self {
            ExitStatus::Signal(s) => Some(Signal::from_raw(s).name().unwrap_or("SIG?")),
            ExitStatus::Code(_) => None,
        }
    }

    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

/// The signal name (`SIGTERM`) or the exit code (`1`).
impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "{c}"),
            ExitStatus::Signal(_) => f.write_str(self.signal_name().unwrap_or("SIG?")),
        }
    }
}

/// Where a worker is in its life, as Node's `worker.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Forked; not online yet.
    None,
    /// Online: the handshake passed.
    Online,
    /// At least one server is listening.
    Listening,
    /// The channel closed.
    Disconnected,
    /// The process exited.
    Dead,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerState::None => "none",
            WorkerState::Online => "online",
            WorkerState::Listening => "listening",
            WorkerState::Disconnected => "disconnected",
            WorkerState::Dead => "dead",
        })
    }
}
