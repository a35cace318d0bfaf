//! Binding and naming the primary's listening sockets.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use crate::wire::BindAddr;

/// A new close-on-exec, non-blocking socket.
fn new_socket(
    family: nix::sys::socket::AddressFamily,
    ty: nix::sys::socket::SockType,
) -> io::Result<OwnedFd> {
    use nix::sys::socket::{SockFlag, socket};
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let fd = socket(
        family,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(io::Error::from)?;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let fd = {
        let fd = socket(family, ty, SockFlag::empty(), None).map_err(io::Error::from)?;
        crate::sys::set_cloexec_nonblock(&fd, true);
        fd
    };
    Ok(fd)
}

/// Binds a listening (or UDP) socket for IP address `addr`; returns it with the address it
/// got. Unix sockets go through [`bind_unix`].
pub(crate) fn bind(addr: &BindAddr, reuseport: bool) -> io::Result<(OwnedFd, BindAddr)> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockType, SockaddrIn, SockaddrIn6, bind as nbind, listen,
        setsockopt, sockopt,
    };
    let (a, ty) = match addr {
        BindAddr::Tcp(a) => (a, SockType::Stream),
        BindAddr::Udp(a) => (a, SockType::Datagram),
        BindAddr::Unix(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a Unix socket is bound by `bind_unix`",
            ));
        }
    };
    let family = if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = new_socket(family, ty)?;
    let sa = |e: nix::Error| io::Error::from(e);
    if ty == SockType::Stream {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(sa)?;
    }
    if reuseport {
        setsockopt(&fd, sockopt::ReusePort, &true).map_err(sa)?;
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match a {
        SocketAddr::V4(v4) => nbind(raw, &SockaddrIn::from(*v4)),
        SocketAddr::V6(v6) => nbind(raw, &SockaddrIn6::from(*v6)),
    }
    .map_err(sa)?;
    if ty == SockType::Stream {
        listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN)).map_err(sa)?;
    }
    let bound = local_addr(&fd, addr)?;
    Ok((fd, bound))
}

/// A Unix socket file the primary created: removed only if it is still that file, through a
/// handle on the directory it was created in (so a directory swapped for a symlink since cannot
/// redirect the removal).
#[derive(Debug)]
pub(crate) struct UnixFile {
    dir: OwnedFd,
    name: std::ffi::OsString,
    id: (u64, u64),
    path: std::path::PathBuf,
}

impl UnixFile {
    /// The socket file at `path` as it is now (a socket handed over by another process).
    pub(crate) fn at(path: &std::path::Path) -> io::Result<UnixFile> {
        let (dir, name) = open_parent(path)?;
        let id = identity_at(&dir, &name)?;
        Ok(UnixFile {
            dir,
            name,
            id,
            path: path.to_owned(),
        })
    }

    /// The directory the socket is in.
    pub(crate) fn dir(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.dir)
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Removes the socket file, if the name in its directory still is this socket.
    pub(crate) fn remove(&self) {
        if identity_at(&self.dir, &self.name).ok() == Some(self.id) {
            let _ = nix::unistd::unlinkat(
                Some(std::os::fd::AsRawFd::as_raw_fd(&self.dir)),
                self.name.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// A handle on the directory of `path` (following links as the path does now) and the name in
/// it.
fn open_parent(path: &std::path::Path) -> io::Result<(OwnedFd, std::ffi::OsString)> {
    use nix::fcntl::{OFlag, open};
    let name = path
        .file_name()
        .filter(|n| *n != "..")
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{}` names no socket file", path.display()),
            )
        })?
        .to_owned();
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let raw = open(parent, flags, nix::sys::stat::Mode::empty()).map_err(io::Error::from)?;
    // SAFETY: `open` just returned this descriptor; nobody else owns it.
    let dir = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    Ok((dir, name))
}

/// Device and inode of `name` in `dir`, not following a link.
#[allow(
    clippy::unnecessary_cast,
    reason = "`st_dev` is not `u64` on every Unix"
)]
fn identity_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstatat(
        Some(std::os::fd::AsRawFd::as_raw_fd(dir)),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)?;
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(nix::libc::ENOTSOCK));
    }
    Ok((st.st_dev as u64, st.st_ino as u64))
}

/// The path through which to name `name` in `dir`: the directory's handle itself where the
/// kernel offers one (`/proc/self/fd`), so the directory checked is the one used, whatever
/// happens to the path meanwhile (and a long directory path stays within the 108 bytes of a
/// socket address); elsewhere the path.
fn via(dir: &OwnedFd, name: &std::ffi::OsStr, path: &std::path::Path) -> std::path::PathBuf {
    if cfg!(any(target_os = "linux", target_os = "android")) {
        std::path::PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(dir)
        ))
        .join(name)
    } else {
        path.to_owned()
    }
}

/// Connects to `addr` without waiting: refused means nobody listens (a stale file); a full
/// backlog (`EAGAIN`) or success means a listener is there. Never blocks, whatever the socket
/// at the path does.
fn probe(addr: &nix::sys::socket::UnixAddr) -> io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockType, connect};
    let s = new_socket(AddressFamily::Unix, SockType::Stream)?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&s), addr) {
        Ok(()) | Err(nix::Error::EAGAIN) | Err(nix::Error::EINPROGRESS) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether user `uid` could remove `name` from `dir` itself: in a sticky directory (such as
/// `/tmp`) only the owner of the file or of the directory may.
fn may_replace(dir: &OwnedFd, name: &std::ffi::OsStr, uid: u32) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(d) = nix::sys::stat::fstat(dir.as_raw_fd()) else {
        return false;
    };
    if d.st_mode & nix::libc::S_ISVTX == 0 {
        return true;
    }
    let file = nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    );
    d.st_uid == uid || file.is_ok_and(|f| f.st_uid == uid)
}

/// The socket file's permission bits and owner, set before it takes connections.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FileOptions {
    pub(crate) mode: Option<u32>,
    pub(crate) owner: Option<(u32, u32)>,
}

/// Sets `opts` on `name` in `dir`, which must still be the socket `id`: on Linux through a
/// handle opened on the file itself (never through a link, or a file swapped in meanwhile).
fn set_file_options(
    dir: &OwnedFd,
    name: &std::ffi::OsStr,
    id: (u64, u64),
    opts: FileOptions,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if opts.owner.is_none() && opts.mode.is_none() {
        return Ok(());
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::fcntl::{OFlag, openat};
        let raw = openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(io::Error::from)?;
        // SAFETY: `openat` just returned this descriptor; nobody else owns it.
        let file: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
        let st = nix::sys::stat::fstat(file.as_raw_fd()).map_err(io::Error::from)?;
        #[allow(
            clippy::unnecessary_cast,
            reason = "`st_dev` is not `u64` on every Unix"
        )]
        let same = (st.st_dev as u64, st.st_ino as u64) == id;
        if !same {
            return Err(io::Error::other(
                "the socket file was replaced before its owner and mode were set",
            ));
        }
        // The handle's `/proc` link names the very inode it was opened on.
        let at = format!("/proc/self/fd/{}", file.as_raw_fd());
        if let Some((uid, gid)) = opts.owner {
            std::os::unix::fs::chown(&at, Some(uid), Some(gid))?;
        }
        if let Some(mode) = opts.mode {
            std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        Ok(())
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = id;
        if let Some((uid, gid)) = opts.owner {
            nix::unistd::fchownat(
                Some(dir.as_raw_fd()),
                name,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(io::Error::from)?;
        }
        if let Some(mode) = opts.mode {
            nix::sys::stat::fchmodat(
                Some(dir.as_raw_fd()),
                name,
                nix::sys::stat::Mode::from_bits_truncate(mode as nix::libc::mode_t),
                nix::sys::stat::FchmodatFlags::NoFollowSymlink,
            )
            .map_err(io::Error::from)?;
        }
        Ok(())
    }
}

/// Binds and listens on a Unix socket at `path`, after `check` accepted its directory. A stale
/// socket file there (nobody listens: connecting is refused) is replaced; any other file, or a
/// socket something listens on, is `AddrInUse` and stays.
pub(crate) fn bind_unix(
    path: &std::path::Path,
    check: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<()>,
    opts: FileOptions,
) -> io::Result<(OwnedFd, UnixFile)> {
    use nix::sys::socket::{AddressFamily, Backlog, SockType, UnixAddr, bind as nbind, listen};
    let (dir, name) = open_parent(path)?;
    check(std::os::fd::AsFd::as_fd(&dir))?;
    let at = via(&dir, &name, path);
    let addr = UnixAddr::new(at.as_path()).map_err(io::Error::from)?;
    let fd = new_socket(AddressFamily::Unix, SockType::Stream)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match nbind(raw, &addr) {
        Ok(()) => {}
        Err(nix::Error::EADDRINUSE) => {
            let in_use = |why: &str| {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("`{}` is in use: {why}", path.display()),
                )
            };
            match identity_at(&dir, &name) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOTSOCK) => {
                    return Err(in_use("a file that is not a socket is there (not removed)"));
                }
                Err(e) => return Err(e),
            }
            if let Some((uid, _)) = opts.owner
                && !may_replace(&dir, &name, uid)
            {
                return Err(in_use(
                    "a socket of another user is there, in a sticky directory (not removed)",
                ));
            }
            match probe(&addr) {
                Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) => {
                    // Left by a process that died: nobody listens on it.
                    nix::unistd::unlinkat(
                        Some(std::os::fd::AsRawFd::as_raw_fd(&dir)),
                        name.as_os_str(),
                        nix::unistd::UnlinkatFlags::NoRemoveDir,
                    )
                    .map_err(io::Error::from)?;
                    nbind(raw, &addr).map_err(io::Error::from)?;
                }
                Ok(_) => return Err(in_use("another process listens on it")),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e.into()),
    }
    let id = identity_at(&dir, &name)?;
    let file = UnixFile {
        dir,
        name,
        id,
        path: path.to_owned(),
    };
    // Mode and owner before `listen`: no client can connect before they hold.
    let ready = set_file_options(&file.dir, &file.name, file.id, opts).and_then(|()| {
        listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN)).map_err(io::Error::from)
    });
    if let Err(e) = ready {
        file.remove();
        return Err(e);
    }
    Ok((fd, file))
}

/// The address a socket is bound to, in the form of `like`.
pub(crate) fn local_addr(fd: &OwnedFd, like: &BindAddr) -> io::Result<BindAddr> {
    use nix::sys::socket::{SockaddrStorage, getsockname};
    let ss: SockaddrStorage =
        getsockname(std::os::fd::AsRawFd::as_raw_fd(fd)).map_err(io::Error::from)?;
    let ip = if let Some(v4) = ss.as_sockaddr_in() {
        Some(SocketAddr::V4((*v4).into()))
    } else {
        ss.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    };
    Ok(match (like, ip) {
        (BindAddr::Tcp(_), Some(a)) => BindAddr::Tcp(a),
        (BindAddr::Udp(_), Some(a)) => BindAddr::Udp(a),
        (BindAddr::Unix(p), _) => BindAddr::Unix(p.clone()),
        (_, None) => return Err(io::Error::other("socket has no IP address")),
    })
}

/// Whether an accept failed for want of descriptors or memory: the connection stays in the
/// kernel's queue, and the caller should wait a little rather than try again at once.
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}
