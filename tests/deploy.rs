//! Deploying a new build with zero failed requests, counted under a client load: a reload
//! (SIGHUP) brings in the build installed at the binary's path; a full upgrade (SIGUSR2) brings
//! in the primary too, with a rollback when the new one fails.
//!
//! Two real builds: the fixture's binary, and a copy whose build mark is rewritten (a different
//! file with different bytes), renamed over the path as a deploy installs it. This test process
//! is a child subreaper, so the new primary of an upgrade becomes its child once the old one
//! exits, and is reaped here.

mod common;

use std::collections::BTreeSet;
use std::io::BufReader;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Proc, WAIT, alive, wait_gone};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

const FIXTURE: &str = "fixture_deploy";
const MARK: &[u8] = b"CLUSTER-FIXTURE-BUILD:";

/// A directory with the fixture installed as `app`.
struct Deploy {
    dir: PathBuf,
    bin: PathBuf,
}

impl Deploy {
    fn new(tag: &str) -> Deploy {
        let dir = std::env::temp_dir().join(format!("cluster-deploy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("app");
        let d = Deploy { dir, bin };
        d.install("v1:a:serve");
        d
    }

    /// Installs a build of the fixture marked `mark` (`version:types:mode`) at the path: a new
    /// file, renamed over the old one.
    fn install(&self, mark: &str) {
        assert_eq!(mark.len(), 10, "a mark is 10 bytes");
        let mut bytes = std::fs::read(common::example(FIXTURE)).unwrap();
        let at: Vec<usize> = bytes
            .windows(MARK.len())
            .enumerate()
            .filter(|(_, w)| *w == MARK)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 1, "the build mark is in the binary once");
        let at = at[0] + MARK.len();
        bytes[at..at + 10].copy_from_slice(mark.as_bytes());
        let staged = self.dir.join("app.new");
        std::fs::write(&staged, &bytes).unwrap();
        std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::rename(&staged, &self.bin).unwrap();
    }

    /// Starts the primary from the path with 2 workers under `policy`; waits until both listen.
    fn start(&self, policy: &str, env: &[(&str, &str)]) -> Cluster {
        set_subreaper();
        let port = common::free_low_port();
        let mut cmd = Command::new(&self.bin);
        cmd.env("PORT", port.to_string())
            .env("CLUSTER_WORKERS", "2")
            .env("CLUSTER_SCHED_POLICY", policy)
            .envs(env.iter().copied())
            .env_remove("CLUSTER_WORKER_ID")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut p = Proc::spawn(cmd);
        let pid = p.pid();
        p.wait_for("the primary", |l| l == format!("{pid} primary v1"));
        let workers = listening(&mut p, pid, 2);
        Cluster {
            p,
            port,
            workers,
            reap: Reap(Vec::new()),
        }
    }
}

impl Drop for Deploy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Cluster {
    p: Proc,
    port: u16,
    /// The first primary's workers.
    workers: Vec<u32>,
    reap: Reap,
}

/// The pids of the next `n` workers of primary `pid` that listen.
fn listening(p: &mut Proc, pid: u32, n: usize) -> Vec<u32> {
    let prefix = format!("{pid} listening ");
    (0..n)
        .map(|_| {
            let l = p.wait_for("a worker listening", |l| l.starts_with(&prefix));
            l.rsplit(' ').next().unwrap().parse().unwrap()
        })
        .collect()
}

impl Cluster {
    /// The pid of the new primary, from its first line.
    fn new_primary(&mut self, version: &str) -> u32 {
        let old = self.p.pid();
        let suffix = format!(" primary {version}");
        let line = self.p.wait_for("a new primary", |l| {
            l.ends_with(&suffix) && !l.starts_with(&format!("{old} "))
        });
        let pid = line.split(' ').next().unwrap().parse().unwrap();
        self.reap.0.push(pid);
        pid
    }

    /// The next error line of primary `pid`.
    fn error(&mut self, pid: u32, what: &str) -> String {
        let prefix = format!("{pid} error ");
        self.p.wait_for(what, |l| l.starts_with(&prefix))
    }

    /// `n` requests on new connections; each answer's `version@primary`.
    fn answers(&self, n: usize) -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                let a = common::http_get(&mut None, self.port).expect("a request");
                who(&a.body)
            })
            .collect()
    }
}

/// `v1 worker 2 primary 123\n` → `v1@123`.
fn who(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        [version, "worker", _, "primary", pid] => format!("{version}@{pid}"),
        _ => format!("bad body {text:?}"),
    }
}

/// Makes this process the reaper of its orphaned descendants (the new primary of an upgrade,
/// once the old one exits).
fn set_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// Waits for `pid` (our child by adoption) to exit, within `WAIT`; its exit code.
fn reap(pid: u32) -> Option<i32> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = Instant::now() + WAIT;
    loop {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::Signaled(..)) => return None,
            Ok(_) => {}
            Err(e) => panic!("waitpid({pid}): {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} did not exit within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills and reaps the processes a test adopted, if the test did not.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        use nix::sys::wait::{WaitPidFlag, waitpid};
        for pid in &self.0 {
            let pid = Pid::from_raw(*pid as i32);
            if nix::sys::signal::kill(pid, None).is_ok() {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline
                    && matches!(
                        waitpid(pid, Some(WaitPidFlag::WNOHANG)),
                        Ok(nix::sys::wait::WaitStatus::StillAlive)
                    )
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Asserts that the program's stderr says `text` (within `WAIT`).
fn stderr_says(p: &Proc, text: &str) {
    assert!(
        p.stderr_says(text),
        "stderr never said {text:?}: {}",
        p.stderr()
    );
}

fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), sig).unwrap();
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Bare connects, and how many of them were refused.
    connects: AtomicU64,
    refused: AtomicU64,
    /// `version@primary` of every answer.
    seen: Mutex<BTreeSet<String>>,
}

/// Clients until `finish`: two on keep-alive connections, two with a new connection per
/// request, and one that only connects in a tight loop (a refusal means the port closed).
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn load(port: u16) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut threads = Vec::new();
    for keep_alive in [true, true, false, false] {
        let (stop, tally) = (stop.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            let mut conn: Option<BufReader<TcpStream>> = None;
            while !stop.load(Ordering::Relaxed) {
                match common::http_get(&mut conn, port) {
                    Ok(a) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        tally.seen.lock().unwrap().insert(who(&a.body));
                    }
                    Err(e) => {
                        eprintln!("request failed (keep-alive: {keep_alive}): {e}");
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
                if !keep_alive {
                    conn = None;
                }
            }
        }));
    }
    let (s, t) = (stop.clone(), tally.clone());
    threads.push(std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            t.connects.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = TcpStream::connect(("127.0.0.1", port)) {
                eprintln!("connect failed: {e}");
                t.refused.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }));
    // Every client has been served once before the deploy starts.
    let deadline = Instant::now() + WAIT;
    while tally.ok.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "the load never got answers");
        std::thread::sleep(Duration::from_millis(10));
    }
    Load {
        stop,
        tally,
        threads,
    }
}

impl Load {
    /// Stops the clients; asserts that no request failed and no connect was refused.
    fn finish(self, what: &str) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let t = self.tally;
        let (ok, failed) = (
            t.ok.load(Ordering::Relaxed),
            t.failed.load(Ordering::Relaxed),
        );
        let (connects, refused) = (
            t.connects.load(Ordering::Relaxed),
            t.refused.load(Ordering::Relaxed),
        );
        eprintln!(
            "{what}: {ok} requests served, {failed} failed; {connects} bare connects, {refused} refused; answered by {:?}",
            t.seen.lock().unwrap()
        );
        assert_eq!(
            failed,
            0,
            "{what}: {failed} of {} requests failed",
            ok + failed
        );
        assert_eq!(
            refused, 0,
            "{what}: {refused} of {connects} connects refused"
        );
        assert!(ok > 50, "{what}: too few requests to mean anything: {ok}");
        t
    }
}

/// SIGHUP after a new build is installed at the path: every worker is replaced by one that
/// runs it, under load, and no request fails.
#[test]
fn a_reload_brings_in_the_build_installed_at_the_path_and_fails_no_request() {
    let d = Deploy::new("reload");
    let mut c = d.start("round-robin", &[]);
    let old = c.p.pid();
    let l = load(c.port);
    d.install("v2:a:serve");
    c.p.signal(Signal::SIGHUP);
    listening(&mut c.p, old, 2);
    c.p.seen_or_wait("worker 1 gone", |l| {
        l.starts_with(&format!("{old} exit 1 "))
    });
    c.p.seen_or_wait("worker 2 gone", |l| {
        l.starts_with(&format!("{old} exit 2 "))
    });
    let after = c.answers(20);
    let t = l.finish("reload under load");
    assert_eq!(
        after,
        BTreeSet::from([format!("v2@{old}")]),
        "every answer after the reload comes from the new build"
    );
    assert!(t.seen.lock().unwrap().contains(&format!("v1@{old}")));
    c.p.signal(Signal::SIGTERM);
    assert!(c.p.wait_exit().success());
}

#[test]
fn a_full_upgrade_under_load_fails_no_request_round_robin() {
    full_upgrade_under_load("round-robin");
}

#[test]
fn a_full_upgrade_under_load_fails_no_request_shared() {
    full_upgrade_under_load("shared");
}

#[test]
fn a_full_upgrade_under_load_fails_no_request_reuseport() {
    full_upgrade_under_load("reuseport");
}

/// SIGUSR2 after a new build is installed: a new primary from it takes over the port, which
/// never refuses a connection; the old primary and its workers drain and exit; no request fails.
fn full_upgrade_under_load(policy: &str) {
    let d = Deploy::new(&format!("upgrade-{policy}"));
    let mut c = d.start(policy, &[]);
    let old = c.p.pid();
    let l = load(c.port);
    d.install("v2:a:serve");
    let t0 = Instant::now();
    c.p.signal(Signal::SIGUSR2);
    let new = c.new_primary("v2");
    listening(&mut c.p, new, 2);
    c.p.wait_for("the old primary's end", |l| l == format!("{old} ended"));
    let status = c.p.wait_exit();
    let old_gone = t0.elapsed();
    assert!(status.success(), "old primary: {status:?}");
    let mut last_gone = old_gone;
    for w in &c.workers {
        wait_gone(*w);
        last_gone = last_gone.max(t0.elapsed());
        assert!(
            !std::path::Path::new(&format!("/proc/{w}")).exists(),
            "old worker {w} is a zombie"
        );
    }
    stderr_says(
        &c.p,
        &format!("cluster: upgrade done: the new primary (pid {new}) serves"),
    );
    let after = c.answers(20);
    let t = l.finish(&format!("full upgrade under load ({policy})"));
    eprintln!(
        "full upgrade ({policy}): signal to the old primary's exit {old_gone:?}, to the last old process gone {last_gone:?}"
    );
    assert_eq!(after, BTreeSet::from([format!("v2@{new}")]));
    assert!(t.seen.lock().unwrap().contains(&format!("v1@{old}")));

    signal(new, Signal::SIGTERM);
    assert_eq!(reap(new), Some(0), "the new primary stops cleanly");
}

/// A build with other message types: the reload is refused at the handshake and says to use
/// the full upgrade, which brings it in.
#[test]
fn other_message_types_are_refused_by_a_reload_and_brought_in_by_a_full_upgrade() {
    let d = Deploy::new("types");
    let mut c = d.start("round-robin", &[]);
    let old = c.p.pid();
    let l = load(c.port);
    d.install("v2:b:serve");
    c.p.signal(Signal::SIGHUP);
    let prefix = format!("{old} error reload stopped");
    let error =
        c.p.wait_for("the reload's refusal", |l| l.starts_with(&prefix));
    assert!(
        error.contains("reload stopped") && error.contains("SIGUSR2"),
        "{error}"
    );
    assert_eq!(c.answers(10), BTreeSet::from([format!("v1@{old}")]));

    c.p.signal(Signal::SIGUSR2);
    let new = c.new_primary("v2");
    listening(&mut c.p, new, 2);
    assert!(c.p.wait_exit().success());
    assert_eq!(c.answers(10), BTreeSet::from([format!("v2@{new}")]));
    l.finish("other message types");
    signal(new, Signal::SIGTERM);
    assert_eq!(reap(new), Some(0));
}

/// A new build whose primary exits at start: the upgrade fails, says why, and the old cluster
/// serves on as if nothing happened.
#[test]
fn an_upgrade_to_a_primary_that_exits_at_start_rolls_back() {
    let d = Deploy::new("exits");
    let mut c = d.start("round-robin", &[]);
    let old = c.p.pid();
    let l = load(c.port);
    d.install("v2:a:exit_");
    c.p.signal(Signal::SIGUSR2);
    let error = c.error(old, "the upgrade's failure");
    assert!(
        error.contains("upgrade failed") && error.contains("exited with status 3"),
        "{error}"
    );
    let failed_pid: u32 =
        c.p.seen
            .iter()
            .find(|l| l.ends_with(" primary v2 exiting at start"))
            .and_then(|l| l.split(' ').next()?.parse().ok())
            .expect("the new primary started");
    assert!(!std::path::Path::new(&format!("/proc/{failed_pid}")).exists());
    stderr_says(&c.p, "cluster: upgrade failed: the new primary");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.answers(10), BTreeSet::from([format!("v1@{old}")]));
    l.finish("rollback (exits at start)");
    assert!(
        c.workers.iter().all(|w| alive(*w)),
        "the old workers serve on"
    );
    c.p.signal(Signal::SIGTERM);
    assert!(c.p.wait_exit().success());
}

/// A new build whose workers never get ready: after the grace the new primary is stopped and
/// the old cluster serves on; a second upgrade asked for meanwhile is refused.
#[test]
fn an_upgrade_whose_workers_never_get_ready_rolls_back() {
    let d = Deploy::new("stalls");
    let mut c = d.start("round-robin", &[("GRACE_MS", "1500")]);
    let old = c.p.pid();
    let l = load(c.port);
    d.install("v2:a:stall");
    c.p.signal(Signal::SIGUSR2);
    let new = c.new_primary("v2");
    c.p.signal(Signal::SIGUSR2);
    let refused = c.error(old, "the second upgrade's refusal");
    assert!(
        refused.contains(&format!(
            "upgrade refused: an upgrade is already running (new primary pid {new})"
        )),
        "{refused}"
    );
    let error = c.error(old, "the upgrade's failure");
    assert!(
        error.contains("upgrade failed") && error.contains("not all ready within 1.5s"),
        "{error}"
    );
    // The old primary stopped and reaped it.
    wait_gone(new);
    assert!(!std::path::Path::new(&format!("/proc/{new}")).exists());
    assert_eq!(c.answers(10), BTreeSet::from([format!("v1@{old}")]));
    l.finish("rollback (never ready)");
    c.p.signal(Signal::SIGTERM);
    assert!(c.p.wait_exit().success());
}

/// Under systemd, the new primary becomes the service's main process: the old one sends
/// `MAINPID=` (with `READY=1`) to `NOTIFY_SOCKET` once the new one's workers are ready.
#[test]
fn the_new_primary_is_announced_to_the_service_manager() {
    let d = Deploy::new("notify");
    let path = d.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut c = d.start("round-robin", &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let old = c.p.pid();
    let mut got = Vec::new();
    let read_until = |want: &dyn Fn(&str) -> bool, got: &mut Vec<String>| {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 512];
        loop {
            assert!(Instant::now() < deadline, "notifications: {got:?}");
            if let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                got.push(text.clone());
                if want(&text) {
                    return;
                }
            }
        }
    };
    read_until(&|t| t == "READY=1", &mut got);
    d.install("v2:a:serve");
    c.p.signal(Signal::SIGUSR2);
    let new = c.new_primary("v2");
    read_until(&|t| t.starts_with("MAINPID="), &mut got);
    assert_eq!(
        got.last().unwrap(),
        &format!("MAINPID={new}\nREADY=1"),
        "all: {got:?}"
    );
    assert!(
        got.iter().any(|t| t.starts_with("RELOADING=1")),
        "the upgrade is announced as a reload: {got:?}"
    );
    assert!(c.p.wait_exit().success());
    // The old primary sent nothing after the hand-over (no `STOPPING=1`).
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = [0u8; 512];
    while let Ok(n) = sock.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(!text.contains("STOPPING"), "after the hand-over: {text}");
    }
    let _ = old;
    signal(new, Signal::SIGTERM);
    assert_eq!(reap(new), Some(0));
}

/// A Unix socket goes over too: its file stays in place through the switch (neither primary
/// unlinks a socket the other serves), a client connecting in a loop is never refused, and the
/// new primary's workers answer on it.
#[test]
fn a_full_upgrade_keeps_a_unix_socket_serving() {
    let d = Deploy::new("unix");
    let path = d.dir.join("app.sock");
    let mut c = d.start("round-robin", &[("UNIX_PATH", path.to_str().unwrap())]);
    let old = c.p.pid();
    let ask = |path: &std::path::Path| -> Result<String, String> {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = Vec::new();
        s.read_to_end(&mut line).map_err(|e| e.to_string())?;
        Ok(who(&line))
    };
    assert_eq!(ask(&path), Ok(format!("v1@{old}")));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match ask(&path) {
                    Ok(w) if !w.starts_with("bad") => ok += 1,
                    Ok(w) => failed.push(w),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    d.install("v2:a:serve");
    c.p.signal(Signal::SIGUSR2);
    let new = c.new_primary("v2");
    listening(&mut c.p, new, 2);
    assert!(c.p.wait_exit().success());
    assert!(path.exists(), "the socket file is still there");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    eprintln!("unix socket through an upgrade: {ok} answers, failures {failed:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 20, "too few answers: {ok}");
    assert_eq!(ask(&path), Ok(format!("v2@{new}")));
    signal(new, Signal::SIGTERM);
    assert_eq!(reap(new), Some(0));
    assert!(!path.exists(), "the last primary removes the socket file");
}

/// `Primary::upgrade` answers its caller: the new primary's pid, or the failure (and then the
/// old cluster serves on).
#[test]
fn the_upgrade_api_returns_the_new_primary_or_the_failure() {
    let d = Deploy::new("api");
    let mut c = d.start("shared", &[]);
    let old = c.p.pid();
    d.install("v2:a:exit_");
    c.p.send("upgrade");
    let answer = c.p.wait_for("the API's answer", |l| {
        l.starts_with(&format!("{old} upgrade"))
    });
    assert!(
        answer.starts_with(&format!(
            "{old} upgrade failed Upgrade upgrade failed: the new primary"
        )) && answer.contains("exited with status 3"),
        "{answer}"
    );
    assert_eq!(c.answers(5), BTreeSet::from([format!("v1@{old}")]));

    d.install("v2:a:serve");
    c.p.send("upgrade");
    let answer = c.p.wait_for("the API's answer", |l| {
        l.starts_with(&format!("{old} upgrade"))
    });
    let new: u32 = answer
        .strip_prefix(&format!("{old} upgraded "))
        .unwrap_or_else(|| panic!("{answer}"))
        .parse()
        .unwrap();
    c.reap.0.push(new);
    assert!(c.p.wait_exit().success());
    assert_eq!(c.answers(5), BTreeSet::from([format!("v2@{new}")]));
    signal(new, Signal::SIGTERM);
    assert_eq!(reap(new), Some(0));
}
