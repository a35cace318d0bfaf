//! The foundation with real processes: Node's lifecycle events and their order, disconnect and
//! kill semantics, ids, environment and descriptor inheritance, descriptor passing both ways,
//! broken frames, refused handshakes, primary death and role detection.

mod common;

use common::{KillOnDrop, Proc, example, wait_gone};
use nix::sys::signal::Signal;
use std::process::{Command, Stdio};

fn fixture(workers: &str) -> Proc {
    Proc::scripted("fixture_lifecycle", &[("CLUSTER_WORKERS", workers)])
}

/// Waits for `event online id=N` and returns the worker's pid from its fork event.
fn online(p: &mut Proc, id: u32) -> u32 {
    let fork = p.seen_or_wait("fork", |l| l.starts_with(&format!("event fork id={id} ")));
    let pid = fork.rsplit("pid=").next().unwrap().parse().unwrap();
    p.seen_or_wait("online", |l| l == format!("event online id={id}"));
    pid
}

fn index_of(p: &Proc, prefix: &str) -> usize {
    p.seen
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {:#?}", p.seen))
}

#[test]
fn primary_disconnect_runs_in_node_order_and_is_planned() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let _guard = KillOnDrop(vec![pid]);
    p.send("disconnect 1");
    // Node: a primary-side disconnect removes the worker from `workers` at once.
    p.seen_or_wait("reply", |l| l == "disconnecting in_workers=false");
    p.seen_or_wait("disconnect", |l| {
        l.starts_with("event disconnect id=1 connected=false ead=Some(true)")
    });
    p.seen_or_wait("exit", |l| {
        l == "event exit id=1 status=0 dead=true ead=Some(true) in_workers=false"
    });
    assert!(index_of(&p, "event fork id=1") < index_of(&p, "event online id=1"));
    assert!(index_of(&p, "event online id=1") < index_of(&p, "event disconnect id=1"));
    wait_gone(pid);
}

#[test]
fn primary_kill_sends_sigterm_and_is_not_planned() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let _guard = KillOnDrop(vec![pid]);
    p.send("kill 1");
    p.seen_or_wait("exit", |l| {
        l == "event exit id=1 status=SIGTERM dead=true ead=Some(false) in_workers=false"
    });
    wait_gone(pid);
}

#[test]
fn worker_side_disconnect_and_kill_are_planned_exit_is_not() {
    let mut p = fixture("3");
    let pids: Vec<u32> = (1..=3).map(|id| online(&mut p, id)).collect();
    let _guard = KillOnDrop(pids.clone());
    p.send("send 1 disconnect");
    p.send("send 2 kill");
    p.send("send 3 exit 3");
    for id in 1..=3 {
        p.seen_or_wait("exit", |l| l.starts_with(&format!("event exit id={id} ")));
    }
    assert!(
        p.seen
            .iter()
            .any(|l| l == "event exit id=1 status=0 dead=true ead=Some(true) in_workers=false")
    );
    assert!(
        p.seen
            .iter()
            .any(|l| l.starts_with("event exit id=2 status=0 dead=true ead=Some(true)"))
    );
    assert!(
        p.seen
            .iter()
            .any(|l| l.starts_with("event exit id=3 status=3 dead=true ead=Some(false)"))
    );
    for pid in pids {
        wait_gone(pid);
    }
}

#[test]
fn ids_start_at_one_and_are_never_reused() {
    let mut p = fixture("2");
    let a = online(&mut p, 1);
    let b = online(&mut p, 2);
    let _guard = KillOnDrop(vec![a, b]);
    p.send("kill 1 SIGKILL");
    p.seen_or_wait("exit", |l| l.starts_with("event exit id=1 status=SIGKILL"));
    p.send("fork");
    p.seen_or_wait("reply", |l| l == "forked id=3");
    let c = online(&mut p, 3);
    let _guard2 = KillOnDrop(vec![c]);
    p.send("workers");
    p.seen_or_wait("workers", |l| {
        l.starts_with("workers ") && l.contains("2:") && l.contains("3:") && !l.contains("1:")
    });
}

#[test]
fn worker_inherits_only_stdio_and_its_channel() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let _guard = KillOnDrop(vec![pid]);
    p.seen_or_wait("fds", |l| l.starts_with("event message id=1 msg=Fds("));
    let line = p
        .seen
        .iter()
        .find(|l| l.contains("msg=Fds("))
        .unwrap()
        .clone();
    assert!(
        line.contains(r#"Fds(["0", "1", "2", "3"])"#),
        "unexpected descriptors: {line}"
    );
}

#[test]
fn fork_env_is_merged_and_worker_id_variable_is_removed() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    p.send("fork_env CLUSTER_TEST_VALUE forty-two");
    let pid2 = online(&mut p, 2);
    let _guard = KillOnDrop(vec![pid, pid2]);
    p.send("send 2 env CLUSTER_TEST_VALUE");
    p.seen_or_wait("env", |l| {
        l == r#"event message id=2 msg=Env(Some("forty-two")) handle=false"#
    });
    p.send("send 1 env CLUSTER_TEST_VALUE");
    p.seen_or_wait("env", |l| {
        l == "event message id=1 msg=Env(None) handle=false"
    });
    p.send("send 2 env CLUSTER_WORKER_ID");
    p.seen_or_wait("env", |l| {
        l == "event message id=2 msg=Env(None) handle=false"
    });
}

#[test]
fn descriptors_travel_both_ways() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let _guard = KillOnDrop(vec![pid]);
    // Primary -> worker: the worker writes into the pipe it was handed.
    p.send("fd 1");
    p.seen_or_wait("fd reply", |l| l == "fd read=from worker");
    // Worker -> primary: the primary writes into the pipe it received.
    p.send("send 1 sendfd");
    p.seen_or_wait("pipe message", |l| {
        l == "event message id=1 msg=Pipe handle=true"
    });
    p.seen_or_wait("echo", |l| {
        l == r#"event message id=1 msg=Echo("pipe got from primary") handle=false"#
    });
}

#[test]
fn broken_frames_close_only_that_worker() {
    let mut p = fixture("3");
    let pids: Vec<u32> = (1..=3).map(|id| online(&mut p, id)).collect();
    let _guard = KillOnDrop(pids.clone());
    p.send("send 1 garbage");
    p.seen_or_wait("error", |l| {
        l.starts_with("event error id=1 kind=Malformed")
    });
    p.seen_or_wait("disconnect", |l| l.starts_with("event disconnect id=1"));
    p.send("send 2 oversized");
    p.seen_or_wait("error", |l| {
        l.starts_with("event error id=2 kind=FrameTooLarge") && l.contains("exceeds the limit")
    });
    p.seen_or_wait("disconnect", |l| l.starts_with("event disconnect id=2"));
    // The others are served as before.
    p.send("send 3 echo still-here");
    p.seen_or_wait("echo", |l| {
        l == r#"event message id=3 msg=Echo("still-here") handle=false"#
    });
    // A worker whose channel the primary closed leaves on its own (Node's auto-exit).
    wait_gone(pids[0]);
    wait_gone(pids[1]);
}

#[test]
fn a_worker_with_other_message_types_is_refused_at_the_handshake() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let _guard = KillOnDrop(vec![pid]);
    let other = example("messages");
    p.send(&format!("exec {}", other.display()));
    p.send("fork");
    p.seen_or_wait("error", |l| {
        l.starts_with("event error id=2 kind=Handshake")
            && l.contains("other message types")
            && l.contains("fingerprint")
    });
    p.seen_or_wait("exit", |l| l.starts_with("event exit id=2 status=1"));
    assert!(
        p.stderr_says("refused by the primary"),
        "stderr: {}",
        p.stderr()
    );
    // The compatible worker still works.
    p.send("send 1 echo ok");
    p.seen_or_wait("echo", |l| {
        l == r#"event message id=1 msg=Echo("ok") handle=false"#
    });
}

#[test]
fn missing_exec_and_dead_workers_are_errors_not_panics() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let _guard = KillOnDrop(vec![pid]);
    p.send("killsend 1");
    p.seen_or_wait("late send", |l| l == "late send failed kind=ChannelClosed");
    p.send("exec /nonexistent/cluster-worker");
    p.send("fork");
    p.seen_or_wait("fork failure", |l| {
        l.starts_with("fork failed kind=Spawn") && l.contains("/nonexistent/cluster-worker")
    });
    // The primary is still alive and answers.
    p.send("workers");
    p.seen_or_wait("workers", |l| l.starts_with("workers"));
}

#[test]
fn silent_workers_stdout_is_readable_by_the_primary() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    p.send("silent");
    p.seen_or_wait("setup", |l| l == "event setup silent=true");
    p.send("fork");
    let pid2 = online(&mut p, 2);
    let _guard = KillOnDrop(vec![pid, pid2]);
    p.send("send 2 print hello-from-2");
    p.send("stdout 2");
    p.seen_or_wait("stdout", |l| l == "stdout hello-from-2");
    // Settings only affect later forks: worker 1 still writes to the inherited stdout.
    p.send("send 1 print inherited-1");
    p.seen_or_wait("inherited", |l| l == "inherited-1");
}

#[test]
fn cluster_disconnect_waits_for_every_exit_and_works_with_zero_workers() {
    let mut p = fixture("2");
    let pids = vec![online(&mut p, 1), online(&mut p, 2)];
    let _guard = KillOnDrop(pids.clone());
    p.send("disconnect_all");
    p.seen_or_wait("done", |l| l == "disconnected workers=0");
    for pid in &pids {
        wait_gone(*pid);
    }
    // Again, with nobody left: completes at once.
    p.send("disconnect_all");
    p.wait_for("done again", |l| l == "disconnected workers=0");
    p.seen_or_wait("events ended", |l| l == "events ended");
}

#[test]
fn workers_die_with_their_primary() {
    let mut p = fixture("2");
    let pids = vec![online(&mut p, 1), online(&mut p, 2)];
    let _guard = KillOnDrop(pids.clone());
    p.signal(Signal::SIGKILL);
    p.wait_exit();
    for pid in pids {
        wait_gone(pid);
    }
}

fn run_as_worker(id: &str) -> (i32, String) {
    let out = Command::new(example("fixture_lifecycle"))
        .env("CLUSTER_WORKER_ID", id)
        .stdin(Stdio::null())
        .output()
        .expect("run fixture");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_worker_id_or_missing_channel_is_a_clear_exit() {
    for bad in ["abc", "0", "99999999999", "-3", ""] {
        let (code, err) = run_as_worker(bad);
        assert_eq!(code, 1, "CLUSTER_WORKER_ID={bad:?}: {err}");
        assert!(
            err.contains("not a valid worker id"),
            "CLUSTER_WORKER_ID={bad:?}: {err}"
        );
    }
    // A valid id but no channel on descriptor 3: never runs as a second primary.
    let (code, err) = run_as_worker("5");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a cluster channel"), "{err}");
}

#[test]
fn settings_are_cumulative_and_only_later_forks_see_them() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let dir = std::env::temp_dir();
    let dir = dir.canonicalize().unwrap();
    p.send("args alpha beta");
    p.wait_for("args", |l| l == "args set");
    p.send(&format!("cwd {}", dir.display()));
    p.wait_for("cwd", |l| l == "cwd set");
    p.send("fork");
    let pid2 = online(&mut p, 2);
    let _guard = KillOnDrop(vec![pid, pid2]);
    // The second change kept the first: worker 2 has both the arguments and the directory.
    p.send("send 2 where");
    let want = format!(
        r#"event message id=2 msg=Where {{ cwd: "{}", args: ["alpha", "beta"], uid: {} }} handle=false"#,
        dir.display(),
        nix::unistd::getuid().as_raw()
    );
    p.seen_or_wait("where 2", |l| l == want);
    // Worker 1 was forked before: its arguments are the primary's (none).
    p.send("send 1 where");
    p.seen_or_wait("where 1", |l| {
        l.starts_with("event message id=1 msg=Where {") && l.contains("args: []")
    });
}

#[test]
fn a_worker_panic_is_reported_as_its_last_error() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    let _guard = KillOnDrop(vec![pid]);
    p.send("send 1 panic");
    p.seen_or_wait("exit", |l| {
        l.starts_with("event exit id=1 status=101 dead=true ead=Some(false)")
    });
    wait_gone(pid);
}

#[test]
fn the_api_sets_the_worker_count() {
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    p.send("scale 3");
    p.seen_or_wait("scaled up", |l| l == "scaled forked=2");
    let pids = vec![pid, online(&mut p, 2), online(&mut p, 3)];
    let _guard = KillOnDrop(pids.clone());
    p.send("scale 1");
    p.seen_or_wait("scaled down", |l| l == "scaled forked=0");
    // The newest leave gracefully; the oldest stays.
    p.seen_or_wait("exit 3", |l| {
        l.starts_with("event exit id=3 status=0 dead=true ead=Some(true)")
    });
    p.seen_or_wait("exit 2", |l| {
        l.starts_with("event exit id=2 status=0 dead=true ead=Some(true)")
    });
    p.send("workers");
    p.wait_for("workers", |l| l.starts_with("workers 1:"));
    wait_gone(pids[1]);
    wait_gone(pids[2]);
}

#[test]
fn uid_and_gid_apply_to_later_forks() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: changing a worker's user needs root");
        return;
    }
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    p.send("uid 65534");
    p.wait_for("uid", |l| l == "uid set");
    p.send("fork");
    let pid2 = online(&mut p, 2);
    let _guard = KillOnDrop(vec![pid, pid2]);
    p.send("send 2 where");
    p.seen_or_wait("where 2", |l| {
        l.starts_with("event message id=2 msg=Where {") && l.contains("uid: 65534")
    });
    p.send("send 1 where");
    p.seen_or_wait("where 1", |l| {
        l.starts_with("event message id=1 msg=Where {") && l.contains("uid: 0 ")
    });
}

#[test]
fn a_uid_without_gid_gets_that_users_groups_never_roots() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: changing a worker's user needs root");
        return;
    }
    let nobody = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(65534))
        .unwrap()
        .expect("a user 65534 (nobody)");
    let mut p = fixture("1");
    let pid = online(&mut p, 1);
    p.send("uid_only 65534");
    p.wait_for("uid", |l| l == "uid set");
    p.send("fork");
    let pid2 = online(&mut p, 2);
    let _guard = KillOnDrop(vec![pid, pid2]);
    p.send("send 2 ids");
    let line = p.seen_or_wait("ids 2", |l| l.starts_with("event message id=2 msg=Ids {"));
    let gid = nobody.gid.as_raw();
    assert!(line.contains(&format!("gid: {gid},")), "{line}");
    assert!(line.contains("uid: 65534,"), "{line}");
    // Not root's group, primary or supplementary.
    let groups = line
        .split("groups: [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    assert!(
        !groups.split(", ").any(|g| g == "0"),
        "a worker under uid 65534 kept group 0: {line}"
    );
    // A uid with no passwd entry has no groups to take: the fork fails, and says what to do.
    assert!(
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(54321))
            .unwrap()
            .is_none()
    );
    p.send("uid_only 54321");
    p.seen_or_wait("uid", |l| l == "uid set");
    p.send("fork");
    let failed = p.wait_for("fork failed", |l| l.starts_with("fork failed"));
    assert!(
        failed.starts_with("fork failed kind=Spawn") && failed.contains("set `gid` too"),
        "{failed}"
    );
}

#[test]
fn a_handler_reads_the_state_of_its_event_even_after_it_awaits() {
    let mut p = Proc::start("fixture_moments", &[("CLUSTER_WORKERS", "1")]);
    let status = p.wait_exit();
    assert!(status.success(), "fixture failed: {}", p.stderr());
    let moments: Vec<&str> = p
        .seen
        .iter()
        .filter(|l| l.starts_with("moment "))
        .map(String::as_str)
        .collect();
    assert_eq!(
        moments,
        [
            "moment fork state=none",
            "moment online state=online",
            "moment listening state=listening",
            "moment disconnect state=disconnected",
            "moment exit state=dead",
        ],
        "in {:#?}",
        p.seen
    );
    assert!(p.seen.iter().any(|l| l == "now state=dead"));
}
