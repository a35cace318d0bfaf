//! Production lifecycle with real processes: workers that panic, abort, segfault, exit 1 in a
//! loop, hang or flood the channel; planned exits; live scaling; graceful and forced shutdown;
//! rolling reload and a reload to a binary that does not start; systemd readiness and socket
//! activation; and `hello_http` on a taken port, under SIGTERM and under SIGKILL of its primary.
//! No zombie may remain after any of them. Every wait is bounded.
//!
//! The fixture is `tests/fixtures/production.rs`, driven through its stdin.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{KillOnDrop, Proc, WAIT, alive, wait_gone};
use nix::sys::signal::Signal;

const FIXTURE: &str = "fixture_production";

/// The knobs of the fixture, cleared so the test's own environment cannot leak in.
const KNOBS: &[&str] = &[
    "CLUSTER_WORKER_ID",
    "CLUSTER_WORKERS",
    "CLUSTER_SCHED_POLICY",
    "ADDR",
    "RESPAWN",
    "CRASH_LIMIT",
    "CRASH_WINDOW_MS",
    "MIN_BACKOFF_MS",
    "MAX_BACKOFF_MS",
    "RESET_AFTER_MS",
    "HB_TIMEOUT_MS",
    "BOOT_TIMEOUT_MS",
    "GRACE_MS",
    "BEHAVIOUR",
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "PORT",
    "CLUSTER_SHUTDOWN_TIMEOUT",
];

fn command(program: impl AsRef<std::ffi::OsStr>, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(program);
    for k in KNOBS {
        cmd.env_remove(k);
    }
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BEHAVIOUR_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The fixture's primary, and every worker pid it reported (killed on drop).
struct Fixture {
    p: Proc,
    pids: KillOnDrop,
}

impl Fixture {
    fn start(workers: usize, env: &[(&str, &str)]) -> Fixture {
        let workers = workers.to_string();
        let mut all = vec![("CLUSTER_WORKERS", workers.as_str())];
        all.extend_from_slice(env);
        Fixture::spawn(command(common::example(FIXTURE), &all))
    }

    fn spawn(cmd: Command) -> Fixture {
        let mut f = Fixture {
            p: Proc::spawn(cmd),
            pids: KillOnDrop(Vec::new()),
        };
        // Printed once the signal handlers are installed.
        f.expect("primary ");
        f
    }

    fn pid(&self) -> u32 {
        self.p.pid()
    }

    fn send(&mut self, cmd: &str) {
        self.p.send(cmd);
    }

    fn signal(&self, sig: Signal) {
        self.p.signal(sig);
    }

    /// Records the pids of every `fork` line seen so far.
    fn track(&mut self) {
        for l in &self.p.seen {
            if let Some(pid) = l
                .strip_prefix("fork ")
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok())
            {
                if !self.pids.0.contains(&pid) {
                    self.pids.0.push(pid);
                }
            }
        }
    }

    /// A line seen already or arriving within `WAIT` that starts with `prefix`; whole.
    fn expect(&mut self, prefix: &str) -> String {
        let l = self
            .p
            .seen_or_wait(prefix, |l| l.starts_with(prefix))
            .to_owned();
        self.track();
        l
    }

    /// The next new line that starts with `prefix`; whole.
    fn next(&mut self, prefix: &str) -> String {
        let l = self.p.wait_for(prefix, |l| l.starts_with(prefix));
        self.track();
        l
    }

    /// Whether a line starting with `prefix` was seen.
    fn saw(&self, prefix: &str) -> bool {
        self.p.seen.iter().any(|l| l.starts_with(prefix))
    }

    /// Where the first line starting with `prefix` is in the output.
    fn index(&self, prefix: &str) -> usize {
        self.p
            .seen
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in {:#?}", self.p.seen))
    }

    /// Waits for worker `id` to listen; returns its pid.
    fn listening(&mut self, id: u32) -> u32 {
        let fork = self.expect(&format!("fork {id} "));
        self.expect(&format!("listening {id} "));
        fork.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// The shared port, from the first `listening` line.
    fn port(&mut self) -> u16 {
        let l = self.expect("listening ");
        let addr: SocketAddr = l.rsplit(' ').next().unwrap().parse().unwrap();
        addr.port()
    }

    /// The port worker `id` listens on.
    fn port_of(&mut self, id: u32) -> u16 {
        let l = self.expect(&format!("listening {id} "));
        let addr: SocketAddr = l.rsplit(' ').next().unwrap().parse().unwrap();
        addr.port()
    }

    /// The live workers as the primary lists them: (id, pid).
    fn workers(&mut self) -> Vec<(u32, u32)> {
        self.send("workers");
        let l = self.next("workers");
        l["workers".len()..]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                let (id, pid) = s.split_once(':').unwrap();
                (id.parse().unwrap(), pid.parse().unwrap())
            })
            .collect()
    }

    /// The exit code of the primary, within `WAIT`.
    fn exit_code(&mut self) -> Option<i32> {
        self.p.wait_exit().code()
    }

    /// The last line of stderr, once a line containing `needle` arrived (or `WAIT` passed).
    fn last_stderr_line(&self, needle: &str) -> String {
        last_stderr_line(&self.p, needle)
    }

    /// Every worker this primary ever forked is gone (not even a zombie).
    fn all_workers_gone(&mut self) {
        self.track();
        for pid in self.pids.0.clone() {
            wait_gone(pid);
        }
    }

    /// While the primary runs, none of its children stays a zombie: each exit is reaped.
    fn no_zombies(&self) {
        no_zombie_children(self.pid());
    }
}

/// The last line of `p`'s stderr, once a line containing `needle` was read from it (or `WAIT`
/// passed): its reader may lag behind the exit.
fn last_stderr_line(p: &Proc, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    while !p.stderr().contains(needle) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Anything after it would have been written before the exit: give the reader a moment.
    std::thread::sleep(Duration::from_millis(100));
    p.stderr()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_owned()
}

/// Children of `ppid` in state Z.
fn zombies_of(ppid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may contain anything but ends at the last `)`.
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = rest.next().unwrap_or("");
        let parent = rest.next().and_then(|p| p.parse::<u32>().ok());
        if state == "Z" && parent == Some(ppid) {
            found.push(pid);
        }
    }
    found
}

/// Zombies are only ever transient: within a bounded time none is left.
fn no_zombie_children(ppid: u32) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let z = zombies_of(ppid);
        if z.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "children {z:?} of {ppid} stay zombies"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request of the fixture's line protocol; the answer, or why there is none.
fn ask(port: u16, line: &str) -> Result<String, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(s, "{line}").map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    Ok(out.trim().to_owned())
}

/// The id of the worker that answered `ask`.
fn served_by(answer: &str) -> u32 {
    answer
        .strip_prefix("worker ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("not a worker's answer: {answer:?}"))
}

/// A fresh directory for this test's sockets.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cluster-production-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------------------------------------
// Workers that fail

#[test]
fn a_panicking_worker_is_reported_with_its_message_and_replaced() {
    let mut f = Fixture::start(2, &[]);
    f.listening(1);
    let pid2 = f.listening(2);
    f.send("do 1 panic boom at line 42");
    let exit = f.expect("exit 1 ");
    assert_eq!(
        exit,
        r#"exit 1 101 ead=Some(false) error=Some("worker 1 panicked: boom at line 42")"#
    );
    // Replaced: a new worker with a new id listens on the same port.
    f.listening(3);
    let port = f.port();
    for _ in 0..4 {
        let a = ask(port, "hi").unwrap();
        assert!(matches!(served_by(&a), 2 | 3), "{a}");
    }
    assert!(alive(pid2));
    f.no_zombies();
}

#[test]
fn aborting_and_segfaulting_workers_are_replaced() {
    let mut f = Fixture::start(2, &[]);
    let pid1 = f.listening(1);
    let pid2 = f.listening(2);
    f.send("do 1 abort");
    f.send("do 2 segv");
    assert!(
        f.expect("exit 1 ")
            .starts_with("exit 1 SIGABRT ead=Some(false)")
    );
    assert!(
        f.expect("exit 2 ")
            .starts_with("exit 2 SIGSEGV ead=Some(false)")
    );
    f.listening(3);
    f.listening(4);
    wait_gone(pid1);
    wait_gone(pid2);
    // Every member of the port-0 server died: the replacements share a new port.
    let port = f.port_of(3);
    assert!(matches!(served_by(&ask(port, "x").unwrap()), 3 | 4));
    f.no_zombies();
}

#[test]
fn a_worker_that_exits_1_in_a_loop_trips_the_crash_loop_guard() {
    let mut f = Fixture::start(
        1,
        &[
            ("BEHAVIOUR", "fail"),
            ("CRASH_LIMIT", "4"),
            ("CRASH_WINDOW_MS", "20000"),
        ],
    );
    // Respawned until the guard trips.
    for id in 1..=4 {
        // The error as the worker's `main` returned it (anyhow adds a backtrace when
        // RUST_BACKTRACE is set).
        let exit = f.expect(&format!("exit {id} "));
        assert!(
            exit.starts_with(&format!(
                r#"exit {id} 1 ead=Some(false) error=Some("deliberate failure of worker {id}"#
            )),
            "{exit}"
        );
    }
    // `main` sees the guard's error before the stream ends; then the primary exits 1.
    let err = f.expect("error 0 CrashLoop ");
    assert!(err.contains("crash loop: 4 workers failed"), "{err}");
    f.expect("events ended");
    assert!(f.index("error 0 CrashLoop ") < f.index("events ended"));
    assert_eq!(f.exit_code(), Some(1), "seen: {:#?}", f.p.seen);
    let last = f.last_stderr_line("cluster: crash loop:");
    assert!(
        last.starts_with("cluster: crash loop: 4 workers failed")
            && last.contains("deliberate failure of worker 4"),
        "last stderr line: {last:?}"
    );
    assert!(!f.saw("fork 5 "), "respawned after the guard tripped");
    f.all_workers_gone();
}

/// The signals operators send by habit never end the cluster by their default action: SIGUSR1
/// is an event for the application (reopen logs) and the cluster serves on; SIGQUIT is a
/// graceful stop, exit 0.
#[test]
fn sigusr1_asks_to_reopen_logs_and_sigquit_stops_gracefully() {
    let mut f = Fixture::start(2, &[]);
    f.listening(1);
    f.listening(2);
    let port = f.port();
    for _ in 0..2 {
        f.signal(Signal::SIGUSR1);
        f.expect("reopen-logs");
    }
    assert!(ask(port, "x").unwrap().starts_with("worker "));
    assert!(!f.saw("exit "), "no worker left");
    f.signal(Signal::SIGQUIT);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    f.all_workers_gone();
}

/// Workers that served a while and die (SIGKILL, 8 times within the crash window, against a
/// limit of 3) are bad luck, not a loop: each is replaced and the cluster never stops. Workers
/// that die at start still trip the guard (`a_worker_that_exits_1_in_a_loop_trips_the_crash_loop_guard`).
#[test]
fn workers_killed_after_serving_never_trip_the_crash_loop_guard() {
    let env = [("CRASH_LIMIT", "3"), ("MIN_UPTIME_MS", "300")];
    let mut f = Fixture::start(2, &env);
    let mut pid = f.listening(1);
    f.listening(2);
    let port = f.port();
    for next in 3..11 {
        std::thread::sleep(Duration::from_millis(400));
        sigkill(pid);
        pid = f.listening(next);
    }
    assert!(!f.saw("error 0 CrashLoop"), "the guard stopped the cluster");
    assert!(ask(port, "x").unwrap().starts_with("worker "));
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
}

/// Three workers print 10,000 lines each on stdout (and 1,000 on stderr) through the primary:
/// every line arrives once, whole, with its worker's prefix; a worker killed right after it
/// printed loses none of its lines.
#[test]
fn worker_output_arrives_line_by_line_with_each_workers_prefix() {
    let env = [
        ("LOG_PREFIX", "[worker {id}] "),
        ("PRINT_LINES", "10000"),
        ("RESPAWN", "off"),
    ];
    let mut f = Fixture::start(3, &env);
    let pids: Vec<u32> = (1..=3).map(|id| f.listening(id)).collect();
    // Worker 3 dies at once: what it wrote is in its pipe and must still come out.
    sigkill(pids[2]);
    // Every line the primary printed is in `seen`, also those read while waiting above.
    let prefixed = |f: &Fixture| {
        f.p.seen
            .iter()
            .filter(|l| l.starts_with("[worker "))
            .count()
    };
    let deadline = Instant::now() + WAIT;
    while prefixed(&f) < 30_000 {
        assert!(Instant::now() < deadline, "{} prefixed lines", prefixed(&f));
        let _ = f.p.line_within(Duration::from_millis(500));
    }
    let mut seen = std::collections::BTreeMap::<u32, Vec<u32>>::new();
    for line in &f.p.seen {
        let Some(rest) = line.strip_prefix("[worker ") else {
            assert!(
                !line.contains("out "),
                "a worker's line without its prefix, or cut: {line:?}"
            );
            continue;
        };
        let (id, text) = rest.split_once("] ").expect("a whole prefix");
        let id: u32 = id.parse().unwrap();
        let words: Vec<&str> = text.split(' ').collect();
        assert_eq!(words.len(), 3, "a whole line: {line:?}");
        assert_eq!(words[0], "out", "{line:?}");
        assert_eq!(
            words[1].parse::<u32>().unwrap(),
            id,
            "the prefix names the writer: {line:?}"
        );
        seen.entry(id).or_default().push(words[2].parse().unwrap());
    }
    for (id, ks) in &mut seen {
        ks.sort_unstable();
        assert!(
            ks.iter().copied().eq(0..10_000),
            "worker {id}: every line once"
        );
    }
    let stderr_has = |id: u32| f.p.stderr_says(&format!("[worker {id}] err {id} 999\n"));
    assert!((1..=3).all(stderr_has), "stderr lines, prefixed");
    let err_lines =
        f.p.stderr()
            .lines()
            .filter(|l| l.starts_with("[worker "))
            .count();
    assert_eq!(err_lines, 3_000, "every stderr line once");
}

/// Waits for the heartbeat's verdict on worker `id`: unresponsive.
fn expect_unresponsive(f: &mut Fixture, id: u32) {
    let err = f.expect(&format!("error {id} "));
    assert!(
        err.starts_with(&format!("error {id} Unresponsive "))
            && err.contains("did not answer heartbeats"),
        "{err}"
    );
}

/// A stuck worker that keeps writing `Pong`s for a long-past heartbeat, and for one never sent,
/// is still found unresponsive: only an answer to the latest ping counts.
#[test]
fn stale_pongs_do_not_keep_a_hung_worker_alive() {
    let mut f = Fixture::start(1, &[]);
    let pid1 = f.listening(1);
    // A few heartbeats go by first, so the worker's `Pong(1)` is stale.
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    f.send("do 1 stale-pongs");
    expect_unresponsive(&mut f, 1);
    let took = asked.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(
        f.expect("exit 1 ")
            .starts_with("exit 1 SIGKILL ead=Some(false)")
    );
    wait_gone(pid1);
    f.listening(2);
}

/// A worker that sends descriptors no frame announces has its channel cut, and every one of them
/// is closed: the primary's descriptor count goes back to where it was, and the other worker
/// serves on.
#[test]
fn unannounced_descriptors_leave_nothing_open_in_the_primary() {
    let mut f = Fixture::start(2, &[("RESPAWN", "off")]);
    f.listening(1);
    let pid2 = f.listening(2);
    let port = f.port();
    let primary = f.p.pid();
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let before = fds(primary);
    f.send("do 1 fd-flood");
    let err = f.expect("error 1 ");
    assert!(err.contains("descriptor"), "{err}");
    f.expect("exit 1 ");
    let after = fds(primary);
    assert!(
        after < before,
        "the primary had {before} descriptors before, {after} after worker 1 left"
    );
    for _ in 0..5 {
        assert_eq!(served_by(&ask(port, "x").unwrap()), 2);
    }
    assert!(alive(pid2));
}

/// A worker that floods the channel with `Ping`s for 10 s gets no `Pong` for any of them: the
/// primary's memory stays within 64 MiB of where it started, and it serves on.
#[test]
fn a_ping_flood_costs_the_primary_bounded_memory() {
    // The worker's runtime waits out the flood: a heartbeat timeout above it.
    let mut f = Fixture::start(1, &[("HB_TIMEOUT_MS", "30000")]);
    f.listening(1);
    let port = f.port();
    let primary = f.p.pid();
    let before = common::rss_kib(primary);
    f.send("do 1 ping-flood");
    let (mut most, end) = (before, Instant::now() + Duration::from_secs(10));
    while Instant::now() < end {
        most = most.max(common::rss_kib(primary));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("ping flood: primary VmRSS {before} KiB before, at most {most} KiB during");
    assert!(
        most.saturating_sub(before) < 64 * 1024,
        "the primary grew from {before} to {most} KiB"
    );
    let answer = ask(port, "x");
    let next = f.p.line_within(Duration::from_millis(500));
    assert!(
        answer.as_ref().is_ok_and(|a| a.starts_with("worker 1 ")),
        "{answer:?}; seen: {:?}; next: {next:?}; stderr: {}",
        f.p.seen,
        f.p.stderr()
    );
    assert!(!f.saw("exit 1 "), "the worker was not killed");
}

#[test]
fn a_hung_worker_is_killed_by_the_heartbeat_and_replaced() {
    let mut f = Fixture::start(2, &[]);
    let pid1 = f.listening(1);
    let pid2 = f.listening(2);
    let asked = Instant::now();
    f.send("do 1 hang");
    expect_unresponsive(&mut f, 1);
    // Killed only after the timeout (1 s), and not much later.
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(
        f.expect("exit 1 ")
            .starts_with("exit 1 SIGKILL ead=Some(false)")
    );
    assert!(f.index("error 1 ") < f.index("exit 1 "));
    f.listening(3);
    wait_gone(pid1);
    // The healthy worker answered its pings all along.
    assert!(alive(pid2));
    assert!(!f.saw("exit 2 "));
    f.no_zombies();
}

#[test]
fn a_worker_flooding_the_channel_is_cut_off_and_the_others_keep_working() {
    let mut f = Fixture::start(2, &[]);
    let pid1 = f.listening(1);
    let pid2 = f.listening(2);
    f.send("do 1 flood");
    let err = f.expect("error 1 ");
    assert!(
        err.starts_with("error 1 FrameTooLarge ") && err.contains("exceeds the limit"),
        "{err}"
    );
    f.expect("disconnect 1 ");
    // Its channel closed, the worker leaves (and, unplanned, is replaced).
    f.expect("exit 1 ");
    wait_gone(pid1);
    f.send("do 2 echo still-here");
    f.expect(r#"message 2 Echo("still-here")"#);
    let port = f.port();
    for _ in 0..4 {
        ask(port, "ok").unwrap();
    }
    assert!(alive(pid2));
    f.listening(3);
    f.no_zombies();
}

#[test]
fn a_worker_that_never_comes_online_is_killed_after_the_boot_timeout() {
    let mut f = Fixture::start(
        1,
        &[
            ("BOOT_TIMEOUT_MS", "1500"),
            ("RESPAWN", "off"),
            ("ADDR", "none"),
        ],
    );
    f.expect("online 1");
    // A program that never says hello.
    f.send("exec /bin/sleep");
    f.send("args 600");
    f.next("args set");
    let forked = Instant::now();
    f.send("fork");
    f.expect("forked 2");
    let err = f.expect("error 2 ");
    assert!(
        err.starts_with("error 2 Unresponsive ") && err.contains("did not come online"),
        "{err}"
    );
    let took = forked.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(f.expect("exit 2 ").starts_with("exit 2 SIGKILL"));
    f.all_workers_gone_but(1);
    f.no_zombies();
}

impl Fixture {
    /// Every forked worker but `keep` is gone.
    fn all_workers_gone_but(&mut self, keep: u32) {
        self.track();
        let keep_pid = self.listening_pid(keep);
        for pid in self.pids.0.clone() {
            if Some(pid) != keep_pid {
                wait_gone(pid);
            }
        }
    }

    fn listening_pid(&self, id: u32) -> Option<u32> {
        let prefix = format!("fork {id} ");
        self.p
            .seen
            .iter()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

// ---------------------------------------------------------------------------------------------
// Planned exits and live scaling

#[test]
fn planned_exits_are_never_respawned() {
    let mut f = Fixture::start(3, &[]);
    let pids: Vec<u32> = (1..=3).map(|id| f.listening(id)).collect();
    // Worker-side disconnect, then a primary-side one.
    f.send("do 1 leave");
    f.send("disconnect 2");
    assert_eq!(f.expect("exit 1 "), "exit 1 0 ead=Some(true) error=None");
    assert_eq!(f.expect("exit 2 "), "exit 2 0 ead=Some(true) error=None");
    wait_gone(pids[0]);
    wait_gone(pids[1]);
    // Well past the 20 ms backoff: nobody was forked.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(f.workers(), vec![(3, pids[2])]);
    assert!(!f.saw("fork 4 "), "seen: {:#?}", f.p.seen);
    f.no_zombies();
}

#[test]
fn sigttin_adds_a_worker_and_sigttou_removes_one_gracefully() {
    let mut f = Fixture::start(1, &[]);
    let pid1 = f.listening(1);
    f.signal(Signal::SIGTTIN);
    let pid2 = f.listening(2);
    let port = f.port();
    let mut by = std::collections::BTreeSet::new();
    for _ in 0..6 {
        by.insert(served_by(&ask(port, "x").unwrap()));
    }
    assert_eq!(by, [1, 2].into(), "round-robin over both workers");
    // The newest leaves, gracefully: a planned exit with code 0, not replaced.
    f.signal(Signal::SIGTTOU);
    assert_eq!(f.expect("exit 2 "), "exit 2 0 ead=Some(true) error=None");
    wait_gone(pid2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.workers(), vec![(1, pid1)]);
    assert!(!f.saw("fork 3 "));
    assert_eq!(served_by(&ask(port, "x").unwrap()), 1);
    f.no_zombies();
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[test]
fn sigterm_lets_in_flight_work_finish_and_exits_0() {
    let mut f = Fixture::start(2, &[("BEHAVIOUR_2", "linger:500")]);
    f.listening(1);
    f.listening(2);
    let port = f.port();
    // A request in flight when the signal comes: the worker holds it 700 ms.
    let client = std::thread::spawn(move || ask(port, "slow"));
    let busy = f.expect("message ");
    assert!(busy.ends_with(" Busy"), "{busy}");
    let t = Instant::now();
    f.signal(Signal::SIGTERM);
    let answer = client
        .join()
        .unwrap()
        .expect("the in-flight request completes");
    assert!(
        answer.starts_with("worker ") && answer.ends_with(" slow"),
        "{answer}"
    );
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    // Worker 2 waited 500 ms after its disconnect before leaving.
    assert!(t.elapsed() >= Duration::from_millis(450));
    // Both left as asked, and `main` saw both exits before the stream ended.
    for id in 1..=2 {
        assert_eq!(
            f.expect(&format!("exit {id} ")),
            format!("exit {id} 0 ead=Some(true) error=None")
        );
        assert!(f.index(&format!("exit {id} ")) < f.index("events ended"));
    }
    assert!(!f.saw("fork 3 "), "a worker was respawned during shutdown");
    f.all_workers_gone();
}

#[test]
fn reloads_asked_at_once_run_one_rollout_and_one_more() {
    let mut f = Fixture::start(1, &[]);
    f.listening(1);
    f.send("reloads 20");
    assert_eq!(f.expect("reloads done"), "reloads done ok=20");
    // The first rollout replaced worker 1 by 2; the 19 asked meanwhile shared one more: 3.
    f.expect("exit 2 ");
    assert!(!f.saw("fork 4 "), "more than two rollouts: {:#?}", f.p.seen);
    let ids: Vec<u32> = f.workers().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, [3]);
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    f.all_workers_gone();
}

#[test]
fn sigttin_during_a_reload_applies_after_it() {
    // The first replacement takes a second to listen: SIGTTIN comes during the rollout.
    let mut f = Fixture::start(2, &[("BEHAVIOUR_3", "late:1000")]);
    f.listening(1);
    f.listening(2);
    f.signal(Signal::SIGHUP);
    f.expect("fork 3 ");
    f.signal(Signal::SIGTTIN);
    // The rollout goes on with one replacement at a time (4 replaces 2), then the extra worker.
    f.listening(5);
    let order = ["fork 3 ", "exit 1 ", "fork 4 ", "exit 2 ", "fork 5 "];
    let at: Vec<usize> = order.iter().map(|p| f.index(p)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "order {order:?} at {at:?}; seen: {:#?}",
        f.p.seen
    );
    let ids: Vec<u32> = f.workers().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, [3, 4, 5]);
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    f.all_workers_gone();
}

#[test]
fn sigterm_during_a_reload_forks_nothing_more_and_exits_0() {
    // The first replacement takes a second to listen: the shutdown comes in that window.
    let mut f = Fixture::start(2, &[("BEHAVIOUR_3", "late:1000")]);
    f.listening(1);
    f.listening(2);
    f.signal(Signal::SIGHUP);
    f.expect("fork 3 ");
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    assert!(
        !f.saw("fork 4 "),
        "a worker was forked after SIGTERM: {:#?}",
        f.p.seen
    );
    assert!(
        !f.p.seen.iter().any(|l| l.contains("did not become ready")),
        "the shutdown was reported as a failed reload: {:#?}",
        f.p.seen
    );
    for id in 1..=3 {
        f.expect(&format!("exit {id} "));
    }
    f.all_workers_gone();
}

#[test]
fn a_worker_that_ignores_the_disconnect_is_killed_after_the_grace() {
    let mut f = Fixture::start(2, &[("BEHAVIOUR_1", "stubborn"), ("GRACE_MS", "1000")]);
    f.listening(1);
    f.listening(2);
    let t = Instant::now();
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(1), "seen: {:#?}", f.p.seen);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let last = f.last_stderr_line("shutdown did not finish within");
    assert!(
        last.contains("shutdown did not finish within"),
        "last stderr line: {last:?}"
    );
    assert_eq!(f.expect("exit 2 "), "exit 2 0 ead=Some(true) error=None");
    f.all_workers_gone();
}

#[test]
fn a_second_sigint_forces_the_shutdown_at_once() {
    let mut f = Fixture::start(1, &[("BEHAVIOUR", "stubborn"), ("GRACE_MS", "60000")]);
    f.listening(1);
    f.signal(Signal::SIGINT);
    // The graceful shutdown has begun: the worker was asked to leave and ignores it.
    f.expect("disconnect 1 ");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        f.p.child.try_wait().unwrap().is_none(),
        "exited before the second SIGINT"
    );
    let t = Instant::now();
    f.signal(Signal::SIGINT);
    assert_eq!(f.exit_code(), Some(1), "seen: {:#?}", f.p.seen);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    f.all_workers_gone();
}

// ---------------------------------------------------------------------------------------------
// Reload

#[test]
fn sighup_replaces_every_worker_each_replacement_listening_before_its_old_one_leaves() {
    let mut f = Fixture::start(2, &[]);
    let old: Vec<u32> = (1..=2).map(|id| f.listening(id)).collect();
    let port = f.port();
    f.signal(Signal::SIGHUP);
    f.listening(3);
    f.listening(4);
    f.expect("exit 2 ");
    // Per pair, in order: the replacement forks and listens, then the old one disconnects and
    // exits, then the next pair starts.
    let order = [
        "fork 3 ",
        "listening 3 ",
        "disconnect 1 ",
        "exit 1 ",
        "fork 4 ",
        "listening 4 ",
        "disconnect 2 ",
        "exit 2 ",
    ];
    let at: Vec<usize> = order.iter().map(|p| f.index(p)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "order {order:?} at {at:?}; seen: {:#?}",
        f.p.seen
    );
    for id in 1..=2 {
        let exit = f.expect(&format!("exit {id} "));
        assert_eq!(exit, format!("exit {id} 0 ead=Some(true) error=None"));
    }
    for pid in old {
        wait_gone(pid);
    }
    // Same port, served by the new workers only.
    assert_eq!(f.port_of(3), port);
    assert_eq!(f.port_of(4), port);
    for _ in 0..4 {
        assert!(matches!(served_by(&ask(port, "x").unwrap()), 3 | 4));
    }
    std::thread::sleep(Duration::from_millis(200));
    let ids: Vec<u32> = f.workers().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![3, 4]);
    assert!(!f.saw("fork 5 "), "seen: {:#?}", f.p.seen);
    f.no_zombies();
}

#[test]
fn a_reload_to_a_missing_binary_keeps_the_old_workers_serving() {
    let mut f = Fixture::start(2, &[]);
    let pids: Vec<u32> = (1..=2).map(|id| f.listening(id)).collect();
    let port = f.port();
    f.send("exec /nonexistent/cluster-new-build");
    f.next("exec set");
    f.signal(Signal::SIGHUP);
    let err = f.expect("error 0 ");
    assert!(
        err.starts_with("error 0 Spawn ") && err.contains("/nonexistent/cluster-new-build"),
        "{err}"
    );
    assert_eq!(
        f.workers(),
        vec![(1, pids[0]), (2, pids[1])],
        "the old workers stay"
    );
    for _ in 0..4 {
        assert!(matches!(served_by(&ask(port, "x").unwrap()), 1 | 2));
    }
    f.no_zombies();
}

/// Starts a reload to `exec`, which starts but never becomes ready; checks the reload stops
/// with an error and the old workers keep serving.
fn failed_reload(exec: &str) -> (Fixture, Vec<u32>) {
    let mut f = Fixture::start(2, &[]);
    let pids: Vec<u32> = (1..=2).map(|id| f.listening(id)).collect();
    let port = f.port();
    f.send(&format!("exec {exec}"));
    f.next("exec set");
    f.signal(Signal::SIGHUP);
    let err = f.expect("error 0 ");
    assert!(
        err.starts_with("error 0 Spawn ")
            && err.contains("replacement worker 3 did not become ready"),
        "{err}"
    );
    f.expect("exit 3 ");
    let ids: Vec<u32> = f.workers().into_iter().map(|(id, _)| id).collect();
    assert!(ids.starts_with(&[1, 2]), "the old workers stay: {ids:?}");
    for _ in 0..4 {
        assert!(matches!(served_by(&ask(port, "x").unwrap()), 1 | 2));
    }
    assert!(alive(pids[0]) && alive(pids[1]));
    (f, pids)
}

#[test]
fn a_reload_to_a_binary_that_exits_at_once_keeps_the_old_workers_serving() {
    let (f, _) = failed_reload("/bin/false");
    f.no_zombies();
}

#[test]
fn a_reload_to_an_incompatible_build_is_refused_and_keeps_the_old_workers_serving() {
    // Another cluster program: other message types, refused at the handshake.
    let other = common::example("fixture_lifecycle");
    let (mut f, _) = failed_reload(other.to_str().unwrap());
    let refused = f.expect("error 3 ");
    assert!(
        refused.starts_with("error 3 Handshake ") && refused.contains("other message types"),
        "{refused}"
    );
    f.no_zombies();
}

#[test]
fn a_failed_reload_replacement_is_not_respawned() {
    let (mut f, pids) = failed_reload("/bin/false");
    // The failed replacement is not respawned from the broken binary over and over (which
    // ends in the crash-loop guard stopping the healthy cluster).
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(f.workers(), vec![(1, pids[0]), (2, pids[1])]);
    assert!(!f.saw("fork 4 "), "seen: {:#?}", f.p.seen);
}

// ---------------------------------------------------------------------------------------------
// systemd

fn recv_notify(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within the timeout: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notify_socket_gets_ready_reloading_and_stopping() {
    let dir = temp_dir("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut f = Fixture::start(2, &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    assert_eq!(recv_notify(&sock), "READY=1");
    // Ready means serving: both workers listen by now.
    f.expect("listening 1 ");
    f.expect("listening 2 ");
    f.signal(Signal::SIGHUP);
    let reloading = recv_notify(&sock);
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|u| u.parse::<u64>().ok());
    assert!(usec.is_some_and(|u| u > 0), "{reloading:?}");
    assert_eq!(recv_notify(&sock), "READY=1");
    // READY again once the reload completed: the last old worker is gone.
    f.expect("exit 2 ");
    f.signal(Signal::SIGTERM);
    assert_eq!(recv_notify(&sock), "STOPPING=1");
    assert_eq!(f.exit_code(), Some(0));
    f.all_workers_gone();
    // The workers never notify: nothing else arrived.
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let extra = sock
        .recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert_eq!(extra, None);
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts the fixture as systemd would for socket activation: `listener` on descriptor 3,
/// `LISTEN_PID` naming the primary itself, `LISTEN_FDS=1`.
fn socket_activated(listener: &TcpListener, env: &[(&str, &str)]) -> Fixture {
    socket_activated_with(listener, "1", env)
}

/// [`socket_activated`] with `LISTEN_FDS` set to `count`, whatever it says.
fn socket_activated_with(listener: &TcpListener, count: &str, env: &[(&str, &str)]) -> Fixture {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let exe = common::example(FIXTURE);
    let mut cmd = command("/bin/sh", env);
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS="$1" exec "$0""#)
        .arg(&exe)
        .arg(count);
    let fd = listener.as_raw_fd();
    // SAFETY: runs in the forked child before `exec`; `dup2` and `fcntl` are async-signal-safe
    // and touch only descriptor numbers (the listener's, copied by the fork, and 3).
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // `dup2` clears close-on-exec on the copy, but not when `fd` is already 3.
            if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Fixture::spawn(cmd)
}

/// Two workers on the test's socket, handed over as systemd does; each request is served.
fn serve_inherited(listener: &TcpListener) {
    let port = listener.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut f = socket_activated(listener, &[("CLUSTER_WORKERS", "2"), ("ADDR", &addr)]);
    // No EADDRINUSE: the workers got the very socket the test holds.
    f.listening(1);
    f.listening(2);
    assert!(!f.saw("error "), "seen: {:#?}", f.p.seen);
    assert_eq!(f.port(), port);
    let mut by = std::collections::BTreeSet::new();
    for _ in 0..6 {
        by.insert(served_by(
            &ask(port, "x").expect("served through the inherited socket"),
        ));
    }
    assert_eq!(by, [1, 2].into());
    // A reload keeps serving the same socket.
    f.signal(Signal::SIGHUP);
    f.expect("exit 2 ");
    assert!(matches!(served_by(&ask(port, "x").unwrap()), 3 | 4));
    assert!(!f.saw("error "), "seen: {:#?}", f.p.seen);
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0));
    f.all_workers_gone();
}

#[test]
fn socket_activation_serves_the_inherited_socket() {
    // As systemd with `NonBlocking=yes`.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    serve_inherited(&listener);
}

#[test]
fn socket_activation_serves_a_blocking_inherited_socket() {
    // As systemd by default (`NonBlocking=no`).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    serve_inherited(&listener);
}

/// The line of `f`'s stderr that contains `needle`, once it arrived (or `WAIT` passed).
fn stderr_line(f: &Fixture, needle: &str) -> String {
    let _ = f.last_stderr_line(needle);
    let all = f.p.stderr();
    all.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in stderr: {all}"))
        .to_owned()
}

#[test]
fn listen_fds_edge_values_start_at_once_with_a_clear_line() {
    // A huge count with one socket: the primary stops at descriptor 4, which is not open.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    let mut f = socket_activated_with(
        &listener,
        "2147483000",
        &[("CLUSTER_WORKERS", "1"), ("ADDR", &addr)],
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "start took {:?}",
        t.elapsed()
    );
    f.listening(1);
    assert_eq!(served_by(&ask(port, "x").unwrap()), 1);
    let line = stderr_line(&f, "LISTEN_FDS");
    assert!(
        line.contains("LISTEN_FDS=2147483000, but descriptor 4 is not open: using the 1 socket"),
        "{line}"
    );
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0));
    f.all_workers_gone();
    // Past libsystemd's bound, or not a number: ignored, said, and the cluster binds its own.
    for count in ["2147483647", "-1", "many"] {
        let t = Instant::now();
        let mut f = socket_activated_with(&listener, count, &[("CLUSTER_WORKERS", "1")]);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "start took {:?}",
            t.elapsed()
        );
        f.listening(1);
        let line = stderr_line(&f, "LISTEN_FDS");
        assert!(
            line.contains("is not a descriptor count; ignored"),
            "{count}: {line}"
        );
        f.signal(Signal::SIGTERM);
        assert_eq!(f.exit_code(), Some(0));
        f.all_workers_gone();
    }
}

#[test]
fn socket_activation_keeps_the_inherited_socket_after_the_workers_leave() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut f = socket_activated(&listener, &[("CLUSTER_WORKERS", "1"), ("ADDR", &addr)]);
    let pid1 = f.listening(1);
    assert_eq!(served_by(&ask(port, "x").unwrap()), 1);
    // The only worker crashes; its replacement serves the inherited socket again.
    f.send("do 1 exit 3");
    wait_gone(pid1);
    f.listening(2);
    assert!(!f.saw("error "), "seen: {:#?}", f.p.seen);
    assert_eq!(served_by(&ask(port, "x").unwrap()), 2);
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0));
    f.all_workers_gone();
    // The socket still belongs to the service manager and listens after the service stopped:
    // a client's connection waits in its queue for the next activation.
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), WAIT)
        .expect("the inherited socket still listens after the primary exits");
}

// ---------------------------------------------------------------------------------------------
// Races at the end of the event stream, each run several times.

#[test]
fn every_exit_event_is_delivered_before_the_event_stream_ends() {
    for _ in 0..5 {
        let mut f = Fixture::start(2, &[]);
        f.listening(1);
        f.listening(2);
        f.signal(Signal::SIGTERM);
        assert_eq!(f.exit_code(), Some(0));
        let ended = f.index("events ended");
        for id in 1..=2 {
            assert!(f.index(&format!("exit {id} ")) < ended, "{:#?}", f.p.seen);
        }
    }
}

#[test]
fn a_forced_shutdown_always_exits_1() {
    for _ in 0..10 {
        let mut f = Fixture::start(1, &[("BEHAVIOUR", "stubborn"), ("GRACE_MS", "300")]);
        f.listening(1);
        f.signal(Signal::SIGTERM);
        assert_eq!(f.exit_code(), Some(1), "seen: {:#?}", f.p.seen);
        f.all_workers_gone();
    }
}

// ---------------------------------------------------------------------------------------------
// hello_http

fn hello_http(env: &[(&str, &str)]) -> Proc {
    Proc::spawn(command(common::example("hello_http"), env))
}

/// A port free right now on every interface.
fn free_port() -> u16 {
    common::free_low_port()
}

/// One `GET /` on a new connection; whether it got `200` and the body.
fn get(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.starts_with("HTTP/1.1 200") && out.ends_with("hello world\n") {
        Ok(())
    } else {
        Err(format!("bad response {out:?}"))
    }
}

/// The pids of `Worker <pid> started` lines, waiting for `n` of them.
fn started_workers(p: &mut Proc, n: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    while pids.len() < n {
        let l = p.wait_for("a worker start", |l| {
            l.starts_with("Worker ") && l.ends_with(" started")
        });
        pids.push(l.split_whitespace().nth(1).unwrap().parse().unwrap());
    }
    pids
}

/// `hello_http` with `workers` workers on a port the test holds: every worker fails to bind, and
/// the default policy's crash-loop guard stops the cluster.
fn crash_loop_on_a_taken_port(workers: &str) {
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut p = hello_http(&[("PORT", &port), ("CLUSTER_WORKERS", workers)]);
    // The default policy (5 failures, or one more than the live workers, within 60 s, backoff
    // from 100 ms doubling) trips within seconds. Bounded well above.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running after 60 s; stderr: {}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "stderr: {}", p.stderr());
    let last = last_stderr_line(&p, "cluster: crash loop:");
    assert!(
        last.starts_with("cluster: crash loop:") && last.contains("in use"),
        "last stderr line: {last:?}"
    );
    drop(taken);
}

#[test]
fn hello_http_on_a_taken_port_stops_with_a_crash_loop_error() {
    crash_loop_on_a_taken_port("2");
}

#[test]
fn hello_http_with_one_worker_on_a_taken_port_stops_too() {
    // One worker failing alone: the backoff spreads its failures, the guard must still trip.
    crash_loop_on_a_taken_port("1");
}

#[test]
fn hello_http_exits_0_on_sigterm_and_leaves_no_worker() {
    let port = free_port().to_string();
    let mut p = hello_http(&[("PORT", &port), ("CLUSTER_WORKERS", "2")]);
    let pids = started_workers(&mut p, 2);
    let _guard = KillOnDrop(pids.clone());
    let port: u16 = port.parse().unwrap();
    for _ in 0..4 {
        get(port).unwrap();
    }
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit().code(), Some(0), "stderr: {}", p.stderr());
    for pid in pids {
        wait_gone(pid);
    }
}

#[test]
fn a_2s_shutdown_with_an_idle_keep_alive_client_exits_0() {
    // The drain's idle grace is 2 s too: without the primary's grace it would reach the kill.
    let port = free_port();
    let mut p = hello_http(&[
        ("PORT", &port.to_string()),
        ("CLUSTER_WORKERS", "1"),
        ("CLUSTER_SHUTDOWN_TIMEOUT", "2"),
    ]);
    let pids = started_workers(&mut p, 1);
    let _guard = KillOnDrop(pids.clone());
    // One request on a keep-alive connection, which then stays open and silent.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.set_read_timeout(Some(WAIT)).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"hello world\n") {
        let n = idle.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    let t = Instant::now();
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit().code(), Some(0), "stderr: {}", p.stderr());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    // The idle connection was closed by the drain, not left to the kill.
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0);
    for pid in pids {
        wait_gone(pid);
    }
}

#[test]
fn hello_http_sigkill_of_the_primary_under_load_leaves_no_worker() {
    let port = free_port();
    let mut p = hello_http(&[("PORT", &port.to_string()), ("CLUSTER_WORKERS", "2")]);
    let pids = started_workers(&mut p, 2);
    let _guard = KillOnDrop(pids.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if get(port).is_ok() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while ok.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "no load reached the workers");
        std::thread::sleep(Duration::from_millis(5));
    }
    p.signal(Signal::SIGKILL);
    p.wait_exit();
    for pid in &pids {
        wait_gone(*pid);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    // Nobody serves the port any more.
    assert!(get(port).is_err());
}

#[test]
fn a_binary_upgrade_reloads_onto_the_new_build() {
    // The "new build": the same program at another path, as a package upgrade would install it.
    let new_build = std::env::temp_dir().join(format!("cluster-upgrade-{}", std::process::id()));
    std::fs::copy(common::example("fixture_production"), &new_build).unwrap();
    let mut f = Fixture::start(2, &[]);
    let old: Vec<u32> = (1..=2).map(|id| f.listening(id)).collect();
    let port = f.port();
    f.send(&format!("exec {}", new_build.display()));
    f.next("exec set");
    f.signal(Signal::SIGHUP);
    let new: Vec<u32> = (3..=4).map(|id| f.listening(id)).collect();
    for pid in &old {
        wait_gone(*pid);
    }
    // The replacements run the new file; the port never changed.
    for pid in &new {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(exe, new_build, "worker {pid} runs {}", exe.display());
    }
    for _ in 0..4 {
        assert!(matches!(served_by(&ask(port, "x").unwrap()), 3 | 4));
    }
    f.no_zombies();
    let _ = std::fs::remove_file(&new_build);
}

#[test]
fn after_a_failed_reload_respawns_use_the_build_that_works() {
    let (mut f, pids) = failed_reload("/bin/false");
    // An old worker crashes after the failed upgrade: its replacement must not come from the
    // broken build (which would end in the crash-loop guard) but from the one that serves.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), Signal::SIGKILL).unwrap();
    let pid = f.listening(4);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe.file_name(),
        common::example("fixture_production").file_name()
    );
    f.no_zombies();
}

// ---------------------------------------------------------------------------------------------
// Descriptor pressure

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let mut f = stat.rsplit(')').next().unwrap_or("").split_whitespace();
    // After `comm`: state is field 3, utime 14 and stime 15.
    let ticks: u64 = f.nth(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// The whole cluster at 64 descriptors a process and 160 clients at once, each holding its
/// connection 700 ms: far more than the workers can hold. No worker dies (before: the worker's
/// `recvmsg` of handed-over connections was truncated, it exited, its replacements too, and the
/// crash-loop guard stopped the cluster), no worker spins on `EMFILE`, and every client is
/// served: the ones beyond the limit wait in the kernel's queue or the primary's.
fn every_client_is_served_at_the_descriptor_limit(policy: &str) {
    let mut cmd = command(
        common::example(FIXTURE),
        &[("CLUSTER_WORKERS", "2"), ("CLUSTER_SCHED_POLICY", policy)],
    );
    // SAFETY: `setrlimit` is async-signal-safe and only touches the child about to exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            use nix::sys::resource::{Resource, setrlimit};
            setrlimit(Resource::RLIMIT_NOFILE, 64, 64).map_err(std::io::Error::from)
        });
    }
    let mut f = Fixture::spawn(cmd);
    f.listening(1);
    f.listening(2);
    let port = f.port();
    let before = f.workers();
    let cpu_before: Vec<Duration> = before.iter().map(|(_, pid)| cpu_time(*pid)).collect();
    let started = Instant::now();
    let answers: Vec<Result<String, String>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..160).map(|_| s.spawn(|| ask(port, "slow"))).collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let wall = started.elapsed();
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{policy}: {} of 160 failed: {failed:?}; stderr: {}",
        failed.len(),
        f.p.stderr()
    );
    for a in &answers {
        assert!(a.as_ref().unwrap().ends_with(" slow"), "{a:?}");
    }
    assert!(
        !f.saw("exit "),
        "{policy}: a worker exited: {:#?}\n{}",
        f.p.seen,
        f.p.stderr()
    );
    assert_eq!(f.workers(), before, "{policy}: the same workers serve");
    for ((id, pid), cpu) in before.iter().zip(cpu_before) {
        let used = cpu_time(*pid).saturating_sub(cpu);
        // Serving 80 slow requests takes a few milliseconds of CPU; spinning on `EMFILE`
        // takes all of it.
        assert!(
            used < wall / 2,
            "{policy}: worker {id} used {used:?} of CPU in {wall:?}"
        );
    }
    assert!(ask(port, "after").unwrap().ends_with(" after"));
}

#[test]
fn at_the_descriptor_limit_round_robin_serves_every_client() {
    every_client_is_served_at_the_descriptor_limit("round-robin");
}

#[test]
fn at_the_descriptor_limit_shared_serves_every_client() {
    every_client_is_served_at_the_descriptor_limit("shared");
}

#[test]
fn at_the_descriptor_limit_reuseport_serves_every_client() {
    every_client_is_served_at_the_descriptor_limit("reuseport");
}

// ---------------------------------------------------------------------------------------------
// Nothing queued is reset: shutdown and scale-down under a counted load

/// What a client load saw, per request: answered, refused at connect (the port closed or
/// not taking connections), or failed after the connection was made (reset, or closed
/// without an answer): the one kind a drain must never cause.
#[derive(Debug, Default)]
struct Counts {
    served: usize,
    refused: usize,
    failed: Vec<String>,
}

/// Four clients asking `port` in a loop, a new connection per request, until `stop`.
fn load(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Counts> {
    std::thread::spawn(move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut c = Counts::default();
                    while !stop.load(Ordering::Relaxed) {
                        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                        {
                            Ok(s) => s,
                            Err(_) => {
                                c.refused += 1;
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        };
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let mut out = String::new();
                        match writeln!(s, "q").and_then(|()| s.read_to_string(&mut out)) {
                            Ok(_) if out.ends_with(" q\n") => c.served += 1,
                            Ok(_) => c.failed.push(format!("answer {out:?}")),
                            Err(e) => c.failed.push(e.to_string()),
                        }
                    }
                    c
                })
            })
            .collect();
        let mut all = Counts::default();
        for c in clients {
            let c = c.join().unwrap();
            all.served += c.served;
            all.refused += c.refused;
            all.failed.extend(c.failed);
        }
        all
    })
}

/// A client load running, until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    clients: std::thread::JoinHandle<Counts>,
}

impl Load {
    /// Stops the clients; what they saw, once checked that some were served and none failed.
    fn finish(self, what: &str) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        let c = self.clients.join().unwrap();
        eprintln!("{what}: {c:?}");
        assert!(c.served > 0, "{what}: {c:?}");
        assert!(c.failed.is_empty(), "{what}: {c:?}");
        c
    }
}

/// The fixture with two workers listening under `policy`, and a client load on their port.
fn two_workers_under_load(policy: &str) -> (Fixture, Load) {
    let mut f = Fixture::start(2, &[("CLUSTER_SCHED_POLICY", policy)]);
    f.listening(1);
    f.listening(2);
    let port = f.port();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(port, stop.clone());
    (f, Load { stop, clients })
}

/// SIGTERM under load: every connection that was made is answered; after the exit, clients
/// are refused at connect. (Before, under shared and reuseport, connections the kernel had
/// queued on the listening sockets were reset when they closed.)
fn shutdown_under_load_fails_nothing(policy: &str) {
    let (mut f, clients) = two_workers_under_load(policy);
    std::thread::sleep(Duration::from_millis(500));
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    f.all_workers_gone();
    std::thread::sleep(Duration::from_millis(200));
    clients.finish(&format!("{policy}: shutdown under load"));
}

#[test]
fn shutdown_under_load_fails_no_request_under_round_robin() {
    shutdown_under_load_fails_nothing("round-robin");
}

#[test]
fn shutdown_under_load_fails_no_request_under_shared() {
    shutdown_under_load_fails_nothing("shared");
}

#[test]
fn shutdown_under_load_fails_no_request_under_reuseport() {
    shutdown_under_load_fails_nothing("reuseport");
}

/// Scale 2 → 4 → 2 three times under load: every request is answered, none refused. (Before,
/// under reuseport, the connections the kernel had queued on a retired slot's socket were
/// reset when it closed.)
fn scale_down_under_load_fails_nothing(policy: &str) {
    let (mut f, clients) = two_workers_under_load(policy);
    let mut next = 3;
    for _ in 0..3 {
        for _ in 0..2 {
            f.signal(Signal::SIGTTIN);
            f.listening(next);
            next += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
        // One at a time: two signals sent together may arrive as one.
        for _ in 0..2 {
            f.signal(Signal::SIGTTOU);
            let exit = f.next("exit ");
            assert!(exit.ends_with(" 0 ead=Some(true) error=None"), "{exit}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let c = clients.finish(&format!("{policy}: scale-down under load"));
    assert_eq!(c.refused, 0, "{policy}: {c:?}");
    assert!(!f.saw("exit 1 ") && !f.saw("exit 2 "), "the first two stay");
}

#[test]
fn scale_down_under_load_fails_no_request_under_round_robin() {
    scale_down_under_load_fails_nothing("round-robin");
}

#[test]
fn scale_down_under_load_fails_no_request_under_shared() {
    scale_down_under_load_fails_nothing("shared");
}

#[test]
fn scale_down_under_load_fails_no_request_under_reuseport() {
    scale_down_under_load_fails_nothing("reuseport");
}

/// SIGTERM while a reload replaces the workers, under load: nothing that connected fails.
fn sigterm_during_reload_under_load_fails_nothing(policy: &str) {
    let (mut f, clients) = two_workers_under_load(policy);
    std::thread::sleep(Duration::from_millis(300));
    f.signal(Signal::SIGHUP);
    f.expect("fork 3 ");
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    f.all_workers_gone();
    clients.finish(&format!("{policy}: SIGTERM during a reload under load"));
    assert!(
        !f.saw("fork 5 "),
        "{policy}: the rollout went on after SIGTERM"
    );
}

#[test]
fn sigterm_during_a_reload_under_load_fails_no_request_under_round_robin() {
    sigterm_during_reload_under_load_fails_nothing("round-robin");
}

#[test]
fn sigterm_during_a_reload_under_load_fails_no_request_under_shared() {
    sigterm_during_reload_under_load_fails_nothing("shared");
}

#[test]
fn sigterm_during_a_reload_under_load_fails_no_request_under_reuseport() {
    sigterm_during_reload_under_load_fails_nothing("reuseport");
}

// ---------------------------------------------------------------------------------------------
// A new build

/// The inode of the executable process `pid` runs.
fn exe_inode(pid: u32) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/proc/{pid}/exe")).unwrap())
}

fn inode(path: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// A deploy installs a new build over the binary's path (a new file renamed over it). A crash
/// respawn keeps running the build that serves; SIGHUP replaces every worker with the new
/// one, which then serves, so later respawns run it too. (Before: every worker, reloaded or
/// respawned, ran the build the primary was started with.)
#[test]
fn a_reload_runs_the_build_installed_at_the_path_and_respawns_run_the_serving_one() {
    let dir = temp_dir("new-build");
    let bin = dir.join("app");
    std::fs::copy(common::example(FIXTURE), &bin).unwrap();
    let v1 = inode(&bin);
    let mut f = Fixture::spawn(command(&bin, &[("CLUSTER_WORKERS", "2")]));
    let p1 = f.listening(1);
    let p2 = f.listening(2);
    assert_eq!((exe_inode(p1), exe_inode(p2)), (v1, v1));
    let port = f.port();
    let staged = dir.join("app.new");
    std::fs::copy(common::example(FIXTURE), &staged).unwrap();
    std::fs::rename(&staged, &bin).unwrap();
    let v2 = inode(&bin);
    assert_ne!(v1, v2);

    sigkill(p1);
    let p3 = f.listening(3);
    assert_eq!(exe_inode(p3), v1, "a crash respawn runs the serving build");

    f.signal(Signal::SIGHUP);
    f.expect("exit 2 ");
    f.expect("exit 3 ");
    let workers = f.workers();
    assert_eq!(workers.iter().map(|w| w.0).collect::<Vec<_>>(), [4, 5]);
    for (id, pid) in &workers {
        assert_eq!(exe_inode(*pid), v2, "worker {id} runs the new build");
    }
    assert!(ask(port, "x").unwrap().starts_with("worker "));

    sigkill(workers[0].1);
    let p6 = f.listening(6);
    assert_eq!(exe_inode(p6), v2, "the new build serves: respawns run it");
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    f.all_workers_gone();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload whose binary is gone from the path is refused; the old workers keep serving.
#[test]
fn a_reload_with_no_binary_at_the_path_is_refused_and_the_old_workers_serve() {
    let dir = temp_dir("gone-build");
    let bin = dir.join("app");
    std::fs::copy(common::example(FIXTURE), &bin).unwrap();
    let mut f = Fixture::spawn(command(&bin, &[("CLUSTER_WORKERS", "1")]));
    let p1 = f.listening(1);
    let port = f.port();
    std::fs::remove_file(&bin).unwrap();
    f.send("reload");
    let answer = f.next("reload ");
    assert!(
        answer.contains("cannot open the binary at") && answer.contains("app"),
        "{answer}"
    );
    assert!(!f.saw("fork 2 "));
    assert_eq!(f.workers(), vec![(1, p1)]);
    assert!(ask(port, "x").unwrap().starts_with("worker 1 "));
    f.signal(Signal::SIGTERM);
    assert_eq!(f.exit_code(), Some(0), "stderr: {}", f.p.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}
