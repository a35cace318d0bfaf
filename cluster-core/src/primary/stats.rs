//! A snapshot of the cluster for operators.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::supervisor::View;
use crate::event::WorkerState;

/// A snapshot of the cluster, from [`Primary::stats`](crate::Primary::stats).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Stats {
    /// Live workers (not yet both disconnected and exited), by id.
    pub workers: Vec<WorkerStats>,
    /// Workers forked since start.
    pub forked: u64,
    /// Workers started by the respawn policy.
    pub respawns: u64,
}

/// One worker in [`Stats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Worker id.
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Time since its fork.
    pub uptime: Duration,
    /// Connections the primary handed it (round-robin) and it took.
    pub connections: u64,
    /// Typed messages it sent to the primary.
    pub messages_in: u64,
    /// Typed messages the primary sent it.
    pub messages_out: u64,
}

/// A table, one worker per line.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} workers, {} forked, {} respawned",
            self.workers.len(),
            self.forked,
            self.respawns
        )?;
        writeln!(
            f,
            "{:>4} {:>8} {:>12} {:>10} {:>12} {:>10} {:>10}",
            "id", "pid", "state", "uptime", "connections", "msgs in", "msgs out"
        )?;
        for w in &self.workers {
            writeln!(
                f,
                "{:>4} {:>8} {:>12} {:>9}s {:>12} {:>10} {:>10}",
                w.id,
                w.pid,
                w.state.to_string(),
                w.uptime.as_secs(),
                w.connections,
                w.messages_in,
                w.messages_out
            )?;
        }
        Ok(())
    }
}

impl Stats {
    pub(super) fn of<W>(view: &View<W>) -> Stats {
        Stats {
            workers: view
                .workers
                .iter()
                .map(|w| {
                    let (messages_in, messages_out) = w.message_counts();
                    WorkerStats {
                        id: w.id(),
                        pid: w.pid(),
                        state: w.state(),
                        uptime: w.uptime(),
                        connections: w.shared.counters.conns.load(Ordering::Relaxed),
                        messages_in,
                        messages_out,
                    }
                })
                .collect(),
            forked: view.forked,
            respawns: view.respawns,
        }
    }
}
