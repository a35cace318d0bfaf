//! The runtime of the [`cluster`](https://docs.rs/cluster) crate: worker processes, the typed
//! channel between them and the primary, shared server ports and lifecycle events.
//!
//! Most programs use it through `#[cluster::main]`; everything here also works without the
//! macro:
//!
//! ```no_run
//! use cluster_core::{Config, Context, Event, run};
//!
//! async fn body(mut ctx: Context<(), ()>) {
//!     if let Some(cluster) = ctx.take_primary() {
//!         while let Some(event) = cluster.next_event().await {
//!             if let Event::Exit { worker, status } = event {
//!                 println!("worker {} exited ({status})", worker.id());
//!             }
//!         }
//!     }
//!     if let Some(worker) = ctx.take_worker() {
//!         println!("worker {} started", worker.id());
//!     }
//! }
//!
//! fn main() {
//!     // SAFETY: the first thing `main` does: no thread exists yet.
//!     unsafe { run(Config::default(), body) }
//! }
//! ```
#![deny(missing_docs)]

#[cfg(not(unix))]
compile_error!(
    "cluster supports Unix only (Linux first-class, macOS builds); Windows is out of scope"
);

mod channel;
mod config;
mod dispatch;
mod error;
mod event;
mod frame;
#[cfg(feature = "http")]
pub mod http;
mod message;
pub mod net;
mod primary;
mod room;
mod run;
mod signal;
mod socket;
mod sys;
mod systemd;
mod wire;
mod worker;

pub use config::{
    BindPolicy, Config, Flavor, Heartbeat, ParseSchedulingPolicyError, ParseWorkersError,
    RespawnPolicy, SchedulingPolicy, Settings, Workers,
};
pub use error::{Error, ErrorKind, Result};
pub use event::{ExitStatus, WorkerState};
pub use message::Message;
pub use primary::{Event, Primary, Stats, WorkerRef, WorkerStats};
pub use run::{Context, Outcome, WORKER_ID_VAR, is_primary, is_worker, worker_id};
pub use signal::{ParseSignalError, Signal};
pub use worker::Worker;

/// Runs `main` as the primary or as a worker: decides the role, starts the runtime for it, and
/// in the primary the configured number of workers start on the first use of the handle
/// (`next_event`, `workers`, `fork`), so the primary's own start-up code runs before them.
///
/// `#[cluster::main]` writes this call for you, as the first statement of the `main` it
/// generates (so its users need no `unsafe`); call `run` yourself only in a `main` without
/// the macro.
///
/// A process started as a worker whose id or channel is broken exits with an error, never
/// running as a second primary; so does one whose `CLUSTER_WORKERS` or `CLUSTER_SCHED_POLICY`
/// does not parse.
///
/// # Safety
///
/// `run` reads and removes variables of the process environment (`CLUSTER_WORKER_ID` in a
/// worker; `NOTIFY_SOCKET`, `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` in the primary),
/// and editing the environment is only sound while no other thread may read or write it (see
/// [`std::env::remove_var`]). Call it first thing in `main`, before anything has started a
/// thread: no runtime, no thread pool, no logger with a background thread, no library that
/// spawns one on initialisation.
pub unsafe fn run<P, W, F, Fut>(config: Config, main: F) -> Fut::Output
where
    P: Message,
    W: Message,
    F: FnOnce(Context<P, W>) -> Fut,
    Fut: std::future::Future,
    Fut::Output: Outcome,
{
    // SAFETY: the caller upholds the same contract.
    unsafe { run::enter(config, main) }
}

/// Not public API: what the `cluster` facade's macros and this crate's benchmarks use.
#[doc(hidden)]
pub mod __private {
    pub use serde;

    pub use crate::run::run;

    /// The frame codec, for the benchmarks.
    pub mod frame {
        pub use crate::frame::{DEFAULT_MAX_FRAME, Decoder, Frame, encode, put_header};
    }
}
