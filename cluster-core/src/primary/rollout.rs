//! A rolling replacement of every worker, one at a time: the replacement listens (or is online,
//! for a worker without servers) before the worker it replaces disconnects. The supervisor runs
//! one rollout at a time and coalesces the requests that arrive meanwhile into at most one more;
//! the rollout itself is a client of the supervisor, as the user's code would be.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::supervisor::{Command, View};
use super::worker_ref::{Status, WorkerRef};
use crate::error::{Error, ErrorKind};
use crate::event::WorkerState;
use crate::message::Message;
use crate::signal::Signal;
use crate::systemd::notify;

pub(crate) struct Rollout<W> {
    pub(crate) commands: mpsc::Sender<Command<W>>,
    pub(crate) view: watch::Receiver<View<W>>,
    /// How long a replacement has to become ready, and an old worker to leave.
    pub(crate) grace: Duration,
}

/// The error of a rollout that a shutdown stopped.
pub(crate) fn cancelled() -> Error {
    Error::new(
        ErrorKind::InvalidState,
        "reload cancelled: the cluster is shutting down",
    )
}

impl<W: Message> Rollout<W> {
    /// Runs the rollout, then tells the supervisor how it ended.
    pub(crate) async fn run(self) {
        notify::reloading();
        let result = self.each().await;
        notify::ready();
        let _ = self.commands.send(Command::RolloutDone { result }).await;
    }

    fn cancelled(&self) -> bool {
        self.view.borrow().closing
    }

    async fn each(&self) -> Result<(), Error> {
        let olds: Vec<WorkerRef<W>> = self.view.borrow().listed().cloned().collect();
        for old in olds {
            if self.cancelled() {
                return Err(cancelled());
            }
            if !old.is_connected() {
                continue;
            }
            self.replace(&old).await?;
        }
        Ok(())
    }

    async fn replace(&self, old: &WorkerRef<W>) -> Result<(), Error> {
        let listening = old.state() == WorkerState::Listening;
        tracing::info!(
            worker.id = old.id(),
            worker.pid = old.pid(),
            "reload: starting a replacement"
        );
        // Until it is ready, a replacement that dies is the reload's failure to report, not a
        // crash for the respawn policy (which would fork the broken build again).
        let (reply, forked) = oneshot::channel();
        let fork = Command::Fork {
            env: Vec::new(),
            probation: true,
            inherit: Some(old.id()),
            reply,
        };
        if self.commands.send(fork).await.is_err() {
            return Err(cancelled());
        }
        let new = forked.await.map_err(|_| cancelled())??;
        let ready = |s: &Status| {
            let state = s.life.state();
            state == WorkerState::Listening || (!listening && state == WorkerState::Online)
        };
        let mut view = self.view.clone();
        let settled = tokio::time::timeout(self.grace, async {
            tokio::select! {
                _ = new.wait_until(|s| !s.life.connected() || ready(s)) => {}
                // A shutdown disconnects the replacement itself.
                _ = view.wait_for(|v| v.closing) => {}
            }
        })
        .await
        .is_ok();
        if self.cancelled() {
            return Err(cancelled());
        }
        if !(settled && ready(&new.shared.status.borrow())) {
            let _ = new.kill_with(Signal::SIGKILL);
            // Respawns must not use the build that just failed: back to the settings of the
            // workers that serve.
            let _ = self.commands.send(Command::RestoreSettings).await;
            return Err(Error::new(
                ErrorKind::Spawn,
                format!(
                    "reload stopped: replacement worker {} did not become ready (a build with other message types or another version of cluster is refused at the handshake: bring it in with the full upgrade, SIGUSR2 or `Primary::upgrade`); the old workers keep serving and the settings are back to theirs",
                    new.id()
                ),
            ));
        }
        let _ = self.commands.send(Command::Trust { id: new.id() }).await;
        tracing::info!(
            worker.id = old.id(),
            replacement = new.id(),
            "reload: replacement ready, disconnecting the old worker"
        );
        old.disconnect_within(Some(self.grace));
        let gone = tokio::time::timeout(self.grace, old.wait_until(|s| s.life.status().is_some()));
        if gone.await.is_err() {
            let _ = old.kill_with(Signal::SIGKILL);
        }
        Ok(())
    }
}
