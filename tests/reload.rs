//! Zero-downtime reload, counted: HTTP clients hammer `hello_http` (keep-alive and a new
//! connection per request) while SIGHUP replaces every worker twice; not one request may fail.

mod common;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Proc;
use nix::sys::signal::Signal;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    workers_seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// One request on `conn` (opening one if needed), counted.
fn request(
    conn: &mut Option<BufReader<TcpStream>>,
    port: u16,
    counts: &Counts,
) -> Result<(), String> {
    let answer = common::http_get(conn, port)?;
    if answer.body != b"hello world\n" {
        return Err(format!("bad body {:?}", answer.body));
    }
    counts.ok.fetch_add(1, Ordering::Relaxed);
    counts.workers_seen.lock().unwrap().insert(answer.worker);
    Ok(())
}

fn client(port: u16, keep_alive: bool, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let mut conn = None;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = request(&mut conn, port, &counts) {
            eprintln!(
                "{:?} request failed ({}): {e}",
                std::time::SystemTime::now(),
                if keep_alive {
                    "keep-alive"
                } else {
                    "new connection"
                }
            );
            counts.failed.fetch_add(1, Ordering::Relaxed);
            conn = None;
        }
        if !keep_alive {
            conn = None;
        }
    }
}

#[test]
fn reload_under_load_fails_no_request_round_robin() {
    reload_under_load("round-robin", 0);
}

#[test]
fn reload_under_load_fails_no_request_shared() {
    reload_under_load("shared", 1);
}

#[test]
fn reload_under_load_fails_no_request_reuseport() {
    reload_under_load("reuseport", 2);
}

fn reload_under_load(policy: &str, n: u16) {
    // Below the ephemeral range (32768 and up), so no client socket can hold the port.
    let port = 10000 + (std::process::id() % 3000) as u16 * 3 + n;
    let port_s = port.to_string();
    let mut p = Proc::start(
        "hello_http",
        &[
            ("PORT", port_s.as_str()),
            ("CLUSTER_WORKERS", "2"),
            ("RUST_LOG", "info"),
        ],
    );
    p.expect_prefix("Primary");
    p.expect_prefix("Worker");
    p.expect_prefix("Worker");

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let clients: Vec<_> = [true, true, false, false]
        .into_iter()
        .map(|keep_alive| {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || client(port, keep_alive, stop, counts))
        })
        .collect();

    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..2 {
        p.signal(Signal::SIGHUP);
        // Each reload starts two replacements; wait for both, then for the reload to finish.
        p.expect_prefix("Worker");
        p.expect_prefix("Worker");
        std::thread::sleep(Duration::from_millis(600));
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "reload {round} took too long"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let ok = counts.ok.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    let seen = counts.workers_seen.lock().unwrap().clone();
    eprintln!(
        "reload under load ({policy}): {ok} requests served, {failed} failed, worker ids seen {seen:?}"
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the reload",
        ok + failed
    );
    assert!(ok > 100, "too few requests to mean anything: {ok}");
    // Two reloads of two workers: ids 1..=6 served, the last ones only after a reload.
    assert!(
        seen.contains("5") || seen.contains("6"),
        "no request reached a reloaded worker: {seen:?}"
    );

    p.signal(Signal::SIGTERM);
    let status = p.wait_exit();
    assert!(status.success(), "primary exit: {status:?}");
}

/// `hello_http` with 2 workers on a free port, both started.
fn hello_http_with_two_workers() -> (Proc, u16) {
    let port = common::free_low_port();
    let port_s = port.to_string();
    let mut p = Proc::scripted(
        "hello_http",
        &[("PORT", port_s.as_str()), ("CLUSTER_WORKERS", "2")],
    );
    p.expect_prefix("Primary");
    p.expect_prefix("Worker");
    p.expect_prefix("Worker");
    (p, port)
}

/// The live children of `pid` (its workers), from every process's `stat`.
fn children(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // `pid (comm) state ppid ...`: comm may hold spaces, so parse after the last `)`.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .count()
}

/// `N workers, M forked` from `cluster.stats()`, which `hello_http` prints for a line on stdin.
fn stats(p: &mut Proc) -> (usize, usize) {
    p.send("stats");
    let line = p.wait_for("stats", |l| {
        l.contains(" workers, ") && l.contains(" forked")
    });
    let mut words = line.split_whitespace();
    let workers = words.next().and_then(|w| w.parse().ok()).unwrap();
    let forked = words.nth(1).and_then(|w| w.parse().ok()).unwrap();
    (workers, forked)
}

#[test]
fn fifty_sighups_5ms_apart_leave_the_configured_workers_and_fail_no_request() {
    let (mut p, port) = hello_http_with_two_workers();
    let primary = p.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let clients: Vec<_> = [true, false]
        .into_iter()
        .map(|keep_alive| {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || client(port, keep_alive, stop, counts))
        })
        .collect();
    // The most workers alive at once, sampled through the storm and the rollouts after it.
    let most = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(children(primary) as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    for _ in 0..50 {
        p.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(5));
    }
    // The rollouts are over once nothing is forked for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = stats(&mut p);
    let mut quiet = 0;
    while quiet < 3 {
        assert!(
            Instant::now() < deadline,
            "the reloads never settled: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(700));
        let now = stats(&mut p);
        quiet = if now == last && now.0 == 2 {
            quiet + 1
        } else {
            0
        };
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    sampler.join().unwrap();
    let (ok, failed) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    let (workers, forked) = last;
    let most = most.load(Ordering::Relaxed);
    eprintln!(
        "50 SIGHUPs: {ok} requests served, {failed} failed; {workers} workers at the end, \
         {forked} forked, at most {most} alive at once"
    );
    assert_eq!(workers, 2, "the configured count is 2");
    assert!(
        most <= 3,
        "{most} workers alive at once: more than one replacement at a time"
    );
    // At least one rollout (two replacements) ran, and at most one per SIGHUP (overlapping
    // rollouts, each over the others' workers, forked thousands).
    assert!((4..=102).contains(&forked), "{forked} workers forked");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 50, "too few requests to mean anything: {ok}");

    p.signal(Signal::SIGTERM);
    let status = p.wait_exit();
    assert!(status.success(), "primary exit: {status:?}");
}

/// Clients that never finish their headers (slowloris) hold no drain: a reload under 50 of them
/// takes about what it takes without them, not the 30 s grace per worker.
#[test]
fn a_reload_under_slow_clients_is_not_held_by_them() {
    let (mut p, port) = hello_http_with_two_workers();
    let slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nx-slow: ")
                .unwrap();
            s
        })
        .collect();
    // Every slow connection has reached a worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats_connections(&mut p) < 50 {
        assert!(
            Instant::now() < deadline,
            "the slow clients never reached the workers"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    p.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let (workers, forked) = stats(&mut p);
        if workers == 2 && forked == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload did not finish: {workers} workers, {forked} forked"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t.elapsed();
    eprintln!("reload under 50 slow clients took {took:?}");
    assert!(took < Duration::from_secs(10), "the reload took {took:?}");
    drop(slow);
    p.signal(Signal::SIGTERM);
    let status = p.wait_exit();
    assert!(status.success(), "primary exit: {status:?}");
}

/// The connections the primary handed the workers, from `cluster.stats()` (round-robin).
fn stats_connections(p: &mut Proc) -> u64 {
    p.send("stats");
    let head = p.wait_for("stats", |l| {
        l.contains(" workers, ") && l.contains(" forked")
    });
    let workers: usize = head.split_whitespace().next().unwrap().parse().unwrap();
    // The column header, then one line per worker: `id pid state uptime connections ...`.
    let _ = p.line();
    (0..workers)
        .map(|_| {
            let l = p.line();
            l.split_whitespace()
                .nth(4)
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// `connections` counts under every policy: the workers count what they accept on their own
/// sockets (`shared`, `reuseport`) as the primary counts what it hands over (round-robin); and
/// each worker's resident memory and CPU time are in the table.
#[test]
fn stats_count_connections_and_show_memory_under_every_policy() {
    for policy in ["round-robin", "shared", "reuseport"] {
        let port = common::free_low_port();
        let port_s = port.to_string();
        let mut p = Proc::scripted(
            "hello_http",
            &[
                ("PORT", port_s.as_str()),
                ("CLUSTER_WORKERS", "2"),
                ("CLUSTER_SCHED_POLICY", policy),
            ],
        );
        p.expect_prefix("Primary");
        p.expect_prefix("Worker");
        p.expect_prefix("Worker");
        let counts = Counts::default();
        for _ in 0..20 {
            request(&mut None, port, &counts).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = stats_connections(&mut p);
            if n == 20 {
                break;
            }
            assert!(
                n < 20 && Instant::now() < deadline,
                "{policy}: {n} connections counted for 20"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p.send("stats");
        p.wait_for("stats", |l| {
            l.contains(" workers, ") && l.contains(" forked")
        });
        let header = p.line();
        assert!(
            header.contains("rss MiB") && header.contains("cpu s"),
            "{header}"
        );
        for _ in 0..2 {
            let row = p.line();
            let rss: f64 = row.split_whitespace().nth(7).unwrap().parse().unwrap();
            assert!(rss > 0.5, "{policy}: a worker's resident memory: {row}");
        }
        p.signal(Signal::SIGTERM);
        assert!(p.wait_exit().success());
    }
}
