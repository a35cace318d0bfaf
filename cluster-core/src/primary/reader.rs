//! One task per worker reads its channel: user messages go straight to the event queue (the
//! fast path), server requests to the dispatcher, and lifecycle facts to the supervisor, which
//! acknowledges each before the reader goes on, so a worker's messages never overtake its
//! `Online` or `Listening`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::events::Event;
use super::events::EventTx;
use super::worker_ref::WorkerRef;
use crate::channel::{Incoming, Reader};
use crate::dispatch::Servers;
use crate::error::{Error, ErrorKind};
use crate::message::Message;
use crate::net::ListenAddress;
use crate::wire::{Control, VERSION, Wire};

/// Messages decoded from one read go out together, up to this many.
const BATCH: usize = 1024;

/// The most of a worker's last words (`Fatal`) the primary keeps.
const FATAL_MAX: usize = 4096;

/// How many refused binds of one worker become `Error` events (then one that says no more
/// will): each is a clear error to the worker itself anyway.
const REFUSALS_REPORTED: usize = 8;

/// What a reader tells the supervisor.
#[derive(Debug)]
pub(crate) enum Report {
    /// The handshake passed; the reader waits for `ack` before reading on.
    Online { id: u32, ack: oneshot::Sender<()> },
    /// A server is listening; the reader waits for `ack` before reading on.
    Listening {
        id: u32,
        address: ListenAddress,
        ack: oneshot::Sender<()>,
    },
    /// The worker says why it is about to exit.
    Fatal { id: u32, message: String },
    /// The worker leaves on purpose (its own `disconnect()`).
    Disconnecting { id: u32 },
    /// The channel is closed (`error` says why, when it was not a clean end); the reader is done.
    Closed { id: u32, error: Option<Error> },
    /// The process exited (from the task that waits for it).
    Exited {
        id: u32,
        status: crate::event::ExitStatus,
    },
}

pub(crate) struct ReaderTask<P, W> {
    pub(crate) worker: WorkerRef<W>,
    pub(crate) reader: Reader,
    pub(crate) events: EventTx<P, W>,
    pub(crate) reports: mpsc::Sender<Report>,
    pub(crate) servers: Arc<Servers>,
    /// What this worker may ask the primary to listen on.
    pub(crate) rules: Arc<crate::dispatch::BindRules>,
    pub(crate) fingerprint: u64,
    /// This worker's budget of unread message bytes, of `limit` bytes.
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) limit: usize,
}

impl<P: Message, W: Message> ReaderTask<P, W> {
    /// Reads until the channel ends, then reports `Closed`.
    pub(crate) async fn run(mut self) {
        let id = self.worker.id();
        let error = self.read().await.err();
        drop(self.reader);
        let _ = self.reports.send(Report::Closed { id, error }).await;
    }

    /// Tells the supervisor and waits for its acknowledgement (none if it is gone).
    async fn report(&self, make: impl FnOnce(oneshot::Sender<()>) -> Report) {
        let (ack, done) = oneshot::channel();
        if self.reports.send(make(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn read(&mut self) -> Result<(), Error> {
        let w = &self.worker;
        let id = w.id();
        let who = format!("worker {id}");
        let outbox = &w.shared.outbox;
        let mut online = false;
        let mut refused = false;
        // What a worker may say once, and how many servers it may say it listens on.
        let (mut said_fatal, mut said_leaving) = (false, false);
        let (mut granted, mut listened) = (0usize, 0usize);
        let mut refusals = 0usize;
        let mut batch: Vec<Event<P, W>> = Vec::new();
        let mut cost = 0;
        let (budget, limit) = (self.budget.clone(), self.limit);
        let outcome = loop {
            // Messages decoded from one read go out together, before anything else is said
            // and before the next read.
            if !batch.is_empty() && (!self.reader.has_frame() || batch.len() >= BATCH) {
                self.events
                    .messages(&mut batch, cost, &budget, limit, &w.shared.parked)
                    .await;
                cost = 0;
            }
            let incoming = match self.reader.next::<P>().await {
                Ok(i) => i,
                Err(e) => break Err(e.into_error(&who)),
            };
            match incoming {
                Incoming::Eof => break Ok(()),
                Incoming::Frame(_, _) if refused => {}
                Incoming::Frame(
                    Wire::Control(Control::Hello {
                        version,
                        fingerprint,
                    }),
                    _,
                ) if !online => {
                    if version != VERSION || fingerprint != self.fingerprint {
                        let reason = format!(
                            "{who} was built with other message types or another version of cluster \
                             (worker: version {version}, message fingerprint {fingerprint:#018x}; \
                             primary: version {VERSION}, message fingerprint {:#018x}); refusing it",
                            self.fingerprint
                        );
                        let _ = outbox.send(
                            &Wire::<()>::Control(Control::Refuse {
                                reason: reason.clone(),
                            }),
                            vec![],
                        );
                        outbox.close();
                        refused = true;
                        self.events.emit(Event::Error {
                            worker: Some(w.clone()),
                            error: Error::new(ErrorKind::Handshake, reason),
                        });
                        continue;
                    }
                    online = true;
                    w.shared.heard();
                    let _ = outbox.send(&Wire::<()>::Control(Control::Welcome), vec![]);
                    self.report(|ack| Report::Online { id, ack }).await;
                }
                Incoming::Frame(_, _) if !online => {
                    break Err(Error::new(
                        ErrorKind::Handshake,
                        format!("{who} sent a message before the handshake"),
                    ));
                }
                Incoming::Frame(Wire::User { msg, handle }, fds) => {
                    w.shared.counters.msgs_in.fetch_add(1, Ordering::Relaxed);
                    if self.reader.last_lost() > 0 {
                        self.events.emit(Event::Error {
                            worker: Some(w.clone()),
                            error: Error::new(
                                ErrorKind::Io,
                                format!(
                                    "the descriptor sent with a message of {who} was lost: the \
                                     primary is at its descriptor limit"
                                ),
                            ),
                        });
                    }
                    let handle = if handle { fds.into_iter().next() } else { None };
                    cost += self.reader.last_len() + std::mem::size_of::<Event<P, W>>();
                    batch.push(Event::Message {
                        worker: w.clone(),
                        msg,
                        handle,
                    });
                }
                Incoming::Frame(Wire::Control(c), fds) => match c {
                    Control::Disconnecting if !said_leaving => {
                        said_leaving = true;
                        let _ = self.reports.send(Report::Disconnecting { id }).await;
                    }
                    // The primary pings, workers answer; a worker's ping gets no answer, so a
                    // flood of them cannot grow the outbox.
                    Control::Ping(_) | Control::Disconnecting => {}
                    // Only an answer to the latest ping (or the one before, overtaken by the
                    // latest in flight): a stale or unsolicited pong proves nothing now.
                    Control::Pong(n) => {
                        let last = w.shared.last_ping.load(Ordering::Relaxed);
                        if n != 0 && (n == last || n + 1 == last) {
                            w.shared.heard();
                        }
                    }
                    Control::Fatal { mut message } if !said_fatal => {
                        said_fatal = true;
                        if message.len() > FATAL_MAX {
                            let mut end = FATAL_MAX;
                            while !message.is_char_boundary(end) {
                                end -= 1;
                            }
                            message.truncate(end);
                            message.push_str(" [...]");
                        }
                        let _ = self.reports.send(Report::Fatal { id, message }).await;
                    }
                    Control::Fatal { .. } => {}
                    // Only as many `Listening` as servers granted: each is one event.
                    Control::Listening { .. } if listened >= granted => {}
                    Control::Listening { addr } => {
                        listened += 1;
                        self.events
                            .messages(&mut batch, cost, &budget, limit, &w.shared.parked)
                            .await;
                        cost = 0;
                        self.report(|ack| Report::Listening {
                            id,
                            address: addr,
                            ack,
                        })
                        .await;
                    }
                    other => {
                        if let Control::Accepted { n, .. } | Control::Served { n } = &other {
                            w.shared
                                .counters
                                .conns
                                .fetch_add(u64::from(*n), Ordering::Relaxed);
                        }
                        let handled = self.servers.handle(id, outbox, other, fds, &self.rules);
                        if handled.granted {
                            granted += 1;
                        }
                        if let Some((addr, why)) = handled.refused {
                            // Reported, up to a bound: a worker looping on a refused bind
                            // must not flood the event queue.
                            refusals += 1;
                            let message = match refusals {
                                ..=REFUSALS_REPORTED => format!(
                                    "worker {id} asked the primary to listen on {}: refused: {why}",
                                    addr
                                ),
                                _ if refusals == REFUSALS_REPORTED + 1 => format!(
                                    "worker {id}: more binds refused; no more are reported for it"
                                ),
                                _ => String::new(),
                            };
                            if !message.is_empty() {
                                self.events.emit(Event::Error {
                                    worker: Some(w.current()),
                                    error: Error::new(ErrorKind::Bind, message),
                                });
                            }
                        }
                    }
                },
            }
        };
        self.events
            .messages(&mut batch, cost, &budget, limit, &w.shared.parked)
            .await;
        outcome
    }
}
