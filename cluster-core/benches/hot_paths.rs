//! Microbenchmarks of the channel's hot paths, so a regression shows without the whole suite
//! (`bench/run.sh`):
//!
//! * `frame/*`: encoding small frames the way the channel's outbox does (header, postcard in
//!   place, length patch) and decoding them with [`Decoder`];
//! * `fd_passing/*`: the cost per descriptor of `SCM_RIGHTS` over a socketpair when each
//!   descriptor travels alone versus in batches, which is what the round-robin primary pays per
//!   connection;
//! * `per_conn_syscalls/*`: the other system calls the round-robin path makes per connection
//!   (the primary's `dup` + `close` of its keep-until-acknowledged copy, the worker's
//!   `set_nonblocking` and `peer_addr`).
//!
//! ```sh
//! cargo bench -p cluster-core --bench hot_paths
//! ```

use std::hint::black_box;
use std::io::IoSlice;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use cluster_core::__private::frame::{self, DEFAULT_MAX_FRAME, Decoder, put_header};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use nix::cmsg_space;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// The channel's payload shape (`Wire` is private): postcard encodes this exactly like it.
#[derive(Serialize, Deserialize)]
enum Wire<U> {
    Control(Control),
    User { msg: U, handle: bool },
}

/// A stand-in for the control variant the round-robin primary sends per connection.
#[derive(Serialize, Deserialize)]
enum Control {
    Conn { server: u32 },
    Accepted { server: u32, n: u32 },
}

/// A small user message, as in the IPC benchmark.
#[derive(Serialize, Deserialize)]
enum Tick {
    Tick(u32),
}

/// One frame, encoded in place at the end of `buf`, by the outbox's own encoder.
fn encode<T: Serialize>(buf: &mut Vec<u8>, msg: &T, nfds: usize) {
    frame::encode(buf, msg, nfds).expect("encodable");
}

const FRAMES: usize = 1000;

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(FRAMES as u64));

    let mut buf = Vec::with_capacity(64 * 1024);
    g.bench_function("encode_user_tick_x1000", |b| {
        b.iter(|| {
            buf.clear();
            for i in 0..FRAMES as u32 {
                encode(
                    &mut buf,
                    &Wire::User {
                        msg: Tick::Tick(black_box(i)),
                        handle: false,
                    },
                    0,
                );
            }
            black_box(buf.len())
        })
    });
    g.bench_function("encode_control_conn_x1000", |b| {
        b.iter(|| {
            buf.clear();
            for _ in 0..FRAMES {
                encode(
                    &mut buf,
                    &Wire::<()>::Control(Control::Conn {
                        server: black_box(0),
                    }),
                    1,
                );
            }
            black_box(buf.len())
        })
    });

    // A stream of 1000 small user frames, fed in 64 KiB reads like the reader's.
    let mut stream = Vec::new();
    for i in 0..FRAMES as u32 {
        encode(
            &mut stream,
            &Wire::User {
                msg: Tick::Tick(i),
                handle: false,
            },
            0,
        );
    }
    let mut dec = Decoder::new(DEFAULT_MAX_FRAME);
    g.bench_function("decode_user_tick_x1000", |b| {
        b.iter(|| {
            let mut rest = &stream[..];
            let mut sum = 0u64;
            while !rest.is_empty() {
                let spare = dec.spare();
                let n = spare.len().min(rest.len());
                spare[..n].copy_from_slice(&rest[..n]);
                dec.filled(n);
                rest = &rest[n..];
                while let Some(frame::Frame { payload, .. }) =
                    dec.next_frame().expect("well formed")
                {
                    let msg: Wire<Tick> = postcard::from_bytes(payload).expect("decodes");
                    if let Wire::User {
                        msg: Tick::Tick(x), ..
                    } = msg
                    {
                        sum += u64::from(x);
                    }
                }
            }
            black_box(sum)
        })
    });
    g.finish();

    // One large frame: the decoder grows to hold it, then copies it through.
    let mut g = c.benchmark_group("frame_large");
    let payload = vec![7u8; 1 << 20];
    let mut big = Vec::new();
    put_header(&mut big, payload.len(), 0);
    big.extend_from_slice(&payload);
    g.throughput(Throughput::Bytes(big.len() as u64));
    let mut dec = Decoder::new(DEFAULT_MAX_FRAME);
    g.bench_function("decode_1mib", |b| {
        b.iter(|| {
            let mut rest = &big[..];
            let mut got = 0;
            while !rest.is_empty() {
                let spare = dec.spare();
                let n = spare.len().min(rest.len());
                spare[..n].copy_from_slice(&rest[..n]);
                dec.filled(n);
                rest = &rest[n..];
                while let Some(frame::Frame { payload: p, .. }) =
                    dec.next_frame().expect("well formed")
                {
                    got += p.len();
                }
            }
            black_box(got)
        })
    });
    g.finish();
}

/// Sends `total` copies of `fd` over `tx` in `sendmsg`s of `batch` descriptors (each with one
/// small frame's worth of bytes per descriptor), receives and closes them on `rx`.
fn pass_fds(tx: &UnixStream, rx: &UnixStream, fd: RawFd, total: usize, batch: usize) {
    let fds = vec![fd; batch];
    let bytes = vec![0u8; 9 * batch];
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = cmsg_space!([RawFd; 253]);
    let mut sent = 0;
    while sent < total {
        let iov = [IoSlice::new(&bytes)];
        sendmsg::<()>(
            tx.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        sent += batch;
        let mut got = 0;
        while got < batch {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                rx.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .expect("recvmsg");
            for c in msg.cmsgs().expect("cmsgs") {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    got += raw.len();
                    for r in raw {
                        let _ = nix::unistd::close(r);
                    }
                }
            }
        }
    }
}

fn fd_passing(c: &mut Criterion) {
    let (tx, rx) = UnixStream::pair().expect("socketpair");
    let probe: OwnedFd = std::fs::File::open("/dev/null").expect("/dev/null").into();
    let mut g = c.benchmark_group("fd_passing");
    const TOTAL: usize = 253 * 4;
    g.throughput(Throughput::Elements(TOTAL as u64));
    for batch in [1usize, 16, 64, 253] {
        g.bench_function(format!("batch_{batch}"), |b| {
            b.iter(|| pass_fds(&tx, &rx, probe.as_raw_fd(), TOTAL, batch))
        });
    }
    g.finish();
}

fn per_conn_syscalls(c: &mut Criterion) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let mut g = c.benchmark_group("per_conn_syscalls");
    g.bench_function("dup_and_close", |b| {
        b.iter_batched(
            || (),
            |()| drop(black_box(server.try_clone().expect("dup"))),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("set_nonblocking", |b| {
        b.iter(|| server.set_nonblocking(black_box(true)).expect("fcntl"))
    });
    g.bench_function("peer_addr", |b| {
        b.iter(|| black_box(server.peer_addr().expect("getpeername")))
    });
    g.finish();
    drop(client);
}

fn accepted_frame(c: &mut Criterion) {
    // What a worker sends back per round-robin connection: one `Accepted { n: 1 }` frame.
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.bench_function("encode_control_accepted_x1000", |b| {
        b.iter(|| {
            buf.clear();
            for _ in 0..FRAMES {
                encode(
                    &mut buf,
                    &Wire::<()>::Control(Control::Accepted {
                        server: 0,
                        n: black_box(1),
                    }),
                    0,
                );
            }
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    frames,
    accepted_frame,
    fd_passing,
    per_conn_syscalls
);
criterion_main!(benches);
