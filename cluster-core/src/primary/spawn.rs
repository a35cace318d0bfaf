//! Starting one worker process: the command line, environment, descriptors and settings of a
//! fork, and the primary's end of its channel.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
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
    /// A handle on the binary we were started from, kept even if a package upgrade replaces
    /// the file on disk: workers always run the primary's own version.
    exe: Option<std::fs::File>,
    argv0: OsString,
}

/// A started worker process and the primary's end of its channel.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) stream: Arc<UnixStream>,
}

impl Launcher {
    pub(crate) fn new() -> Self {
        let exe = if cfg!(target_os = "linux") {
            std::fs::File::open("/proc/self/exe").ok()
        } else {
            None
        };
        Launcher {
            exe,
            argv0: std::env::args_os()
                .next()
                .unwrap_or_else(|| "cluster-worker".into()),
        }
    }

    /// Starts worker `id` with `settings`, `env` merged over the primary's environment.
    pub(crate) fn spawn(
        &self,
        id: u32,
        settings: &Settings,
        env: &[(OsString, OsString)],
    ) -> Result<Spawned, Error> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| {
            Error::io(
                ErrorKind::Spawn,
                format!("cannot create the channel for worker {id}"),
                e,
            )
        })?;

        let mut cmd;
        let exe_fd;
        match (&settings.exec, &self.exe) {
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
        if let Some(uid) = settings.uid {
            cmd.uid(uid);
        }
        if let Some(gid) = settings.gid {
            cmd.gid(gid);
        }
        if settings.silent {
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
        Ok(Spawned { child, pid, stream })
    }
}
