//! The primary's side of shared server ports: one socket per address key, and the round-robin
//! dispatcher that accepts and hands connections to workers.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::channel::Outbox;
use crate::config::SchedulingPolicy;
use crate::sys;
use crate::wire::{BindAddr, Control, Grant, Wire};

/// Orphaned `SO_REUSEPORT` sockets wait this long for a replacement worker before they close.
const SLOT_GRACE: Duration = Duration::from_secs(2);

type KeyId = (BindAddr, u32);

pub(crate) struct Servers {
    policy: Mutex<SchedulingPolicy>,
    st: Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: HashMap<KeyId, Key>,
    /// The round-robin keys by server id, for `Accepted` frames.
    rr: HashMap<u32, Arc<RoundRobin>>,
    next_server: u32,
    /// Reuseport slot of each worker that has one.
    slots: HashMap<u32, usize>,
}

struct Key {
    bound: BindAddr,
    members: Vec<u32>,
    kind: KeyKind,
}

enum KeyKind {
    RoundRobin(Arc<RoundRobin>),
    Shared(OwnedFd),
    ReusePort(HashMap<usize, OwnedFd>),
}

impl Servers {
    pub(crate) fn new(policy: SchedulingPolicy) -> Arc<Self> {
        Arc::new(Servers {
            policy: Mutex::new(policy),
            st: Mutex::new(State::default()),
        })
    }

    pub(crate) fn policy(&self) -> SchedulingPolicy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_policy(&self, policy: SchedulingPolicy) {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles a server-related control message from worker `id`.
    pub(crate) fn handle(
        self: &Arc<Self>,
        id: u32,
        outbox: &Arc<Outbox>,
        c: Control,
        _fds: Vec<OwnedFd>,
    ) {
        match c {
            Control::QueryServer {
                req, addr, index, ..
            } => {
                let (result, fds) = match self.query(id, outbox, &addr, index) {
                    Ok((grant, bound, fds)) => (Ok((grant, bound)), fds),
                    Err(e) => (Err((e.raw_os_error().unwrap_or(0), e.to_string())), vec![]),
                };
                let _ = outbox.send(
                    &Wire::<()>::Control(Control::ServerReply { req, result }),
                    fds,
                );
            }
            Control::Accepted { server, n } => {
                let rr = self.lock().rr.get(&server).cloned();
                if let Some(rr) = rr {
                    rr.accepted(id, n as usize);
                }
            }
            Control::CloseServer { addr, index } => self.leave(id, &(addr, index)),
            _ => {}
        }
    }

    fn query(
        self: &Arc<Self>,
        id: u32,
        outbox: &Arc<Outbox>,
        addr: &BindAddr,
        index: u32,
    ) -> io::Result<(Grant, BindAddr, Vec<OwnedFd>)> {
        let mut st = self.lock();
        let key: KeyId = (addr.clone(), index);
        let configured = self.policy();
        let policy = match addr {
            // Datagrams have no connections to hand out: always the shared socket, as in Node.
            BindAddr::Udp(_) => SchedulingPolicy::Shared,
            BindAddr::Unix(_) if configured == SchedulingPolicy::ReusePort => {
                SchedulingPolicy::Shared
            }
            _ => configured,
        };
        // Node's rule: a second listen on a fixed port in the same worker is EADDRINUSE (with
        // port 0 it gets a port of its own, through its own key).
        if index > 0 && fixed_port(addr) && st.keys.keys().any(|(a, i)| a == addr && *i != index) {
            return Err(io::Error::from_raw_os_error(nix::libc::EADDRINUSE));
        }
        if !st.keys.contains_key(&key) {
            let next = st.next_server;
            st.next_server += 1;
            let (bound, kind) = match policy {
                SchedulingPolicy::RoundRobin => {
                    let (fd, bound) = bind(addr, false)?;
                    let rr = RoundRobin::start(next, fd)?;
                    st.rr.insert(next, rr.clone());
                    (bound, KeyKind::RoundRobin(rr))
                }
                SchedulingPolicy::Shared => {
                    let (fd, bound) = bind(addr, false)?;
                    (bound, KeyKind::Shared(fd))
                }
                SchedulingPolicy::ReusePort => {
                    let (fd, bound) = bind(addr, true)?;
                    let slot = slot_for(&mut st, id);
                    (bound, KeyKind::ReusePort(HashMap::from([(slot, fd)])))
                }
            };
            st.keys.insert(
                key.clone(),
                Key {
                    bound,
                    members: Vec::new(),
                    kind,
                },
            );
        }
        let slot = if matches!(st.keys[&key].kind, KeyKind::ReusePort(_)) {
            Some(slot_for(&mut st, id))
        } else {
            None
        };
        let k = st.keys.get_mut(&key).expect("key inserted above");
        if !k.members.contains(&id) {
            k.members.push(id);
        }
        let bound = k.bound.clone();
        match &mut k.kind {
            KeyKind::RoundRobin(rr) => {
                rr.join(id, outbox.clone());
                Ok((Grant::RoundRobin { server: rr.id }, bound, vec![]))
            }
            KeyKind::Shared(fd) => Ok((Grant::Handle, bound, vec![fd.try_clone()?])),
            KeyKind::ReusePort(slots) => {
                let slot = slot.expect("reuseport keys have slots");
                if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(slot) {
                    // Same address and port as the first slot, so port 0 is shared too.
                    let (fd, _) = bind(&bound, true)?;
                    e.insert(fd);
                }
                Ok((Grant::Handle, bound, vec![slots[&slot].try_clone()?]))
            }
        }
    }

    /// Worker `id` closed its listener on `key`.
    fn leave(self: &Arc<Self>, id: u32, key: &KeyId) {
        let mut st = self.lock();
        let Some(k) = st.keys.get_mut(key) else {
            return;
        };
        k.members.retain(|m| *m != id);
        if let KeyKind::RoundRobin(rr) = &k.kind {
            rr.leave(id);
        }
        if k.members.is_empty() {
            let k = st.keys.remove(key).expect("key present");
            if let KeyKind::RoundRobin(rr) = &k.kind {
                st.rr.remove(&rr.id);
            }
            close_key(k);
        }
    }

    /// Worker `new` replaces `old` (a reload): under `reuseport` it takes the same slot, and
    /// both accept from the slot's socket until `old` leaves.
    pub(crate) fn inherit_slot(&self, new: u32, old: u32) {
        let mut st = self.lock();
        if let Some(slot) = st.slots.get(&old).copied() {
            st.slots.insert(new, slot);
        }
    }

    /// Worker `id` is gone: it leaves every key, its queued connections go to the others.
    pub(crate) fn worker_gone(self: &Arc<Self>, id: u32) {
        let keys: Vec<KeyId> = self
            .lock()
            .keys
            .iter()
            .filter(|(_, k)| k.members.contains(&id))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.leave(id, &key);
        }
        let slot = self.lock().slots.remove(&id);
        if let Some(slot) = slot {
            // The slot's sockets keep their accept queues for a replacement; without one soon,
            // close them so the kernel stops hashing new connections onto them.
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SLOT_GRACE).await;
                let mut st = me.lock();
                if st.slots.values().any(|s| *s == slot) {
                    return;
                }
                for k in st.keys.values_mut() {
                    if let KeyKind::ReusePort(slots) = &mut k.kind {
                        slots.remove(&slot);
                    }
                }
            });
        }
    }
}

fn slot_for(st: &mut State, id: u32) -> usize {
    if let Some(s) = st.slots.get(&id) {
        return *s;
    }
    let mut s = 0;
    while st.slots.values().any(|x| *x == s) {
        s += 1;
    }
    st.slots.insert(id, s);
    s
}

fn close_key(k: Key) {
    match &k.kind {
        KeyKind::RoundRobin(rr) => rr.stop(),
        KeyKind::Shared(fd) => crate::notify::release(fd),
        KeyKind::ReusePort(_) => {}
    }
    if let BindAddr::Unix(path) = &k.bound {
        let _ = std::fs::remove_file(path);
    }
}

fn fixed_port(addr: &BindAddr) -> bool {
    match addr {
        BindAddr::Tcp(a) | BindAddr::Udp(a) => a.port() != 0,
        BindAddr::Unix(_) => true,
    }
}

/// Binds a listening (or UDP) socket for `addr`; returns it with the address it got.
pub(crate) fn bind(addr: &BindAddr, reuseport: bool) -> io::Result<(OwnedFd, BindAddr)> {
    // Under systemd socket activation the primary serves the sockets it was handed.
    if !reuseport {
        if let Some(fd) = crate::notify::take_inherited(addr) {
            let bound = local_addr(&fd, addr)?;
            return Ok((fd, bound));
        }
    }
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
        sys::set_cloexec_nonblock(&fd, true);
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

/// Round-robin dispatch for one key: the primary accepts, each connection goes to the next
/// member; the primary keeps its copy until the worker acknowledges, so a connection queued for
/// a worker that closes or dies goes to another instead of being lost.
pub(crate) struct RoundRobin {
    pub(crate) id: u32,
    st: Mutex<RrState>,
    stop: tokio::sync::Notify,
    /// A second descriptor of the listening socket, to stop it listening at once on close.
    listener: Mutex<Option<OwnedFd>>,
}

#[derive(Default)]
struct RrState {
    members: Vec<(u32, Arc<Outbox>)>,
    next: usize,
    /// Connections sent to each worker and not yet acknowledged, oldest first. The outbox
    /// shares each descriptor until it has been sent: no copy is made, and the connection
    /// closes here when the worker acknowledges it (it then holds its own).
    inflight: HashMap<u32, VecDeque<Arc<OwnedFd>>>,
    /// Connections waiting for a member (none listening right now).
    backlog: VecDeque<Arc<OwnedFd>>,
    stopped: bool,
}

impl RoundRobin {
    fn start(id: u32, listener: OwnedFd) -> io::Result<Arc<Self>> {
        let rr = Arc::new(RoundRobin {
            id,
            st: Mutex::new(RrState::default()),
            stop: tokio::sync::Notify::new(),
            listener: Mutex::new(listener.try_clone().ok()),
        });
        let afd = sys::async_listener(listener)?;
        let me = rr.clone();
        tokio::spawn(async move { me.accept_loop(afd).await });
        Ok(rr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RrState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn accept_loop(self: Arc<Self>, afd: AsyncFd<OwnedFd>) {
        let mut backoff = Duration::from_millis(5);
        let stop = self.stop.notified();
        tokio::pin!(stop);
        loop {
            let mut guard = tokio::select! {
                g = afd.readable() => match g { Ok(g) => g, Err(_) => return },
                _ = &mut stop => return,
            };
            // Drain the accept queue in one go; each connection is queued on its worker's
            // outbox, whose writer sends them in batches of up to 253 per `sendmsg`.
            let mut batch = Vec::new();
            let res = loop {
                match guard.try_io(|fd| sys::accept(fd.get_ref().as_fd())) {
                    Ok(Ok(conn)) => {
                        batch.push(conn);
                        if batch.len() >= 256 {
                            break Ok(());
                        }
                    }
                    Ok(Err(e)) => break Err(e),
                    Err(_would_block) => break Ok(()),
                }
            };
            drop(guard);
            if !batch.is_empty() {
                self.dispatch(batch);
            }
            match res {
                Ok(()) => backoff = Duration::from_millis(5),
                Err(e) if is_fd_exhaustion(&e) => {
                    // Out of descriptors: the pending connection stays in the kernel's queue.
                    // Wait instead of spinning, and try again once some may have closed.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut stop => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                // ECONNABORTED and friends concern one client only.
                Err(_) => {}
            }
        }
    }

    fn dispatch(&self, conns: Vec<OwnedFd>) {
        let mut st = self.lock();
        for conn in conns {
            st.give(self.id, Arc::new(conn));
        }
    }

    fn join(&self, id: u32, outbox: Arc<Outbox>) {
        let mut st = self.lock();
        if !st.members.iter().any(|(m, _)| *m == id) {
            st.members.push((id, outbox));
        }
        // Connections that waited for a listener go out now.
        let waiting: Vec<Arc<OwnedFd>> = st.backlog.drain(..).collect();
        for conn in waiting {
            st.give(self.id, conn);
        }
    }

    fn leave(&self, id: u32) {
        let mut st = self.lock();
        st.members.retain(|(m, _)| *m != id);
        let orphans = st.inflight.remove(&id).unwrap_or_default();
        for conn in orphans {
            st.give(self.id, conn);
        }
    }

    fn accepted(&self, id: u32, n: usize) {
        let mut st = self.lock();
        if let Some(q) = st.inflight.get_mut(&id) {
            for _ in 0..n.min(q.len()) {
                q.pop_front();
            }
        }
    }

    fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        st.backlog.clear();
        st.inflight.clear();
        drop(st);
        // The accept loop closes its descriptor when it sees `stop`, later; leave the LISTEN
        // state now, so the port can be bound again (SO_REUSEADDR) as soon as this returns.
        if let Some(fd) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            if crate::notify::is_inherited(&fd) {
                // A socket systemd handed us keeps listening (its queue holds connections for
                // the next worker); it only goes back to the pool.
                crate::notify::release(&fd);
            } else {
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    nix::sys::socket::Shutdown::Both,
                );
            }
        }
        self.stop.notify_one();
    }
}

impl RrState {
    /// Hands `conn` to the next member whose channel takes it; keeps it when none can.
    fn give(&mut self, server: u32, conn: Arc<OwnedFd>) {
        if self.stopped {
            return;
        }
        let n = self.members.len();
        for _ in 0..n {
            let i = self.next % n;
            self.next = self.next.wrapping_add(1);
            let (id, outbox) = &self.members[i];
            if outbox
                .send_shared(&Wire::<()>::Control(Control::Conn { server }), conn.clone())
                .is_ok()
            {
                self.inflight.entry(*id).or_default().push_back(conn);
                return;
            }
        }
        self.backlog.push_back(conn);
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}
