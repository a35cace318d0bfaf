//! Running under a service manager: systemd's readiness notifications and socket activation.

use std::os::fd::OwnedFd;
use std::sync::{Mutex, OnceLock};

static NOTIFY: OnceLock<Option<std::ffi::OsString>> = OnceLock::new();
/// Sockets systemd handed over, and whether a key serves each right now.
static INHERITED: Mutex<Vec<(OwnedFd, bool)>> = Mutex::new(Vec::new());

/// Reads `NOTIFY_SOCKET`, `LISTEN_PID` and `LISTEN_FDS` in the primary and removes them from the
/// environment, so workers neither notify nor claim the sockets.
///
/// # Safety
/// The process must be single-threaded: it edits the environment.
pub(crate) unsafe fn take_from_env() {
    let notify = std::env::var_os("NOTIFY_SOCKET");
    let listen_pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    let listen_fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    for key in [
        "NOTIFY_SOCKET",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ] {
        // SAFETY: the caller guarantees a single thread.
        unsafe { crate::sys::remove_env(key) };
    }
    let _ = NOTIFY.set(notify);
    if listen_pid == Some(std::process::id()) && listen_fds > 0 {
        let fds = crate::sys::adopt_listen_fds(listen_fds);
        INHERITED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(fds.into_iter().map(|fd| (fd, false)));
    }
}

/// A copy of the inherited socket whose address fits `want`, if systemd passed one not in use.
pub(crate) fn take_inherited(want: &crate::wire::BindAddr) -> Option<OwnedFd> {
    let mut list = INHERITED.lock().unwrap_or_else(|p| p.into_inner());
    let (fd, in_use) = list.iter_mut().find(|(fd, in_use)| {
        if *in_use {
            return false;
        }
        let Ok(have) = crate::servers::local_addr(fd, want) else {
            return false;
        };
        match (want, &have) {
            (crate::wire::BindAddr::Tcp(w), crate::wire::BindAddr::Tcp(h))
            | (crate::wire::BindAddr::Udp(w), crate::wire::BindAddr::Udp(h)) => {
                w.port() == h.port()
                    && w.port() != 0
                    && (w.ip() == h.ip() || w.ip().is_unspecified())
            }
            _ => false,
        }
    })?;
    let copy = fd.try_clone().ok()?;
    *in_use = true;
    Some(copy)
}

/// The kernel's identity of a descriptor's open socket.
#[allow(
    clippy::unnecessary_cast,
    reason = "`st_dev` is not `u64` on every Unix"
)]
fn identity(fd: &OwnedFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(fd))
        .ok()
        .map(|st| (st.st_dev as u64, st.st_ino as u64))
}

/// Whether `fd` is (a copy of) a socket systemd handed over.
pub(crate) fn is_inherited(fd: &OwnedFd) -> bool {
    let Some(id) = identity(fd) else { return false };
    INHERITED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|(f, _)| identity(f) == Some(id))
}

/// No key serves this inherited socket any more; a later bind may take it again.
pub(crate) fn release(fd: &OwnedFd) {
    let Some(id) = identity(fd) else { return };
    for (f, in_use) in INHERITED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter_mut()
    {
        if identity(f) == Some(id) {
            *in_use = false;
        }
    }
}

fn send(state: &str) {
    let Some(Some(path)) = NOTIFY.get() else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) {
                let _ = sock.send_to_addr(state.as_bytes(), &addr);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = name;
    } else {
        let _ = sock.send_to(state.as_bytes(), std::path::Path::new(path));
    }
}

/// `READY=1`: the cluster serves.
pub(crate) fn ready() {
    send("READY=1");
}

/// `RELOADING=1` with the monotonic timestamp systemd asks for.
pub(crate) fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// `STOPPING=1`: shutdown has begun.
pub(crate) fn stopping() {
    send("STOPPING=1");
}
