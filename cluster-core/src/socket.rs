//! Binding and naming the primary's listening sockets.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use crate::wire::BindAddr;

/// Binds a listening (or UDP) socket for `addr`; returns it with the address it got.
pub(crate) fn bind(addr: &BindAddr, reuseport: bool) -> io::Result<(OwnedFd, BindAddr)> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, UnixAddr,
        bind as nbind, listen, setsockopt, socket, sockopt,
    };
    let (family, ty) = match addr {
        BindAddr::Tcp(a) => (
            if a.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            },
            SockType::Stream,
        ),
        BindAddr::Udp(a) => (
            if a.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            },
            SockType::Datagram,
        ),
        BindAddr::Unix(_) => (AddressFamily::Unix, SockType::Stream),
    };
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
    let sa = |e: nix::Error| io::Error::from(e);
    match addr {
        BindAddr::Tcp(a) | BindAddr::Udp(a) => {
            if matches!(addr, BindAddr::Tcp(_)) {
                setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(sa)?;
            }
            if reuseport {
                setsockopt(&fd, sockopt::ReusePort, &true).map_err(sa)?;
            }
            match a {
                SocketAddr::V4(v4) => {
                    nbind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(*v4))
                }
                SocketAddr::V6(v6) => nbind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &SockaddrIn6::from(*v6),
                ),
            }
            .map_err(sa)?;
        }
        BindAddr::Unix(p) => {
            nbind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &UnixAddr::new(p.as_path()).map_err(sa)?,
            )
            .map_err(sa)?;
        }
    }
    if ty == SockType::Stream {
        listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN)).map_err(sa)?;
    }
    let bound = local_addr(&fd, addr)?;
    Ok((fd, bound))
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
