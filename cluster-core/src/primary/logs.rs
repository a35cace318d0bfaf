//! Worker output copied to the primary's own stdout and stderr line by line, each line with a
//! prefix that says whose it is ([`Settings::log_prefix`](crate::Settings::log_prefix)).
//!
//! One thread per stream reads the worker's pipe to its end (so what a worker wrote before it
//! died still appears) and writes each line with a single `write_all` under the standard
//! stream's lock: lines of different workers, and the primary's own, never interleave mid-line.
//! Threads, not tasks: a slow reader of the primary's stdout blocks only them, never the
//! primary's runtime.

use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;

/// A line longer than this is written in pieces of this size, each one prefixed.
const MAX_LINE: usize = 64 * 1024;

/// Which of the primary's streams a worker's stream is copied to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Copies the worker's pipe `from` to the primary's `to`, each line prefixed by `prefix`.
pub(crate) fn copy(from: OwnedFd, to: Stream, prefix: String) {
    let spawned = std::thread::Builder::new()
        .name("cluster-worker-log".into())
        .spawn(move || {
            // tokio made the pipe non-blocking; this thread reads it blocking.
            {
                use nix::fcntl::{FcntlArg, OFlag, fcntl};
                use std::os::fd::AsRawFd;
                let flags = OFlag::from_bits_truncate(
                    fcntl(from.as_raw_fd(), FcntlArg::F_GETFL).unwrap_or(0),
                );
                let _ = fcntl(
                    from.as_raw_fd(),
                    FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK),
                );
            }
            let mut reader = std::io::BufReader::with_capacity(MAX_LINE, std::fs::File::from(from));
            let mut line = Vec::with_capacity(256);
            loop {
                line.clear();
                line.extend_from_slice(prefix.as_bytes());
                let start = line.len();
                let read =
                    std::io::Read::take(&mut reader, MAX_LINE as u64).read_until(b'\n', &mut line);
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line.len() == start {
                    return;
                }
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                let written = match to {
                    Stream::Stdout => std::io::stdout().lock().write_all(&line),
                    Stream::Stderr => std::io::stderr().lock().write_all(&line),
                };
                if written.is_err() {
                    // The primary's stream is gone: drain the pipe so the worker never blocks.
                    let _ = std::io::copy(&mut reader, &mut std::io::sink());
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that copies a worker's output");
    }
}

/// The prefix for worker `id`: `template` with `{id}` replaced.
pub(crate) fn prefix(template: &str, id: u32) -> String {
    template.replace("{id}", &id.to_string())
}
