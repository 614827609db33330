//! `worker-client`: drives a persistent worker the way Buck2, Bazel and a
//! remote executor do, checks that it keeps to the protocol, and measures it.
//!
//! - [`bazel`]: the stdin/stdout protocol as Bazel speaks it, with the
//!   conformance checks every stdio mode shares.
//! - [`remote`]: the same protocol as a BuildBuddy-style executor speaks it.
//! - [`buck2`]: Buck2's gRPC protocol on a Unix socket.
//! - [`bench`](mod@bench): timing any of the three, recording into a
//!   [`measurement`] (latencies, memory, percentiles).
//! - [`check`](mod@check): a conformance report card built from all of the above.
//! - [`requests`], [`child`], [`digest`]: request lists, worker processes,
//!   SHA-256 for input digests.

mod bazel;
mod bench;
mod buck2;
mod check;
mod child;
mod digest;
mod engine;
mod measurement;
mod remote;
mod requests;

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use persistent_worker::cli::{number, os_text, text};

const USAGE: &str = "\
usage: worker-client bazel  [OPTIONS] [--json] [--multiplex N] [--cancel-after MS] -- WORKER...
       worker-client remote [OPTIONS] [--engine E] [--json] [--input PATH]...
                     [--action 'COMMAND...' [--tool-input PATH]...]... [-- COMMAND...]
       worker-client buck2  [OPTIONS] [--stream|--exec] [--concurrency N] -- WORKER...
       worker-client check  [--json] [--expect FEATURES] [--request 'ARGS'] -- WORKER...
                     (a report card of what the worker supports: see check --help)

Drives a persistent worker as Bazel (stdin/stdout, started with
--persistent_worker), a remote executor (COMMAND is the action's command
line: worker arguments plus @argfiles and --flagfile= arguments) or Buck2
(gRPC on the Unix socket named by WORKER_SOCKET) would, prints each response
and checks the worker keeps to the protocol.

requests (bazel, buck2):
  --arg X               add X to the request being built (all --arg make one)
  --request 'A B C'     one request, arguments separated by whitespace
  --requests-file FILE  one request per line, arguments separated by whitespace
  --repeat K            send the request list K times (default 1)
  The text {n} in an argument becomes the request's number (0, 1, ...).
  --before-request CMD  run `sh -c CMD` ({n} replaced) before sending each
                        request, untimed, as an edit between builds; one
                        request at a time only; stops the run if it fails

bazel / remote:
  --json                JSON framing instead of delimited protobuf (the worker
                        must be told with its own arguments, as Bazel does)
  --multiplex N         bazel: up to N requests in flight, ids 1, 2, ...;
                        fewer than N requests are repeated up to N
  --cancel-after MS     bazel: cancel every request still in flight MS ms
                        after it was sent
  --input PATH          remote: an input file, sent with its path and a
                        serialized REAPI Digest (SHA-256) as digest
                        (buildbuddy only: the others send no inputs)

remote:
  --engine E            buildbuddy (default), nativelink or buildbarn: start,
                        feed, key, retire and stop workers as that engine does
  --action 'COMMAND'    an action's command line (whitespace-separated); give
                        several to see which share a worker; the command after
                        -- is one more. --repeat sends the list K times
  --tool-input PATH     an artifact of the last action's WorkerInfo.exe (for
                        the command after --: given before any --action);
                        Buck2 derives persistentWorkerKey from these
  --root DIR            the engine's own directory (nativelink: the root the
                        worker starts in; buildbarn: the workers' directories);
                        default: a temporary directory, removed at the end
  The action's files are --cwd; an engine that gives an action or a worker a
  directory of its own gets a copy, and the files the request created or
  changed are copied back. Each action prints the key its engine files the
  worker under.
  --verbosity N         WorkRequest.verbosity (default 0)

buck2:
  --stream              WorkerStreaming.ExecuteStream instead of Worker.Execute
  --exec                Worker.Exec (client-streaming: the command, then
                        half-close) instead of Worker.Execute
  --concurrency N       requests in flight (default 1)
  --env KEY=VALUE       environment entry sent with every request
  --action-timeout-s N  ExecuteCommand.timeout_s

common:
  --timeout-ms N        give up on a request not answered after N ms (default 30000)
  --cwd DIR             the worker's working directory (default: the current one)
  --worker-stderr       copy the worker's stderr to ours as it arrives
                        (otherwise it is shown only when something fails)
  -q, --quiet           print only the summary
  -h, --help            print this help

bench (any mode; measures instead of printing each response):
  --bench               run the benchmark with the defaults below
  --requests N          requests to time (default 1000)
  --concurrency C       requests in flight (bazel: C > 1 uses multiplex ids;
                        remote: C workers, one request each at a time, as
                        C executor runners; buck2: C concurrent calls)
  --json-out FILE       also write the results as JSON (latency percentiles,
                        throughput, the worker's memory from /proc when
                        readable)
  --startup-runs N      then start the worker N more times and report the
                        median start-up: bazel, spawn to first response;
                        buck2, spawn to the socket accepting connections

exit status: 0 all requests succeeded; 1 some request failed (non-zero exit
code); 2 usage error; 3 the worker failed: it exited early, did not answer in
time, or broke the protocol.
";

/// What went wrong, and so which exit status.
#[derive(Debug)]
pub enum Failure {
    /// Our own command line or input files are wrong.
    Usage(String),
    /// The worker exited early, did not answer, or broke the protocol.
    Worker(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Worker(m) => f.write_str(m),
        }
    }
}

/// The Buck2 RPC that carries the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `Worker.Execute`, unary: one call per command.
    Execute,
    /// `Worker.Exec`, client-streaming: one call per command, sent as its one
    /// event before the half-close.
    Exec,
    /// `WorkerStreaming.ExecuteStream`: one call carries them all.
    ExecuteStream,
}

impl Rpc {
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Execute => "Execute",
            Rpc::Exec => "Exec",
            Rpc::ExecuteStream => "ExecuteStream",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bazel,
    Remote,
    Buck2,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Bazel => "bazel",
            Mode::Remote => "remote",
            Mode::Buck2 => "buck2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub requests: usize,
    pub json_out: Option<PathBuf>,
    pub startup_runs: usize,
}

/// Everything from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// The worker's command (bazel, buck2) or the action's (remote).
    pub command: Vec<String>,
    /// Request argument lists, before `{n}` substitution.
    pub requests: Vec<Vec<String>>,
    /// `--before-request`: a shell command run before each request is sent.
    pub before_request: Option<String>,
    pub repeat: usize,
    pub json: bool,
    pub multiplex: Option<usize>,
    pub cancel_after: Option<Duration>,
    pub inputs: Vec<PathBuf>,
    pub verbosity: i32,
    /// remote: the engine whose shape to drive the worker in.
    pub engine: engine::Engine,
    /// remote: the actions, the command after `--` last.
    pub actions: Vec<remote::Action>,
    pub root: Option<PathBuf>,
    pub rpc: Rpc,
    pub concurrency: usize,
    pub env: Vec<(String, String)>,
    pub action_timeout_s: Option<u64>,
    pub timeout: Duration,
    pub cwd: Option<PathBuf>,
    pub worker_stderr: bool,
    pub quiet: bool,
    pub bench: Option<BenchOptions>,
}

/// How a run ended when the worker itself behaved.
pub struct Outcome {
    pub failed_requests: usize,
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "check") {
        args.remove(0);
        return check::main(args);
    }
    let options = match parse(args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("worker-client: {e}\n\nRun 'worker-client --help' for usage.");
            return ExitCode::from(2);
        }
    };
    let result = match (&options.bench, options.mode) {
        (Some(_), _) => bench::run(&options),
        (None, Mode::Bazel) => bazel::run(&options),
        (None, Mode::Remote) => remote::run(&options),
        (None, Mode::Buck2) => buck2::run(&options),
    };
    match result {
        Ok(Outcome { failed_requests: 0 }) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(Failure::Usage(e)) => {
            eprintln!("worker-client: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Worker(e)) => {
            eprintln!("worker-client: {}: {e}", options.mode.name());
            ExitCode::from(3)
        }
    }
}

/// `Ok(None)` asks for the help text.
fn parse(args: Vec<OsString>) -> Result<Option<Options>, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mode = match parser.next().map_err(|e| e.to_string())? {
        Some(Value(v)) => match v.to_str() {
            Some("bazel") => Mode::Bazel,
            Some("remote") => Mode::Remote,
            Some("buck2") => Mode::Buck2,
            Some("help") => return Ok(None),
            _ => {
                return Err(format!(
                    "unknown mode {v:?}: expected bazel, remote or buck2"
                ))
            }
        },
        Some(Short('h') | Long("help")) => return Ok(None),
        Some(other) => return Err(other.unexpected().to_string()),
        None => return Err("a mode is required: bazel, remote or buck2".to_owned()),
    };
    let mut o = Options {
        mode,
        command: Vec::new(),
        requests: Vec::new(),
        before_request: None,
        repeat: 1,
        json: false,
        multiplex: None,
        cancel_after: None,
        inputs: Vec::new(),
        verbosity: 0,
        engine: engine::Engine::BuildBuddy,
        actions: Vec::new(),
        root: None,
        rpc: Rpc::Execute,
        concurrency: 1,
        env: Vec::new(),
        action_timeout_s: None,
        timeout: Duration::from_millis(30_000),
        cwd: None,
        worker_stderr: false,
        quiet: false,
        bench: None,
    };
    let mut building: Option<Vec<String>> = None;
    // Tool inputs named before any --action belong to the command after --.
    let mut trailing_tool_inputs = Vec::new();
    let mut bench = false;
    let mut bench_requests = 1000;
    let mut json_out = None;
    let mut startup_runs = 0;
    let only = |allowed: &[Mode], flag: &str| -> Result<(), String> {
        if allowed.contains(&mode) {
            Ok(())
        } else {
            Err(format!("{flag} does not apply to {} mode", mode.name()))
        }
    };
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("arg") => {
                only(&[Mode::Bazel, Mode::Buck2], "--arg")?;
                let value = text(&mut parser)?;
                building.get_or_insert_with(Vec::new).push(value);
            }
            Long("request") => {
                only(&[Mode::Bazel, Mode::Buck2], "--request")?;
                flush(&mut building, &mut o.requests);
                o.requests.push(requests::split(&text(&mut parser)?));
            }
            Long("requests-file") => {
                only(&[Mode::Bazel, Mode::Buck2], "--requests-file")?;
                flush(&mut building, &mut o.requests);
                let path = PathBuf::from(parser.value().map_err(|e| e.to_string())?);
                o.requests.extend(requests::read_file(&path)?);
            }
            Long("before-request") => {
                only(&[Mode::Bazel, Mode::Buck2], "--before-request")?;
                o.before_request = Some(text(&mut parser)?);
            }
            Long("repeat") => o.repeat = positive(&mut parser, "--repeat")?,
            Long("json") => {
                only(&[Mode::Bazel, Mode::Remote], "--json")?;
                o.json = true;
            }
            Long("multiplex") => {
                only(&[Mode::Bazel], "--multiplex")?;
                o.multiplex = Some(positive(&mut parser, "--multiplex")?);
            }
            Long("cancel-after") => {
                only(&[Mode::Bazel], "--cancel-after")?;
                o.cancel_after = Some(Duration::from_millis(number(
                    &mut parser,
                    "--cancel-after",
                )?));
            }
            Long("input") => {
                only(&[Mode::Remote], "--input")?;
                o.inputs
                    .push(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
            }
            Long("engine") => {
                only(&[Mode::Remote], "--engine")?;
                o.engine = engine::Engine::parse(&text(&mut parser)?)?;
            }
            Long("action") => {
                only(&[Mode::Remote], "--action")?;
                let command = requests::split(&text(&mut parser)?);
                if command.is_empty() {
                    return Err("--action needs a command line".to_owned());
                }
                o.actions.push(remote::Action {
                    command,
                    tool_inputs: Vec::new(),
                });
            }
            Long("tool-input") => {
                only(&[Mode::Remote], "--tool-input")?;
                let path = PathBuf::from(parser.value().map_err(|e| e.to_string())?);
                match o.actions.last_mut() {
                    Some(action) => action.tool_inputs.push(path),
                    None => trailing_tool_inputs.push(path),
                }
            }
            Long("root") => {
                only(&[Mode::Remote], "--root")?;
                o.root = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
            }
            Long("verbosity") => {
                only(&[Mode::Bazel, Mode::Remote], "--verbosity")?;
                o.verbosity = number(&mut parser, "--verbosity")?;
            }
            Long(flag @ ("stream" | "exec")) => {
                only(&[Mode::Buck2], &format!("--{flag}"))?;
                let rpc = if flag == "stream" {
                    Rpc::ExecuteStream
                } else {
                    Rpc::Exec
                };
                if ![Rpc::Execute, rpc].contains(&o.rpc) {
                    return Err("--stream and --exec exclude each other".into());
                }
                o.rpc = rpc;
            }
            Long("concurrency") => o.concurrency = positive(&mut parser, "--concurrency")?,
            Long("env") => {
                only(&[Mode::Buck2], "--env")?;
                let entry = text(&mut parser)?;
                match entry.split_once('=') {
                    Some((k, v)) if !k.is_empty() => o.env.push((k.to_owned(), v.to_owned())),
                    _ => return Err(format!("--env needs KEY=VALUE, got '{entry}'")),
                }
            }
            Long("action-timeout-s") => {
                only(&[Mode::Buck2], "--action-timeout-s")?;
                o.action_timeout_s = Some(number(&mut parser, "--action-timeout-s")?);
            }
            Long("timeout-ms") => {
                o.timeout = Duration::from_millis(positive(&mut parser, "--timeout-ms")? as u64)
            }
            Long("cwd") => o.cwd = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?)),
            Long("worker-stderr") => o.worker_stderr = true,
            Short('q') | Long("quiet") => o.quiet = true,
            Long("bench") => bench = true,
            Long("requests") => {
                bench = true;
                bench_requests = positive(&mut parser, "--requests")?;
            }
            Long("json-out") => {
                bench = true;
                json_out = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
            }
            Long("startup-runs") => {
                bench = true;
                startup_runs = positive(&mut parser, "--startup-runs")?;
            }
            Short('h') | Long("help") => return Ok(None),
            // After `--` (or at the first positional) everything is the
            // worker's, including options that look like ours.
            Value(first) => {
                o.command.push(os_text(first)?);
                for rest in parser.raw_args().map_err(|e| e.to_string())? {
                    o.command.push(os_text(rest)?);
                }
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    flush(&mut building, &mut o.requests);
    if mode == Mode::Remote {
        if !o.command.is_empty() {
            o.actions.push(remote::Action {
                command: o.command.clone(),
                tool_inputs: trailing_tool_inputs,
            });
        } else if !trailing_tool_inputs.is_empty() {
            return Err(
                "--tool-input before any --action belongs to the command after '--', \
                        and there is none"
                    .to_owned(),
            );
        }
        if bench && (o.engine != engine::Engine::BuildBuddy || o.command.is_empty()) {
            return Err(
                "a remote benchmark drives the command after '--' as buildbuddy does".to_owned(),
            );
        }
    }
    if o.command.is_empty() && (mode != Mode::Remote || o.actions.is_empty()) {
        return Err(format!(
            "no worker command: put it after '--', e.g. worker-client {} -- persistent-worker",
            mode.name()
        ));
    }
    if o.requests.is_empty() && mode != Mode::Remote {
        return Err("no requests: give --arg, --request or --requests-file".to_owned());
    }
    // With one request at a time the command runs between an answer and
    // the next request, which is what makes it an edit between builds.
    if o.before_request.is_some() && (bench || o.concurrency > 1 || o.multiplex.is_some()) {
        return Err(
            "--before-request needs one request at a time: no --bench, --concurrency or \
             --multiplex"
                .to_owned(),
        );
    }
    if o.cancel_after.is_some() && bench {
        return Err("--cancel-after cannot be combined with a benchmark".to_owned());
    }
    if bench {
        o.bench = Some(BenchOptions {
            requests: bench_requests,
            json_out,
            startup_runs,
        });
    }
    Ok(Some(o))
}

fn flush(building: &mut Option<Vec<String>>, requests: &mut Vec<Vec<String>>) {
    if let Some(request) = building.take() {
        requests.push(request);
    }
}

fn positive(parser: &mut lexopt::Parser, flag: &str) -> Result<usize, String> {
    match number::<usize>(parser, flag)? {
        0 => Err(format!("{flag} must be at least 1")),
        n => Ok(n),
    }
}
