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
//!             let _ = worker.send(&ToPrimary::Served(served)).await;
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
    BindPolicy, Config, Context, Error, ErrorKind, Event, ExitStatus, Flavor, Heartbeat, Message,
    Outcome, ParseSchedulingPolicyError, ParseSignalError, ParseWorkersError, Primary,
    RespawnPolicy, SchedulingPolicy, Settings, Signal, Stats, WORKER_ID_VAR, Worker, WorkerRef,
    WorkerState, WorkerStats, Workers, is_primary, is_worker, run, worker_id,
};

/// Turns `async fn main` into a cluster: a primary that forks workers, and the workers.
///
/// The body holds exactly one `#[primary(name)] { .. }` block, run only in the primary with
/// `name` bound to its [`Primary`] handle, and one `#[worker(name)] { .. }` block, run only in
/// workers with `name` bound to the worker's own [`Worker`] handle (`#[primary]` / `#[worker]`
/// without a name when the handle is not needed). Code before and after them runs in every
/// process. `#[on(event)] async fn ..` items in the primary block are event handlers: each takes
/// `&Primary` and the fields of its [`Event`] variant (`fork`, `online`, `listening`,
/// `disconnect`, `exit`, `message`, `error`, `setup`), and the macro appends the loop that calls
/// them.
///
/// # Arguments
///
/// | argument | default | accepted values | errors |
/// |---|---|---|---|
/// | `workers` | `"auto"` | `"auto"` (one per CPU, cgroup quota honoured) or an integer >= 1; `CLUSTER_WORKERS` overrides it at run time | `workers = 0`, `workers = "lots"`, `workers = "4"` (a string), a non-literal |
/// | `scheduling` | `"round-robin"` | `"round-robin"`, `"shared"`, `"reuseport"`; `CLUSTER_SCHED_POLICY` overrides it | any other string, a non-string |
/// | `messages(to_primary = T, to_worker = U)` | `()` for both | types with `#[cluster::message]` (each direction optional) | a type without `#[cluster::message]`, an unknown direction, not a list |
/// | `crate` | `"::cluster"` | the path of a renamed `cluster` dependency, as a string | not a string, a path that does not resolve |
///
/// An unknown or repeated argument is an error naming the accepted ones. The function must be
/// `async`, take no parameters and have no generics; a missing or repeated branch is an error on
/// `main`'s name or on the repeated attribute.
///
/// # Example
///
/// ```no_run
/// #[cluster::message]
/// enum ToPrimary {
///     Ready,
/// }
///
/// #[cluster::main(workers = 2, messages(to_primary = ToPrimary))]
/// async fn main() {
///     #[primary(cluster)]
///     {
///         while let Some(event) = cluster.next_event().await {
///             println!("{}", event.name());
///         }
///     }
///     #[worker(worker)]
///     {
///         worker.send(&ToPrimary::Ready).await.unwrap();
///     }
/// }
/// ```
///
/// # Equivalent code without `#[cluster::main]`
///
/// ```no_run
/// # #[cluster::message]
/// # enum ToPrimary { Ready }
/// async fn body(mut ctx: cluster::Context<ToPrimary, ()>) {
///     if let Some(cluster) = ctx.take_primary() {
///         while let Some(event) = cluster.next_event().await {
///             println!("{}", event.name());
///         }
///     }
///     if let Some(worker) = ctx.take_worker() {
///         worker.send(&ToPrimary::Ready).await.unwrap();
///     }
/// }
///
/// fn main() {
///     let config = cluster::Config { workers: cluster::Workers::Count(2), ..Default::default() };
///     // SAFETY: the first thing `main` does: no thread exists yet (see `cluster::run`).
///     unsafe { cluster::run(config, body) }
/// }
/// ```
pub use cluster_macros::main;

/// Makes a type a cluster message: serde derives plus a fingerprint of its definition.
///
/// Goes on an `enum` or a `struct` without generic parameters. It adds
/// `Serialize`/`Deserialize` (through this crate, so the user needs no serde dependency) and
/// implements [`Message`] with a fingerprint of the definition (doc comments excluded), which the
/// handshake compares so that a worker built with other message types is refused. The only
/// argument is `crate = "path"`, for a renamed dependency. The type must be `Send + 'static`.
///
/// ```
/// #[cluster::message]
/// #[derive(Debug, PartialEq)]
/// enum ToWorker {
///     Ping(u32),
///     Shutdown { grace_ms: u64 },
/// }
/// # use cluster::Message;
/// assert_ne!(ToWorker::FINGERPRINT, 0);
/// ```
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
    pub use cluster_core::__private::{run, serde};
    pub use cluster_core::{
        Config, Context, Event, Flavor, Message, Primary, SchedulingPolicy, Workers,
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
