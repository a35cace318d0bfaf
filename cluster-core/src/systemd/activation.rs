//! Inherited listening sockets: those systemd hands the primary (`LISTEN_FDS`), and those an
//! old primary hands the new one in a full upgrade ([`crate::upgrade`]), served by the keys
//! that fit them; and the sockets this primary lent to a new one.
//!
//! A socket another process serves too is never stopped from taking connections, shut down or
//! unlinked here ([`shared_elsewhere`]): systemd keeps its sockets, with their queues, for the
//! next start; the other primary of an upgrade serves the same socket.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where an inherited socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// systemd's socket activation: systemd keeps a copy for good.
    Systemd,
    /// The old primary of a full upgrade: it serves the socket too until it exits.
    Upgrade,
}

struct Inherited {
    fd: OwnedFd,
    origin: Origin,
    /// The path of a Unix socket, as the old primary of an upgrade named it (its own name for
    /// the socket may be a path through `/proc/self/fd`).
    name: Option<std::path::PathBuf>,
    /// A key serves it right now.
    in_use: bool,
}

/// Sockets handed over, and whether a key serves each right now. A std mutex: short sections
/// on bind and close, never across an await.
static INHERITED: Mutex<Vec<Inherited>> = Mutex::new(Vec::new());

/// The identities of the sockets this primary lent to a new primary during an upgrade.
static LENT: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// The old primary of an upgrade still runs (and serves the sockets it handed over).
static OLD_PRIMARY: AtomicBool = AtomicBool::new(false);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the sockets handed over, each with the path of a Unix socket when it was named.
pub(super) fn adopt(fds: Vec<(OwnedFd, Option<std::path::PathBuf>)>, origin: Origin) {
    if origin == Origin::Upgrade && !fds.is_empty() {
        OLD_PRIMARY.store(true, Ordering::Relaxed);
    }
    lock(&INHERITED).extend(fds.into_iter().map(|(fd, name)| Inherited {
        fd,
        origin,
        name,
        in_use: false,
    }));
}

/// A copy of the inherited socket whose address fits `want`, if one was handed over and is not
/// in use. A `SO_REUSEPORT` key takes only sockets with the option, one per slot.
pub(crate) fn take_inherited(want: &crate::wire::BindAddr, reuseport: bool) -> Option<OwnedFd> {
    let mut list = lock(&INHERITED);
    let found = list.iter_mut().find(|s| {
        !s.in_use
            && fits(&s.fd, s.name.as_deref(), want)
            && (!reuseport
                || nix::sys::socket::getsockopt(&s.fd, nix::sys::socket::sockopt::ReusePort)
                    .unwrap_or(false))
    })?;
    let copy = found.fd.try_clone().ok()?;
    found.in_use = true;
    Some(copy)
}

/// Whether socket `fd` (named `name`, when it came with one) is bound where `want` asks.
fn fits(fd: &OwnedFd, name: Option<&std::path::Path>, want: &crate::wire::BindAddr) -> bool {
    use crate::wire::BindAddr;
    if let BindAddr::Unix(path) = want {
        if let Some(name) = name {
            return name == path.as_path() && is_listening_stream(fd);
        }
        let Ok(ss) =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
        else {
            return false;
        };
        return ss
            .as_unix_addr()
            .and_then(|u| u.path())
            .is_some_and(|p| p == path.as_path())
            && is_listening_stream(fd);
    }
    let Ok(have) = crate::socket::local_addr(fd, want) else {
        return false;
    };
    match (want, &have) {
        (BindAddr::Tcp(w), BindAddr::Tcp(h)) | (BindAddr::Udp(w), BindAddr::Udp(h)) => {
            w.port() == h.port()
                && w.port() != 0
                && (w.ip() == h.ip() || w.ip().is_unspecified())
                && is_listening_stream(fd) == matches!(want, BindAddr::Tcp(_))
        }
        _ => false,
    }
}

fn is_listening_stream(fd: &OwnedFd) -> bool {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream)
        && getsockopt(fd, sockopt::AcceptConn).unwrap_or(false)
}

/// The kernel's identity of a descriptor's open socket.
#[allow(
    clippy::unnecessary_cast,
    reason = "`st_dev` is not `u64` on every Unix"
)]
fn identity(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .ok()
        .map(|st| (st.st_dev as u64, st.st_ino as u64))
}

/// Whether another process serves socket `fd` too: systemd handed it over, or the old primary
/// of an upgrade that still runs, or this primary lent it to a new one. Such a socket keeps
/// taking connections, and is never shut down or unlinked here.
pub(crate) fn shared_elsewhere(fd: BorrowedFd<'_>) -> bool {
    let Some(id) = identity(fd) else { return false };
    if lock(&LENT).contains(&id) {
        return true;
    }
    let old = OLD_PRIMARY.load(Ordering::Relaxed);
    lock(&INHERITED).iter().any(|s| {
        (s.origin == Origin::Systemd || old)
            && identity(std::os::fd::AsFd::as_fd(&s.fd)) == Some(id)
    })
}

/// Whether socket `fd` came from systemd.
pub(crate) fn from_systemd(fd: BorrowedFd<'_>) -> bool {
    let Some(id) = identity(fd) else { return false };
    lock(&INHERITED).iter().any(|s| {
        s.origin == Origin::Systemd && identity(std::os::fd::AsFd::as_fd(&s.fd)) == Some(id)
    })
}

/// No key serves this inherited socket any more; a later bind may take it again.
pub(crate) fn release(fd: BorrowedFd<'_>) {
    let Some(id) = identity(fd) else { return };
    for s in lock(&INHERITED).iter_mut() {
        if identity(std::os::fd::AsFd::as_fd(&s.fd)) == Some(id) {
            s.in_use = false;
        }
    }
}

/// Copies of the inherited sockets no key serves now (with their names), systemd's first: an
/// upgrade hands them on with the keys' own.
pub(crate) fn unused() -> Vec<(OwnedFd, Origin, Option<std::path::PathBuf>)> {
    let list = lock(&INHERITED);
    let mut out: Vec<_> = list
        .iter()
        .filter(|s| !s.in_use)
        .filter_map(|s| Some((s.fd.try_clone().ok()?, s.origin, s.name.clone())))
        .collect();
    out.sort_by_key(|(_, o, _)| *o != Origin::Systemd);
    out
}

/// The sockets in `fds` are served by a new primary too, from now on.
pub(crate) fn lend(fds: &[OwnedFd]) {
    let ids = fds
        .iter()
        .filter_map(|fd| identity(std::os::fd::AsFd::as_fd(fd)));
    lock(&LENT).extend(ids);
}

/// The new primary is gone (a rolled-back upgrade): the sockets are ours alone again.
pub(crate) fn reclaim() {
    lock(&LENT).clear();
}

/// The old primary exited: what it handed over is ours alone. Its sockets leave the list: the
/// keys that took them hold their own copies (so a key that closes closes its socket, and a
/// `SO_REUSEPORT` slot leaves the group), and those no key took close now.
pub(crate) fn old_primary_gone() {
    OLD_PRIMARY.store(false, Ordering::Relaxed);
    lock(&INHERITED).retain(|s| s.origin == Origin::Systemd);
}
