//! `worker-client check` end to end against real workers: this crate's own
//! (everything supported), a Python worker written for these tests
//! (`testdata/check/faulty_worker.py`) whose faults are switched on one at a
//! time so each verdict is seen to flip, and the Node program on npm's
//! `@bazel/worker` in `testdata/node_worker` (singleplex proto only: its card
//! must say so without failing a run that expects only proto).
//!
//! Every run is bounded by `LIMIT`; the verdicts are read from `--json`.
//! The Node test skips loudly without node and npm unless
//! `REQUIRE_NODE_WORKER=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::thread;
use std::time::Duration;

mod client_support;
mod node_support;

const BIN: &str = env!("CARGO_BIN_EXE_persistent-worker");
/// A whole card; a loaded two-core machine can make a run many times slower
/// than the few seconds it takes alone.
const LIMIT: Duration = Duration::from_secs(180);
/// `--timeout-ms` for the runs: far above any answer these workers give, so
/// only a worker that really does not answer waits it out.
const TIMEOUT_MS: &str = "10000";
/// A request of the demo tool, of the Python worker and of the Node worker
/// that takes long enough to overlap and to cancel.
const SLOW: &str = "--work-ms 600 {out}";

fn testdata(name: &str) -> String {
    format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    (d, dir)
}

/// Runs `worker-client check ARGS -- WORKER...` in `dir`, bounded by LIMIT.
fn run(dir: &Path, args: &[&str], worker: &[&str]) -> Output {
    run_with(dir, None, args, worker)
}

/// `run`, with TMPDIR (where the engine probes make their roots) set.
fn run_with(dir: &Path, tmp: Option<&Path>, args: &[&str], worker: &[&str]) -> Output {
    let mut command = Command::new(client_support::client_binary());
    if let Some(tmp) = tmp {
        command.env("TMPDIR", tmp);
    }
    command
        .arg("check")
        .args(["--timeout-ms", TIMEOUT_MS])
        .args(args)
        .arg("--")
        .args(worker)
        .current_dir(dir)
        .env_remove("WORKER_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().expect("spawn worker-client check");
    let pid = child.id();
    let (tx, rx) = channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(output) => output.expect("wait for worker-client check"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, still unreaped
            // (its waiter thread has not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("worker-client check {args:?} -- {worker:?} did not finish within {LIMIT:?}");
        }
    }
}

/// A card as JSON, with what the test needs to read it.
struct Card {
    json: String,
    code: Option<i32>,
    stderr: String,
}

impl Card {
    /// The verdict of the row `id`, as the JSON spells it.
    fn verdict(&self, id: &str) -> String {
        let key = format!("{{\"id\": \"{id}\", ");
        let line = self
            .json
            .lines()
            .find(|l| l.trim_start().starts_with(&key))
            .unwrap_or_else(|| panic!("no row {id} in the card:\n{}", self.json));
        let at = line.find("\"verdict\": \"").expect("a verdict") + "\"verdict\": \"".len();
        line[at..].split('"').next().unwrap_or("").to_owned()
    }

    fn ids(&self) -> Vec<String> {
        self.json
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("{\"id\": \""))
            .map(|rest| rest.split('"').next().unwrap_or("").to_owned())
            .collect()
    }

    fn assert_verdict(&self, id: &str, want: &str) {
        assert_eq!(
            self.verdict(id),
            want,
            "row {id} (exit {:?}):\n{}\nstderr:\n{}",
            self.code,
            self.json,
            self.stderr
        );
    }
}

fn card(dir: &Path, args: &[&str], worker: &[&str]) -> Card {
    card_with(dir, None, args, worker)
}

fn card_with(dir: &Path, tmp: Option<&Path>, args: &[&str], worker: &[&str]) -> Card {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = run_with(dir, tmp, &all, worker);
    Card {
        json: String::from_utf8_lossy(&out.stdout).into_owned(),
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn python_worker(faults: &[&str]) -> Vec<String> {
    let mut argv = vec!["python3".to_owned(), testdata("check/faulty_worker.py")];
    argv.extend(faults.iter().map(|f| f.to_string()));
    argv
}

/// The Python worker's card with `faults`, running only the probes of
/// `only`, with `--expect` = `expect`.
fn python_card(faults: &[&str], only: &str, expect: &str) -> Card {
    let (_d, dir) = tempdir();
    let worker = python_worker(faults);
    let worker: Vec<&str> = worker.iter().map(String::as_str).collect();
    let args = [
        "--request",
        "{out}",
        "--slow-request",
        SLOW,
        "--only",
        only,
        "--expect",
        expect,
        "--rss-requests",
        "20",
    ];
    card(&dir, &args, &worker)
}

#[test]
fn this_worker_holds_every_feature_and_leaves_its_directory_clean() {
    let (_d, dir) = tempdir();
    let args = [
        "--request",
        "{out}",
        "--slow-request",
        SLOW,
        "--expect",
        "all",
        "--rss-requests",
        "200",
    ];
    let (_t, tmp) = tempdir();
    let c = card_with(&dir, Some(&tmp), &args, &[BIN]);
    assert_eq!(c.code, Some(0), "{}\n{}", c.json, c.stderr);
    assert!(c.json.contains("\"ok\": true"), "{}", c.json);
    let ids = c.ids();
    assert_eq!(ids.len(), 23, "{ids:?}");
    for id in &ids {
        let verdict = c.verdict(id);
        let want = if id.starts_with("resources.") {
            "measured"
        } else {
            "supported"
        };
        assert_eq!(&verdict, want, "{id}:\n{}", c.json);
    }
    // Every file and directory the probes made is gone again, the engines'
    // own roots (under TMPDIR) too.
    for place in [&dir, &tmp] {
        let left: Vec<_> = std::fs::read_dir(place).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn the_table_names_what_could_not_be_judged_without_a_request() {
    let (_d, dir) = tempdir();
    let out = run(&dir, &["--only", "proto,multiplex,cancel,sandbox"], &[BIN]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.contains("answered the empty request"), "{table}");
    for unjudged in ["multiplex.overlap", "cancel", "sandbox.relative"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(unjudged))
            .unwrap_or_else(|| panic!("no {unjudged} row:\n{table}"));
        // Without a slow request, overlap can still be seen when answers
        // arrive out of order (a loaded machine does that to empty
        // requests now and then): then, and only then, it is supported.
        let seen_at_once = unjudged == "multiplex.overlap"
            && line.contains("supported")
            && line.contains("ran at once");
        assert!(line.contains("unjudged") || seen_at_once, "{line}");
    }
    assert!(
        table.contains("result: every expected feature holds"),
        "{table}"
    );
    // Claiming cancel without a slow request cannot pass: unjudged is no proof.
    let out = run(
        &dir,
        &["--only", "proto,cancel", "--expect", "cancel"],
        &[BIN],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(table.contains("result: FAIL: cancel"), "{table}");
}

#[test]
fn usage_errors_exit_2() {
    let (_d, dir) = tempdir();
    for (args, says) in [
        (&["check"][..], "no worker command"),
        (
            &["check", "--expect", "teleport", "--", BIN][..],
            "unknown feature",
        ),
        (
            &["check", "--only", "json", "--expect", "cancel", "--", BIN][..],
            "--only leaves its probes out",
        ),
    ] {
        let out = Command::new(client_support::client_binary())
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn the_python_worker_without_faults_holds_every_feature() {
    let c = python_card(&[], "all", "all");
    assert_eq!(c.code, Some(0), "{}\n{}", c.json, c.stderr);
    for id in c.ids() {
        assert!(
            ["supported", "measured"].contains(&c.verdict(&id).as_str()),
            "{id}:\n{}",
            c.json
        );
    }
}

#[test]
fn a_stray_stdout_write_breaks_proto_stdout() {
    let clean = python_card(&[], "proto", "proto");
    clean.assert_verdict("proto.stdout", "supported");
    assert_eq!(clean.code, Some(0), "{}", clean.json);
    let faulty = python_card(&["--stray-stdout"], "proto", "proto");
    faulty.assert_verdict("proto.stdout", "broken");
    assert_eq!(faulty.code, Some(1), "{}", faulty.json);
    // The evidence shows the stray bytes themselves.
    assert!(
        faulty.json.contains("starting the compiler"),
        "{}",
        faulty.json
    );
}

#[test]
fn a_wrong_id_breaks_proto_ids() {
    let clean = python_card(&[], "proto", "proto");
    clean.assert_verdict("proto.ids", "supported");
    let faulty = python_card(&["--wrong-id"], "proto", "proto");
    faulty.assert_verdict("proto.ids", "broken");
    assert_eq!(faulty.code, Some(1), "{}", faulty.json);
    assert!(
        faulty.json.contains("answered request 7 with request_id 8"),
        "{}",
        faulty.json
    );
}

#[test]
fn ignoring_cancel_makes_cancel_unsupported() {
    let clean = python_card(&[], "cancel", "cancel");
    clean.assert_verdict("cancel", "supported");
    assert_eq!(clean.code, Some(0), "{}", clean.json);
    let faulty = python_card(&["--ignore-cancel"], "cancel", "cancel");
    faulty.assert_verdict("cancel", "unsupported");
    assert_eq!(faulty.code, Some(1), "{}", faulty.json);
    assert!(
        faulty.json.contains("ignored: answered normally"),
        "{}",
        faulty.json
    );
}

#[test]
fn serializing_multiplex_requests_makes_overlap_unsupported() {
    let clean = python_card(&[], "multiplex", "multiplex");
    clean.assert_verdict("multiplex.ids", "supported");
    clean.assert_verdict("multiplex.overlap", "supported");
    assert_eq!(clean.code, Some(0), "{}", clean.json);
    let faulty = python_card(&["--serial"], "multiplex", "multiplex");
    // Serial, but still correct: ids echoed, answers complete.
    faulty.assert_verdict("multiplex.ids", "supported");
    faulty.assert_verdict("multiplex.overlap", "unsupported");
    assert_eq!(faulty.code, Some(1), "{}", faulty.json);
}

#[test]
fn ignoring_sandbox_dir_makes_sandbox_unsupported() {
    let clean = python_card(&[], "sandbox,argfile", "sandbox,argfile");
    for id in ["sandbox.relative", "sandbox.absolute", "sandbox.argfile"] {
        clean.assert_verdict(id, "supported");
    }
    let faulty = python_card(&["--ignore-sandbox"], "sandbox,argfile", "sandbox,argfile");
    for id in ["sandbox.relative", "sandbox.absolute", "sandbox.argfile"] {
        faulty.assert_verdict(id, "unsupported");
    }
    // Argument files in the worker's own directory still work.
    faulty.assert_verdict("argfile.at", "supported");
    faulty.assert_verdict("argfile.flagfile", "supported");
    assert!(
        faulty.json.contains("ignored sandbox_dir"),
        "{}",
        faulty.json
    );
}

#[test]
fn json_holds_only_with_the_flag_that_selects_it() {
    let clean = python_card(&[], "json", "json");
    clean.assert_verdict("json.camel", "supported");
    clean.assert_verdict("json.snake", "supported");
    // The Python worker speaks JSON only when told `--worker-protocol json`.
    let (_d, dir) = tempdir();
    let worker = python_worker(&[]);
    let worker: Vec<&str> = worker.iter().map(String::as_str).collect();
    let args = [
        "--request",
        "{out}",
        "--only",
        "json",
        "--expect",
        "json",
        "--json-flag",
        "--format json",
        "--timeout-ms",
        "3000",
    ];
    let other = card(&dir, &args, &worker);
    other.assert_verdict("json.camel", "unsupported");
    assert_eq!(other.code, Some(1), "{}", other.json);
}

#[test]
fn the_node_bazel_worker_is_singleplex_proto_only() {
    let Some(script) = node_support::node_worker("the Node @bazel/worker check") else {
        return;
    };
    let (_d, dir) = tempdir();
    let args = [
        "--request",
        "{out}",
        "--slow-request",
        SLOW,
        "--only",
        "proto,multiplex,cancel,json,sandbox,argfile",
        "--rss-requests",
        "20",
    ];
    let c = card(&dir, &args, &["node", &script]);
    // Proto only is claimed, and holds: the run passes.
    assert_eq!(c.code, Some(0), "{}\n{}", c.json, c.stderr);
    for id in [
        "proto.roundtrip",
        "proto.sequence",
        "proto.ids",
        "proto.stdout",
        "proto.eof",
        "proto.malformed",
    ] {
        c.assert_verdict(id, "supported");
    }
    for id in [
        "multiplex.ids",
        "json.camel",
        "sandbox.relative",
        "sandbox.absolute",
        "argfile.at",
        "argfile.flagfile",
    ] {
        c.assert_verdict(id, "unsupported");
    }
    c.assert_verdict("cancel", "unjudged");
    // Claiming multiplex fails the run.
    let claim = [
        "--request",
        "{out}",
        "--only",
        "multiplex",
        "--expect",
        "multiplex",
    ];
    let c = card(&dir, &claim, &["node", &script]);
    assert_eq!(c.code, Some(1), "{}", c.json);
    assert!(
        c.json.contains("\"failed\": [\"multiplex.ids\""),
        "{}",
        c.json
    );
}

/// npm's `@bazel/typescript` ts_project worker, installed by
/// `ci/ts-worker-install.sh` into the target directory; `None` (loudly)
/// when node or npm are missing and `REQUIRE_NODE_WORKER=1` is not set.
fn ts_worker() -> Option<String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ts-worker");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ci/ts-worker-install.sh");
    let required = std::env::var("REQUIRE_NODE_WORKER").is_ok_and(|v| v == "1");
    let installed = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .stderr(Stdio::inherit())
        .output();
    match installed {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        other => {
            let why = format!("{:?}", other.map(|o| o.status));
            assert!(
                !required,
                "REQUIRE_NODE_WORKER=1 but {} failed: {why}",
                script.display()
            );
            eprintln!(
                "\n*** SKIPPED: the TypeScript worker's card needs node and npm ({}: {why}); \
                 set REQUIRE_NODE_WORKER=1 to make this a failure ***\n",
                script.display()
            );
            None
        }
    }
}

#[test]
fn the_typescript_worker_card_says_singleplex_proto_without_eof_or_nativelink() {
    let Some(line) = ts_worker() else { return };
    let (_d, dir) = tempdir();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ts-worker/project");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::copy(fixture.join("tsconfig.json"), dir.join("tsconfig.json")).unwrap();
    for entry in std::fs::read_dir(fixture.join("src")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join("src").join(path.file_name().unwrap())).unwrap();
    }
    // The script's line is shell-quoted; its words hold no spaces here
    // (node's path and the install directory under target/).
    let worker: Vec<&str> = line.split_whitespace().collect();
    let args = [
        "--request",
        "--project tsconfig.json",
        "--only",
        "multiplex,nativelink",
        "--timeout-ms",
        "30000",
    ];
    let c = card(&dir, &args, &worker);
    for id in [
        "proto.roundtrip",
        "proto.sequence",
        "proto.ids",
        "proto.stdout",
        "proto.malformed",
    ] {
        c.assert_verdict(id, "supported");
    }
    // Its file watchers keep node alive after stdin closes.
    c.assert_verdict("proto.eof", "unsupported");
    c.assert_verdict("multiplex.ids", "unsupported");
    // It does not expand the @file NativeLink leaves to it.
    c.assert_verdict("engine.nativelink", "unsupported");
    assert_eq!(c.code, Some(1), "{}", c.json);
    assert!(c.json.contains("\"failed\": [\"proto.eof\"]"), "{}", c.json);
    // The compiler really ran: the fixture's outputs are there.
    assert!(dir.join("out/main.js").exists(), "{}", c.json);
}
