//! The async channel over a Unix socketpair: a coalescing writer and a frame reader.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{Notify, watch};

use crate::error::{Error, ErrorKind};
use crate::frame::{self, Decoder, FrameError, HEADER_LEN, MAX_FDS_PER_FRAME};
use crate::sys;
use crate::wire::Wire;

/// Bytes after which the writer starts a new chunk, so one `sendmsg` stays a sensible size.
/// Also the most user data an urgent control frame can find ahead of it in the outbox (the
/// chunk being written), unless a single user frame is bigger.
const CHUNK_BYTES: usize = 256 * 1024;

/// Default for [`Config::outbox_limit`](crate::Config::outbox_limit): 1 MiB of typed messages
/// per channel and direction, a few hundred microseconds of the channel's throughput, so a
/// burst is not throttled, and a slow peer costs its sender at most this much memory.
pub(crate) const DEFAULT_OUTBOX_LIMIT: usize = 1024 * 1024;

/// A frame that finds the outbox idle within this time of the last such frame is part of a
/// burst: it waits for the writer task, so the burst leaves in few `sendmsg`s instead of one
/// each.
const BURST_GAP: std::time::Duration = std::time::Duration::from_micros(5);

/// A descriptor waiting in the outbox: owned (closed once sent), or shared with someone who
/// keeps it after the send (the round-robin dispatcher, until the worker acknowledges).
pub(crate) enum OutFd {
    Owned(OwnedFd),
    Shared(Arc<OwnedFd>),
}

impl OutFd {
    fn raw(&self) -> RawFd {
        match self {
            OutFd::Owned(f) => f.as_raw_fd(),
            OutFd::Shared(f) => f.as_raw_fd(),
        }
    }
}

#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    fds: Vec<OutFd>,
    /// Bytes of user frames in `bytes`: they count against the user limit until the whole
    /// chunk has left.
    user: usize,
}

/// Where a frame waits in the outbox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// In stream order with the user's messages: user frames (`user`: they count against the
    /// limit), and control frames whose meaning depends on what was sent before them
    /// (`Disconnect` promises the messages before it were delivered, `Fatal` follows a
    /// worker's last messages).
    Ordered { user: bool },
    /// Ahead of queued user frames: control frames whose place among user messages means
    /// nothing (see [`Control::may_overtake`]).
    Urgent,
}

impl Lane {
    fn of<U>(msg: &Wire<U>) -> Lane {
        match msg {
            Wire::Control(c) if c.may_overtake() => Lane::Urgent,
            Wire::Control(_) => Lane::Ordered { user: false },
            Wire::User { .. } => Lane::Ordered { user: true },
        }
    }
}

#[derive(Default)]
struct OutState {
    /// The chunk a write left half-sent: the stream is inside one of its frames, so it goes
    /// before anything else.
    partial: Option<Chunk>,
    /// Control frames that may overtake user frames; always written before `ordered`.
    urgent: VecDeque<Chunk>,
    /// User frames and the control frames that keep their place among them.
    ordered: VecDeque<Chunk>,
    /// Bytes of user frames queued or being written: the sum of `user` over every chunk.
    user_bytes: usize,
    spare: Vec<Vec<u8>>,
    /// The last frame of the back chunk of `urgent`, when it is a counted frame that later ones
    /// of its key may join (see [`Outbox::send_counted`]): (key, n, offset of the frame).
    last_counted: Option<(Counted, u32, usize)>,
    /// When a frame last found the outbox idle (see [`BURST_GAP`]).
    last_idle: Option<std::time::Instant>,
    /// A chunk is being written (by the writer task or inline): nobody else may write.
    writing: bool,
    closing: bool,
    closed: bool,
}

impl OutState {
    fn is_empty(&self) -> bool {
        self.partial.is_none() && self.urgent.is_empty() && self.ordered.is_empty()
    }

    /// The chunk to write next: the half-sent one, then urgent frames, then the rest.
    fn pop_next(&mut self) -> Option<Chunk> {
        if let Some(c) = self.partial.take() {
            return Some(c);
        }
        if let Some(c) = self.urgent.pop_front() {
            // It may have been the back chunk, which the merged acknowledgement points into.
            self.last_counted = None;
            return Some(c);
        }
        self.ordered.pop_front()
    }

    /// Drops every queued chunk. A chunk being written stays counted until its writer
    /// accounts for it.
    fn clear(&mut self) {
        let dropped = self.partial.take().into_iter().chain(self.urgent.drain(..));
        let dropped: usize = dropped.chain(self.ordered.drain(..)).map(|c| c.user).sum();
        self.user_bytes -= dropped;
        self.last_counted = None;
    }
}

/// The sending half: any task encodes frames straight into the pending chunk under one short
/// lock; one writer task sends whole chunks, so many small frames leave in one `sendmsg`. A
/// frame that finds the outbox idle (nothing queued, nothing being written, no frame in the
/// last few microseconds) is written at once on the caller's thread instead, which saves the
/// writer task's wake-up on a lone message (a request, a reply, a ping).
///
/// Bounded: user frames are admitted while fewer than `user_limit` bytes of them wait
/// ([`Outbox::send_user`] waits for room, [`Outbox::try_send_user`] fails with
/// [`SendFail::Full`]). Control frames are never refused for room and do not count: their
/// number is bounded by what the peer asks for (queries, pings) and by the connections the
/// primary hands out, which it keeps itself until they are acknowledged. Urgent control
/// frames go in their own lane, which the writer empties before user data, so a hand-off or a
/// pong waits behind at most the one chunk being written, not behind the whole user queue.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    stream: Arc<UnixStream>,
    wake: Notify,
    /// Woken when the queued user bytes fall below the limit, or the outbox closes.
    room: Notify,
    done: watch::Sender<bool>,
    max_frame: usize,
    user_limit: usize,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutState> {
        // Sections are short and never span an `.await`; a panic inside one leaves the state
        // consistent enough to close the channel, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encodes `msg` as one frame carrying `fds`, behind earlier frames of its lane: written at
    /// once when the outbox is idle, else queued for the writer task. Never waits and is never
    /// refused for room: a user frame given here counts against the limit but is admitted
    /// even above it (the typed senders use [`Outbox::send_user`]).
    pub(crate) fn send<U: Serialize>(
        &self,
        msg: &Wire<U>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), SendFail> {
        let n = fds.len();
        self.push(
            self.lock(),
            |buf| encode(buf, msg, n),
            n,
            |c| c.extend(fds.into_iter().map(OutFd::Owned)),
            Lane::of(msg),
            None,
            Wake::Inline,
        )
    }

    /// Queues the user message `msg` (with `handle`, which the peer receives with it), waiting
    /// while the user frames queued hold `user_limit` bytes or more; a message is admitted
    /// whenever they are below, so one larger than the limit still goes (alone).
    ///
    /// The future does not borrow `msg` across its wait (a message found waiting is encoded
    /// at once, so an error such as `TooLarge` comes before any wait), so it is `Send` for any
    /// message type. Dropping it before it is ready sends nothing.
    pub(crate) fn send_user<'a, U: Serialize + ?Sized>(
        &'a self,
        msg: &U,
        handle: Option<OwnedFd>,
    ) -> impl Future<Output = Result<(), SendFail>> + Send + use<'a, U> {
        let mut handle = handle;
        // The common case, room now: encoded in place, like any frame.
        let (waiting, result) = match self.offer_user(msg, &mut handle) {
            Err(SendFail::Full) => {
                let mut frame = Vec::new();
                let nfds = handle.iter().len();
                match encode(&mut frame, &user_wire(msg, nfds > 0), nfds)
                    .and_then(|len| self.check_len(len))
                {
                    Ok(()) => (Some(frame), Ok(())),
                    Err(e) => (None, Err(e)),
                }
            }
            done => (None, done),
        };
        async move {
            let Some(frame) = waiting else {
                return result;
            };
            loop {
                let room = self.room.notified();
                let mut room = std::pin::pin!(room);
                // Registered before the check, so a wake-up between the check and the wait is
                // not lost.
                room.as_mut().enable();
                match self.offer_encoded(&frame, &mut handle) {
                    Err(SendFail::Full) => room.await,
                    done => return done,
                }
            }
        }
    }

    /// Queues the user message `msg` if the user frames queued hold fewer than `user_limit`
    /// bytes; otherwise fails with [`SendFail::Full`] and sends nothing.
    pub(crate) fn try_send_user<U: Serialize + ?Sized>(
        &self,
        msg: &U,
        handle: Option<OwnedFd>,
    ) -> Result<(), SendFail> {
        let mut handle = handle;
        self.offer_user(msg, &mut handle)
    }

    /// Encodes and queues a user frame when there is room; takes `handle` only then.
    fn offer_user<U: Serialize + ?Sized>(
        &self,
        msg: &U,
        handle: &mut Option<OwnedFd>,
    ) -> Result<(), SendFail> {
        let st = self.lock();
        if !st.closing && !self.has_room(&st) {
            return Err(SendFail::Full);
        }
        let n = handle.iter().len();
        self.push(
            st,
            |buf| encode(buf, &user_wire(msg, n > 0), n),
            n,
            |c| c.extend(handle.take().map(OutFd::Owned)),
            Lane::Ordered { user: true },
            None,
            Wake::Inline,
        )
    }

    /// Queues a user frame encoded earlier (by a sender that had to wait) when there is room.
    fn offer_encoded(&self, frame: &[u8], handle: &mut Option<OwnedFd>) -> Result<(), SendFail> {
        let st = self.lock();
        if !st.closing && !self.has_room(&st) {
            return Err(SendFail::Full);
        }
        self.push(
            st,
            |buf| {
                buf.extend_from_slice(frame);
                Ok(frame.len() - HEADER_LEN)
            },
            handle.iter().len(),
            |c| c.extend(handle.take().map(OutFd::Owned)),
            Lane::Ordered { user: true },
            None,
            Wake::Inline,
        )
    }

    /// Whether a user frame may join the queue now. At zero bytes always, so any limit, even
    /// 0, lets messages through one at a time.
    fn has_room(&self, st: &OutState) -> bool {
        st.user_bytes == 0 || st.user_bytes < self.user_limit
    }

    fn check_len(&self, len: usize) -> Result<(), SendFail> {
        if len > self.max_frame {
            return Err(SendFail::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(())
    }

    /// Queues `msg` with one descriptor that the caller keeps too: no copy is made; the
    /// outbox holds a reference until the descriptor has left in a `sendmsg`. Always written
    /// by the writer task, so descriptors handed out in a burst leave in few `sendmsg`s.
    pub(crate) fn send_shared<U: Serialize>(
        &self,
        msg: &Wire<U>,
        fd: Arc<OwnedFd>,
    ) -> Result<(), SendFail> {
        self.push(
            self.lock(),
            |buf| encode(buf, msg, 1),
            1,
            |c| c.push(OutFd::Shared(fd)),
            Lane::of(msg),
            None,
            Wake::Writer,
        )
    }

    /// Writes what is queued now, on the caller's thread, unless a write is in progress; what
    /// the socket does not take at once (or what waits behind a write in progress) is left to
    /// the writer task, woken for it. Order is kept: one writer at a time, a half-sent chunk
    /// first.
    fn write_inline(&self) {
        let mut st = self.lock();
        if st.is_empty() {
            return;
        }
        if st.writing || st.closed {
            drop(st);
            self.wake.notify_one();
            return;
        }
        let mut chunk = st.pop_next().expect("checked non-empty");
        st.writing = true;
        drop(st);
        let res = write_now(&self.stream, &mut chunk);
        let mut st = self.lock();
        st.writing = false;
        let (wake, room) = match res {
            Ok(true) => {
                let room = self.sent(&mut st, chunk);
                (!st.is_empty() || st.closing, room)
            }
            // Not all of it left (or the socket failed): the writer task takes over, and
            // meets the error itself if there is one.
            Ok(false) | Err(_) => {
                if st.closed {
                    st.user_bytes -= chunk.user;
                } else {
                    st.partial = Some(chunk);
                }
                (true, false)
            }
        };
        drop(st);
        if wake {
            self.wake.notify_one();
        }
        if room {
            self.room.notify_waiters();
        }
    }

    /// Queues the counted frame `frame(1)` of `key`. When the last urgent frame queued is an
    /// unsent counted frame of the same key, it becomes `frame(n + 1)` instead: nothing was
    /// queued in between in its lane, so the order of everything the peer sees is unchanged,
    /// with fewer frames. (Acknowledgements of handed-over connections are such frames.)
    pub(crate) fn send_counted<U: Serialize>(
        &self,
        key: Counted,
        frame: impl Fn(u32) -> Wire<U>,
    ) -> Result<(), SendFail> {
        let mut st = self.lock();
        if st.closing || st.closed {
            return Err(SendFail::Closed);
        }
        if let Some((k, n, at)) = st.last_counted
            && k == key
            && let Some(chunk) = st.urgent.back_mut()
        {
            let n = n.saturating_add(1);
            // Encoded behind the old frame first, so a failure leaves the queue as it was.
            let end = chunk.bytes.len();
            encode(&mut chunk.bytes, &frame(n), 0)?;
            chunk.bytes.drain(at..end);
            st.last_counted = Some((key, n, at));
            return Ok(());
        }
        let first = frame(1);
        self.push(
            st,
            |buf| encode(buf, &first, 0),
            0,
            |_| {},
            Lane::Urgent,
            Some(key),
            Wake::Writer,
        )
    }

    /// Appends one frame, which `encode_into` writes into the chunk buffer (returning its
    /// payload length) and which announces `nfds` descriptors, appended by `add_fds`, to
    /// `lane`; `counted` marks it as the counted frame of that key, which later ones join.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        mut st: MutexGuard<'_, OutState>,
        encode_into: impl FnOnce(&mut Vec<u8>) -> Result<usize, SendFail>,
        nfds: usize,
        add_fds: impl FnOnce(&mut Vec<OutFd>),
        lane: Lane,
        counted: Option<Counted>,
        wake: Wake,
    ) -> Result<(), SendFail> {
        debug_assert!(nfds <= MAX_FDS_PER_FRAME);
        if st.closing || st.closed {
            return Err(SendFail::Closed);
        }
        if lane == Lane::Urgent {
            // Set again below once this frame is in; cleared on every error path. A frame of
            // the other lane does not stand between two acknowledgements of this one.
            st.last_counted = None;
        }
        let was_empty = st.is_empty();
        // Only a frame that finds the outbox idle may go inline; the clock is read for those
        // alone, so a burst pays for it once, not per frame.
        let quiet = matches!(wake, Wake::Inline) && was_empty && !st.writing && {
            let now = std::time::Instant::now();
            let quiet = st
                .last_idle
                .is_none_or(|t| now.duration_since(t) >= BURST_GAP);
            st.last_idle = Some(now);
            quiet
        };
        let state = &mut *st;
        let (queue, spare) = match lane {
            Lane::Urgent => (&mut state.urgent, &mut state.spare),
            Lane::Ordered { .. } => (&mut state.ordered, &mut state.spare),
        };
        let need_new = match queue.back() {
            Some(c) => c.fds.len() + nfds > MAX_FDS_PER_FRAME || c.bytes.len() >= CHUNK_BYTES,
            None => true,
        };
        if need_new {
            let bytes = spare.pop().unwrap_or_default();
            queue.push_back(Chunk {
                bytes,
                ..Chunk::default()
            });
        }
        let chunk = queue.back_mut().expect("a chunk was just ensured");
        let at = chunk.bytes.len();
        let res = encode_into(&mut chunk.bytes).and_then(|len| {
            let res = self.check_len(len);
            if res.is_err() {
                chunk.bytes.truncate(at);
            }
            res
        });
        if let Err(e) = res {
            if chunk.bytes.is_empty() && chunk.fds.is_empty() {
                queue.pop_back();
            }
            return Err(e);
        }
        if nfds > 0 && chunk.fds.is_empty() {
            // The chunk leaves in one `sendmsg` (its descriptors with the first byte): this
            // frame is the first to take from them.
            frame::mark_opens_group(&mut chunk.bytes, at);
        }
        add_fds(&mut chunk.fds);
        if lane == (Lane::Ordered { user: true }) {
            let len = chunk.bytes.len() - at;
            chunk.user += len;
            state.user_bytes += len;
        }
        if lane == Lane::Urgent {
            state.last_counted = counted.map(|k| (k, 1, at));
        }
        drop(st);
        match wake {
            Wake::Writer if was_empty => self.wake.notify_one(),
            Wake::Writer => {}
            Wake::Inline if quiet => self.write_inline(),
            Wake::Inline if was_empty => self.wake.notify_one(),
            Wake::Inline => {}
        }
        Ok(())
    }

    /// Accounts for a chunk that has left; says whether user senders may go on now.
    fn sent(&self, st: &mut OutState, chunk: Chunk) -> bool {
        let had_room = self.has_room(st);
        st.user_bytes -= chunk.user;
        recycle(st, chunk.bytes);
        !had_room && self.has_room(st)
    }

    /// Stops accepting frames; the writer sends what is queued, then shuts the socket for writing.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        drop(st);
        self.wake.notify_one();
        self.room.notify_waiters();
    }

    /// Drops whatever is queued and stops the writer at once.
    pub(crate) fn abort(&self) {
        let mut st = self.lock();
        st.closing = true;
        st.closed = true;
        st.clear();
        drop(st);
        self.wake.notify_one();
        self.room.notify_waiters();
    }

    pub(crate) fn is_open(&self) -> bool {
        let st = self.lock();
        !(st.closing || st.closed)
    }

    /// Waits until the writer has finished (everything sent, or the socket failed).
    pub(crate) async fn finished(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    fn next_chunk(&self) -> Option<Result<Chunk, ()>> {
        let mut st = self.lock();
        if st.writing {
            // Written inline right now; that writer wakes us when it is done.
            return None;
        }
        if let Some(c) = st.pop_next() {
            st.writing = true;
            return Some(Ok(c));
        }
        if st.closing {
            st.closed = true;
            return Some(Err(()));
        }
        None
    }

    /// The writer task sent a whole chunk.
    fn chunk_done(&self, chunk: Chunk) {
        let mut st = self.lock();
        st.writing = false;
        let room = self.sent(&mut st, chunk);
        drop(st);
        if room {
            self.room.notify_waiters();
        }
    }

    /// The socket failed while the writer task wrote `chunk`: everything queued is dropped.
    fn fail(&self, chunk: Chunk) {
        let mut st = self.lock();
        st.closed = true;
        st.closing = true;
        st.user_bytes -= chunk.user;
        st.clear();
        drop(st);
        self.room.notify_waiters();
    }
}

/// The wire form of a user message, borrowed.
fn user_wire<U: ?Sized>(msg: &U, handle: bool) -> Wire<&U> {
    Wire::User { msg, handle }
}

/// [`frame::encode`] with its error as a [`SendFail`].
fn encode<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    msg: &T,
    nfds: usize,
) -> Result<usize, SendFail> {
    // postcard fails only on types serde cannot express; `encode` then leaves `buf` as it was.
    frame::encode(buf, msg, nfds).map_err(|e| SendFail::Encode(e.to_string()))
}

/// Keeps a sent chunk's buffer for reuse.
fn recycle(st: &mut OutState, mut bytes: Vec<u8>) {
    if bytes.capacity() <= 4 * CHUNK_BYTES && st.spare.len() < 4 {
        bytes.clear();
        st.spare.push(bytes);
    }
}

/// How a queued frame gets written.
#[derive(Clone, Copy)]
enum Wake {
    /// By the writer task, woken when the queue was empty.
    Writer,
    /// On the caller's thread now, when the outbox is idle and this is no burst.
    Inline,
}

/// Writes as much of `chunk` as the socket takes without waiting; what was written is removed
/// from it (descriptors leave with the first byte). `Ok(true)` when all of it left.
fn write_now(stream: &UnixStream, chunk: &mut Chunk) -> io::Result<bool> {
    let mut raw = [0 as RawFd; MAX_FDS_PER_FRAME];
    let nfds = chunk.fds.len();
    for (r, f) in raw.iter_mut().zip(&chunk.fds) {
        *r = f.raw();
    }
    let mut off = 0;
    let mut res = Ok(());
    while off < chunk.bytes.len() {
        let fds = if off == 0 { &raw[..nfds] } else { &[][..] };
        match stream.try_io(Interest::WRITABLE, || {
            sys::send_with_fds(stream.as_fd(), &chunk.bytes[off..], fds)
        }) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                res = Err(e);
                break;
            }
        }
    }
    if off > 0 {
        chunk.fds.clear();
        chunk.bytes.drain(..off);
    }
    res.map(|()| chunk.bytes.is_empty())
}

/// What a counted frame counts (see [`Outbox::send_counted`]): runs of the same key merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    /// Connections of a round-robin server the worker took.
    Accepted(u32),
    /// Connections of a round-robin server that did not reach the worker.
    Lost(u32),
    /// Connections the worker accepted on sockets of its own.
    Served,
}

/// Why a frame could not be queued.
#[derive(Debug)]
pub(crate) enum SendFail {
    Closed,
    /// The user queue holds its limit of bytes (only from the `try_` senders).
    Full,
    TooLarge {
        len: usize,
        max: usize,
    },
    Encode(String),
}

impl SendFail {
    pub(crate) fn into_error(self, id: u32) -> Error {
        match self {
            SendFail::Closed => Error::closed(id),
            SendFail::Full => Error::new(
                ErrorKind::Full,
                format!(
                    "the channel of worker {id} is full: the peer has not read the messages \
                     sent before"
                ),
            ),
            SendFail::TooLarge { len, max } => Error::new(
                ErrorKind::FrameTooLarge,
                format!("message of {len} bytes exceeds the channel's limit of {max} bytes"),
            ),
            SendFail::Encode(e) => {
                Error::new(ErrorKind::Malformed, format!("cannot encode message: {e}"))
            }
        }
    }
}

/// Starts the writer task for `stream` and returns the outbox that feeds it; user frames wait
/// once `user_limit` bytes of them are queued.
pub(crate) fn spawn_writer(
    stream: Arc<UnixStream>,
    max_frame: usize,
    user_limit: usize,
) -> Arc<Outbox> {
    let (done, _) = watch::channel(false);
    let outbox = Arc::new(Outbox {
        state: Mutex::new(OutState::default()),
        stream: stream.clone(),
        wake: Notify::new(),
        room: Notify::new(),
        done,
        max_frame,
        user_limit,
    });
    let ob = outbox.clone();
    tokio::spawn(async move {
        loop {
            match ob.next_chunk() {
                Some(Ok(chunk)) => {
                    if write_chunk(&stream, &chunk).await.is_err() {
                        ob.fail(chunk);
                        break;
                    }
                    ob.chunk_done(chunk);
                }
                Some(Err(())) => {
                    let _ = nix::sys::socket::shutdown(
                        stream.as_raw_fd(),
                        nix::sys::socket::Shutdown::Write,
                    );
                    break;
                }
                None => ob.wake.notified().await,
            }
        }
        ob.done.send_replace(true);
    });
    outbox
}

async fn write_chunk(stream: &UnixStream, chunk: &Chunk) -> io::Result<()> {
    let mut raw = [0 as RawFd; MAX_FDS_PER_FRAME];
    for (r, f) in raw.iter_mut().zip(&chunk.fds) {
        *r = f.raw();
    }
    let mut off = 0;
    let mut fds: &[RawFd] = &raw[..chunk.fds.len()];
    while off < chunk.bytes.len() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                sys::send_with_fds(stream.as_fd(), &chunk.bytes[off..], fds)
            })
            .await?;
        // Descriptors ride with the first byte of the chunk; the kernel took them all.
        fds = &[];
        off += n;
    }
    Ok(())
}

/// The receiving half: frames decoded into the wire enum, descriptors matched to their frames.
pub(crate) struct Reader {
    stream: Arc<UnixStream>,
    decoder: Decoder,
    /// Descriptor groups (one per `recvmsg` that brought some) whose opening frame has not
    /// been decoded yet.
    arrived: VecDeque<Group>,
    /// The group the frames being decoded take their descriptors from.
    current: Group,
    eof: bool,
    /// Payload bytes of the frame `next` returned last.
    last_len: usize,
    /// Descriptors the frame `next` returned last announced but the kernel dropped.
    last_lost: usize,
}

/// The descriptors of one `sendmsg`, in order, as far as they arrived.
#[derive(Default)]
struct Group {
    fds: VecDeque<OwnedFd>,
    /// The kernel dropped the rest (we were at our descriptor limit).
    truncated: bool,
}

/// What the reader produced.
pub(crate) enum Incoming<U> {
    /// A frame with the descriptors that arrived for it (see [`Reader::last_lost`]).
    Frame(Wire<U>, Vec<OwnedFd>),
    Eof,
}

/// A broken frame: the channel must be closed.
#[derive(Debug)]
pub(crate) enum ReadFail {
    Frame(FrameError),
    Decode(String),
    Io(io::Error),
    MissingFds,
    /// Descriptors arrived that no frame announces.
    UnannouncedFds(usize),
}

impl ReadFail {
    pub(crate) fn into_error(self, who: &str) -> Error {
        match self {
            ReadFail::Frame(e @ FrameError::TooLarge { .. }) => Error::new(
                ErrorKind::FrameTooLarge,
                format!("{who} sent an oversized frame: {e}"),
            ),
            ReadFail::Frame(e) => Error::new(
                ErrorKind::Malformed,
                format!("{who} sent a broken frame: {e}"),
            ),
            ReadFail::Decode(e) => Error::new(
                ErrorKind::Malformed,
                format!("{who} sent a frame that does not decode: {e}"),
            ),
            ReadFail::MissingFds => Error::new(
                ErrorKind::Malformed,
                format!("{who} sent a frame announcing descriptors that did not arrive"),
            ),
            ReadFail::UnannouncedFds(n) => Error::new(
                ErrorKind::Malformed,
                format!("{who} sent {n} descriptors that no frame announces; they were closed"),
            ),
            ReadFail::Io(e) => Error::io(
                ErrorKind::Io,
                format!("reading the channel of {who} failed"),
                e,
            ),
        }
    }
}

impl Reader {
    pub(crate) fn new(stream: Arc<UnixStream>, max_frame: usize) -> Self {
        Reader {
            stream,
            decoder: Decoder::new(max_frame),
            arrived: VecDeque::new(),
            current: Group::default(),
            eof: false,
            last_len: 0,
            last_lost: 0,
        }
    }

    /// The payload size of the frame [`Reader::next`] returned last, which a receiver counts
    /// against its limit: what the peer paid for the message, whatever its decoded size.
    pub(crate) fn last_len(&self) -> usize {
        self.last_len
    }

    /// How many of the descriptors the frame [`Reader::next`] returned last announced did not
    /// arrive: the kernel dropped them because this process is at its descriptor limit. The
    /// frame came with the others (the first ones it announced), and the channel is intact.
    pub(crate) fn last_lost(&self) -> usize {
        self.last_lost
    }

    /// Whether the next message is already buffered (no read needed).
    pub(crate) fn has_frame(&self) -> bool {
        self.decoder.has_frame()
    }

    /// The next message, `Eof` once the peer closed cleanly, or why the channel is broken.
    pub(crate) async fn next<U: DeserializeOwned>(&mut self) -> Result<Incoming<U>, ReadFail> {
        loop {
            if let Some(f) = self.decoder.next_frame().map_err(ReadFail::Frame)? {
                let msg: Wire<U> =
                    postcard::from_bytes(f.payload).map_err(|e| ReadFail::Decode(e.to_string()))?;
                let (announced, opens, len) = (f.fds, f.opens_group, f.payload.len());
                let (fds, lost) = self.take_fds(announced, opens)?;
                self.last_len = len;
                self.last_lost = lost;
                return Ok(Incoming::Frame(msg, fds));
            }
            // Every whole frame has taken its descriptors: what is left belongs to frames still
            // arriving, of one `sendmsg` (at most MAX_FDS_PER_FRAME descriptors). More is a peer
            // sending descriptors no frame announces; they would pile up here, so the channel
            // ends (and they close with the reader).
            let pending: usize = self.arrived.iter().map(|g| g.fds.len()).sum();
            if self.arrived.len() > 1 || pending + self.current.fds.len() > MAX_FDS_PER_FRAME {
                return Err(ReadFail::UnannouncedFds(pending + self.current.fds.len()));
            }
            if self.eof {
                self.decoder.finish().map_err(ReadFail::Frame)?;
                return Ok(Incoming::Eof);
            }
            let stream = &self.stream;
            let decoder = &mut self.decoder;
            let got = stream
                .async_io(Interest::READABLE, || {
                    sys::recv_with_fds(stream.as_fd(), decoder.spare())
                })
                .await;
            match got {
                Ok(r) => {
                    if !r.fds.is_empty() || r.truncated {
                        self.arrived.push_back(Group {
                            fds: r.fds.into(),
                            truncated: r.truncated,
                        });
                    }
                    match r.bytes {
                        0 => self.eof = true,
                        n => self.decoder.filled(n),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.eof = true,
                Err(e) => return Err(ReadFail::Io(e)),
            }
        }
    }

    /// The descriptors of a frame that announces `n`: from the next group when it opens one,
    /// else from the current one. Returns them with the count the kernel dropped, which only
    /// a truncated group may be short of.
    fn take_fds(&mut self, n: usize, opens: bool) -> Result<(Vec<OwnedFd>, usize), ReadFail> {
        if opens {
            let left = self.current.fds.len();
            if left > 0 {
                return Err(ReadFail::UnannouncedFds(left));
            }
            self.current = self.arrived.pop_front().ok_or(ReadFail::MissingFds)?;
        }
        if n == 0 {
            return Ok((Vec::new(), 0));
        }
        let have = self.current.fds.len().min(n);
        let lost = n - have;
        if lost > 0 && !self.current.truncated {
            return Err(ReadFail::MissingFds);
        }
        Ok((self.current.fds.drain(..have).collect(), lost))
    }
}

/// Wraps one end of a socketpair for tokio.
pub(crate) fn into_stream(fd: OwnedFd) -> io::Result<Arc<UnixStream>> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    Ok(Arc::new(UnixStream::from_std(std)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(out: &Outbox, server: u32) {
        out.send_counted(Counted::Accepted(server), |n| {
            Wire::<()>::Control(Control::Accepted { server, n })
        })
        .unwrap();
    }
    use crate::wire::Control;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn frames_and_descriptors_cross_a_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let a = into_stream(a.into()).unwrap();
        let b = into_stream(b.into()).unwrap();
        let out = spawn_writer(a, 1024, DEFAULT_OUTBOX_LIMIT);
        let (mut pr, mut pw) = std::io::pipe().unwrap();
        for i in 0..1000u32 {
            let fds = if i == 500 {
                vec![OwnedFd::from(pw.try_clone().unwrap())]
            } else {
                vec![]
            };
            out.send(
                &Wire::User {
                    msg: i,
                    handle: !fds.is_empty(),
                },
                fds,
            )
            .unwrap();
        }
        out.close();
        let mut reader = Reader::new(b, 1024);
        let mut got = 0u32;
        loop {
            match reader.next::<u32>().await.unwrap() {
                Incoming::Frame(Wire::User { msg, handle }, fds) => {
                    assert_eq!(msg, got);
                    assert_eq!(handle, msg == 500);
                    if let Some(fd) = fds.into_iter().next() {
                        let mut w = std::fs::File::from(fd);
                        w.write_all(b"via fd").unwrap();
                    }
                    got += 1;
                }
                Incoming::Frame(Wire::Control(c), _) => panic!("unexpected {c:?}"),
                Incoming::Eof => break,
            }
        }
        assert_eq!(got, 1000);
        pw.write_all(b"!").unwrap();
        drop(pw);
        let mut s = String::new();
        pr.read_to_string(&mut s).unwrap();
        assert_eq!(s, "via fd!");
    }

    #[tokio::test]
    async fn oversized_send_is_refused_and_the_channel_stays_usable() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = spawn_writer(into_stream(a.into()).unwrap(), 64, DEFAULT_OUTBOX_LIMIT);
        let big = vec![0u8; 100];
        assert!(matches!(
            out.send(
                &Wire::<Vec<u8>>::User {
                    msg: big,
                    handle: false
                },
                vec![]
            ),
            Err(SendFail::TooLarge { .. })
        ));
        out.send(&Wire::<Vec<u8>>::Control(Control::Welcome), vec![])
            .unwrap();
        out.close();
        let mut r = Reader::new(into_stream(b.into()).unwrap(), 64);
        assert!(matches!(
            r.next::<Vec<u8>>().await.unwrap(),
            Incoming::Frame(Wire::Control(Control::Welcome), _)
        ));
        assert!(matches!(r.next::<Vec<u8>>().await.unwrap(), Incoming::Eof));
    }

    #[tokio::test]
    async fn acknowledgements_merge_while_queued_and_keep_their_order() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = spawn_writer(into_stream(a.into()).unwrap(), 1024, DEFAULT_OUTBOX_LIMIT);
        // The writer task has not run yet (current-thread runtime): all of this stays queued.
        for _ in 0..300 {
            accepted(&out, 7);
        }
        out.send(&Wire::<()>::Control(Control::Ping(1)), vec![])
            .unwrap();
        accepted(&out, 7);
        accepted(&out, 7);
        accepted(&out, 8);
        accepted(&out, 7);
        out.close();
        let mut r = Reader::new(into_stream(b.into()).unwrap(), 1024);
        let mut got = Vec::new();
        loop {
            match r.next::<()>().await.unwrap() {
                Incoming::Frame(Wire::Control(Control::Accepted { server, n }), _) => {
                    got.push(format!("{server}x{n}"))
                }
                Incoming::Frame(Wire::Control(Control::Ping(n)), _) => got.push(format!("ping{n}")),
                Incoming::Frame(_, _) => panic!("unexpected frame"),
                Incoming::Eof => break,
            }
        }
        assert_eq!(got, ["7x300", "ping1", "7x2", "8x1", "7x1"]);
    }

    #[tokio::test]
    async fn a_shared_descriptor_stays_with_its_other_owner() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = spawn_writer(into_stream(a.into()).unwrap(), 1024, DEFAULT_OUTBOX_LIMIT);
        let (mut pr, pw) = std::io::pipe().unwrap();
        let kept = Arc::new(OwnedFd::from(pw));
        out.send_shared(
            &Wire::<()>::Control(Control::Conn { server: 1 }),
            kept.clone(),
        )
        .unwrap();
        out.close();
        out.finished().await;
        // The outbox let go of its reference once sent; ours still works.
        assert_eq!(Arc::strong_count(&kept), 1);
        let mut r = Reader::new(into_stream(b.into()).unwrap(), 1024);
        let Incoming::Frame(Wire::Control(Control::Conn { server: 1 }), fds) =
            r.next::<()>().await.unwrap()
        else {
            panic!("expected a Conn frame");
        };
        let mut sent = std::fs::File::from(fds.into_iter().next().unwrap());
        sent.write_all(b"sent ").unwrap();
        drop(sent);
        let mut kept = std::fs::File::from(Arc::into_inner(kept).unwrap());
        kept.write_all(b"kept").unwrap();
        drop(kept);
        let mut s = String::new();
        pr.read_to_string(&mut s).unwrap();
        assert_eq!(s, "sent kept");
    }

    /// Sends spaced out so each may go inline while a slow reader lets the socket fill: inline
    /// writes stop part-way, the writer task takes over, and the stream stays whole and in order.
    #[test]
    fn inline_writes_that_fill_the_socket_hand_over_in_order() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = rt.block_on(async {
            let out = spawn_writer(
                into_stream(a.into()).unwrap(),
                1 << 20,
                DEFAULT_OUTBOX_LIMIT,
            );
            // Let the reactor see the socket writable, so inline writes are possible at all.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            out
        });
        const N: u32 = 100;
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut d = crate::frame::Decoder::new(1 << 20);
            let mut next = 0u32;
            loop {
                while let Some(frame::Frame { payload, .. }) = d.next_frame().unwrap() {
                    let Wire::User { msg, .. } =
                        postcard::from_bytes::<Wire<Vec<u8>>>(payload).unwrap()
                    else {
                        panic!("unexpected frame");
                    };
                    assert_eq!(msg.len(), 50_000 + next as usize);
                    assert!(msg.iter().all(|x| *x == next as u8), "frame {next} garbled");
                    next += 1;
                }
                let n = b.read(d.spare()).unwrap();
                if n == 0 {
                    return next;
                }
                d.filled(n);
            }
        });
        for i in 0..N {
            let msg = vec![i as u8; 50_000 + i as usize];
            out.send(&Wire::User { msg, handle: false }, vec![])
                .unwrap();
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        out.close();
        rt.block_on(out.finished());
        assert_eq!(reader.join().unwrap(), N);
    }

    /// Polls `f` once, without a task to wake: tells whether it is ready now.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    const LIMIT: usize = 64 * 1024;
    const MSG: usize = 16 * 1024;

    /// A socketpair with an outbox of limit [`LIMIT`] on one end and a reader on the other.
    fn bounded_pair() -> (Arc<Outbox>, Reader) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = spawn_writer(into_stream(a.into()).unwrap(), 1 << 20, LIMIT);
        (out, Reader::new(into_stream(b.into()).unwrap(), 1 << 20))
    }

    /// Sends user frames of [`MSG`] bytes, numbered from 0, until one is refused as full; the
    /// writer task cannot run meanwhile (current-thread runtime), so the queue only grows.
    fn fill(out: &Outbox) -> u32 {
        for i in 0..10_000u32 {
            match out.try_send_user(&(i, vec![0u8; MSG]), None) {
                Ok(()) => {}
                Err(SendFail::Full) => return i,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        panic!("10 000 frames of {MSG} bytes queued without the limit of {LIMIT} taking effect");
    }

    /// Reads frames until end of stream: user frames as their number, control frames by name.
    async fn read_all(mut r: Reader) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            match r.next::<(u32, Vec<u8>)>().await.unwrap() {
                Incoming::Frame(Wire::User { msg: (i, _), .. }, _) => got.push(i.to_string()),
                Incoming::Frame(Wire::Control(c), _) => got.push(format!("{c:?}")),
                Incoming::Eof => return got,
            }
        }
    }

    #[tokio::test]
    async fn send_user_waits_over_the_limit_and_resumes_when_the_writer_drains() {
        let (out, reader) = bounded_pair();
        let mut sent = 0u32;
        let mut waiting = None;
        for i in 0..10_000u32 {
            let mut f = Box::pin(out.send_user(&(i, vec![0u8; MSG]), None));
            match poll_once(f.as_mut()) {
                std::task::Poll::Ready(r) => r.unwrap(),
                std::task::Poll::Pending => {
                    waiting = Some(f);
                    break;
                }
            }
            sent += 1;
        }
        let waiting = waiting.expect("send_user never waited");
        // Admitted below the limit only: at most the limit plus the frame that crossed it.
        let queued = out.lock().user_bytes;
        assert!(
            (LIMIT..LIMIT + MSG + 64).contains(&queued),
            "{queued} bytes queued"
        );
        let reading = tokio::spawn(read_all(reader));
        // The writer drains the queue into the socket, which the reader empties: room again.
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("send_user still waiting after the writer drained the queue")
            .unwrap();
        out.close();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .unwrap()
            .unwrap();
        let want: Vec<String> = (0..=sent).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn try_send_user_says_full_and_a_big_frame_still_goes_alone() {
        let (out, reader) = bounded_pair();
        let n = fill(&out);
        assert!(matches!(
            out.try_send_user(&(n, vec![0u8; 1]), None),
            Err(SendFail::Full)
        ));
        let e = SendFail::Full.into_error(3);
        assert_eq!(e.kind(), ErrorKind::Full);
        let reading = tokio::spawn(read_all(reader));
        // Bigger than the whole limit: admitted once the queue is below it.
        let big = (n, vec![0u8; 2 * LIMIT]);
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            out.send_user(&big, None),
        )
        .await
        .expect("a frame above the limit waited forever")
        .unwrap();
        out.close();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len() as u32, n + 1);
        // A closed outbox says closed, full or not.
        assert!(matches!(
            out.try_send_user(&(0u32, vec![0u8; 1]), None),
            Err(SendFail::Closed)
        ));
    }

    #[tokio::test]
    async fn control_frames_pass_a_full_user_queue() {
        let (out, reader) = bounded_pair();
        let n = fill(&out);
        // None of these waits or is refused, although user frames are.
        out.send(&Wire::<()>::Control(Control::Ping(9)), vec![])
            .unwrap();
        accepted(&out, 4);
        let (_pr, pw) = std::io::pipe().unwrap();
        out.send_shared(
            &Wire::<()>::Control(Control::Conn { server: 4 }),
            Arc::new(OwnedFd::from(pw)),
        )
        .unwrap();
        // Lifecycle control keeps its place behind the user frames.
        out.send(
            &Wire::<()>::Control(Control::Disconnect { within_ms: None }),
            vec![],
        )
        .unwrap();
        assert!(matches!(
            out.try_send_user(&(n, vec![0u8; 1]), None),
            Err(SendFail::Full)
        ));
        out.close();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), read_all(reader))
            .await
            .unwrap();
        let ping = got.iter().position(|f| f == "Ping(9)").unwrap();
        // At most the frame being written when it was queued (here the first, inline or
        // half-sent) goes before it, not the megabytes behind.
        assert!(ping <= 1, "ping came after {ping} frames: {got:?}");
        assert_eq!(got[ping + 1], "Accepted { server: 4, n: 1 }");
        assert_eq!(got[ping + 2], "Conn { server: 4 }");
        assert_eq!(got.last().unwrap(), "Disconnect { within_ms: None }");
        let users: Vec<&String> = got.iter().filter(|f| f.parse::<u32>().is_ok()).collect();
        assert_eq!(users.len() as u32, n);
    }

    #[tokio::test]
    async fn descriptors_no_frame_announces_end_the_channel_and_are_closed() {
        // A file of this test's own, so that the count is not disturbed by tests running beside.
        let path = std::env::temp_dir().join(format!("cluster-unannounced-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let open = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| *target == path)
                .count()
        };
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = Reader::new(into_stream(b.into()).unwrap(), 1024);
        let raw = vec![std::os::fd::AsRawFd::as_raw_fd(&file); 200];
        // Two frames that announce no descriptor, each sent with 200.
        for seq in 1..=2u64 {
            let mut bytes = Vec::new();
            frame::encode(&mut bytes, &Wire::<()>::Control(Control::Ping(seq)), 0).unwrap();
            sys::send_with_fds(a.as_fd(), &bytes, &raw).unwrap();
        }
        assert!(matches!(
            r.next::<()>().await,
            Ok(Incoming::Frame(Wire::Control(Control::Ping(1)), _))
        ));
        assert!(matches!(
            r.next::<()>().await,
            Ok(Incoming::Frame(Wire::Control(Control::Ping(2)), _))
        ));
        assert!(matches!(
            r.next::<()>().await,
            Err(ReadFail::UnannouncedFds(400))
        ));
        assert_eq!(open(), 401, "the reader holds them until it is dropped");
        drop(r);
        assert_eq!(open(), 1, "the received descriptors stay open");
        drop(file);
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(&[3, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        drop(a);
        let mut r = Reader::new(into_stream(b.into()).unwrap(), 64);
        assert!(matches!(r.next::<u32>().await, Err(ReadFail::Decode(_))));
    }

    #[test]
    fn a_truncated_group_loses_its_last_descriptors_and_the_next_group_is_intact() {
        let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut r = Reader::new(into_stream(b.into()).unwrap(), 64);
        let null = || std::fs::File::open("/dev/null").unwrap().into();
        // One `sendmsg` of three one-descriptor frames, of which the kernel installed two; then
        // one of a single frame that arrived whole.
        r.arrived.push_back(Group {
            fds: VecDeque::from([null(), null()]),
            truncated: true,
        });
        r.arrived.push_back(Group {
            fds: VecDeque::from([null()]),
            truncated: false,
        });
        let mut got = vec![];
        for opens in [true, false, false, true] {
            let (fds, lost) = r.take_fds(1, opens).unwrap();
            got.push((fds.len(), lost));
        }
        assert_eq!(got, [(1, 0), (1, 0), (0, 1), (1, 0)]);
        // A whole group that falls short is the peer's lie, not the kernel's doing.
        assert!(matches!(r.take_fds(1, false), Err(ReadFail::MissingFds)));
        // A group opened while the last still holds descriptors: those were never announced.
        r.arrived.push_back(Group::default());
        r.current.fds.push_back(null());
        assert!(matches!(
            r.take_fds(1, true),
            Err(ReadFail::UnannouncedFds(1))
        ));
    }
}
