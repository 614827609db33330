//! The demo tool: one [`Handler`] with the behaviour of Buck2's persistent
//! worker example. Each request names one OUTFILE; the tool writes
//! `basename(OUTFILE)` and a newline to it, after simulated work that a
//! cancel or timeout interrupts.
//!
//! Fault-injection flags let tests and users watch the worker survive a
//! misbehaving tool: `--panic`, `--print-stdout TEXT`, `--busy-ms N` and
//! `--hang`.
//! `--print-env NAME` reports a variable of the request's env (Buck2 sends
//! env per request), so a client can see it arrived.
//! `--barrier N` holds a request until N requests with outfiles in the same
//! directory have arrived, so a client can prove they ran at the same time.
//!
//! `--noop [--reply-bytes N] [ANY...]` is for benchmarks: it answers at once,
//! writes nothing and ignores the arguments after it (they are padding that
//! sets the request's size); `--reply-bytes N` sets the response's size.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::quote::quoted;
use crate::request::{Handler, Request, Response, Stop};

pub const USAGE: &str =
    "usage: [--work-ms N] [--busy-ms N] [--hang] [--panic] [--print-stdout TEXT] [--print-env NAME] [--barrier N] OUTFILE
       --noop [--reply-bytes N] [ANY...]
writes the file name of OUTFILE and a newline to OUTFILE;
--print-env NAME adds NAME=VALUE from the request's env to the message;
--barrier N marks OUTFILE.arrived, then waits until N such marks are in OUTFILE's directory
  (fails after 10 s), so N requests succeed only if they all run at once;
--busy-ms N works N ms without heeding cancellation, like a tool that cannot be stopped;
--hang never returns and ignores cancellation, like a deadlocked tool;
--noop answers at once with N bytes of output (default none), ignoring ANY\n";

/// The demo tool with its start-up configuration.
#[derive(Debug, Clone, Default)]
pub struct Demo {
    /// Simulated work per request (`--work-ms`).
    pub work: Duration,
}

struct DemoArgs {
    outfile: String,
    work: Option<Duration>,
    busy: Duration,
    hang: bool,
    panic: bool,
    print_stdout: Option<String>,
    print_env: Option<String>,
    barrier: Option<usize>,
}

fn parse(args: &[String]) -> Result<DemoArgs, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut outfiles = Vec::new();
    let mut parsed = DemoArgs {
        outfile: String::new(),
        work: None,
        busy: Duration::ZERO,
        hang: false,
        panic: false,
        print_stdout: None,
        print_env: None,
        barrier: None,
    };
    let text = |v: std::ffi::OsString| v.into_string().map_err(|_| "argument is not UTF-8");
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("work-ms") => {
                let ms: u64 = parser
                    .value()
                    .map_err(|e| e.to_string())?
                    .parse()
                    .map_err(|e| format!("--work-ms: {e}"))?;
                parsed.work = Some(Duration::from_millis(ms));
            }
            Long("busy-ms") => {
                let ms: u64 = parser
                    .value()
                    .map_err(|e| e.to_string())?
                    .parse()
                    .map_err(|e| format!("--busy-ms: {e}"))?;
                parsed.busy = Duration::from_millis(ms);
            }
            Long("panic") => parsed.panic = true,
            Long("hang") => parsed.hang = true,
            Long("print-stdout") => {
                parsed.print_stdout = Some(text(parser.value().map_err(|e| e.to_string())?)?)
            }
            Long("print-env") => {
                parsed.print_env = Some(text(parser.value().map_err(|e| e.to_string())?)?)
            }
            Long("barrier") => {
                let n: usize = parser
                    .value()
                    .map_err(|e| e.to_string())?
                    .parse()
                    .map_err(|e| format!("--barrier: {e}"))?;
                parsed.barrier = Some(n);
            }
            Value(v) => outfiles.push(text(v)?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    match <[String; 1]>::try_from(outfiles) {
        Ok([outfile]) => parsed.outfile = outfile,
        Err(found) => {
            return Err(format!("expected exactly one OUTFILE, got {}", found.len()));
        }
    }
    Ok(parsed)
}

/// The benchmark request: `Some` if `args` start with `--noop`.
fn noop(args: &[String]) -> Option<Result<Response, String>> {
    if args.first().map(String::as_str) != Some("--noop") {
        return None;
    }
    let bytes = match args.get(1).map(String::as_str) {
        Some("--reply-bytes") => match args.get(2).map(|n| n.parse::<usize>()) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Some(Err(format!("--reply-bytes: {e}"))),
            None => return Some(Err("--reply-bytes needs a number".to_owned())),
        },
        _ => 0,
    };
    Some(Ok(Response::ok("x".repeat(bytes))))
}

impl Handler for Demo {
    fn handle(&self, request: &Request) -> Response {
        match noop(&request.args) {
            Some(Ok(response)) => return response,
            Some(Err(e)) => return Response::error(2, format!("demo: {e}\n{USAGE}")),
            None => {}
        }
        let args = match parse(&request.args) {
            Ok(args) => args,
            // The message may quote an argument, which may be megabytes long.
            Err(e) => return Response::error(2, format!("demo: {}\n{USAGE}", quoted(&e))),
        };
        if let Some(text) = &args.print_stdout {
            stray_stdout(text);
        }
        if args.panic {
            panic!("demo: --panic was given for {}", args.outfile);
        }
        if args.hang {
            // Tells a watcher the tool is now past any point of return.
            crate::elog!("demo: hanging in {}", args.outfile);
            loop {
                // Nothing ever unparks this thread; the loop covers spurious
                // wake-ups.
                std::thread::park();
            }
        }
        std::thread::sleep(args.busy);
        if let Some(want) = args.barrier {
            match barrier(&request.resolve(&args.outfile), want, request) {
                Ok(()) => {}
                Err(Ok(stop)) => {
                    return Response::stopped(
                        stop,
                        format!("demo: stopped at the barrier for {}\n", args.outfile),
                    )
                }
                Err(Err(message)) => return Response::error(1, format!("demo: {message}\n")),
            }
        }
        if let Err(stop) = request.cancel.sleep(args.work.unwrap_or(self.work)) {
            return Response::stopped(
                stop,
                format!("demo: stopped before writing {}\n", args.outfile),
            );
        }
        let path = request.resolve(&args.outfile);
        let name = Path::new(&args.outfile)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let env = match &args.print_env {
            Some(key) => match request.env.iter().find(|(k, _)| k == key) {
                Some((_, value)) => format!("demo: env {key}={value}\n"),
                None => format!("demo: env {key} is not set\n"),
            },
            None => String::new(),
        };
        match std::fs::write(&path, format!("{name}\n")) {
            Ok(()) => Response::ok(format!("{env}demo: wrote {}\n", args.outfile)),
            Err(e) => Response::error(1, format!("demo: cannot write {}: {e}\n", path.display())),
        }
    }
}

/// How long `--barrier` waits for the other requests.
const BARRIER_WAIT: Duration = Duration::from_secs(10);

/// Marks `outfile.arrived`, then waits until `want` marks are in its
/// directory: other requests, in this process or another, mark theirs
/// there. Looks every 10 ms, as the requests may share no process to signal
/// in. `Err(Ok(stop))` if the request was stopped meanwhile, `Err(Err(_))`
/// if the others did not come.
fn barrier(outfile: &Path, want: usize, request: &Request) -> Result<(), Result<Stop, String>> {
    let mut mark = outfile.as_os_str().to_owned();
    mark.push(".arrived");
    std::fs::write(&mark, b"").map_err(|e| {
        Err(format!(
            "--barrier: cannot mark {}: {e}",
            quoted(&mark.to_string_lossy())
        ))
    })?;
    let dir = outfile.parent().unwrap_or(Path::new("."));
    let deadline = std::time::Instant::now() + BARRIER_WAIT;
    loop {
        let arrived = std::fs::read_dir(dir)
            .map_err(|e| Err(format!("--barrier: cannot read {}: {e}", dir.display())))?
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().as_encoded_bytes().ends_with(b".arrived"))
            .count();
        if arrived >= want {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(Err(format!(
                "--barrier: {arrived} of {want} requests arrived within {} s",
                BARRIER_WAIT.as_secs()
            )));
        }
        request
            .cancel
            .sleep(Duration::from_millis(10))
            .map_err(Ok)?;
    }
}

/// Writes to fd 1 both through Rust's stdout and with a raw `write(2)`, the
/// way a careless library or C code would.
fn stray_stdout(text: &str) {
    println!("{text}");
    let _ = std::io::stdout().flush();
    let bytes = format!("{text} (raw fd 1)\n");
    // SAFETY: writes a valid buffer of the given length to fd 1.
    unsafe { libc::write(1, bytes.as_ptr().cast(), bytes.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], dir: &Path) -> Response {
        let req = Request::new(
            args.iter().map(|s| s.to_string()).collect(),
            dir.to_path_buf(),
        );
        Demo::default().handle(&req)
    }

    #[test]
    fn writes_basename_to_outfile() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("out")).unwrap();
        let response = run(&["out/target.txt"], d.path());
        assert_eq!(response.exit_code, 0, "{}", response.output);
        assert_eq!(
            std::fs::read_to_string(d.path().join("out/target.txt")).unwrap(),
            "target.txt\n"
        );
        assert!(response.output.contains("out/target.txt"));
    }

    #[test]
    fn wrong_argument_count_is_usage_error() {
        let d = tempfile::tempdir().unwrap();
        for args in [&[][..], &["a", "b"][..], &["--bogus", "a"][..]] {
            let response = run(args, d.path());
            assert_eq!(response.exit_code, 2, "{args:?}");
            assert!(response.output.contains("usage:"), "{}", response.output);
        }
    }

    #[test]
    fn unwritable_path_is_exit_1_with_os_error() {
        let d = tempfile::tempdir().unwrap();
        let response = run(&["missing-dir/out"], d.path());
        assert_eq!(response.exit_code, 1);
        assert!(
            response.output.contains("No such file"),
            "{}",
            response.output
        );
    }

    #[test]
    fn print_env_reports_the_request_env() {
        let d = tempfile::tempdir().unwrap();
        let mut req = Request::new(
            vec!["--print-env".into(), "K".into(), "o".into()],
            d.path().into(),
        );
        req.env.push(("K".into(), "v".into()));
        let response = Demo::default().handle(&req);
        assert!(
            response.output.starts_with("demo: env K=v\n"),
            "{}",
            response.output
        );
        let response = run(&["--print-env", "MISSING", "o"], d.path());
        assert!(
            response.output.contains("MISSING is not set"),
            "{}",
            response.output
        );
    }

    #[test]
    fn noop_writes_nothing_ignores_padding_and_sizes_its_reply() {
        let d = tempfile::tempdir().unwrap();
        let response = run(&["--noop", "pad", "out.txt"], d.path());
        assert_eq!(response.exit_code, 0, "{}", response.output);
        assert!(response.output.is_empty(), "{}", response.output);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let response = run(&["--noop", "--reply-bytes", "1000", "pad"], d.path());
        assert_eq!(response.exit_code, 0, "{}", response.output);
        assert_eq!(response.output, "x".repeat(1000));
        let response = run(&["--noop", "--reply-bytes", "many"], d.path());
        assert_eq!(response.exit_code, 2, "{}", response.output);
    }

    #[test]
    fn a_barrier_passes_once_enough_requests_arrived_and_fails_alone() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("bar")).unwrap();
        // Two requests on two threads meet.
        let threads: Vec<_> = ["bar/a", "bar/b"]
            .into_iter()
            .map(|out| {
                let dir = d.path().to_path_buf();
                std::thread::spawn(move || run(&["--barrier", "2", out], &dir))
            })
            .collect();
        for thread in threads {
            let response = thread.join().unwrap();
            assert_eq!(response.exit_code, 0, "{}", response.output);
        }
        assert!(d.path().join("bar/a").exists() && d.path().join("bar/b").exists());
        // One alone is cancelled while it waits.
        let req = Request::new(
            vec!["--barrier".into(), "3".into(), "bar/c".into()],
            d.path().into(),
        );
        req.cancel.cancel();
        let response = Demo::default().handle(&req);
        assert!(response.cancelled, "{}", response.output);
        assert!(!d.path().join("bar/c").exists());
    }

    #[test]
    fn cancelled_work_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let req = Request::new(
            vec!["--work-ms".into(), "60000".into(), "o".into()],
            d.path().into(),
        );
        req.cancel.cancel();
        let response = Demo::default().handle(&req);
        assert!(response.cancelled);
        assert!(!d.path().join("o").exists());
    }
}
