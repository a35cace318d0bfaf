//! Running under a service manager: systemd's readiness notifications ([`notify`]) and socket
//! activation ([`activation`]).

mod activation;
pub(crate) mod notify;

pub(crate) use activation::{is_inherited, release, take_inherited};

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
    notify::set_socket(notify);
    if listen_pid == Some(std::process::id()) && listen_fds > 0 {
        let fds = crate::sys::adopt_listen_fds(listen_fds);
        activation::adopt(fds);
    }
}
