//! The error type of the runtime.

use std::fmt;
use std::io;

/// What went wrong, in a form a program can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Starting a worker process failed (missing binary, permissions, descriptor exhaustion).
    Spawn,
    /// The channel to the peer is closed: the worker is dead or disconnected.
    ChannelClosed,
    /// The channel holds as many unsent messages as its limit
    /// ([`Config::outbox_limit`](crate::Config::outbox_limit)) allows; `try_send` returns it
    /// where `send` would wait. Nothing was sent; try again once the peer has read.
    Full,
    /// A frame exceeded the configured maximum size.
    FrameTooLarge,
    /// Bytes on the channel that are not a valid frame or message.
    Malformed,
    /// The peer was built from other message types or another crate version.
    Handshake,
    /// A worker stopped answering heartbeats, or did not come online in time.
    Unresponsive,
    /// Too many workers failed within the crash-loop window; the cluster stops.
    CrashLoop,
    /// Binding a server failed.
    Bind,
    /// A full upgrade failed (the new primary did not start, exited, or its workers were not
    /// ready in time); the old primary and its workers serve on.
    Upgrade,
    /// The call is not allowed in the cluster's current state, such as changing the scheduling
    /// policy after the first fork (Node freezes it then). Nothing was changed.
    InvalidState,
    /// Any other I/O error.
    Io,
}

/// An error of the cluster runtime: a kind and a message that says what happened.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn io(kind: ErrorKind, message: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(source),
        }
    }

    pub(crate) fn closed(id: u32) -> Self {
        Error::new(
            ErrorKind::ChannelClosed,
            format!("the channel of worker {id} is closed"),
        )
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operating-system error behind this one, if any.
    pub fn os_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

impl Clone for Error {
    fn clone(&self) -> Self {
        Error {
            kind: self.kind,
            message: self.message.clone(),
            source: self
                .source
                .as_ref()
                .map(|e| io::Error::new(e.kind(), e.to_string())),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::ChannelClosed => io::ErrorKind::BrokenPipe,
            ErrorKind::FrameTooLarge | ErrorKind::Malformed => io::ErrorKind::InvalidData,
            _ => e.source.as_ref().map_or(io::ErrorKind::Other, |s| s.kind()),
        };
        io::Error::new(kind, e.to_string())
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
