//! Hostile and malformed input through the real binary over real pipes:
//! argument files that are not files, too big, too deep or looping; bounded
//! error messages; odd ids, wire types and JSON. Each case is answered (or
//! ends the stream with a protocol error) within a bounded time, and where
//! the stream survives, the worker keeps serving.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{cancel, request, run, Worker};
use persistent_worker::bazel::framing::{encode_frame, encode_varint};
use persistent_worker::proto::worker_protocol::WorkRequest;
use protobuf::Message;

/// How long one refused argument file may take to be answered: far below
/// `common::WAIT`, so a blocked read fails the test rather than merely slowing it.
const PROMPT: Duration = Duration::from_secs(5);

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A directory with every kind of bad argument file, and `deep0` that
/// nests one level past the limit.
fn hostile_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    mkfifo(&p.join("fifo"));
    fs::create_dir(p.join("dir")).unwrap();
    fs::write(p.join("big"), "x".repeat(1001)).unwrap();
    fs::write(p.join("fits"), format!("{}\n", "f".repeat(999))).unwrap();
    for i in 0..=persistent_worker::argfile::MAX_DEPTH {
        fs::write(p.join(format!("deep{i}")), format!("@deep{}\n", i + 1)).unwrap();
    }
    std::os::unix::fs::symlink("loop-b", p.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", p.join("loop-b")).unwrap();
    d
}

/// `(argument, what the error must say)` for each bad argument file.
const CASES: &[(&str, &str)] = &[
    ("@fifo", "is a FIFO, not a regular file"),
    ("@/dev/zero", "is a character device, not a regular file"),
    ("@dir", "is a directory, not a regular file"),
    ("@big", "past 1000 bytes (--max-argfile-bytes)"),
    ("@deep0", "nested more than 16 levels deep"),
    ("@loop-a", "Too many levels of symbolic links"),
];

fn hostile_cases_are_answered_and_the_worker_keeps_serving(id: i32) {
    let d = hostile_dir();
    let mut worker = Worker::start(&["--max-argfile-bytes", "1000"], d.path());
    for (i, (arg, expect)) in CASES.iter().enumerate() {
        let sent = Instant::now();
        worker.send(&request(id, &[arg]));
        let (at, response) = worker.recv_timed();
        assert!(at - sent < PROMPT, "{arg}: answered after {:?}", at - sent);
        assert_eq!(response.request_id, id, "{arg}");
        assert_eq!(response.exit_code, 2, "{arg}: {}", response.output);
        assert!(
            response.output.contains(expect),
            "{arg}: expected {expect:?} in {}",
            response.output
        );
        // The worker still serves: a good request right after each bad one.
        let out = format!("ok{i}.txt");
        worker.send(&request(id, &[&out]));
        let response = worker.recv();
        assert_eq!(response.exit_code, 0, "after {arg}: {}", response.output);
        assert_eq!(
            fs::read_to_string(d.path().join(&out)).unwrap(),
            format!("{out}\n")
        );
    }
    // Exactly at the limit is still fine (999 bytes and the newline).
    worker.send(&request(id, &["--print-env", "K", "@fits"]));
    let response = worker.recv();
    assert_eq!(response.exit_code, 1, "{}", response.output);
    assert!(
        response.output.contains("cannot write"),
        "{}",
        response.output
    );
    worker.finish_cleanly();
}

#[test]
fn bad_argument_files_with_id_0() {
    hostile_cases_are_answered_and_the_worker_keeps_serving(0);
}

#[test]
fn bad_argument_files_with_multiplex_ids() {
    hostile_cases_are_answered_and_the_worker_keeps_serving(7);
}

#[test]
fn a_fifo_argument_file_does_not_block_other_requests() {
    // One pool thread: if `@fifo` blocked it, the second request would
    // never run.
    let d = hostile_dir();
    let mut worker = Worker::start(&["--concurrency", "1"], d.path());
    worker.send(&request(1, &["@fifo"]));
    worker.send(&request(2, &["after.txt"]));
    let mut ids: Vec<(i32, i32)> = (0..2)
        .map(|_| {
            let r = worker.recv();
            (r.request_id, r.exit_code)
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [(1, 2), (2, 0)]);
}

#[test]
fn one_shot_refuses_bad_argument_files_promptly() {
    let d = hostile_dir();
    // The worker's own argv is expanded before its options are read, so
    // there the byte limit is the default one and `@big` would fit.
    for (arg, expect) in CASES.iter().filter(|(arg, _)| *arg != "@big") {
        let started = Instant::now();
        let done = run(&[arg], d.path(), b"");
        assert!(started.elapsed() < PROMPT, "{arg}: {:?}", started.elapsed());
        assert_eq!(done.status.code(), Some(2), "{arg}: {}", done.stderr);
        assert!(done.stderr.contains(expect), "{arg}: {}", done.stderr);
    }
}

#[test]
fn a_huge_missing_argument_file_name_gives_a_short_error() {
    let d = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], d.path());
    let name = format!("@{}", "n".repeat(4 << 20));
    worker.send(&request(3, &[&name]));
    let response = worker.recv();
    assert_eq!(response.exit_code, 2);
    assert!(
        response.output.len() < 2048,
        "{} byte error response",
        response.output.len()
    );
    assert!(
        response.output.contains(&format!("({} bytes)", 4 << 20)),
        "{}",
        response.output
    );
}

#[test]
fn a_huge_unknown_option_gives_a_short_error() {
    let d = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&["--verbose"], d.path());
    let option = format!("--{}", "o".repeat(4 << 20));
    worker.send(&request(3, &[&option, "x.txt"]));
    let response = worker.recv();
    assert_eq!(response.exit_code, 2, "{}", &response.output[..200]);
    assert!(
        response.output.len() < 2048,
        "{} byte error response",
        response.output.len()
    );
    let (_, _, stderr) = worker.finish();
    // The verbose request log is bounded too.
    assert!(stderr.len() < 8192, "{} bytes of log", stderr.len());
}

/// Negative ids are multiplex ids like any other non-zero id: both requests
/// wait at a barrier that only opens once both run, so answering them one
/// at a time fails them.
#[test]
fn negative_ids_are_multiplex_ids_and_echoed() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("bar")).unwrap();
    let mut worker = Worker::start(&["--concurrency", "2"], d.path());
    worker.send(&request(-5, &["--barrier", "2", "bar/neg.txt"]));
    worker.send(&request(i32::MIN, &["--barrier", "2", "bar/min.txt"]));
    let mut ids: Vec<i32> = (0..2)
        .map(|_| {
            let r = worker.recv();
            assert_eq!(r.exit_code, 0, "request {}: {}", r.request_id, r.output);
            r.request_id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [i32::MIN, -5]);
    for name in ["neg.txt", "min.txt"] {
        assert_eq!(
            fs::read_to_string(d.path().join("bar").join(name)).unwrap(),
            format!("{name}\n")
        );
    }
}

#[test]
fn cancel_for_id_0() {
    let d = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], d.path());
    // Nothing in flight: ignored, no response of its own.
    worker.send(&cancel(0));
    worker.send(&request(0, &["first.txt"]));
    let response = worker.recv();
    assert_eq!((response.request_id, response.exit_code), (0, 0));
    assert!(response.output.contains("first.txt"), "{}", response.output);
    // In flight: the singleplex request is cancelled and answered once.
    worker.send(&request(0, &["--work-ms", "60000", "slow.txt"]));
    worker.send(&cancel(0));
    let response = worker.recv();
    assert!(response.was_cancelled, "{}", response.output);
    worker.send(&request(0, &["next.txt"]));
    let response = worker.recv();
    assert!(response.output.contains("next.txt"), "{}", response.output);
    worker.finish_cleanly();
}

fn tag(field: u32, wire: u8, out: &mut Vec<u8>) {
    encode_varint(u64::from(field << 3 | u32::from(wire)), out);
}

#[test]
fn unknown_fields_of_every_wire_type_are_ignored() {
    let mut bytes = request(4, &["known.txt"]).write_to_bytes().unwrap();
    tag(99, 0, &mut bytes);
    encode_varint(u64::MAX, &mut bytes);
    tag(100, 2, &mut bytes);
    bytes.extend_from_slice(&[3, b'a', b'b', b'c']);
    tag(101, 5, &mut bytes);
    bytes.extend_from_slice(&[1, 2, 3, 4]);
    tag(102, 1, &mut bytes);
    bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let d = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], d.path());
    worker.send_raw(&encode_frame(&bytes));
    let response = worker.recv();
    assert_eq!((response.request_id, response.exit_code), (4, 0));
    assert!(d.path().join("known.txt").exists());
}

/// A stream the worker cannot read as requests: exit 1 with `expect` on
/// stderr, nothing on stdout, within the bounded wait of `run`, and not a
/// crash (a stack overflow would be a signal, not exit code 1).
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
    assert!(
        done.stderr.len() < 4096,
        "{} bytes of stderr",
        done.stderr.len()
    );
}

#[test]
fn known_fields_with_wrong_wire_types_are_skipped_like_unknown_ones() {
    // As protobuf's own parsers do: a field whose wire type does not match
    // its declaration is kept as an unknown field, and the request is read
    // as if it were absent.
    let d = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], d.path());
    // request_id (field 3, a varint) as length-delimited bytes.
    let mut bytes = request(0, &["wt1.txt"]).write_to_bytes().unwrap();
    tag(3, 2, &mut bytes);
    bytes.extend_from_slice(&[1, 7]);
    worker.send_raw(&encode_frame(&bytes));
    let response = worker.recv();
    assert_eq!(
        (response.request_id, response.exit_code),
        (0, 0),
        "{}",
        response.output
    );
    assert!(d.path().join("wt1.txt").exists());
    // arguments (field 1, a string) as a varint, next to a real argument.
    let mut bytes = request(0, &["wt2.txt"]).write_to_bytes().unwrap();
    tag(1, 0, &mut bytes);
    bytes.push(5);
    worker.send_raw(&encode_frame(&bytes));
    let response = worker.recv();
    assert_eq!(response.exit_code, 0, "{}", response.output);
    assert!(d.path().join("wt2.txt").exists());
}

#[test]
fn invalid_utf8_in_a_proto_string_is_a_protocol_error() {
    let mut bytes = Vec::new();
    tag(1, 2, &mut bytes);
    bytes.extend_from_slice(&[2, 0xff, 0xfe]);
    assert_protocol_error(&[], &encode_frame(&bytes), "undecodable");
}

const JSON: &[&str] = &["--worker-protocol", "json"];

#[test]
fn json_with_wrong_types_is_a_protocol_error() {
    for text in [
        r#"{"arguments":[1,2]}"#,
        r#"{"requestId":[]}"#,
        r#"{"cancel":"maybe"}"#,
        r#"{"inputs":{"path":"x"}}"#,
    ] {
        assert_protocol_error(JSON, text.as_bytes(), "undecodable");
    }
}

#[test]
fn json_huge_numbers_are_protocol_errors() {
    for text in [
        r#"{"requestId":99999999999999999999}"#,
        r#"{"requestId":2147483648}"#,
        r#"{"verbosity":1e400}"#,
    ] {
        assert_protocol_error(JSON, text.as_bytes(), "undecodable");
    }
}

#[test]
fn json_invalid_utf8_in_a_string_is_a_protocol_error() {
    assert_protocol_error(JSON, b"{\"arguments\":[\"\xff\xfe\"]}", "not UTF-8");
}

#[test]
fn json_nested_100k_deep_is_refused_without_overflowing_the_stack() {
    let mut text = b"{\"future\":".to_vec();
    text.extend(std::iter::repeat_n(b'[', 100_000));
    text.extend(std::iter::repeat_n(b']', 100_000));
    text.push(b'}');
    assert_protocol_error(JSON, &text, "nested more than 100 levels");
}

#[test]
fn a_json_object_that_never_closes_stops_at_the_limit() {
    let mut text = b"{\"arguments\":[\"".to_vec();
    text.extend(std::iter::repeat_n(b'x', 3 << 20));
    let mut args = JSON.to_vec();
    args.extend(["--max-message-bytes", "1048576"]);
    assert_protocol_error(&args, &text, "larger than the limit");
}

/// Peak resident memory of a live process, in KiB.
fn vm_hwm_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status")
}

#[test]
fn a_60_mib_argument_list_is_answered_correctly() {
    // Sixty 1 MiB arguments; only the last --print-env counts, so the answer
    // names K and the file is written.
    let mut args: Vec<String> = Vec::new();
    for _ in 0..59 {
        args.push("--print-env".into());
        args.push("e".repeat(1 << 20));
    }
    args.extend(["--print-env".into(), "K".into(), "big.txt".into()]);
    let mut req = WorkRequest::new();
    req.request_id = 9;
    req.arguments = args;
    let d = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], d.path());
    worker.send(&req);
    drop(req);
    let response = worker.recv();
    assert_eq!(
        (response.request_id, response.exit_code),
        (9, 0),
        "{}",
        response.output
    );
    assert!(
        response
            .output
            .ends_with("demo: env K is not set\ndemo: wrote big.txt\n"),
        "{}",
        &response.output[..response.output.len().min(500)]
    );
    assert_eq!(
        fs::read_to_string(d.path().join("big.txt")).unwrap(),
        "big.txt\n"
    );
    let pid = worker.pid();
    eprintln!(
        "worker peak RSS after a 60 MiB request: {} KiB",
        vm_hwm_kib(pid)
    );
}

#[test]
fn a_60_mib_frame_that_ends_early_allocates_as_it_reads() {
    // The frame announces 60 MiB; 1 MiB arrives and the stream stays open.
    // A reader that allocated the announced length would show 60 MiB more
    // accessible virtual memory at once (untouched, so not in RSS); one that
    // grows with the bytes shows ~1 MiB. Reserved-only mappings (a new malloc
    // arena reserves 64 MiB PROT_NONE) are not counted: they hold nothing.
    let d = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&[], d.path());
    // A first request makes sure start-up allocations are behind us.
    worker.send(&request(1, &["warm.txt"]));
    worker.recv();
    let pid = worker.pid();
    let before = accessible_kib(pid);
    let mut prefix = Vec::new();
    encode_varint(60 << 20, &mut prefix);
    worker.send_raw(&prefix);
    // A pipe holds 64 KiB: once this write returns, the worker has read
    // all but that much of it.
    worker.send_raw(&vec![0u8; 1 << 20]);
    let grown = accessible_kib(pid).saturating_sub(before);
    assert!(grown < 16 << 10, "virtual memory grew by {grown} KiB");
    let (status, _, stderr) = worker.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ended inside a frame"), "{stderr}");
}

/// The size of the process's mappings that can be read or written.
fn accessible_kib(pid: i32) -> u64 {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            if !perms.starts_with("r") && !perms[1..].starts_with("w") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some((end - start) / 1024)
        })
        .sum()
}
