//! `worker-client` run as a separate process, bounded in time, its output
//! kept for assertions and echoed for the test's log.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `worker-client` is its own crate in this workspace, and Cargo hands a test
/// only its own package's binaries; the shared target directory puts the
/// client beside the worker. `cargo test` does not rebuild that binary (it
/// builds a package's binaries only for that package's own integration
/// tests), so a client left by an older build would be tested in place of
/// the current source: the first test that needs the client asks Cargo for
/// it, once per test process (nothing to do when it is current).
/// `ci/test-static.sh` puts the shipped static client there instead and sets
/// `WORKER_CLIENT_PREBUILT=1`, so that nothing replaces it.
pub fn client_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let path = Path::new(env!("CARGO_BIN_EXE_persistent-worker")).with_file_name("worker-client");
    let built = BUILT.get_or_init(|| {
        if std::env::var_os("WORKER_CLIENT_PREBUILT").is_some() {
            return if path.is_file() {
                Ok(path.clone())
            } else {
                Err(format!(
                    "WORKER_CLIENT_PREBUILT is set but {} is missing",
                    path.display()
                ))
            };
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo)
            .args(["build", "--quiet", "-p", "worker-client"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .spawn()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        // Bounded like every wait here: a first build of the client alone
        // takes about a minute on 2 cores (the worker's build made the rest),
        // a check that it is current well under a second.
        let pid = build.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(build.wait());
        });
        let Ok(Ok(status)) = rx.recv_timeout(Duration::from_secs(1200)) else {
            // SAFETY: signals the cargo process this function started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err("`cargo build -p worker-client` did not finish in 20 minutes".to_owned());
        };
        if status.success() && path.is_file() {
            Ok(path.clone())
        } else {
            Err(format!(
                "`cargo build -p worker-client` did not give {}",
                path.display()
            ))
        }
    });
    built
        .clone()
        .unwrap_or_else(|e| panic!("worker-client: {e}"))
}

/// Every run is bounded: a client that hangs is killed and the test fails.
pub const LIMIT: Duration = Duration::from_secs(60);

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn client(args: &[&str], cwd: &Path) -> Run {
    let child = Command::new(client_binary())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start worker-client");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output: Output = match rx.recv_timeout(LIMIT) {
        Ok(result) => result.expect("wait for worker-client"),
        Err(_) => {
            // SAFETY: signals the client process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("worker-client {args:?} did not finish within {LIMIT:?}");
        }
    };
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!(
        "$ worker-client {}\n--- stdout\n{}--- stderr\n{}--- exit {:?}",
        args.join(" "),
        run.stdout,
        run.stderr,
        run.code
    );
    run
}
