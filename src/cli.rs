//! The command line: which mode to run and with which options.
//!
//! Argument files in the worker's own argv are expanded first, because
//! Buck2, Bazel and remote executors all may hand worker options over that
//! way, and `--persistent_worker` may stand anywhere, even inside one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::argfile;
use crate::bazel::framing::DEFAULT_MAX_MESSAGE_BYTES;
use crate::bazel::WireFormat;
use crate::bridge::{Recycle, DEFAULT_MAX_ENV_KEYS};
use crate::quote::{quoted, quoted_bytes};

/// The slice asked for by default: the shortest the kernel grants (0.1 ms;
/// see `sched` for why, and docs/performance.md for what it measured).
pub const DEFAULT_SLICE: Duration = Duration::from_micros(100);

pub const USAGE: &str = "\
usage: persistent-worker [OPTIONS] --persistent_worker    Bazel-protocol worker on stdin/stdout
       WORKER_SOCKET=PATH persistent-worker [OPTIONS]     Buck2 worker (gRPC on a Unix socket)
       persistent-worker [OPTIONS] ARGS...                run one request and exit (one-shot)
       persistent-worker --bridge [OPTIONS] -- CMD ARGS...
                       any of the above, each request forwarded to the Bazel-protocol
                       worker `CMD ARGS... --persistent_worker` (a child process)

Arguments may come from files: @FILE, --flagfile=FILE, -flagfile=FILE.

options:
  --worker-options FILE      read worker options from FILE, one per line
                             (relative to the working directory); a build
                             rule writes it so a change of options changes
                             the worker's identity
  --concurrency N            requests run at once (default: available parallelism)
  --worker-protocol FORMAT   Bazel framing: proto (default) or json
  --work-ms N                demo tool: simulated work per request (default 0)
  --max-message-bytes N      Bazel: largest request accepted (default 67108864)
  --max-argfile-bytes N      bytes one request may read from argument files,
                             all of them together (default 67108864)
  --shutdown-grace-ms N      Buck2 and Bazel: how long in-flight requests may
                             finish after SIGTERM/SIGINT (default 2000)
  --slice-us N               time slice the worker's threads ask the kernel
                             for, so they preempt a busy build on wake-up
                             (Linux 6.12+; default 100, 0 = kernel default)
  --verbose                  log each request's start and end on stderr
bridge options:
  --bridge                   serve requests with child workers `CMD ARGS...`
  --multiplex                one multiplex child instead of up to --concurrency
                             singleplex children
  --child-protocol FORMAT    framing spoken to the children: proto (default) or json
  --cancel-grace-ms N        how long a cancelled or timed-out request's child may
                             still answer before it is killed or abandoned (default 100)
  --max-env-keys N           request environments with children at once; a new one
                             beyond N retires the least recently used (default 4;
                             0: ignore the requests' environments)
  --max-requests-per-child N replace a child after it served N requests (default: never)
  --max-child-rss-mib M      replace a child whose resident memory is over M MiB
                             after a request (default: never)
  -h, --help                 print this help
  -V, --version              print the version
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `WORKER_SOCKET` was set: serve Buck2's gRPC protocol there.
    Buck2 { socket: PathBuf },
    /// `--persistent_worker`: serve Bazel's protocol on stdin/stdout.
    Bazel,
    /// Neither: run the request in `Options::request_args` and exit.
    OneShot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    pub concurrency: usize,
    pub wire_format: WireFormat,
    pub work: Duration,
    pub max_message_bytes: usize,
    pub max_argfile_bytes: usize,
    pub shutdown_grace: Duration,
    /// The time slice the worker's threads ask the kernel for (`sched`);
    /// zero keeps the kernel's default.
    pub slice: Duration,
    /// Log every request's start and end on stderr.
    pub verbose: bool,
    /// One-shot only: the request's arguments, already expanded.
    pub request_args: Vec<String>,
    /// `--bridge ... -- CMD ARGS...`: forward requests to child workers.
    pub bridge: Option<BridgeOptions>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeOptions {
    /// `CMD ARGS...`, without the `--persistent_worker` added at spawn.
    pub command: Vec<String>,
    pub multiplex: bool,
    pub child_protocol: WireFormat,
    pub cancel_grace: Duration,
    /// `--max-env-keys`: 0 ignores the requests' environments.
    pub max_env_keys: usize,
    pub recycle: Recycle,
}

// Parsed once per process and matched at once: boxing `Options` would save
// nothing and cost every caller a dereference.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Options),
    Help,
    Version,
}

/// Parses argv (without the program name). `worker_socket` is the value of
/// `WORKER_SOCKET`; `cwd` is where argument files of the argv resolve.
/// Errors are messages for stderr; the caller exits with code 2.
pub fn parse(
    args: Vec<OsString>,
    worker_socket: Option<OsString>,
    cwd: &Path,
) -> Result<Command, String> {
    let args = args
        .into_iter()
        .map(|a| {
            a.into_string().map_err(|a| {
                format!(
                    "argument {:?} is not valid UTF-8",
                    quoted_bytes(a.as_encoded_bytes())
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut args = argfile::expand(&args, cwd).map_err(|e| e.to_string())?;
    let child_command = split_bridge_command(&mut args);
    let mode = match worker_socket.filter(|s| !s.is_empty()) {
        Some(socket) => Mode::Buck2 {
            socket: PathBuf::from(socket),
        },
        None if args.iter().any(|a| a == "--persistent_worker") => Mode::Bazel,
        None => Mode::OneShot,
    };
    let mut options = Options {
        mode,
        concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
        wire_format: WireFormat::Proto,
        work: Duration::ZERO,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        max_argfile_bytes: argfile::DEFAULT_MAX_BYTES,
        shutdown_grace: Duration::from_millis(2000),
        slice: DEFAULT_SLICE,
        verbose: false,
        request_args: Vec::new(),
        bridge: None,
    };
    let mut bridge = BridgeFlags {
        options: BridgeOptions {
            command: Vec::new(),
            multiplex: false,
            child_protocol: WireFormat::Proto,
            cancel_grace: Duration::from_millis(100),
            max_env_keys: DEFAULT_MAX_ENV_KEYS,
            recycle: Recycle::default(),
        },
        on: false,
        only: None,
    };
    let source = if options.mode == Mode::OneShot {
        Source::OneShotArgv
    } else {
        Source::WorkerArgv
    };
    if let Some(command) = apply(&args, source, cwd, &mut options, &mut bridge)? {
        return Ok(command);
    }
    // The request is expanded again when it runs; keep literal `@x` literal.
    options.request_args = argfile::escape(options.request_args);
    match (bridge.on, child_command) {
        (true, Some(command)) if !command.is_empty() => {
            bridge.options.command = command;
            options.bridge = Some(bridge.options);
        }
        (true, _) => return Err("--bridge needs the child's command after `--`".to_owned()),
        (false, _) => {
            if let Some(flag) = bridge.only {
                return Err(format!("{flag} is a bridge option and needs --bridge"));
            }
        }
    }
    Ok(Command::Run(options))
}

/// The bridge's options as they are read; they only count with `--bridge`.
struct BridgeFlags {
    options: BridgeOptions,
    on: bool,
    /// The last bridge-only option seen, to name it if `--bridge` is missing.
    only: Option<&'static str>,
}

/// Where a list of options came from: what it may contain depends on it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source<'a> {
    /// Unknown arguments are the one-shot request's.
    OneShotArgv,
    WorkerArgv,
    /// A `--worker-options` file: worker options only.
    File(&'a str),
}

/// Applies `args` to `options`; `Some` when the command is help or version.
fn apply(
    args: &[String],
    source: Source,
    cwd: &Path,
    options: &mut Options,
    bridge: &mut BridgeFlags,
) -> Result<Option<Command>, String> {
    use lexopt::prelude::*;
    let one_shot = source == Source::OneShotArgv;
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            // The mode is chosen from the command line before any option is
            // read, so a file cannot change it.
            Long("persistent_worker") if !matches!(source, Source::File(_)) => {}
            Long("worker-options") if !matches!(source, Source::File(_)) => {
                let name = text(&mut parser)?;
                let lines = read_options_file(&name, cwd)?;
                apply(&lines, Source::File(&name), cwd, options, bridge)
                    .map_err(|e| format!("worker options file '{name}': {e}"))?;
            }
            Long("concurrency") => {
                options.concurrency = number(&mut parser, "--concurrency")?;
                if options.concurrency == 0 {
                    return Err("--concurrency must be at least 1".to_owned());
                }
            }
            Long("worker-protocol") => options.wire_format = text(&mut parser)?.parse()?,
            Long("work-ms") => {
                options.work = Duration::from_millis(number(&mut parser, "--work-ms")?)
            }
            Long("max-message-bytes") => {
                options.max_message_bytes = number(&mut parser, "--max-message-bytes")?
            }
            Long("max-argfile-bytes") => {
                options.max_argfile_bytes = number(&mut parser, "--max-argfile-bytes")?
            }
            Long("shutdown-grace-ms") => {
                options.shutdown_grace =
                    Duration::from_millis(number(&mut parser, "--shutdown-grace-ms")?)
            }
            Long("slice-us") => {
                options.slice = Duration::from_micros(number(&mut parser, "--slice-us")?)
            }
            Long("verbose") => options.verbose = true,
            Long("bridge") => bridge.on = true,
            Long("multiplex") => {
                bridge.options.multiplex = true;
                bridge.only = Some("--multiplex");
            }
            Long("child-protocol") => {
                bridge.options.child_protocol = text(&mut parser)?.parse()?;
                bridge.only = Some("--child-protocol");
            }
            Long("cancel-grace-ms") => {
                bridge.options.cancel_grace =
                    Duration::from_millis(number(&mut parser, "--cancel-grace-ms")?);
                bridge.only = Some("--cancel-grace-ms");
            }
            Long("max-env-keys") => {
                bridge.options.max_env_keys = number(&mut parser, "--max-env-keys")?;
                bridge.only = Some("--max-env-keys");
            }
            Long("max-requests-per-child") => {
                let max = number(&mut parser, "--max-requests-per-child")?;
                if max == 0 {
                    return Err("--max-requests-per-child must be at least 1".to_owned());
                }
                bridge.options.recycle.max_requests = Some(max);
                bridge.only = Some("--max-requests-per-child");
            }
            Long("max-child-rss-mib") => {
                let max = number(&mut parser, "--max-child-rss-mib")?;
                if max == 0 {
                    return Err("--max-child-rss-mib must be at least 1".to_owned());
                }
                bridge.options.recycle.max_rss_mib = Some(max);
                bridge.only = Some("--max-child-rss-mib");
            }
            Short('h') | Long("help") if !matches!(source, Source::File(_)) => {
                return Ok(Some(Command::Help))
            }
            Short('V') | Long("version") if !matches!(source, Source::File(_)) => {
                return Ok(Some(Command::Version))
            }
            // Anything else belongs to the one-shot request; a worker takes
            // its requests from the protocol, so there it is a mistake.
            Value(v) if one_shot => options.request_args.push(os_text(v)?),
            Long(name) if one_shot => {
                let name = format!("--{name}");
                match parser.optional_value() {
                    Some(v) => options.request_args.push(format!("{name}={}", os_text(v)?)),
                    None => options.request_args.push(name),
                }
            }
            Short(c) if one_shot => options.request_args.push(format!("-{c}")),
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(None)
}

/// The lines of a `--worker-options` file, one argument each; blank lines
/// are skipped so a generated file may end with a newline or two.
fn read_options_file(name: &str, cwd: &Path) -> Result<Vec<String>, String> {
    let path = cwd.join(name);
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "cannot read worker options file '{name}' ({}): {e}",
            path.display()
        )
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("worker options file '{name}' is not valid UTF-8"))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// With `--bridge`, everything after the first `--` is the child's command:
/// cut it off `args`. Bazel and remote executors append `--persistent_worker`
/// after all of it; that flag is the bridge's (the child gets its own), so it
/// moves back to the bridge's options.
fn split_bridge_command(args: &mut Vec<String>) -> Option<Vec<String>> {
    let split = args.iter().position(|a| a == "--")?;
    if !args[..split].iter().any(|a| a == "--bridge") {
        return None;
    }
    let mut command = args.split_off(split + 1);
    args.pop();
    if command.last().is_some_and(|a| a == "--persistent_worker") {
        command.pop();
        args.push("--persistent_worker".to_owned());
    }
    Some(command)
}

/// An argument as UTF-8, or a message naming it. (Shared with worker-client.)
pub fn os_text(value: OsString) -> Result<String, String> {
    value.into_string().map_err(|v| {
        format!(
            "argument {:?} is not valid UTF-8",
            quoted_bytes(v.as_encoded_bytes())
        )
    })
}

/// The current option's value as UTF-8.
pub fn text(parser: &mut lexopt::Parser) -> Result<String, String> {
    os_text(parser.value().map_err(|e| e.to_string())?)
}

/// The current option's value parsed as a number, or a message naming `flag`.
pub fn number<T: std::str::FromStr>(parser: &mut lexopt::Parser, flag: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let value = text(parser)?;
    value
        .parse()
        .map_err(|e| format!("invalid value '{}' for {flag}: {e}", quoted(&value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], socket: Option<&str>, cwd: &Path) -> Result<Command, String> {
        parse(
            args.iter().map(OsString::from).collect(),
            socket.map(OsString::from),
            cwd,
        )
    }

    fn options(args: &[&str], socket: Option<&str>) -> Options {
        match run(args, socket, Path::new(".")) {
            Ok(Command::Run(options)) => options,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn modes() {
        assert_eq!(options(&["out"], None).mode, Mode::OneShot);
        assert_eq!(
            options(&["--work-ms", "5", "--persistent_worker"], None).mode,
            Mode::Bazel
        );
        assert_eq!(
            options(&["--persistent_worker"], Some("/tmp/s")).mode,
            Mode::Buck2 {
                socket: "/tmp/s".into()
            }
        );
        assert_eq!(options(&[], Some("")).mode, Mode::OneShot);
    }

    #[test]
    fn worker_options() {
        let o = options(
            &[
                "--concurrency=3",
                "--worker-protocol",
                "json",
                "--work-ms",
                "250",
                "--persistent_worker",
            ],
            None,
        );
        assert_eq!(o.concurrency, 3);
        assert_eq!(o.wire_format, WireFormat::Json);
        assert_eq!(o.work, Duration::from_millis(250));
        assert_eq!(o.max_argfile_bytes, argfile::DEFAULT_MAX_BYTES);
        let o = options(
            &["--max-argfile-bytes", "1000", "--persistent_worker"],
            None,
        );
        assert_eq!(o.max_argfile_bytes, 1000);
    }

    #[test]
    fn a_huge_bad_value_is_quoted_short() {
        let huge = "9".repeat(1 << 20);
        let err = run(
            &["--max-argfile-bytes", &huge, "--persistent_worker"],
            None,
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.len() < 1000, "{} byte message", err.len());
        assert!(err.contains("(1048576 bytes)"), "{err}");
    }

    #[test]
    fn options_and_mode_may_come_from_an_argfile() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("flags"),
            "--concurrency\n2\n--persistent_worker\n",
        )
        .unwrap();
        match run(&["@flags"], None, d.path()) {
            Ok(Command::Run(o)) => {
                assert_eq!(o.mode, Mode::Bazel);
                assert_eq!(o.concurrency, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn worker_mode_rejects_unknown_options_and_positionals() {
        for args in [
            &["--bogus", "--persistent_worker"][..],
            &["out", "--persistent_worker"][..],
        ] {
            assert!(run(args, None, Path::new(".")).is_err(), "{args:?}");
        }
        assert!(run(
            &["--concurrency", "0", "--persistent_worker"],
            None,
            Path::new(".")
        )
        .is_err());
        assert!(run(
            &["--worker-protocol", "xml", "--persistent_worker"],
            None,
            Path::new(".")
        )
        .is_err());
    }

    #[test]
    fn one_shot_passes_unknown_arguments_to_the_request() {
        let o = options(
            &[
                "--work-ms",
                "1",
                "--panic",
                "--print-stdout=hi",
                "out",
                "@@lit",
            ],
            None,
        );
        assert_eq!(o.work, Duration::from_millis(1));
        assert_eq!(
            o.request_args,
            ["--panic", "--print-stdout=hi", "out", "@@lit"]
        );
    }

    #[test]
    fn bridge_takes_the_command_after_the_double_dash() {
        let o = options(
            &[
                "--bridge",
                "--multiplex",
                "--child-protocol",
                "json",
                "--cancel-grace-ms",
                "50",
                "--",
                "node",
                "w.js",
                "--persistent_worker",
            ],
            None,
        );
        assert_eq!(o.mode, Mode::Bazel);
        let bridge = o.bridge.expect("bridge options");
        assert_eq!(bridge.command, ["node", "w.js"]);
        assert!(bridge.multiplex);
        assert_eq!(bridge.child_protocol, WireFormat::Json);
        assert_eq!(bridge.cancel_grace, Duration::from_millis(50));
        let o = options(&["--bridge", "--", "w", "--flag"], Some("/tmp/s"));
        assert_eq!(o.bridge.unwrap().command, ["w", "--flag"]);
        assert!(run(&["--bridge", "--persistent_worker"], None, Path::new(".")).is_err());
        assert!(run(
            &["--multiplex", "--persistent_worker"],
            None,
            Path::new(".")
        )
        .is_err());
        assert_eq!(options(&["--", "x"], None).request_args, ["x"]);
    }

    #[test]
    fn bridge_env_keys_and_recycling_limits() {
        let o = options(&["--bridge", "--", "w"], Some("/tmp/s"));
        let bridge = o.bridge.expect("bridge options");
        assert_eq!(bridge.max_env_keys, DEFAULT_MAX_ENV_KEYS);
        assert_eq!(bridge.recycle, Recycle::default());
        let o = options(
            &[
                "--bridge",
                "--max-env-keys",
                "0",
                "--max-requests-per-child",
                "50",
                "--max-child-rss-mib=512",
                "--",
                "w",
            ],
            Some("/tmp/s"),
        );
        let bridge = o.bridge.expect("bridge options");
        assert_eq!(bridge.max_env_keys, 0);
        assert_eq!(bridge.recycle.max_requests, Some(50));
        assert_eq!(bridge.recycle.max_rss_mib, Some(512));
        for args in [
            &["--bridge", "--max-requests-per-child", "0", "--", "w"][..],
            &["--bridge", "--max-child-rss-mib", "0", "--", "w"][..],
            &["--bridge", "--max-env-keys", "-1", "--", "w"][..],
            &["--max-env-keys", "2", "--persistent_worker"][..],
        ] {
            assert!(
                run(args, Some("/tmp/s"), Path::new(".")).is_err(),
                "{args:?}"
            );
        }
    }

    #[test]
    fn help_and_version() {
        assert_eq!(run(&["--help"], None, Path::new(".")), Ok(Command::Help));
        assert_eq!(run(&["-V"], None, Path::new(".")), Ok(Command::Version));
    }

    #[test]
    fn worker_options_file_is_read_with_the_same_parser() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("w.opts"), "--work-ms\n7\n\n--concurrency=3\n").unwrap();
        match run(
            &["--worker-options", "w.opts", "--persistent_worker"],
            None,
            d.path(),
        ) {
            Ok(Command::Run(o)) => {
                assert_eq!(o.mode, Mode::Bazel);
                assert_eq!(o.work, Duration::from_millis(7));
                assert_eq!(o.concurrency, 3);
            }
            other => panic!("{other:?}"),
        }
        // One-shot: the file holds options, never the request.
        match run(&["--worker-options=w.opts", "out"], None, d.path()) {
            Ok(Command::Run(o)) => {
                assert_eq!(o.work, Duration::from_millis(7));
                assert_eq!(o.request_args, ["out"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn worker_options_file_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        for (content, needle) in [
            ("out\n", "w.opts"),
            ("--bogus\n", "bogus"),
            ("--persistent_worker\n", "persistent_worker"),
            ("--worker-options\nw.opts\n", "worker-options"),
            ("--concurrency\nmany\n", "many"),
        ] {
            std::fs::write(d.path().join("w.opts"), content).unwrap();
            let e = run(&["--worker-options", "w.opts", "x"], None, d.path()).unwrap_err();
            assert!(
                e.contains("w.opts") && e.contains(needle),
                "{content:?}: {e}"
            );
        }
        let e = run(&["--worker-options", "missing.opts", "x"], None, d.path()).unwrap_err();
        assert!(e.contains("missing.opts"), "{e}");
    }
}
