//! Socket activation: the listening sockets systemd hands the primary (`LISTEN_FDS`), served
//! by the keys that fit them.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// Sockets systemd handed over, and whether a key serves each right now. A std mutex: short
/// sections on bind and close, never across an await.
static INHERITED: Mutex<Vec<(OwnedFd, bool)>> = Mutex::new(Vec::new());

/// Keeps the sockets systemd passed.
pub(super) fn adopt(fds: Vec<OwnedFd>) {
    INHERITED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(fds.into_iter().map(|fd| (fd, false)));
}

/// A copy of the inherited socket whose address fits `want`, if systemd passed one not in use.
pub(crate) fn take_inherited(want: &crate::wire::BindAddr) -> Option<OwnedFd> {
    let mut list = INHERITED.lock().unwrap_or_else(|p| p.into_inner());
    let (fd, in_use) = list.iter_mut().find(|(fd, in_use)| {
        if *in_use {
            return false;
        }
        let Ok(have) = crate::socket::local_addr(fd, want) else {
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
