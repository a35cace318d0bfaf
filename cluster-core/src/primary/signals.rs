//! The signals of a production process manager, turned into commands.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use super::Primary;
use super::events::Event;
use crate::message::Message;

/// Listens for the signals [`Primary::handle_signals`] documents and acts on them through
/// the handle, as the user's own code would.
pub(super) fn handle<P: Message, W: Message>(
    me: Primary<P, W>,
    grace: Duration,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut ttin = signal(SignalKind::from_raw(nix::libc::SIGTTIN))?;
    let mut ttou = signal(SignalKind::from_raw(nix::libc::SIGTTOU))?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut quit = signal(SignalKind::quit())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!(signal = "SIGTERM", "signal received: graceful shutdown");
                    break;
                }
                _ = int.recv() => {
                    tracing::info!(signal = "SIGINT", "signal received: graceful shutdown");
                    break;
                }
                _ = quit.recv() => {
                    tracing::info!(signal = "SIGQUIT", "signal received: graceful shutdown");
                    break;
                }
                _ = usr1.recv() => {
                    tracing::info!(signal = "SIGUSR1", "signal received: reopen logs");
                    me.inner.errors.emit(Event::ReopenLogs);
                }
                _ = hup.recv() => {
                    tracing::info!(signal = "SIGHUP", "signal received: rolling reload");
                    let m = me.clone();
                    tokio::spawn(async move {
                        if let Err(error) = m.reload(grace).await {
                            m.report(error);
                        }
                    });
                }
                _ = usr2.recv() => {
                    tracing::info!(signal = "SIGUSR2", "signal received: full upgrade");
                    let m = me.clone();
                    tokio::spawn(async move {
                        // The signal's sender cannot read a `Result`: the outcome is a line on
                        // stderr (and, when it failed, an `Error` event).
                        match m.upgrade(grace).await {
                            Ok(pid) => eprintln!(
                                "cluster: upgrade done: the new primary (pid {pid}) serves; this primary drains and exits"
                            ),
                            Err(error) => {
                                eprintln!("cluster: {error}");
                                m.report(error);
                            }
                        }
                    });
                }
                _ = ttin.recv() => {
                    tracing::info!(signal = "SIGTTIN", "signal received: one worker more");
                    let m = me.clone();
                    tokio::spawn(async move {
                        if let Err(error) = m.scale(super::Scale::By(1)).await {
                            m.report(error);
                        }
                    });
                }
                _ = ttou.recv() => {
                    tracing::info!(signal = "SIGTTOU", "signal received: one worker fewer");
                    let m = me.clone();
                    tokio::spawn(async move {
                        if let Err(error) = m.scale(super::Scale::By(-1)).await {
                            m.report(error);
                        }
                    });
                }
            }
        }
        // The exit is owed before the stragglers are killed: once they are gone the event
        // stream ends and `main` returns, and `run` must find it then.
        tokio::select! {
            _ = me.shutdown_as(grace, true, true) => {}
            _ = int.recv() => {
                tracing::warn!(signal = "SIGINT", "second signal received: forced shutdown");
                me.shutdown_as(Duration::ZERO, true, true).await;
            }
        }
    });
    Ok(())
}

impl<P: Message, W: Message> Primary<P, W> {
    /// An error of the cluster as a whole, for `next_event`.
    fn report(&self, error: crate::error::Error) {
        self.inner.errors.emit(Event::Error {
            worker: None,
            error,
        });
    }
}
