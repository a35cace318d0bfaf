//! Listeners that share server ports across the cluster.
//!
//! In a worker, [`TcpListener::bind`] asks the primary for the server: all workers binding the
//! same address share one port (port 0 included), served by the scheduling policy. Outside a
//! cluster (in the primary, or a program not started by one) it is a plain bind. Accepted
//! connections are ordinary [`tokio::net::TcpStream`]s, so hyper, axum and tonic work unchanged.

mod acceptor;
mod tcp;
mod udp;
mod unix;

pub use tcp::TcpListener;
pub use udp::UdpSocket;
pub use unix::UnixListener;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::wire::{Control, Grant, PolicyWire};
use crate::worker::Link;

/// An address a cluster server listens on, as `Event::Listening` reports it.
///
/// The channel carries it as it is, hence the serde derives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ListenAddress {
    /// A TCP listener.
    Tcp(SocketAddr),
    /// A UDP socket.
    Udp(SocketAddr),
    /// A Unix-domain stream listener.
    Unix(PathBuf),
}

/// The socket address (`127.0.0.1:8000`) or the path.
impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(a) | ListenAddress::Udp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl ListenAddress {
    /// The socket address, for TCP and UDP.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            ListenAddress::Tcp(a) | ListenAddress::Udp(a) => Some(*a),
            ListenAddress::Unix(_) => None,
        }
    }

    /// The port, for TCP and UDP.
    pub fn port(&self) -> Option<u16> {
        self.socket_addr().map(|a| a.port())
    }
}

/// A registration of this worker's listener with the primary; unregisters on drop.
struct Registration {
    link: &'static Arc<Link>,
    addr: ListenAddress,
    index: u32,
    server: Option<u32>,
    /// Whether the primary must hear about the close.
    notify: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(server) = self.server {
            self.link.handoffs.close(server);
        }
        let mut idx = self.link.indexes.lock().unwrap_or_else(|p| p.into_inner());
        let present = idx.get_mut(&self.addr).is_some_and(|v| {
            let before = v.len();
            v.retain(|i| *i != self.index);
            before != v.len()
        });
        drop(idx);
        // After a disconnect the link already told the primary about every listener.
        if present && self.notify {
            self.link.control(
                Control::CloseServer {
                    addr: self.addr.clone(),
                    index: self.index,
                },
                vec![],
            );
        }
    }
}

/// Asks the primary for the server on `addr`; returns the grant, the bound address, the
/// descriptors that came with it and the registration.
async fn query(
    link: &'static Arc<Link>,
    addr: ListenAddress,
    mode: Option<u32>,
) -> io::Result<(Grant, ListenAddress, Vec<OwnedFd>, Registration)> {
    if link.is_disconnecting() {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "cluster: the worker is disconnecting",
        ));
    }
    let index = {
        let mut idx = link.indexes.lock().unwrap_or_else(|p| p.into_inner());
        let used = idx.entry(addr.clone()).or_default();
        // Node's listen index: the lowest not in use by this worker on this address.
        let mut i = 0;
        while used.contains(&i) {
            i += 1;
        }
        used.push(i);
        i
    };
    let mut reg = Registration {
        link,
        addr: addr.clone(),
        index,
        server: None,
        notify: true,
    };
    let policy = PolicyWire::RoundRobin; // the primary decides; this is only a hint
    let (result, fds) = link
        .query(|req| Control::QueryServer {
            req,
            addr: addr.clone(),
            index,
            policy,
            mode,
        })
        .await
        .map_err(io::Error::from)?;
    match result {
        Ok((grant, bound)) => {
            if let Grant::RoundRobin { server } = grant {
                reg.server = Some(server);
            }
            Ok((grant, bound, fds, reg))
        }
        Err((errno, msg)) => {
            // A failed key is forgotten on both sides, so a retry can succeed later.
            let kind = if errno != 0 {
                io::Error::from_raw_os_error(errno).kind()
            } else {
                io::ErrorKind::Other
            };
            // Dropping the registration frees the index; the primary already forgot the key.
            reg.notify = false;
            drop(reg);
            Err(io::Error::new(
                kind,
                format!("cluster: cannot listen on {addr}: {msg}"),
            ))
        }
    }
}

fn announce(link: &Link, bound: &ListenAddress) {
    link.control(
        Control::Listening {
            addr: bound.clone(),
        },
        vec![],
    );
}

/// Whether a handed-over connection is already non-blocking (as tokio needs it).
fn is_nonblocking(fd: &OwnedFd) -> bool {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), FcntlArg::F_GETFL)
        .is_ok_and(|f| OFlag::from_bits_truncate(f).contains(OFlag::O_NONBLOCK))
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "cluster: listener closed because the worker is disconnecting",
    )
}
