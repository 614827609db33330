//! A Buck2-protocol worker (or `--bridge`) as a real child process on its
//! own socket: started, waited for until it listens, signalled, finished.
//! Every wait is bounded, and a failure shows what the worker logged.
//!
//! Connecting to it is the test's: the gRPC client differs between test
//! files, and none of it belongs here.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::lines::Lines;
use super::{Watched, BIN};

/// How long a worker may take to listen: start-up is a few milliseconds,
/// the rest is for a loaded machine.
pub const LISTENING: Duration = Duration::from_secs(10);

/// A running worker and the lines of its stderr and stdout (where a tool
/// under test may mark how far it got).
pub struct Buck2Worker {
    process: Watched,
    socket: PathBuf,
    pub lines: Lines,
}

impl Buck2Worker {
    /// Starts `persistent-worker <args>` in `dir` on `dir/socket` and waits
    /// until it listens.
    #[track_caller]
    pub fn start(dir: &Path, args: &[&str]) -> Buck2Worker {
        Buck2Worker::start_at(dir, &dir.join("socket"), args)
    }

    /// [`start`](Self::start) with the socket at `socket`.
    #[track_caller]
    pub fn start_at(dir: &Path, socket: &Path, args: &[&str]) -> Buck2Worker {
        let mut child = Command::new(BIN)
            .args(args)
            .env("WORKER_SOCKET", socket)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the worker");
        let streams: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stderr.take().expect("piped stderr")),
            Box::new(child.stdout.take().expect("piped stdout")),
        ];
        let mut worker = Buck2Worker {
            process: Watched::new(child),
            socket: socket.to_path_buf(),
            lines: Lines::of(streams),
        };
        worker.lines.expect_line("listening on", LISTENING);
        worker
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.process.pid() as u32
    }

    /// See [`Lines::expect_line`]: each line is handed out once.
    #[track_caller]
    pub fn expect_line(&mut self, needle: &str, limit: Duration) -> String {
        self.lines.expect_line(needle, limit)
    }

    /// See [`Lines::expect_lines`].
    #[track_caller]
    pub fn expect_lines(&mut self, needle: &str, count: usize, limit: Duration) -> String {
        self.lines.expect_lines(needle, count, limit)
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: our own child, not reaped until the test takes its status,
        // so the pid cannot have gone to another process.
        let rc = unsafe { libc::kill(self.process.pid(), signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits up to `limit` for the worker to exit, reading the rest of its
    /// output; returns its status and every line it wrote.
    #[track_caller]
    pub fn finish(mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + limit;
        if !self.lines.until_closed(limit) {
            panic!(
                "worker did not exit within {limit:?}; stderr:\n{}",
                self.lines.text()
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(status) = self.process.exited_within(left) else {
            panic!(
                "worker closed its output but did not exit within {limit:?}; stderr:\n{}",
                self.lines.text()
            );
        };
        (status, self.lines.log())
    }
}
