//! Faults: a tool that panics without end, stop signals under load, and the
//! death of the process that started the worker. The worker is the real
//! binary over real pipes and sockets.

mod common;
mod fault_support;

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use common::lines::Lines;
use common::{request, Worker, BIN, WAIT};
use fault_support::{alive, threads_and_rss};

/// Sends `count` panicking requests with at most `window` in flight and
/// checks that each id is answered exactly once, as an error.
fn panic_batch(worker: &mut Worker, first: i32, count: i32, window: i32) {
    let mut seen = HashSet::new();
    let mut next = first;
    let end = first + count;
    let mut outstanding = 0;
    while next < end || outstanding > 0 {
        while next < end && outstanding < window {
            worker.send(&request(next, &["--panic", &format!("out-{next}")]));
            next += 1;
            outstanding += 1;
        }
        let response = worker.recv();
        outstanding -= 1;
        assert!(
            (first..end).contains(&response.request_id),
            "unexpected id {}",
            response.request_id
        );
        assert!(
            seen.insert(response.request_id),
            "id {} answered twice",
            response.request_id
        );
        assert_ne!(response.exit_code, 0, "a panic must be an error");
        assert!(response.output.contains("panic"), "{:?}", response.output);
    }
    assert_eq!(seen.len(), count as usize);
}

/// 10,000 panics in a row: every one answered, no thread lost or leaked, and
/// memory flat. RSS is compared between 1,000 and 10,000 panics, after the
/// allocator and the panic machinery have warmed up; 1 MiB of slack covers
/// allocator fragmentation (steady runs move by under 100 KiB), while a
/// leak of 200 bytes per panic, 1,758 KiB over 9,000 panics, exceeds it.
#[test]
fn ten_thousand_panics_in_a_row_are_all_answered_with_flat_threads_and_rss() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "4"], dir.path());
    panic_batch(&mut worker, 1, 1_000, 64);
    let (threads_1k, rss_1k) = threads_and_rss(worker.pid());
    panic_batch(&mut worker, 1_001, 9_000, 64);
    let (threads_10k, rss_10k) = threads_and_rss(worker.pid());
    eprintln!("after 1k panics: {threads_1k} threads, {rss_1k} KiB; after 10k: {threads_10k} threads, {rss_10k} KiB");
    assert_eq!(threads_1k, threads_10k, "thread count changed");
    assert!(
        rss_10k <= rss_1k + 1024,
        "RSS grew from {rss_1k} KiB to {rss_10k} KiB"
    );
    // Still serving ordinary requests.
    worker.send(&request(20_000, &["fine.txt"]));
    let response = worker.recv();
    assert_eq!((response.request_id, response.exit_code), (20_000, 0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("fine.txt")).unwrap(),
        "fine.txt\n"
    );
}

/// SIGTERM with more requests accepted than threads, two of them in a tool
/// that ignores its cancellation: every accepted request is answered, as
/// cancelled, within the grace period, and the worker exits 0.
#[test]
fn bazel_sigterm_under_load_answers_every_accepted_request_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(500);
    let mut worker = Worker::start(
        &[
            "--concurrency",
            "4",
            "--verbose",
            "--shutdown-grace-ms",
            "500",
        ],
        dir.path(),
    );
    let ids: Vec<i32> = (1..=10).collect();
    for &id in &ids {
        let out = format!("out-{id}");
        let running = format!("TOOL-RUNNING-{id}");
        // Two stuck tools hold two of the four threads; the rest honour the
        // cancel, and four wait in the queue.
        let args: Vec<&str> = if id <= 2 {
            vec!["--print-stdout", &running, "--busy-ms", "60000", &out]
        } else {
            vec!["--work-ms", "60000", &out]
        };
        worker.send(&request(id, &args));
    }
    // The log line is written once a request is in the in-flight table,
    // which is what "accepted" means here; the stuck tools say they run (their
    // stdout goes to the log), or a SIGTERM that beat their pool threads
    // would stop them before they started.
    let deadline = Instant::now() + WAIT;
    while ![
        "request 10 started",
        "TOOL-RUNNING-1 (raw",
        "TOOL-RUNNING-2 (raw",
    ]
    .iter()
    .all(|line| worker.stderr().contains(line))
    {
        assert!(
            Instant::now() < deadline,
            "requests not accepted: {}",
            worker.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = Instant::now();
    // SAFETY: signals the worker this test started.
    unsafe { libc::kill(worker.pid(), libc::SIGTERM) };
    let mut answered = HashSet::new();
    for _ in &ids {
        let (at, response) = worker.recv_timed();
        assert!(response.was_cancelled, "{response:?}");
        assert!(answered.insert(response.request_id), "answered twice");
        assert!(
            at - sent < grace + Duration::from_secs(1),
            "request {} answered {:?} after SIGTERM",
            response.request_id,
            at - sent
        );
    }
    let status = worker
        .exited_within(grace + Duration::from_secs(2))
        .unwrap_or_else(|| panic!("worker still running: {}", worker.stderr()));
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    assert!(
        worker
            .stderr()
            .contains("answered 2 request(s) as cancelled"),
        "{}",
        worker.stderr()
    );
    for id in ids {
        assert!(!dir.path().join(format!("out-{id}")).exists());
    }
}

/// Writes `bytes` to `stdin` on a thread of its own and closes it; the
/// receiver has the result, so a worker that stops reading is waited for
/// with a bound.
fn write_then_close(
    mut stdin: std::process::ChildStdin,
    bytes: Vec<u8>,
) -> Receiver<std::io::Result<()>> {
    use std::io::Write;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(stdin.write_all(&bytes));
    });
    rx
}

/// Waits up to `limit` for process `pid` (not necessarily our child) to
/// exit, woken by the kernel through a pidfd rather than by polling.
/// Returns whether it exited in time.
fn exits_within(pid: i32, limit: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ESRCH),
            "pidfd_open({pid}): {e}"
        );
        return true;
    }
    let deadline = Instant::now() + limit;
    let readable = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut poll, 1, left.as_millis() as i32) };
        if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break n > 0;
        }
    };
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    readable
}

/// Starts the worker under an intermediate shell, waits for the worker's
/// `ready` log line (written after it asked to be told of its parent's
/// death), kills the shell, and requires the worker gone within a second,
/// saying why. The test holds the worker's stdin open throughout, so the
/// end of its input cannot be what ends it.
fn worker_dies_with_its_parent(script: &str, ready: &str, dir: &Path) {
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(BIN)
        .current_dir(dir)
        .env_remove("WORKER_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn sh");
    // Taken out of `shell`, whose `wait` would otherwise close it.
    let held_stdin = shell.stdin.take().expect("stdin pipe");
    let mut stdout = Lines::of(vec![Box::new(shell.stdout.take().unwrap())]);
    let mut stderr = Lines::of(vec![Box::new(shell.stderr.take().unwrap())]);
    let line = stdout
        .next_line(WAIT)
        .unwrap_or_else(|e| panic!("no pid from the shell within {WAIT:?}: {e}"));
    let pid: i32 = line.trim().parse().expect("pid from the shell");
    stderr.expect_line(ready, WAIT);
    assert!(alive(pid), "worker exited on its own: {}", stderr.text());
    let parent = shell.id();
    shell.kill().expect("kill the parent");
    let _ = shell.wait();
    let killed = Instant::now();
    let gone = exits_within(pid, Duration::from_secs(5));
    let gone_after = killed.elapsed();
    if !gone {
        // SAFETY: the worker this test started; it has not exited, so the
        // pid is still its own.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        gone && gone_after < Duration::from_secs(1),
        "worker {} {gone_after:?} after its parent was killed; log:\n{}",
        if gone { "exited" } else { "still running" },
        stderr.text()
    );
    // The worker's exit closes the last copy of stderr.
    let said = format!("persistent-worker: parent process {parent} exited; stopping");
    stderr.expect_line(&said, WAIT);
    drop(held_stdin);
}

#[test]
fn bazel_worker_exits_within_a_second_of_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    // fd 3 passes the test's pipe on as the worker's stdin: a background
    // job's stdin is /dev/null before its redirections.
    worker_dies_with_its_parent(
        r#"exec 3<&0; "$1" --persistent_worker <&3 & echo $!; wait"#,
        "persistent-worker: Bazel worker (",
        dir.path(),
    );
}

#[test]
fn buck2_worker_exits_within_a_second_of_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    worker_dies_with_its_parent(
        r#"WORKER_SOCKET="$PWD/worker.sock" "$1" & echo $!; wait"#,
        "Buck2 worker listening on",
        dir.path(),
    );
}

/// A full disk is the tool's error, answered as such; the worker goes on.
#[test]
fn output_on_a_full_device_is_a_clear_error_response() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    worker.send(&request(1, &["/dev/full"]));
    let response = worker.recv();
    assert_eq!(response.exit_code, 1, "{}", response.output);
    assert!(
        response.output.contains("cannot write /dev/full") && response.output.contains("space"),
        "{}",
        response.output
    );
    worker.send(&request(2, &["after.txt"]));
    assert_eq!(worker.recv().exit_code, 0);
    worker.finish_cleanly();
}

/// The client stops reading (EPIPE): one log line, no partial frame, no panic
/// storm, and a clean exit at the end of input.
#[test]
fn a_closed_stdout_is_logged_once_and_the_worker_exits_cleanly() {
    use persistent_worker::bazel::WireFormat;
    use std::io::Read;

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--persistent_worker", "--concurrency", "4"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    drop(child.stdout.take());
    let stdin = child.stdin.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = done_tx.send(text);
    });
    let input: Vec<u8> = (1..=100)
        .flat_map(|id| WireFormat::Proto.encode_request(&request(id, &[&format!("out-{id}")])))
        .collect();
    let written = write_then_close(stdin, input);
    let mut process = common::Watched::new(child);
    let Some(status) = process.exited_within(WAIT) else {
        process.kill();
        panic!("worker did not exit within {WAIT:?} of the end of its input");
    };
    let log = done
        .recv_timeout(WAIT)
        .expect("stderr still open after exit");
    written
        .recv_timeout(WAIT)
        .expect("the writer thread ended")
        .expect("the worker read all its input");
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(
        log.matches("cannot write response").count(),
        1,
        "one line for the broken pipe: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// Cancels `id`, whose tool hangs, and requires the cancelled answer within
/// the pool's cancel grace plus scheduling slack.
fn cancel_hung(worker: &mut Worker, id: i32) {
    let sent = Instant::now();
    worker.send(&common::cancel(id));
    let (at, response) = worker.recv_timed();
    assert_eq!(response.request_id, id, "{response:?}");
    assert!(response.was_cancelled, "{response:?}");
    let limit = persistent_worker::pool::CANCEL_GRACE + Duration::from_secs(1);
    assert!(
        at - sent < limit,
        "cancel of {id} answered after {:?}",
        at - sent
    );
}

/// A tool that never returns and ignores its token: the Bazel cancel is still
/// answered, the stuck thread is reported once, the free thread keeps
/// serving, and once every thread is stuck the log says requests queue.
#[test]
fn a_tool_that_never_returns_is_answered_on_cancel_and_its_thread_reported_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "2"], dir.path());
    worker.send(&request(1, &["--hang", "h1"]));
    worker.wait_for_log("demo: hanging in h1");
    cancel_hung(&mut worker, 1);
    worker.wait_for_log("is stuck: request 1 has run");
    assert!(
        worker.stderr().contains("(1 of 2 thread(s) stuck)"),
        "{}",
        worker.stderr()
    );

    // The other thread is free and serves.
    worker.send(&request(2, &["ok.txt"]));
    let response = worker.recv();
    assert_eq!((response.request_id, response.exit_code), (2, 0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ok.txt")).unwrap(),
        "ok.txt\n"
    );

    worker.send(&request(3, &["--hang", "h3"]));
    worker.wait_for_log("demo: hanging in h3");
    cancel_hung(&mut worker, 3);
    worker.wait_for_log("all 2 pool thread(s) are stuck");

    // No thread left: the request queues, says so, and a cancel still
    // answers it.
    worker.send(&request(4, &["queued.txt"]));
    worker.wait_for_log("request 4 queued: all 2 pool thread(s) are stuck");
    cancel_hung(&mut worker, 4);
    assert!(!dir.path().join("queued.txt").exists());

    let log = worker.stderr();
    for id in [1, 3] {
        assert_eq!(
            log.matches(&format!("is stuck: request {id} has run"))
                .count(),
            1,
            "one stuck report per request: {log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
}

/// A singleplex tool that never returns and ignores its token, on the
/// thread that read it (the first request always runs there): its cancel is
/// still read and answered, the worker serves on, and at the end of input it
/// exits, leaving the thread behind instead of waiting for it.
#[test]
fn a_singleplex_tool_that_never_returns_does_not_keep_the_worker_from_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    worker.send(&request(0, &["--hang", "h0"]));
    worker.wait_for_log("demo: hanging in h0");
    cancel_hung(&mut worker, 0);
    worker.wait_for_log("has held the reading thread");
    worker.wait_for_log("is stuck: request 0 has run");
    worker.send(&request(0, &["after.txt"]));
    let response = worker.recv();
    assert_eq!((response.request_id, response.exit_code), (0, 0));
    let (status, rest, log) = worker.finish();
    assert!(
        status.success() && rest.is_empty(),
        "{status:?} {rest:?}\n{log}"
    );
    assert!(
        log.contains("end of input; leaving 1 stuck thread(s) behind"),
        "{log}"
    );
}

/// Runs the Bazel worker with `prepare` applied in the child before exec,
/// sends `requests` and closes stdin, and returns the decoded responses and
/// the exit status, all within a bounded wait.
fn run_with_fds(
    program: &Path,
    args: &[&str],
    dir: &Path,
    stderr: Stdio,
    prepare: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    requests: &[persistent_worker::proto::worker_protocol::WorkRequest],
) -> (
    std::process::ExitStatus,
    Vec<persistent_worker::proto::worker_protocol::WorkResponse>,
) {
    use persistent_worker::bazel::WireFormat;
    use std::io::Read;

    let mut command = Command::new(program);
    command
        .args(args)
        .arg("--persistent_worker")
        .current_dir(dir)
        .env_remove("WORKER_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr);
    // SAFETY: the closure only makes async-signal-safe calls.
    unsafe { command.pre_exec(prepare) };
    let mut child = command.spawn().expect("spawn worker");
    // Nothing else reads the child's stderr: a dropped pipe end makes
    // its writes fail with EPIPE.
    drop(child.stderr.take());
    let mut stdout = child.stdout.take().unwrap();
    let (out_tx, out_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        let _ = out_tx.send(bytes);
    });
    let input: Vec<u8> = requests
        .iter()
        .flat_map(|r| WireFormat::Proto.encode_request(r))
        .collect();
    let written = write_then_close(child.stdin.take().unwrap(), input);
    let mut process = common::Watched::new(child);
    let Ok(bytes) = out_rx.recv_timeout(WAIT) else {
        process.kill();
        panic!("the worker never closed its output");
    };
    let Some(status) = process.exited_within(WAIT) else {
        process.kill();
        panic!("the worker closed its output but did not exit within {WAIT:?}");
    };
    written
        .recv_timeout(WAIT)
        .expect("the writer thread ended")
        .expect("the worker read all its input");
    let mut reader = &bytes[..];
    let mut responses = Vec::new();
    while let Some(r) = WireFormat::Proto
        .read_response(&mut reader, 1 << 20)
        .expect("well-formed frames")
    {
        responses.push(r);
    }
    (status, responses)
}

/// `stray` adds a print to stdout, which the worker points at stderr.
fn closed_fd_requests(stray: bool) -> Vec<persistent_worker::proto::worker_protocol::WorkRequest> {
    let second: &[&str] = if stray {
        &["--print-stdout", "stray", "b.txt"]
    } else {
        &["b.txt"]
    };
    vec![
        request(1, &["a.txt"]),
        request(2, second),
        request(3, &["--panic", "c.txt"]),
        request(4, &["d.txt"]),
    ]
}

fn check_closed_fd_run(
    dir: &Path,
    status: std::process::ExitStatus,
    mut responses: Vec<persistent_worker::proto::worker_protocol::WorkResponse>,
) {
    assert_eq!(status.code(), Some(0), "{responses:?}");
    responses.sort_by_key(|r| r.request_id);
    let codes: Vec<(i32, i32)> = responses
        .iter()
        .map(|r| (r.request_id, r.exit_code))
        .collect();
    assert_eq!(codes, [(1, 0), (2, 0), (3, 1), (4, 0)], "{responses:?}");
    for name in ["a.txt", "b.txt", "d.txt"] {
        assert_eq!(
            std::fs::read_to_string(dir.join(name)).unwrap(),
            format!("{name}\n")
        );
    }
}

/// Started with fd 2 closed, the worker still logs (into nothing), keeps a
/// stray print off the protocol stream, and answers every request.
#[test]
fn a_worker_started_with_stderr_closed_answers_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let (status, responses) = run_with_fds(
        Path::new(BIN),
        &["--concurrency", "2", "--verbose"],
        dir.path(),
        Stdio::null(),
        || {
            // SAFETY: closing a descriptor is async-signal-safe.
            unsafe { libc::close(2) };
            Ok(())
        },
        &closed_fd_requests(true),
    );
    check_closed_fd_run(dir.path(), status, responses);
}

/// A log reader that went away (EPIPE on every log line) must not panic the
/// threads that answer requests. (A tool's own `println!` would still panic
/// inside its handler, as it would anywhere; that is the tool's error.)
#[test]
fn a_worker_whose_stderr_reader_is_gone_answers_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let (status, responses) = run_with_fds(
        Path::new(BIN),
        &["--concurrency", "2", "--verbose"],
        dir.path(),
        Stdio::piped(),
        || Ok(()),
        &closed_fd_requests(false),
    );
    check_closed_fd_run(dir.path(), status, responses);
}

/// An output in a read-only directory is the tool's error, answered with the
/// path and the reason; the next request is served. As root the permission
/// bits do not bind, so the worker then runs as `nobody`.
#[test]
fn output_in_a_read_only_directory_is_a_clear_error_response() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // SAFETY: reads the test's own effective uid.
    let root = unsafe { libc::geteuid() } == 0;
    // As `nobody` the build directory may be out of reach (a checkout under
    // a private directory): the worker runs from a copy in the open one.
    let program = dir.path().join("persistent-worker");
    std::fs::copy(BIN, &program).unwrap();
    let (status, mut responses) = run_with_fds(
        &program,
        &[],
        dir.path(),
        Stdio::null(),
        move || {
            if root {
                // SAFETY: async-signal-safe calls in the child before exec.
                unsafe {
                    if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        },
        &[request(1, &["ro/out.txt"]), request(2, &["fine.txt"])],
    );
    assert_eq!(status.code(), Some(0), "{responses:?}");
    responses.sort_by_key(|r| r.request_id);
    assert_eq!(responses.len(), 2, "{responses:?}");
    let failed = &responses[0];
    assert_eq!(failed.exit_code, 1, "{failed:?}");
    assert!(
        failed.output.contains("cannot write")
            && failed.output.contains("ro/out.txt")
            && failed.output.contains("Permission denied"),
        "{}",
        failed.output
    );
    assert!(!failed.output.contains("panicked"), "{}", failed.output);
    assert!(!ro.join("out.txt").exists());
    assert_eq!(responses[1].exit_code, 0, "{:?}", responses[1]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("fine.txt")).unwrap(),
        "fine.txt\n"
    );
}
