//! The examples keep their public contract: the lines they print, the headers they send, the
//! count they keep.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{KillOnDrop, Proc, wait_gone};
use nix::sys::signal::Signal;

fn port(n: u16) -> u16 {
    // Below the ephemeral range (32768 and up), so no client socket can hold the port.
    20000 + (std::process::id() % 2000) as u16 * 4 + n
}

/// One `GET /` with `Connection: close`; the whole response.
fn get(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out
}

#[test]
fn hello_http_keeps_its_contract() {
    let port = port(0);
    let mut p = Proc::start(
        "hello_http",
        &[("PORT", &port.to_string()), ("CLUSTER_WORKERS", "2")],
    );
    // The primary's line comes first, then one line per listening worker.
    let first = p.line();
    assert_eq!(first, format!("Primary {} is running", p.pid()));
    let w1: u32 = p
        .expect_prefix("Worker")
        .trim_end_matches(" started")
        .parse()
        .unwrap();
    let w2: u32 = p
        .expect_prefix("Worker")
        .trim_end_matches(" started")
        .parse()
        .unwrap();
    let _guard = KillOnDrop(vec![w1, w2]);
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let res = get(port);
        assert!(res.starts_with("HTTP/1.1 200 OK\r\n"), "{res}");
        assert!(res.ends_with("\r\n\r\nhello world\n"), "{res:?}");
        let id = res
            .lines()
            .find_map(|l| l.strip_prefix("x-worker-id: "))
            .expect("x-worker-id header");
        ids.insert(id.to_owned());
    }
    assert_eq!(ids, ["1".to_owned(), "2".to_owned()].into());
    // An unplanned death is announced and repaired.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w1 as i32), Signal::SIGKILL).unwrap();
    p.wait_for("died line", |l| {
        l == format!("worker {w1} died (SIGKILL). Restarting...")
    });
    let w3: u32 = p
        .expect_prefix("Worker")
        .trim_end_matches(" started")
        .parse()
        .unwrap();
    let _guard3 = KillOnDrop(vec![w3]);
    assert!(get(port).starts_with("HTTP/1.1 200 OK"));
    p.signal(Signal::SIGTERM);
    assert!(p.wait_exit().success());
    for pid in [w2, w3] {
        wait_gone(pid);
    }
}

#[test]
fn count_requests_counts_exactly() {
    let port = port(1);
    let mut p = Proc::start(
        "count_requests",
        &[("PORT", &port.to_string()), ("CLUSTER_WORKERS", "2")],
    );
    p.wait_for("first count", |l| l.starts_with("numReqs = "));
    // Both workers must be listening before the requests; the primary counts every one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "count_requests never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before: u64 = p.expect_prefix("numReqs =").parse().unwrap();
    for _ in 0..50 {
        assert!(get(port).starts_with("HTTP/1.1 200 OK"));
    }
    p.wait_for("exact count", |l| l == format!("numReqs = {}", before + 50));
}

#[test]
fn graceful_shutdown_disconnects_its_worker_and_exits() {
    let port = port(2);
    let mut p = Proc::start("graceful_shutdown", &[("PORT", &port.to_string())]);
    p.wait_for("listening", |l| {
        l == format!("worker 1 listening on 0.0.0.0:{port}")
    });
    p.wait_for("exit", |l| l == "worker 1 exited (0)");
    assert!(p.wait_exit().success());
}
