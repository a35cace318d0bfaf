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
mod error;
mod event;
mod frame;
#[cfg(feature = "http")]
pub mod http;
mod message;
pub mod net;
mod notify;
mod primary;
mod run;
mod servers;
mod signal;
mod sys;
mod wire;
mod worker;

pub use config::{
    Config, Flavor, Heartbeat, ParseSchedulingPolicyError, ParseWorkersError, RespawnPolicy,
    SchedulingPolicy, Settings, Workers,
};
pub use error::{Error, ErrorKind, Result};
pub use event::{Event, ExitStatus, WorkerState};
pub use message::Message;
pub use primary::{Primary, Stats, WorkerRef, WorkerStats};
pub use run::{Context, Outcome, WORKER_ID_VAR, is_primary, is_worker, run, worker_id};
pub use signal::{ParseSignalError, Signal};
pub use worker::Worker;

/// Not public API: what the `cluster` facade's macros and this crate's benchmarks use.
#[doc(hidden)]
pub mod __private {
    pub use serde;

    /// [`run`](crate::run) for the `main` that `#[cluster::main]` writes, the one caller.
    pub fn run<P, W, F, Fut>(config: crate::Config, main: F) -> Fut::Output
    where
        P: crate::Message,
        W: crate::Message,
        F: FnOnce(crate::Context<P, W>) -> Fut,
        Fut: core::future::Future,
        Fut::Output: crate::Outcome,
    {
        // SAFETY: the macro's `fn main` calls this as its first statement, before any code of
        // the program has run that could have started a thread; nothing else may call it.
        unsafe { crate::run(config, main) }
    }

    /// The frame codec, for the benchmarks.
    pub mod frame {
        pub use crate::frame::{DEFAULT_MAX_FRAME, Decoder, encode, put_header};
    }
}
