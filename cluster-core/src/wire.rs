//! The one wire enum: the framework's control messages and the user's typed messages.

use serde::{Deserialize, Serialize};

/// The crate version both sides compare in the handshake.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A frame's payload. `Control` is the first variant, so the handshake decodes whatever the
/// user's types are, and a mismatch is reported rather than misread.
#[derive(Debug, Serialize, Deserialize)]
pub enum Wire<U> {
    /// A message of the framework.
    Control(Control),
    /// A message of the user's type; `handle` says a descriptor travels with it.
    User {
        /// The message.
        msg: U,
        /// Whether the frame carries a descriptor for the receiver.
        handle: bool,
    },
}

/// A server address as the channel carries it: the public [`ListenAddress`](crate::net::ListenAddress).
pub use crate::net::ListenAddress as BindAddr;

/// How the primary serves a key: the scheduling policy, as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyWire {
    /// The primary accepts and hands out connections.
    RoundRobin,
    /// Every worker gets the listening socket.
    Shared,
    /// One `SO_REUSEPORT` socket per worker slot.
    ReusePort,
}

/// What the primary granted for a server query.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Grant {
    /// Connections arrive as `Conn` frames for server `server`.
    RoundRobin {
        /// The primary's id for this server.
        server: u32,
    },
    /// The listening descriptor travels with the reply.
    Handle,
}

/// Control messages, both directions.
#[derive(Debug, Serialize, Deserialize)]
pub enum Control {
    /// Worker -> primary, first frame: who I am and what I was built with.
    Hello {
        /// The crate version of the worker.
        version: String,
        /// The fingerprint of the worker's message types.
        fingerprint: u64,
    },
    /// Primary -> worker: the handshake passed.
    Welcome,
    /// Primary -> worker: the handshake failed, and why.
    Refuse {
        /// A readable reason.
        reason: String,
    },
    /// Primary -> worker: close your servers and the channel; `within_ms`, when set, is how long
    /// the primary waits before it kills the worker (a shutdown's or a reload's grace), so the
    /// drain can finish inside it.
    Disconnect {
        /// The primary's grace, in milliseconds.
        within_ms: Option<u64>,
    },
    /// Worker -> primary: I am leaving on purpose (`exited_after_disconnect`).
    Disconnecting,
    /// Worker -> primary: give me the server for `key`.
    QueryServer {
        /// Request id, echoed in the reply.
        req: u32,
        /// What to listen on.
        addr: BindAddr,
        /// How many listeners this worker already has on `addr`.
        index: u32,
        /// The policy to serve it with.
        policy: PolicyWire,
        /// For a Unix socket: the permission bits of its file, when the worker chose them.
        mode: Option<u32>,
    },
    /// Primary -> worker: the answer to `QueryServer`.
    ServerReply {
        /// The request id.
        req: u32,
        /// The grant and the bound address, or the OS error and a message.
        result: Result<(Grant, BindAddr), (i32, String)>,
    },
    /// Primary -> worker: a connection for server `server` travels with this frame.
    Conn {
        /// The primary's server id.
        server: u32,
    },
    /// Worker -> primary: the user took `n` more connections of `server`.
    Accepted {
        /// The primary's server id.
        server: u32,
        /// How many.
        n: u32,
    },
    /// Worker -> primary: `n` more connections of `server` did not reach me (the kernel dropped
    /// them: I am at my descriptor limit). In stream order with `Accepted`: they are the next
    /// `n` the primary handed me; it gives them to another worker.
    Lost {
        /// The primary's server id.
        server: u32,
        /// How many.
        n: u32,
    },
    /// Worker -> primary: I am close to my descriptor limit; hand me no connections until
    /// `Room`.
    Full,
    /// Worker -> primary: I have room for connections again.
    Room,
    /// Worker -> primary: a server of mine is listening.
    Listening {
        /// Its address.
        addr: BindAddr,
    },
    /// Worker -> primary: I closed my listener on `addr` (index `index`).
    CloseServer {
        /// The address.
        addr: BindAddr,
        /// The index it was queried with.
        index: u32,
    },
    /// Either way: are you alive?
    Ping(u64),
    /// Either way: the answer to `Ping`.
    Pong(u64),
    /// Worker -> primary: why I am about to exit (the error my code returned, or a panic).
    Fatal {
        /// A readable message.
        message: String,
    },
    /// Worker -> primary: it accepted `n` more connections on sockets of its own (`shared`,
    /// `reuseport`); counts queued back to back merge into one frame.
    Served {
        /// How many.
        n: u32,
    },
}

impl Control {
    /// Whether this frame may pass user messages queued before it. True for those whose place
    /// among user messages means nothing and which must not wait behind them: connection
    /// hand-offs (a client is waiting), their acknowledgements (the primary holds the
    /// connection until then), heartbeats (a slow queue is not a dead peer), and the answer to
    /// a server query (the `Conn` frames that follow it must not arrive first). The others
    /// keep stream order: a `Disconnect` or `Fatal` speaks about the messages before it.
    pub(crate) fn may_overtake(&self) -> bool {
        matches!(
            self,
            Control::Conn { .. }
                | Control::Accepted { .. }
                | Control::Lost { .. }
                | Control::Full
                | Control::Room
                | Control::Ping(_)
                | Control::Pong(_)
                | Control::ServerReply { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a `Pong`, which a test fixture writes by hand as a raw worker would
    /// (`tests/fixtures/production.rs`, `stale_pongs`): a change here must change it too.
    #[test]
    fn a_pong_is_three_bytes_of_postcard() {
        let bytes = postcard::to_allocvec(&Wire::<()>::Control(Control::Pong(1))).unwrap();
        assert_eq!(bytes, [0, 15, 1]);
        // And of a `Ping` (`ping_flood` there).
        let bytes = postcard::to_allocvec(&Wire::<()>::Control(Control::Ping(7))).unwrap();
        assert_eq!(bytes, [0, 14, 7]);
    }
}
