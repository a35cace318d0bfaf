//! Round-robin dispatch (Node's `SCHED_RR`): the primary accepts and hands each connection to
//! the next member; it keeps its copy until the worker acknowledges, so a connection queued for a
//! worker that closes or dies goes to another instead of being lost.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::channel::Outbox;
use crate::socket;
use crate::sys;
use crate::systemd;
use crate::wire::{Control, Wire};

/// Round-robin dispatch for one key.
pub(super) struct RoundRobin {
    pub(super) id: u32,
    st: Mutex<RrState>,
    stop: tokio::sync::Notify,
    /// Woken when the backlog has room again (see [`BACKLOG`]).
    room: tokio::sync::Notify,
    /// A second descriptor of the listening socket, to stop it listening at once on close.
    listener: Mutex<Option<OwnedFd>>,
}

/// At a shutdown, how long the workers keep taking connections after the listening socket
/// stopped taking new ones: the primary accepts what was queued and hands it out meanwhile.
pub(super) const SETTLE: Duration = Duration::from_millis(50);

/// Most connections one worker may hold unacknowledged: beyond it the worker is skipped (its
/// listener is not taking them), so the primary's copies stay bounded too.
const WINDOW: usize = 256;
/// Most connections kept waiting when no worker can take one; the accept loop waits while it
/// is full, and what the kernel queues meanwhile stays in the listen backlog.
const BACKLOG: usize = 1024;

#[derive(Default)]
struct RrState {
    members: Vec<(u32, Arc<Outbox>)>,
    /// Members that said they are close to their descriptor limit (`Full`), until `Room`.
    full: Vec<u32>,
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
    pub(super) fn start(id: u32, listener: OwnedFd) -> io::Result<Arc<Self>> {
        let rr = Arc::new(RoundRobin {
            id,
            st: Mutex::new(RrState::default()),
            stop: tokio::sync::Notify::new(),
            room: tokio::sync::Notify::new(),
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
            // No worker can take a connection and many wait: leave the next ones in the
            // kernel's queue (clients wait there) until one can.
            loop {
                let room = self.room.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                if self.lock().backlog.len() < BACKLOG {
                    break;
                }
                tokio::select! {
                    _ = room => {}
                    _ = &mut stop => return,
                }
            }
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
                Err(e) if socket::is_fd_exhaustion(&e) => {
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

    pub(super) fn join(&self, id: u32, outbox: Arc<Outbox>) {
        let mut st = self.lock();
        if !st.members.iter().any(|(m, _)| *m == id) {
            st.members.push((id, outbox));
        }
        // Connections that waited for a listener go out now.
        self.flush_backlog(&mut st);
    }

    /// Gives waiting connections to whoever can take them now.
    fn flush_backlog(&self, st: &mut RrState) {
        if st.backlog.is_empty() {
            return;
        }
        let waiting: Vec<Arc<OwnedFd>> = st.backlog.drain(..).collect();
        for conn in waiting {
            st.give(self.id, conn);
        }
        if st.backlog.len() < BACKLOG {
            self.room.notify_one();
        }
    }

    /// Worker `id` is close to its descriptor limit: it gets no connection until [`resume`].
    ///
    /// [`resume`]: Self::resume
    pub(super) fn pause(&self, id: u32) {
        self.lock().pause(id);
    }

    /// Worker `id` has room again.
    pub(super) fn resume(&self, id: u32) {
        let mut st = self.lock();
        st.full.retain(|m| *m != id);
        self.flush_backlog(&mut st);
    }

    /// The next `n` connections handed to worker `id` did not reach it (it is at its
    /// descriptor limit): they go to the others, and it gets none until it has room.
    pub(super) fn lost(&self, id: u32, n: usize) {
        let mut st = self.lock();
        st.pause(id);
        let mut lost = Vec::new();
        if let Some(q) = st.inflight.get_mut(&id) {
            for _ in 0..n.min(q.len()) {
                lost.extend(q.pop_front());
            }
        }
        for conn in lost {
            st.give(self.id, conn);
        }
    }

    /// Worker `id` leaves; its unacknowledged connections go to the others. Whether any
    /// member is left.
    pub(super) fn leave(&self, id: u32) -> bool {
        let mut st = self.lock();
        st.members.retain(|(m, _)| *m != id);
        st.full.retain(|m| *m != id);
        let orphans = st.inflight.remove(&id).unwrap_or_default();
        for conn in orphans {
            st.give(self.id, conn);
        }
        !st.members.is_empty()
    }

    /// The members' ids.
    pub(super) fn members(&self) -> Vec<u32> {
        self.lock().members.iter().map(|(m, _)| *m).collect()
    }

    /// Runs `f` on the listening socket, while it is open.
    pub(super) fn with_listener(
        &self,
        f: impl FnOnce(BorrowedFd<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let l = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        match l.as_ref() {
            Some(fd) if !systemd::shared_elsewhere(fd.as_fd()) => f(fd.as_fd()),
            _ => Ok(()),
        }
    }

    /// A copy of the listening socket, while it is open.
    pub(super) fn listener(&self) -> Option<OwnedFd> {
        let l = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        l.as_ref().and_then(|fd| fd.try_clone().ok())
    }

    /// Accepts no more connections: another process serves the socket (the new primary of an
    /// upgrade). The connections accepted already still go to the members.
    pub(super) fn stop_accepting(&self) {
        self.stop.notify_one();
    }

    pub(super) fn has(&self, id: u32) -> bool {
        self.lock().members.iter().any(|(m, _)| *m == id)
    }

    pub(super) fn accepted(&self, id: u32, n: usize) {
        let mut st = self.lock();
        if let Some(q) = st.inflight.get_mut(&id) {
            for _ in 0..n.min(q.len()) {
                q.pop_front();
            }
        }
        // Room in its window: waiting connections may go now.
        self.flush_backlog(&mut st);
    }

    pub(super) fn stop(&self) {
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
            if systemd::shared_elsewhere(fd.as_fd()) {
                // A socket another process serves too keeps listening (systemd's queue holds
                // connections for the next start; the other primary of an upgrade accepts on
                // it); it only goes back to the pool.
                systemd::release(fd.as_fd());
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
    fn pause(&mut self, id: u32) {
        if !self.full.contains(&id) {
            self.full.push(id);
        }
    }

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
            let held = self.inflight.get(id).map_or(0, VecDeque::len);
            if held >= WINDOW || self.full.contains(id) {
                continue;
            }
            if outbox
                .send_shared(&Wire::<()>::Control(Control::Conn { server }), conn.clone())
                .is_ok()
            {
                self.inflight.entry(*id).or_default().push_back(conn);
                return;
            }
        }
        // Past BACKLOG only by what one accept batch and the re-given orphans add; the
        // accept loop waits before taking more.
        self.backlog.push_back(conn);
    }
}
