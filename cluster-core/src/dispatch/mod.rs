//! The primary's side of shared server ports: one socket per address key, handed out by the
//! key's policy. It owns which workers serve each key; the round-robin dispatcher
//! ([`round_robin`]) owns the connections in flight to them, and [`reuseport`] the socket slots.

mod reuseport;
mod round_robin;
mod rules;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::channel::Outbox;
use crate::config::SchedulingPolicy;
use crate::socket;
use crate::sys::drop_new_connections;
use crate::systemd;
use crate::wire::{BindAddr, Control, Grant, Wire};

use reuseport::Slots;
use round_robin::RoundRobin;
pub(crate) use rules::BindRules;

type KeyId = (BindAddr, u32);

pub(crate) struct Servers {
    /// A std mutex: read on each bind, set before the first fork; never held across an await.
    policy: Mutex<SchedulingPolicy>,
    /// Short critical sections from the readers' server requests; never held across an await.
    st: Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: HashMap<KeyId, Key>,
    next_server: u32,
    slots: Slots,
}

struct Key {
    bound: BindAddr,
    /// The socket file of a Unix key, which the primary removes when the key closes.
    unix: Option<socket::UnixFile>,
    kind: KeyKind,
    /// Its sockets drop new connection requests: everyone serving them is leaving (see
    /// [`Servers::before_leave`]). A worker that joins takes them again.
    refusing: bool,
}

/// A key and the workers that serve it, in one place per policy.
enum KeyKind {
    /// The dispatcher keeps the members, with their channels.
    RoundRobin(Arc<RoundRobin>),
    Shared {
        fd: OwnedFd,
        members: Vec<u32>,
    },
    ReusePort {
        /// One socket per worker slot.
        sockets: HashMap<usize, OwnedFd>,
        members: Vec<u32>,
    },
}

impl KeyKind {
    fn has(&self, id: u32) -> bool {
        match self {
            KeyKind::RoundRobin(rr) => rr.has(id),
            KeyKind::Shared { members, .. } | KeyKind::ReusePort { members, .. } => {
                members.contains(&id)
            }
        }
    }

    /// Takes worker `id` out; whether anyone is left.
    fn remove(&mut self, id: u32) -> bool {
        match self {
            KeyKind::RoundRobin(rr) => rr.leave(id),
            KeyKind::Shared { members, .. } | KeyKind::ReusePort { members, .. } => {
                members.retain(|m| *m != id);
                !members.is_empty()
            }
        }
    }
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

    /// Handles a server-related control message from worker `id`, whose requests `rules`
    /// judge.
    pub(crate) fn handle(
        self: &Arc<Self>,
        id: u32,
        outbox: &Arc<Outbox>,
        c: Control,
        _fds: Vec<OwnedFd>,
        rules: &BindRules,
    ) -> Handled {
        match c {
            Control::QueryServer {
                req,
                addr,
                index,
                mode,
                ..
            } => {
                let mut refused = None;
                let asked = Asked {
                    addr: &addr,
                    index,
                    mode,
                };
                let (result, fds) = match self.query(id, outbox, asked, rules) {
                    Ok((grant, bound, fds)) => (Ok((grant, bound)), fds),
                    Err(e) => {
                        if rules::is_denied(&e) {
                            refused = Some(format!("{e}"));
                        }
                        (Err(rules::describe(&e)), vec![])
                    }
                };
                let granted = result.is_ok();
                let _ = outbox.send(
                    &Wire::<()>::Control(Control::ServerReply { req, result }),
                    fds,
                );
                return Handled {
                    granted,
                    refused: refused.map(|why| (addr, why)),
                };
            }
            Control::Accepted { server, n } => {
                if let Some(rr) = self.round_robin(server) {
                    rr.accepted(id, n as usize);
                }
            }
            Control::Lost { server, n } => {
                if let Some(rr) = self.round_robin(server) {
                    rr.lost(id, n as usize);
                }
            }
            Control::Full => self.each_round_robin(|rr| rr.pause(id)),
            Control::Room => self.each_round_robin(|rr| rr.resume(id)),
            Control::CloseServer { addr, index } => self.leave(id, &(addr, index)),
            _ => {}
        }
        Handled::default()
    }

    fn round_robin(&self, server: u32) -> Option<Arc<RoundRobin>> {
        self.lock().keys.values().find_map(|k| match &k.kind {
            KeyKind::RoundRobin(rr) if rr.id == server => Some(rr.clone()),
            _ => None,
        })
    }

    fn each_round_robin(&self, f: impl Fn(&RoundRobin)) {
        let all: Vec<Arc<RoundRobin>> = self
            .lock()
            .keys
            .values()
            .filter_map(|k| match &k.kind {
                KeyKind::RoundRobin(rr) => Some(rr.clone()),
                _ => None,
            })
            .collect();
        for rr in all {
            f(&rr);
        }
    }

    fn query(
        self: &Arc<Self>,
        id: u32,
        outbox: &Arc<Outbox>,
        asked: Asked<'_>,
        rules: &BindRules,
    ) -> io::Result<(Grant, BindAddr, Vec<OwnedFd>)> {
        let Asked { addr, index, mode } = asked;
        if mode.is_some_and(|m| m > 0o777) || (mode.is_some() && !matches!(addr, BindAddr::Unix(_)))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a file mode is for a Unix socket, and at most 0o777",
            ));
        }
        rules.check_addr(addr)?;
        let mut st = self.lock();
        let key: KeyId = (addr.clone(), index);
        // A worker asks once per listener (its index says which): a second request for a key it
        // serves is no listener of a real worker, and gets no second copy of the socket.
        if st.keys.get(&key).is_some_and(|k| k.kind.has(id)) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("worker {id} already listens on {addr} (listener {index})"),
            ));
        }
        if st.keys.values().filter(|k| k.kind.has(id)).count() >= rules.max_servers() {
            return Err(rules::too_many(id, rules.max_servers()));
        }
        if let Some(unix) = st.keys.get(&key).and_then(|k| k.unix.as_ref()) {
            rules.check_dir(unix.dir(), unix.path())?;
        }
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
            let (bound, unix, kind) = match policy {
                SchedulingPolicy::RoundRobin => {
                    let (fd, bound, unix) = bind(addr, false, rules, mode)?;
                    let rr = RoundRobin::start(next, fd);
                    let rr = rr.inspect_err(|_| unix.iter().for_each(socket::UnixFile::remove))?;
                    (bound, unix, KeyKind::RoundRobin(rr))
                }
                SchedulingPolicy::Shared => {
                    let (fd, bound, unix) = bind(addr, false, rules, mode)?;
                    let members = Vec::new();
                    (bound, unix, KeyKind::Shared { fd, members })
                }
                SchedulingPolicy::ReusePort => {
                    let (fd, bound, unix) = bind(addr, true, rules, mode)?;
                    let slot = st.slots.of(id);
                    let sockets = HashMap::from([(slot, fd)]);
                    let members = Vec::new();
                    (bound, unix, KeyKind::ReusePort { sockets, members })
                }
            };
            st.keys.insert(
                key.clone(),
                Key {
                    bound,
                    unix,
                    kind,
                    refusing: false,
                },
            );
        }
        let State { keys, slots, .. } = &mut *st;
        let k = keys.get_mut(&key).expect("key inserted above");
        if std::mem::take(&mut k.refusing) {
            k.each_socket(|fd| drop_new_connections(fd, false));
        }
        let bound = k.bound.clone();
        match &mut k.kind {
            KeyKind::RoundRobin(rr) => {
                rr.join(id, outbox.clone());
                Ok((Grant::RoundRobin { server: rr.id }, bound, vec![]))
            }
            KeyKind::Shared { fd, members } => {
                let fd = fd.try_clone()?;
                if !members.contains(&id) {
                    members.push(id);
                }
                Ok((Grant::Handle, bound, vec![fd]))
            }
            KeyKind::ReusePort { sockets, members } => {
                let slot = slots.of(id);
                if let std::collections::hash_map::Entry::Vacant(e) = sockets.entry(slot) {
                    // Same address and port as the first slot, so port 0 is shared too.
                    let (fd, _, _) = bind(&bound, true, rules, None)?;
                    e.insert(fd);
                }
                let fd = sockets[&slot].try_clone()?;
                if !members.contains(&id) {
                    members.push(id);
                }
                Ok((Grant::Handle, bound, vec![fd]))
            }
        }
    }

    /// Worker `id` closed its listener on `key`.
    fn leave(self: &Arc<Self>, id: u32, key: &KeyId) {
        let mut st = self.lock();
        let Some(k) = st.keys.get_mut(key) else {
            return;
        };
        if !k.kind.remove(id) {
            let k = st.keys.remove(key).expect("key present");
            close_key(k);
        }
    }

    /// Worker `id` is about to be told to leave (a scale-down, `disconnect`). Sockets it would
    /// leave with nobody to accept on them stop taking new connections first, so that the
    /// worker can accept what the kernel has queued on them and close them empty; see
    /// [`sys::drop_new_connections`]. Under `reuseport` that is its slot, unless a replacement
    /// shares it: the slot's sockets leave the `SO_REUSEPORT` group once the worker closes
    /// its copies, and the kernel sends new connections to the other slots.
    pub(crate) fn before_leave(&self, id: u32) {
        let mut st = self.lock();
        let State { keys, slots, .. } = &mut *st;
        let slot = slots.get(id).filter(|s| slots.holders(*s) == 1);
        for k in keys.values_mut() {
            match &mut k.kind {
                KeyKind::Shared { members, .. } if members == &[id] => k.refuse(),
                KeyKind::ReusePort { sockets, members } if members.contains(&id) => {
                    if let Some(fd) = slot.and_then(|s| sockets.remove(&s)) {
                        if is_tcp(&k.bound) && !systemd::shared_elsewhere(fd.as_fd()) {
                            let _ = drop_new_connections(fd.as_fd(), true);
                        }
                    }
                }
                KeyKind::RoundRobin(rr) if rr.members() == [id] => k.refuse(),
                _ => {}
            }
        }
    }

    /// Every worker is about to leave (a shutdown, `disconnect()`): no socket takes new
    /// connections any more, and the workers accept what is queued before they close them.
    /// Under `reuseport` the primary lets go of its copies of the slots' sockets now.
    ///
    /// Returns how long to wait before the workers are told to leave when a round-robin key
    /// has connections to hand over still: what the kernel queued before the refusal.
    pub(crate) fn before_close(&self) -> Option<std::time::Duration> {
        let mut st = self.lock();
        let mut settle = None;
        for k in st.keys.values_mut() {
            k.refuse();
            match &mut k.kind {
                KeyKind::ReusePort { sockets, .. } => sockets.clear(),
                KeyKind::RoundRobin(rr) => {
                    // A socket another primary serves keeps taking connections: that one
                    // accepts them from now on.
                    if rr
                        .listener()
                        .is_some_and(|fd| systemd::shared_elsewhere(fd.as_fd()))
                    {
                        rr.stop_accepting();
                    }
                    settle = Some(round_robin::SETTLE);
                }
                KeyKind::Shared { .. } => {}
            }
        }
        settle
    }

    /// Copies of every listening socket the keys serve, each with whether systemd handed it
    /// over and the path of a Unix socket: what a full upgrade hands the new primary
    /// (`SO_REUSEPORT` slots in slot order).
    pub(crate) fn sockets(&self) -> Vec<(OwnedFd, bool, Option<std::path::PathBuf>)> {
        let st = self.lock();
        let mut out = Vec::new();
        for k in st.keys.values() {
            let name = match &k.bound {
                BindAddr::Unix(path) => Some(path.clone()),
                _ => None,
            };
            let mut fds = Vec::new();
            match &k.kind {
                KeyKind::RoundRobin(rr) => fds.extend(rr.listener()),
                KeyKind::Shared { fd, .. } => fds.extend(fd.try_clone().ok()),
                KeyKind::ReusePort { sockets, .. } => {
                    let mut slots: Vec<_> = sockets.iter().collect();
                    slots.sort_by_key(|(slot, _)| **slot);
                    fds.extend(slots.into_iter().filter_map(|(_, fd)| fd.try_clone().ok()));
                }
            }
            out.extend(fds.into_iter().map(|fd| {
                let systemd = systemd::from_systemd(fd.as_fd());
                (fd, systemd, name.clone())
            }));
        }
        out
    }

    /// Worker `new` replaces `old` (a reload): under `reuseport` it takes the same slot, and
    /// both accept from the slot's socket until `old` leaves.
    pub(crate) fn inherit_slot(&self, new: u32, old: u32) {
        self.lock().slots.inherit(new, old);
    }

    /// Worker `id` is gone: it leaves every key, its queued connections go to the others.
    pub(crate) fn worker_gone(self: &Arc<Self>, id: u32) {
        let keys: Vec<KeyId> = self
            .lock()
            .keys
            .iter()
            .filter(|(_, k)| k.kind.has(id))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.leave(id, &key);
        }
        let slot = self.lock().slots.release(id);
        if let Some(slot) = slot {
            // The slot's sockets keep their accept queues for a replacement; without one soon,
            // close them so the kernel stops hashing new connections onto them.
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(reuseport::SLOT_GRACE).await;
                let mut st = me.lock();
                if st.slots.taken(slot) {
                    return;
                }
                for k in st.keys.values_mut() {
                    if let KeyKind::ReusePort { sockets, .. } = &mut k.kind {
                        sockets.remove(&slot);
                    }
                }
            });
        }
    }
}

impl Key {
    /// Stops its TCP sockets taking new connections (not one another process serves too:
    /// systemd keeps its sockets open, with their queues, for the next start, and they must
    /// take connections then; the other primary of an upgrade accepts on them).
    fn refuse(&mut self) {
        if self.refusing || !is_tcp(&self.bound) {
            return;
        }
        self.refusing = true;
        self.each_socket(|fd| drop_new_connections(fd, true));
    }

    fn each_socket(&self, f: impl Fn(BorrowedFd<'_>) -> io::Result<()>) {
        let res = match &self.kind {
            KeyKind::RoundRobin(rr) => rr.with_listener(&f),
            KeyKind::Shared { fd, .. } if !systemd::shared_elsewhere(fd.as_fd()) => f(fd.as_fd()),
            KeyKind::Shared { .. } => Ok(()),
            KeyKind::ReusePort { sockets, .. } => sockets
                .values()
                .filter(|fd| !systemd::shared_elsewhere(fd.as_fd()))
                .try_for_each(|fd| f(fd.as_fd())),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "cannot change whether a listening socket takes connections");
        }
    }
}

fn is_tcp(addr: &BindAddr) -> bool {
    matches!(addr, BindAddr::Tcp(_))
}

/// A socket for `addr`: one the primary was handed (systemd's socket activation, or the old
/// primary of an upgrade) when one fits, else a new one.
/// A Unix socket's file is recorded for its removal (see [`socket::UnixFile`]); its directory
/// must pass `rules`.
fn bind(
    addr: &BindAddr,
    reuseport: bool,
    rules: &BindRules,
    mode: Option<u32>,
) -> io::Result<(OwnedFd, BindAddr, Option<socket::UnixFile>)> {
    if let Some(fd) = systemd::take_inherited(addr, reuseport) {
        let checked = match addr {
            BindAddr::Unix(path) => socket::UnixFile::at(path)
                .and_then(|f| rules.check_dir(f.dir(), path).map(|()| Some(f))),
            _ => Ok(None),
        };
        let bound = checked.and_then(|unix| Ok((socket::local_addr(&fd, addr)?, unix)));
        return match bound {
            Ok((bound, unix)) => Ok((fd, bound, unix)),
            Err(e) => {
                systemd::release(fd.as_fd());
                Err(e)
            }
        };
    }
    if let BindAddr::Unix(path) = addr {
        let file = socket::FileOptions {
            mode,
            owner: rules.owner(),
        };
        let (fd, unix) = socket::bind_unix(path, |dir| rules.check_dir(dir, path), file)?;
        return Ok((fd, addr.clone(), Some(unix)));
    }
    let (fd, bound) = socket::bind(addr, reuseport)?;
    Ok((fd, bound, None))
}

fn close_key(k: Key) {
    // Whether another process serves the socket: then its file stays too.
    let shared = match &k.kind {
        KeyKind::RoundRobin(rr) => rr
            .listener()
            .is_some_and(|fd| systemd::shared_elsewhere(fd.as_fd())),
        KeyKind::Shared { fd, .. } => systemd::shared_elsewhere(fd.as_fd()),
        KeyKind::ReusePort { .. } => false,
    };
    match &k.kind {
        KeyKind::RoundRobin(rr) => rr.stop(),
        KeyKind::Shared { fd, .. } => systemd::release(fd.as_fd()),
        KeyKind::ReusePort { .. } => {}
    }
    if let Some(unix) = &k.unix {
        if !shared {
            unix.remove();
        }
    }
}

/// What a worker asked to listen on.
#[derive(Clone, Copy)]
struct Asked<'a> {
    addr: &'a BindAddr,
    /// How many listeners it already has on `addr`.
    index: u32,
    /// A Unix socket file's permission bits.
    mode: Option<u32>,
}

/// What [`Servers::handle`] did with a control message.
#[derive(Debug, Default)]
pub(crate) struct Handled {
    /// It granted a server.
    pub(crate) granted: bool,
    /// The bind policy refused the address asked for: which, and why.
    pub(crate) refused: Option<(BindAddr, String)>,
}

fn fixed_port(addr: &BindAddr) -> bool {
    match addr {
        BindAddr::Tcp(a) | BindAddr::Udp(a) => a.port() != 0,
        BindAddr::Unix(_) => true,
    }
}
