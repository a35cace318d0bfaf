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
    /// Connections it took: handed over by the primary (round-robin) or accepted on its own
    /// sockets (`shared`, `reuseport`), counted by the worker and reported in merged frames.
    pub connections: u64,
    /// Typed messages it sent to the primary.
    pub messages_in: u64,
    /// Typed messages the primary sent it.
    pub messages_out: u64,
    /// Resident memory, from `/proc/<pid>/statm` (`None` where there is no `/proc`, or the
    /// process is gone).
    pub rss_bytes: Option<u64>,
    /// CPU time used, user and system, from `/proc/<pid>/stat`.
    pub cpu: Option<Duration>,
}

/// Resident bytes and CPU time of process `pid`, from `/proc`.
fn usage(pid: u32) -> (Option<u64>, Option<Duration>) {
    use nix::unistd::{SysconfVar, sysconf};
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page);
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // `pid (comm) state ...`: comm may hold spaces; fields count after the last `)`.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some(Duration::from_millis((utime + stime) * 1000 / ticks))
        });
    (rss, cpu)
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
            "{:>4} {:>8} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9}",
            "id",
            "pid",
            "state",
            "uptime",
            "connections",
            "msgs in",
            "msgs out",
            "rss MiB",
            "cpu s"
        )?;
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        for w in &self.workers {
            writeln!(
                f,
                "{:>4} {:>8} {:>12} {:>9}s {:>12} {:>10} {:>10} {:>10} {:>9}",
                w.id,
                w.pid,
                w.state.to_string(),
                w.uptime.as_secs(),
                w.connections,
                w.messages_in,
                w.messages_out,
                or_dash(w.rss_bytes.map(|b| format!("{:.1}", b as f64 / 1048576.0))),
                or_dash(w.cpu.map(|c| format!("{:.2}", c.as_secs_f64()))),
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
                    // A reaped pid may be another process's by now.
                    let reaped = w.shared.reaped.load(Ordering::Relaxed);
                    let (rss_bytes, cpu) = if reaped { (None, None) } else { usage(w.pid()) };
                    WorkerStats {
                        id: w.id(),
                        pid: w.pid(),
                        state: w.state(),
                        uptime: w.uptime(),
                        connections: w.shared.counters.conns.load(Ordering::Relaxed),
                        messages_in,
                        messages_out,
                        rss_bytes,
                        cpu,
                    }
                })
                .collect(),
            forked: view.forked,
            respawns: view.respawns,
        }
    }
}
