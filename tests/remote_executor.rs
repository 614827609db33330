//! The worker driven exactly as a BuildBuddy-style remote executor drives it
//! (protocol facts §3): the action's command line is split into worker
//! arguments and flagfiles, the worker is started once with
//! `<worker args> --persistent_worker` and kept across actions, `@` files are
//! expanded by the executor, `--flagfile=` is passed through for the worker to
//! expand, inputs carry serialized REAPI digests, and in JSON mode every
//! field is written, defaults included.

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
