//! The Buck2 mode under input and clients nobody planned for: malformed
//! commands, protocol misuse on `Exec`, idle and vanishing clients. Each case
//! drives the real binary over its real socket with a grpcio client.

mod common;
mod grpc_support;
use common::buck2::Buck2Worker;
use common::lines::Lines;
use grpc_support::{env, wait, within};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use grpcio::{CallOption, RpcStatusCode, WriteFlags};
use persistent_worker::buck2::service::{self, Connection, EXEC, EXECUTE, EXECUTE_STREAM};
use persistent_worker::proto::worker::execute_command::EnvironmentEntry;
use persistent_worker::proto::worker::{
    execute_event, ExecuteCancel, ExecuteCommand, ExecuteCommandStream, ExecuteEvent,
    ExecuteResponse,
};

/// Set in the environment of the child process that plays a client which
/// gets killed mid-call; the value is the worker's socket.
const KILLED_CLIENT_SOCKET: &str = "BUCK2_HOSTILE_KILLED_CLIENT_SOCKET";

fn opt() -> CallOption {
    CallOption::default().timeout(Duration::from_secs(30))
}

const SHORT: Duration = Duration::from_secs(10);

/// The worker under test; see `common::buck2` for how it starts and ends.
type Worker = Buck2Worker;

impl Buck2Worker {
    fn connect(&self) -> Connection {
        service::connect(env(), self.socket()).expect("connecting")
    }

    fn proc_count(&self, what: &str) -> usize {
        let pid = self.pid();
        match what {
            "fd" => std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("reading /proc fd")
                .count(),
            _ => {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("Threads: in /proc status")
            }
        }
    }
}

fn command(argv: &[&str]) -> ExecuteCommand {
    let mut c = ExecuteCommand::new();
    c.argv = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
    c
}

fn execute(conn: &Connection, c: &ExecuteCommand) -> ExecuteResponse {
    conn.client()
        .unary_call(&EXECUTE, c, opt())
        .expect("Execute call")
}

fn event(data: execute_event::Data) -> ExecuteEvent {
    let mut e = ExecuteEvent::new();
    e.data = Some(data);
    e
}

fn stream_command(id: u64, argv: &[&str]) -> ExecuteCommandStream {
    let mut m = ExecuteCommandStream::new();
    m.id = id;
    m.request = protobuf::MessageField::some(command(argv));
    m
}

#[test]
fn empty_argv_is_a_usage_error_and_the_worker_goes_on() {
    within(Duration::from_secs(30), || {
        let d = tempfile::tempdir().unwrap();
        let worker = Worker::start(d.path(), &[]);
        let conn = worker.connect();
        let response = execute(&conn, &ExecuteCommand::new());
        assert_eq!(response.exit_code, 2, "{}", response.stderr);
        assert!(
            response
                .stderr
                .contains("expected exactly one OUTFILE, got 0"),
            "{}",
            response.stderr
        );
        assert_eq!(execute(&conn, &command(&["after"])).exit_code, 0);
        assert!(d.path().join("after").exists());
    });
}

#[test]
fn invalid_utf8_in_env_name_or_value_is_refused_with_exit_2() {
    within(Duration::from_secs(30), || {
        let d = tempfile::tempdir().unwrap();
        let worker = Worker::start(d.path(), &[]);
        let conn = worker.connect();
        let entry = |key: &[u8], value: &[u8]| {
            let mut e = EnvironmentEntry::new();
            e.key = key.to_vec();
            e.value = value.to_vec();
            e
        };
        let cases: [(&str, EnvironmentEntry, &str); 2] = [
            ("bad-key", entry(b"K\xff", b"v"), "name"),
            ("bad-value", entry(b"GOOD_KEY", b"v\xc3"), "GOOD_KEY"),
        ];
        for (out, bad, named) in cases {
            let mut c = command(&[out]);
            c.env.push(entry(b"FINE", b"yes"));
            c.env.push(bad);
            let response = execute(&conn, &c);
            assert_eq!(response.exit_code, 2, "{}", response.stderr);
            assert!(response.stderr.starts_with("Buck2 persistent worker "));
            assert!(
                response.stderr.contains("not valid UTF-8") && response.stderr.contains(named),
                "{out}: {}",
                response.stderr
            );
            assert!(!d.path().join(out).exists(), "{out} was run anyway");
        }
        // Invalid UTF-8 in argv as well, in a later position than existing
        // suites check, together with a valid env.
        let mut c = command(&["--work-ms", "0"]);
        c.argv.push(b"\x80out".to_vec());
        let response = execute(&conn, &c);
        assert_eq!(response.exit_code, 2, "{}", response.stderr);
        assert!(
            response.stderr.contains("argument 2"),
            "{}",
            response.stderr
        );
        assert_eq!(execute(&conn, &command(&["after"])).exit_code, 0);
    });
}

#[test]
fn exec_with_two_commands_is_rejected_and_the_first_is_cancelled() {
    within(Duration::from_secs(30), || {
        let d = tempfile::tempdir().unwrap();
        let mut worker = Worker::start(d.path(), &["--verbose", "--concurrency", "1"]);
        let conn = worker.connect();
        let (mut tx, rx) = conn.client().client_streaming(&EXEC, opt()).unwrap();
        let first = command(&["--work-ms", "60000", "first"]);
        wait(
            Box::pin(tx.send((
                event(execute_event::Data::Command(first)),
                WriteFlags::default(),
            ))),
            SHORT,
        )
        .unwrap();
        worker.expect_line("Exec #0 started", SHORT);
        let second = command(&["second"]);
        // The server may end the call before this send or the close report
        // back; the status below is what counts.
        let _ = wait(
            Box::pin(tx.send((
                event(execute_event::Data::Command(second)),
                WriteFlags::default(),
            ))),
            SHORT,
        );
        let _ = wait(Box::pin(tx.close()), SHORT);
        match wait(rx, SHORT) {
            Err(grpcio::Error::RpcFailure(status)) => {
                assert_eq!(status.code(), RpcStatusCode::INVALID_ARGUMENT);
                assert!(status.message().contains("one command"), "{status:?}");
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        let finished = worker.expect_line("Exec #0 finished", SHORT);
        assert!(finished.contains("cancelled"), "{finished}");
        // With one pool thread this runs only if the first request let go.
        assert_eq!(execute(&conn, &command(&["after"])).exit_code, 0);
        assert!(!d.path().join("first").exists());
        assert!(!d.path().join("second").exists());
    });
}

#[test]
fn exec_with_a_cancel_first_is_rejected_and_runs_nothing() {
    within(Duration::from_secs(30), || {
        let d = tempfile::tempdir().unwrap();
        let worker = Worker::start(d.path(), &[]);
        let conn = worker.connect();
        let (mut tx, rx) = conn.client().client_streaming(&EXEC, opt()).unwrap();
        let _ = wait(
            Box::pin(tx.send((
                event(execute_event::Data::Cancel(ExecuteCancel::new())),
                WriteFlags::default(),
            ))),
            SHORT,
        );
        // A command after the refused cancel must not run either.
        let _ = wait(
            Box::pin(tx.send((
                event(execute_event::Data::Command(command(&["late"]))),
                WriteFlags::default(),
            ))),
            SHORT,
        );
        let _ = wait(Box::pin(tx.close()), SHORT);
        match wait(rx, SHORT) {
            Err(grpcio::Error::RpcFailure(status)) => {
                assert_eq!(status.code(), RpcStatusCode::INVALID_ARGUMENT);
                assert!(
                    status.message().contains("first ExecuteEvent"),
                    "{status:?}"
                );
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        assert_eq!(execute(&conn, &command(&["after"])).exit_code, 0);
        assert!(!d.path().join("late").exists());
    });
}

const IDLE_CALLS: usize = 1000;

#[test]
fn a_thousand_idle_calls_do_not_stop_another_client_and_are_freed() {
    within(Duration::from_secs(90), || {
        let d = tempfile::tempdir().unwrap();
        // One pool thread: an idle call must hold no pool slot.
        let mut worker = Worker::start(d.path(), &["--verbose", "--concurrency", "1"]);
        let threads_before = worker.proc_count("threads");
        let fds_before = worker.proc_count("fd");

        let idle = worker.connect();
        let mut held = Vec::new();
        for i in 0..IDLE_CALLS {
            // Alternate the two streaming methods: each call is open, and
            // nothing is ever sent on it.
            if i % 2 == 0 {
                held.push(Box::new(
                    idle.client()
                        .duplex_streaming(&EXECUTE_STREAM, CallOption::default())
                        .unwrap(),
                ) as Box<dyn std::any::Any + Send>);
            } else {
                held.push(Box::new(
                    idle.client()
                        .client_streaming(&EXEC, CallOption::default())
                        .unwrap(),
                ));
            }
        }
        // A round trip on the same channel orders it after every call start.
        let response = execute(&idle, &command(&["probe"]));
        assert_eq!(response.exit_code, 0, "{}", response.stderr);

        let other = worker.connect();
        let began = Instant::now();
        let response = execute(&other, &command(&["other"]));
        let took = began.elapsed();
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        println!("Execute beside {IDLE_CALLS} idle calls answered in {took:?}");
        assert!(took < SHORT, "took {took:?}");

        // The client goes away: every call it held must end on the server.
        drop(held);
        drop(idle);
        // Each call ends its own way: an Exec sees the client's half-close
        // without a command and is rejected; an ExecuteStream sees the peer
        // gone; either way the server logs its end.
        let mut ended = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ended.len() < IDLE_CALLS {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = worker.lines.next_line(left).unwrap_or_else(|e| {
                panic!("{} of {IDLE_CALLS} idle calls ended ({e:?})", ended.len())
            });
            let is_end = ["ended by the client", "could not finish", "rejected"]
                .iter()
                .any(|what| line.contains(what));
            let call = line
                .split_once('#')
                .and_then(|(_, rest)| rest.split(' ').next())
                .and_then(|n| n.parse::<usize>().ok());
            // The two Execute calls end normally and log none of these, so
            // every call counted here is an idle one.
            if let (true, Some(call)) = (is_end, call) {
                ended.insert(call);
            }
        }
        let threads_after = worker.proc_count("threads");
        let fds_after = worker.proc_count("fd");
        println!("threads {threads_before} -> {threads_after}, fds {fds_before} -> {fds_after}");
        // `other` is still connected: one socket more than at the start.
        assert!(
            threads_after <= threads_before + 2,
            "threads {threads_before} -> {threads_after}"
        );
        assert!(
            fds_after <= fds_before + 2,
            "fds {fds_before} -> {fds_after}"
        );
        assert_eq!(execute(&other, &command(&["last"])).exit_code, 0);
    });
}

#[test]
fn execute_stream_answers_arrive_without_a_half_close() {
    within(Duration::from_secs(30), || {
        let d = tempfile::tempdir().unwrap();
        let worker = Worker::start(d.path(), &["--concurrency", "4"]);
        let conn = worker.connect();
        let (mut tx, mut rx) = conn
            .client()
            .duplex_streaming(&EXECUTE_STREAM, opt())
            .unwrap();
        // Send one, read its answer, then the next: a client that never closes
        // its side must still see each answer as soon as it is ready.
        for id in 0..3u64 {
            let out = format!("open{id}");
            wait(
                Box::pin(tx.send((stream_command(id, &[&out]), WriteFlags::default()))),
                SHORT,
            )
            .unwrap();
            let message = wait(rx.next(), SHORT)
                .expect("the stream ended early")
                .expect("a response");
            assert_eq!(message.id, id);
            let response = message.response.into_option().expect("a response");
            assert_eq!(response.exit_code, 0, "{}", response.stderr);
            assert!(d.path().join(&out).exists());
        }
        drop(tx);
        drop(rx);
    });
}

/// Not a test on its own: the client process killed by
/// `a_client_killed_mid_execute_stream_has_its_requests_cancelled`. It starts
/// two long requests on one ExecuteStream, says so on stdout, and waits.
#[test]
fn killed_client_process() {
    let Ok(socket) = std::env::var(KILLED_CLIENT_SOCKET) else {
        return;
    };
    let conn = service::connect(env(), Path::new(&socket)).expect("connecting");
    let (mut tx, _rx) = conn
        .client()
        .duplex_streaming(&EXECUTE_STREAM, opt())
        .unwrap();
    for id in 0..2u64 {
        let out = format!("killed{id}");
        wait(
            Box::pin(tx.send((
                stream_command(id, &["--work-ms", "60000", &out]),
                WriteFlags::default(),
            ))),
            SHORT,
        )
        .unwrap();
    }
    println!("KILLED-CLIENT-SENT");
    // Its parent kills it long before this ends.
    thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_client_killed_mid_execute_stream_has_its_requests_cancelled() {
    within(Duration::from_secs(60), || {
        let d = tempfile::tempdir().unwrap();
        let mut worker = Worker::start(d.path(), &["--verbose", "--concurrency", "3"]);

        // The bystander's request is already running when the other dies.
        let bystander = worker.connect();
        let (mut btx, mut brx) = bystander
            .client()
            .duplex_streaming(&EXECUTE_STREAM, opt())
            .unwrap();
        wait(
            Box::pin(btx.send((
                stream_command(7, &["--work-ms", "1500", "bystander"]),
                WriteFlags::default(),
            ))),
            SHORT,
        )
        .unwrap();
        worker.expect_line("ExecuteStream #0 id 7 started", SHORT);

        let mut client = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "killed_client_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(KILLED_CLIENT_SOCKET, worker.socket())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the client process");
        let mut out = Lines::of(vec![Box::new(client.stdout.take().unwrap())]);
        let ready = Instant::now() + SHORT;
        loop {
            let left = ready.saturating_duration_since(Instant::now());
            match out.next_line(left) {
                Ok(line) if line.contains("KILLED-CLIENT-SENT") => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = client.kill();
                    panic!("the client process did not start its requests: {e:?}");
                }
            }
        }
        worker.expect_line("ExecuteStream #1 id 0 started", SHORT);
        worker.expect_line("ExecuteStream #1 id 1 started", SHORT);
        client.kill().expect("SIGKILL to the client");
        client.wait().unwrap();

        let ended = worker.expect_line("ExecuteStream #1 ended by the client", SHORT);
        assert!(ended.contains("cancelling 2 running"), "{ended}");
        for id in 0..2 {
            let finished = worker.expect_line(&format!("ExecuteStream #1 id {id} finished"), SHORT);
            assert!(finished.contains("cancelled"), "{finished}");
        }

        let message = wait(brx.next(), SHORT)
            .expect("the bystander's stream ended early")
            .expect("a response");
        assert_eq!(message.id, 7);
        let response = message.response.into_option().expect("a response");
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        assert!(d.path().join("bystander").exists());
        // The demo writes its file only at the end of its work; cancelled,
        // it writes nothing.
        assert!(!d.path().join("killed0").exists());
        assert!(!d.path().join("killed1").exists());
        let _ = wait(Box::pin(btx.close()), SHORT);
    });
}

#[test]
fn execute_stream_answers_malformed_commands_by_id_and_goes_on() {
    within(Duration::from_secs(30), || {
        let d = tempfile::tempdir().unwrap();
        let worker = Worker::start(d.path(), &["--concurrency", "2"]);
        let conn = worker.connect();
        let (mut tx, mut rx) = conn
            .client()
            .duplex_streaming(&EXECUTE_STREAM, opt())
            .unwrap();
        // No command at all, then a command with invalid UTF-8 in argv, then
        // a good one; the stream stays open so every answer must come unasked.
        let mut missing = ExecuteCommandStream::new();
        missing.id = 5;
        let mut bad = stream_command(6, &["--work-ms", "0"]);
        bad.request
            .mut_or_insert_default()
            .argv
            .push(b"o\xffut".to_vec());
        let good = stream_command(7, &["good"]);
        for m in [missing, bad, good] {
            wait(Box::pin(tx.send((m, WriteFlags::default()))), SHORT).unwrap();
        }
        let mut seen = std::collections::BTreeMap::new();
        while seen.len() < 3 {
            let message = wait(rx.next(), SHORT)
                .expect("the stream ended early")
                .expect("a response");
            let response = message.response.into_option().expect("a response");
            assert!(
                seen.insert(message.id, response).is_none(),
                "id {} answered twice",
                message.id
            );
        }
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(seen[&5].exit_code, 2, "{}", seen[&5].stderr);
        assert!(seen[&5].stderr.contains("got 0"), "{}", seen[&5].stderr);
        assert_eq!(seen[&6].exit_code, 2, "{}", seen[&6].stderr);
        assert!(
            seen[&6].stderr.contains("argument 2"),
            "{}",
            seen[&6].stderr
        );
        assert_eq!(seen[&7].exit_code, 0, "{}", seen[&7].stderr);
        assert!(d.path().join("good").exists());
        drop(tx);
        drop(rx);
    });
}
