//! The full upgrade (SIGUSR2, [`Primary::upgrade`](crate::Primary::upgrade)): the primary
//! starts the binary now at its path as a new primary, hands it every listening socket, and
//! hands the service over once the new primary's workers are all ready; otherwise it stops the
//! new one and serves on.
//!
//! The new primary learns what it is from `CLUSTER_UPGRADE=<old pid>,<sockets>,<from systemd>`:
//! the sockets are descriptors `3..3 + sockets` (as systemd's `LISTEN_FDS` places them; the
//! first `from systemd` of them came from systemd), and descriptor `3 + sockets` is a status
//! channel to the old primary. On it the new primary writes one line once its first workers are
//! settled, `ready` or `failed <why>`, and then reads it to its end: the old primary has exited,
//! and the sockets are its own alone.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::config::SchedulingPolicy;
use crate::error::{Error, ErrorKind};
use crate::event::ExitStatus;
use crate::sys;

/// The variable that tells a new primary what an old one handed it.
pub(crate) const VAR: &str = "CLUSTER_UPGRADE";

/// The paths of the Unix sockets among them: `<index>=<path in hex>`, comma-separated (a path
/// may hold any byte but NUL).
pub(crate) const UNIX_VAR: &str = "CLUSTER_UPGRADE_UNIX";

/// How long a new primary that failed has to stop after SIGTERM before it gets SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// In a new primary: the status channel to the old one, until the first workers settle.
static STATUS: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// In a new primary: the old one handed over listening sockets, so its workers served them;
/// the new workers are ready only once they listen (not merely online).
static MUST_LISTEN: AtomicBool = AtomicBool::new(false);

/// Whether this primary's first workers are ready only once they listen (see [`MUST_LISTEN`]).
pub(crate) fn must_listen() -> bool {
    MUST_LISTEN.load(Ordering::Relaxed)
}

/// Reads and removes [`VAR`] in a primary; adopts the sockets and the status channel when the
/// old primary it names is this process's parent.
///
/// # Safety
/// The process must be single-threaded: it edits the environment.
pub(crate) unsafe fn take_from_env() {
    let Some(text) = std::env::var_os(VAR) else {
        return;
    };
    // SAFETY: the caller guarantees a single thread.
    unsafe { sys::remove_env(VAR) };
    let unix = std::env::var(UNIX_VAR).unwrap_or_default();
    // SAFETY: as above.
    unsafe { sys::remove_env(UNIX_VAR) };
    let text = text.to_string_lossy();
    let Some((old, n, from_systemd)) = parse(&text) else {
        eprintln!("cluster: {VAR}={text:?} is not `<pid>,<sockets>,<from systemd>`; ignored");
        return;
    };
    if nix::unistd::getppid().as_raw() as u32 != old {
        eprintln!(
            "cluster: {VAR} names primary {old}, which is not this process's parent; ignored"
        );
        return;
    }
    crate::systemd::adopt_upgrade(n, from_systemd, &parse_names(&unix));
    crate::systemd::notify::quiet(true);
    MUST_LISTEN.store(n > 0, Ordering::Relaxed);
    match sys::adopt_stream_fd(3 + n as RawFd) {
        Some(fd) => *STATUS.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd),
        None => eprintln!("cluster: the old primary's status channel is not open"),
    }
}

/// `<old pid>,<sockets>,<from systemd>`, within bounds: at most 65536 sockets, of which those
/// from systemd are a part.
fn parse(text: &str) -> Option<(u32, u32, u32)> {
    let mut it = text.split(',').map(|t| t.trim().parse::<u32>().ok());
    let v = (it.next()??, it.next()??, it.next()??);
    (it.next().is_none() && v.1 <= 1 << 16 && v.2 <= v.1).then_some(v)
}

/// The Unix paths of [`UNIX_VAR`]; what does not parse is left out.
fn parse_names(text: &str) -> Vec<(usize, PathBuf)> {
    use std::os::unix::ffi::OsStringExt;
    text.split(',')
        .filter_map(|entry| {
            let (i, hex) = entry.split_once('=')?;
            if hex.len() % 2 != 0 {
                return None;
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|at| u8::from_str_radix(hex.get(at..at + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            Some((
                i.parse().ok()?,
                PathBuf::from(std::ffi::OsString::from_vec(bytes)),
            ))
        })
        .collect()
}

/// [`UNIX_VAR`]'s text for `names`.
fn names_var(names: &[(usize, PathBuf)]) -> String {
    use std::os::unix::ffi::OsStrExt;
    names
        .iter()
        .map(|(i, p)| {
            let hex: String = p
                .as_os_str()
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{i}={hex}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// In a new primary: its first workers are settled; `failed` says why they do not all serve.
/// Tells the old primary (once), then waits for it to exit.
pub(crate) fn settled(failed: Option<String>) {
    let Some(fd) = STATUS.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    let line = match failed {
        None => "ready\n".to_owned(),
        Some(why) => format!("failed {}\n", why.replace('\n', "; ")),
    };
    tokio::spawn(async move {
        let stream = std::os::unix::net::UnixStream::from(fd);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut stream) = UnixStream::from_std(stream) else {
            return;
        };
        let _ = stream.write_all(line.as_bytes()).await;
        // The old primary keeps its end until it exits.
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        crate::systemd::old_primary_gone();
        crate::systemd::notify::quiet(false);
    });
}

/// What the old primary knows of the new one while it starts.
pub(crate) struct Started {
    pub(crate) pid: u32,
    child: tokio::process::Child,
    status: UnixStream,
}

/// Starts `path` as a new primary with `workers` workers under `policy`, handing it `sockets`
/// (those systemd handed over first, `from_systemd` of them; `unix` names the Unix sockets
/// among them by index).
pub(crate) fn spawn(
    path: &std::path::Path,
    workers: usize,
    policy: SchedulingPolicy,
    sockets: &[OwnedFd],
    from_systemd: usize,
    unix: &[(usize, PathBuf)],
) -> Result<Started, Error> {
    let fail = |what: &str, e: std::io::Error| {
        Error::io(
            ErrorKind::Spawn,
            format!("upgrade: cannot {what}; the old primary keeps serving"),
            e,
        )
    };
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| fail("create the status channel", e))?;
    // Every descriptor to place above the targets `3..=3 + n`, so the child's `dup2`s cannot
    // clobber one another.
    let above = 4 + sockets.len() as RawFd;
    let sources: Vec<OwnedFd> = sockets
        .iter()
        .map(|fd| fd.as_fd())
        .chain([theirs.as_fd()])
        .map(|fd| sys::dup_above(fd, above))
        .collect::<Result<_, _>>()
        .map_err(|e| fail("copy the listening sockets", e))?;
    drop(theirs);
    let raw: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();

    let mut cmd = tokio::process::Command::new(path);
    // An absolute `argv[0]`: the new primary finds its path from it (see `spawn::started_from`).
    std::os::unix::process::CommandExt::arg0(cmd.as_std_mut(), path);
    cmd.args(std::env::args_os().skip(1));
    cmd.env(
        VAR,
        format!("{},{},{from_systemd}", std::process::id(), sockets.len()),
    );
    cmd.env(UNIX_VAR, names_var(unix));
    cmd.env("CLUSTER_WORKERS", workers.max(1).to_string());
    cmd.env("CLUSTER_SCHED_POLICY", policy.to_string());
    cmd.env_remove(crate::run::WORKER_ID_VAR);
    if let Some(notify) = crate::systemd::notify::socket() {
        cmd.env("NOTIFY_SOCKET", notify);
    }
    // SAFETY: the closure runs in the forked child before `exec` and only makes
    // async-signal-safe system calls (see `sys::child_place_fds`); it owns the vector it reads,
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || sys::child_place_fds(&raw));
    }
    let child = cmd.spawn().map_err(|e| {
        fail(
            &format!("start the new primary from `{}`", path.display()),
            e,
        )
    })?;
    drop(sources);
    let pid = child.id().unwrap_or(0);
    let status = ours
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(ours));
    match status {
        Ok(status) => Ok(Started { pid, child, status }),
        Err(e) => {
            // Never leave a new primary running that nobody watches.
            let mut child = child;
            let _ = child.start_kill();
            Err(fail("set up the status channel", e))
        }
    }
}

/// The new primary serves: the old one keeps the status channel open until it exits (its end
/// tells the new primary when the sockets are its own alone).
pub(crate) struct Handover {
    _status: UnixStream,
    _child: tokio::process::Child,
}

impl Started {
    /// Waits until the new primary's workers are all ready (`Ok`), or it failed: it exited, its
    /// workers did not all get ready within `timeout`, or it said why. A new primary that
    /// failed is stopped (SIGTERM, then SIGKILL) and reaped before this returns.
    pub(crate) async fn outcome(
        mut self,
        timeout: Duration,
        cancel: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<Handover, Error> {
        let pid = self.pid;
        // One short line is all the new primary says.
        let mut lines = tokio::io::BufReader::new((&mut self.status).take(256));
        let mut line = String::new();
        let verdict = tokio::select! {
            _ = cancel => Err(format!(
                "this primary is shutting down; the new primary (pid {pid}) is stopped too"
            )),
            read = lines.read_line(&mut line) => match read {
                Ok(n) if n > 0 && line.trim_end() == "ready" => Ok(()),
                Ok(n) if n > 0 => Err(format!(
                    "the new primary (pid {pid}) reported: {}",
                    line.trim_end().strip_prefix("failed ").unwrap_or(line.trim_end())
                )),
                // It closed the channel: it exited, or it is not a cluster primary.
                _ => match tokio::time::timeout(STOP_WITHIN, self.child.wait()).await {
                    Ok(Ok(status)) => Err(format!(
                        "the new primary (pid {pid}) exited with status {} before its workers were ready",
                        ExitStatus::from_std(status)
                    )),
                    _ => Err(format!(
                        "the new primary (pid {pid}) closed its status channel before its workers were ready"
                    )),
                },
            },
            status = self.child.wait() => Err(format!(
                "the new primary (pid {pid}) exited with status {} before its workers were ready",
                status.map_or_else(|_| "unknown".to_owned(), |s| ExitStatus::from_std(s).to_string())
            )),
            _ = tokio::time::sleep(timeout) => Err(format!(
                "the new primary's (pid {pid}) workers were not all ready within {timeout:?}"
            )),
        };
        match verdict {
            Ok(()) => Ok(Handover {
                _status: self.status,
                _child: self.child,
            }),
            Err(why) => {
                stop(&mut self.child).await;
                Err(Error::new(
                    ErrorKind::Upgrade,
                    format!(
                        "upgrade failed: {why}; stopped it, the old primary and its workers keep serving"
                    ),
                ))
            }
        }
    }
}

/// Stops a new primary that failed, and reaps it.
async fn stop(child: &mut tokio::process::Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_WITHIN, child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// The path a full upgrade starts: the one the primary was started from, as on disk now.
pub(crate) fn binary(path: Option<&PathBuf>) -> Result<PathBuf, Error> {
    let path = path.ok_or_else(|| {
        Error::new(
            ErrorKind::Upgrade,
            "upgrade: the path this primary was started from is unknown",
        )
    })?;
    std::fs::metadata(path).map_err(|e| {
        Error::io(
            ErrorKind::Upgrade,
            format!(
                "upgrade: no binary at `{}`; the old primary keeps serving",
                path.display()
            ),
            e,
        )
    })?;
    Ok(path.clone())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn unix_paths_travel_as_hex_whatever_their_bytes() {
        use super::{names_var, parse_names};
        use std::os::unix::ffi::OsStringExt;
        let odd =
            std::path::PathBuf::from(std::ffi::OsString::from_vec(b"/t/a,b=c\n\xff".to_vec()));
        let names = vec![(0, "/run/app.sock".into()), (3, odd)];
        assert_eq!(parse_names(&names_var(&names)), names);
        assert_eq!(parse_names(""), vec![]);
        assert_eq!(
            parse_names("x=zz,1=6"),
            vec![],
            "malformed entries are left out"
        );
    }

    #[test]
    fn the_variable_names_a_pid_a_socket_count_and_those_from_systemd() {
        assert_eq!(parse("123,4,1"), Some((123, 4, 1)));
        assert_eq!(parse(" 7 , 0 , 0 "), Some((7, 0, 0)));
        for bad in [
            "",
            "1,2",
            "1,2,3,4",
            "a,1,0",
            "1,-1,0",
            "1,2,3",
            "1,70000,0",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
