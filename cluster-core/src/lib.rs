//! The runtime of the [`cluster`](https://docs.rs/cluster) crate: worker processes, the typed
//! channel between them and the primary, shared server ports and lifecycle events.
//!
//! Most programs use it through `#[cluster::main]`; everything here also works without the
//! macro:
//!
//! ```no_run
//! use cluster_core::{Config, Event, run};
//!
//! fn main() {
//!     run::<(), (), _, _>(Config::default(), |mut ctx| async move {
//!         if let Some(cluster) = ctx.take_primary() {
//!             while let Some(event) = cluster.next_event().await {
//!                 if let Event::Exit { worker, status } = event {
//!                     println!("worker {} exited ({status})", worker.id());
//!                 }
//!             }
//!         }
//!         if let Some(worker) = ctx.take_worker() {
//!             println!("worker {} started", worker.id());
//!         }
//!     })
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
pub mod frame;
#[cfg(feature = "http")]
pub mod http;
mod message;
pub mod net;
mod primary;
mod run;
mod socket;
mod sys;
mod systemd;
mod wire;
mod worker;

pub use config::{Config, Flavor, Heartbeat, RespawnPolicy, SchedulingPolicy, Settings, Workers};
pub use error::{Error, ErrorKind, Result};
pub use event::{ExitStatus, WorkerState};
pub use message::{FNV_OFFSET, Message, fnv1a};
pub use primary::{Event, Primary, Stats, WorkerRef, WorkerStats};
pub use run::{Context, Outcome, Role, WORKER_ID_VAR, is_primary, is_worker, run, worker_id};
pub use worker::Worker;

/// Signals, for [`WorkerRef::kill_with`].
pub use nix::sys::signal::Signal;

#[doc(hidden)]
pub mod __private {
    pub use serde;
}
