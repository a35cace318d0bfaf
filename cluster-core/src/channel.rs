//! The async channel over a Unix socketpair: a coalescing writer and a frame reader.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{Notify, watch};

use crate::error::{Error, ErrorKind};
use crate::frame::{self, Decoder, FrameError, MAX_FDS_PER_FRAME};
use crate::sys;
use crate::wire::{Control, Wire};

/// Bytes after which the writer starts a new chunk, so one `sendmsg` stays a sensible size.
const CHUNK_BYTES: usize = 256 * 1024;

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
}

#[derive(Default)]
struct OutState {
    chunks: VecDeque<Chunk>,
    spare: Vec<Vec<u8>>,
    /// The last frame of the back chunk, when it is an `Accepted` that later ones may join:
    /// (server, n, offset of the frame in the chunk).
    last_ack: Option<(u32, u32, usize)>,
    /// When a frame last found the outbox idle (see [`BURST_GAP`]).
    last_idle: Option<std::time::Instant>,
    /// A chunk is being written (by the writer task or inline): nobody else may write.
    writing: bool,
    closing: bool,
    closed: bool,
}

/// The sending half: any task encodes frames straight into the pending chunk under one short
/// lock; one writer task sends whole chunks, so many small frames leave in one `sendmsg`. A
/// frame that finds the outbox idle (nothing queued, nothing being written, no frame in the
/// last few microseconds) is written at once on the caller's thread instead, which saves the
/// writer task's wake-up on a lone message (a request, a reply, a ping).
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    stream: Arc<UnixStream>,
    wake: Notify,
    done: watch::Sender<bool>,
    max_frame: usize,
}

impl Outbox {
    /// Encodes `msg` as one frame carrying `fds`, behind earlier frames: written at once when
    /// the outbox is idle, else queued for the writer task.
    pub(crate) fn send<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), SendFail> {
        let n = fds.len();
        self.push(
            msg,
            n,
            |c| c.extend(fds.into_iter().map(OutFd::Owned)),
            None,
            Wake::Inline,
        )
    }

    /// Queues `msg` with one descriptor that the caller keeps too: no copy is made; the
    /// outbox holds a reference until the descriptor has left in a `sendmsg`. Always written
    /// by the writer task, so descriptors handed out in a burst leave in few `sendmsg`s.
    pub(crate) fn send_shared<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        fd: Arc<OwnedFd>,
    ) -> Result<(), SendFail> {
        self.push(msg, 1, |c| c.push(OutFd::Shared(fd)), None, Wake::Writer)
    }

    /// Writes what is queued now, on the caller's thread, unless a write is in progress; what
    /// the socket does not take at once (or what waits behind a write in progress) is left to
    /// the writer task, woken for it. Order is kept: one writer at a time, oldest chunk first.
    fn write_inline(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.chunks.is_empty() {
            return;
        }
        if st.writing || st.closed {
            drop(st);
            self.wake.notify_one();
            return;
        }
        let mut chunk = st.chunks.pop_front().expect("checked non-empty");
        st.last_ack = None;
        st.writing = true;
        drop(st);
        let res = write_now(&self.stream, &mut chunk);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.writing = false;
        let wake = match res {
            Ok(true) => {
                recycle(&mut st, chunk.bytes);
                !st.chunks.is_empty() || st.closing
            }
            // Not all of it left (or the socket failed): the writer task takes over, and
            // meets the error itself if there is one.
            Ok(false) | Err(_) => {
                if !st.closed {
                    st.chunks.push_front(chunk);
                }
                true
            }
        };
        drop(st);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Queues `Accepted { server, n: 1 }`. When the last queued frame is an unsent `Accepted`
    /// for the same server, that frame's count grows instead: nothing was queued in between,
    /// so the order of everything the peer sees is unchanged, with fewer frames.
    pub(crate) fn send_accepted(&self, server: u32) -> Result<(), SendFail> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closing || st.closed {
            return Err(SendFail::Closed);
        }
        if let (Some((s, n, at)), Some(chunk)) = (st.last_ack, st.chunks.back_mut()) {
            if s != server {
                return self.push_accepted_frame(st, server);
            }
            let n = n.saturating_add(1);
            chunk.bytes.truncate(at);
            let msg = Wire::<()>::Control(Control::Accepted { server, n });
            frame::encode(&mut chunk.bytes, &msg, 0).expect("an Accepted frame always encodes");
            st.last_ack = Some((server, n, at));
            return Ok(());
        }
        self.push_accepted_frame(st, server)
    }

    fn push_accepted_frame(
        &self,
        st: std::sync::MutexGuard<'_, OutState>,
        server: u32,
    ) -> Result<(), SendFail> {
        drop(st);
        self.push(
            &Wire::<()>::Control(Control::Accepted { server, n: 1 }),
            0,
            |_| {},
            Some(server),
            Wake::Writer,
        )
    }

    /// Encodes `msg` as one frame announcing `nfds` descriptors, which `add_fds` appends to
    /// the chunk; `ack` marks the frame as an `Accepted` for that server that later ones join.
    fn push<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        nfds: usize,
        add_fds: impl FnOnce(&mut Vec<OutFd>),
        ack: Option<u32>,
        wake: Wake,
    ) -> Result<(), SendFail> {
        debug_assert!(nfds <= MAX_FDS_PER_FRAME);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closing || st.closed {
            return Err(SendFail::Closed);
        }
        // Set again below once this frame is in; cleared on every error path.
        st.last_ack = None;
        let was_empty = st.chunks.is_empty();
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
        let need_new = match st.chunks.back() {
            Some(c) => c.fds.len() + nfds > MAX_FDS_PER_FRAME || c.bytes.len() >= CHUNK_BYTES,
            None => true,
        };
        if need_new {
            let bytes = st.spare.pop().unwrap_or_default();
            st.chunks.push_back(Chunk {
                bytes,
                fds: Vec::new(),
            });
        }
        let chunk = st.chunks.back_mut().expect("a chunk was just ensured");
        let at = chunk.bytes.len();
        // postcard fails only on types serde cannot express; `encode` then drops the frame.
        let len = match frame::encode(&mut chunk.bytes, msg, nfds) {
            Ok(len) => len,
            Err(e) => return Err(SendFail::Encode(e.to_string())),
        };
        if len > self.max_frame {
            chunk.bytes.truncate(at);
            let empty = chunk.bytes.is_empty() && chunk.fds.is_empty();
            if empty {
                st.chunks.pop_back();
            }
            return Err(SendFail::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        add_fds(&mut chunk.fds);
        st.last_ack = ack.map(|s| (s, 1, at));
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

    /// Stops accepting frames; the writer sends what is queued, then shuts the socket for writing.
    pub(crate) fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closing = true;
        drop(st);
        self.wake.notify_one();
    }

    /// Drops whatever is queued and stops the writer at once.
    pub(crate) fn abort(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closing = true;
        st.closed = true;
        st.chunks.clear();
        st.last_ack = None;
        drop(st);
        self.wake.notify_one();
    }

    pub(crate) fn is_open(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        !(st.closing || st.closed)
    }

    /// Waits until the writer has finished (everything sent, or the socket failed).
    pub(crate) async fn finished(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    fn next_chunk(&self) -> Option<Result<Chunk, ()>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.writing {
            // Written inline right now; that writer wakes us when it is done.
            return None;
        }
        if let Some(c) = st.chunks.pop_front() {
            st.last_ack = None;
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
    fn chunk_done(&self, bytes: Vec<u8>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.writing = false;
        recycle(&mut st, bytes);
    }

    fn fail(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed = true;
        st.closing = true;
        st.chunks.clear();
        st.last_ack = None;
    }
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

/// Why a frame could not be queued.
#[derive(Debug)]
pub(crate) enum SendFail {
    Closed,
    TooLarge { len: usize, max: usize },
    Encode(String),
}

impl SendFail {
    pub(crate) fn into_error(self, id: u32) -> Error {
        match self {
            SendFail::Closed => Error::closed(id),
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

/// Starts the writer task for `stream` and returns the outbox that feeds it.
pub(crate) fn spawn_writer(stream: Arc<UnixStream>, max_frame: usize) -> Arc<Outbox> {
    let (done, _) = watch::channel(false);
    let outbox = Arc::new(Outbox {
        state: Mutex::new(OutState::default()),
        stream: stream.clone(),
        wake: Notify::new(),
        done,
        max_frame,
    });
    let ob = outbox.clone();
    tokio::spawn(async move {
        loop {
            match ob.next_chunk() {
                Some(Ok(chunk)) => {
                    if write_chunk(&stream, &chunk).await.is_err() {
                        ob.fail();
                        break;
                    }
                    ob.chunk_done(chunk.bytes);
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
    fds: VecDeque<OwnedFd>,
    eof: bool,
}

/// What the reader produced.
pub(crate) enum Incoming<U> {
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
            fds: VecDeque::new(),
            eof: false,
        }
    }

    /// Whether the next message is already buffered (no read needed).
    pub(crate) fn has_frame(&self) -> bool {
        self.decoder.has_frame()
    }

    /// The next message, `Eof` once the peer closed cleanly, or why the channel is broken.
    pub(crate) async fn next<U: DeserializeOwned>(&mut self) -> Result<Incoming<U>, ReadFail> {
        loop {
            if let Some((nfds, payload)) = self.decoder.next_frame().map_err(ReadFail::Frame)? {
                let msg: Wire<U> =
                    postcard::from_bytes(payload).map_err(|e| ReadFail::Decode(e.to_string()))?;
                if self.fds.len() < nfds {
                    return Err(ReadFail::MissingFds);
                }
                let fds = self.fds.drain(..nfds).collect();
                return Ok(Incoming::Frame(msg, fds));
            }
            if self.eof {
                self.decoder.finish().map_err(ReadFail::Frame)?;
                return Ok(Incoming::Eof);
            }
            let stream = &self.stream;
            let decoder = &mut self.decoder;
            let fds = &mut self.fds;
            let n = stream
                .async_io(Interest::READABLE, || {
                    sys::recv_with_fds(stream.as_fd(), decoder.spare(), fds)
                })
                .await;
            match n {
                Ok(0) => self.eof = true,
                Ok(n) => self.decoder.filled(n),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.eof = true,
                Err(e) => return Err(ReadFail::Io(e)),
            }
        }
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
    use crate::wire::Control;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn frames_and_descriptors_cross_a_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let a = into_stream(a.into()).unwrap();
        let b = into_stream(b.into()).unwrap();
        let out = spawn_writer(a, 1024);
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
        let out = spawn_writer(into_stream(a.into()).unwrap(), 64);
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
        let out = spawn_writer(into_stream(a.into()).unwrap(), 1024);
        // The writer task has not run yet (current-thread runtime): all of this stays queued.
        for _ in 0..300 {
            out.send_accepted(7).unwrap();
        }
        out.send(&Wire::<()>::Control(Control::Ping(1)), vec![])
            .unwrap();
        out.send_accepted(7).unwrap();
        out.send_accepted(7).unwrap();
        out.send_accepted(8).unwrap();
        out.send_accepted(7).unwrap();
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
        let out = spawn_writer(into_stream(a.into()).unwrap(), 1024);
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
            let out = spawn_writer(into_stream(a.into()).unwrap(), 1 << 20);
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
                while let Some((_, payload)) = d.next_frame().unwrap() {
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

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(&[3, 0, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        drop(a);
        let mut r = Reader::new(into_stream(b.into()).unwrap(), 64);
        assert!(matches!(r.next::<u32>().await, Err(ReadFail::Decode(_))));
    }
}
