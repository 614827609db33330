//! Buck2's local worker protocol: the worker is started with
//! `WORKER_SOCKET=<fresh dir>/socket`, connected to with Buck2's retry
//! timing, and sent `Worker.Execute` calls (up to `--concurrency` at once) or,
//! with `--stream`, one `WorkerStreaming.ExecuteStream` call carrying every
//! command with ids counting up from 0.
//!
//! The method descriptors and the channel set-up are the library's, shared
//! with the server, so client and server cannot drift apart.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use futures_util::{SinkExt, StreamExt};
use grpcio::{CallOption, EnvBuilder, RpcStatusCode, WriteFlags};
use persistent_worker::buck2::lifecycle::block_on_until;
use persistent_worker::buck2::service::{self, Connection, EXEC, EXECUTE, EXECUTE_STREAM};
use persistent_worker::proto::worker::{
    execute_command::EnvironmentEntry, ExecuteCommand, ExecuteCommandStream, ExecuteEvent,
    ExecuteResponse,
};

use crate::child::{self, block, Tail};
use crate::measurement::{self, Measurement};
use crate::{bazel, requests, Failure, Mode, Options, Outcome, Rpc};

/// Buck2's connection timing (`app/buck2_execute_impl/src/executors/worker.rs`).
const FIRST_TRY: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
const GIVE_UP: Duration = Duration::from_secs(60);
/// Buck2 retries `Execute` this many times while the channel is UNAVAILABLE.
const EXECUTE_ATTEMPTS: usize = 5;
/// How long the worker gets between SIGTERM and SIGKILL; a little more than
/// the worker's own default grace period.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A directory of our own for the socket, removed at the end. Short, like
/// Buck2's `/tmp/buck2_worker/...`, because socket paths are limited.
struct SocketDir(PathBuf);

impl SocketDir {
    fn create() -> Result<SocketDir, Failure> {
        let pid = std::process::id();
        let mut last = None;
        for attempt in 0..100 {
            let dir = PathBuf::from(format!("/tmp/worker-client-{pid}-{attempt}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(SocketDir(dir)),
                Err(e) => last = Some(e),
            }
        }
        Err(Failure::Usage(format!(
            "cannot create a socket directory under /tmp: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started and connected worker.
struct Worker {
    child: Child,
    stdout: Tail,
    stderr: Tail,
    connection: Connection,
    /// Time from spawn until the socket accepted a connection.
    connected_after: Duration,
    spawned: Instant,
    // Last, so the socket is removed after the worker has stopped.
    _dir: SocketDir,
}

impl Worker {
    fn start(options: &Options) -> Result<Worker, Failure> {
        let dir = SocketDir::create()?;
        let socket = dir.0.join("socket");
        let mut command = worker_command(options, &socket)?;
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut process = child::spawn(command, &options.command)?;
        let (Some(out), Some(err)) = (process.stdout.take(), process.stderr.take()) else {
            child::kill(&mut process);
            return Err(Failure::Worker(
                "the worker's pipes were not set up".to_owned(),
            ));
        };
        let stdout = Tail::capture(out, false);
        let stderr = Tail::capture(err, options.worker_stderr);
        let limit = GIVE_UP.min(options.timeout);
        let mut waiting = Waiting {
            child: process,
            stdout,
            stderr,
        };
        waiting.until_listening(&socket, spawned, limit)?;
        let connected_after = spawned.elapsed();
        let env = Arc::new(EnvBuilder::new().cq_count(1).build());
        let connection = match service::connect(env, &socket) {
            Ok(connection) => connection,
            Err(e) => {
                return Err(waiting.failed(&format!("cannot open a gRPC channel: {e}")));
            }
        };
        let Waiting {
            child,
            stdout,
            stderr,
        } = waiting;
        Ok(Worker {
            child,
            stdout,
            stderr,
            connection,
            connected_after,
            spawned,
            _dir: dir,
        })
    }

    fn logs(&self) -> String {
        logs(&self.stdout, &self.stderr)
    }

    /// Why a call failed: the worker's exit if it has exited, else `what`.
    fn failed(&mut self, what: &str) -> Failure {
        let how = match child::wait_exit(&mut self.child, Duration::from_millis(200)) {
            Some(status) => format!(" (the worker {})", child::describe(status)),
            None => {
                child::kill(&mut self.child);
                String::new()
            }
        };
        Failure::Worker(format!("{what}{how}{}", self.logs()))
    }

    /// Ends the worker the way Buck2 does at the end of a command: SIGTERM,
    /// then SIGKILL for the whole group.
    fn stop(mut self) -> String {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            if let Ok(None) = self.child.try_wait() {
                // SAFETY: signals the process this client started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        // Read the logs only if needed, and after the exit, so they are whole.
        child::stop_report(&mut self.child, STOP_GRACE, "on SIGTERM", || {
            logs(&self.stdout, &self.stderr)
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        child::kill(&mut self.child);
    }
}

fn logs(stdout: &Tail, stderr: &Tail) -> String {
    let wait = Duration::from_millis(500);
    let out = stdout.text(wait);
    let mut text = block("worker stderr", &stderr.text(wait));
    if !out.trim().is_empty() {
        text.push_str(&block("worker stdout", &out));
    }
    text
}

/// A worker that has not accepted a connection yet.
struct Waiting {
    child: Child,
    stdout: Tail,
    stderr: Tail,
}

impl Waiting {
    /// Tries to connect after 50 ms, then with doubling waits up to 500 ms,
    /// and stops early when the worker exits.
    fn until_listening(
        &mut self,
        socket: &Path,
        spawned: Instant,
        limit: Duration,
    ) -> Result<(), Failure> {
        let mut wait = FIRST_TRY;
        loop {
            let left = limit.saturating_sub(spawned.elapsed());
            // An exit is noticed at once rather than after the next sleep.
            if let Some(status) = child::wait_exit(&mut self.child, wait.min(left)) {
                return Err(self.failed_with(format!(
                    "the worker {} before accepting connections on {}",
                    child::describe(status),
                    socket.display()
                )));
            }
            let last_error = match UnixStream::connect(socket) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if spawned.elapsed() >= limit {
                return Err(self.failed(&format!(
                    "the worker did not accept connections on {} within {} ms (last error: {last_error}); killed it",
                    socket.display(),
                    limit.as_millis()
                )));
            }
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }

    fn failed(&mut self, what: &str) -> Failure {
        child::kill(&mut self.child);
        self.failed_with(what.to_owned())
    }

    fn failed_with(&mut self, what: String) -> Failure {
        Failure::Worker(format!("{what}{}", logs(&self.stdout, &self.stderr)))
    }
}

fn command(options: &Options, args: &[String]) -> ExecuteCommand {
    let mut command = ExecuteCommand::new();
    command.argv = args.iter().map(|a| a.clone().into_bytes()).collect();
    command.env = options
        .env
        .iter()
        .map(|(k, v)| {
            let mut entry = EnvironmentEntry::new();
            entry.key = k.clone().into_bytes();
            entry.value = v.clone().into_bytes();
            entry
        })
        .collect();
    command.timeout_s = options.action_timeout_s;
    command
}

/// One answered command.
struct Answer {
    n: usize,
    response: ExecuteResponse,
    latency: Duration,
}

enum Progress<'a> {
    Sent(usize, &'a [String]),
    Answered(&'a Answer),
}

/// One command as one call: `Execute` (unary), or with `exec` the
/// client-streaming `Exec` (the command as its one event, then half-close).
/// `None` when no answer came by `deadline`.
fn call(
    client: &grpcio::Client,
    exec: bool,
    request: &ExecuteCommand,
    deadline: Instant,
) -> grpcio::Result<Option<grpcio::Result<ExecuteResponse>>> {
    if !exec {
        let mut call = client.unary_call_async(&EXECUTE, request, CallOption::default())?;
        return Ok(block_on_until(&mut call, deadline));
    }
    let (mut sink, mut receiver) = client.client_streaming(&EXEC, CallOption::default())?;
    let mut event = ExecuteEvent::new();
    event.set_command(request.clone());
    let mut sent = Box::pin(async move {
        sink.send((event, WriteFlags::default())).await?;
        sink.close().await
    });
    // A refused write shows as the call's status below; only a timeout ends here.
    if block_on_until(&mut sent, deadline).is_none() {
        return Ok(None);
    }
    Ok(block_on_until(&mut receiver, deadline))
}

/// Sends every command as its own `Execute` (or `Exec`) call, `concurrency`
/// at a time.
fn execute_all(
    worker: &mut Worker,
    options: &Options,
    first: usize,
    count: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Answer>, Failure> {
    let next = Arc::new(AtomicUsize::new(first));
    let stop = Arc::new(AtomicBool::new(false));
    let end = first + count;
    let (tx, rx) = unbounded();
    let threads = options.concurrency.min(count.max(1));
    for _ in 0..threads {
        let (next, stop, tx) = (Arc::clone(&next), Arc::clone(&stop), tx.clone());
        let client = worker.connection.client();
        let options = options.clone();
        std::thread::spawn(move || loop {
            let n = next.fetch_add(1, Ordering::SeqCst);
            if n >= end || stop.load(Ordering::SeqCst) {
                break;
            }
            if let Some(before) = &options.before_request {
                if let Err(e) = requests::before(before, n) {
                    let _ = tx.send(Err(Failure::Usage(e)));
                    break;
                }
            }
            let args = requests::nth(&options.requests, n);
            let request = command(&options, &args);
            let _ = tx.send(Ok((n, args, None)));
            let sent = Instant::now();
            let deadline = sent + options.timeout;
            let mut result = Err("no attempt".to_owned());
            for attempt in 1..=EXECUTE_ATTEMPTS {
                result = match call(&client, options.rpc == Rpc::Exec, &request, deadline) {
                    Ok(outcome) => match outcome {
                        Some(Ok(response)) => Ok(response),
                        Some(Err(grpcio::Error::RpcFailure(status)))
                            if status.code() == RpcStatusCode::UNAVAILABLE
                                && attempt < EXECUTE_ATTEMPTS =>
                        {
                            continue
                        }
                        Some(Err(e)) => Err(format!(
                            "{} for request {n} failed: {e}",
                            options.rpc.name()
                        )),
                        None => Err(format!(
                            "no response to request {n} within {} ms (--timeout-ms)",
                            options.timeout.as_millis()
                        )),
                    },
                    Err(e) => Err(format!("cannot start an {} call: {e}", options.rpc.name())),
                };
                break;
            }
            let event = result
                .map(|response| {
                    let latency = sent.elapsed();
                    (n, Vec::new(), Some((response, latency)))
                })
                .map_err(Failure::Worker);
            if tx.send(event).is_err() {
                break;
            }
        });
    }
    drop(tx);
    let mut answers = Vec::with_capacity(count);
    let mut first_error = None;
    for event in rx {
        match event {
            Ok((n, args, None)) => progress(Progress::Sent(n, &args)),
            Ok((n, _, Some((response, latency)))) => {
                let answer = Answer {
                    n,
                    response,
                    latency,
                };
                progress(Progress::Answered(&answer));
                answers.push(answer);
            }
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(Failure::Worker(e)) => Err(worker.failed(&e)),
        Some(usage) => Err(usage),
        None => Ok(answers),
    }
}

/// Sends every command on one `ExecuteStream` call, `concurrency` in flight,
/// and checks that each id is answered exactly once.
fn stream_all(
    worker: &mut Worker,
    options: &Options,
    first: usize,
    count: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Answer>, Failure> {
    let client = worker.connection.client();
    let (mut sink, mut responses) = client
        .duplex_streaming(&EXECUTE_STREAM, CallOption::default())
        .map_err(|e| worker.failed(&format!("cannot start an ExecuteStream call: {e}")))?;
    let mut answers = Vec::with_capacity(count);
    let mut in_flight: HashMap<u64, (usize, Instant)> = HashMap::new();
    let mut answered: HashSet<u64> = HashSet::new();
    let mut next = 0usize;
    while next < count || !in_flight.is_empty() {
        while in_flight.len() < options.concurrency && next < count {
            let n = first + next;
            if let Some(before) = &options.before_request {
                requests::before(before, n).map_err(Failure::Usage)?;
            }
            let args = requests::nth(&options.requests, n);
            let mut message = ExecuteCommandStream::new();
            message.request = Some(command(options, &args)).into();
            // Ids count up from 0 within the call, as Buck2 numbers them.
            message.id = next as u64;
            let sent = Instant::now();
            let mut send = sink.send((message, WriteFlags::default()));
            match block_on_until(&mut send, sent + options.timeout) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    return Err(worker.failed(&format!("sending command {next} failed: {e}")))
                }
                None => {
                    return Err(
                        worker.failed(&format!("sending command {next} did not finish in time"))
                    )
                }
            }
            progress(Progress::Sent(n, &args));
            in_flight.insert(next as u64, (n, sent));
            next += 1;
        }
        let deadline = in_flight
            .values()
            .map(|(_, sent)| *sent + options.timeout)
            .min()
            .unwrap_or_else(Instant::now);
        let mut receive = responses.next();
        let message = match block_on_until(&mut receive, deadline) {
            Some(Some(Ok(message))) => message,
            Some(Some(Err(e))) => {
                return Err(worker.failed(&format!("the ExecuteStream call failed: {e}")))
            }
            Some(None) => {
                let mut waiting: Vec<u64> = in_flight.keys().copied().collect();
                waiting.sort_unstable();
                return Err(worker.failed(&format!(
                    "protocol violation: the ExecuteStream call ended with ids {waiting:?} unanswered"
                )));
            }
            None => {
                let mut waiting: Vec<u64> = in_flight.keys().copied().collect();
                waiting.sort_unstable();
                return Err(worker.failed(&format!(
                    "no response within {} ms (--timeout-ms); waiting for ids {waiting:?}",
                    options.timeout.as_millis()
                )));
            }
        };
        let id = message.id;
        let Some((n, sent)) = in_flight.remove(&id) else {
            let why = if answered.contains(&id) {
                format!("a second response for id {id} (exactly one response per command)")
            } else {
                format!("a response with id {id}, which no command in flight has")
            };
            return Err(worker.failed(&format!("protocol violation: {why}")));
        };
        answered.insert(id);
        let answer = Answer {
            n,
            response: message.response.into_option().unwrap_or_default(),
            latency: sent.elapsed(),
        };
        progress(Progress::Answered(&answer));
        answers.push(answer);
    }
    let mut close = sink.close();
    let deadline = Instant::now() + options.timeout;
    match block_on_until(&mut close, deadline) {
        // grpcio reports a call the server finished right after our
        // half-close as "finished"; the status arrives with the stream's end.
        Some(Ok(())) | Some(Err(grpcio::Error::RpcFinished(_))) | None => {}
        Some(Err(e)) => {
            return Err(worker.failed(&format!("closing the ExecuteStream call failed: {e}")))
        }
    }
    let mut end = responses.next();
    match block_on_until(&mut end, deadline) {
        Some(None) => {}
        Some(Some(Ok(extra))) => {
            return Err(worker.failed(&format!(
                "protocol violation: a response with id {} after every command was answered",
                extra.id
            )))
        }
        Some(Some(Err(e))) => {
            return Err(worker.failed(&format!("the ExecuteStream call ended with an error: {e}")))
        }
        None => {
            return Err(worker.failed(&format!(
                "the worker did not end the ExecuteStream call within {} ms of our half-close",
                options.timeout.as_millis()
            )))
        }
    }
    Ok(answers)
}

fn send_all(
    worker: &mut Worker,
    options: &Options,
    first: usize,
    count: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Answer>, Failure> {
    if options.rpc == Rpc::ExecuteStream {
        stream_all(worker, options, first, count, progress)
    } else {
        execute_all(worker, options, first, count, progress)
    }
}

fn failed(answer: &Answer) -> bool {
    answer.response.exit_code != 0 || answer.response.timed_out_after_s.is_some()
}

pub fn run(options: &Options) -> Result<Outcome, Failure> {
    let mut worker = Worker::start(options)?;
    let quiet = options.quiet;
    if !quiet {
        println!(
            "started worker `{}` (pid {}); it accepted connections after {:.1} ms",
            child::show_command(&options.command),
            worker.child.id(),
            worker.connected_after.as_secs_f64() * 1000.0
        );
    }
    let count = options.requests.len() * options.repeat;
    let mut out = std::io::stdout().lock();
    let answers = send_all(&mut worker, options, 0, count, &mut |p| {
        if quiet {
            return;
        }
        let _ = match p {
            Progress::Sent(n, args) => writeln!(out, "-> request {n}: {args:?}"),
            Progress::Answered(a) => {
                let r = &a.response;
                let status = match r.timed_out_after_s {
                    Some(s) => format!("timed out after {s} s (exit_code {})", r.exit_code),
                    None => format!("exit_code {}", r.exit_code),
                };
                writeln!(
                    out,
                    "<- response {}: {status} after {:.1} ms\n{}",
                    a.n,
                    a.latency.as_secs_f64() * 1000.0,
                    bazel::indent(&r.stderr)
                )
            }
        };
    })?;
    let _ = out.flush();
    drop(out);
    let failures = answers.iter().filter(|a| failed(a)).count();
    let note = worker.stop();
    println!(
        "{count} request(s), {} response(s) via {}: {failures} failed; protocol OK; {note}",
        answers.len(),
        options.rpc.name()
    );
    Ok(Outcome {
        failed_requests: failures,
    })
}

pub fn bench(options: &Options, requests: usize) -> Result<Measurement, Failure> {
    let mut worker = Worker::start(options)?;
    let warm = Options {
        concurrency: 1,
        ..options.clone()
    };
    send_all(&mut worker, &warm, 0, 1, &mut |_| {})?;
    let startup = worker.spawned.elapsed();
    let idle = measurement::memory(worker.child.id());
    let start = Instant::now();
    let answers = send_all(&mut worker, options, 1, requests, &mut |_| {})?;
    let elapsed = start.elapsed();
    let memory = measurement::memory_now(worker.child.id(), idle);
    worker.stop();
    let transport = format!("grpc {}", options.rpc.name());
    let mut m = Measurement::new(Mode::Buck2, &transport, options.concurrency);
    m.startup = startup;
    m.elapsed = elapsed;
    m.memory = memory;
    for a in &answers {
        let code = if failed(a) {
            a.response.exit_code.max(1)
        } else {
            0
        };
        m.record(a.latency, code, &a.response.stderr);
    }
    Ok(m)
}

/// The worker's command as Buck2 starts it: `WORKER_SOCKET` set, stdin
/// closed; the caller decides where its output goes.
fn worker_command(options: &Options, socket: &Path) -> Result<Command, Failure> {
    let (program, args) = options
        .command
        .split_first()
        .ok_or_else(|| Failure::Usage("empty worker command".to_owned()))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env("WORKER_SOCKET", socket)
        .stdin(Stdio::null());
    if let Some(cwd) = &options.cwd {
        command.current_dir(cwd);
    }
    Ok(command)
}

/// Spawn to the first successful `connect` on the worker's socket, polled
/// every 20 µs rather than on Buck2's schedule, which would round every start
/// up to 50 ms; then the worker is killed.
pub fn time_to_accepting(options: &Options) -> Result<Duration, Failure> {
    const POLL: Duration = Duration::from_micros(20);
    let dir = SocketDir::create()?;
    let socket = dir.0.join("socket");
    let mut command = worker_command(options, &socket)?;
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let spawned = Instant::now();
    let mut process = child::spawn(command, &options.command)?;
    let limit = GIVE_UP.min(options.timeout);
    let result = loop {
        if UnixStream::connect(&socket).is_ok() {
            break Ok(spawned.elapsed());
        }
        if let Ok(Some(status)) = process.try_wait() {
            break Err(Failure::Worker(format!(
                "the worker {} before accepting connections on {}",
                child::describe(status),
                socket.display()
            )));
        }
        if spawned.elapsed() >= limit {
            break Err(Failure::Worker(format!(
                "the worker did not accept connections on {} within {} ms",
                socket.display(),
                limit.as_millis()
            )));
        }
        std::thread::sleep(POLL);
    };
    child::kill(&mut process);
    result
}
