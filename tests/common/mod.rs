//! Test support: the worker binary as a real child process over real pipes,
//! with every wait bounded so a broken worker fails a test instead of
//! hanging it.

#![allow(dead_code)]

pub mod buck2;
pub mod lines;

use std::fmt::Debug;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};

pub const BIN: &str = env!("CARGO_BIN_EXE_persistent-worker");
pub const WAIT: Duration = Duration::from_secs(20);

/// A running worker. Responses are decoded on a reader thread as they arrive
/// and stamped with the time the test saw them; requests are written on a
/// writer thread, so a worker that stops reading fails the test.
pub struct Worker {
    input: Input,
    format: WireFormat,
    responses: Receiver<Result<(Instant, WorkResponse), String>>,
    process: Watched,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_done: Receiver<()>,
}

/// What a finished process left behind.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

fn spawn(args: &[&str], dir: &Path) -> Child {
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
fn collect_stderr(child: &mut Child) -> (Arc<Mutex<Vec<u8>>>, Receiver<()>) {
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

/// A child whose exit a thread waits for without reaping it: until the test
/// has taken the status, the pid stays the child's (a zombie at worst), so a
/// kill can never reach a process that took over a recycled pid.
pub struct Watched {
    pid: i32,
    exited: Receiver<Child>,
    status: Option<ExitStatus>,
}

impl Watched {
    pub fn new(child: Child) -> Watched {
        let pid = child.id() as i32;
        let (tx, exited) = bounded(1);
        thread::spawn(move || {
            loop {
                // SAFETY: waits for our own child; WNOWAIT leaves it unreaped.
                let rc = unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOWAIT,
                    )
                };
                if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
            // Nobody took it: reap it here.
            if let Err(unsent) = tx.send(child) {
                let _ = unsent.into_inner().wait();
            }
        });
        Watched {
            pid,
            exited,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit status, if the process exits within `limit`; reaps it.
    pub fn exited_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut child = self.exited.recv_timeout(limit).ok()?;
            self.status = Some(child.wait().expect("reaping an exited child"));
        }
        self.status
    }

    /// SIGKILL unless it has already exited, then reaps it.
    pub fn kill(&mut self) {
        if self.exited_within(Duration::ZERO).is_none() {
            // SAFETY: the child is not reaped, so the pid is still its own.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.exited_within(WAIT);
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The child's stdin behind a thread: each write is confirmed on a channel,
/// so the test waits for it with a bound.
struct Input {
    jobs: Option<Sender<Vec<u8>>>,
    written: Receiver<io::Result<()>>,
}

impl Input {
    fn new(mut stdin: impl Write + Send + 'static) -> Input {
        let (jobs, todo) = unbounded::<Vec<u8>>();
        let (done, written) = unbounded();
        thread::spawn(move || {
            for bytes in todo {
                let result = stdin.write_all(&bytes).and_then(|()| stdin.flush());
                if done.send(result).is_err() {
                    break;
                }
            }
            // The end of `todo` drops stdin: the child reads EOF.
        });
        Input {
            jobs: Some(jobs),
            written,
        }
    }

    /// Writes `bytes`: `Ok` once they are all in the pipe, `Err` with what
    /// went wrong, or with `None` if that took longer than `limit`.
    fn write(&self, bytes: Vec<u8>, limit: Duration) -> Result<(), Option<io::Error>> {
        let len = bytes.len();
        self.jobs
            .as_ref()
            .expect("stdin still open")
            .send(bytes)
            .map_err(|_| {
                Some(io::Error::other(format!(
                    "writer thread gone ({len} bytes)"
                )))
            })?;
        match self.written.recv_timeout(limit) {
            Ok(result) => result.map_err(Some),
            Err(_) => Err(None),
        }
    }

    fn close(&mut self) {
        self.jobs = None;
    }
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
        let input = Input::new(child.stdin.take().expect("stdin pipe"));
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
            input,
            format,
            responses,
            process: Watched::new(child),
            stderr,
            stderr_done,
        }
    }

    #[track_caller]
    pub fn send(&mut self, request: &WorkRequest) {
        let bytes = self.format.encode_request(request);
        self.send_owned(bytes);
    }

    #[track_caller]
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.send_owned(bytes.to_vec());
    }

    /// Returns once the worker has taken all but a pipe's worth of `bytes`;
    /// a worker that stops reading fails the test within [`WAIT`].
    #[track_caller]
    fn send_owned(&mut self, bytes: Vec<u8>) {
        let len = bytes.len();
        match self.input.write(bytes, WAIT) {
            Ok(()) => {}
            Err(Some(e)) => panic!(
                "writing {len} bytes of input: {e}\nstderr: {}",
                self.stderr()
            ),
            Err(None) => {
                self.process.kill();
                panic!(
                    "the worker did not read {len} bytes of input within {WAIT:?}\nstderr: {}",
                    self.stderr()
                );
            }
        }
    }

    /// Next response, with the time it arrived.
    #[track_caller]
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

    #[track_caller]
    pub fn recv(&self) -> WorkResponse {
        self.recv_timed().1
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// The exit status, if the worker exits within `limit`.
    pub fn exited_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.process.exited_within(limit)
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits, within [`WAIT`], until the worker's log contains `text`: the
    /// log is read by a thread of its own, so a line written before a
    /// response may reach the test after it.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "log never said {text:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Closes stdin; returns the exit status, the responses not yet
    /// received, and everything the worker wrote to stderr. Each wait is
    /// bounded by [`WAIT`].
    #[track_caller]
    pub fn finish(mut self) -> (ExitStatus, Vec<WorkResponse>, String) {
        self.input.close();
        let Some(status) = self.process.exited_within(WAIT) else {
            self.process.kill();
            panic!("worker did not exit after EOF\nstderr: {}", self.stderr());
        };
        // The worker is gone; its stdout ends as soon as nobody else holds it.
        let deadline = Instant::now() + WAIT;
        let mut rest = Vec::new();
        loop {
            match self
                .responses
                .recv_deadline(deadline)
            {
                Ok(Ok((_, r))) => rest.push(r),
                Ok(Err(e)) => panic!(
                    "undecodable response stream after {} response(s) {rest:?}: {e}\nexit: {status}\nstderr: {}",
                    rest.len(),
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "stdout still open {WAIT:?} after the worker exited ({status})\nstderr: {}",
                    self.stderr()
                ),
            }
        }
        if self.stderr_done.recv_deadline(deadline).is_err() {
            panic!(
                "stderr still open {WAIT:?} after the worker exited ({status})\nstderr: {}",
                self.stderr()
            );
        }
        (status, rest, self.stderr())
    }

    /// [`finish`](Self::finish), requiring exit status 0 and no response
    /// left unread; a failure shows all three. Returns the stderr.
    #[track_caller]
    pub fn finish_cleanly(self) -> String {
        let (status, rest, stderr) = self.finish();
        assert_clean_exit(status, &rest, &stderr);
        stderr
    }
}

/// Exit status 0 and nothing left on the protocol stream, or a failure that
/// says which it was and what the worker said.
#[track_caller]
pub fn assert_clean_exit(status: ExitStatus, rest: &[impl Debug], stderr: &str) {
    assert!(
        status.success() && rest.is_empty(),
        "expected exit status 0 and no further responses; got {status} and {} response(s): {rest:?}\nstderr:\n{stderr}",
        rest.len()
    );
}

/// Runs the binary to completion with `input` on stdin, bounded by [`WAIT`].
#[track_caller]
pub fn run(args: &[&str], dir: &Path, input: &[u8]) -> Finished {
    let mut child = spawn(args, dir);
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
    let mut process = Watched::new(child);
    let Some(status) = process.exited_within(WAIT) else {
        process.kill();
        panic!(
            "{args:?} did not exit within {WAIT:?}\nstderr: {}",
            String::from_utf8_lossy(&stderr.lock().unwrap())
        );
    };
    let deadline = Instant::now() + WAIT;
    let stdout = out_rx
        .recv_deadline(deadline)
        .unwrap_or_else(|_| panic!("{args:?}: stdout still open {WAIT:?} after exit ({status})"));
    stderr_done
        .recv_deadline(deadline)
        .unwrap_or_else(|_| panic!("{args:?}: stderr still open {WAIT:?} after exit ({status})"));
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
