//! Bounded channels with real processes: a peer that never reads costs its sender a bounded
//! amount of memory, the sender's `send` waits and `try_send` says `Full`.
//!
//! The fixture is `tests/fixtures/bounded.rs`: for 10 s the flooding side sends up to 256 MiB of
//! 64 KiB messages and reports whether a send blocked; an unbounded channel would queue all of it.

mod common;

use common::{KillOnDrop, Proc, rss_kib};

const FIXTURE: &str = "fixture_bounded";

/// Growth of the flooding side's resident memory the test accepts: the 1 MiB limit of each
/// queue, the chunk buffers kept for reuse and the allocator's slack fit many times; the 256
/// MiB an unbounded queue would hold do not.
const MAX_GROWTH_KIB: u64 = 64 * 1024;

fn start(mode: &str) -> (Proc, u32, KillOnDrop) {
    start_with(mode, &[])
}

fn start_with(mode: &str, env: &[(&str, &str)]) -> (Proc, u32, KillOnDrop) {
    let mut all = vec![
        ("MODE", mode),
        ("CLUSTER_WORKERS", "1"),
        ("CLUSTER_SCHED_POLICY", "round-robin"),
    ];
    all.extend_from_slice(env);
    let mut p = Proc::scripted(FIXTURE, &all);
    let worker: u32 = p.expect_prefix("online pid=").parse().expect("worker pid");
    (p, worker, KillOnDrop(vec![worker]))
}

/// Sends `stop` and waits for the fixture to kill its worker and exit cleanly.
fn stop(mut p: Proc, worker: u32) {
    p.send("stop");
    p.seen_or_wait("done", |l| l == "done");
    let status = p.wait_exit();
    assert!(status.success(), "fixture exited with {status}");
    common::wait_gone(worker);
}

#[test]
fn a_worker_that_never_reads_costs_the_primary_bounded_memory() {
    let (mut p, worker, _guard) = start("primary-floods");
    let primary_before = rss_kib(p.pid());
    let worker_before = rss_kib(worker);
    p.send("go");
    let verdict = p.wait_for("the end of the flood", |l| {
        l.starts_with("blocked after ") || l.starts_with("sent all ")
    });
    let try_send = p.expect_prefix("try_send ");
    p.seen_or_wait("flooded", |l| l == "flooded");
    let primary_after = rss_kib(p.pid());
    let worker_after = rss_kib(worker);
    eprintln!(
        "{verdict}; primary VmRSS {primary_before} -> {primary_after} KiB, \
         worker {worker_before} -> {worker_after} KiB"
    );
    assert!(
        verdict.starts_with("blocked after "),
        "the primary's sends never waited: {verdict}"
    );
    let sent: u64 = verdict["blocked after ".len()..]
        .trim_end_matches(" sends")
        .parse()
        .unwrap();
    // Both queues and the socket between them, with room to spare: far below the 4096 sends.
    assert!(sent * 64 < MAX_GROWTH_KIB, "{sent} sends of 64 KiB went");
    assert_eq!(try_send, "Full");
    assert!(
        primary_after.saturating_sub(primary_before) < MAX_GROWTH_KIB,
        "the primary grew from {primary_before} to {primary_after} KiB"
    );
    // The worker's reader stopped reading once its inbox was full.
    assert!(
        worker_after.saturating_sub(worker_before) < MAX_GROWTH_KIB,
        "the worker grew from {worker_before} to {worker_after} KiB"
    );
    stop(p, worker);
}

#[test]
fn a_primary_that_never_reads_events_costs_itself_bounded_memory() {
    let (mut p, worker, _guard) = start("worker-floods");
    let primary_before = rss_kib(p.pid());
    p.send("go");
    let verdict = p.wait_for("the end of the flood", |l| {
        l.starts_with("worker blocked after ") || l.starts_with("worker sent all ")
    });
    let try_send = p.expect_prefix("worker try_send ");
    let primary_after = rss_kib(p.pid());
    eprintln!("{verdict}; primary VmRSS {primary_before} -> {primary_after} KiB");
    assert!(
        verdict.starts_with("worker blocked after "),
        "the worker's sends never waited: {verdict}"
    );
    assert_eq!(try_send, "Full");
    assert!(
        primary_after.saturating_sub(primary_before) < MAX_GROWTH_KIB,
        "the primary grew from {primary_before} to {primary_after} KiB"
    );
    stop(p, worker);
}

/// A worker whose messages wait for the primary's user is silent because of the primary, not
/// hung: the heartbeat (timeout 500 ms here) must not kill it while its reader waits.
#[test]
fn a_worker_parked_behind_unread_messages_is_not_killed_by_the_heartbeat() {
    let (mut p, worker, _guard) = start_with("worker-floods", &[("HB_TIMEOUT_MS", "500")]);
    p.send("go");
    let verdict = p.wait_for("the end of the flood", |l| {
        l.starts_with("worker blocked after ") || l.starts_with("worker sent all ")
    });
    assert!(verdict.starts_with("worker blocked after "), "{verdict}");
    // It sat parked behind unread messages for most of the 10 s flood: 20 heartbeat timeouts.
    assert!(
        common::alive(worker),
        "the heartbeat killed a worker the primary did not read"
    );
    stop(p, worker);
}
