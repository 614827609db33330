//! `worker-client` against the real worker binary and against broken
//! workers, as separate processes.

use std::path::Path;

mod client_support;

use client_support::client;

const WORKER: &str = env!("CARGO_BIN_EXE_persistent-worker");

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn bazel_proto_singleplex() {
    let d = dir();
    let r = client(
        &[
            "bazel",
            "--request",
            "a.txt",
            "--arg",
            "b.txt",
            "--",
            WORKER,
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert_eq!(r.stdout.matches("Bazel persistent worker").count(), 2);
    assert!(
        r.stdout.contains("-> request 0: [\"a.txt\"]"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("<- response 0: exit_code 0"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("2 request(s), 2 response(s): 0 failed"));
    assert!(r.stdout.contains("protocol OK"));
    assert_eq!(read(d.path(), "a.txt"), "a.txt\n");
    assert_eq!(read(d.path(), "b.txt"), "b.txt\n");
}

#[test]
fn bazel_json_with_a_requests_file() {
    let d = dir();
    std::fs::write(
        d.path().join("reqs"),
        "# two requests\nj-{n}.txt\n\nj-{n}.txt\n",
    )
    .unwrap();
    let r = client(
        &[
            "bazel",
            "--json",
            "--requests-file",
            "reqs",
            "--",
            WORKER,
            "--worker-protocol",
            "json",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("demo: wrote j-0.txt"), "{}", r.stdout);
    assert!(r.stdout.contains("demo: wrote j-1.txt"), "{}", r.stdout);
    assert!(r.stdout.contains("protocol OK"));
}

#[test]
fn failed_request_exits_1_and_worker_keeps_serving() {
    let d = dir();
    let r = client(
        &[
            "bazel",
            "--request",
            "x y",
            "--request",
            "ok.txt",
            "--",
            WORKER,
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.contains("exit_code 2"), "{}", r.stdout);
    assert!(r.stdout.contains("expected exactly one OUTFILE"));
    assert!(r.stdout.contains("1 failed"));
    assert_eq!(read(d.path(), "ok.txt"), "ok.txt\n");
}

#[test]
fn multiplex_sends_all_before_the_first_answer() {
    let d = dir();
    let r = client(
        &[
            "bazel",
            "--multiplex",
            "4",
            "--request",
            "m-{n}.txt",
            "--",
            WORKER,
            "--concurrency",
            "4",
            "--work-ms",
            "300",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    let lines: Vec<&str> = r.stdout.lines().collect();
    let sent: Vec<&str> = lines
        .iter()
        .copied()
        .take_while(|l| !l.starts_with("<-"))
        .filter(|l| l.starts_with("-> request"))
        .collect();
    assert_eq!(sent.len(), 4, "{}", r.stdout);
    for id in 1..=4 {
        assert!(
            r.stdout.contains(&format!("<- response {id}: exit_code 0")),
            "{}",
            r.stdout
        );
        assert_eq!(
            read(d.path(), &format!("m-{}.txt", id - 1)),
            format!("m-{}.txt\n", id - 1)
        );
    }
}

#[test]
fn cancel_after_gets_one_cancelled_answer_per_request() {
    let d = dir();
    let r = client(
        &[
            "bazel",
            "--multiplex",
            "2",
            "--cancel-after",
            "100",
            "--request",
            "c-{n}.txt",
            "--",
            WORKER,
            "--work-ms",
            "30000",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("-> cancel 1"), "{}", r.stdout);
    assert!(r.stdout.contains("-> cancel 2"), "{}", r.stdout);
    assert_eq!(r.stdout.matches("was_cancelled").count(), 2, "{}", r.stdout);
    assert!(r.stdout.contains("2 cancelled (2 cancel(s) sent)"));
    assert!(!d.path().join("c-0.txt").exists());
}

fn remote_files(d: &Path) {
    std::fs::create_dir(d.join("out")).unwrap();
    std::fs::write(d.join("outer.args"), "@inner.args\n").unwrap();
    std::fs::write(d.join("inner.args"), "out/remote.txt\r\n").unwrap();
    std::fs::write(d.join("flags"), "--work-ms\n1\n").unwrap();
}

#[test]
fn remote_expands_at_files_and_passes_flagfile_through() {
    let d = dir();
    remote_files(d.path());
    let r = client(
        &[
            "remote",
            "--input",
            "inner.args",
            "--repeat",
            "2",
            "--",
            WORKER,
            "--concurrency",
            "1",
            "@outer.args",
            "--flagfile=flags",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    // The flagfiles are split off; the rest starts the worker, once.
    assert_eq!(
        r.stdout
            .matches(&format!(
                "started `{WORKER} --concurrency 1 --persistent_worker` (pid"
            ))
            .count(),
        1,
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("key: persistentWorkerKey="),
        "{}",
        r.stdout
    );
    // `@` expanded here, recursively; `--flagfile=` left for the worker.
    assert_eq!(
        r.stdout
            .matches("-> request 0: [\"out/remote.txt\", \"--flagfile=flags\"]")
            .count(),
        2,
        "{}",
        r.stdout
    );
    assert!(r
        .stdout
        .contains("2 action(s), 2 response(s): 0 failed; 1 distinct key(s)"));
    assert_eq!(read(d.path(), "out/remote.txt"), "remote.txt\n");
}

#[test]
fn remote_json_writes_every_field() {
    let d = dir();
    remote_files(d.path());
    let r = client(
        &[
            "remote",
            "--json",
            "--input",
            "flags",
            "--",
            WORKER,
            "--worker-protocol",
            "json",
            "@outer.args",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("Bazel persistent worker"), "{}", r.stdout);
    assert_eq!(read(d.path(), "out/remote.txt"), "remote.txt\n");

    // What goes over the pipe: a worker that records its stdin and never
    // answers, so the client times out after the request is written.
    let r = client(
        &[
            "remote",
            "--json",
            "--timeout-ms",
            "500",
            "--input",
            "flags",
            "--",
            "sh",
            "-c",
            "cat > request.json",
            "@outer.args",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(3));
    let sent = read(d.path(), "request.json");
    for field in [
        "\"arguments\": [\"out/remote.txt\"]",
        "\"path\": \"flags\"",
        "\"digest\": \"",
        "\"requestId\": 0",
        "\"cancel\": false",
        "\"verbosity\": 0",
        "\"sandboxDir\": \"\"",
    ] {
        assert!(sent.contains(field), "{field} missing in {sent}");
    }
    assert!(sent.ends_with("}\n"), "{sent}");
}

/// The `--json-out` file of a bench run, parsed. Removed afterwards so that a
/// later run that writes nothing cannot pass on this run's file.
struct BenchJson {
    text: String,
    parsed: protobuf::well_known_types::struct_::Struct,
}

impl BenchJson {
    fn take(path: &Path) -> BenchJson {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("the bench wrote no {}: {e}", path.display()));
        std::fs::remove_file(path).unwrap();
        let parsed =
            protobuf_json_mapping::parse_from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        BenchJson { text, parsed }
    }

    fn kind(&self, key: &str) -> &protobuf::well_known_types::struct_::value::Kind {
        self.parsed
            .fields
            .get(key)
            .and_then(|v| v.kind.as_ref())
            .unwrap_or_else(|| panic!("{key} missing in {}", self.text))
    }

    fn number(&self, key: &str) -> f64 {
        match self.kind(key) {
            protobuf::well_known_types::struct_::value::Kind::NumberValue(n) => *n,
            other => panic!("{key}: {other:?} in {}", self.text),
        }
    }

    fn string(&self, key: &str) -> &str {
        match self.kind(key) {
            protobuf::well_known_types::struct_::value::Kind::StringValue(s) => s,
            other => panic!("{key}: {other:?} in {}", self.text),
        }
    }
}

#[test]
fn bench_prints_a_table_and_writes_json() {
    let d = dir();
    let json_path = d.path().join("bench.json");
    for (extra, concurrency, protocol) in [
        (&["--request", "b-{n}.txt"][..], 1.0, "proto"),
        (
            &["--concurrency", "4", "--request", "b-{n}.txt"][..],
            4.0,
            "proto multiplex",
        ),
    ] {
        assert!(!json_path.exists());
        let mut args = vec!["bazel", "--requests", "200", "--json-out", "bench.json"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", WORKER]);
        let r = client(&args, d.path());
        assert_eq!(r.code, Some(0));
        let header = r.stdout.lines().nth(1).unwrap_or_default();
        for column in ["start-up ms", "requests/s", "p50 ms", "p90 ms", "p99 ms"] {
            assert!(header.contains(column), "{header}");
        }
        let json = BenchJson::take(&json_path);
        assert_eq!(json.string("mode"), "bazel", "{}", json.text);
        assert_eq!(json.string("protocol"), protocol, "{}", json.text);
        assert_eq!(json.number("concurrency"), concurrency, "{}", json.text);
        assert_eq!(json.number("requests"), 200.0);
        assert!(json.number("throughput_per_s") > 0.0);
        assert!(
            json.parsed.fields.contains_key("latency_ms"),
            "{}",
            json.text
        );
    }
    std::fs::write(d.path().join("args"), "r.txt\n").unwrap();
    let r = client(
        &[
            "remote",
            "--requests",
            "50",
            "--concurrency",
            "2",
            "--",
            WORKER,
            "@args",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("remote"), "{}", r.stdout);
    assert!(r.stdout.contains("p99 ms"), "{}", r.stdout);
}

#[test]
fn worker_that_exits_at_once_is_reported_with_its_stderr() {
    let d = dir();
    let r = client(
        &[
            "bazel",
            "--request",
            "x",
            "--",
            "sh",
            "-c",
            "echo oops >&2; exit 3",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(3));
    assert!(
        r.stderr.contains("the worker exited with status 3"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("worker stderr:\n  oops"), "{}", r.stderr);
}

#[test]
fn worker_that_never_answers_times_out() {
    let d = dir();
    let r = client(
        &[
            "bazel",
            "--timeout-ms",
            "300",
            "--request",
            "x",
            "--",
            "sh",
            "-c",
            "cat > /dev/null",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(3));
    assert!(
        r.stderr.contains("no response to request 0 within 300 ms"),
        "{}",
        r.stderr
    );
}

#[test]
fn garbage_on_stdout_is_a_protocol_violation() {
    let d = dir();
    for json in [false, true] {
        let mut args = vec!["bazel", "--request", "x"];
        if json {
            args.push("--json");
        }
        // The worker reads the request first, so the garbage arrives where a
        // response should.
        args.extend_from_slice(&["--", "sh", "-c", "head -c 1 >/dev/null; echo garbage"]);
        let r = client(&args, d.path());
        assert_eq!(r.code, Some(3));
        assert!(r.stderr.contains("protocol violation"), "{}", r.stderr);
        assert!(
            r.stderr
                .contains("last bytes read from stdout: \"garbage\\n\""),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn worker_that_writes_a_stray_line_before_its_response_is_caught() {
    let d = dir();
    let r = client(
        &[
            "bazel",
            "--timeout-ms",
            "2000",
            "--request",
            "x",
            "--",
            "sh",
            "-c",
            "echo hello; exec \"$0\" \"$@\"",
            WORKER,
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(3));
    assert!(r.stderr.contains("protocol violation"), "{}", r.stderr);
    assert!(r.stderr.contains("\"hello\\n"), "{}", r.stderr);
}

#[test]
fn missing_worker_program_and_usage_errors() {
    let d = dir();
    let r = client(
        &["bazel", "--request", "x", "--", "no-such-worker-program"],
        d.path(),
    );
    assert_eq!(r.code, Some(3));
    assert!(r.stderr.contains("cannot start the worker"), "{}", r.stderr);
    let r = client(&["bazel", "--", WORKER], d.path());
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("no requests"), "{}", r.stderr);
}

#[test]
fn buck2_execute_with_env() {
    let d = dir();
    let r = client(
        &[
            "buck2",
            "--env",
            "GREETING=hello",
            "--request",
            "--print-env GREETING a.txt",
            "--request",
            "b.txt",
            "--",
            WORKER,
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains("it accepted connections after"),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stdout.matches("Buck2 persistent worker").count(),
        2,
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("GREETING=hello"), "{}", r.stdout);
    assert!(r
        .stdout
        .contains("2 response(s) via Execute: 0 failed; protocol OK"));
    assert!(r.stdout.contains("the worker exited cleanly on SIGTERM"));
    assert_eq!(read(d.path(), "a.txt"), "a.txt\n");
    assert_eq!(read(d.path(), "b.txt"), "b.txt\n");
}

#[test]
fn buck2_exec_sends_each_command_as_an_exec_call() {
    let d = dir();
    let r = client(
        &[
            "buck2",
            "--exec",
            "--worker-stderr",
            "--request",
            "a.txt",
            "--request",
            "b.txt",
            "--",
            WORKER,
            "--verbose",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("2 response(s) via Exec: 0 failed; protocol OK"),
        "{}",
        r.stdout
    );
    // The worker names the method each call came by.
    assert_eq!(
        r.stderr.matches("worker: Exec #").count(),
        4,
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("worker: Execute #"), "{}", r.stderr);
    assert_eq!(read(d.path(), "a.txt"), "a.txt\n");
    assert_eq!(read(d.path(), "b.txt"), "b.txt\n");
}

#[test]
fn buck2_stream_keeps_requests_in_flight() {
    let d = dir();
    let r = client(
        &[
            "buck2",
            "--stream",
            "--concurrency",
            "3",
            "--request",
            "s-{n}.txt",
            "--repeat",
            "3",
            "--",
            WORKER,
            "--concurrency",
            "3",
            "--work-ms",
            "200",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    let sent_before_first_answer = r
        .stdout
        .lines()
        .take_while(|l| !l.starts_with("<-"))
        .filter(|l| l.starts_with("-> request"))
        .count();
    assert_eq!(sent_before_first_answer, 3, "{}", r.stdout);
    assert!(r
        .stdout
        .contains("3 response(s) via ExecuteStream: 0 failed; protocol OK"));
    for n in 0..3 {
        assert_eq!(
            read(d.path(), &format!("s-{n}.txt")),
            format!("s-{n}.txt\n")
        );
    }
}

#[test]
fn buck2_worker_that_exits_early_or_never_listens() {
    let d = dir();
    let r = client(
        &[
            "buck2",
            "--request",
            "x",
            "--",
            "sh",
            "-c",
            "echo oops >&2; exit 3",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(3));
    assert!(
        r.stderr
            .contains("the worker exited with status 3 before accepting connections"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("worker stderr:\n  oops"), "{}", r.stderr);
    let r = client(
        &[
            "buck2",
            "--timeout-ms",
            "400",
            "--request",
            "x",
            "--",
            "sleep",
            "30",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(3));
    assert!(
        r.stderr.contains("did not accept connections on") && r.stderr.contains("within 400 ms"),
        "{}",
        r.stderr
    );
}

#[test]
fn buck2_bench() {
    let d = dir();
    let json_path = d.path().join("b.json");
    for (method, requests, protocol) in [
        (None, "100", "grpc Execute"),
        (Some("--stream"), "60", "grpc ExecuteStream"),
        (Some("--exec"), "40", "grpc Exec"),
    ] {
        assert!(!json_path.exists());
        let mut args = vec!["buck2", "--requests", requests, "--concurrency", "2"];
        args.extend(method);
        args.extend_from_slice(&[
            "--json-out",
            "b.json",
            "--request",
            "b-{n}.txt",
            "--",
            WORKER,
        ]);
        let r = client(&args, d.path());
        assert_eq!(r.code, Some(0));
        assert!(r.stdout.contains("buck2"), "{}", r.stdout);
        assert!(r.stdout.contains("p99 ms"), "{}", r.stdout);
        let json = BenchJson::take(&json_path);
        assert_eq!(json.string("mode"), "buck2", "{}", json.text);
        assert_eq!(json.string("protocol"), protocol, "{}", json.text);
        assert_eq!(json.number("concurrency"), 2.0, "{}", json.text);
        assert_eq!(
            json.number("requests"),
            requests.parse::<f64>().unwrap(),
            "{}",
            json.text
        );
    }
}
