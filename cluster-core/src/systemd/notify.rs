//! Readiness notifications (`NOTIFY_SOCKET`): `READY=1`, `RELOADING=1`, `STOPPING=1`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static NOTIFY: OnceLock<Option<std::ffi::OsString>> = OnceLock::new();

/// Where notifications go (read once from the environment at start).
pub(super) fn set_socket(path: Option<std::ffi::OsString>) {
    let _ = NOTIFY.set(path);
}

/// This primary handed the service over to a new one (a full upgrade): it tells the service
/// manager nothing more.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// A new primary of an upgrade is not the service's main process until the old one has
/// handed over and exited: until then it tells the service manager nothing (a `STOPPING=1`
/// of a new primary being rolled back would stop the service under `NotifyAccess=all`).
static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns [`QUIET`] on or off.
pub(crate) fn quiet(on: bool) {
    QUIET.store(on, Ordering::Relaxed);
}

/// Where notifications go, for a new primary started by a full upgrade.
pub(crate) fn socket() -> Option<std::ffi::OsString> {
    NOTIFY.get().cloned().flatten()
}

fn send(state: &str) {
    let Some(Some(path)) = NOTIFY.get() else {
        return;
    };
    if HANDED_OVER.load(Ordering::Relaxed) || QUIET.load(Ordering::Relaxed) {
        return;
    }
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

/// `MAINPID=<pid>` and `READY=1`: a full upgrade is done, the new primary `pid` is the
/// service's main process. Nothing more is sent from this one (it is not the main process
/// any more: a `STOPPING=1` of its own would stop the service under `NotifyAccess=all`).
pub(crate) fn hand_over(pid: u32) {
    send(&format!("MAINPID={pid}\nREADY=1"));
    HANDED_OVER.store(true, Ordering::Relaxed);
}
