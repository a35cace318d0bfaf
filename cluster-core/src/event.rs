//! Exit statuses and worker states: the values lifecycle events carry.

use std::fmt;

use crate::signal::Signal;

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
