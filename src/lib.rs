//! Node.js's `cluster`, for Rust: one attribute on `main` and a program uses every core, as a
//! primary process and worker processes that share server ports and exchange typed messages.
//!
//! ```no_run
//! use cluster::{Event, net::TcpListener};
//! use tokio::io::AsyncWriteExt;
//!
//! #[cluster::message]
//! enum ToPrimary {
//!     Served(u64),
//! }
//!
//! #[cluster::main(workers = "auto", messages(to_primary = ToPrimary))]
//! async fn main() -> std::io::Result<()> {
//!     #[primary(cluster)]
//!     {
//!         println!("Primary {} is running", std::process::id());
//!         while let Some(event) = cluster.next_event().await {
//!             match event {
//!                 Event::Message { worker, msg: ToPrimary::Served(n), .. } => {
//!                     println!("worker {} served {n}", worker.id())
//!                 }
//!                 Event::Exit { worker, status } => {
//!                     println!("worker {} died ({status})", worker.pid());
//!                 }
//!                 _ => {}
//!             }
//!         }
//!     }
//!     #[worker(worker)]
//!     {
//!         // Every worker binds the same port; the primary shares it.
//!         let listener = TcpListener::bind("127.0.0.1:8000").await?;
//!         let mut served = 0;
//!         while let Some(conn) = listener.next().await {
//!             let (mut stream, _) = conn?;
//!             stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n").await?;
//!             served += 1;
//!             let _ = worker.send(&ToPrimary::Served(served));
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! See the README for the mapping of every Node name to its Rust counterpart, the scheduling
//! policies and the signals the primary obeys.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(unix))]
compile_error!(
    "cluster supports Unix only (Linux first-class, macOS builds); Windows is out of scope"
);

extern crate self as cluster;

pub use cluster_core::{
    Config, Context, Error, ErrorKind, Event, ExitStatus, Flavor, Heartbeat, Message, Outcome,
    Primary, RespawnPolicy, Role, SchedulingPolicy, Settings, Signal, Stats, WORKER_ID_VAR, Worker,
    WorkerRef, WorkerState, WorkerStats, Workers, is_primary, is_worker, run, worker_id,
};

/// Turns `async fn main` into a cluster: a primary that forks workers, and the workers.
///
/// See the crate documentation and the README for the arguments.
pub use cluster_macros::main;

/// Makes a type a cluster message: serde derives plus a fingerprint of its definition.
pub use cluster_macros::message;

/// Listeners whose ports are shared by every worker.
pub mod net {
    pub use cluster_core::net::{ListenAddress, TcpListener, UdpSocket, UnixListener};
}

/// HTTP/1.1 serving with the reload and shutdown drain built in (feature `http`, on by default).
#[cfg(feature = "http")]
pub mod http {
    pub use cluster_core::http::{DrainOptions, serve, serve_with};
}

/// Not public API: the paths `#[cluster::main]` and `#[cluster::message]` expand to.
#[doc(hidden)]
pub mod __private {
    pub use cluster_core::__private::serde;
    pub use cluster_core::{
        Config, Context, Event, Flavor, Message, Primary, SchedulingPolicy, Workers, run,
    };
    pub use core::future::Future;
    pub use core::option::Option;

    /// What an `#[on(..)]` handler may return: nothing, or a result whose error is reported.
    #[diagnostic::on_unimplemented(
        message = "an `#[on(..)]` handler must return `()` or `Result<(), E>`",
        label = "this handler returns `{Self}`"
    )]
    pub trait HandlerOutput {
        /// Reports an error, if any, on stderr.
        fn report(self, handler: &str);
    }

    impl HandlerOutput for () {
        fn report(self, _: &str) {}
    }

    impl<E: core::fmt::Display> HandlerOutput for Result<(), E> {
        fn report(self, handler: &str) {
            if let Err(e) = self {
                eprintln!("cluster: handler `{handler}` failed: {e}");
            }
        }
    }
}

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
