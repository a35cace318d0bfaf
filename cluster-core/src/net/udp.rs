//! The UDP socket the cluster shares.

use std::io;

use tokio::net::ToSocketAddrs;

use super::{ListenAddress, Registration, announce, query};
use crate::worker::link;

/// A UDP socket shared by every worker of the cluster (always one socket, as in Node).
pub struct UdpSocket {
    socket: tokio::net::UdpSocket,
    _reg: Option<Registration>,
}

impl std::fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSocket")
            .field("socket", &self.socket)
            .finish()
    }
}

impl UdpSocket {
    /// Binds `addr`: the primary's shared socket in a worker, a plain socket elsewhere.
    pub async fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<Self> {
        let addr = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind"))?;
        let Some(link) = link() else {
            return Ok(UdpSocket {
                socket: tokio::net::UdpSocket::bind(addr).await?,
                _reg: None,
            });
        };
        let (_, bound, fds, reg) = query(link, ListenAddress::Udp(addr), None).await?;
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| io::Error::other("cluster: the primary sent no socket"))?;
        let std = std::net::UdpSocket::from(fd);
        std.set_nonblocking(true)?;
        announce(link, &bound);
        Ok(UdpSocket {
            socket: tokio::net::UdpSocket::from_std(std)?,
            _reg: Some(reg),
        })
    }
}

impl std::ops::Deref for UdpSocket {
    type Target = tokio::net::UdpSocket;

    fn deref(&self) -> &tokio::net::UdpSocket {
        &self.socket
    }
}
