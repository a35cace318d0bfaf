//! Starting one worker process: the command line, environment, descriptors and settings of a
//! fork, and the primary's end of its channel.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixStream;
use tokio::process::Child;

use crate::channel;
use crate::config::Settings;
use crate::error::{Error, ErrorKind};
use crate::sys;

/// What the primary keeps of how it was started, to start workers the same way.
#[derive(Debug)]
pub(crate) struct Launcher {
    /// A handle on the build that serves: the binary we were started from, or the one the last
    /// successful reload picked up. Kept even when a deploy replaces the file on disk, so a
    /// crash respawn never runs a build that has not proven itself.
    serving: Option<std::fs::File>,
    /// The build a running reload starts its replacements from: the file at [`Launcher::path`]
    /// as it was when the reload began. It becomes `serving` when the reload succeeds.
    candidate: Option<std::fs::File>,
    /// Where the primary was started from (see [`started_from`]); opened again at each reload.
    path: Option<PathBuf>,
    argv0: OsString,
}

/// The path the primary was started from, as the user named it: `argv[0]` when it holds a
/// `/` (made absolute against the directory the primary started in, and not resolved, so a
/// deploy that moves a symlink is followed), else the executable the kernel ran (a program
/// found through `PATH`).
fn started_from() -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.components().count() > 1 {
        Some(std::env::current_dir().ok()?.join(argv0))
    } else {
        std::env::current_exe().ok()
    }
}

/// A started worker process and the primary's end of its channel.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) stream: Arc<UnixStream>,
    /// The user, group and supplementary groups it runs as, when `uid` was set.
    pub(crate) user: Option<(u32, u32, Vec<u32>)>,
}

impl Launcher {
    pub(crate) fn new() -> Self {
        let serving = if cfg!(target_os = "linux") {
            std::fs::File::open("/proc/self/exe").ok()
        } else {
            None
        };
        Launcher {
            serving,
            candidate: None,
            path: started_from(),
            argv0: std::env::args_os()
                .next()
                .unwrap_or_else(|| "cluster-worker".into()),
        }
    }

    /// Where the primary was started from (see [`started_from`]).
    pub(crate) fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// A reload begins: its replacements run the binary at the path the primary was started
    /// from, as it is on disk now.
    pub(crate) fn open_candidate(&mut self) -> Result<(), Error> {
        self.candidate = None;
        if self.serving.is_none() {
            // Without a handle every worker starts from the path anyway.
            return Ok(());
        }
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = std::fs::File::open(path).map_err(|e| {
            Error::io(
                ErrorKind::Spawn,
                format!(
                    "reload: cannot open the binary at `{}`; the old workers keep serving",
                    path.display()
                ),
                e,
            )
        })?;
        self.candidate = Some(file);
        Ok(())
    }

    /// The reload succeeded: its build serves now (crash respawns use it).
    pub(crate) fn promote(&mut self) {
        if let Some(c) = self.candidate.take() {
            self.serving = Some(c);
        }
    }

    /// The reload failed or was cancelled: the serving build stays.
    pub(crate) fn discard_candidate(&mut self) {
        self.candidate = None;
    }

    /// Starts worker `id` with `settings`, `env` merged over the primary's environment; from
    /// the reload's build when `replacement`, else from the serving one.
    pub(crate) fn spawn(
        &self,
        id: u32,
        settings: &Settings,
        env: &[(OsString, OsString)],
        replacement: bool,
    ) -> Result<Spawned, Error> {
        let exe = match (&self.candidate, replacement) {
            (Some(c), true) => Some(c),
            _ => self.serving.as_ref(),
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| {
            Error::io(
                ErrorKind::Spawn,
                format!("cannot create the channel for worker {id}"),
                e,
            )
        })?;

        let mut cmd;
        let exe_fd;
        match (&settings.exec, exe) {
            (Some(path), _) => {
                cmd = tokio::process::Command::new(path);
                exe_fd = None;
            }
            (None, Some(exe)) => {
                cmd = tokio::process::Command::new(sys::exe_path());
                std::os::unix::process::CommandExt::arg0(cmd.as_std_mut(), &self.argv0);
                exe_fd = Some(exe.as_raw_fd());
            }
            (None, None) => {
                let path = std::env::current_exe().map_err(|e| {
                    Error::io(ErrorKind::Spawn, "cannot find the primary's executable", e)
                })?;
                cmd = tokio::process::Command::new(path);
                exe_fd = None;
            }
        }
        match &settings.args {
            Some(args) => cmd.args(args),
            None => cmd.args(std::env::args_os().skip(1)),
        };
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.env("CLUSTER_WORKER_ID", id.to_string());
        if let Some(cwd) = &settings.cwd {
            cmd.current_dir(cwd);
        }
        let user = match (settings.uid, settings.gid) {
            (Some(uid), gid) => Some(identity(id, uid, gid)?),
            (None, Some(gid)) => {
                cmd.gid(gid);
                None
            }
            (None, None) => None,
        };
        if settings.silent || settings.log_prefix.is_some() {
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
        }
        cmd.stdin(std::process::Stdio::null());
        let chan_fd = theirs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before `exec` and only makes
        // async-signal-safe system calls (see `sys::child_setup`); it captures two integers.
        unsafe {
            cmd.pre_exec(move || sys::child_setup(chan_fd, exe_fd));
        }
        let runs_as = user.clone();
        if let Some((uid, gid, groups)) = user {
            // SAFETY: as above; `become_user` makes three system calls on values computed
            // before the fork, and the closure owns the vector it reads.
            unsafe {
                cmd.pre_exec(move || sys::become_user(uid, gid, &groups));
            }
        }
        let program = settings.exec.as_ref().map_or_else(
            || "the primary's own executable".to_owned(),
            |p| format!("`{}`", p.display()),
        );
        let child = cmd.spawn().map_err(|e| {
            Error::io(
                ErrorKind::Spawn,
                format!("cannot start worker {id} from {program}"),
                e,
            )
        })?;
        drop(theirs);
        let pid = child.id().unwrap_or(0);
        let stream = channel::into_stream(ours.into())
            .map_err(|e| Error::io(ErrorKind::Spawn, "cannot register the channel", e))?;
        Ok(Spawned {
            child,
            pid,
            stream,
            user: runs_as,
        })
    }
}

/// Who worker `id` runs as for `uid`: the group given, with no supplementary group, or else the
/// user's primary group and its supplementary groups, as `initgroups` would set them (looked up
/// here, before the fork: the child may only make system calls).
fn identity(id: u32, uid: u32, gid: Option<u32>) -> Result<(u32, u32, Vec<u32>), Error> {
    use nix::unistd::{Uid, User, getgrouplist};
    if let Some(gid) = gid {
        return Ok((uid, gid, Vec::new()));
    }
    let no_user = |why: String| {
        Error::new(
            ErrorKind::Spawn,
            format!("cannot start worker {id} as uid {uid} without a gid: {why}; set `gid` too"),
        )
    };
    let user = User::from_uid(Uid::from_raw(uid))
        .map_err(|e| no_user(e.to_string()))?
        .ok_or_else(|| no_user("no such user".to_owned()))?;
    let name = std::ffi::CString::new(user.name.as_bytes()).map_err(|e| no_user(e.to_string()))?;
    let groups = getgrouplist(&name, user.gid).map_err(|e| no_user(e.to_string()))?;
    Ok((
        uid,
        user.gid.as_raw(),
        groups.into_iter().map(|g| g.as_raw()).collect(),
    ))
}
