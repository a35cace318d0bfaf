//! The primary's pure policy: a worker's lifecycle, respawn backoff with its crash-loop window,
//! and the heartbeat verdict. Plain values and functions, no I/O and no clock of their own (the
//! caller passes `now`), so each rule is unit-tested apart from the processes it governs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{Heartbeat, RespawnPolicy};
use crate::event::{ExitStatus, WorkerState};

/// Where a worker is in its life: one value, every other answer (connected, dead, the public
/// [`WorkerState`]) derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    /// Forked; the channel is open and the handshake has not arrived.
    Forked,
    /// Handshake done.
    Online,
    /// Reported a listening server.
    Listening,
    /// The channel closed; the process may still run.
    Disconnected,
    /// The process exited. Final: a channel that closes afterwards changes nothing.
    Dead(ExitStatus),
}

/// What happened to a worker, as the supervisor learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fact {
    Online,
    Listening,
    Disconnected,
    Exited(ExitStatus),
}

impl Life {
    /// The state after `fact`, or `None` when the fact changes nothing (a second `Online`, a
    /// `Listening` after the channel closed, anything after death).
    pub(crate) fn next(self, fact: Fact) -> Option<Life> {
        use Life::*;
        match (self, fact) {
            (Dead(_), _) => None,
            (_, Fact::Exited(status)) => Some(Dead(status)),
            (Disconnected, _) => None,
            (_, Fact::Disconnected) => Some(Disconnected),
            (Forked, Fact::Online) => Some(Online),
            (Online, Fact::Listening) => Some(Listening),
            (Forked | Online | Listening, _) => None,
        }
    }

    /// Node's `worker.state`.
    pub(crate) fn state(self) -> WorkerState {
        match self {
            Life::Forked => WorkerState::None,
            Life::Online => WorkerState::Online,
            Life::Listening => WorkerState::Listening,
            Life::Disconnected => WorkerState::Disconnected,
            Life::Dead(_) => WorkerState::Dead,
        }
    }

    /// Node's `isConnected()`: the channel is open.
    pub(crate) fn connected(self) -> bool {
        matches!(self, Life::Forked | Life::Online | Life::Listening)
    }

    /// The exit status, once dead (Node's `isDead()`).
    pub(crate) fn status(self) -> Option<ExitStatus> {
        match self {
            Life::Dead(s) => Some(s),
            _ => None,
        }
    }
}

/// Respawn decisions: exponential backoff, reset by a worker that lived long enough, and a
/// crash-loop limit over a sliding window.
#[derive(Debug)]
pub(crate) struct Respawn {
    policy: RespawnPolicy,
    backoff: Duration,
    /// Unplanned exits inside the window, oldest first; never longer than the limit.
    crashes: VecDeque<Instant>,
}

/// What to do after an unplanned exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Fork a replacement after this delay.
    RespawnAfter(Duration),
    /// `crashes` exits within the window: stop the cluster.
    CrashLoop { crashes: usize },
}

impl Respawn {
    pub(crate) fn new(policy: RespawnPolicy) -> Self {
        Respawn {
            policy,
            backoff: policy.min_backoff,
            crashes: VecDeque::new(),
        }
    }

    pub(crate) fn policy(&self) -> RespawnPolicy {
        self.policy
    }

    /// Records an unplanned exit at `now` of a worker that lived `uptime` (and came online, or
    /// not), with `live` other workers still running. Only a worker that never came online or
    /// lived less than `min_uptime` counts toward the crash-loop guard: one that served for a
    /// while and died is bad luck, replaced with backoff however often it happens. The crash
    /// limit is at least one more than the workers running, so one bad deploy of every worker
    /// at once is not mistaken for a loop.
    pub(crate) fn on_crash(
        &mut self,
        now: Instant,
        uptime: Duration,
        was_online: bool,
        live: usize,
    ) -> Verdict {
        let counts = !was_online || uptime < self.policy.min_uptime;
        let window = self.policy.crash_window;
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.crashes.pop_front();
        }
        if counts {
            self.crashes.push_back(now);
        }
        let limit = self.policy.crash_limit.max(live + 1);
        if counts && self.crashes.len() >= limit {
            return Verdict::CrashLoop {
                crashes: self.crashes.len(),
            };
        }
        if uptime >= self.policy.reset_after {
            self.backoff = self.policy.min_backoff;
        }
        let delay = self.backoff;
        self.backoff = self.backoff.saturating_mul(2).min(self.policy.max_backoff);
        Verdict::RespawnAfter(delay)
    }
}

/// The heartbeat's view of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pulse {
    /// Nothing to do: not connected yet or any more.
    Skip,
    /// Alive: ping it.
    Ping,
    /// Never came online within the boot timeout.
    NoBoot,
    /// Online but silent for longer than the timeout.
    Silent,
}

/// The verdict for a worker in `life`, forked `uptime` ago, last heard `since_pong` ago.
pub(crate) fn pulse(hb: &Heartbeat, life: Life, uptime: Duration, since_pong: Duration) -> Pulse {
    match life {
        Life::Forked if uptime > hb.boot_timeout => Pulse::NoBoot,
        Life::Online | Life::Listening if since_pong > hb.timeout => Pulse::Silent,
        Life::Online | Life::Listening => Pulse::Ping,
        _ => Pulse::Skip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn life_follows_nodes_order_and_death_is_final() {
        let st = ExitStatus::Code(0);
        let l = Life::Forked;
        assert_eq!(l.next(Fact::Listening), None, "listening before online");
        let l = l.next(Fact::Online).unwrap();
        assert_eq!(l.next(Fact::Online), None);
        let l = l.next(Fact::Listening).unwrap();
        assert_eq!(l.state(), WorkerState::Listening);
        assert_eq!(l.next(Fact::Listening), None);
        let l = l.next(Fact::Disconnected).unwrap();
        assert!(!l.connected());
        assert_eq!(
            l.next(Fact::Online),
            None,
            "nothing revives a disconnected worker"
        );
        let l = l.next(Fact::Exited(st)).unwrap();
        assert_eq!(l, Life::Dead(st));
        assert_eq!(
            l.next(Fact::Disconnected),
            None,
            "a late disconnect after death"
        );
        assert_eq!(l.next(Fact::Exited(ExitStatus::Code(1))), None);
        assert_eq!(l.status(), Some(st));
    }

    #[test]
    fn exit_before_the_channel_closes_is_dead_and_disconnected() {
        let l = Life::Online
            .next(Fact::Exited(ExitStatus::Signal(9)))
            .unwrap();
        assert_eq!(l.state(), WorkerState::Dead);
        assert!(!l.connected());
        assert_eq!(Life::Forked.state(), WorkerState::None);
        assert!(Life::Forked.connected());
    }

    fn policy() -> RespawnPolicy {
        RespawnPolicy {
            min_backoff: 100 * MS,
            max_backoff: 1000 * MS,
            reset_after: 10_000 * MS,
            crash_limit: 4,
            crash_window: 60_000 * MS,
            min_uptime: 5_000 * MS,
        }
    }

    #[test]
    fn only_workers_that_die_young_or_never_come_online_count_toward_the_guard() {
        let mut r = Respawn::new(policy());
        let t0 = Instant::now();
        // Forty workers that served 6 s each die within a second: bad luck, not a loop.
        for i in 0..40u32 {
            assert!(matches!(
                r.on_crash(t0 + i * 10 * MS, 6_000 * MS, true, 0),
                Verdict::RespawnAfter(_)
            ));
        }
        // Young deaths and workers that never came online do count.
        assert!(matches!(
            r.on_crash(t0 + 500 * MS, 100 * MS, true, 0),
            Verdict::RespawnAfter(_)
        ));
        assert!(matches!(
            r.on_crash(t0 + 501 * MS, 9_000 * MS, false, 0),
            Verdict::RespawnAfter(_)
        ));
        assert!(matches!(
            r.on_crash(t0 + 502 * MS, MS, true, 0),
            Verdict::RespawnAfter(_)
        ));
        assert_eq!(
            r.on_crash(t0 + 503 * MS, MS, false, 0),
            Verdict::CrashLoop { crashes: 4 }
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut r = Respawn::new(policy());
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for i in 0..6u32 {
            // Each crash outside the window of the others, so no loop is detected.
            let now = t0 + i * 61_000 * MS;
            match r.on_crash(now, MS, true, 0) {
                Verdict::RespawnAfter(d) => delays.push(d.as_millis()),
                v => panic!("unexpected {v:?}"),
            }
        }
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn a_worker_that_lived_long_resets_the_backoff() {
        let mut r = Respawn::new(policy());
        let t0 = Instant::now();
        assert_eq!(r.on_crash(t0, MS, true, 0), Verdict::RespawnAfter(100 * MS));
        assert_eq!(
            r.on_crash(t0 + 61_000 * MS, MS, true, 0),
            Verdict::RespawnAfter(200 * MS)
        );
        let long = r.on_crash(t0 + 122_000 * MS, 10_000 * MS, true, 0);
        assert_eq!(long, Verdict::RespawnAfter(100 * MS));
    }

    #[test]
    fn crash_loop_counts_only_inside_the_window() {
        let mut r = Respawn::new(policy());
        let t0 = Instant::now();
        for i in 0..3u32 {
            assert!(matches!(
                r.on_crash(t0 + i * MS, MS, true, 0),
                Verdict::RespawnAfter(_)
            ));
        }
        // The first three fall out of the window: no loop.
        let later = t0 + 70_000 * MS;
        assert!(matches!(
            r.on_crash(later, MS, true, 0),
            Verdict::RespawnAfter(_)
        ));
        for i in 1..3u32 {
            assert!(matches!(
                r.on_crash(later + i * MS, MS, true, 0),
                Verdict::RespawnAfter(_)
            ));
        }
        assert_eq!(
            r.on_crash(later + 3 * MS, MS, true, 0),
            Verdict::CrashLoop { crashes: 4 }
        );
    }

    #[test]
    fn the_crash_limit_is_at_least_one_more_than_the_live_workers() {
        let mut r = Respawn::new(policy());
        let t0 = Instant::now();
        // Eight workers die at once (a bad deploy): limit max(4, 8 + 1) = 9.
        for i in 0..8u32 {
            assert!(matches!(
                r.on_crash(t0 + i * MS, MS, true, 8),
                Verdict::RespawnAfter(_)
            ));
        }
        assert_eq!(
            r.on_crash(t0 + 8 * MS, MS, true, 8),
            Verdict::CrashLoop { crashes: 9 }
        );
    }

    #[test]
    fn heartbeat_verdicts() {
        let hb = Heartbeat {
            interval: 100 * MS,
            timeout: 1000 * MS,
            boot_timeout: 5000 * MS,
        };
        assert_eq!(pulse(&hb, Life::Forked, 4999 * MS, MS), Pulse::Skip);
        assert_eq!(pulse(&hb, Life::Forked, 5001 * MS, MS), Pulse::NoBoot);
        assert_eq!(pulse(&hb, Life::Online, 9 * MS, 999 * MS), Pulse::Ping);
        assert_eq!(
            pulse(&hb, Life::Listening, 9 * MS, 1001 * MS),
            Pulse::Silent
        );
        assert_eq!(
            pulse(&hb, Life::Disconnected, 9_000 * MS, 9_000 * MS),
            Pulse::Skip
        );
        let dead = Life::Dead(ExitStatus::Code(0));
        assert_eq!(pulse(&hb, dead, 9_000 * MS, 9_000 * MS), Pulse::Skip);
    }
}
