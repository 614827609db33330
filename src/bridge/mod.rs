//! The bridge: a [`Handler`] that serves each request by forwarding it as a
//! `WorkRequest` to a Bazel-protocol worker running as a child process. Put
//! behind the Buck2 front end it turns any Bazel-protocol worker into a Buck2
//! local worker; behind the Bazel front end a pool of singleplex children
//! becomes one multiplex worker.
//!
//! - Singleplex children (default): one request at a time each, started on
//!   demand; the pool's `--concurrency` threads bound how many exist. A
//!   request that stops early cannot be cancelled in such a child, so the
//!   child is killed after `--cancel-grace-ms` and replaced later.
//! - `--multiplex`: one child, requests tagged with unique non-zero ids; a
//!   request that stops early is sent a `cancel` request.
//!
//! [`child`] runs one process; this module decides which child serves which
//! request and what the client hears when a child fails.

pub mod child;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::bazel::WireFormat;
use crate::proto::worker_protocol::{WorkRequest, WorkResponse};
use crate::request::{lock, Handler, Request, Response, Stop};
use child::{Child, Outcome, Spawner, Spec};

/// Children that fail to start this many times in a row make requests fail
/// at once instead of starting another child for each one.
pub const START_FAILURES: u32 = 3;
/// First wait before a new start is tried after [`START_FAILURES`]; it
/// doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a request waiting for its child looks at its cancel token. The
/// token offers no wake-up a channel wait could join, and a response ends the
/// wait at once, so only a stop is noticed up to this late.
const STOP_POLL: Duration = Duration::from_millis(10);
/// At shutdown, how long children may take to exit after their stdin closes.
pub const EXIT_BOUND: Duration = Duration::from_secs(2);

/// How the bridge runs its children (`--bridge` and the options after it).
#[derive(Debug, Clone)]
pub struct Settings {
    pub command: Vec<String>,
    pub multiplex: bool,
    pub protocol: WireFormat,
    pub cancel_grace: Duration,
    pub max_message_bytes: usize,
    pub verbose: bool,
    pub cwd: PathBuf,
}

#[derive(Default)]
struct Starts {
    failures_in_a_row: u32,
    last_failure: String,
    retry_at: Option<Instant>,
    backoff: Duration,
}

pub struct Bridge {
    settings: Settings,
    spec: Spec,
    spawner: Spawner,
    /// Singleplex children not serving a request.
    idle: Mutex<Vec<Arc<Child>>>,
    /// The multiplex child.
    shared: Mutex<Option<Arc<Child>>>,
    /// Every child started and not yet discarded, for shutdown.
    all: Mutex<Vec<Arc<Child>>>,
    starts: Mutex<Starts>,
    next_id: AtomicI32,
}

enum Waited {
    Answer(WorkResponse),
    Fault(String),
    Stopped(Stop),
}

impl Bridge {
    pub fn new(settings: Settings) -> std::io::Result<Bridge> {
        let spec = Spec {
            command: settings.command.clone(),
            protocol: settings.protocol,
            max_message_bytes: settings.max_message_bytes,
            cwd: settings.cwd.clone(),
        };
        Ok(Bridge {
            settings,
            spec,
            spawner: Spawner::start()?,
            idle: Mutex::default(),
            shared: Mutex::default(),
            all: Mutex::default(),
            starts: Mutex::default(),
            next_id: AtomicI32::new(1),
        })
    }

    /// A new child, unless recent starts failed too often.
    fn start_child(&self) -> Result<Arc<Child>, String> {
        {
            let starts = lock(&self.starts);
            if let Some(at) = starts.retry_at {
                if Instant::now() < at {
                    return Err(format!(
                        "{}bridge: the child failed to start {} times in a row; not starting \
                         another for {} ms\n",
                        starts.last_failure,
                        starts.failures_in_a_row,
                        at.saturating_duration_since(Instant::now()).as_millis()
                    ));
                }
            }
        }
        match Child::start(&self.spawner, &self.spec) {
            Ok(child) => {
                if self.settings.verbose {
                    crate::elog!(
                        "bridge: started child pid {}: {} --persistent_worker",
                        child.pid(),
                        self.spec.display()
                    );
                }
                lock(&self.all).push(Arc::clone(&child));
                Ok(child)
            }
            Err(message) => {
                self.start_failed(&message);
                Err(message)
            }
        }
    }

    fn start_failed(&self, message: &str) {
        let mut starts = lock(&self.starts);
        starts.failures_in_a_row += 1;
        starts.last_failure = message.to_owned();
        if starts.failures_in_a_row >= START_FAILURES {
            starts.backoff = if starts.backoff.is_zero() {
                FIRST_BACKOFF
            } else {
                (starts.backoff * 2).min(MAX_BACKOFF)
            };
            starts.retry_at = Some(Instant::now() + starts.backoff);
        }
    }

    fn started_fine(&self) {
        let mut starts = lock(&self.starts);
        if starts.failures_in_a_row > 0 {
            *starts = Starts::default();
        }
    }

    /// Drops a dead or killed child; one that died before ever answering
    /// counts as a failed start.
    fn discard(&self, child: &Arc<Child>, message: &str) {
        lock(&self.all).retain(|c| !Arc::ptr_eq(c, child));
        if !child.answered() {
            self.start_failed(message);
        }
    }

    fn work_request(&self, request: &Request, id: i32) -> WorkRequest {
        let mut work = WorkRequest::new();
        work.arguments = request.args.clone();
        work.request_id = id;
        work.verbosity = request.verbosity;
        // A Bazel client's sandbox travels on; the child shares our cwd.
        if request.workdir != self.settings.cwd {
            work.sandbox_dir = match request.workdir.strip_prefix(&self.settings.cwd) {
                Ok(relative) => relative.to_string_lossy().into_owned(),
                Err(_) => request.workdir.to_string_lossy().into_owned(),
            };
        }
        work
    }

    /// Waits for the child's answer until the request stops.
    fn wait(&self, answer: &Receiver<Outcome>, request: &Request) -> Waited {
        loop {
            match answer.recv_timeout(STOP_POLL) {
                Ok(Ok(response)) => return Waited::Answer(response),
                Ok(Err(message)) => return Waited::Fault(message),
                Err(RecvTimeoutError::Disconnected) => {
                    return Waited::Fault("bridge: the child went away without an answer\n".into())
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(stop) = request.cancel.stopped() {
                        return Waited::Stopped(stop);
                    }
                }
            }
        }
    }

    /// Waits `--cancel-grace-ms` for an answer that may still come.
    fn grace(&self, answer: &Receiver<Outcome>) -> Option<WorkResponse> {
        match answer.recv_timeout(self.settings.cancel_grace) {
            Ok(Ok(response)) => Some(response),
            _ => None,
        }
    }

    fn respond(&self, child: &Child, response: WorkResponse) -> Response {
        let mut output = response.output;
        if self.settings.verbose {
            output = format!(
                "bridge: answered by child pid {} (exit code {})\n{output}",
                child.pid(),
                response.exit_code
            );
        }
        Response {
            exit_code: response.exit_code,
            output,
            cancelled: response.was_cancelled,
            timed_out: false,
        }
    }

    fn handle_singleplex(&self, request: &Request) -> Response {
        let idle = lock(&self.idle).pop();
        let child = match idle {
            Some(child) if !child.is_dead() => child,
            Some(dead) => {
                self.discard(&dead, "");
                return self.handle_singleplex(request);
            }
            None => match self.start_child() {
                Ok(child) => child,
                Err(message) => return Response::error(1, message),
            },
        };
        let answer = match child.send(&self.work_request(request, 0)) {
            Ok(answer) => answer,
            Err(message) => {
                self.discard(&child, &message);
                return Response::error(1, message);
            }
        };
        match self.wait(&answer, request) {
            Waited::Answer(response) => {
                self.started_fine();
                let response = self.respond(&child, response);
                lock(&self.idle).push(child);
                response
            }
            Waited::Fault(message) => {
                self.discard(&child, &message);
                Response::error(1, message)
            }
            Waited::Stopped(stop) => {
                if let Some(response) = self.grace(&answer) {
                    let response = self.respond(&child, response);
                    lock(&self.idle).push(child);
                    return response;
                }
                let why = match stop {
                    Stop::Cancelled => "was cancelled",
                    Stop::TimedOut => "timed out",
                };
                let message = format!(
                    "bridge: the request {why}; a singleplex child cannot be cancelled, so child \
                     pid {} was killed after {} ms and will be replaced\n",
                    child.pid(),
                    self.settings.cancel_grace.as_millis()
                );
                child.kill(&format!("was killed: its request {why}"));
                lock(&self.all).retain(|c| !Arc::ptr_eq(c, &child));
                Response::stopped(stop, message)
            }
        }
    }

    fn multiplex_child(&self) -> Result<Arc<Child>, String> {
        let mut shared = lock(&self.shared);
        if let Some(child) = shared.as_ref() {
            if !child.is_dead() {
                return Ok(Arc::clone(child));
            }
        }
        if let Some(dead) = shared.take() {
            self.discard(&dead, "");
        }
        let child = self.start_child()?;
        *shared = Some(Arc::clone(&child));
        Ok(child)
    }

    fn next_id(&self) -> i32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            // Zero means singleplex on the wire; negative ids look odd to tools.
            if id > 0 {
                return id;
            }
            let _ = self.next_id.compare_exchange(
                id.wrapping_add(1),
                1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn handle_multiplex(&self, request: &Request) -> Response {
        let child = match self.multiplex_child() {
            Ok(child) => child,
            Err(message) => return Response::error(1, message),
        };
        let id = self.next_id();
        let answer = match child.send(&self.work_request(request, id)) {
            Ok(answer) => answer,
            Err(message) => return Response::error(1, message),
        };
        match self.wait(&answer, request) {
            Waited::Answer(response) => {
                self.started_fine();
                self.respond(&child, response)
            }
            Waited::Fault(message) => Response::error(1, message),
            Waited::Stopped(stop) => {
                child.cancel(id);
                if let Some(response) = self.grace(&answer) {
                    return self.respond(&child, response);
                }
                child.forget(id);
                Response::stopped(
                    stop,
                    format!(
                        "bridge: request {id} stopped; child pid {} was asked to cancel it and \
                         did not answer within {} ms\n",
                        child.pid(),
                        self.settings.cancel_grace.as_millis()
                    ),
                )
            }
        }
    }
}

impl Handler for Bridge {
    fn handle(&self, request: &Request) -> Response {
        if self.settings.verbose && !request.env.is_empty() {
            crate::elog!(
                "bridge: {} env entr(ies) of the request not forwarded: a WorkRequest has no \
                 environment; the child runs with the bridge's",
                request.env.len()
            );
        }
        if self.settings.multiplex {
            self.handle_multiplex(request)
        } else {
            self.handle_singleplex(request)
        }
    }

    /// Closes every child's stdin, gives them [`EXIT_BOUND`] to exit, then
    /// kills the rest.
    fn shutdown(&self) {
        let children = std::mem::take(&mut *lock(&self.all));
        lock(&self.idle).clear();
        lock(&self.shared).take();
        for child in &children {
            child.close_stdin();
        }
        let deadline = Instant::now() + EXIT_BOUND;
        let mut left: Vec<_> = children;
        while !left.is_empty() && Instant::now() < deadline {
            left.retain(|child| !child.has_exited());
            if !left.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for child in &left {
            crate::elog!(
                "bridge: child pid {} did not exit within {} ms of end of input; killing it",
                child.pid(),
                EXIT_BOUND.as_millis()
            );
            child.kill_now();
        }
    }
}
