//! Running under a service manager: systemd's readiness notifications ([`notify`]) and socket
//! activation ([`activation`]).

mod activation;
pub(crate) mod notify;

pub(crate) use activation::{
    Origin, from_systemd, lend, old_primary_gone, reclaim, release, shared_elsewhere,
    take_inherited, unused,
};

/// Keeps the listening sockets an old primary handed over (a full upgrade): `fds` are
/// descriptors `3..3 + n`; the first `from_systemd` of them came from systemd; `names` are the
/// paths of the Unix sockets among them, by index.
pub(crate) fn adopt_upgrade(n: u32, from_systemd: u32, names: &[(usize, std::path::PathBuf)]) {
    let (fds, stopped) = crate::sys::adopt_listen_fds(n);
    if let Some(fd) = stopped {
        eprintln!(
            "cluster: the old primary handed over {n} sockets, but descriptor {fd} is not open"
        );
    }
    let mut named: Vec<_> = fds
        .into_iter()
        .enumerate()
        .map(|(i, fd)| {
            let name = names
                .iter()
                .find(|(at, _)| *at == i)
                .map(|(_, p)| p.clone());
            (fd, name)
        })
        .collect();
    // A socket the old primary had stopped taking connections (a leaving key) takes them here.
    for (fd, _) in &named {
        let _ = crate::sys::drop_new_connections(std::os::fd::AsFd::as_fd(fd), false);
    }
    let rest = named.split_off((from_systemd as usize).min(named.len()));
    activation::adopt(named, Origin::Systemd);
    activation::adopt(rest, Origin::Upgrade);
}

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
    let listen_fds = std::env::var("LISTEN_FDS").ok();
    for key in [
        "NOTIFY_SOCKET",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ] {
        // SAFETY: the caller guarantees a single thread.
        unsafe { crate::sys::remove_env(key) };
    }
    notify::set_socket(notify);
    if listen_pid != Some(std::process::id()) {
        return;
    }
    let Some(text) = listen_fds else { return };
    // libsystemd's bound: descriptors start at 3, so at most `i32::MAX - 3` of them.
    match text.trim().parse::<u32>() {
        Ok(0) => {}
        Ok(n) if n <= i32::MAX as u32 - 3 => {
            let (fds, stopped) = crate::sys::adopt_listen_fds(n);
            if let Some(fd) = stopped {
                eprintln!(
                    "cluster: LISTEN_FDS={n}, but descriptor {fd} is not open: using the {} socket(s) before it",
                    fds.len()
                );
            }
            activation::adopt(
                fds.into_iter().map(|fd| (fd, None)).collect(),
                Origin::Systemd,
            );
        }
        _ => eprintln!("cluster: LISTEN_FDS={text:?} is not a descriptor count; ignored"),
    }
}
