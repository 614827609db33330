//! The stdin/stdout protocol as Bazel drives it, and the conformance checks
//! that every stdio mode shares: exactly one response per request, ids
//! echoed, nothing else on stdout, an answer in time.
//!
//! Responses are read on their own thread and handed over with the time they
//! arrived, so the sending side can wait with a deadline and latencies do not
//! include our own printing.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};
use persistent_worker::bazel::framing::DEFAULT_MAX_MESSAGE_BYTES;
use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};

use crate::child::{self, block, Tail};
use crate::{requests, Failure, Options, Outcome};

/// How long a worker may take to exit once its stdin is closed before we
/// end it; BuildBuddy allows 10 s, but a worker that needs more than a
/// couple of seconds is worth a warning either way.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// How many bytes of stdout to show when it stops being a valid stream.
const SHOW_STDOUT_BYTES: usize = 200;

pub enum Event {
    Response(WorkResponse, Instant),
    /// stdout ended at a message boundary.
    Eof,
    /// stdout holds something that is not a response: the error and the
    /// last bytes read.
    Broken(String, Vec<u8>),
}

/// What the reader has seen of stdout, for messages about a broken stream.
#[derive(Default)]
struct Seen {
    /// The last bytes read.
    last: Vec<u8>,
    /// The start of what was read after the last complete response, and
    /// how much that was: a stray line in a proto stream usually reads as
    /// the start of a frame that never completes.
    pending: Vec<u8>,
    pending_len: usize,
}

struct Recording<R> {
    inner: R,
    seen: Arc<Mutex<Seen>>,
}

impl<R: Read> Read for Recording<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.last.extend_from_slice(&buf[..n]);
            let excess = seen.last.len().saturating_sub(SHOW_STDOUT_BYTES);
            seen.last.drain(..excess);
            let room = SHOW_STDOUT_BYTES.saturating_sub(seen.pending.len());
            seen.pending.extend_from_slice(&buf[..n.min(room)]);
            seen.pending_len += n;
        }
        Ok(n)
    }
}

/// How to start and talk to a stdio worker.
pub struct Config<'a> {
    /// The full argv, `--persistent_worker` included.
    pub argv: &'a [String],
    pub cwd: Option<&'a Path>,
    pub format: WireFormat,
    /// Write every JSON field, defaults included, as a remote executor does;
    /// Bazel itself leaves default values out.
    pub all_fields: bool,
    pub echo_stderr: bool,
    /// Send the worker's stderr to /dev/null, as NativeLink does.
    pub discard_stderr: bool,
}

/// A running worker process with its protocol streams.
pub struct StdioWorker {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<Event>,
    seen: Arc<Mutex<Seen>>,
    stderr: Tail,
    format: WireFormat,
    all_fields: bool,
    pub spawned: Instant,
}

impl StdioWorker {
    pub fn spawn(config: &Config) -> Result<StdioWorker, Failure> {
        let (program, args) = config
            .argv
            .split_first()
            .ok_or_else(|| Failure::Usage("empty worker command".to_owned()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if config.discard_stderr {
                Stdio::null()
            } else {
                Stdio::piped()
            });
        if let Some(cwd) = config.cwd {
            command.current_dir(cwd);
        }
        let spawned = Instant::now();
        let mut process = child::spawn(command, config.argv)?;
        let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
            child::kill(&mut process);
            return Err(Failure::Worker(
                "the worker's pipes were not set up".to_owned(),
            ));
        };
        let stderr = match process.stderr.take() {
            Some(stderr) => Tail::capture(stderr, config.echo_stderr),
            None => Tail::capture(std::io::empty(), false),
        };
        let (tx, events) = unbounded();
        let format = config.format;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let seen_by_reader = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(Recording {
                inner: stdout,
                seen: Arc::clone(&seen_by_reader),
            });
            loop {
                let event = match format.read_response(&mut reader, DEFAULT_MAX_MESSAGE_BYTES) {
                    Ok(Some(response)) => {
                        // What is already buffered belongs to the next message.
                        if let Ok(mut seen) = seen_by_reader.lock() {
                            seen.pending = reader.buffer().to_vec();
                            seen.pending.truncate(SHOW_STDOUT_BYTES);
                            seen.pending_len = reader.buffer().len();
                        }
                        Event::Response(response, Instant::now())
                    }
                    Ok(None) => Event::Eof,
                    Err(e) => {
                        let shown = seen_by_reader
                            .lock()
                            .map(|s| s.last.clone())
                            .unwrap_or_default();
                        Event::Broken(e.to_string(), shown)
                    }
                };
                let end = !matches!(event, Event::Response(..));
                if tx.send(event).is_err() || end {
                    break;
                }
            }
        });
        Ok(StdioWorker {
            child: process,
            stdin: Some(stdin),
            events,
            seen,
            stderr,
            format,
            all_fields: config.all_fields,
            spawned,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn encode(&self, request: &WorkRequest) -> Vec<u8> {
        if self.format == WireFormat::Json && self.all_fields {
            let options = protobuf_json_mapping::PrintOptions {
                always_output_default_values: true,
                ..Default::default()
            };
            if let Ok(mut line) =
                protobuf_json_mapping::print_to_string_with_options(request, &options)
            {
                line.push('\n');
                return line.into_bytes();
            }
        }
        self.format.encode_request(request)
    }

    /// Writes one request in a single call.
    pub fn send(&mut self, request: &WorkRequest) -> Result<(), Failure> {
        self.send_together(std::slice::from_ref(request))
    }

    /// Writes `requests` in a single call, so that the worker finds them
    /// together in its input (a pipe holds 64 KiB): written one by one, a
    /// worker can read the first alone, which then says nothing about how
    /// it reads requests that arrive together (`check`'s `multiplex.ids`
    /// once judged a worker that leaves the second of two unread
    /// "supported" on a loaded machine).
    pub fn send_together(&mut self, requests: &[WorkRequest]) -> Result<(), Failure> {
        let bytes: Vec<u8> = requests.iter().flat_map(|r| self.encode(r)).collect();
        let written = match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(&bytes).and_then(|()| stdin.flush()),
            None => Ok(()),
        };
        match written {
            Ok(()) => Ok(()),
            Err(e) => {
                // The worker is gone; what it left on stdout may say why.
                let until = Instant::now() + Duration::from_secs(1);
                while let Some(event) = self.next_event(until) {
                    match event {
                        Event::Response(..) => continue,
                        Event::Broken(error, shown) => return Err(self.broken(&error, &shown)),
                        Event::Eof => break,
                    }
                }
                let ids: Vec<i32> = requests.iter().map(|r| r.request_id).collect();
                let which = match ids.as_slice() {
                    [id] => format!("request {id}"),
                    _ => format!("requests {ids:?}"),
                };
                Err(self.died(&format!(
                    "before {which} could be sent (writing to its stdin failed: {e})"
                )))
            }
        }
    }

    /// The next event, or `None` once `deadline` has passed.
    pub fn next_event(&self, deadline: Instant) -> Option<Event> {
        match self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            // The reader always ends with Eof or Broken; this is a reader
            // that vanished, which is as good as a closed stdout.
            Err(RecvTimeoutError::Disconnected) => Some(Event::Eof),
        }
    }

    fn stderr_block(&self) -> String {
        stderr_block(&self.stderr)
    }

    /// The worker stopped talking: how it ended, and its stderr.
    pub fn died(&mut self, what: &str) -> Failure {
        let how = match child::wait_exit(&mut self.child, Duration::from_secs(2)) {
            Some(status) => format!("the worker {}", child::describe(status)),
            None => {
                child::kill(&mut self.child);
                "the worker closed its stdout but kept running (now killed)".to_owned()
            }
        };
        Failure::Worker(format!("{how} {what}{}", self.stderr_block()))
    }

    /// A protocol violation: the worker is ended, because after a bad
    /// frame nobody knows where the next one starts.
    pub fn violation(&mut self, what: &str) -> Failure {
        child::kill(&mut self.child);
        Failure::Worker(format!("protocol violation: {what}{}", self.stderr_block()))
    }

    fn broken(&mut self, error: &str, shown: &[u8]) -> Failure {
        self.violation(&format!(
            "the worker's stdout is not a stream of {} WorkResponses: {error}\n\
             last bytes read from stdout: {:?}\n\
             (a worker must write nothing but responses to stdout)",
            match self.format {
                WireFormat::Proto => "length-delimited protobuf",
                WireFormat::Json => "JSON",
            },
            String::from_utf8_lossy(shown)
        ))
    }

    /// Closes stdin, checks that nothing more arrives on stdout and that the
    /// worker exits; returns a note on how it exited.
    pub fn finish(self) -> Result<String, Failure> {
        self.finish_within(EXIT_GRACE)
    }

    /// [`finish`](Self::finish), killing the worker if it has not exited
    /// `grace` after its stdin closed.
    pub fn finish_within(mut self, grace: Duration) -> Result<String, Failure> {
        self.stdin.take();
        let deadline = Instant::now() + grace;
        match self.next_event(deadline) {
            Some(Event::Eof) => {}
            Some(Event::Response(extra, _)) => {
                return Err(self.violation(&format!(
                    "a response with request_id {} arrived after every request was answered \
                     (exactly one response per request)",
                    extra.request_id
                )))
            }
            Some(Event::Broken(error, shown)) => return Err(self.broken(&error, &shown)),
            None => {
                child::kill(&mut self.child);
                return Ok(format!(
                    "the worker did not exit within {:.1} s of its stdin closing; killed it",
                    grace.as_secs_f64()
                ));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let stderr = &self.stderr;
        Ok(child::stop_report(
            &mut self.child,
            left,
            "when stdin closed",
            || stderr_block(stderr),
        ))
    }
}

impl Drop for StdioWorker {
    fn drop(&mut self) {
        self.stdin.take();
        child::kill(&mut self.child);
    }
}

/// One conversation's worth of requests and how to send them.
pub struct Plan {
    /// Requests with their ids already set.
    pub requests: Vec<WorkRequest>,
    /// Requests in flight at once.
    pub window: usize,
    pub cancel_after: Option<Duration>,
    pub timeout: Duration,
}

/// One request's answer.
pub struct Answer {
    pub response: WorkResponse,
    pub latency: Duration,
    pub cancel_sent: bool,
}

/// What the driver reports as it goes, for printing.
pub enum Progress<'a> {
    Sent(&'a WorkRequest),
    CancelSent(i32),
    Answered(&'a Answer),
}

struct InFlight {
    sent: Instant,
    cancel_sent: bool,
}

/// Sends the plan's requests, keeping up to `window` in flight, and checks
/// every response against the requests in flight.
pub fn drive(
    worker: &mut StdioWorker,
    plan: &Plan,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Answer>, Failure> {
    drive_with(worker, plan, None, progress)
}

/// [`drive`], running `before` (`--before-request`) ahead of each request.
pub fn drive_with(
    worker: &mut StdioWorker,
    plan: &Plan,
    before: Option<&str>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Answer>, Failure> {
    let mut answers = Vec::with_capacity(plan.requests.len());
    let mut in_flight: HashMap<i32, InFlight> = HashMap::new();
    let mut answered: HashSet<i32> = HashSet::new();
    let mut next = 0;
    while next < plan.requests.len() || !in_flight.is_empty() {
        while in_flight.len() < plan.window && next < plan.requests.len() {
            let request = &plan.requests[next];
            if in_flight.contains_key(&request.request_id) {
                // Singleplex id 0 waits here for its answer.
                break;
            }
            if let Some(command) = before {
                requests::before(command, next).map_err(Failure::Usage)?;
            }
            // Timed before writing: a fast worker may answer before the
            // write call returns.
            let sent = Instant::now();
            worker.send(request)?;
            progress(Progress::Sent(request));
            in_flight.insert(
                request.request_id,
                InFlight {
                    sent,
                    cancel_sent: false,
                },
            );
            answered.remove(&request.request_id);
            next += 1;
        }
        let deadline = in_flight
            .values()
            .flat_map(|f| {
                let cancel = plan
                    .cancel_after
                    .filter(|_| !f.cancel_sent)
                    .map(|after| f.sent + after);
                std::iter::once(f.sent + plan.timeout).chain(cancel)
            })
            .min()
            .unwrap_or_else(Instant::now);
        let event = worker.next_event(deadline);
        let now = Instant::now();
        if let Some(after) = plan.cancel_after {
            let mut due: Vec<i32> = in_flight
                .iter()
                .filter(|(_, f)| !f.cancel_sent && f.sent + after <= now)
                .map(|(id, _)| *id)
                .collect();
            due.sort_unstable();
            for id in due {
                let mut cancel = WorkRequest::new();
                cancel.request_id = id;
                cancel.cancel = true;
                worker.send(&cancel)?;
                progress(Progress::CancelSent(id));
                if let Some(f) = in_flight.get_mut(&id) {
                    f.cancel_sent = true;
                }
            }
        }
        match event {
            Some(Event::Response(response, at)) => {
                let id = response.request_id;
                let Some(f) = in_flight.remove(&id) else {
                    let mut waiting: Vec<i32> = in_flight.keys().copied().collect();
                    waiting.sort_unstable();
                    let why = if answered.contains(&id) {
                        format!(
                            "a second response for request_id {id} (exactly one response per request)"
                        )
                    } else {
                        format!(
                            "a response with request_id {id}, but no request with that id is in \
                             flight (in flight: {waiting:?}); a worker must echo each request's id"
                        )
                    };
                    return Err(worker.violation(&why));
                };
                answered.insert(id);
                let answer = Answer {
                    response,
                    latency: at.saturating_duration_since(f.sent),
                    cancel_sent: f.cancel_sent,
                };
                progress(Progress::Answered(&answer));
                answers.push(answer);
            }
            Some(Event::Eof) => {
                let mut waiting: Vec<i32> = in_flight.keys().copied().collect();
                waiting.sort_unstable();
                return Err(worker.died(&format!(
                    "before answering request(s) {waiting:?} (its stdout closed)"
                )));
            }
            Some(Event::Broken(error, shown)) => return Err(worker.broken(&error, &shown)),
            None => {
                let late: Vec<i32> = in_flight
                    .iter()
                    .filter(|(_, f)| f.sent + plan.timeout <= now)
                    .map(|(id, _)| *id)
                    .collect();
                if let Some(id) = late.iter().min() {
                    return Err(worker.timed_out(*id, plan.timeout));
                }
            }
        }
    }
    Ok(answers)
}

impl StdioWorker {
    /// Writes bytes that need not be a well-formed request, for probing how
    /// a worker takes a malformed one; `false` when its stdin is closed.
    pub fn send_raw(&mut self, bytes: &[u8]) -> bool {
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(bytes).and_then(|()| stdin.flush()).is_ok(),
            None => false,
        }
    }

    /// What stdout held after the last complete response: the first bytes
    /// and how many there were. A stray write that stalls the reader shows
    /// here rather than as an error.
    pub fn pending_stdout(&self) -> (Vec<u8>, usize) {
        self.seen
            .lock()
            .map(|s| (s.pending.clone(), s.pending_len))
            .unwrap_or_default()
    }

    /// What is kept of the worker's stderr, for evidence.
    pub fn stderr_tail(&self, wait: Duration) -> String {
        self.stderr.text(wait)
    }

    /// Closes stdin and waits up to `grace` for stdout to end and the
    /// worker to exit: `Ok(Some(status))`, or `Ok(None)` when it did not
    /// (it is then killed). Anything but the end on stdout is an error.
    pub fn close_and_wait(mut self, grace: Duration) -> Result<Option<ExitStatus>, Failure> {
        self.stdin.take();
        let deadline = Instant::now() + grace;
        match self.next_event(deadline) {
            Some(Event::Eof) => {}
            Some(Event::Response(extra, _)) => {
                return Err(self.violation(&format!(
                    "a response with request_id {} arrived after every request was answered",
                    extra.request_id
                )))
            }
            Some(Event::Broken(error, shown)) => return Err(self.broken(&error, &shown)),
            None => {
                child::kill(&mut self.child);
                return Ok(None);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match child::wait_exit(&mut self.child, left) {
            Some(status) => Ok(Some(status)),
            None => {
                child::kill(&mut self.child);
                Ok(None)
            }
        }
    }

    fn timed_out(&mut self, id: i32, timeout: Duration) -> Failure {
        let pid = self.pid();
        child::kill(&mut self.child);
        let (pending, pending_len) = self
            .seen
            .lock()
            .map(|s| (s.pending.clone(), s.pending_len))
            .unwrap_or_default();
        if pending_len > 0 {
            return Failure::Worker(format!(
                "protocol violation: no complete response to request {id} within {} ms \
                 (--timeout-ms), but the worker (pid {pid}) wrote {pending_len} byte(s) to \
                 stdout that do not form one: {:?}\n\
                 (a worker must write nothing but responses to stdout; a stray line reads as \
                 the start of a frame that never ends){}",
                timeout.as_millis(),
                String::from_utf8_lossy(&pending),
                self.stderr_block()
            ));
        }
        Failure::Worker(format!(
            "no response to request {id} within {} ms (--timeout-ms); the worker (pid {pid}) \
             may be hung or reading requests in another framing; killed it{}",
            timeout.as_millis(),
            self.stderr_block()
        ))
    }
}

/// Builds the requests for bazel mode: ids 0 singleplex, 1, 2, ... multiplex.
pub fn plan(options: &Options, count: usize, window: usize, multiplex: bool) -> Plan {
    let requests = (0..count)
        .map(|n| {
            let mut request = WorkRequest::new();
            request.arguments = requests::nth(&options.requests, n);
            request.verbosity = options.verbosity;
            if multiplex {
                // Never reused within a session: bazel#26251 shows what id
                // reuse after a cancel does to a worker's bookkeeping.
                request.request_id = i32::try_from(n + 1).unwrap_or(i32::MAX);
            }
            request
        })
        .collect();
    Plan {
        requests,
        window,
        cancel_after: options.cancel_after,
        timeout: options.timeout,
    }
}

pub fn format_of(options: &Options) -> WireFormat {
    if options.json {
        WireFormat::Json
    } else {
        WireFormat::Proto
    }
}

/// `argv` with `--persistent_worker` last, as remote executors put it
/// (Bazel puts it before `--worker_extra_flag` values; either is allowed).
pub fn worker_argv(command: &[String]) -> Vec<String> {
    let mut argv = command.to_vec();
    argv.push("--persistent_worker".to_owned());
    argv
}

pub fn run(options: &Options) -> Result<Outcome, Failure> {
    let count = options.requests.len() * options.repeat;
    let (count, window) = match options.multiplex {
        Some(n) => (count.max(n), n),
        None => (count, 1),
    };
    let plan = plan(options, count, window, options.multiplex.is_some());
    let argv = worker_argv(&options.command);
    let mut worker = StdioWorker::spawn(&Config {
        argv: &argv,
        cwd: options.cwd.as_deref(),
        format: format_of(options),
        all_fields: false,
        echo_stderr: options.worker_stderr,
        discard_stderr: false,
    })?;
    converse(options, worker_label(&argv, &worker), &mut worker, &plan)
        .and_then(|summary| finish(worker, summary, plan.requests.len()))
}

pub fn worker_label(argv: &[String], worker: &StdioWorker) -> String {
    format!(
        "worker `{}` (pid {})",
        child::show_command(argv),
        worker.pid()
    )
}

/// Drives `plan` and prints the exchange unless quiet.
pub fn converse(
    options: &Options,
    label: String,
    worker: &mut StdioWorker,
    plan: &Plan,
) -> Result<Summary, Failure> {
    let quiet = options.quiet;
    if !quiet {
        println!("started {label}");
    }
    let mut out = std::io::stdout().lock();
    let answers = drive_with(worker, plan, options.before_request.as_deref(), &mut |p| {
        if !quiet {
            show(&mut out, p);
        }
    })?;
    let _ = out.flush();
    Ok(Summary {
        failed: answers
            .iter()
            .filter(|a| !a.response.was_cancelled && a.response.exit_code != 0)
            .count(),
        cancelled: answers.iter().filter(|a| a.response.was_cancelled).count(),
        cancels_sent: answers.iter().filter(|a| a.cancel_sent).count(),
    })
}

/// Prints one step of a conversation: a request, a cancel or an answer.
pub fn show(out: &mut impl Write, p: Progress) {
    let _ = match p {
        Progress::Sent(r) => {
            let sandbox = if r.sandbox_dir.is_empty() {
                String::new()
            } else {
                format!(" in sandbox_dir {}", r.sandbox_dir)
            };
            writeln!(
                out,
                "-> request {}: {:?}{sandbox}",
                r.request_id, r.arguments
            )
        }
        Progress::CancelSent(id) => writeln!(out, "-> cancel {id}"),
        Progress::Answered(a) => {
            let r = &a.response;
            let status = if r.was_cancelled {
                "was_cancelled".to_owned()
            } else {
                format!("exit_code {}", r.exit_code)
            };
            writeln!(
                out,
                "<- response {}: {status} after {:.1} ms\n{}",
                r.request_id,
                a.latency.as_secs_f64() * 1000.0,
                indent(&r.output)
            )
        }
    };
}

pub struct Summary {
    pub failed: usize,
    pub cancelled: usize,
    pub cancels_sent: usize,
}

pub fn finish(worker: StdioWorker, summary: Summary, requests: usize) -> Result<Outcome, Failure> {
    let exit_note = worker.finish()?;
    println!(
        "{requests} request(s), {requests} response(s): {} failed, {} cancelled \
         ({} cancel(s) sent); protocol OK; {exit_note}",
        summary.failed, summary.cancelled, summary.cancels_sent
    );
    Ok(Outcome {
        failed_requests: summary.failed,
    })
}

pub fn indent(text: &str) -> String {
    text.trim_end_matches('\n')
        .lines()
        .map(|l| format!("   | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The worker's stderr as a block for an error message.
fn stderr_block(stderr: &Tail) -> String {
    block("worker stderr", &stderr.text(Duration::from_millis(500)))
}
