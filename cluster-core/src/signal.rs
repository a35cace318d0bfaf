//! Unix signals, by number: what [`WorkerRef::kill_with`](crate::WorkerRef::kill_with) sends.

use std::fmt;
use std::str::FromStr;

use nix::libc;

/// A Unix signal, such as [`Signal::SIGTERM`].
///
/// A number as the platform defines it; the common signals are associated constants, and
/// [`from_raw`](Signal::from_raw) takes any other (real-time signals included). The kernel is
/// the judge of a number: sending one it does not know fails with `EINVAL`.
///
/// ```
/// use cluster_core::Signal;
///
/// assert_eq!(Signal::SIGKILL.name(), Some("SIGKILL"));
/// assert_eq!("SIGTERM".parse::<Signal>(), Ok(Signal::SIGTERM));
/// assert_eq!("HUP".parse::<Signal>(), Ok(Signal::SIGHUP));
/// assert_eq!(Signal::from_raw(Signal::SIGINT.as_raw()), Signal::SIGINT);
/// assert_eq!(Signal::SIGUSR2.to_string(), "SIGUSR2");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(i32);

macro_rules! signals {
    ($($(#[$doc:meta])* $name:ident = $value:ident,)*) => {
        impl Signal {
            $(
                $(#[$doc])*
                pub const $name: Signal = Signal(libc::$value);
            )*

            /// The signal's name, such as `"SIGTERM"`, when it is one of the constants above.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $(libc::$value => Some(stringify!($name)),)*
                    _ => None,
                }
            }

            fn from_name(name: &str) -> Option<Signal> {
                match name {
                    $(stringify!($name) => Some(Signal::$name),)*
                    _ => None,
                }
            }
        }
    };
}

signals! {
    /// Hang-up; the primary's rolling reload.
    SIGHUP = SIGHUP,
    /// Interrupt (Ctrl-C); the primary's graceful stop.
    SIGINT = SIGINT,
    /// Quit; the primary's graceful stop.
    SIGQUIT = SIGQUIT,
    /// Illegal instruction.
    SIGILL = SIGILL,
    /// Trace or breakpoint trap.
    SIGTRAP = SIGTRAP,
    /// Abort (`abort()`).
    SIGABRT = SIGABRT,
    /// Bus error.
    SIGBUS = SIGBUS,
    /// Arithmetic error.
    SIGFPE = SIGFPE,
    /// Kill: cannot be caught or ignored.
    SIGKILL = SIGKILL,
    /// User-defined signal 1; the primary reopens its logs.
    SIGUSR1 = SIGUSR1,
    /// Invalid memory reference.
    SIGSEGV = SIGSEGV,
    /// User-defined signal 2; the primary's full upgrade.
    SIGUSR2 = SIGUSR2,
    /// Write to a pipe with no reader.
    SIGPIPE = SIGPIPE,
    /// Timer (`alarm()`).
    SIGALRM = SIGALRM,
    /// Termination: what `WorkerRef::kill` sends; the primary's graceful stop.
    SIGTERM = SIGTERM,
    /// A child stopped or exited.
    SIGCHLD = SIGCHLD,
    /// Continue if stopped.
    SIGCONT = SIGCONT,
    /// Stop: cannot be caught or ignored.
    SIGSTOP = SIGSTOP,
    /// Stop from the terminal (Ctrl-Z).
    SIGTSTP = SIGTSTP,
    /// Terminal input for a background process; the primary starts one worker more.
    SIGTTIN = SIGTTIN,
    /// Terminal output for a background process; the primary stops one worker.
    SIGTTOU = SIGTTOU,
    /// Urgent data on a socket.
    SIGURG = SIGURG,
    /// CPU time limit exceeded.
    SIGXCPU = SIGXCPU,
    /// File size limit exceeded.
    SIGXFSZ = SIGXFSZ,
    /// Virtual timer expired.
    SIGVTALRM = SIGVTALRM,
    /// Profiling timer expired.
    SIGPROF = SIGPROF,
    /// The terminal's window size changed.
    SIGWINCH = SIGWINCH,
    /// I/O is possible on a descriptor.
    SIGIO = SIGIO,
    /// Bad system call.
    SIGSYS = SIGSYS,
}

impl Signal {
    /// The signal with this number, as the platform numbers them; any number is accepted.
    pub const fn from_raw(signal: i32) -> Signal {
        Signal(signal)
    }

    /// The signal's number.
    pub const fn as_raw(self) -> i32 {
        self.0
    }

    /// The same signal as nix knows it; `EINVAL` for a number nix has no name for (a real-time
    /// signal, or none at all).
    pub(crate) fn to_nix(self) -> nix::Result<nix::sys::signal::Signal> {
        nix::sys::signal::Signal::try_from(self.0)
    }
}

/// The name (`SIGTERM`), or `signal <n>` for a number without one.
impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "signal {}", self.0),
        }
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Signal({})", self.0),
        }
    }
}

/// The name, with or without `SIG` (`SIGTERM`, `TERM`), as `kill -s` takes it.
impl FromStr for Signal {
    type Err = ParseSignalError;

    fn from_str(s: &str) -> Result<Signal, ParseSignalError> {
        let t = s.trim();
        let found = match t.strip_prefix("SIG") {
            Some(_) => Signal::from_name(t),
            None => Signal::from_name(&format!("SIG{t}")),
        };
        found.ok_or_else(|| ParseSignalError(t.to_owned()))
    }
}

/// A string that names no signal, from [`Signal`]'s `FromStr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSignalError(String);

impl fmt::Display for ParseSignalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown signal `{}`; expected a name such as `SIGTERM` or `TERM`",
            self.0
        )
    }
}

impl std::error::Error for ParseSignalError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_nix() {
        for n in 1..32 {
            let s = Signal::from_raw(n);
            if let Some(name) = s.name() {
                assert_eq!(name.parse::<Signal>(), Ok(s));
                assert_eq!(s.to_nix().map(|n| n.as_str()), Ok(name));
            }
        }
        assert_eq!(Signal::SIGKILL.as_raw(), 9);
        assert_eq!(Signal::SIGTERM.as_raw(), 15);
    }

    #[test]
    fn unknown_signals_are_reported() {
        assert_eq!(Signal::from_raw(1000).name(), None);
        assert_eq!(Signal::from_raw(1000).to_string(), "signal 1000");
        assert!(Signal::from_raw(1000).to_nix().is_err());
        let e = "SIGNOPE".parse::<Signal>().unwrap_err();
        assert!(e.to_string().contains("`SIGNOPE`"));
        assert!("".parse::<Signal>().is_err());
    }
}
