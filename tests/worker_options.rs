//! `--worker-options FILE`: worker options read from a file that a build rule
//! writes, so that the file (an artifact) defines the worker's identity.

mod common;

use common::run;
use std::fs;

#[test]
fn the_worker_honours_its_options_file() {
    let dir = tempfile::tempdir().unwrap();
    // JSON framing can only be chosen by the file here: a proto worker would
    // fail to read this request and never write out.txt.
    fs::write(dir.path().join("w.opts"), "--worker-protocol\njson\n").unwrap();
    let done = run(
        &["--worker-options", "w.opts", "--persistent_worker"],
        dir.path(),
        b"{\"arguments\":[\"out.txt\"],\"requestId\":1}\n",
    );
    assert!(done.status.success(), "{}", done.stderr);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        stdout.trim_start().starts_with('{') && stdout.contains("\"requestId\": 1"),
        "{stdout}"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "out.txt\n"
    );
}

#[test]
fn two_option_sets_are_two_files_and_two_behaviours() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("quiet.opts"), "--work-ms\n0\n").unwrap();
    fs::write(dir.path().join("loud.opts"), "--work-ms\n0\n--verbose\n").unwrap();
    let request = b"{\"arguments\":[\"out.txt\"],\"requestId\":3}\n";
    let stderr_of = |file: &str| {
        let opts = fs::read_to_string(dir.path().join(file)).unwrap();
        let done = run(
            &[
                "--worker-protocol",
                "json",
                "--worker-options",
                file,
                "--persistent_worker",
            ],
            dir.path(),
            request,
        );
        assert!(done.status.success(), "{opts}: {}", done.stderr);
        done.stderr
    };
    let quiet = stderr_of("quiet.opts");
    let loud = stderr_of("loud.opts");
    // --verbose logs each request; only the file says so.
    assert!(!quiet.contains("out.txt"), "{quiet}");
    assert!(loud.contains("out.txt"), "{loud}");
}

#[test]
fn a_bad_options_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("bad.opts"), "--concurrency\nlots\n").unwrap();
    for file in ["bad.opts", "missing.opts"] {
        let done = run(
            &["--worker-options", file, "--persistent_worker"],
            dir.path(),
            b"",
        );
        assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
        assert!(done.stderr.contains(file), "{}", done.stderr);
        assert!(done.stdout.is_empty());
    }
}
