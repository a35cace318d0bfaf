//! A worker's room for descriptors: it asks the primary for no connections when it is close to
//! its `RLIMIT_NOFILE`, and for more once it has room again.
//!
//! The kernel gives each new descriptor the lowest free number, so a connection that arrives
//! as descriptor `n` proves `n + 1` are open: no count is needed to see the limit coming, only
//! a comparison per connection. The count (of `/proc/self/fd`) is taken only while the worker
//! waits for room, to know when it has some.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::channel::Outbox;
use crate::wire::{Control, Wire};

/// While full, the worker counts its descriptors after this pause, doubling up to [`MAX_PAUSE`].
const MIN_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// The worker's side of the flow control of handed-over connections.
pub(crate) struct Room {
    /// The soft descriptor limit, read at start and at each count (the program may raise it).
    limit: AtomicU64,
    /// `Full` was sent and no `Room` since.
    full: AtomicBool,
}

impl Room {
    pub(crate) fn new() -> Self {
        Room {
            limit: AtomicU64::new(soft_limit().unwrap_or(u64::MAX)),
            full: AtomicBool::new(false),
        }
    }

    /// How close to the limit is too close: an eighth of it, at most 32 descriptors.
    fn margin(limit: u64) -> u64 {
        (limit / 8).clamp(1, 32)
    }

    /// A handed-over connection arrived as descriptor `fd`.
    pub(crate) fn received(self: &Arc<Self>, fd: RawFd, outbox: &Arc<Outbox>) {
        let limit = self.limit.load(Ordering::Relaxed);
        if (fd as u64).saturating_add(1 + Self::margin(limit)) >= limit {
            self.exhausted(outbox);
        }
    }

    /// The worker is at (or close to) its limit: no more connections until it has room.
    pub(crate) fn exhausted(self: &Arc<Self>, outbox: &Arc<Outbox>) {
        if self.full.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!("close to the descriptor limit: asking the primary for no connections");
        let _ = outbox.send(&Wire::<()>::Control(Control::Full), vec![]);
        let outbox = outbox.clone();
        let me = self.clone();
        tokio::spawn(async move {
            let mut pause = MIN_PAUSE;
            loop {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                if me.has_room() {
                    me.full.store(false, Ordering::Release);
                    tracing::info!("descriptors free again: asking the primary for connections");
                    let _ = outbox.send(&Wire::<()>::Control(Control::Room), vec![]);
                    return;
                }
                if !outbox.is_open() {
                    return;
                }
            }
        });
    }

    /// Whether at least twice the margin is free now. Without a way to count (not Linux),
    /// after the pause: a connection that does not fit is reported lost and handed on.
    fn has_room(&self) -> bool {
        let limit = soft_limit().unwrap_or(u64::MAX);
        self.limit.store(limit, Ordering::Relaxed);
        match open_count() {
            Some(open) => open.saturating_add(2 * Self::margin(limit)) <= limit,
            None => !cfg!(target_os = "linux"),
        }
    }
}

/// The soft `RLIMIT_NOFILE`.
fn soft_limit() -> Option<u64> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    Some(soft)
}

/// Descriptors open in this process: the entries of `/proc/self/fd`, less the one the listing
/// itself opened. `None` where there is no such directory, or no descriptor left to read it.
pub(crate) fn open_count() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    Some((dir.count() as u64).saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_an_eighth_of_the_limit_up_to_32() {
        assert_eq!(Room::margin(8), 1);
        assert_eq!(Room::margin(64), 8);
        assert_eq!(Room::margin(256), 32);
        assert_eq!(Room::margin(1 << 20), 32);
        assert_eq!(Room::margin(0), 1);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn open_count_sees_a_new_descriptor() {
        // Other tests open descriptors concurrently: compare several at once.
        let before = open_count().unwrap();
        let files: Vec<_> = (0..50)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let during = open_count().unwrap();
        drop(files);
        assert!(during >= before + 40, "{before} -> {during}");
    }
}
