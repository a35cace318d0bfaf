//! Configuration: worker count, scheduling policy, and the primary's settings for new workers.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::channel::DEFAULT_OUTBOX_LIMIT;
use crate::frame::DEFAULT_MAX_FRAME;

/// How many workers the primary starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// One per available CPU: `std::thread::available_parallelism()`, which honours cgroup CPU
    /// quotas and the affinity mask.
    #[default]
    Auto,
    /// Exactly this many (at least 1).
    Count(usize),
}

impl Workers {
    /// The number this resolves to on this machine.
    pub fn resolve(self) -> usize {
        match self {
            Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Workers::Count(n) => n,
        }
    }
}

impl FromStr for Workers {
    type Err = ParseWorkersError;

    fn from_str(s: &str) -> Result<Self, ParseWorkersError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Workers::Auto);
        }
        match s.parse::<usize>() {
            Ok(0) => Err(ParseWorkersError(None)),
            Ok(n) => Ok(Workers::Count(n)),
            Err(_) => Err(ParseWorkersError(Some(s.to_owned()))),
        }
    }
}

/// A worker count that does not parse, from [`Workers`]'s `FromStr` (`CLUSTER_WORKERS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseWorkersError(
    /// The text, or `None` for a count of 0.
    Option<String>,
);

impl fmt::Display for ParseWorkersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("worker count must be at least 1, or `auto`"),
            Some(s) => write!(
                f,
                "invalid worker count `{s}`; expected `auto` or an integer >= 1"
            ),
        }
    }
}

impl std::error::Error for ParseWorkersError {}

/// How connections to a shared server port reach the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulingPolicy {
    /// The primary accepts and hands each connection to the next worker (Node's `SCHED_RR`).
    #[default]
    RoundRobin,
    /// Every worker accepts on the same listening socket (Node's `SCHED_NONE`).
    Shared,
    /// One `SO_REUSEPORT` socket per worker slot, kept by the primary across restarts (Linux).
    ReusePort,
}

impl FromStr for SchedulingPolicy {
    type Err = ParseSchedulingPolicyError;

    fn from_str(s: &str) -> Result<Self, ParseSchedulingPolicyError> {
        match s.trim() {
            "round-robin" | "rr" => Ok(SchedulingPolicy::RoundRobin),
            "shared" | "none" => Ok(SchedulingPolicy::Shared),
            "reuseport" => Ok(SchedulingPolicy::ReusePort),
            other => Err(ParseSchedulingPolicyError(other.to_owned())),
        }
    }
}

/// A scheduling policy that does not parse, from [`SchedulingPolicy`]'s `FromStr`
/// (`CLUSTER_SCHED_POLICY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSchedulingPolicyError(String);

impl fmt::Display for ParseSchedulingPolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown scheduling policy `{}`; expected one of `round-robin`, `shared`, `reuseport` (or Node's `rr`, `none`)",
            self.0
        )
    }
}

impl std::error::Error for ParseSchedulingPolicyError {}

impl fmt::Display for SchedulingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchedulingPolicy::RoundRobin => "round-robin",
            SchedulingPolicy::Shared => "shared",
            SchedulingPolicy::ReusePort => "reuseport",
        })
    }
}

/// The runtime flavour of a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// tokio's current-thread runtime: one thread.
    CurrentThread,
    /// tokio's multi-thread runtime with this many threads (0: one per CPU).
    MultiThread(usize),
}

/// What `#[cluster::main]` passes to the runtime; also the builder of code that does without
/// the macro.
#[derive(Debug, Clone)]
pub struct Config {
    /// Workers started with the primary; `CLUSTER_WORKERS` overrides it.
    pub workers: Workers,
    /// The scheduling policy; `CLUSTER_SCHED_POLICY` overrides it.
    pub scheduling: SchedulingPolicy,
    /// The primary's runtime flavour (default: current-thread: its work is dispatching, and one
    /// thread avoids cross-thread wake-ups on every connection and message).
    pub primary_flavor: Flavor,
    /// The workers' runtime flavour (default: current-thread; one process per core is the
    /// parallelism).
    pub worker_flavor: Flavor,
    /// The largest frame either side accepts, in bytes (default 16 MiB).
    pub max_frame: usize,
    /// How many bytes of typed messages may wait on each channel, in each direction, before
    /// senders wait (default 1 MiB): in the sender's outbox, `send` waits and `try_send` fails
    /// with [`ErrorKind::Full`](crate::ErrorKind::Full) until the peer has read enough; in the
    /// receiver, unread messages past this many bytes stop the reading of the channel, so the
    /// socket fills and the sender's outbox with it. A message is admitted while the bytes
    /// queued are below the limit, so one larger than the limit still goes. Control frames
    /// (connection hand-offs, acknowledgements, heartbeats) never count and never wait.
    pub outbox_limit: usize,
    /// How long a worker waits for the primary to answer its handshake before it exits with
    /// an error (default 10 s).
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: Workers::Auto,
            scheduling: SchedulingPolicy::RoundRobin,
            primary_flavor: Flavor::CurrentThread,
            worker_flavor: Flavor::CurrentThread,
            max_frame: DEFAULT_MAX_FRAME,
            outbox_limit: DEFAULT_OUTBOX_LIMIT,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Applies `CLUSTER_WORKERS` and `CLUSTER_SCHED_POLICY`.
    pub(crate) fn with_env(mut self) -> Result<Self, String> {
        if let Some(v) = std::env::var_os("CLUSTER_WORKERS") {
            let v = v.to_string_lossy();
            self.workers = v.parse().map_err(|e| format!("CLUSTER_WORKERS: {e}"))?;
        }
        if let Some(v) = std::env::var_os("CLUSTER_SCHED_POLICY") {
            let v = v.to_string_lossy();
            self.scheduling = v
                .parse()
                .map_err(|e| format!("CLUSTER_SCHED_POLICY: {e}"))?;
        }
        Ok(self)
    }
}

/// Replacing workers that exit unplanned: off unless set, as in Node.
///
/// A worker that exits without a disconnect (a crash, a panic, a signal, `exit(1)`) is replaced
/// after a delay that doubles from `min_backoff` up to `max_backoff`, and starts again from
/// `min_backoff` once a worker has stayed up for `reset_after`. When more workers fail within
/// `crash_window` than `crash_limit` or the number of live workers (whichever is larger), counting
/// only workers that never came online or lived less than `min_uptime`, the
/// crash-loop guard stops the cluster: every worker is disconnected, the event stream ends, and
/// the primary exits with code 1, its last line saying why with the workers' last error. (So a
/// fault that takes down several workers at once, but is cured by restarting them, does not stop
/// a big cluster; a fault that comes back after every restart does.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RespawnPolicy {
    /// First delay before a replacement (default 100 ms).
    pub min_backoff: Duration,
    /// Largest delay (default 10 s).
    pub max_backoff: Duration,
    /// Uptime after which a worker counts as healthy and the delay resets (default 10 s).
    pub reset_after: Duration,
    /// Unplanned exits within `crash_window` that stop the cluster, at least; the live worker
    /// count plus one when that is larger (default 5).
    pub crash_limit: usize,
    /// The window of the crash-loop guard (default 60 s).
    pub crash_window: Duration,
    /// A worker that came online and lived at least this long before it died unplanned does not
    /// count toward the crash-loop guard (default 5 s; PM2's `min_uptime`): it is replaced with
    /// backoff however often that happens, so workers killed now and then by bad luck never
    /// stop the cluster, while a build whose workers die at start still does.
    pub min_uptime: Duration,
}

impl Default for RespawnPolicy {
    fn default() -> Self {
        RespawnPolicy {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            reset_after: Duration::from_secs(10),
            crash_limit: 5,
            crash_window: Duration::from_secs(60),
            min_uptime: Duration::from_secs(5),
        }
    }
}

/// Watching workers for liveness over the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// How often the primary pings each online worker (default 1 s).
    pub interval: Duration,
    /// A worker silent for this long is killed and reported (default 10 s).
    pub timeout: Duration,
    /// Time a worker has to come online after its fork, counted apart (default 30 s).
    pub boot_timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            boot_timeout: Duration::from_secs(30),
        }
    }
}

/// Settings for workers forked from now on: Node's `cluster.settings`, typed.
///
/// Change them with [`Primary::setup_primary`](crate::Primary::setup_primary); changes are
/// cumulative and only later forks see them.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Settings {
    /// The program to run as a worker. `None` (the default): the primary's own binary, through
    /// the handle opened at start-up, so replacing the file on disk cannot mix versions.
    pub exec: Option<PathBuf>,
    /// Arguments of the worker. `None`: the primary's own arguments.
    pub args: Option<Vec<OsString>>,
    /// Working directory of the worker. `None`: the primary's.
    pub cwd: Option<PathBuf>,
    /// When true, the worker's stdout and stderr are pipes the primary reads
    /// ([`WorkerRef::take_stdout`](crate::WorkerRef::take_stdout)); otherwise they are inherited.
    pub silent: bool,
    /// User id to run the worker as. Without [`gid`](Self::gid), the worker gets that user's
    /// primary group and supplementary groups (as `initgroups` gives them); a uid with no
    /// passwd entry then fails the fork. Never the primary's groups (root's, typically).
    pub uid: Option<u32>,
    /// Group id to run the worker as; with it, the worker has no supplementary groups.
    pub gid: Option<u32>,
    /// What the worker may ask the primary to listen on for it.
    pub bind: BindPolicy,
    /// When set (and `silent` is not), the worker's stdout and stderr are pipes the primary
    /// copies to its own stdout and stderr line by line, each line starting with this prefix,
    /// `{id}` replaced by the worker's id (such as `"[worker {id}] "`). Lines of different
    /// workers never interleave mid-line, and what a worker wrote before it died still appears.
    /// `None` (the default): the worker's output is the primary's, unprefixed.
    pub log_prefix: Option<String>,
}

/// What a worker may ask the primary to listen on: the primary binds every shared server, often
/// as root (port 80) for workers that run as another user, so a worker's request is checked
/// against this before anything is bound. A refused request fails the worker's `bind` with a
/// clear error (`PermissionDenied`, or `Other` past [`max_servers`](Self::max_servers)) and is
/// an `Event::Error` naming the worker.
///
/// The defaults keep what a worker could do by itself: a worker running as the primary's user
/// may ask for anything the primary can bind; a worker running as another user (`uid`) is
/// refused ports below the kernel's `ip_unprivileged_port_start` (1024 unless changed) and Unix
/// sockets in directories its user and groups cannot write, unless [`ports`](Self::ports) or
/// [`unix_dirs`](Self::unix_dirs) allow them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BindPolicy {
    /// Most servers (listeners and UDP sockets) one worker may have open at once (default 64).
    pub max_servers: usize,
    /// The IP addresses a worker may listen on; `None` (the default): any.
    pub addresses: Option<Vec<std::net::IpAddr>>,
    /// The ports a worker may listen on, privileged ones included; `None` (the default): any
    /// port the worker could bind itself (see above). Port 0 (the kernel's choice) is always
    /// allowed.
    pub ports: Option<Vec<std::ops::RangeInclusive<u16>>>,
    /// The directories a worker may create Unix sockets in (the directories themselves, not
    /// what is below them); `None` (the default): any directory the worker could create one in
    /// itself (see above).
    pub unix_dirs: Option<Vec<PathBuf>>,
}

impl Default for BindPolicy {
    fn default() -> Self {
        BindPolicy {
            max_servers: 64,
            addresses: None,
            ports: None,
            unix_dirs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_counts_parse() {
        assert_eq!("auto".parse::<Workers>(), Ok(Workers::Auto));
        assert_eq!(" 3 ".parse::<Workers>(), Ok(Workers::Count(3)));
        assert!(
            "0".parse::<Workers>()
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        assert!(
            "lots"
                .parse::<Workers>()
                .unwrap_err()
                .to_string()
                .contains("`lots`")
        );
        assert!(Workers::Auto.resolve() >= 1);
    }

    #[test]
    fn policies_parse_with_node_aliases() {
        assert_eq!(
            "rr".parse::<SchedulingPolicy>(),
            Ok(SchedulingPolicy::RoundRobin)
        );
        assert_eq!(
            "none".parse::<SchedulingPolicy>(),
            Ok(SchedulingPolicy::Shared)
        );
        assert_eq!(
            "reuseport".parse::<SchedulingPolicy>(),
            Ok(SchedulingPolicy::ReusePort)
        );
        assert!("fast".parse::<SchedulingPolicy>().is_err());
    }
}
