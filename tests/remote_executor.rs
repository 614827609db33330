//! The worker driven exactly as each remote engine drives it.
//!
//! The first two tests emulate a BuildBuddy-style executor by hand, in this
//! file (protocol facts §3): the action's command line is split into worker
//! arguments and flagfiles, the worker is started once with
//! `<worker args> --persistent_worker` and kept across actions, `@` files are
//! expanded by the executor, `--flagfile=` is passed through for the worker to
//! expand, inputs carry serialized REAPI digests, and in JSON mode every
//! field is written, defaults included.
//!
//! The rest drive the worker through `worker-client remote --engine`, whose
//! profiles follow §3 (BuildBuddy, Buildbarn's proposed support) and §3a
//! (NativeLink). NativeLink and Buildbarn cannot run here; these are
//! emulations of their documented behaviour, not the engines.

mod client_support;
mod common;

use std::fs;
use std::path::Path;

use common::{Worker, BIN};
use persistent_worker::proto::worker_protocol::{Input, WorkRequest};

fn is_flagfile(arg: &str) -> bool {
    arg.starts_with('@') || arg.starts_with("--flagfile") || arg.starts_with("-flagfile")
}

/// The executor's own `@` expansion: recursive, one argument per line, `@@x`
/// and `--flagfile=` left for the worker.
fn executor_expand(arg: &str, dir: &Path, out: &mut Vec<String>) {
    match arg.strip_prefix('@') {
        Some(name) if !name.starts_with('@') => {
            let text = fs::read_to_string(dir.join(name)).expect("read params file");
            for line in text.lines() {
                executor_expand(line.strip_suffix('\r').unwrap_or(line), dir, out);
            }
        }
        _ => out.push(arg.to_owned()),
    }
}

/// A REAPI `Digest { hash = 1: string, size_bytes = 2: int64 }`, serialized.
fn reapi_digest(hash: &str, size: u8) -> Vec<u8> {
    let mut bytes = vec![0x0a, hash.len() as u8];
    bytes.extend_from_slice(hash.as_bytes());
    bytes.extend_from_slice(&[0x10, size]);
    bytes
}

struct Action {
    command: Vec<String>,
    inputs: Vec<&'static str>,
}

fn run_actions(json: bool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("out")).unwrap();
    fs::write(
        root.join("opts.params"),
        "--work-ms\n0\r\n--flagfile=out.params\n",
    )
    .unwrap();
    fs::write(root.join("out.params"), "out/via-flagfile.txt\n").unwrap();
    fs::write(root.join("escaped.params"), "@@at-name.txt\n").unwrap();
    let protocol: &[&str] = if json {
        &["--worker-protocol", "json"]
    } else {
        &[]
    };
    let worker_prefix: Vec<String> = [BIN, "--concurrency", "1"]
        .iter()
        .chain(protocol)
        .map(|s| s.to_string())
        .collect();
    let actions = [
        Action {
            command: worker_prefix
                .iter()
                .cloned()
                .chain(["@opts.params".to_owned()])
                .collect(),
            inputs: vec!["opts.params", "out.params"],
        },
        Action {
            command: worker_prefix
                .iter()
                .cloned()
                .chain(["@escaped.params".to_owned()])
                .collect(),
            inputs: vec!["escaped.params"],
        },
    ];

    let mut worker: Option<(Vec<String>, Worker)> = None;
    for action in &actions {
        let (worker_args, flagfiles): (Vec<String>, Vec<String>) = action
            .command
            .iter()
            .cloned()
            .partition(|a| !is_flagfile(a));
        // One worker per distinct worker command line, kept across actions.
        let (key, running) = worker.get_or_insert_with(|| {
            let args: Vec<&str> = worker_args[1..].iter().map(String::as_str).collect();
            (worker_args.clone(), Worker::start(&args, root))
        });
        assert_eq!(*key, worker_args);
        let mut request = WorkRequest::new();
        for flagfile in &flagfiles {
            executor_expand(flagfile, root, &mut request.arguments);
        }
        for (i, path) in action.inputs.iter().enumerate() {
            let mut input = Input::new();
            input.path = path.to_string();
            input.digest = reapi_digest(&format!("{i:064x}"), 20 + i as u8);
            request.inputs.push(input);
        }
        if json {
            let options = protobuf_json_mapping::PrintOptions {
                always_output_default_values: true,
                ..Default::default()
            };
            let mut line =
                protobuf_json_mapping::print_to_string_with_options(&request, &options).unwrap();
            for field in [
                "\"requestId\"",
                "\"cancel\"",
                "\"verbosity\"",
                "\"sandboxDir\"",
                "\"digest\"",
            ] {
                assert!(line.contains(field), "executor writes every field: {line}");
            }
            line.push('\n');
            running.send_raw(line.as_bytes());
        } else {
            running.send(&request);
        }
        let response = running.recv();
        assert_eq!(response.request_id, 0);
        assert_eq!(response.exit_code, 0, "{}", response.output);
        assert!(
            response.output.starts_with("Bazel persistent worker "),
            "{}",
            response.output
        );
    }
    assert_eq!(
        fs::read_to_string(root.join("out/via-flagfile.txt")).unwrap(),
        "via-flagfile.txt\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("@at-name.txt")).unwrap(),
        "@at-name.txt\n"
    );
    let (_, running) = worker.expect("worker started");
    let (status, rest, _) = running.finish();
    assert!(status.success());
    assert!(rest.is_empty());
}

#[test]
fn remote_executor_proto() {
    run_actions(false);
}

#[test]
fn remote_executor_json_with_every_field_present() {
    run_actions(true);
}

// ---------------------------------------------------------------------------
// Through `worker-client remote --engine`.

use client_support::{client, Run};

const ENGINES: [&str; 3] = ["buildbuddy", "nativelink", "buildbarn"];

/// The `<- response 0: exit_code C after X ms` lines, in order: (code, ms).
fn responses(run: &Run) -> Vec<(i32, f64)> {
    run.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("<- response 0: exit_code "))
        .map(|rest| {
            let (code, rest) = rest.split_once(" after ").expect("response line");
            let ms = rest.strip_suffix(" ms").expect("ms");
            (code.parse().unwrap(), ms.parse().unwrap())
        })
        .collect()
}

/// The pid in each response's first line, `Bazel persistent worker <host>
/// <pid> <cwd> <id>`.
fn serving_pids(run: &Run) -> Vec<String> {
    run.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("   | Bazel persistent worker "))
        .map(|rest| rest.split(' ').nth(1).expect("pid").to_owned())
        .collect()
}

/// The example's worker for one flag set, as `examples/buck2/defs.bzl`
/// builds it: the flags literal on the command line and, for Buck2's
/// `persistentWorkerKey`, in a hidden artifact (`worker.key`) that changes
/// with them; the action adds its `@argfile`.
fn example_action(dir: &Path, work_ms: u32, concurrency: u32, out: &str) -> (String, String) {
    let flags = format!("--work-ms\n{work_ms}\n--concurrency\n{concurrency}\n");
    let key = format!("keys/{work_ms}-{concurrency}/worker.key");
    fs::create_dir_all(dir.join(&key).parent().unwrap()).unwrap();
    fs::write(dir.join(&key), flags).unwrap();
    let args = format!("{out}.args");
    fs::write(dir.join(&args), format!("out/{out}.txt\n")).unwrap();
    (
        format!("{BIN} --work-ms {work_ms} --concurrency {concurrency} @{args}"),
        key,
    )
}

/// Two flag sets of the example give two workers on every engine, and each
/// worker runs with its own flags: the slow set's requests take at least its
/// `--work-ms`, which a stale worker started with the fast set would not.
#[test]
fn the_examples_two_flag_sets_get_two_workers_on_every_engine() {
    const SLOW_MS: f64 = 400.0;
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("out")).unwrap();
        let (fast, fast_key) = example_action(d.path(), 0, 1, "fast");
        let (slow, slow_key) = example_action(d.path(), SLOW_MS as u32, 2, "slow");
        let r = client(
            &[
                "remote",
                "--engine",
                engine,
                "--repeat",
                "2",
                "--action",
                &fast,
                "--tool-input",
                &fast_key,
                "--action",
                &slow,
                "--tool-input",
                &slow_key,
            ],
            d.path(),
        );
        assert_eq!(r.code, Some(0), "{engine}");
        assert!(
            r.stdout
                .contains("4 action(s), 4 response(s): 0 failed; 2 distinct key(s)"),
            "{engine}: {}",
            r.stdout
        );
        assert_eq!(
            r.stdout.matches(" 1 worker(s) started").count(),
            2,
            "{engine}: {}",
            r.stdout
        );
        let answers = responses(&r);
        assert_eq!(answers.len(), 4, "{engine}");
        for (i, (code, ms)) in answers.iter().enumerate() {
            assert_eq!(*code, 0, "{engine}: response {i}");
            if i % 2 == 1 {
                assert!(*ms >= SLOW_MS, "{engine}: slow response {i} took {ms} ms");
            }
        }
        let pids = serving_pids(&r);
        assert_eq!(pids[0], pids[2], "{engine}: the fast worker is kept");
        assert_eq!(pids[1], pids[3], "{engine}: the slow worker is kept");
        assert_ne!(pids[0], pids[1], "{engine}");
        assert_eq!(
            fs::read_to_string(d.path().join("out/fast.txt")).unwrap(),
            "fast.txt\n"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("out/slow.txt")).unwrap(),
            "slow.txt\n"
        );
    }
}

/// What each engine files the example's workers under, for a rule author to
/// see: NativeLink the literal command line, BuildBuddy and Buildbarn the
/// key Buck2 derives from the hidden artifact. Without that artifact,
/// Buck2's key cannot tell the two flag sets apart.
#[test]
fn keys_are_printed_and_a_flag_outside_an_artifact_is_stale_under_buck2s_key() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("out")).unwrap();
    let (fast, fast_key) = example_action(d.path(), 0, 1, "fast");
    let (slow, slow_key) = example_action(d.path(), 5, 2, "slow");
    let r = client(
        &[
            "remote",
            "--engine",
            "nativelink",
            "--action",
            &fast,
            "--tool-input",
            &fast_key,
            "--action",
            &slow,
            "--tool-input",
            &slow_key,
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(r
        .stdout
        .contains(&format!("key: {BIN} --work-ms 0 --concurrency 1 [proto]")));
    assert!(r
        .stdout
        .contains(&format!("key: {BIN} --work-ms 5 --concurrency 2 [proto]")));
    // The same two command lines with no artifact: one key under Buck2's
    // rule, so one worker serves both (the stale-worker trap).
    let r = client(
        &[
            "remote",
            "--engine",
            "buildbuddy",
            "--action",
            &fast,
            "--action",
            &slow,
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("1 distinct key(s)"), "{}", r.stdout);
    let pids = serving_pids(&r);
    assert_eq!(pids[0], pids[1], "{}", r.stdout);
}

/// NativeLink's shape: the worker starts in the engine's root, each request
/// names the action's directory by an absolute `sandbox_dir`, `@args` (and
/// the `--flagfile=` inside it) resolve there, the output lands in the
/// action's directory (collected from there), not in the root; stderr goes
/// to /dev/null. Both wire formats.
#[test]
fn nativelink_absolute_sandbox_dir_with_args_relative_to_it() {
    for json in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("out")).unwrap();
        fs::write(d.path().join("args"), "--flagfile=more\n").unwrap();
        fs::write(d.path().join("more"), "out/nl.txt\n").unwrap();
        let root_path = root.path().canonicalize().unwrap();
        let root_arg = root_path.to_str().unwrap();
        let mut args = vec![
            "remote",
            "--engine",
            "nativelink",
            "--root",
            root_arg,
            "--worker-stderr",
        ];
        if json {
            args.push("--json");
        }
        args.extend(["--", BIN, "--concurrency", "1"]);
        if json {
            args.extend(["--worker-protocol", "json"]);
        }
        args.push("@args");
        let r = client(&args, d.path());
        assert_eq!(r.code, Some(0), "json {json}");
        let action_dir = root_path.join("op-1/work");
        assert!(
            r.stdout.contains(&format!(
                "-> request 0: [\"@args\"] in sandbox_dir {}",
                action_dir.display()
            )),
            "{}",
            r.stdout
        );
        assert!(
            r.stdout.contains(&format!(") in {root_arg}\n")),
            "{}",
            r.stdout
        );
        // The worker's own cwd line names the root; the output was written
        // in the action's directory and collected from there.
        assert!(
            r.stdout.contains(&format!(" {root_arg} 0\n")),
            "{}",
            r.stdout
        );
        assert!(
            r.stdout.contains("outputs collected: [\"out/nl.txt\"]"),
            "{}",
            r.stdout
        );
        assert_eq!(
            fs::read_to_string(d.path().join("out/nl.txt")).unwrap(),
            "nl.txt\n"
        );
        assert!(!root_path.join("out").exists());
        // Discarded: even --worker-stderr shows nothing of the worker's log.
        assert!(
            !r.stderr.contains("persistent-worker: Bazel worker"),
            "{}",
            r.stderr
        );
    }
}

/// NativeLink retires a worker after 200 requests: the 201st goes to a
/// fresh one, and the retired one exits within the 5 s it is given after
/// its stdin closes (it would be killed otherwise, and the note says so).
#[test]
fn nativelink_retires_a_worker_after_200_requests() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("args"), "out.txt\n").unwrap();
    let r = client(
        &[
            "remote",
            "--engine",
            "nativelink",
            "--repeat",
            "201",
            "--",
            BIN,
            "--work-ms",
            "0",
            "@args",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(r
        .stdout
        .contains("201 action(s), 201 response(s): 0 failed; 1 distinct key(s)"));
    assert!(r.stdout.contains(" 2 worker(s) started"), "{}", r.stdout);
    let pids = serving_pids(&r);
    assert_eq!(pids.len(), 201);
    assert!(pids[..200].iter().all(|p| *p == pids[0]));
    assert_ne!(pids[200], pids[0]);
    assert!(
        r.stdout.contains(&format!(
            "retired worker pid {} after 200 requests: the worker exited cleanly when stdin closed",
            pids[0]
        )),
        "{}",
        r.stdout
    );
    assert!(r
        .stdout
        .contains("the worker exited cleanly when stdin closed"));
    assert!(!r.stdout.contains("killed it"), "{}", r.stdout);
}

/// Buildbarn's proposed shape: `--persistent_worker` appended last, several
/// `@file` arguments anywhere in the command, their lines concatenated into
/// the request, no `sandbox_dir`, no inputs.
#[test]
fn buildbarn_several_at_files_anywhere_and_persistent_worker_last() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("out")).unwrap();
    fs::write(d.path().join("opts.args"), "--work-ms\n0\n").unwrap();
    fs::write(d.path().join("out.args"), "out/bb.txt\n").unwrap();
    let r = client(
        &[
            "remote",
            "--engine",
            "buildbarn",
            "--input",
            "opts.args",
            "--",
            BIN,
            "@opts.args",
            "--concurrency",
            "1",
            "@out.args",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains(&format!(
            "started `{BIN} --concurrency 1 --persistent_worker` (pid"
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("-> request 0: [\"--work-ms\", \"0\", \"out/bb.txt\"]\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("note: buildbarn sends no inputs"),
        "{}",
        r.stdout
    );
    assert_eq!(
        fs::read_to_string(d.path().join("out/bb.txt")).unwrap(),
        "bb.txt\n"
    );
    assert!(r
        .stdout
        .contains("the worker exited cleanly when stdin closed"));
}

/// NativeLink keeps up to 4 workers per key, one request each: five actions
/// of one key at once start four workers and run the fifth one-shot, in its
/// own action directory. The work is long enough that no worker is free
/// again before all five have asked for one.
#[test]
fn nativelink_runs_a_fifth_concurrent_action_of_a_key_one_shot() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("out")).unwrap();
    fs::write(d.path().join("args"), "out/five.txt\n").unwrap();
    let r = client(
        &[
            "remote",
            "--engine",
            "nativelink",
            "--concurrency",
            "5",
            "--repeat",
            "5",
            "--",
            BIN,
            "--work-ms",
            "2000",
            "@args",
        ],
        d.path(),
    );
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains(" 4 worker(s) started")
            && r.stdout.contains("1 one-shot (every worker busy)"),
        "{}",
        r.stdout
    );
    assert_eq!(serving_pids(&r).len(), 4, "{}", r.stdout);
    assert_eq!(
        r.stdout
            .matches("   one-shot (all 4 workers of this key busy): exited with status 0")
            .count(),
        1
    );
    assert!(r.stdout.contains("ONE-SHOT START"), "{}", r.stdout);
    assert_eq!(
        fs::read_to_string(d.path().join("out/five.txt")).unwrap(),
        "five.txt\n"
    );
}
