//! The bridge end to end: `persistent-worker --bridge -- CMD...` as a real
//! process in front of real child workers (the crate's own binary, scripted
//! faulty workers, a Node program on npm's `@bazel/worker`), driven through
//! the Buck2 front end by a grpcio client and `worker-client`, and through the
//! Bazel front end.

mod client_support;
mod common;
mod grpc_support;
mod node_support;
use common::buck2::Buck2Worker;
use grpc_support::{env, wait, within};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use grpcio::{CallOption, WriteFlags};
use persistent_worker::bazel::WireFormat;
use persistent_worker::buck2::service::{self, Connection, EXECUTE, EXECUTE_STREAM};
use persistent_worker::proto::worker::{ExecuteCommand, ExecuteCommandStream, ExecuteResponse};
use persistent_worker::proto::worker_protocol::WorkRequest;

const BIN: &str = env!("CARGO_BIN_EXE_persistent-worker");

fn testdata(name: &str) -> String {
    format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Processes (other than `except`) whose working directory is `dir`: each
/// test runs its bridge in a fresh directory, and children inherit it, so
/// this finds the children even after the bridge is gone.
fn processes_in(dir: &Path, except: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid != except && std::fs::read_link(entry.path().join("cwd")).is_ok_and(|c| c == dir) {
            found.push(pid);
        }
    }
    found
}

/// Waits until no process but `except` runs in `dir`. Any left at the
/// limit are this test's own (they run in its fresh directory): they are
/// killed before the test fails, so they do not outlive it.
fn expect_no_processes_in(dir: &Path, except: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left = processes_in(dir, except);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let described: Vec<String> = left
                .iter()
                .map(|pid| {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    format!(
                        "{pid} {}",
                        String::from_utf8_lossy(&cmdline).replace('\0', " ")
                    )
                })
                .collect();
            for pid in &left {
                // SAFETY: a process of this test, seen just now.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
            panic!(
                "processes still running in {}: {described:?}",
                dir.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a shell script into `dir` and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A JSON-protocol worker that answers nothing and ends only by SIGKILL:
/// it ignores SIGHUP, SIGINT and SIGTERM, and the end of its input.
const STUBBORN: &str = r#"trap '' HUP INT TERM
while IFS= read -r line; do :; done
while :; do sleep 1; done
"#;

/// A JSON-protocol worker that answers every request, then, at the end of
/// its input, ignores it and SIGHUP, SIGINT and SIGTERM: only SIGKILL ends
/// it.
const ANSWERS_THEN_STAYS: &str = r#"trap '' HUP INT TERM
while IFS= read -r line; do
  printf '{"exitCode":0,"output":"stays %s\\n"}\n' "$$"
done
while :; do sleep 1; done
"#;

/// A JSON-protocol worker whose requests wait (at most 10 s) for the file
/// `$1/go`, and which marks `$1/ended.PID` once its input has ended, so a
/// test can tell an orderly end from a kill.
const ENDS_AT_EOF: &str = r#"marks=$1
while IFS= read -r line; do
  i=0
  while [ ! -e "$marks/go" ] && [ "$i" -lt 1000 ]; do sleep 0.01; i=$((i+1)); done
  code=1
  [ -e "$marks/go" ] && code=0
  printf '{"exitCode":%d,"output":"orderly worker %s answered\\n"}\n' "$code" "$$"
done
: > "$marks/ended.$$"
"#;

/// A JSON-protocol worker that expands nothing: it answers with the request
/// line it was sent, and fails any request with an argument starting `@`.
const ECHO: &str = r#"while IFS= read -r line; do
  code=0
  case "$line" in *'"@'*) code=3 ;; esac
  text=$(printf '%s' "$line" | sed 's/\\/\\\\/g; s/"/\\"/g')
  printf '{"exitCode":%d,"output":"child got %s\\n"}\n' "$code" "$text"
done
"#;

/// The pid in a "bridge: started child pid N: ..." line.
fn started_pid(line: &str) -> u32 {
    line.split("started child pid ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

fn pid_alive(pid: u32) -> bool {
    // A zombie has no cwd link; a reaped process has no directory.
    std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok()
}

/// A bridge serving Buck2 on a socket, its stderr read line by line.
/// A bridge in its own directory, where its children run too.
struct Bridge {
    worker: Buck2Worker,
    dir: PathBuf,
}

impl Bridge {
    /// `args` are the bridge's options; `command` the child's.
    fn start(dir: &Path, args: &[&str], command: &[&str]) -> Bridge {
        let mut all = args.to_vec();
        all.extend(["--bridge", "--"]);
        all.extend(command);
        Bridge {
            worker: Buck2Worker::start(dir, &all),
            dir: dir.to_path_buf(),
        }
    }

    fn expect_line(&mut self, needle: &str, limit: Duration) -> String {
        self.worker.expect_line(needle, limit)
    }

    fn expect_lines(&mut self, needle: &str, count: usize, limit: Duration) -> String {
        self.worker.expect_lines(needle, count, limit)
    }

    fn connect(&self) -> Connection {
        service::connect(env(), self.worker.socket()).expect("connecting")
    }

    fn children(&self) -> Vec<u32> {
        processes_in(&self.dir, self.worker.pid())
    }

    fn signal(&self, signal: i32) {
        self.worker.signal(signal);
    }

    fn finish(self, limit: Duration) -> (std::process::ExitStatus, Vec<String>) {
        self.worker.finish(limit)
    }
}

fn command(argv: &[&str]) -> ExecuteCommand {
    let mut c = ExecuteCommand::new();
    c.argv = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
    c
}

fn opt() -> CallOption {
    CallOption::default().timeout(Duration::from_secs(30))
}

fn execute(conn: &Connection, c: &ExecuteCommand) -> ExecuteResponse {
    conn.client()
        .unary_call(&EXECUTE, c, opt())
        .expect("Execute call")
}

/// Sends `requests` on one ExecuteStream call at once and returns the
/// responses by id.
fn execute_stream(conn: &Connection, requests: &[ExecuteCommand]) -> Vec<ExecuteResponse> {
    let (mut tx, mut rx) = conn
        .client()
        .duplex_streaming(&EXECUTE_STREAM, opt())
        .unwrap();
    for (id, request) in requests.iter().enumerate() {
        let mut m = ExecuteCommandStream::new();
        m.id = id as u64;
        m.request = protobuf::MessageField::some(request.clone());
        wait(
            Box::pin(tx.send((m, WriteFlags::default()))),
            Duration::from_secs(10),
        )
        .unwrap();
    }
    wait(Box::pin(tx.close()), Duration::from_secs(10)).unwrap();
    let mut responses = vec![None; requests.len()];
    while let Some(message) = wait(rx.next(), Duration::from_secs(30)) {
        let message = message.unwrap();
        responses[message.id as usize] = message.response.into_option();
    }
    responses
        .into_iter()
        .map(|r| r.expect("a response for every id"))
        .collect()
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    (d, dir)
}

/// The demo tool's own binary as the child, in both framings.
#[test]
fn singleplex_children_of_either_protocol_write_files_and_relay_stderr() {
    within(Duration::from_secs(60), || {
        for protocol in ["proto", "json"] {
            let (_d, dir) = tempdir();
            std::fs::write(dir.join("args"), "--work-ms\n0\nsub/from-argfile\n").unwrap();
            std::fs::create_dir(dir.join("sub")).unwrap();
            let mut bridge = Bridge::start(
                &dir,
                &["--concurrency", "2", "--child-protocol", protocol],
                &[BIN, "--worker-protocol", protocol],
            );
            let conn = bridge.connect();
            let response = execute(&conn, &command(&["out.txt"]));
            assert_eq!(response.exit_code, 0, "{protocol}: {}", response.stderr);
            assert!(
                response.stderr.contains("demo: wrote out.txt"),
                "{protocol}: {}",
                response.stderr
            );
            // Without --verbose the bridge adds nothing of its own.
            assert!(!response.stderr.contains("bridge:"), "{}", response.stderr);
            assert_eq!(
                std::fs::read_to_string(dir.join("out.txt")).unwrap(),
                "out.txt\n"
            );
            // An argfile works end to end (this child could expand it
            // itself; `the_bridge_expands_argfiles...` shows the bridge does).
            let response = execute(&conn, &command(&["@args"]));
            assert_eq!(response.exit_code, 0, "{protocol}: {}", response.stderr);
            assert_eq!(
                std::fs::read_to_string(dir.join("sub/from-argfile")).unwrap(),
                "from-argfile\n"
            );
            // A failing request is the child's answer, not a fault.
            let response = execute(&conn, &command(&["a", "b"]));
            assert_eq!(response.exit_code, 2, "{}", response.stderr);
            assert!(response.stderr.contains("exactly one OUTFILE"));
            let children = bridge.children();
            assert_eq!(children.len(), 1, "one child served all: {children:?}");
            // The child's stderr reaches the bridge's, prefixed by its pid.
            bridge.expect_line(
                &format!("[child {}] persistent-worker: Bazel worker", children[0]),
                Duration::from_secs(10),
            );
        }
    });
}

#[test]
fn four_singleplex_children_serve_four_requests_at_once() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let marks = dir.join("marks");
        std::fs::create_dir(&marks).unwrap();
        let barrier = testdata("bridge/barrier.sh");
        let bridge = Bridge::start(
            &dir,
            &["--concurrency", "4", "--child-protocol", "json"],
            &["sh", &barrier, marks.to_str().unwrap(), "4"],
        );
        let requests: Vec<_> = (0..4).map(|i| command(&[&format!("r{i}")])).collect();
        let responses = execute_stream(&bridge.connect(), &requests);
        let mut spans = Vec::new();
        let mut pids = Vec::new();
        for response in &responses {
            assert_eq!(response.exit_code, 0, "{}", response.stderr);
            // "pid P start S end E arrived N"
            let words: Vec<&str> = response.stderr.split_whitespace().collect();
            let field = |name: &str| {
                let at = words.iter().position(|w| *w == name).unwrap();
                words[at + 1].parse::<u128>().unwrap()
            };
            pids.push(field("pid"));
            spans.push((field("start"), field("end")));
        }
        pids.sort();
        pids.dedup();
        assert_eq!(pids.len(), 4, "four distinct children: {pids:?}");
        // Every request started before any ended: all four ran at once.
        let latest_start = spans.iter().map(|s| s.0).max().unwrap();
        let earliest_end = spans.iter().map(|s| s.1).min().unwrap();
        assert!(latest_start <= earliest_end, "{spans:?}");
    });
}

#[test]
fn a_multiplex_child_of_either_protocol_serves_every_request() {
    within(Duration::from_secs(60), || {
        for protocol in ["proto", "json"] {
            let (_d, dir) = tempdir();
            let mut bridge = Bridge::start(
                &dir,
                &[
                    "--concurrency",
                    "4",
                    "--multiplex",
                    "--verbose",
                    "--child-protocol",
                    protocol,
                ],
                &[
                    BIN,
                    "--verbose",
                    "--concurrency",
                    "4",
                    "--worker-protocol",
                    protocol,
                ],
            );
            // Each request waits at a barrier until all four run in the
            // child at once: answered one at a time, they fail.
            std::fs::create_dir(dir.join("bar")).unwrap();
            let requests: Vec<_> = (0..4)
                .map(|i| command(&["--barrier", "4", &format!("bar/m{i}")]))
                .collect();
            let responses = execute_stream(&bridge.connect(), &requests);
            let children = bridge.children();
            assert_eq!(children.len(), 1, "{children:?}");
            for (i, response) in responses.iter().enumerate() {
                assert_eq!(response.exit_code, 0, "{}", response.stderr);
                assert!(
                    response
                        .stderr
                        .contains(&format!("answered by child pid {}", children[0])),
                    "{}",
                    response.stderr
                );
                assert_eq!(
                    std::fs::read_to_string(dir.join(format!("bar/m{i}"))).unwrap(),
                    format!("m{i}\n")
                );
            }
            // Non-zero, distinct ids on the wire.
            let mut ids = Vec::new();
            for _ in 0..4 {
                let line = bridge.expect_line("input(s), verbosity", Duration::from_secs(10));
                let id: i32 = line
                    .split("worker: request ")
                    .nth(1)
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|id| id.parse().ok())
                    .unwrap_or_else(|| panic!("{line}"));
                ids.push(id);
            }
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 4, "{ids:?}");
            assert!(ids.iter().all(|id| *id > 0), "{ids:?}");
            // Buck2's env picks a child of its own; --verbose names its key.
            let mut c = command(&["e"]);
            let mut entry =
                persistent_worker::proto::worker::execute_command::EnvironmentEntry::new();
            entry.key = b"K".to_vec();
            entry.value = b"v".to_vec();
            c.env.push(entry);
            assert_eq!(execute(&bridge.connect(), &c).exit_code, 0);
            bridge.expect_line(" (1 var))", Duration::from_secs(10));
        }
    });
}

#[test]
fn a_dropped_call_cancels_in_a_multiplex_child() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let mut bridge = Bridge::start(
            &dir,
            &["--concurrency", "2", "--multiplex", "--verbose"],
            &[BIN, "--verbose"],
        );
        let conn = bridge.connect();
        let mut call = conn
            .client()
            .unary_call_async(&EXECUTE, &command(&["--work-ms", "60000", "never"]), opt())
            .unwrap();
        bridge.expect_line("Execute #0 started", Duration::from_secs(10));
        bridge.expect_line("worker: request 1: ", Duration::from_secs(10));
        call.cancel();
        drop(call);
        bridge.expect_line("worker: request 1 (cancel)", Duration::from_secs(10));
        bridge.expect_line("Execute #0 finished", Duration::from_secs(10));
        let pid = bridge.children();
        // The child survives a cancel and serves the next request.
        let response = execute(&conn, &command(&["after"]));
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        assert_eq!(bridge.children(), pid);
        assert!(!dir.join("never").exists());
    });
}

#[test]
fn a_cancelled_singleplex_child_is_killed_and_replaced() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let mut bridge = Bridge::start(
            &dir,
            &[
                "--concurrency",
                "1",
                "--verbose",
                "--cancel-grace-ms",
                "100",
            ],
            &[BIN],
        );
        let conn = bridge.connect();
        let mut call = conn
            .client()
            .unary_call_async(&EXECUTE, &command(&["--work-ms", "60000", "never"]), opt())
            .unwrap();
        bridge.expect_line("Execute #0 started", Duration::from_secs(10));
        let started = bridge.expect_line("bridge: started child pid", Duration::from_secs(10));
        let first: u32 = started
            .split_whitespace()
            .nth(4)
            .and_then(|p| p.trim_end_matches(':').parse().ok())
            .unwrap_or_else(|| panic!("{started}"));
        call.cancel();
        drop(call);
        bridge.expect_line("Execute #0 finished", Duration::from_secs(10));
        assert!(!pid_alive(first), "child {first} still runs");
        let response = execute(&conn, &command(&["after"]));
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        let children = bridge.children();
        assert_eq!(children.len(), 1);
        assert_ne!(children[0], first, "a new child");
        assert!(!dir.join("never").exists());
    });
}

#[test]
fn a_timeout_kills_the_child_and_answers_timed_out() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let bridge = Bridge::start(&dir, &["--concurrency", "1"], &[BIN]);
        let conn = bridge.connect();
        assert_eq!(execute(&conn, &command(&["warm"])).exit_code, 0);
        let first = bridge.children();
        let mut c = command(&["--work-ms", "60000", "slow"]);
        c.timeout_s = Some(1);
        let response = execute(&conn, &c);
        assert_eq!(response.timed_out_after_s, Some(1), "{}", response.stderr);
        assert_ne!(response.exit_code, 0);
        assert!(response.stderr.contains("killed"), "{}", response.stderr);
        assert!(!pid_alive(first[0]));
        let response = execute(&conn, &command(&["after"]));
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        assert!(!dir.join("slow").exists());
    });
}

#[test]
fn faults_name_the_child_and_its_stderr_and_the_child_is_replaced() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let faulty = testdata("bridge/faulty.sh");
        let starts = dir.join("starts");
        let bridge = Bridge::start(
            &dir,
            &["--concurrency", "1", "--child-protocol", "json"],
            &["sh", &faulty, starts.to_str().unwrap()],
        );
        let conn = bridge.connect();
        let ok = execute(&conn, &command(&["fine"]));
        assert_eq!(ok.exit_code, 0, "{}", ok.stderr);
        for (request, says) in [
            ("crash", "exited with status 3"),
            ("garbage", "not a response"),
            ("wrong-id", "answered request id 99, which it was not asked"),
        ] {
            let response = execute(&conn, &command(&[request]));
            assert_ne!(response.exit_code, 0, "{request}: {}", response.stderr);
            for needle in [says, faulty.as_str(), "faulty worker"] {
                assert!(
                    response.stderr.contains(needle),
                    "{request}: no {needle:?} in {}",
                    response.stderr
                );
            }
            if request == "crash" {
                assert!(response.stderr.contains("crashing on purpose"));
            }
            let after = execute(&conn, &command(&["fine"]));
            assert_eq!(after.exit_code, 0, "after {request}: {}", after.stderr);
        }
        let started = std::fs::read_to_string(&starts).unwrap().lines().count();
        assert_eq!(started, 4, "one child, then one per fault");
    });
}

#[test]
fn a_child_that_cannot_start_fails_fast_after_three_tries() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let starts = dir.join("starts");
        let script = format!(
            "echo start >> {}; echo 'broken worker: missing config' >&2; exit 7",
            starts.display()
        );
        let bridge = Bridge::start(&dir, &["--concurrency", "1"], &["sh", "-c", &script]);
        let conn = bridge.connect();
        for _ in 0..3 {
            let response = execute(&conn, &command(&["x"]));
            assert_ne!(response.exit_code, 0);
            assert!(
                response.stderr.contains("exited with status 7")
                    && response.stderr.contains("broken worker: missing config"),
                "{}",
                response.stderr
            );
        }
        for _ in 0..3 {
            let response = execute(&conn, &command(&["x"]));
            assert_ne!(response.exit_code, 0);
            assert!(
                response.stderr.contains("failed to start 3 times in a row")
                    && response.stderr.contains("missing config"),
                "{}",
                response.stderr
            );
        }
        let started = std::fs::read_to_string(&starts).unwrap().lines().count();
        assert_eq!(started, 3, "no child started after the third failure");

        // A command that does not exist at all.
        let (_d2, dir2) = tempdir();
        let bridge = Bridge::start(&dir2, &[], &["/nonexistent/worker"]);
        let response = execute(&bridge.connect(), &command(&["x"]));
        assert_ne!(response.exit_code, 0);
        assert!(
            response
                .stderr
                .contains("cannot start child `/nonexistent/worker"),
            "{}",
            response.stderr
        );
    });
}

/// Two requests are in flight when SIGTERM comes, held there until the
/// test lets them go; they are answered, and then every child ends in good
/// order: it sees the end of its input and marks that it did. A bridge that
/// killed its children, or left them to the parent-death signal, fails.
#[test]
fn sigterm_lets_requests_in_flight_finish_then_ends_the_children() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let marks = dir.join("marks");
        std::fs::create_dir(&marks).unwrap();
        let worker = script(&dir, "orderly.sh", ENDS_AT_EOF);
        let mut bridge = Bridge::start(
            &dir,
            &[
                "--concurrency",
                "2",
                "--verbose",
                "--child-protocol",
                "json",
                "--shutdown-grace-ms",
                "20000",
            ],
            &["sh", &worker, marks.to_str().unwrap()],
        );
        let conn = bridge.connect();
        let calls: Vec<_> = (0..2)
            .map(|i| {
                conn.client()
                    .unary_call_async(&EXECUTE, &command(&[&format!("t{i}")]), opt())
                    .unwrap()
            })
            .collect();
        bridge.expect_line("Execute #0 started", Duration::from_secs(10));
        bridge.expect_line("Execute #1 started", Duration::from_secs(10));
        // Children start lazily, after the request's "started" line.
        let mut pids: Vec<u32> = (1..=2)
            .map(|n| {
                started_pid(&bridge.expect_lines(
                    "bridge: started child pid",
                    n,
                    Duration::from_secs(10),
                ))
            })
            .collect();
        pids.sort();
        pids.dedup();
        assert_eq!(pids.len(), 2, "{pids:?}");
        bridge.signal(libc::SIGTERM);
        bridge.expect_line("SIGTERM", Duration::from_secs(10));
        std::fs::write(marks.join("go"), "").unwrap();
        for call in calls {
            let response = wait(call, Duration::from_secs(20)).unwrap();
            assert_eq!(response.exit_code, 0, "{}", response.stderr);
            assert!(response.stderr.contains("answered"), "{}", response.stderr);
        }
        let dir = bridge.dir.clone();
        let (status, log) = bridge.finish(Duration::from_secs(20));
        assert!(status.success(), "{status:?}");
        for pid in pids {
            assert!(
                marks.join(format!("ended.{pid}")).exists(),
                "child {pid} did not see the end of its input; log:\n{}",
                log.join("\n")
            );
        }
        expect_no_processes_in(&dir, 0, Duration::from_secs(5));
    });
}

/// A child that outstays the end of its input is killed after the bound, and
/// the log says so.
#[test]
fn sigterm_kills_a_child_that_ignores_the_end_of_its_input() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let worker = script(&dir, "stays.sh", ANSWERS_THEN_STAYS);
        let mut bridge = Bridge::start(
            &dir,
            &[
                "--concurrency",
                "1",
                "--verbose",
                "--child-protocol",
                "json",
            ],
            &["sh", &worker],
        );
        let response = execute(&bridge.connect(), &command(&["x"]));
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        let pid =
            started_pid(&bridge.expect_line("bridge: started child pid", Duration::from_secs(10)));
        bridge.signal(libc::SIGTERM);
        bridge.expect_line(
            &format!("bridge: child pid {pid} did not exit within"),
            Duration::from_secs(10),
        );
        let dir = bridge.dir.clone();
        let (status, _) = bridge.finish(Duration::from_secs(20));
        assert!(status.success(), "{status:?}");
        expect_no_processes_in(&dir, 0, Duration::from_secs(5));
    });
}

/// The child ignores the end of its input and every catchable signal: only
/// the parent-death signal the bridge arms can end it.
#[test]
fn no_child_outlives_a_killed_bridge() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let worker = script(&dir, "stubborn.sh", STUBBORN);
        let mut bridge = Bridge::start(
            &dir,
            &[
                "--concurrency",
                "2",
                "--verbose",
                "--child-protocol",
                "json",
            ],
            &["sh", &worker],
        );
        let conn = bridge.connect();
        let _call = conn
            .client()
            .unary_call_async(&EXECUTE, &command(&["x"]), opt())
            .unwrap();
        let pid =
            started_pid(&bridge.expect_line("bridge: started child pid", Duration::from_secs(10)));
        assert!(pid_alive(pid), "child {pid} is not running");
        bridge.signal(libc::SIGKILL);
        let dir = bridge.dir.clone();
        let _ = bridge.finish(Duration::from_secs(10));
        expect_no_processes_in(&dir, 0, Duration::from_secs(5));
    });
}

/// The child expands nothing and fails on an `@` argument: the lines of the
/// argfile reach it only if the bridge expanded them.
#[test]
fn the_bridge_expands_argfiles_for_a_child_that_does_not() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        std::fs::write(dir.join("args"), "--work-ms\n0\nsub/from-argfile\n").unwrap();
        let worker = script(&dir, "echo.sh", ECHO);
        let bridge = Bridge::start(
            &dir,
            &["--concurrency", "1", "--child-protocol", "json"],
            &["sh", &worker],
        );
        let conn = bridge.connect();
        let response = execute(&conn, &command(&["@args"]));
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        assert!(
            response
                .stderr
                .contains(r#""arguments": ["--work-ms", "0", "sub/from-argfile"]"#),
            "{}",
            response.stderr
        );
        // The echo itself: an `@` argument does reach it as such.
        let response = execute(&conn, &command(&["@@literal"]));
        assert_eq!(response.exit_code, 3, "{}", response.stderr);
    });
}

#[test]
fn bazel_front_end_serves_four_multiplex_requests_with_four_singleplex_children() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let marks = dir.join("marks");
        std::fs::create_dir(&marks).unwrap();
        let barrier = testdata("bridge/barrier.sh");
        let mut bridge = Command::new(BIN)
            .args([
                "--concurrency",
                "4",
                "--bridge",
                "--child-protocol",
                "json",
                "--",
            ])
            .args(["sh", &barrier, marks.to_str().unwrap(), "4"])
            // As Bazel starts a worker: the flag last.
            .arg("--persistent_worker")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = bridge.stdin.take().unwrap();
        for id in 1..=4 {
            let mut request = WorkRequest::new();
            request.arguments = vec![format!("r{id}")];
            request.request_id = id;
            stdin
                .write_all(&WireFormat::Proto.encode_request(&request))
                .unwrap();
        }
        stdin.flush().unwrap();
        let mut stdout = BufReader::new(bridge.stdout.take().unwrap());
        let mut ids = Vec::new();
        for _ in 0..4 {
            let response = WireFormat::Proto
                .read_response(&mut stdout, 1 << 20)
                .unwrap()
                .expect("a response");
            assert_eq!(response.exit_code, 0, "{}", response.output);
            assert!(response.output.contains("arrived 4"), "{}", response.output);
            ids.push(response.request_id);
        }
        ids.sort();
        assert_eq!(ids, [1, 2, 3, 4]);
        drop(stdin);
        let status = bridge.wait().unwrap();
        assert!(status.success(), "{status:?}");
        expect_no_processes_in(&dir, 0, Duration::from_secs(5));
    });
}

#[test]
fn worker_client_buck2_drives_the_bridge() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let output = Command::new(client_support::client_binary())
            .args(["buck2", "--stream", "--concurrency", "4", "--repeat", "8"])
            .args(["--request", "out{n}", "--"])
            .args([BIN, "--concurrency", "4", "--bridge", "--", BIN])
            .current_dir(&dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        for n in 0..8 {
            assert!(dir.join(format!("out{n}")).exists(), "out{n}: {stdout}");
        }
    });
}

#[test]
fn a_node_worker_on_bazel_worker_serves_buck2_requests() {
    within(Duration::from_secs(120), || {
        let Some(script) = node_support::node_worker("the Node @bazel/worker test") else {
            return;
        };
        let (_d, dir) = tempdir();
        let bridge = Bridge::start(&dir, &["--concurrency", "2"], &["node", &script]);
        let conn = bridge.connect();
        let requests: Vec<_> = (0..4)
            .map(|i| command(&["--work-ms", "50", &format!("node{i}.txt")]))
            .collect();
        for (i, response) in execute_stream(&conn, &requests).iter().enumerate() {
            assert_eq!(response.exit_code, 0, "{}", response.stderr);
            assert!(
                response.stderr.contains(&format!("wrote node{i}.txt")),
                "{}",
                response.stderr
            );
            assert_eq!(
                std::fs::read_to_string(dir.join(format!("node{i}.txt"))).unwrap(),
                format!("node{i}.txt\n")
            );
        }
        let response = execute(&conn, &command(&["a", "b"]));
        assert_eq!(response.exit_code, 1, "{}", response.stderr);
        assert!(response.stderr.contains("exactly one OUTFILE"));
        let children = bridge.children();
        assert!(!children.is_empty() && children.len() <= 2, "{children:?}");
        bridge.signal(libc::SIGTERM);
        let dir = bridge.dir.clone();
        let (status, _) = bridge.finish(Duration::from_secs(20));
        assert!(status.success(), "{status:?}");
        expect_no_processes_in(&dir, 0, Duration::from_secs(5));
    });
}

/// A request with environment entries, for the probe worker.
fn command_env(argv: &[&str], env: &[(&str, &str)]) -> ExecuteCommand {
    let mut c = command(argv);
    for (key, value) in env {
        let mut entry = persistent_worker::proto::worker::execute_command::EnvironmentEntry::new();
        entry.key = key.as_bytes().to_vec();
        entry.value = value.as_bytes().to_vec();
        c.env.push(entry);
    }
    c
}

/// The pid a `testdata/bridge/probe.py` answer starts with.
fn probe_pid(response: &ExecuteResponse) -> u32 {
    assert_eq!(response.exit_code, 0, "{}", response.stderr);
    response
        .stderr
        .lines()
        .find_map(|line| line.strip_prefix("pid "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {:?}", response.stderr))
}

/// Waits until process `pid` is gone (exited and reaped).
fn expect_gone(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "child {pid} still runs");
        thread::sleep(Duration::from_millis(20));
    }
}

fn probe() -> String {
    testdata("bridge/probe.py")
}

#[test]
fn two_environments_at_once_go_to_two_children_that_see_their_own() {
    within(Duration::from_secs(60), || {
        for mode in ["--concurrency", "--multiplex"] {
            let (_d, dir) = tempdir();
            let marks = dir.join("marks");
            std::fs::create_dir(&marks).unwrap();
            let mut args = vec!["--concurrency", "2", "--child-protocol", "json"];
            if mode == "--multiplex" {
                args.push(mode);
            }
            let bridge = Bridge::start(&dir, &args, &["python3", &probe()]);
            let marks = marks.to_str().unwrap();
            // Each waits until both run: they are served at once.
            let requests: Vec<_> = ["one", "two"]
                .iter()
                .map(|value| {
                    command_env(
                        &["wait", marks, "2", "env", "PROBE_VALUE", "env", "PATH"],
                        &[("PROBE_VALUE", value)],
                    )
                })
                .collect();
            let responses = execute_stream(&bridge.connect(), &requests);
            for (response, value) in responses.iter().zip(["one", "two"]) {
                let text = &response.stderr;
                assert!(text.contains("arrived 2"), "{mode}: {text}");
                assert!(
                    text.contains(&format!("PROBE_VALUE={value} PATH=")),
                    "{mode}: {text}"
                );
                // On top of the bridge's own environment, not instead of it.
                assert!(!text.contains("PATH unset"), "{mode}: {text}");
            }
            let pids: Vec<u32> = responses.iter().map(probe_pid).collect();
            assert_ne!(pids[0], pids[1], "{mode}: one child per environment");
            // No environment is a key of its own: the bridge's.
            let plain = execute(&bridge.connect(), &command(&["env", "PROBE_VALUE"]));
            assert!(
                plain.stderr.contains("PROBE_VALUE unset"),
                "{mode}: {}",
                plain.stderr
            );
            assert!(!pids.contains(&probe_pid(&plain)), "{mode}");
        }
    });
}

#[test]
fn a_new_environment_beyond_the_bound_retires_the_least_recently_used() {
    within(Duration::from_secs(60), || {
        for mode in ["--concurrency", "--multiplex"] {
            let (_d, dir) = tempdir();
            let mut args = vec![
                "--concurrency",
                "4",
                "--child-protocol",
                "json",
                "--max-env-keys",
                "2",
            ];
            if mode == "--multiplex" {
                args.push(mode);
            }
            let mut bridge = Bridge::start(&dir, &args, &["python3", &probe()]);
            let conn = bridge.connect();
            let run = |value: &str| {
                let response = execute(&conn, &command_env(&["env", "V"], &[("V", value)]));
                assert!(
                    response.stderr.contains(&format!("V={value}\n")),
                    "{mode}: {}",
                    response.stderr
                );
                probe_pid(&response)
            };
            let a = run("a");
            let b = run("b");
            assert_ne!(a, b, "{mode}");
            // A is used again, so B is the least recently used key.
            assert_eq!(run("a"), a, "{mode}");
            let c = run("c");
            assert!(c != a && c != b, "{mode}");
            bridge.expect_line("retired to make room for", Duration::from_secs(10));
            expect_gone(b, Duration::from_secs(10));
            assert!(pid_alive(a), "{mode}: the key used more recently stays");
            assert_eq!(run("a"), a, "{mode}");
            assert_eq!(run("c"), c, "{mode}");
            // B comes back to a fresh child.
            let b2 = run("b");
            assert!(b2 != b && b2 != a && b2 != c, "{mode}");
        }
    });
}

#[test]
fn the_same_environment_reuses_its_child_whatever_the_order_of_entries() {
    within(Duration::from_secs(60), || {
        let (_d, dir) = tempdir();
        let starts = dir.join("starts");
        let bridge = Bridge::start(
            &dir,
            &[
                "--concurrency",
                "2",
                "--child-protocol",
                "json",
                "--verbose",
            ],
            &["python3", &probe(), starts.to_str().unwrap()],
        );
        let conn = bridge.connect();
        let ask = &["env", "X", "env", "Y"];
        let first = execute(&conn, &command_env(ask, &[("X", "1"), ("Y", "2")]));
        assert!(first.stderr.contains("X=1 Y=2"), "{}", first.stderr);
        let pid = probe_pid(&first);
        let again = execute(&conn, &command_env(ask, &[("Y", "2"), ("X", "1")]));
        assert!(again.stderr.contains("X=1 Y=2"), "{}", again.stderr);
        assert_eq!(probe_pid(&again), pid, "{}", again.stderr);
        // --verbose names the key; equal environments, equal names.
        let key = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("bridge: answered by child pid"))
                .and_then(|l| l.split_once(" (env "))
                .and_then(|(_, rest)| rest.rsplit_once(", exit code"))
                .map(|(key, _)| key.to_owned())
                .unwrap_or_else(|| panic!("no key in {text}"))
        };
        assert_eq!(key(&first.stderr), key(&again.stderr));
        assert!(
            key(&first.stderr).ends_with(" (2 vars)"),
            "{}",
            first.stderr
        );
        let other = execute(&conn, &command_env(ask, &[("X", "1"), ("Y", "3")]));
        assert!(other.stderr.contains("X=1 Y=3"), "{}", other.stderr);
        assert_ne!(probe_pid(&other), pid);
        assert_ne!(key(&other.stderr), key(&first.stderr));
        let back = execute(&conn, &command_env(ask, &[("X", "1"), ("Y", "2")]));
        assert_eq!(probe_pid(&back), pid, "{}", back.stderr);
        let started = std::fs::read_to_string(&starts).unwrap().lines().count();
        assert_eq!(started, 2, "one child per environment");
    });
}

#[test]
fn a_child_is_replaced_after_max_requests_per_child() {
    within(Duration::from_secs(60), || {
        for mode in ["--concurrency", "--multiplex"] {
            let (_d, dir) = tempdir();
            let mut args = vec![
                "--concurrency",
                "1",
                "--child-protocol",
                "json",
                "--max-requests-per-child",
                "3",
            ];
            if mode == "--multiplex" {
                args.push(mode);
            }
            let mut bridge = Bridge::start(&dir, &args, &["python3", &probe()]);
            let conn = bridge.connect();
            let pids: Vec<u32> = (0..7)
                .map(|_| probe_pid(&execute(&conn, &command(&["env", "PATH"]))))
                .collect();
            let (a, b, c) = (pids[0], pids[3], pids[6]);
            assert_eq!(pids, [a, a, a, b, b, b, c], "{mode}");
            assert!(a != b && b != c && a != c, "{mode}: {pids:?}");
            bridge.expect_line("--max-requests-per-child", Duration::from_secs(10));
            expect_gone(a, Duration::from_secs(10));
            expect_gone(b, Duration::from_secs(10));
        }
    });
}

#[test]
fn a_child_over_max_child_rss_finishes_its_request_and_is_replaced() {
    within(Duration::from_secs(60), || {
        for mode in ["--concurrency", "--multiplex"] {
            let (_d, dir) = tempdir();
            let mut args = vec![
                "--concurrency",
                "1",
                "--child-protocol",
                "json",
                "--max-child-rss-mib",
                "64",
            ];
            if mode == "--multiplex" {
                args.push(mode);
            }
            let mut bridge = Bridge::start(&dir, &args, &["python3", &probe()]);
            let conn = bridge.connect();
            let small = command(&["grow", "1"]);
            let a = probe_pid(&execute(&conn, &small));
            assert_eq!(probe_pid(&execute(&conn, &small)), a, "{mode}");
            // This request grows the child past the limit; it still gets
            // its answer from that child.
            let big = execute(&conn, &command(&["grow", "100"]));
            assert!(big.stderr.contains("grew 100 MiB"), "{}", big.stderr);
            assert_eq!(probe_pid(&big), a, "{mode}");
            let line = bridge.expect_line("over --max-child-rss-mib 64", Duration::from_secs(10));
            assert!(line.contains(&format!("child pid {a}")), "{line}");
            let b = probe_pid(&execute(&conn, &small));
            assert_ne!(b, a, "{mode}: a fresh child after the limit");
            expect_gone(a, Duration::from_secs(10));
            assert_eq!(probe_pid(&execute(&conn, &small)), b, "{mode}");
        }
    });
}
