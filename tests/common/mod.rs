//! Test support: the worker binary as a real child process over real pipes,
//! with every wait bounded so a broken worker fails a test instead of
//! hanging it.

#![allow(dead_code)]

use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError};
use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};

pub const BIN: &str = env!("CARGO_BIN_EXE_persistent-worker");
pub const WAIT: Duration = Duration::from_secs(20);

/// A running worker. Responses are decoded on a reader thread as they arrive
/// and stamped with the time the test saw them.
pub struct Worker {
    pub stdin: Option<ChildStdin>,
    format: WireFormat,
    responses: Receiver<Result<(Instant, WorkResponse), String>>,
    exit: Receiver<ExitStatus>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_done: Receiver<()>,
    pid: i32,
}

/// What a finished process left behind.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

fn spawn(args: &[&str], dir: &Path) -> std::process::Child {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("WORKER_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

/// Copies the child's stderr into a buffer; the receiver fires at its EOF.
fn collect_stderr(child: &mut std::process::Child) -> (Arc<Mutex<Vec<u8>>>, Receiver<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut pipe = child.stderr.take().expect("stderr pipe");
    let sink = Arc::clone(&buf);
    let (done_tx, done) = bounded(1);
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
        let _ = done_tx.send(());
    });
    (buf, done)
}

fn watch_exit(mut child: std::process::Child) -> Receiver<ExitStatus> {
    let (tx, rx) = bounded(1);
    thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = tx.send(status);
        }
    });
    rx
}

fn kill(pid: i32) {
    // SAFETY: sending a signal to our own child's pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

impl Worker {
    /// Starts `persistent-worker <args> --persistent_worker` in `dir`.
    pub fn start(args: &[&str], dir: &Path) -> Worker {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--persistent_worker");
        let format = if args.windows(2).any(|w| w == ["--worker-protocol", "json"]) {
            WireFormat::Json
        } else {
            WireFormat::Proto
        };
        let mut child = spawn(&all, dir);
        let pid = child.id() as i32;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout pipe");
        let (stderr, stderr_done) = collect_stderr(&mut child);
        let (tx, responses) = unbounded();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                match format.read_response(&mut reader, 1 << 30) {
                    Ok(Some(r)) => {
                        if tx.send(Ok((Instant::now(), r))).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        break;
                    }
                }
            }
        });
        Worker {
            stdin,
            format,
            responses,
            exit: watch_exit(child),
            stderr,
            stderr_done,
            pid,
        }
    }

    pub fn send(&mut self, request: &WorkRequest) {
        let bytes = self.format.encode_request(request);
        self.send_raw(&bytes);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(bytes).expect("write request");
        stdin.flush().expect("flush request");
    }

    /// Next response, with the time it arrived.
    pub fn recv_timed(&self) -> (Instant, WorkResponse) {
        match self.responses.recv_timeout(WAIT) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!(
                "undecodable response stream: {e}\nstderr: {}",
                self.stderr()
            ),
            Err(RecvTimeoutError::Timeout) => {
                panic!("no response within {WAIT:?}\nstderr: {}", self.stderr())
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("worker closed stdout\nstderr: {}", self.stderr())
            }
        }
    }

    pub fn recv(&self) -> WorkResponse {
        self.recv_timed().1
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit status, if the worker exits within `limit`.
    pub fn exited_within(&self, limit: Duration) -> Option<ExitStatus> {
        self.exit.recv_timeout(limit).ok()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Closes stdin; returns the exit status, the responses not yet
    /// received, and everything the worker wrote to stderr.
    pub fn finish(mut self) -> (ExitStatus, Vec<WorkResponse>, String) {
        self.stdin.take();
        let status = match self.exit.recv_timeout(WAIT) {
            Ok(status) => status,
            Err(_) => {
                kill(self.pid);
                panic!("worker did not exit after EOF\nstderr: {}", self.stderr());
            }
        };
        let rest = self
            .responses
            .iter()
            .map(|r| r.expect("valid response").1)
            .collect();
        let _ = self.stderr_done.recv_timeout(WAIT);
        (status, rest, self.stderr())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exit.try_recv().is_err() {
            kill(self.pid);
        }
    }
}

/// Runs the binary to completion with `input` on stdin, bounded by [`WAIT`].
pub fn run(args: &[&str], dir: &Path, input: &[u8]) -> Finished {
    let mut child = spawn(args, dir);
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // The worker may exit before reading everything; a broken pipe is fine.
    thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let (out_tx, out_rx) = bounded(1);
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        let _ = out_tx.send(buf);
    });
    let (stderr, stderr_done) = collect_stderr(&mut child);
    let exit = watch_exit(child);
    let status = match exit.recv_timeout(WAIT) {
        Ok(status) => status,
        Err(_) => {
            kill(pid);
            panic!(
                "{args:?} did not exit within {WAIT:?}\nstderr: {}",
                String::from_utf8_lossy(&stderr.lock().unwrap())
            );
        }
    };
    let stdout = out_rx.recv_timeout(WAIT).unwrap_or_default();
    let _ = stderr_done.recv_timeout(WAIT);
    let stderr_text = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    Finished {
        status,
        stdout,
        stderr: stderr_text,
    }
}

pub fn request(id: i32, args: &[&str]) -> WorkRequest {
    let mut r = WorkRequest::new();
    r.request_id = id;
    r.arguments = args.iter().map(|s| s.to_string()).collect();
    r
}

pub fn cancel(id: i32) -> WorkRequest {
    let mut r = WorkRequest::new();
    r.request_id = id;
    r.cancel = true;
    r
}
