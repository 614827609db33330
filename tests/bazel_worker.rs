//! The Bazel-protocol worker over real pipes: singleplex, multiplex,
//! cancellation, JSON, sandboxing, isolation from misbehaving tools, and
//! every kind of malformed input.

mod common;

use common::{cancel, request, run, Worker};
use persistent_worker::bazel::framing::{encode_frame, encode_varint};
use persistent_worker::proto::worker_protocol::WorkRequest;
use protobuf::Message;
use std::fs;
use std::time::{Duration, Instant};

#[test]
fn singleplex_requests_run_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "4"], dir.path());
    // All five are sent before any answer is read, each shorter than the one
    // before: a worker that ran them side by side would answer the last one
    // first. Singleplex (id 0) must answer in the order it was asked.
    for i in 0..5 {
        let ms = (4 - i) * 100;
        worker.send(&request(
            0,
            &["--work-ms", &ms.to_string(), &format!("out-{i}.txt")],
        ));
    }
    for i in 0..5 {
        let r = worker.recv();
        assert_eq!((r.request_id, r.exit_code), (0, 0), "{}", r.output);
        let first = r.output.lines().next().unwrap();
        assert!(first.starts_with("Bazel persistent worker "), "{first}");
        assert!(first.ends_with(" 0"), "{first}");
        assert!(
            r.output.contains(&format!("out-{i}.txt")),
            "answer {i} is not for out-{i}.txt: {}",
            r.output
        );
    }
    worker.finish_cleanly();
    for i in 0..5 {
        let text = fs::read_to_string(dir.path().join(format!("out-{i}.txt"))).unwrap();
        assert_eq!(text, format!("out-{i}.txt\n"));
    }
}

#[test]
fn non_zero_ids_are_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "1"], dir.path());
    worker.send(&request(41, &["a"]));
    assert_eq!(worker.recv().request_id, 41);
    worker.send(&request(7, &["b"]));
    assert_eq!(worker.recv().request_id, 7);
}

#[test]
fn multiplex_requests_overlap() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("bar")).unwrap();
    let mut worker = Worker::start(&["--concurrency", "4"], dir.path());
    // Each waits at a barrier that opens only once all four run.
    for id in 1..=4 {
        worker.send(&request(id, &["--barrier", "4", &format!("bar/m{id}")]));
    }
    let mut ids: Vec<i32> = (0..4)
        .map(|_| {
            let r = worker.recv();
            assert_eq!(r.exit_code, 0, "request {}: {}", r.request_id, r.output);
            r.request_id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3, 4]);
}

#[test]
fn id_zero_does_not_block_multiplex_siblings() {
    // Bazel 2.1 numbers multiplex proxies from 0, so id 0 can be one of the
    // concurrent requests.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("bar")).unwrap();
    let mut worker = Worker::start(&["--concurrency", "4"], dir.path());
    // Were id 0 to hold back its siblings, the barrier would never open.
    for id in 0..4 {
        worker.send(&request(id, &["--barrier", "4", &format!("bar/z{id}")]));
    }
    for _ in 0..4 {
        let r = worker.recv();
        assert_eq!(r.exit_code, 0, "request {}: {}", r.request_id, r.output);
    }
}

#[test]
fn a_duplicate_in_flight_id_is_refused_and_the_first_is_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "4"], dir.path());
    worker.send(&request(5, &["--work-ms", "1000", "first.txt"]));
    worker.send(&request(5, &["second.txt"]));
    // The refusal comes at once, while the first still works its second.
    let refused = worker.recv();
    assert_eq!(
        (refused.request_id, refused.exit_code),
        (5, 1),
        "{}",
        refused.output
    );
    assert!(
        refused.output.contains("already in flight"),
        "{}",
        refused.output
    );
    let first = worker.recv();
    assert_eq!(
        (first.request_id, first.exit_code),
        (5, 0),
        "{}",
        first.output
    );
    assert!(first.output.contains("first.txt"), "{}", first.output);
    assert!(!first.was_cancelled);
    assert_eq!(
        fs::read_to_string(dir.path().join("first.txt")).unwrap(),
        "first.txt\n"
    );
    assert!(!dir.path().join("second.txt").exists());
    // Once answered, the id is free again.
    worker.send(&request(5, &["third.txt"]));
    assert_eq!(worker.recv().exit_code, 0);
    worker.finish_cleanly();
}

#[test]
fn singleplex_requests_sent_back_to_back_still_run_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(
        &["--concurrency", "4", "--work-ms", "200", "--verbose"],
        dir.path(),
    );
    let sent = Instant::now();
    for i in 0..3 {
        worker.send(&request(0, &[&format!("b{i}")]));
    }
    assert_one_at_a_time(&worker, sent, 3, Duration::from_millis(200));
    let (_, _, stderr) = worker.finish();
    assert!(!stderr.contains("2 in flight"), "{stderr}");
}

/// `count` responses to requests of `work` each, sent from `sent` on: run one
/// at a time, the k-th cannot arrive before k times `work` has passed. Load
/// can only delay an answer, so this never fails a worker that serialises;
/// gaps between arrivals would, as the test may see one answer late and the
/// next on time.
fn assert_one_at_a_time(worker: &Worker, sent: Instant, count: u32, work: Duration) {
    let arrivals: Vec<Duration> = (0..count).map(|_| worker.recv_timed().0 - sent).collect();
    for (k, at) in (1..).zip(&arrivals) {
        assert!(
            *at >= work * k,
            "answer {k} after {at:?}, before {k} x {work:?} of work: they overlapped ({arrivals:?})"
        );
    }
}

#[test]
fn concurrency_one_serialises_multiplex_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "1", "--work-ms", "200"], dir.path());
    let sent = Instant::now();
    for id in 1..=3 {
        worker.send(&request(id, &[&format!("s{id}")]));
    }
    assert_one_at_a_time(&worker, sent, 3, Duration::from_millis(200));
}

/// A singleplex request runs on the thread that read it (the first always
/// does); a cancel for it must still be read while it runs: the standby
/// takes the input over and answers it, and the worker reads on.
#[test]
fn a_cancel_reaches_a_singleplex_request_running_on_the_reading_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    worker.send(&request(0, &["--work-ms", "60000", "slow.txt"]));
    worker.send(&cancel(0));
    let r = worker.recv();
    assert!(r.was_cancelled, "{}\nstderr: {}", r.output, worker.stderr());
    // The request ran on the reading thread, and the standby took over.
    worker.wait_for_log("has held the reading thread");
    for name in ["after-1.txt", "after-2.txt"] {
        worker.send(&request(0, &[name]));
        let r = worker.recv();
        assert_eq!(r.exit_code, 0, "{}", r.output);
        assert!(dir.path().join(name).exists());
    }
    worker.finish_cleanly();
}

#[test]
fn cancel_answers_once_with_was_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "2"], dir.path());
    worker.send(&request(5, &["--work-ms", "60000", "slow"]));
    worker.send(&request(6, &["fast"]));
    assert_eq!(worker.recv().request_id, 6);
    worker.send(&cancel(5));
    let r = worker.recv();
    assert_eq!(r.request_id, 5);
    assert!(r.was_cancelled, "{}", r.output);
    assert!(!dir.path().join("slow").exists());
    // Cancels for finished and unknown ids are ignored, and nothing else
    // arrives for id 5.
    worker.send(&cancel(5));
    worker.send(&cancel(99));
    worker.send(&request(7, &["after"]));
    assert_eq!(worker.recv().request_id, 7);
    worker.finish_cleanly();
}

#[test]
fn eof_finishes_in_flight_requests_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--concurrency", "3", "--work-ms", "300"], dir.path());
    for id in 1..=3 {
        worker.send(&request(id, &[&format!("e{id}")]));
    }
    let (status, rest, stderr) = worker.finish();
    assert!(status.success(), "exit {status}\nstderr:\n{stderr}");
    let mut ids: Vec<i32> = rest.iter().map(|r| r.request_id).collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3]);
    for id in 1..=3 {
        assert!(dir.path().join(format!("e{id}")).exists());
    }
}

#[test]
fn json_accepts_both_name_styles_and_answers_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let input = concat!(
        r#"{"arguments":["camel.txt"],"requestId":3,"sandboxDir":"","unknownField":[1,{"x":2}]}"#,
        "\n",
        r#"{"arguments":["snake.txt"],"request_id":4,"sandbox_dir":""}"#,
        // Old Bazel versions put nothing between objects.
        r#"{"arguments":["zero.txt"]}"#,
        "\r\n  \n",
    );
    let done = run(
        &["--worker-protocol", "json", "--persistent_worker"],
        dir.path(),
        input.as_bytes(),
    );
    assert!(done.status.success(), "{}", done.stderr);
    let text = String::from_utf8(done.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    // Requests with different ids run at once, so responses come in any order.
    for (id, name) in [
        (Some(3), "camel.txt"),
        (Some(4), "snake.txt"),
        (None, "zero.txt"),
    ] {
        let line = lines
            .iter()
            .find(|line| line.contains(name))
            .unwrap_or_else(|| panic!("no response for {name}: {text}"));
        let parsed: persistent_worker::proto::worker_protocol::WorkResponse =
            protobuf_json_mapping::parse_from_str(line).expect("valid JSON response");
        assert_eq!(parsed.request_id, id.unwrap_or(0));
        assert_eq!(line.contains("requestId"), id.is_some(), "{line}");
        // Zero values are left out, as protobuf's JSON printer does.
        assert!(!line.contains("exitCode"), "{line}");
        assert!(parsed.output.contains(name), "{line}");
        assert_eq!(
            fs::read_to_string(dir.path().join(name)).unwrap(),
            format!("{name}\n")
        );
    }
}

#[test]
fn handler_panic_is_an_error_response_and_the_worker_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    worker.send(&request(0, &["--panic", "p"]));
    let r = worker.recv();
    assert_eq!(r.exit_code, 1);
    assert!(
        r.output.contains("panicked") && r.output.contains("--panic was given"),
        "{}",
        r.output
    );
    worker.send(&request(0, &["after-panic"]));
    assert_eq!(worker.recv().exit_code, 0);
    assert!(dir.path().join("after-panic").exists());
}

#[test]
fn stray_stdout_writes_go_to_stderr_not_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    worker.send(&request(0, &["--print-stdout", "STRAY-OUTPUT", "x"]));
    let r = worker.recv();
    assert_eq!(r.exit_code, 0, "{}", r.output);
    worker.send(&request(0, &["y"]));
    assert_eq!(worker.recv().exit_code, 0);
    // The log as it stands at the end: read before, it may lag behind.
    let stderr = worker.finish_cleanly();
    assert!(stderr.contains("STRAY-OUTPUT\n"), "{stderr}");
    assert!(stderr.contains("STRAY-OUTPUT (raw fd 1)"), "{stderr}");
}

#[test]
fn usage_errors_answer_exit_2_and_the_worker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    worker.send(&request(0, &["one", "two"]));
    let r = worker.recv();
    assert_eq!(r.exit_code, 2);
    assert!(r.output.contains("usage:"), "{}", r.output);
    worker.send(&request(0, &["@missing-argfile"]));
    let r = worker.recv();
    assert_eq!(r.exit_code, 2);
    assert!(r.output.contains("missing-argfile"), "{}", r.output);
    worker.send(&request(0, &["fine"]));
    assert_eq!(worker.recv().exit_code, 0);
}

#[test]
fn sandbox_dir_applies_to_outputs_argfiles_and_paths_inside_argfiles() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("__sandbox/1/root");
    fs::create_dir_all(sandbox.join("out")).unwrap();
    fs::write(sandbox.join("outer.params"), "--flagfile=inner.params\n").unwrap();
    fs::write(sandbox.join("inner.params"), "out/result.txt\n").unwrap();
    let mut worker = Worker::start(&[], dir.path());
    let mut req = request(1, &["@outer.params"]);
    req.sandbox_dir = "__sandbox/1/root".into();
    worker.send(&req);
    let r = worker.recv();
    assert_eq!(r.exit_code, 0, "{}", r.output);
    assert_eq!(
        fs::read_to_string(sandbox.join("out/result.txt")).unwrap(),
        "result.txt\n"
    );
    assert!(!dir.path().join("out").exists());

    // Each case names the rule that refuses it. `__sandbox/..` exists and
    // lies inside the worker's directory, so only its own rule stands
    // between it and success.
    let outside = tempfile::tempdir().unwrap();
    let outside_abs = outside.path().canonicalize().unwrap().display().to_string();
    let absolute_dotdot = format!("{}/..", sandbox.canonicalize().unwrap().display());
    std::os::unix::fs::symlink(outside.path(), dir.path().join("away")).unwrap();
    for (bad, rule) in [
        ("../escape", "must not contain '..'"),
        ("__sandbox/..", "must not contain '..'"),
        ("__sandbox/1/root/../..", "must not contain '..'"),
        (absolute_dotdot.as_str(), "must not contain '..'"),
        (outside_abs.as_str(), "outside the worker's directory"),
        ("/", "outside the worker's directory"),
        ("away", "outside the worker's directory"),
        ("__sandbox/9/root", "No such file"),
    ] {
        let mut req = request(2, &["x"]);
        req.sandbox_dir = bad.into();
        worker.send(&req);
        let r = worker.recv();
        assert_eq!((r.request_id, r.exit_code), (2, 1), "{bad}: {}", r.output);
        assert!(
            r.output.contains("sandbox_dir") && r.output.contains(rule),
            "{bad}: {}",
            r.output
        );
    }
    assert!(!outside.path().join("x").exists());
    assert!(!dir.path().join("x").exists());
}

/// NativeLink's shape (protocol facts §3a): the worker runs in the engine's
/// root directory and each request names its action's directory by its
/// absolute path; `@args` and the paths inside it are relative to that.
#[test]
fn an_absolute_sandbox_dir_inside_the_worker_directory_is_served() {
    let root = tempfile::tempdir().unwrap();
    let action = root.path().canonicalize().unwrap().join("op-1/work");
    fs::create_dir_all(action.join("out")).unwrap();
    fs::write(action.join("args"), "--flagfile=more\n").unwrap();
    fs::write(action.join("more"), "out/native.txt\n").unwrap();
    let mut worker = Worker::start(&[], root.path());
    let mut req = request(0, &["@args"]);
    req.sandbox_dir = action.display().to_string();
    worker.send(&req);
    let r = worker.recv();
    assert_eq!(r.exit_code, 0, "{}", r.output);
    assert_eq!(
        fs::read_to_string(action.join("out/native.txt")).unwrap(),
        "native.txt\n"
    );
    assert!(!root.path().join("out").exists());
}

#[test]
fn a_sandbox_swapped_for_a_symlink_is_refused_at_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("__sandbox/1");
    fs::create_dir_all(&sandbox).unwrap();
    let mut worker = Worker::start(&[], dir.path());
    let mut req = request(1, &["first.txt"]);
    req.sandbox_dir = "__sandbox/1".into();
    worker.send(&req);
    assert_eq!(worker.recv().exit_code, 0);
    assert!(sandbox.join("first.txt").exists());
    // The sandbox becomes a link out of the worker's directory between two
    // requests; the check runs for every request, so the second is refused.
    fs::remove_dir_all(&sandbox).unwrap();
    std::os::unix::fs::symlink(outside.path(), &sandbox).unwrap();
    let mut req = request(2, &["second.txt"]);
    req.sandbox_dir = "__sandbox/1".into();
    worker.send(&req);
    let r = worker.recv();
    assert_eq!(r.exit_code, 1, "{}", r.output);
    assert!(
        r.output.contains("outside the worker's directory"),
        "{}",
        r.output
    );
    assert!(!outside.path().join("second.txt").exists());
}

#[test]
fn verbosity_logs_requests_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    let mut req = request(0, &["v.txt"]);
    req.verbosity = 1;
    worker.send(&req);
    worker.recv();
    worker.send(&request(0, &["quiet.txt"]));
    worker.recv();
    worker.send(&cancel(42));
    let (_, _, stderr) = worker.finish();
    assert!(
        stderr.contains("worker: request 0") && stderr.contains("\"v.txt\""),
        "{stderr}"
    );
    assert!(!stderr.contains("quiet.txt"), "{stderr}");
    // The cancel had verbosity 0, so its being ignored is not logged.
    assert!(!stderr.contains("cancel for request 42"), "{stderr}");
}

#[test]
fn verbose_flag_logs_start_and_finish_with_in_flight_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--verbose", "--concurrency", "2"], dir.path());
    worker.send(&request(1, &["--work-ms", "60000", "a"]));
    worker.send(&request(2, &["b"]));
    assert_eq!(worker.recv().request_id, 2);
    worker.send(&cancel(1));
    assert!(worker.recv().was_cancelled);
    let (_, _, stderr) = worker.finish();
    assert!(
        stderr.contains("request 1 started, 1 in flight"),
        "{stderr}"
    );
    assert!(
        stderr.contains("request 2 started, 2 in flight"),
        "{stderr}"
    );
    assert!(
        stderr.contains("request 1 finished, exit code 1 (cancelled), 0 in flight"),
        "{stderr}"
    );
}

/// Each malformed stream must end the worker with exit code 1, a message on
/// stderr, and not one byte on stdout.
fn assert_protocol_error(args: &[&str], input: &[u8], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = args.to_vec();
    all.push("--persistent_worker");
    let done = run(&all, dir.path(), input);
    assert_eq!(done.status.code(), Some(1), "stderr: {}", done.stderr);
    assert!(done.stdout.is_empty(), "stdout: {:?}", done.stdout);
    assert!(
        done.stderr.contains(expect),
        "expected {expect:?} in: {}",
        done.stderr
    );
}

#[test]
fn six_byte_varint_is_a_protocol_error() {
    assert_protocol_error(&[], &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01], "varint");
}

#[test]
fn oversize_frame_is_a_protocol_error() {
    let mut input = Vec::new();
    encode_varint(1000, &mut input);
    input.extend_from_slice(&[0u8; 1000]);
    assert_protocol_error(
        &["--max-message-bytes", "999"],
        &input,
        "larger than the limit",
    );
}

#[test]
fn truncated_frame_is_a_protocol_error() {
    let mut frame = encode_frame(&request(0, &["x"]).write_to_bytes().unwrap());
    frame.truncate(frame.len() - 1);
    assert_protocol_error(&[], &frame, "ended inside a frame");
}

#[test]
fn undecodable_message_is_a_protocol_error() {
    assert_protocol_error(&[], &encode_frame(&[0x0a, 0xff, 0xff]), "undecodable");
}

#[test]
fn malformed_json_is_a_protocol_error() {
    assert_protocol_error(
        &["--worker-protocol", "json"],
        b"{\"arguments\": 5}\n",
        "undecodable",
    );
    assert_protocol_error(
        &["--worker-protocol", "json"],
        b"not json\n",
        "expected a JSON object",
    );
}

#[test]
fn protocol_error_after_good_requests_stops_output_promptly() {
    // A valid request in flight, then garbage: the worker must not wait the
    // request out, and must write nothing after the error.
    let mut input = encode_frame(
        &request(1, &["--work-ms", "60000", "x"])
            .write_to_bytes()
            .unwrap(),
    );
    input.extend_from_slice(&[0xff; 6]);
    assert_protocol_error(&[], &input, "varint");
}

#[test]
fn empty_input_exits_0_silently() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(&["--persistent_worker"], dir.path(), b"");
    assert!(done.status.success(), "{}", done.stderr);
    assert!(done.stdout.is_empty());
}

#[test]
fn large_request_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], dir.path());
    let mut req = WorkRequest::new();
    req.arguments = vec!["big.txt".into()];
    for i in 0..20_000 {
        let mut input = persistent_worker::proto::worker_protocol::Input::new();
        input.path = format!("some/long/input/path/number/{i}.java");
        input.digest = vec![0xab; 32];
        req.inputs.push(input);
    }
    assert!(req.compute_size() > 1 << 20);
    worker.send(&req);
    assert_eq!(worker.recv().exit_code, 0);
}
