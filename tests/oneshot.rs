//! One-shot mode: the built binary run once per request, as a build tool's
//! fallback command.

mod common;

use common::run;
use std::fs;

#[test]
fn writes_the_file_and_brackets_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(&["out.txt"], dir.path(), b"");
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(
        fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "out.txt\n"
    );
    let lines: Vec<&str> = done.stderr.lines().collect();
    assert!(lines[0].starts_with("persistent-worker "), "{lines:?}");
    assert_eq!(lines[1], "ONE-SHOT START");
    assert_eq!(lines[2], "ONE-SHOT END");
    assert!(lines[3].contains("out.txt"), "{lines:?}");
    assert!(done.stdout.is_empty());
}

#[test]
fn arguments_and_options_come_from_argfiles() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("gen")).unwrap();
    fs::write(dir.path().join("opts"), "--work-ms\n1\n").unwrap();
    fs::write(dir.path().join("args"), "gen/a.out\n").unwrap();
    let done = run(&["@opts", "--flagfile=args"], dir.path(), b"");
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(
        fs::read_to_string(dir.path().join("gen/a.out")).unwrap(),
        "a.out\n"
    );
}

#[test]
fn literal_at_argument_survives() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(&["@@weird"], dir.path(), b"");
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(
        fs::read_to_string(dir.path().join("@weird")).unwrap(),
        "@weird\n"
    );
}

#[test]
fn wrong_argument_count_is_exit_2_with_usage() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&[][..], &["a", "b"][..]] {
        let done = run(args, dir.path(), b"");
        assert_eq!(done.status.code(), Some(2), "{args:?}: {}", done.stderr);
        assert!(done.stderr.contains("usage:"), "{}", done.stderr);
        assert!(done.stderr.contains("ONE-SHOT END"), "{}", done.stderr);
    }
}

#[test]
fn unwritable_path_is_exit_1_with_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(&["no/such/dir/out"], dir.path(), b"");
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(
        done.stderr.contains("No such file or directory"),
        "{}",
        done.stderr
    );
}

#[test]
fn missing_argfile_is_exit_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(&["out", "@missing.args"], dir.path(), b"");
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(done.stderr.contains("missing.args"), "{}", done.stderr);
}

#[test]
fn panicking_tool_is_exit_1_with_the_panic_text() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(&["--panic", "out"], dir.path(), b"");
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(done.stderr.contains("--panic was given"), "{}", done.stderr);
}

#[test]
fn worker_mode_rejects_unknown_options_with_usage() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(&["--bogus", "--persistent_worker"], dir.path(), b"");
    assert_eq!(done.status.code(), Some(2));
    assert!(
        done.stderr.contains("--bogus") && done.stderr.contains("usage:"),
        "{}",
        done.stderr
    );
    assert!(done.stdout.is_empty());
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let help = run(&["--help"], dir.path(), b"");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--persistent_worker"));
    let version = run(&["--version"], dir.path(), b"");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("persistent-worker {}", env!("CARGO_PKG_VERSION"))
    );
}
