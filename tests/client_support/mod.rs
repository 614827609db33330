//! `worker-client` run as a separate process, bounded in time, its output
//! kept for assertions and echoed for the test's log.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const CLIENT: &str = env!("CARGO_BIN_EXE_worker-client");

/// Every run is bounded: a client that hangs is killed and the test fails.
pub const LIMIT: Duration = Duration::from_secs(60);

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn client(args: &[&str], cwd: &Path) -> Run {
    let child = Command::new(CLIENT)
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
