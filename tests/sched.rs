//! The time slice the worker asks the kernel for (`src/sched.rs`): every
//! thread of a worker runs with it, `--slice-us 0` keeps the kernel's
//! default, and a bridge's child never inherits it. Checked from
//! `/proc/PID/task/TID/sched` of real processes; on a kernel that shows no
//! `se.slice` or refuses custom slices (before 6.12), nothing can be checked
//! and the tests say so.

use std::io::{BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::WorkRequest;
use persistent_worker::sched;
use protobuf::Message;

const BIN: &str = env!("CARGO_BIN_EXE_persistent-worker");
const WAIT: Duration = Duration::from_secs(20);

/// The kernel's default slice, as a fresh thread of this process has it;
/// `None` (said on stderr) where custom slices cannot be checked.
fn default_slice() -> Option<u64> {
    let probe = std::thread::spawn(|| {
        let default = sched::current_slice()?;
        // A custom slice must be grantable, or nothing here is testable.
        sched::request_slice(Duration::from_micros(100)).ok()?;
        Some(default.as_nanos() as u64)
    });
    let default = probe.join().ok().flatten();
    if default.is_none() {
        eprintln!("\n*** this kernel shows or grants no custom time slice: not checked\n");
    }
    default
}

/// Each thread's slice, in ns, of process `pid`.
fn slices(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process is alive") {
        let task = task.expect("a task entry").path();
        let Ok(text) = std::fs::read_to_string(task.join("sched")) else {
            continue; // The thread ended meanwhile.
        };
        let slice = text
            .lines()
            .find(|l| l.trim_start().starts_with("se.slice"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|n| n.trim().parse().ok())
            .expect("se.slice in the thread's sched file");
        let tid = task
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        out.push((tid, slice));
    }
    out
}

/// Starts `persistent-worker ARGS` (Bazel protocol) and has it answer one
/// no-op request, so that everything it starts on the way has started.
fn serving(args: &[&str]) -> Child {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the worker starts");
    let mut request = WorkRequest::new();
    request.arguments = vec!["--noop".to_owned()];
    let bytes = request
        .write_length_delimited_to_bytes()
        .expect("the request encodes");
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(&bytes)
        .expect("the request is written");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let _ = tx.send(WireFormat::Proto.read_response(&mut reader, 1 << 20));
        // Keep the pipe open (and drained) while the test looks.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    match rx.recv_timeout(WAIT) {
        Ok(Ok(Some(response))) => assert_eq!(response.exit_code, 0, "{response:?}"),
        other => {
            let _ = child.kill();
            panic!("no answer to the no-op request: {other:?}");
        }
    }
    child
}

fn stop(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn every_thread_of_the_worker_runs_with_the_short_slice() {
    let Some(default) = default_slice() else {
        return;
    };
    let worker = serving(&["--persistent_worker", "--concurrency", "3"]);
    let seen = slices(worker.id());
    stop(worker);
    assert!(seen.len() > 2, "only {} thread(s): {seen:?}", seen.len());
    assert!(
        seen.iter().all(|&(_, s)| s == 100_000),
        "threads not at the 100 µs slice (default {default}): {seen:?}"
    );
}

#[test]
fn slice_zero_keeps_the_kernels_default() {
    let Some(default) = default_slice() else {
        return;
    };
    let worker = serving(&["--persistent_worker", "--slice-us", "0"]);
    let seen = slices(worker.id());
    stop(worker);
    assert!(
        seen.iter().all(|&(_, s)| s == default),
        "threads not at the default slice {default}: {seen:?}"
    );
}

#[test]
fn a_bridge_child_runs_with_the_kernels_default_slice() {
    let Some(default) = default_slice() else {
        return;
    };
    // The child is this same binary told to keep whatever slice it got.
    let bridge = serving(&[
        "--persistent_worker",
        "--bridge",
        "--",
        BIN,
        "--slice-us",
        "0",
    ]);
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{}/task", bridge.id()))
        .expect("the bridge is alive")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    let seen: Vec<_> = children.iter().flat_map(|&pid| slices(pid)).collect();
    let own = slices(bridge.id());
    stop(bridge);
    assert_eq!(children.len(), 1, "one child started: {children:?}");
    assert!(
        own.iter().all(|&(_, s)| s == 100_000),
        "bridge threads: {own:?}"
    );
    assert!(
        seen.iter().all(|&(_, s)| s == default),
        "the child's threads inherited the bridge's slice (default {default}): {seen:?}"
    );
}
