//! One child process of the bridge: a Bazel-protocol worker started as
//! `CMD ARGS... --persistent_worker`, its stdin and stdout framed with the
//! crate's own codec, its stderr relayed line by line with its pid in front.
//!
//! A reader thread owns stdout and hands each response to whoever waits for
//! its `request_id`. Anything wrong on that stream (end of output, a frame
//! that does not decode, an id nobody asked for) is a fault: the child is
//! killed and every waiting request gets one message that names the command,
//! how the process ended and the last lines of its stderr.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use super::env_key::EnvKey;
use crate::bazel::WireFormat;
use crate::proto::worker_protocol::{WorkRequest, WorkResponse};
use crate::request::lock;

/// Stderr lines kept for error messages.
const TAIL_LINES: usize = 10;
/// How long a child whose stdout ended may take to exit on its own before it
/// is killed, so its real exit status can be reported.
const EXIT_WAIT: Duration = Duration::from_millis(300);
/// How long to wait for the rest of a dead child's stderr.
const STDERR_WAIT: Duration = Duration::from_millis(500);

/// What a waiting request receives: the child's response or why none came.
pub type Outcome = Result<WorkResponse, String>;

/// How to start a child.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `CMD ARGS...`; `--persistent_worker` is appended when spawning.
    pub command: Vec<String>,
    pub protocol: WireFormat,
    pub max_message_bytes: usize,
    pub cwd: PathBuf,
    /// Variables set on top of the bridge's environment: the key of the
    /// requests this child serves.
    pub env: EnvKey,
}

impl Spec {
    /// The command as a user would type it, for messages.
    pub fn display(&self) -> String {
        self.command.join(" ")
    }
}

/// Starts children from one long-lived thread. The parent-death signal is
/// tied to the thread that forked the child, not to the process: a child
/// forked from a thread that later ends would be killed with it.
pub struct Spawner {
    requests: Mutex<Sender<(Spec, Sender<std::io::Result<std::process::Child>>)>>,
}

impl Spawner {
    pub fn start() -> std::io::Result<Spawner> {
        let (tx, rx) =
            crossbeam_channel::unbounded::<(Spec, Sender<std::io::Result<std::process::Child>>)>();
        thread::Builder::new()
            .name("bridge-spawner".into())
            .spawn(move || {
                for (spec, reply) in rx {
                    let _ = reply.send(spawn_process(&spec));
                }
            })?;
        Ok(Spawner {
            requests: Mutex::new(tx),
        })
    }

    fn spawn(&self, spec: &Spec) -> std::io::Result<std::process::Child> {
        let (reply_tx, reply_rx) = bounded(1);
        let sent = lock(&self.requests).send((spec.clone(), reply_tx));
        if sent.is_err() {
            return Err(std::io::Error::other("the spawner thread is gone"));
        }
        reply_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
    }
}

fn spawn_process(spec: &Spec) -> std::io::Result<std::process::Child> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty command"))?;
    let parent = std::process::id() as libc::pid_t;
    let nice = crate::sched::nice_for_children();
    let mut command = Command::new(program);
    command
        .args(args)
        .arg("--persistent_worker")
        .current_dir(&spec.cwd)
        .envs(spec.env.vars().iter().map(|(k, v)| (k, v)))
        // The socket is the bridge's: a child that also speaks Buck2's
        // protocol (this very binary does) would take it as its own. This
        // comes after the request's variables, so it wins over them too.
        .env_remove("WORKER_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // The front ends block stop signals in every thread; the child
            // must not inherit that mask, or it could not be stopped.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The bridge may have died before the signal was armed.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            // The worker's short slice is for its own threads' wake-ups; a
            // compiler child runs long and keeps the kernel's default.
            crate::sched::default_slice_in_child(nice);
            Ok(())
        });
    }
    command.spawn()
}

#[derive(Default)]
struct Waiters {
    by_id: HashMap<i32, Sender<Outcome>>,
    /// Set once the child is dead: the message every later request gets.
    failure: Option<String>,
}

/// A running child and the threads that read its output.
pub struct Child {
    pid: u32,
    spec: Spec,
    process: Mutex<std::process::Child>,
    stdin: Mutex<Option<ChildStdin>>,
    waiters: Mutex<Waiters>,
    tail: Mutex<VecDeque<String>>,
    stderr_done: Receiver<()>,
    /// The child answered at least one request: it started properly.
    answered: AtomicBool,
    /// The bridge's bookkeeping, changed only under its lock: requests
    /// given to this child (for `--max-requests-per-child`), requests
    /// waiting on it, and whether it takes no new ones and stops once those
    /// are done.
    pub assigned: AtomicU64,
    pub in_flight: AtomicUsize,
    pub draining: AtomicBool,
}

impl Child {
    /// Starts a child and its reader threads.
    pub fn start(spawner: &Spawner, spec: &Spec) -> Result<Arc<Child>, String> {
        let mut process = spawner.spawn(spec).map_err(|e| {
            format!(
                "bridge: cannot start child `{} --persistent_worker` in {}: {e}\n",
                spec.display(),
                spec.cwd.display()
            )
        })?;
        let pid = process.id();
        let stdin = process.stdin.take();
        let stdout = process.stdout.take();
        let stderr = process.stderr.take();
        let (stderr_tx, stderr_done) = bounded::<()>(1);
        let child = Arc::new(Child {
            pid,
            spec: spec.clone(),
            process: Mutex::new(process),
            stdin: Mutex::new(stdin),
            waiters: Mutex::default(),
            tail: Mutex::default(),
            stderr_done,
            answered: AtomicBool::new(false),
            assigned: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        });
        if let Some(stderr) = stderr {
            let relay = Arc::clone(&child);
            let started = thread::Builder::new()
                .name(format!("child-{pid}-stderr"))
                .spawn(move || {
                    relay.relay_stderr(stderr);
                    drop(stderr_tx);
                });
            if let Err(e) = started {
                child.fail(&format!("could not get a thread for its stderr: {e}"));
            }
        }
        if let Some(stdout) = stdout {
            let reader = Arc::clone(&child);
            let started = thread::Builder::new()
                .name(format!("child-{pid}-stdout"))
                .spawn(move || reader.read_responses(stdout));
            if let Err(e) = started {
                child.fail(&format!("could not get a thread for its stdout: {e}"));
            }
        }
        Ok(child)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether this child ever answered: a child that dies before its first
    /// answer counts as one that could not start.
    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::SeqCst)
    }

    /// The environment key of the requests this child serves.
    pub fn env_key(&self) -> &EnvKey {
        &self.spec.env
    }

    pub fn is_dead(&self) -> bool {
        lock(&self.waiters).failure.is_some()
    }

    /// Sends `request`; its response (or the child's failure) arrives on the
    /// returned channel.
    pub fn send(&self, request: &WorkRequest) -> Result<Receiver<Outcome>, String> {
        let (tx, rx) = bounded(1);
        {
            let mut waiters = lock(&self.waiters);
            if let Some(failure) = &waiters.failure {
                return Err(failure.clone());
            }
            waiters.by_id.insert(request.request_id, tx);
        }
        if let Err(e) = self.write(request) {
            return Err(self.fail(&format!("could not be written to: {e}")));
        }
        Ok(rx)
    }

    /// Asks a multiplex child to cancel request `id`.
    pub fn cancel(&self, id: i32) {
        let mut request = WorkRequest::new();
        request.request_id = id;
        request.cancel = true;
        // A child that cannot be written to fails its requests through the
        // reader; nothing more to do here.
        let _ = self.write(&request);
    }

    /// Stops waiting for request `id`; a late response to it is then not a
    /// fault but silently dropped.
    pub fn forget(&self, id: i32) {
        let mut waiters = lock(&self.waiters);
        if waiters.by_id.remove(&id).is_some() {
            waiters.by_id.insert(id, bounded(0).0);
        }
    }

    fn write(&self, request: &WorkRequest) -> std::io::Result<()> {
        let bytes = self.spec.protocol.encode_request(request);
        let mut stdin = lock(&self.stdin);
        let pipe = stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("its stdin is closed"))?;
        pipe.write_all(&bytes)?;
        pipe.flush()
    }

    /// Kills the child (if still running) and fails its waiting requests
    /// with `reason`.
    pub fn kill(&self, reason: &str) {
        self.kill_now();
        self.fail(reason);
    }

    /// Closes the child's stdin: a well-behaved worker exits at end of input.
    pub fn close_stdin(&self) {
        lock(&self.stdin).take();
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&self) -> bool {
        matches!(lock(&self.process).try_wait(), Ok(Some(_)) | Err(_))
    }

    fn read_responses(&self, stdout: std::process::ChildStdout) {
        let mut input = BufReader::new(stdout);
        loop {
            let response = self
                .spec
                .protocol
                .read_response(&mut input, self.spec.max_message_bytes);
            match response {
                Ok(Some(response)) => {
                    let id = response.request_id;
                    let waiter = lock(&self.waiters).by_id.remove(&id);
                    match waiter {
                        Some(waiter) => {
                            self.answered.store(true, Ordering::SeqCst);
                            let _ = waiter.send(Ok(response));
                        }
                        None => {
                            self.fail(&format!("answered request id {id}, which it was not asked"));
                            return;
                        }
                    }
                }
                Ok(None) => {
                    self.fail("closed its stdout");
                    return;
                }
                Err(e) => {
                    self.fail(&format!("wrote something that is not a response ({e})"));
                    return;
                }
            }
        }
    }

    /// Marks the child dead once, kills it, and tells every waiter why.
    /// Returns the message.
    fn fail(&self, reason: &str) -> String {
        if let Some(failure) = &lock(&self.waiters).failure {
            return failure.clone();
        }
        let status = self.stop_process();
        let _ = self.stderr_done.recv_timeout(STDERR_WAIT);
        let tail: Vec<String> = lock(&self.tail).iter().cloned().collect();
        let mut message = format!(
            "bridge: child `{} --persistent_worker` (pid {}) {reason}; {}\n",
            self.spec.display(),
            self.pid,
            describe(status)
        );
        if tail.is_empty() {
            message.push_str("its stderr was empty\n");
        } else {
            message.push_str("last lines of its stderr:\n");
            for line in tail {
                message.push_str("  ");
                message.push_str(&line);
                message.push('\n');
            }
        }
        let waiting = {
            let mut waiters = lock(&self.waiters);
            if let Some(failure) = &waiters.failure {
                return failure.clone();
            }
            waiters.failure = Some(message.clone());
            std::mem::take(&mut waiters.by_id)
        };
        lock(&self.stdin).take();
        for (_, waiter) in waiting {
            let _ = waiter.send(Err(message.clone()));
        }
        message
    }

    /// Lets a child that is exiting by itself finish (so its own status is
    /// reported), then kills it; reaps it either way.
    fn stop_process(&self) -> Option<ExitStatus> {
        let mut process = lock(&self.process);
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            match process.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => break,
                Err(_) => return None,
            }
        }
        let _ = process.kill();
        process.wait().ok()
    }

    /// SIGKILLs the child without waiting for it to exit on its own.
    pub fn kill_now(&self) {
        let mut process = lock(&self.process);
        let _ = process.kill();
        let _ = process.wait();
    }

    fn relay_stderr(&self, stderr: std::process::ChildStderr) {
        let mut input = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match input.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            // One write per line keeps lines of concurrent children whole.
            let _ =
                std::io::stderr().write_all(format!("[child {}] {text}\n", self.pid).as_bytes());
            let mut tail = lock(&self.tail);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.to_owned());
        }
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    match status {
        Some(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("it exited with status {code}"),
            (None, Some(signal)) => format!("it was ended by signal {signal}"),
            _ => format!("it ended: {status}"),
        },
        None => "its exit status is unknown".to_owned(),
    }
}
