//! Shared server ports with real processes and real sockets (loopback only): port 0 shared by
//! every worker, round-robin spread, the three policies, bind errors and retry, a second listen,
//! re-listen after close, Unix-domain listeners, UDP, connections queued for a worker that is
//! killed, and descriptor exhaustion in the primary. Every wait is bounded.
//!
//! The fixture is `tests/fixtures/servers.rs`, driven through its stdin.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{KillOnDrop, Proc, WAIT, alive, wait_gone};

const FIXTURE: &str = "fixture_servers";

/// The fixture's primary, its stdin, and the worker pids it reported (killed on drop).
struct Fixture {
    p: Proc,
    workers: KillOnDrop,
    /// Lines read but not consumed yet, in order.
    pending: VecDeque<String>,
}

impl Fixture {
    fn start(workers: usize, policy: &str, env: &[(&str, &str)]) -> Fixture {
        let mut cmd = Command::new(common::example(FIXTURE));
        cmd.env_remove("CLUSTER_WORKER_ID")
            .env_remove("ADDR")
            .env_remove("NOFILE")
            .env_remove("UDP_EXPECT")
            .env("CLUSTER_WORKERS", workers.to_string())
            .env("CLUSTER_SCHED_POLICY", policy)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Fixture {
            p: Proc::spawn(cmd),
            workers: KillOnDrop(Vec::new()),
            pending: VecDeque::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.p.pid()
    }

    /// Sends one command line to the primary.
    fn send(&mut self, cmd: &str) {
        self.p.send(cmd);
    }

    /// The next new line, within `left`; records worker pids.
    fn read(&mut self, left: Duration) -> Option<String> {
        let line = self.p.line_within(left)?;
        if let Some(rest) = line.strip_prefix("worker ") {
            let pid = rest.split_whitespace().nth(2).and_then(|p| p.parse().ok());
            if let Some(pid) = pid {
                self.workers.0.push(pid);
            }
        }
        Some(line)
    }

    /// The first line (pending or new) that starts with `prefix`, within `WAIT`; the rest after
    /// the prefix. Lines that do not match stay pending for later calls.
    fn expect(&mut self, prefix: &str) -> String {
        if let Some(i) = self.pending.iter().position(|l| l.starts_with(prefix)) {
            let l = self.pending.remove(i).expect("index found");
            return l[prefix.len()..].trim().to_owned();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left) {
                Some(l) if l.starts_with(prefix) => return l[prefix.len()..].trim().to_owned(),
                Some(l) => self.pending.push_back(l),
                None => panic!(
                    "waited {WAIT:?} for `{prefix}`; seen: {:#?}\nstderr: {}",
                    self.p.seen,
                    self.p.stderr()
                ),
            }
        }
    }

    /// The first line that starts with `a` or `b`, whole.
    fn expect_either(&mut self, a: &str, b: &str) -> String {
        let hit = |l: &String| l.starts_with(a) || l.starts_with(b);
        if let Some(i) = self.pending.iter().position(hit) {
            return self.pending.remove(i).expect("index found");
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left) {
                Some(l) if hit(&l) => return l,
                Some(l) => self.pending.push_back(l),
                None => panic!(
                    "waited {WAIT:?} for `{a}` or `{b}`; seen: {:#?}\nstderr: {}",
                    self.p.seen,
                    self.p.stderr()
                ),
            }
        }
    }

    /// `n` lines `<prefix><worker id> <rest>`, as (id, rest).
    fn expect_n(&mut self, prefix: &str, n: usize) -> Vec<(u32, String)> {
        (0..n)
            .map(|_| {
                let rest = self.expect(prefix);
                let (id, rest) = rest.split_once(' ').unwrap_or((&rest, ""));
                (id.parse().expect("worker id"), rest.to_owned())
            })
            .collect()
    }

    /// Waits for `n` workers' `listening` reports and returns the one address they share.
    fn shared_addr(&mut self, n: usize) -> String {
        let got = self.expect_n("listening ", n);
        let first = got[0].1.clone();
        assert!(
            got.iter().all(|(_, a)| *a == first),
            "workers listen on different addresses: {got:?}"
        );
        let mut ids: Vec<u32> = got.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "one report per worker: {got:?}");
        first
    }

    /// Disconnects the cluster, expects a clean exit of the primary and of every worker.
    fn quit(&mut self) {
        self.send("quit");
        self.expect("bye");
        let status = self.p.wait_exit();
        assert!(
            status.success(),
            "primary exited with {status}; stderr: {}",
            self.p.stderr()
        );
        for pid in &self.workers.0 {
            wait_gone(*pid);
        }
    }

    /// Every line the primary printed so far.
    fn seen(&self) -> &[String] {
        &self.p.seen
    }
}

fn sock(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|_| panic!("not a socket address: {addr}"))
}

/// Connects to `addr` (bounded), not reading yet.
fn connect(addr: SocketAddr) -> TcpStream {
    let s =
        TcpStream::connect_timeout(&addr, WAIT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s
}

/// Reads the worker id the fixture writes on each connection, within `WAIT`.
fn answer(mut s: impl Read) -> u32 {
    let mut text = String::new();
    s.read_to_string(&mut text)
        .expect("read the answer within WAIT");
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a worker id: {text:?}"))
}

/// One connection: the id of the worker that served it.
fn ask(addr: SocketAddr) -> u32 {
    answer(connect(addr))
}

/// A listener on a free port below the ephemeral range (see [`common::hold_low_port`]).
fn hold_port() -> std::net::TcpListener {
    common::hold_low_port("127.0.0.1")
}

/// A free port below the ephemeral range (see [`hold_port`]).
fn free_port() -> u16 {
    hold_port().local_addr().expect("local addr").port()
}

/// Connections to `addr` are refused within `WAIT` (the server socket closed).
fn wait_refused(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("cluster-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn port_zero_is_shared_by_every_worker() {
    let mut fx = Fixture::start(3, "round-robin", &[]);
    let addr = fx.shared_addr(3);
    let port = sock(&addr).port();
    assert_ne!(port, 0, "local_addr() reports the real port");
    // Event::Listening agrees with the workers, once per worker.
    let events = fx.expect_n("event-listening ", 3);
    for (id, a) in &events {
        assert_eq!(*a, addr, "Event::Listening of worker {id}");
    }
    for _ in 0..3 {
        let id = ask(sock(&addr));
        assert!((1..=3).contains(&id), "served by worker {id}");
    }
    fx.quit();
    let events = fx
        .seen()
        .iter()
        .filter(|l| l.starts_with("event-listening "))
        .count();
    assert_eq!(
        events,
        3,
        "Event::Listening once per listener: {:#?}",
        fx.seen()
    );
}

#[test]
fn round_robin_spreads_new_connections_evenly() {
    const W: usize = 3;
    const N: usize = 30;
    let mut fx = Fixture::start(W, "round-robin", &[]);
    let addr = sock(&fx.shared_addr(W));
    // All N at once, then read them: each is dispatched as it is accepted.
    let conns: Vec<TcpStream> = (0..N).map(|_| connect(addr)).collect();
    let mut per: BTreeMap<u32, usize> = BTreeMap::new();
    for c in conns {
        *per.entry(answer(c)).or_default() += 1;
    }
    let fair = N / W;
    assert_eq!(per.len(), W, "every worker served: {per:?}");
    for (id, n) in &per {
        assert!(
            n.abs_diff(fair) <= 1,
            "worker {id} served {n} of {N}, expected {fair} +/- 1: {per:?}"
        );
    }
    fx.quit();
}

#[test]
fn every_policy_serves_the_same_fixture() {
    for policy in ["round-robin", "shared", "reuseport"] {
        let mut fx = Fixture::start(3, policy, &[]);
        let addr = fx.shared_addr(3);
        assert_ne!(sock(&addr).port(), 0);
        let events = fx.expect_n("event-listening ", 3);
        assert!(
            events.iter().all(|(_, a)| *a == addr),
            "{policy}: Event::Listening {events:?} vs {addr}"
        );
        let conns: Vec<TcpStream> = (0..12).map(|_| connect(sock(&addr))).collect();
        for c in conns {
            let id = answer(c);
            assert!((1..=3).contains(&id), "{policy}: served by worker {id}");
        }
        fx.quit();
    }
}

#[test]
fn bind_error_names_the_address_and_a_retry_succeeds() {
    let held = hold_port();
    let addr = held.local_addr().expect("held addr").to_string();
    let mut fx = Fixture::start(1, "round-robin", &[("ADDR", &addr)]);
    let err = fx.expect("bind-error 1 ");
    let (kind, msg) = err.split_once(' ').expect("kind and message");
    assert_eq!(kind, "AddrInUse", "{err}");
    assert!(msg.contains(&addr), "the error names {addr}: {msg}");
    // The failed key was forgotten: once the port is free, the same bind works.
    drop(held);
    fx.send("listen all");
    let got = fx.expect("listening 1 ");
    assert_eq!(got, addr);
    assert_eq!(ask(sock(&addr)), 1);
    fx.quit();
}

#[test]
fn second_listen_in_one_worker() {
    // Port 0: a second listen gets a port of its own (shared by the workers' second listens).
    let mut fx = Fixture::start(2, "round-robin", &[]);
    let first = fx.shared_addr(2);
    fx.send("listen all");
    let second = fx.shared_addr(2);
    assert_ne!(
        sock(&first).port(),
        sock(&second).port(),
        "second listen on :0 gets a new port"
    );
    assert!((1..=2).contains(&ask(sock(&first))));
    assert!((1..=2).contains(&ask(sock(&second))));
    fx.quit();

    // A fixed port: the second listen in the same worker is EADDRINUSE; the first still serves.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut fx = Fixture::start(2, "round-robin", &[("ADDR", &addr)]);
    assert_eq!(fx.shared_addr(2), addr);
    fx.send("listen all");
    for (id, err) in fx.expect_n("bind-error ", 2) {
        let (kind, msg) = err.split_once(' ').expect("kind and message");
        assert_eq!(kind, "AddrInUse", "worker {id}: {err}");
        assert!(
            msg.contains(&addr),
            "worker {id}: the error names {addr}: {msg}"
        );
    }
    for _ in 0..4 {
        assert!((1..=2).contains(&ask(sock(&addr))));
    }
    fx.quit();
}

#[test]
fn relisten_after_close() {
    // A fixed port outside the ephemeral range: nothing else takes it while it is closed.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut fx = Fixture::start(2, "round-robin", &[("ADDR", &addr)]);
    assert_eq!(fx.shared_addr(2), addr);
    fx.expect_n("event-listening ", 2);
    fx.send("close all");
    fx.expect_n("closed ", 2);
    // The last worker left: the primary closed the socket.
    wait_refused(sock(&addr));
    // The same port again.
    fx.send(&format!("listen all {addr}"));
    assert_eq!(fx.shared_addr(2), addr);
    // Event::Listening fires for the new listeners too.
    for (_, a) in fx.expect_n("event-listening ", 2) {
        assert_eq!(a, addr);
    }
    let served: Vec<u32> = (0..4).map(|_| ask(sock(&addr))).collect();
    assert!(served.iter().all(|id| (1..=2).contains(id)), "{served:?}");
    fx.quit();
    let events = fx
        .seen()
        .iter()
        .filter(|l| l.starts_with("event-listening "))
        .count();
    assert_eq!(events, 4, "once per listener: {:#?}", fx.seen());
}

/// Closing the last listener on a fixed port and listening on it again straight away works
/// under every policy: the primary's socket is closed by the time the close is processed.
#[test]
fn relisten_at_once_on_the_same_port() {
    for policy in ["round-robin", "shared", "reuseport"] {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut fx = Fixture::start(1, policy, &[("ADDR", &addr)]);
        assert_eq!(fx.expect("listening 1 "), addr);
        for round in 0..5 {
            // Both commands at once: the worker closes, then listens again, with no pause.
            fx.send("close all");
            fx.send(&format!("listen all {addr}"));
            fx.expect("closed 1");
            let next = fx.expect_either("listening 1 ", "bind-error 1 ");
            assert_eq!(
                next,
                format!("listening 1 {addr}"),
                "{policy}, round {round}: re-listen right after close"
            );
            assert_eq!(ask(sock(&addr)), 1);
        }
        fx.quit();
    }
}

#[test]
fn unix_domain_listener() {
    for policy in ["round-robin", "shared"] {
        let dir = TempDir::new("servers-unix");
        let path = dir.0.join("s.sock");
        let addr = format!("unix:{}", path.display());
        let mut fx = Fixture::start(2, policy, &[("ADDR", &addr)]);
        assert_eq!(fx.shared_addr(2), path.display().to_string());
        let conns: Vec<_> = (0..6)
            .map(|_| {
                let s = std::os::unix::net::UnixStream::connect(&path).expect("connect");
                s.set_read_timeout(Some(WAIT)).expect("read timeout");
                s
            })
            .collect();
        let mut per: BTreeMap<u32, usize> = BTreeMap::new();
        for c in conns {
            *per.entry(answer(c)).or_default() += 1;
        }
        assert!(
            per.keys().all(|id| (1..=2).contains(id)),
            "{policy}: {per:?}"
        );
        if policy == "round-robin" {
            assert_eq!(
                per,
                BTreeMap::from([(1, 3), (2, 3)]),
                "round-robin alternates"
            );
        }
        fx.quit();
        // The primary removes the socket file when the last worker leaves.
        let deadline = Instant::now() + WAIT;
        while path.exists() {
            assert!(
                Instant::now() < deadline,
                "{policy}: {} still exists",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn udp_on_four_workers_receives_every_datagram() {
    const COUNT: u32 = 200;
    let expect = COUNT.to_string();
    let mut fx = Fixture::start(
        4,
        "round-robin",
        &[("ADDR", "udp:127.0.0.1:0"), ("UDP_EXPECT", &expect)],
    );
    let addr = sock(&fx.shared_addr(4));
    assert_ne!(addr.port(), 0);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
    for seq in 0..COUNT {
        client
            .send_to(seq.to_string().as_bytes(), addr)
            .expect("send a datagram");
        // A modest pace: the test is about sharing, not about overflowing buffers.
        if seq % 10 == 9 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let all = fx.expect("udp-all ");
    let (reports, per) = all.split_once(' ').expect("reports and counts");
    assert_eq!(
        reports, expect,
        "each datagram received exactly once: {all}"
    );
    let sum: u32 = per
        .split(',')
        .map(|kv| {
            kv.split_once('=')
                .expect("id=count")
                .1
                .parse::<u32>()
                .expect("count")
        })
        .sum();
    assert_eq!(sum, COUNT, "{all}");
    fx.quit();
}

#[test]
fn connections_queued_for_a_killed_worker_are_not_lost() {
    const N: usize = 10;
    let mut fx = Fixture::start(2, "round-robin", &[]);
    let addr = sock(&fx.shared_addr(2));
    let victim_pid = {
        // Worker 1's pid, for the check that it is gone.
        let line = fx
            .seen()
            .iter()
            .find(|l| l.starts_with("worker 1 pid "))
            .cloned()
            .expect("worker 1 forked");
        line["worker 1 pid ".len()..].parse::<u32>().expect("pid")
    };
    // Worker 1 stops accepting but keeps its listener: round-robin still hands it connections.
    fx.send("pause 1");
    fx.expect("paused 1");
    let (tx, rx) = mpsc::channel();
    let readers: Vec<_> = (0..N)
        .map(|i| {
            let s = connect(addr);
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send((i, answer(s)));
            })
        })
        .collect();
    drop(tx);
    // Half go to worker 2 and are served at once; the other half wait in worker 1.
    let mut early = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(a) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        early.push(a);
    }
    assert!(
        early.iter().all(|(_, id)| *id == 2),
        "only worker 2 serves while worker 1 is paused: {early:?}"
    );
    assert_eq!(
        early.len(),
        N / 2,
        "round-robin queued half for worker 1: {early:?}"
    );
    fx.send("kill 1");
    let status = fx.expect("exit 1 ");
    assert_eq!(status, "SIGKILL");
    wait_gone(victim_pid);
    // Every connection queued for worker 1 is served by worker 2.
    let mut late = Vec::new();
    while late.len() < N - early.len() {
        match rx.recv_timeout(WAIT) {
            Ok(a) => late.push(a),
            Err(_) => {
                panic!("connections lost with worker 1: served early {early:?}, late {late:?}")
            }
        }
    }
    assert!(late.iter().all(|(_, id)| *id == 2), "{late:?}");
    for r in readers {
        r.join().expect("reader thread");
    }
    fx.quit();
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Out of descriptors (the fixture takes every free one), the primary's accept loop backs off
/// instead of spinning, and serves the connections that waited once descriptors free up.
#[test]
fn accept_loop_backs_off_when_the_primary_is_out_of_descriptors() {
    const LIMIT: usize = 64;
    const N: usize = 20;
    let limit = LIMIT.to_string();
    let mut fx = Fixture::start(2, "round-robin", &[("NOFILE", &limit)]);
    assert_eq!(fx.expect("nofile "), limit);
    let addr = sock(&fx.shared_addr(2));
    // No connection before: nothing the primary holds frees a descriptor behind our back.
    let primary = fx.pid();
    fx.send("hoard");
    let hoarded = fx.expect("hoarded ");
    assert!(
        hoarded.ends_with(&format!(" {}", nix::libc::EMFILE)),
        "hoarding ends with EMFILE: {hoarded}"
    );
    assert!(open_fds(primary) >= LIMIT, "{} open", open_fds(primary));
    // Connections wait in the kernel's queue: the primary cannot accept them.
    let conns: Vec<TcpStream> = (0..N).map(|_| connect(addr)).collect();
    let mut probe = [0u8; 8];
    conns[0]
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    assert!(
        (&conns[0]).read(&mut probe).is_err(),
        "served while the primary had no descriptor"
    );
    conns[0].set_read_timeout(Some(WAIT)).expect("read timeout");
    let before = cpu_ticks(primary);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(primary) - before;
    assert!(
        used <= 30,
        "the primary used {used} ticks of CPU in 1 s while out of descriptors"
    );
    assert!(alive(primary), "the primary died");
    fx.send("release");
    fx.expect("released");
    for c in conns {
        let id = answer(c);
        assert!((1..=2).contains(&id), "served by worker {id}");
    }
    assert!((1..=2).contains(&ask(addr)));
    fx.quit();
}

/// Connections themselves exhaust the primary (paused workers ack none, so it keeps a copy of
/// each); once the workers take them, every connection still open is served and new ones too.
#[test]
fn connections_that_exhaust_the_primary_are_all_served() {
    const LIMIT: usize = 64;
    const N: usize = 150;
    let limit = LIMIT.to_string();
    let mut fx = Fixture::start(2, "round-robin", &[("NOFILE", &limit)]);
    assert_eq!(fx.expect("nofile "), limit);
    let addr = sock(&fx.shared_addr(2));
    assert!((1..=2).contains(&ask(addr)));
    fx.send("pause all");
    fx.expect_n("paused ", 2);
    let primary = fx.pid();
    let mut conns: Vec<TcpStream> = (0..N).map(|_| connect(addr)).collect();
    // Let the primary take what it can; it must not spin meanwhile.
    let before = cpu_ticks(primary);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(primary) - before;
    assert!(
        used <= 30,
        "the primary used {used} ticks of CPU in 1 s while out of descriptors"
    );
    assert!(alive(primary), "the primary died");
    // Half the clients give up; the workers take what was queued for them.
    let mut i = 0;
    conns.retain(|_| {
        i += 1;
        i % 2 == 0
    });
    fx.send("resume all");
    fx.expect_n("resumed ", 2);
    for (i, c) in conns.into_iter().enumerate() {
        let mut text = String::new();
        let r = (&c).read_to_string(&mut text);
        assert!(
            r.is_ok()
                && text
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|id| (1..=2).contains(&id)),
            "kept connection {i} of {} not served ({r:?}, {text:?}); the primary holds {} descriptors",
            N / 2,
            open_fds(primary)
        );
    }
    for _ in 0..4 {
        assert!((1..=2).contains(&ask(addr)));
    }
    assert!(alive(primary), "the primary died");
    fx.quit();
    assert!(
        !fx.seen()
            .iter()
            .any(|l| l.starts_with("exit ") && !l.ends_with(" 0")),
        "a worker died: {:#?}",
        fx.seen()
    );
}

/// The lowest descriptor number process `pid` has free.
fn lowest_free_fd(pid: u32) -> usize {
    let open: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the fd table")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).expect("a free number")
}

/// Sets the descriptor limit of process `pid` (with util-linux's `prlimit`).
fn limit_fds(pid: u32, n: usize) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:{}", n.max(4096)))
        .status()
        .expect("run prlimit");
    assert!(
        status.success(),
        "prlimit --pid={pid} --nofile={n}: {status}"
    );
}

/// A worker out of descriptors (its own accepts, under `shared`) waits instead of spinning on
/// `EMFILE`, and serves the connections that waited once it has room again.
#[test]
fn a_worker_out_of_descriptors_backs_off_then_serves_what_waited() {
    const N: usize = 20;
    let mut fx = Fixture::start(1, "shared", &[]);
    let addr = sock(&fx.shared_addr(1));
    // No connection before: none of its descriptors closes behind our back.
    let worker = fx.workers.0[0];
    // The kernel gives the lowest free number, and refuses one at or above the limit: with the
    // limit at the lowest free number, every accept fails with EMFILE.
    limit_fds(worker, lowest_free_fd(worker));
    let conns: Vec<TcpStream> = (0..N).map(|_| connect(addr)).collect();
    let mut probe = [0u8; 8];
    let last = &conns[N - 1];
    last.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    let early = (&*last).read(&mut probe);
    assert!(
        early.is_err(),
        "served while the worker had no descriptor: {early:?}"
    );
    last.set_read_timeout(Some(WAIT)).expect("read timeout");
    let before = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(worker) - before;
    assert!(
        used <= 30,
        "the worker used {used} ticks of CPU in 1 s while out of descriptors"
    );
    assert!(alive(worker), "the worker died");
    limit_fds(worker, 1024);
    for c in conns {
        assert_eq!(answer(c), 1);
    }
    assert_eq!(ask(addr), 1);
    fx.quit();
}

// A worker is untrusted input: what it may ask the primary to listen on, and which files the
// primary removes for it.

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The lowest port an unprivileged user may bind.
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

fn chown_nobody(path: &std::path::Path) {
    std::os::unix::fs::chown(path, Some(65534), Some(65534)).expect("chown to nobody");
}

/// Waits until `path` is gone, within `WAIT`.
fn wait_removed(path: &std::path::Path) {
    let deadline = Instant::now() + WAIT;
    while path.exists() {
        assert!(Instant::now() < deadline, "{} still exists", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A worker running as `nobody` swaps the directory of its socket for a symlink to a directory
/// only root may touch, then closes its listener: the root primary removes the socket it
/// created, and not the file the symlink now leads to.
#[test]
fn a_swapped_directory_cannot_make_the_primary_remove_another_file() {
    if !is_root() {
        eprintln!("skipped: running a worker as nobody needs root");
        return;
    }
    let dir = TempDir::new("swap");
    let base = dir.0.join("base");
    let own = base.join("own");
    std::fs::create_dir_all(&own).unwrap();
    chown_nobody(&base);
    chown_nobody(&own);
    let victim = dir.0.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(victim.join("sock"), "precious").unwrap();

    let mut fx = Fixture::start(
        1,
        "round-robin",
        &[("ADDR", "none"), ("WORKER_UID", "65534")],
    );
    fx.expect("online 1");
    let sock = own.join("sock");
    fx.send(&format!("listen 1 unix:{}", sock.display()));
    assert_eq!(fx.expect("listening 1"), sock.display().to_string());
    fx.send(&format!("swap 1 {}={}", own.display(), victim.display()));
    assert_eq!(fx.expect("swapped 1"), "Ok(())");
    fx.send("close 1");
    fx.expect("closed 1");
    // The primary removes the socket it created, now under `own.old`, and nothing else.
    wait_removed(&base.join("own.old").join("sock"));
    assert_eq!(
        std::fs::read_to_string(victim.join("sock")).unwrap(),
        "precious",
        "the file behind the symlink is intact"
    );
    fx.quit();
}

/// A socket file left by a process that died is replaced; a file that is not a socket, or a
/// socket another process listens on, stays and the bind fails with `AddrInUse`.
#[test]
fn a_stale_socket_file_is_replaced_and_any_other_file_stays() {
    let dir = TempDir::new("stale");
    let stale = dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "a stale socket file");
    let plain = dir.0.join("plain.sock");
    std::fs::write(&plain, "data").unwrap();
    let busy = dir.0.join("busy.sock");
    let held = std::os::unix::net::UnixListener::bind(&busy).unwrap();

    let mut fx = Fixture::start(1, "round-robin", &[("ADDR", "none")]);
    fx.expect("online 1");
    fx.send(&format!("listen 1 unix:{}", stale.display()));
    assert_eq!(fx.expect("listening 1"), stale.display().to_string());
    let s = std::os::unix::net::UnixStream::connect(&stale).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(answer(s), 1);

    fx.send(&format!("listen 1 unix:{}", plain.display()));
    let e = fx.expect("bind-error 1");
    assert!(
        e.starts_with("AddrInUse") && e.contains("not a socket"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "data");

    fx.send(&format!("listen 1 unix:{}", busy.display()));
    let e = fx.expect("bind-error 1");
    assert!(
        e.starts_with("AddrInUse") && e.contains("another process listens"),
        "{e}"
    );
    let _c = std::os::unix::net::UnixStream::connect(&busy).unwrap();
    held.accept()
        .expect("the other process still has its socket");

    // A listener whose backlog is full (it never accepts) does not hold the primary up: the
    // check that nobody listens does not wait.
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
    };
    let full = dir.0.join("full.sock");
    let sock_fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let at = UnixAddr::new(&full).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&sock_fd), &at).unwrap();
    listen(&sock_fd, Backlog::new(0).unwrap()).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let c = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        let _ = connect(std::os::fd::AsRawFd::as_raw_fd(&c), &at);
        fillers.push(c);
    }
    let asked = Instant::now();
    fx.send(&format!("listen 1 unix:{}", full.display()));
    let e = fx.expect("bind-error 1");
    assert!(
        e.starts_with("AddrInUse") && e.contains("another process listens"),
        "{e}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    fx.quit();
}

/// One worker that binds in a loop is refused past the per-worker limit (64 servers by
/// default); the primary's descriptors stay bounded and the other workers keep serving.
#[test]
fn binds_past_the_limit_are_refused_and_the_other_workers_serve() {
    let mut fx = Fixture::start(2, "round-robin", &[]);
    let addr = sock(&fx.shared_addr(2));
    let before = open_fds(fx.pid());
    fx.send("binds 1 5000");
    let got = fx.expect("binds 1");
    let (ok, error) = got.split_once(' ').unwrap();
    assert_eq!(ok, "63", "64 servers, the first included: {got}");
    assert!(
        error.starts_with("Other") && error.contains("already has 64 servers open"),
        "{error}"
    );
    let after = open_fds(fx.pid());
    assert!(
        after <= before + 2 * 63 + 8,
        "the primary went from {before} to {after} descriptors"
    );
    let mut served = BTreeMap::<u32, usize>::new();
    for _ in 0..10 {
        *served.entry(ask(addr)).or_default() += 1;
    }
    assert_eq!(served.len(), 2, "both workers serve: {served:?}");
    // Refusals are events, up to a bound.
    let events = fx
        .seen()
        .iter()
        .filter(|l| l.starts_with("error worker 1: worker 1 asked the primary"))
        .count();
    assert!((1..=8).contains(&events), "{events} refusal events");
    fx.quit();
}

/// A worker running as `nobody` may not borrow the root primary's privilege: port 81 is
/// refused by default, and served once the bind policy allows it.
#[test]
fn a_worker_under_another_uid_gets_a_privileged_port_only_when_allowed() {
    if !is_root() || unprivileged_port_start() <= 81 {
        eprintln!("skipped: needs root, and port 81 privileged");
        return;
    }
    let env = [("ADDR", "none"), ("WORKER_UID", "65534")];
    let mut fx = Fixture::start(1, "round-robin", &env);
    fx.expect("online 1");
    fx.send("listen 1 127.0.0.1:81");
    let e = fx.expect("bind-error 1");
    assert!(
        e.starts_with("PermissionDenied") && e.contains("port 81 is privileged"),
        "{e}"
    );
    let event = fx.expect("error worker 1:");
    assert!(
        event.contains("127.0.0.1:81") && event.contains("refused"),
        "{event}"
    );
    fx.quit();

    let allowed = [env[0], env[1], ("BIND_PORTS", "81-81")];
    let mut fx = Fixture::start(1, "round-robin", &allowed);
    fx.expect("online 1");
    fx.send("listen 1 127.0.0.1:81");
    assert_eq!(fx.expect("listening 1"), "127.0.0.1:81");
    assert_eq!(ask(sock("127.0.0.1:81")), 1);
    fx.quit();
}

/// The socket file the primary creates for a worker: owned by the worker's user when it runs
/// as another one (what it would have created itself), with the mode the worker chose, set
/// before any client can connect (not the primary's umask).
#[test]
fn a_unix_socket_file_has_the_workers_owner_and_the_mode_it_chose() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TempDir::new("mode");
    let mut fx = Fixture::start(1, "shared", &[("ADDR", "none")]);
    fx.expect("online 1");
    for (mode, name) in [(0o600, "a.sock"), (0o666, "b.sock")] {
        let path = dir.0.join(name);
        fx.send(&format!("listen 1 unix-mode={mode:o}:{}", path.display()));
        assert_eq!(fx.expect("listening 1"), path.display().to_string());
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    fx.send(&format!(
        "listen 1 unix-mode=1777:{}",
        dir.0.join("c.sock").display()
    ));
    let e = fx.expect("bind-error 1");
    assert!(e.starts_with("InvalidInput") && e.contains("0o777"), "{e}");
    fx.quit();

    if !is_root() {
        eprintln!("the owner part is skipped: running a worker as nobody needs root");
        return;
    }
    let own = dir.0.join("own");
    std::fs::create_dir(&own).unwrap();
    chown_nobody(&own);
    let mut fx = Fixture::start(
        1,
        "round-robin",
        &[("ADDR", "none"), ("WORKER_UID", "65534")],
    );
    fx.expect("online 1");
    let path = own.join("s.sock");
    fx.send(&format!("listen 1 unix:{}", path.display()));
    assert_eq!(fx.expect("listening 1"), path.display().to_string());
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65534, 65534),
        "the worker's user owns it"
    );

    // In a sticky directory (as /tmp), another user's stale socket is not the worker's to
    // replace, so the primary does not replace it for it.
    let sticky = dir.0.join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, PermissionsExt::from_mode(0o1777)).unwrap();
    let theirs = sticky.join("theirs.sock");
    drop(std::os::unix::net::UnixListener::bind(&theirs).unwrap());
    std::os::unix::fs::chown(&theirs, Some(1001), Some(1001)).unwrap();
    fx.send(&format!("listen 1 unix:{}", theirs.display()));
    let e = fx.expect("bind-error 1");
    assert!(e.starts_with("AddrInUse") && e.contains("sticky"), "{e}");
    assert_eq!(
        std::fs::symlink_metadata(&theirs).unwrap().uid(),
        1001,
        "left as it was"
    );
    fx.quit();
}
