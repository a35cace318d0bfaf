//! Deciding the role of this process and running the user's `main` in it.

use std::future::Future;
use std::os::fd::OwnedFd;

use crate::config::{Config, Flavor};
use crate::message::Message;
use crate::primary::Primary;
use crate::sys;
use crate::worker::{Worker, fatal};

/// The variable that makes a process a worker, set by the primary at fork.
pub const WORKER_ID_VAR: &str = "CLUSTER_WORKER_ID";

/// What this process is, decided from the environment before any thread exists.
#[derive(Debug)]
pub(crate) enum Role {
    /// No `CLUSTER_WORKER_ID`: the primary.
    Primary,
    /// A worker, with its id and its channel to the primary.
    Worker {
        /// The worker id (>= 1).
        id: u32,
        /// The channel, taken from descriptor 3.
        channel: OwnedFd,
    },
}

impl Role {
    /// Reads and removes `CLUSTER_WORKER_ID`, then takes the channel.
    ///
    /// A process with a malformed id, or with an id but no channel, gets an error: it must never
    /// run as a second primary.
    ///
    /// # Safety
    ///
    /// It edits the environment: the process must have one thread (see [`run`]).
    unsafe fn detect() -> Result<Role, String> {
        let Some(raw) = std::env::var_os(WORKER_ID_VAR) else {
            // SAFETY: the caller guarantees that the process has one thread.
            unsafe {
                crate::systemd::take_from_env();
                crate::primary::upgrade::take_from_env();
            }
            return Ok(Role::Primary);
        };
        // SAFETY: the caller guarantees that the process has one thread.
        unsafe { sys::remove_env(WORKER_ID_VAR) };
        let text = raw.to_string_lossy();
        let id = match text.parse::<u32>() {
            Ok(id) if id >= 1 => id,
            _ => {
                return Err(format!(
                    "`{WORKER_ID_VAR}={text}` is not a valid worker id (expected an integer from 1 to {}); \
                     it is set by the primary for its workers, unset it to run as a primary",
                    u32::MAX
                ));
            }
        };
        let channel = sys::adopt_channel()?;
        Ok(Role::Worker { id, channel })
    }
}

/// What the user's `main` body receives: exactly one of the two handles.
#[derive(Debug)]
pub struct Context<P, W> {
    primary: Option<Primary<P, W>>,
    worker: Option<Worker<P, W>>,
}

impl<P, W> Context<P, W> {
    /// The primary's handle, in the primary, once.
    pub fn take_primary(&mut self) -> Option<Primary<P, W>> {
        self.primary.take()
    }

    /// The worker's handle, in a worker, once.
    pub fn take_worker(&mut self) -> Option<Worker<P, W>> {
        self.worker.take()
    }

    /// Whether this process is the primary.
    pub fn is_primary(&self) -> bool {
        self.worker.is_none()
    }
}

fn runtime(flavor: Flavor) -> tokio::runtime::Runtime {
    let built = match flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Flavor::MultiThread(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b.enable_all().build()
        }
    };
    built.unwrap_or_else(|e| fatal(&format!("cannot start the tokio runtime: {e}")))
}

/// Not public API: [`run`](crate::run) for the `main` that `#[cluster::main]` writes, which
/// calls it as its first statement, before any code of the program could start a thread.
///
/// Its signature stays here and in this form: the compiler quotes it to the macro's users
/// (`ui-tests/fail/message-without-attribute.stderr`) when a message type lacks the attribute.
pub fn run<P, W, F, Fut>(config: Config, main: F) -> Fut::Output
where
    P: Message,
    W: Message,
    F: FnOnce(Context<P, W>) -> Fut,
    Fut: Future,
    Fut::Output: Outcome,
{
    // SAFETY: only the macro's `fn main` calls this, as its first statement: no code of the
    // program has run yet that could have started a thread.
    unsafe { enter(config, main) }
}

/// The body of [`run`](crate::run).
///
/// # Safety
///
/// As for [`run`](crate::run): the process has one thread.
pub(crate) unsafe fn enter<P, W, F, Fut>(config: Config, main: F) -> Fut::Output
where
    P: Message,
    W: Message,
    F: FnOnce(Context<P, W>) -> Fut,
    Fut: Future,
    Fut::Output: Outcome,
{
    // SAFETY: the caller guarantees that the process has one thread.
    let role = unsafe { Role::detect() }.unwrap_or_else(|e| fatal(&e));
    let config = config.with_env().unwrap_or_else(|e| fatal(&e));
    match role {
        Role::Primary => runtime(config.primary_flavor).block_on(async move {
            let n = config.workers.resolve();
            let primary = Primary::<P, W>::with_workers(config, n);
            let handle = primary.clone();
            let out = main(Context {
                primary: Some(primary),
                worker: None,
            })
            .await;
            // A crash loop or a forced shutdown owes a non-zero exit, its reason the last line.
            if let Some((code, message)) = handle.take_exit() {
                eprintln!("cluster: {message}");
                std::process::exit(code);
            }
            out
        }),
        Role::Worker { id, channel } => {
            sys::set_parent_death_signal();
            let rt = runtime(config.worker_flavor);
            // Catch a panic of the worker's code long enough to tell the primary why this
            // worker dies, then let it continue to unwind.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(async move {
                    // A terminal's Ctrl-C or hang-up reaches the whole process group; the
                    // primary orchestrates shutdown and reload, so workers catch SIGINT and
                    // SIGHUP instead of dying mid-request.
                    let _sigint =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
                    let _sighup =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
                    let worker = Worker::<P, W>::start(id, channel, &config).await;
                    let out = main(Context {
                        primary: None,
                        worker: Some(worker),
                    })
                    .await;
                    if let Some(link) = crate::worker::link() {
                        if let Some(message) = out.failure() {
                            link.report_fatal(message);
                        }
                        link.flush().await;
                    }
                    out
                })
            }));
            match ran {
                Ok(out) => out,
                Err(panic) => {
                    if let Some(link) = crate::worker::link() {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".to_owned());
                        link.report_fatal(format!("worker {id} panicked: {what}"));
                        rt.block_on(link.flush());
                    }
                    std::panic::resume_unwind(panic)
                }
            }
        }
    }
}

/// What `main` may return: anything `std::process::Termination` takes that says whether it
/// failed, so a worker can tell the primary why it exits.
pub trait Outcome {
    /// The failure to report, if this outcome is one.
    fn failure(&self) -> Option<String>;
}

impl Outcome for () {
    fn failure(&self) -> Option<String> {
        None
    }
}

impl Outcome for std::process::ExitCode {
    fn failure(&self) -> Option<String> {
        None
    }
}

impl<T, E: std::fmt::Debug> Outcome for Result<T, E> {
    fn failure(&self) -> Option<String> {
        // What `Termination` prints for an error, less a backtrace (anyhow adds one under
        // `RUST_BACKTRACE`): the reason travels on one line to the primary.
        self.as_ref().err().map(|e| {
            let text = format!("{e:?}");
            let text = text
                .split("\n\nStack backtrace:")
                .next()
                .unwrap_or_default();
            text.trim_end().to_owned()
        })
    }
}

/// Whether this process is a cluster worker (Node's `cluster.isWorker`).
pub fn is_worker() -> bool {
    crate::worker::link().is_some()
}

/// Whether this process is the primary (Node's `cluster.isPrimary`).
pub fn is_primary() -> bool {
    !is_worker()
}

/// This worker's id, in a worker.
pub fn worker_id() -> Option<u32> {
    crate::worker::link().map(|l| l.id)
}
