//! Shared helpers for integration tests: run fixture programs as real processes, read their
//! output line by line with a deadline, and always reap them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Default deadline for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(20);

/// Path of an example binary, (re)built once per test process so it is never stale, also when
/// only one test target was asked for (`cargo test --test NAME` builds no examples).
pub fn example(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let path = dir.join("examples").join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == name) {
        built.push(name.to_owned());
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building example {name} failed");
    }
    path
}

/// A running program whose stdout lines arrive through a channel; killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    /// Starts example `name` with `env`.
    pub fn start(name: &str, env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(example(name));
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env_remove("CLUSTER_WORKER_ID");
        Proc::spawn(cmd)
    }

    /// Starts example `name` with `env` and a stdin for [`Proc::send`].
    pub fn scripted(name: &str, env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(example(name));
        cmd.envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env_remove("CLUSTER_WORKER_ID");
        Proc::spawn(cmd)
    }

    /// Writes one command line to the program's stdin.
    pub fn send(&mut self, cmd: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("started with `scripted`");
        writeln!(stdin, "{cmd}").expect("write command");
        stdin.flush().expect("flush command");
    }

    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("spawn fixture");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s2 = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[child stderr] {line}");
                let mut s = s2.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, within `WAIT`.
    pub fn line(&mut self) -> String {
        self.line_within(WAIT).unwrap_or_else(|| {
            panic!(
                "no output line within {WAIT:?}; seen so far: {:#?}\nstderr: {}",
                self.seen,
                self.stderr()
            )
        })
    }

    pub fn line_within(&mut self, d: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(d).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Reads lines until one satisfies `pred`, within `WAIT`; returns it.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.line_within(left) {
                Some(l) if pred(&l) => return l,
                Some(_) => {}
                None => panic!(
                    "waited {WAIT:?} for {what}; seen: {:#?}\nstderr: {}",
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// A line already seen that satisfies `pred`, or the next one that does.
    pub fn seen_or_wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        self.wait_for(what, pred)
    }

    /// Waits for the line that starts with `prefix`; returns the rest.
    pub fn expect_prefix(&mut self, prefix: &str) -> String {
        let l = self.wait_for(prefix, |l| l.starts_with(prefix));
        l[prefix.len()..].trim().to_owned()
    }

    /// Everything the program wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Whether stderr holds `text` within `WAIT` (its reader thread may lag stdout's).
    pub fn stderr_says(&self, text: &str) -> bool {
        let deadline = Instant::now() + WAIT;
        while !self.stderr().contains(text) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Waits for the process to exit, within `WAIT`; returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                // Drain the rest of stdout so tests can look at it.
                while let Some(_l) = self.line_within(Duration::from_millis(200)) {}
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit within {WAIT:?}; seen: {:#?}",
                self.pid(),
                self.seen
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin.take();
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone, within `WAIT`.
pub fn wait_gone(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills a worker pid we learned from a fixture, if it is still there (cleanup on failure).
pub struct KillOnDrop(pub Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A listener on `ip` at a free port below the kernel's ephemeral range, so that neither a `:0`
/// bind nor an outgoing connection (of this or a concurrent test) can take the port while the
/// test holds it, or after it lets it go on purpose.
pub fn hold_low_port(ip: &str) -> std::net::TcpListener {
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let base = low.saturating_sub(12000).max(1024);
    let span = low - base;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    (0..2000u32)
        .find_map(|i| {
            let port = base + seed.wrapping_add(i.wrapping_mul(7919)) % span;
            std::net::TcpListener::bind((ip, port as u16)).ok()
        })
        .expect("a free port below the ephemeral range")
}

/// A port free right now below the kernel's ephemeral range (see [`hold_low_port`]).
pub fn free_low_port() -> u16 {
    hold_low_port("0.0.0.0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// One HTTP/1.1 answer, as [`http_get`] read it.
pub struct Answer {
    pub body: Vec<u8>,
    /// The `x-worker-id` header, if any.
    pub worker: String,
}

/// One `GET /` on `conn` (opening a connection to `port` on 127.0.0.1 if there is none), read
/// to the end of its body; the connection is dropped when the server says it closes. Errors
/// name the step that failed.
pub fn http_get(
    conn: &mut Option<BufReader<std::net::TcpStream>>,
    port: u16,
) -> Result<Answer, String> {
    use std::io::{Read, Write};
    if conn.is_none() {
        let s = std::net::TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut().unwrap();
    r.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut status = String::new();
    r.read_line(&mut status)
        .map_err(|e| format!("read status: {e}"))?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("bad status line {status:?}"));
    }
    let (mut len, mut close, mut worker) = (0usize, false, String::new());
    loop {
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| format!("read header: {e}"))?;
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().map_err(|_| "bad length".to_owned())?;
        } else if line == "connection: close" {
            close = true;
        } else if let Some(v) = line.strip_prefix("x-worker-id:") {
            worker = v.trim().to_owned();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    if close {
        *conn = None;
    }
    Ok(Answer { body, worker })
}

/// Resident memory of `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}
