//! A real compiler worker behind the bridge: the TypeScript ts_project
//! worker of npm's `@bazel/typescript`, installed by `ci/ts-worker-install.sh`,
//! compiles `testdata/ts-worker/project` for a Buck2 client
//! (`worker-client buck2`) through `persistent-worker --bridge`.
//!
//! Needs node and npm (and the npm registry, the first time): without them
//! the tests are skipped with a loud note (written past the harness's
//! capture, so a plain `cargo test` shows it), unless
//! `REQUIRE_NODE_WORKER=1` makes that a failure.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod client_support;

const BIN: &str = env!("CARGO_BIN_EXE_persistent-worker");
/// Starting node and TypeScript and checking the fixture takes seconds; a
/// loaded machine can make it many.
const LIMIT: Duration = Duration::from_secs(180);

/// The worker's command line as the install script prints it (shell-quoted),
/// or `None` when it could not be installed and that may be skipped.
/// Installed once per test run, into the target directory.
fn worker_line() -> Option<String> {
    static LINE: OnceLock<Option<String>> = OnceLock::new();
    LINE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ts-worker");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ci/ts-worker-install.sh");
        let installed = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .stderr(Stdio::inherit())
            .output();
        let required = std::env::var("REQUIRE_NODE_WORKER").is_ok_and(|v| v == "1");
        match installed {
            Ok(out) if out.status.success() => {
                let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                assert!(!line.is_empty(), "the install script printed no command");
                Some(line)
            }
            other => {
                let why = match other {
                    Ok(out) => format!("it exited with {}", out.status),
                    Err(e) => format!("it could not run: {e}"),
                };
                assert!(
                    !required,
                    "REQUIRE_NODE_WORKER=1 but {} {} failed: {why}",
                    script.display(),
                    dir.display()
                );
                // Straight to the process's stderr: the harness captures
                // `eprintln!` of a passing test, which would hide the skip.
                let notice = format!(
                    "\n*** SKIPPED: the TypeScript worker tests need node and npm ({} {}: \
                     {why}); set REQUIRE_NODE_WORKER=1 to make this a failure ***\n",
                    script.display(),
                    dir.display()
                );
                let _ = std::io::stderr().lock().write_all(notice.as_bytes());
                None
            }
        }
    })
    .clone()
}

/// A fresh copy of the fixture project (the worker writes `out/` into it).
fn project() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("project");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ts-worker/project");
    fs::create_dir_all(dir.join("src")).unwrap();
    fs::copy(fixture.join("tsconfig.json"), dir.join("tsconfig.json")).unwrap();
    for entry in fs::read_dir(fixture.join("src")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join("src").join(path.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

/// `worker-client buck2` sending `--project tsconfig.json` to the bridge in
/// front of the worker, in `dir`, `repeat` times, one after another. The
/// worker's command goes through `sh` so that its quoting is the shell's,
/// as the script promises; `exec` keeps node the bridge's child. Returns
/// the client's exit status and its output (stdout, then stderr).
fn compile_through_bridge(line: &str, dir: &Path, repeat: usize) -> (ExitStatus, String) {
    let out_path = dir.join("client.out");
    let out = fs::File::create(&out_path).unwrap();
    let err = out.try_clone().unwrap();
    let mut child = Command::new(client_support::client_binary())
        .args(["buck2", "--timeout-ms", "150000"])
        .args(["--repeat", &repeat.to_string()])
        .args(["--request", "--project tsconfig.json", "--"])
        .args([BIN, "--verbose", "--bridge", "--"])
        .args(["sh", "-c", &format!("exec {line} \"$@\""), "sh"])
        .current_dir(dir)
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "worker-client did not finish within {LIMIT:?}:\n{}",
                fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, fs::read_to_string(&out_path).unwrap())
}

/// The child pids the bridge's `--verbose` lines name, one per answer.
fn answering_children(output: &str) -> Vec<u32> {
    output
        .lines()
        .filter_map(|line| line.split("answered by child pid ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Processes whose working directory is `dir`: after the client has ended,
/// only a worker the bridge failed to stop (node, whose file watchers keep
/// it alive after its stdin closes) can be one.
fn processes_in(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes of other users, or gone meanwhile, cannot be read.
        if fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == dir) {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

#[test]
fn the_ts_project_worker_compiles_a_project_through_the_bridge() {
    let Some(line) = worker_line() else { return };
    let (_tmp, dir) = project();
    let (status, output) = compile_through_bridge(&line, &dir, 2);
    assert!(status.success(), "{output}");
    assert_eq!(output.matches("exit_code 0").count(), 2, "{output}");
    // The rebuild is the point of a persistent compiler: the child that
    // compiled the project first answers the second request too.
    let children = answering_children(&output);
    assert_eq!(children.len(), 2, "the bridge did not serve both: {output}");
    assert_eq!(
        children[0], children[1],
        "the rebuild went to a new child: {output}"
    );
    let main = fs::read_to_string(dir.join("out/main.js")).unwrap_or_default();
    assert!(
        main.contains("require(\"./greet\")"),
        "out/main.js: {main}\n{output}"
    );
    let greet = fs::read_to_string(dir.join("out/greet.d.ts")).unwrap_or_default();
    assert!(
        greet.contains("export declare function greet(g: Greeting): string;"),
        "out/greet.d.ts: {greet}\n{output}"
    );
}

#[test]
fn a_type_error_comes_back_as_exit_code_1_with_the_diagnostic() {
    let Some(line) = worker_line() else { return };
    let (_tmp, dir) = project();
    fs::write(
        dir.join("src/bad.ts"),
        "export const count: number = \"three\";\n",
    )
    .unwrap();
    let (status, output) = compile_through_bridge(&line, &dir, 1);
    // worker-client: 1 means a request failed while the worker kept to the
    // protocol.
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("exit_code 1"), "{output}");
    assert!(
        output.contains("src/bad.ts(1,14): error TS2322"),
        "the diagnostic did not come back: {output}"
    );
}

#[test]
fn no_compiler_outlives_the_bridge() {
    let Some(line) = worker_line() else { return };
    let (_tmp, dir) = project();
    let (status, output) = compile_through_bridge(&line, &dir, 1);
    assert!(status.success(), "{output}");
    // The client has stopped the bridge and reaped it; the bridge stops its
    // child (it closes its stdin, then kills it, since node stays). The
    // kill lands at once, but the kernel may take a moment to reap a
    // process on a loaded machine: poll, with a generous bound.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_in(&dir);
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            // Left running, this worker would never end: kill what the
            // failing run left behind before reporting it.
            for process in &left {
                if let Some(pid) = process.split(':').next().and_then(|p| p.parse().ok()) {
                    // SAFETY: signals a process this test's run started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            panic!("still running after the client ended: {left:?}\n{output}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
