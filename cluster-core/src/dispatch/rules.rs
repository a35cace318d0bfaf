//! What one worker may ask the primary to listen on ([`BindPolicy`]), checked before anything
//! is bound: the primary often runs as root for workers that run as another user, and must not
//! lend them a privilege they do not have.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::config::BindPolicy;
use crate::wire::BindAddr;

/// A request the policy refuses: the errno the worker's `bind` fails with, and why.
#[derive(Debug)]
pub(crate) struct Denied {
    pub(crate) errno: i32,
    pub(crate) message: String,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Denied {}

impl Denied {
    fn error(errno: i32, message: String) -> io::Error {
        io::Error::other(Denied { errno, message })
    }
}

/// One worker's rules: the policy it was forked with, and who it runs as.
#[derive(Debug, Default)]
pub(crate) struct BindRules {
    policy: BindPolicy,
    /// The worker's uid, gid and groups (the gid among them), when it is not the primary's user
    /// (and not root).
    other_user: Option<(u32, u32, Vec<u32>)>,
}

impl BindRules {
    /// Rules for a worker forked with `policy`, running as `user` (uid, gid and groups) when
    /// set.
    pub(crate) fn new(policy: BindPolicy, user: Option<(u32, u32, Vec<u32>)>) -> Self {
        let me = nix::unistd::geteuid().as_raw();
        BindRules {
            policy,
            other_user: user.filter(|(uid, ..)| *uid != me && *uid != 0),
        }
    }

    /// Who a Unix socket file created for this worker belongs to: the worker's user and group
    /// when it runs as another user (the file it would have created itself).
    pub(crate) fn owner(&self) -> Option<(u32, u32)> {
        self.other_user.as_ref().map(|(uid, gid, _)| (*uid, *gid))
    }

    pub(crate) fn max_servers(&self) -> usize {
        self.policy.max_servers
    }

    /// Checks an IP address and port (Unix paths are checked on their directory, see
    /// [`check_dir`](Self::check_dir)).
    pub(crate) fn check_addr(&self, addr: &BindAddr) -> io::Result<()> {
        let (BindAddr::Tcp(a) | BindAddr::Udp(a)) = addr else {
            return Ok(());
        };
        if let Some(allowed) = &self.policy.addresses {
            if !allowed.contains(&a.ip()) {
                return Err(Denied::error(
                    nix::libc::EACCES,
                    format!(
                        "the bind policy does not allow address {} (BindPolicy::addresses)",
                        a.ip()
                    ),
                ));
            }
        }
        let port = a.port();
        if port == 0 {
            return Ok(());
        }
        match &self.policy.ports {
            Some(ranges) if ranges.iter().any(|r| r.contains(&port)) => Ok(()),
            Some(_) => Err(Denied::error(
                nix::libc::EACCES,
                format!("the bind policy does not allow port {port} (BindPolicy::ports)"),
            )),
            None => match &self.other_user {
                Some((uid, ..)) if port < unprivileged_port_start() => Err(Denied::error(
                    nix::libc::EACCES,
                    format!(
                        "port {port} is privileged and this worker runs as uid {uid}, which could not bind it \
                         itself; allow it with BindPolicy::ports"
                    ),
                )),
                _ => Ok(()),
            },
        }
    }

    /// Checks the directory a Unix socket is to be created in (a handle opened on it, so the
    /// directory checked is the one used).
    pub(crate) fn check_dir(&self, dir: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
        let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(io::Error::from)?;
        if let Some(allowed) = &self.policy.unix_dirs {
            let ok = allowed.iter().any(|d| {
                nix::sys::stat::stat(d.as_path())
                    .is_ok_and(|a| a.st_dev == st.st_dev && a.st_ino == st.st_ino)
            });
            return if ok {
                Ok(())
            } else {
                Err(Denied::error(
                    nix::libc::EACCES,
                    format!(
                        "the bind policy does not allow Unix sockets in the directory of `{}` (BindPolicy::unix_dirs)",
                        path.display()
                    ),
                ))
            };
        }
        let Some((uid, gid, groups)) = &self.other_user else {
            return Ok(());
        };
        // Creating a file takes write and search permission on the directory (ACLs and
        // capabilities aside), read from its mode bits as the kernel would for this user.
        let mode = st.st_mode as u32;
        let bits = if st.st_uid == *uid {
            (mode >> 6) & 0o7
        } else if *gid == st.st_gid || groups.contains(&st.st_gid) {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        };
        if bits & 0o3 == 0o3 {
            Ok(())
        } else {
            Err(Denied::error(
                nix::libc::EACCES,
                format!(
                    "this worker runs as uid {uid}, which cannot create `{}` itself (its directory is not writable for it); \
                     allow the directory with BindPolicy::unix_dirs",
                    path.display()
                ),
            ))
        }
    }
}

/// The errno and message of a refusal, or of any other error of a bind.
pub(crate) fn describe(e: &io::Error) -> (i32, String) {
    match e.get_ref().and_then(|i| i.downcast_ref::<Denied>()) {
        Some(d) => (d.errno, d.message.clone()),
        None => {
            use nix::libc;
            // An error made here with a kind and a message keeps its kind across the channel.
            let errno = e.raw_os_error().unwrap_or(match e.kind() {
                io::ErrorKind::AddrInUse => libc::EADDRINUSE,
                io::ErrorKind::PermissionDenied => libc::EACCES,
                io::ErrorKind::InvalidInput => libc::EINVAL,
                io::ErrorKind::NotFound => libc::ENOENT,
                _ => 0,
            });
            (errno, e.to_string())
        }
    }
}

/// Whether `e` is a refusal of the policy (not an error of the system).
pub(crate) fn is_denied(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Denied>())
}

/// The per-worker limit of open servers was reached.
pub(crate) fn too_many(id: u32, max: usize) -> io::Error {
    Denied::error(
        0,
        format!(
            "worker {id} already has {max} servers open, the most the bind policy allows (BindPolicy::max_servers)"
        ),
    )
}

/// The lowest port an unprivileged user may bind (`net.ipv4.ip_unprivileged_port_start`).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(port: u16) -> BindAddr {
        BindAddr::Tcp(([127, 0, 0, 1], port).into())
    }

    #[test]
    fn another_user_gets_no_privileged_port_unless_allowed() {
        let nobody = BindRules::new(BindPolicy::default(), Some((65534, 65534, vec![])));
        if unprivileged_port_start() > 81 {
            let e = nobody.check_addr(&tcp(81)).unwrap_err();
            assert!(is_denied(&e));
            assert_eq!(describe(&e).0, nix::libc::EACCES);
            assert!(e.to_string().contains("port 81 is privileged"), "{e}");
        }
        assert!(nobody.check_addr(&tcp(8080)).is_ok());
        assert!(nobody.check_addr(&tcp(0)).is_ok());
        let policy = BindPolicy {
            ports: Some(vec![80..=81]),
            ..BindPolicy::default()
        };
        let allowed = BindRules::new(policy, Some((65534, 65534, vec![])));
        assert!(allowed.check_addr(&tcp(81)).is_ok());
        assert!(
            allowed.check_addr(&tcp(8080)).is_err(),
            "only the ports listed"
        );
        // The primary's own user, or root: anything the primary can bind.
        let me = nix::unistd::geteuid().as_raw();
        let same = BindRules::new(BindPolicy::default(), Some((me, me, vec![])));
        assert!(same.check_addr(&tcp(81)).is_ok());
    }

    #[test]
    fn addresses_are_checked_when_listed() {
        let policy = BindPolicy {
            addresses: Some(vec!["127.0.0.1".parse().unwrap()]),
            ..BindPolicy::default()
        };
        let r = BindRules::new(policy, None);
        assert!(r.check_addr(&tcp(8000)).is_ok());
        let e = r
            .check_addr(&BindAddr::Tcp(([0, 0, 0, 0], 8000).into()))
            .unwrap_err();
        assert!(e.to_string().contains("address 0.0.0.0"), "{e}");
    }
}
