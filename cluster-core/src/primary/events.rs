//! The event queue from the supervisor and the readers to `next_event`.
//!
//! One queue, so a worker's messages keep their order relative to its lifecycle events. Two
//! kinds of producers, bounded in two ways:
//! - Messages (the readers): each worker has a budget of
//!   [`Config::outbox_limit`](crate::Config::outbox_limit) bytes of messages unread by the
//!   user (payload plus the event's own size). A reader pays for a batch before queueing it;
//!   without the budget it waits, so it stops reading its channel and the kernel's socket buffer
//!   pushes back on that worker alone, while the other workers' messages keep flowing. The
//!   budget comes back as the user reads.
//! - Lifecycle events and errors (the supervisor, which must never wait on the user): bounded
//!   by construction, a handful per fork, and forks are made by the user or the respawn policy
//!   (which the crash-loop guard stops).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use super::worker_ref::WorkerRef;
use crate::config::Settings;
use crate::error::Error;
use crate::event::ExitStatus;
use crate::net::ListenAddress;

/// What happened in the cluster, in Node's order for each worker:
/// `Fork`, `Online`, `Listening` (once per server), then `Disconnect` and `Exit`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<P = (), W = ()> {
    /// A worker process was started.
    Fork {
        /// The worker.
        worker: WorkerRef<W>,
    },
    /// The worker's runtime started and passed the handshake; user code runs next.
    Online {
        /// The worker.
        worker: WorkerRef<W>,
    },
    /// A server in the worker is listening.
    Listening {
        /// The worker.
        worker: WorkerRef<W>,
        /// Where it listens; the real port, also for port 0.
        address: ListenAddress,
    },
    /// The channel to the worker has closed.
    Disconnect {
        /// The worker.
        worker: WorkerRef<W>,
    },
    /// The worker process has exited and was reaped.
    Exit {
        /// The worker.
        worker: WorkerRef<W>,
        /// Its exit code or the signal that ended it.
        status: ExitStatus,
    },
    /// A typed message from a worker.
    Message {
        /// The sender.
        worker: WorkerRef<W>,
        /// The message.
        msg: P,
        /// A descriptor sent with it, if any.
        handle: Option<OwnedFd>,
    },
    /// Something went wrong with a worker (a broken frame, a refused handshake) or in the primary.
    Error {
        /// The worker concerned, if any.
        worker: Option<WorkerRef<W>>,
        /// What went wrong.
        error: Error,
    },
    /// The settings changed through [`Primary::setup_primary`](crate::Primary::setup_primary).
    Setup {
        /// The settings now in force for later forks.
        settings: Settings,
    },
    /// SIGUSR1 arrived under [`Primary::handle_signals`](crate::Primary::handle_signals): the
    /// operator rotated the log files, and the application should reopen those it writes.
    ReopenLogs,
}

impl<P, W> Event<P, W> {
    /// The worker the event is about, if any.
    pub fn worker(&self) -> Option<&WorkerRef<W>> {
        match self {
            Event::Fork { worker }
            | Event::Online { worker }
            | Event::Listening { worker, .. }
            | Event::Disconnect { worker }
            | Event::Exit { worker, .. }
            | Event::Message { worker, .. } => Some(worker),
            Event::Error { worker, .. } => worker.as_ref(),
            Event::Setup { .. } | Event::ReopenLogs => None,
        }
    }

    /// The event's name as Node spells it (`"fork"`, `"online"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Fork { .. } => "fork",
            Event::Online { .. } => "online",
            Event::Listening { .. } => "listening",
            Event::Disconnect { .. } => "disconnect",
            Event::Exit { .. } => "exit",
            Event::Message { .. } => "message",
            Event::Error { .. } => "error",
            Event::Setup { .. } => "setup",
            Event::ReopenLogs => "reopen-logs",
        }
    }
}

/// What travels to `next_event`: one event, or the messages decoded from one read of a
/// worker's channel, handed over at once (one wake-up for the consumer).
enum Delivery<P, W> {
    One(Event<P, W>),
    /// A read that decoded a single message: no vector (the round-trip case).
    Message(Event<P, W>, Paid),
    Messages(Vec<Event<P, W>>, Paid),
}

/// What a batch of messages cost its worker's budget, returned once the user read them all.
struct Paid {
    cost: u32,
    budget: Arc<Semaphore>,
}

/// One worker's budget of unread message bytes.
pub(crate) fn budget(limit: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(limit.clamp(1, Semaphore::MAX_PERMITS)))
}

/// The producers' side; cheap to clone.
pub(crate) struct EventTx<P, W> {
    tx: mpsc::UnboundedSender<Delivery<P, W>>,
}

impl<P, W> Clone for EventTx<P, W> {
    fn clone(&self) -> Self {
        EventTx {
            tx: self.tx.clone(),
        }
    }
}

/// `next_event`'s side: the channel and the rest of the last batch.
pub(crate) struct Inbox<P, W> {
    rx: mpsc::UnboundedReceiver<Delivery<P, W>>,
    buf: VecDeque<Event<P, W>>,
    /// The batches of messages in `buf`, oldest first, with how many of each are unread.
    batches: VecDeque<(usize, Paid)>,
}

pub(crate) fn queue<P, W>() -> (EventTx<P, W>, Inbox<P, W>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        EventTx { tx },
        Inbox {
            rx,
            buf: VecDeque::new(),
            batches: VecDeque::new(),
        },
    )
}

impl<P, W> EventTx<P, W> {
    /// Queues a lifecycle event or an error; never waits (see the module docs for its bound).
    pub(crate) fn emit(&self, ev: Event<P, W>) {
        trace_event(&ev);
        let _ = self.tx.send(Delivery::One(ev));
    }

    /// Queues the messages of one read, which cost `cost` bytes, once `budget` (the sending
    /// worker's, of `limit` bytes) has room for them; a batch dearer than the whole budget
    /// waits for all of it and goes alone.
    pub(crate) async fn messages(
        &self,
        batch: &mut Vec<Event<P, W>>,
        cost: usize,
        budget: &Arc<Semaphore>,
        limit: usize,
        parked: &std::sync::atomic::AtomicBool,
    ) {
        if batch.is_empty() {
            return;
        }
        let cost = cost
            .clamp(1, limit.clamp(1, Semaphore::MAX_PERMITS))
            .min(u32::MAX as usize) as u32;
        match budget.try_acquire_many(cost) {
            Ok(p) => p.forget(),
            Err(_) => {
                use std::sync::atomic::Ordering::Relaxed;
                parked.store(true, Relaxed);
                let got = budget.acquire_many(cost).await;
                parked.store(false, Relaxed);
                match got {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
        }
        for ev in batch.iter() {
            trace_event(ev);
        }
        let paid = Paid {
            cost,
            budget: budget.clone(),
        };
        // A single message leaves the batch its capacity for the next read.
        let d = if batch.len() == 1
            && let Some(ev) = batch.pop()
        {
            Delivery::Message(ev, paid)
        } else {
            Delivery::Messages(std::mem::take(batch), paid)
        };
        let _ = self.tx.send(d);
    }
}

impl<P, W> Inbox<P, W> {
    fn put(&mut self, d: Delivery<P, W>) {
        match d {
            Delivery::One(ev) => self.buf.push_back(ev),
            Delivery::Message(ev, paid) => {
                self.batches.push_back((1, paid));
                self.buf.push_back(ev);
            }
            Delivery::Messages(evs, paid) => {
                self.batches.push_back((evs.len(), paid));
                self.buf.extend(evs);
            }
        }
    }

    /// Returns a batch's cost to its worker once its last message is read. Messages come out
    /// in the order the batches went in (lifecycle events only ever fall between batches).
    fn taken(&mut self, ev: Event<P, W>) -> Event<P, W> {
        if matches!(ev, Event::Message { .. }) {
            if let Some((left, _)) = self.batches.front_mut() {
                *left -= 1;
                if *left == 0 {
                    let (_, paid) = self.batches.pop_front().expect("front exists");
                    paid.budget.add_permits(paid.cost as usize);
                }
            }
        }
        ev
    }

    /// The next event already here, without waiting.
    pub(crate) fn pop(&mut self) -> Option<Event<P, W>> {
        if self.buf.is_empty() {
            match self.rx.try_recv() {
                Ok(d) => self.put(d),
                Err(_) => return None,
            }
        }
        let ev = self.buf.pop_front()?;
        Some(self.taken(ev))
    }

    /// Waits for the next delivery; `false` once every producer is gone.
    pub(crate) async fn fill(&mut self) -> bool {
        match self.rx.recv().await {
            Some(d) => {
                self.put(d);
                true
            }
            None => false,
        }
    }
}

/// Every lifecycle event is also a structured `tracing` event, with the worker's id and pid as
/// fields, so a subscriber sees the cluster's life without code of its own.
fn trace_event<P, W>(ev: &Event<P, W>) {
    use tracing::{debug, error, info, trace, warn};
    let (id, pid) = ev.worker().map_or((0, 0), |w| (w.id(), w.pid()));
    match ev {
        Event::Fork { .. } => info!(worker.id = id, worker.pid = pid, "worker forked"),
        Event::Online { .. } => info!(worker.id = id, worker.pid = pid, "worker online"),
        Event::Listening { address, .. } => {
            info!(worker.id = id, worker.pid = pid, address = %address, "worker listening")
        }
        Event::Disconnect { .. } => debug!(worker.id = id, worker.pid = pid, "worker disconnected"),
        Event::Exit { worker, status } => {
            if worker.exited_after_disconnect() == Some(true) {
                info!(worker.id = id, worker.pid = pid, status = %status, "worker exited")
            } else {
                warn!(worker.id = id, worker.pid = pid, status = %status, last_error = worker.last_error(), "worker died")
            }
        }
        Event::Message { .. } => trace!(worker.id = id, worker.pid = pid, "message"),
        Event::Error { error, .. } => {
            error!(worker.id = id, worker.pid = pid, kind = ?error.kind(), error = %error, "cluster error")
        }
        Event::Setup { .. } => debug!("settings changed"),
        Event::ReopenLogs => info!("SIGUSR1: the application is asked to reopen its logs"),
    }
}
