//! The crate's only `unsafe` code: descriptor passing, the worker's side of process start-up and
//! the environment edit made before any thread exists. Each block says why it is sound.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use crate::frame::MAX_FDS_PER_FRAME;

/// The descriptor number on which a worker finds its channel.
pub const CHANNEL_FD: RawFd = 3;
/// The descriptor number through which a worker is exec'd from the primary's own binary.
const EXE_FD: RawFd = 4;

/// Sends `bytes` with `fds` attached (at most [`MAX_FDS_PER_FRAME`]); returns the bytes written.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    // Rust programs ignore SIGPIPE already; MSG_NOSIGNAL also covers hosts that changed that.
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = MsgFlags::MSG_DONTWAIT;
    let n = if fds.is_empty() {
        sendmsg::<()>(sock.as_raw_fd(), &iov, &[], flags, None)
    } else {
        debug_assert!(fds.len() <= MAX_FDS_PER_FRAME);
        sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(fds)],
            flags,
            None,
        )
    };
    n.map_err(io::Error::from)
}

/// What one [`recv_with_fds`] read.
#[derive(Debug)]
pub struct Received {
    /// Bytes read; 0 is end of stream.
    pub bytes: usize,
    /// Descriptors that came with them: at most one `sendmsg`'s, installed in our table.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped some of that `sendmsg`'s descriptors (`MSG_CTRUNC`): we are at our
    /// descriptor limit. `fds` holds the ones it installed, the first of those sent.
    pub truncated: bool,
}

/// Room for the control data of one `sendmsg` of ours: `CMSG_SPACE` of
/// [`MAX_FDS_PER_FRAME`] descriptors (16 + 1012 rounded up to 8 on 64-bit Linux), as `u64`s so
/// it is aligned for `cmsghdr`.
const CMSG_WORDS: usize = (16 + MAX_FDS_PER_FRAME * 4).div_ceil(8) + 2;

/// Reads into `buf`, with the descriptors that arrive. A read that the kernel had to
/// truncate is not an error: the descriptors it did install are returned (not leaked), and
/// [`Received::truncated`] says some are missing.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    use nix::libc;
    let mut cmsg = [0u64; CMSG_WORDS];
    let space = std::mem::size_of_val(&cmsg);
    // SAFETY: CMSG_SPACE only computes a length.
    debug_assert!(unsafe { libc::CMSG_SPACE((MAX_FDS_PER_FRAME * 4) as u32) } as usize <= space);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "no name, no iovec, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = libc::MSG_DONTWAIT;
    // SAFETY: `msg` points at `iov` (which points at `buf`) and at `cmsg`, all alive and
    // exclusively borrowed for the call, with their true lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_control`/`msg_controllen` with well-formed headers, also
    // when it set MSG_CTRUNC (it then reports only the descriptors it installed); the CMSG
    // macros walk them within `msg_controllen`, and the data is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // The kernel has just installed `fd` in our table for this message; no
                    // other code knows the number, so this is its one owner.
                    let fd = OwnedFd::from_raw_fd(fd);
                    // Without MSG_CMSG_CLOEXEC the flag is set right after (no fork happens here).
                    #[cfg(not(any(
                        target_os = "linux",
                        target_os = "android",
                        target_os = "freebsd"
                    )))]
                    set_cloexec_nonblock(&fd, false);
                    fds.push(fd);
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Runs in the child between `fork` and `exec`, after [`child_setup`]: becomes `uid` with group
/// `gid` and exactly the supplementary `groups` (computed before the fork). Only
/// async-signal-safe system calls; in this order, since each needs the privileges the next one
/// drops.
pub fn become_user(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls in the forked child; `groups` is a slice allocated before the
    // fork, read as `len` `gid_t`s (`u32` on every Unix we build for), not written.
    unsafe {
        if libc::setgroups(groups.len() as _, groups.as_ptr().cast()) < 0
            || libc::setgid(gid) < 0
            || libc::setuid(uid) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs in the child between `fork` and `exec` (from `Command::pre_exec`): puts the channel on
/// descriptor 3 and the executable handle on 4, and marks every other descriptor close-on-exec.
/// Only async-signal-safe system calls are made here: no allocation, no locks.
pub fn child_setup(channel: RawFd, exe: Option<RawFd>) -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls on descriptor numbers in the forked child, which owns copies of
    // every descriptor of the parent. `F_DUPFD_CLOEXEC` first moves the two descriptors above the
    // targets, so `dup2` cannot clobber one with the other.
    unsafe {
        let chan = libc::fcntl(channel, libc::F_DUPFD_CLOEXEC, 10);
        if chan < 0 {
            return Err(io::Error::last_os_error());
        }
        let exe = match exe {
            Some(fd) => {
                let e = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if e < 0 {
                    return Err(io::Error::last_os_error());
                }
                Some(e)
            }
            None => None,
        };
        // dup2 leaves the new descriptor without close-on-exec: the channel is inherited.
        if libc::dup2(chan, CHANNEL_FD) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut first_cloexec = CHANNEL_FD + 1;
        if let Some(e) = exe {
            if libc::dup2(e, EXE_FD) < 0 || libc::fcntl(EXE_FD, libc::F_SETFD, libc::FD_CLOEXEC) < 0
            {
                return Err(io::Error::last_os_error());
            }
            first_cloexec = EXE_FD + 1;
        }
        close_range_cloexec(first_cloexec);
    }
    Ok(())
}

/// Child setup for a new primary (a full upgrade): descriptor `sources[i]` becomes `3 + i`
/// without close-on-exec, every other descriptor closes at `exec`. The sources must all lie
/// above the targets (see [`dup_above`]), so no `dup2` clobbers one still to be moved.
///
/// Runs in the forked child before `exec`: only async-signal-safe system calls.
pub fn child_place_fds(sources: &[RawFd]) -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls on descriptor numbers in the forked child, which owns copies of
    // every descriptor of the parent; the targets are below every source.
    unsafe {
        for (i, src) in sources.iter().enumerate() {
            let target = 3 + i as RawFd;
            // dup2 leaves the new descriptor without close-on-exec: it is inherited.
            if libc::dup2(*src, target) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        close_range_cloexec(3 + sources.len() as RawFd);
    }
    Ok(())
}

/// A close-on-exec copy of `fd` numbered `min` or above.
pub fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    use nix::libc;
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)` on a descriptor we borrow; the copy is new and ours.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` is a descriptor the call above just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Takes descriptor `fd`, which an old primary handed this one for the upgrade's status
/// channel, after checking that it is a Unix stream socket; marks it close-on-exec.
pub fn adopt_stream_fd(fd: RawFd) -> Option<OwnedFd> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    fcntl(fd, FcntlArg::F_GETFD).ok()?;
    // SAFETY: the descriptor is open (checked above); we only borrow it for one query.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if !matches!(
        getsockopt(&borrowed, sockopt::SockType),
        Ok(SockType::Stream)
    ) {
        return None;
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
    // SAFETY: the old primary handed this descriptor over for the status channel (the
    // environment names it, and its parent is that primary); nothing else in the process
    // claims it: the role is decided before any other code runs.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Marks every descriptor from `from` on close-on-exec, so nothing the primary inherited
/// without the flag leaks into a worker. Older kernels lack `close_range`; there the flags the
/// standard library, tokio and nix set on their own descriptors still hold.
#[cfg(target_os = "linux")]
unsafe fn close_range_cloexec(from: RawFd) {
    use nix::libc;
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: `close_range` only changes descriptor flags; an error (ENOSYS, EINVAL) is ignored.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            from as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
    }
}

#[cfg(not(target_os = "linux"))]
unsafe fn close_range_cloexec(_from: RawFd) {}

/// The program path through which the child execs the handle set up by [`child_setup`].
pub fn exe_path() -> &'static str {
    "/proc/self/fd/4"
}

/// Takes ownership of the worker's channel on descriptor 3, after checking that it is a Unix
/// stream socket; marks it close-on-exec so the worker's own children do not inherit it.
pub fn adopt_channel() -> Result<OwnedFd, String> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{
        AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
    };
    let bad = || {
        format!(
            "`CLUSTER_WORKER_ID` is set but descriptor {CHANNEL_FD} is not a cluster channel; \
             a worker must be started by its primary (unset `CLUSTER_WORKER_ID` to run as a primary)"
        )
    };
    if fcntl(CHANNEL_FD, FcntlArg::F_GETFD).is_err() {
        return Err(bad());
    }
    // SAFETY: descriptor 3 is open (checked above); we only borrow it for two queries.
    let borrowed = unsafe { BorrowedFd::borrow_raw(CHANNEL_FD) };
    let stream = matches!(
        getsockopt(&borrowed, sockopt::SockType),
        Ok(SockType::Stream)
    );
    let unix = getsockname::<SockaddrStorage>(CHANNEL_FD)
        .ok()
        .and_then(|a| a.family())
        .is_some_and(|f| f == AddressFamily::Unix);
    if !(stream && unix) {
        return Err(bad());
    }
    fcntl(CHANNEL_FD, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| format!("{}: {e}", bad()))?;
    // SAFETY: descriptor 3 was handed to this process by its primary for the channel, and
    // nothing else in the process claims it: the role is decided before any other code runs.
    Ok(unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) })
}

/// Removes a variable from the environment.
///
/// # Safety
/// No other thread may exist: call it only while deciding the role, before any runtime starts.
pub unsafe fn remove_env(key: &str) {
    // SAFETY: the caller guarantees the process is single-threaded, so no other thread reads the
    // environment while it changes.
    unsafe { std::env::remove_var(key) }
}

/// Makes the kernel kill this worker when the thread that forked it in the primary ends.
#[cfg(target_os = "linux")]
pub fn set_parent_death_signal() {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
}

#[cfg(not(target_os = "linux"))]
pub fn set_parent_death_signal() {}

/// Accepts one connection without registering it anywhere: the primary only passes it on.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{SockFlag, accept4};
    let fd = accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(io::Error::from)?;
    // SAFETY: `accept4` just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Accepts one connection without registering it anywhere: the primary only passes it on.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::accept(listener.as_raw_fd()).map_err(io::Error::from)?;
    // SAFETY: `accept` just returned this new descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec_nonblock(&fd, true);
    Ok(fd)
}

/// Sets close-on-exec (and non-blocking) where the platform cannot ask for it atomically.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
pub fn set_cloexec_nonblock(fd: &OwnedFd, nonblock: bool) {
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    if nonblock {
        let flags =
            OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap_or(0));
        let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK));
    }
}

/// Registers a listening socket with tokio's reactor for readiness only.
pub fn async_listener(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it until dropped: the number
    // stays open and refers to the same socket for the registration's whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Takes the `n` sockets systemd passed from descriptor 3 on, as libsystemd does: it stops at
/// the first descriptor that is not open (so a wrong, huge `n` costs nothing), and leaves alone
/// (neither adopted nor changed) one that is not a socket. Returns the sockets and, when it
/// stopped early, the first descriptor that was not open.
pub fn adopt_listen_fds(n: u32) -> (Vec<OwnedFd>, Option<RawFd>) {
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    use nix::sys::stat::{SFlag, fstat};
    let mut fds = Vec::new();
    for i in 0..n {
        let Some(fd) = RawFd::try_from(i).ok().and_then(|i| i.checked_add(3)) else {
            break;
        };
        let Ok(st) = fstat(fd) else {
            return (fds, Some(fd));
        };
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
            continue;
        }
        if fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).is_err() {
            return (fds, Some(fd));
        }
        // systemd passes blocking sockets by default; the primary's accept loop needs them
        // non-blocking (the flag is the socket's, so workers that get it agree).
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap_or(0));
        if fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).is_err() {
            continue;
        }
        // SAFETY: `LISTEN_PID` names this process, so systemd handed it this descriptor (open
        // and a socket, checked above); the primary takes it before any other code runs, and
        // nothing else in the process owns it.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    (fds, None)
}

/// Makes the listening TCP socket `fd` drop new connection requests (`on`), or take them
/// again: a classic BPF socket filter that drops segments with SYN set and ACK clear, and
/// keeps everything else. Handshakes already under way complete and queue as usual, so the
/// queue can then be accepted empty before the socket closes, and nothing queued on it is
/// reset. A client whose SYN was dropped sends it again about a second later: by then it
/// reaches a socket that takes it (another `SO_REUSEPORT` slot, a new primary), or the port
/// is closed and its connect is refused. A filter needs no privilege.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn drop_new_connections(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::libc;
    // For a TCP socket the filter sees the segment from its TCP header: byte 13 holds the
    // flags (0x02 SYN, 0x10 ACK).
    let program = [
        // A = flags
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 13,
        },
        // A &= SYN | ACK
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0x12,
        },
        // A == SYN alone: drop; else keep
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: 0x02,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        },
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    let unused: libc::c_int = 0;
    // SAFETY: `prog` and the program it points at live across the call, which copies them;
    // the option's length is that of `sock_fprog`. Detaching reads no value, but the kernel
    // wants an `int`'s room for it.
    let rc = unsafe {
        if on {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        } else {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_DETACH_FILTER,
                (&unused as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // Detaching where none is attached.
        if !on && e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Elsewhere, new connections keep coming until the socket closes.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn drop_new_connections(_fd: BorrowedFd<'_>, _on: bool) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn a_listener_dropping_new_connections_still_serves_its_queue_and_takes_new_ones_again() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Queued before: accepted and served as usual.
        let mut early = std::net::TcpStream::connect(addr).unwrap();
        drop_new_connections(l.as_fd(), true).unwrap();
        // A new one waits: its SYN is dropped (no refusal, no connection).
        let late = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        let e = late.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let (mut s, _) = l.accept().unwrap();
        early.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        drop_new_connections(l.as_fd(), false).unwrap();
        drop_new_connections(l.as_fd(), false).unwrap();
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    }
}
