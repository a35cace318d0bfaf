//! Readiness notifications (`NOTIFY_SOCKET`): `READY=1`, `RELOADING=1`, `STOPPING=1`.

use std::sync::OnceLock;

static NOTIFY: OnceLock<Option<std::ffi::OsString>> = OnceLock::new();

/// Where notifications go (read once from the environment at start).
pub(super) fn set_socket(path: Option<std::ffi::OsString>) {
    let _ = NOTIFY.set(path);
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
