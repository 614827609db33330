//! The program around a [`Handler`]: parse the command line, pick the mode,
//! run that front end. `persistent-worker` is this with the demo tool; another
//! tool becomes a worker by calling [`run_main`] with its own handler.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::bazel::input::Stdin;
use crate::bazel::worker::{self, Config, Session};
#[cfg(feature = "grpc")]
use crate::buck2;
use crate::buck2::lifecycle::{self, Parent, Signals};
use crate::cli::{self, Command, Mode, Options, USAGE};
use crate::pool::Pool;
use crate::request::Handler;
use crate::{oneshot, process};

/// Runs the whole program for the handler that `make_handler` builds from the
/// parsed options, and returns the process exit code.
///
/// This is all of `main` for a tool that becomes a worker: it reads argv and
/// `WORKER_SOCKET`, picks the mode (Buck2 gRPC on the socket, the Bazel
/// protocol with `--persistent_worker`, else one request from argv), serves
/// until the client is done or a stop signal comes, and returns 0 on a clean
/// end, 1 on a broken protocol stream, 2 on a usage error. Errors go to
/// stderr, never to a protocol channel. `make_handler` is called once, after
/// the command line parsed, so the handler can read the options (the demo
/// reads `--work-ms`).
///
/// `no_run`: the example would serve stdin forever.
///
/// ```no_run
/// use std::sync::Arc;
/// use persistent_worker::modes::run_main;
/// use persistent_worker::request::{Request, Response};
///
/// fn main() -> std::process::ExitCode {
///     run_main(|_options| {
///         Arc::new(|request: &Request| Response::ok(format!("{} argument(s)\n", request.args.len())))
///     })
/// }
/// ```
pub fn run_main(make_handler: impl FnOnce(&Options) -> Arc<dyn Handler>) -> ExitCode {
    crate::process::open_missing_std_fds();
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            crate::elog!("persistent-worker: cannot read the current directory: {e}");
            return ExitCode::from(2);
        }
    };
    let options = match cli::parse(
        std::env::args_os().skip(1).collect(),
        std::env::var_os("WORKER_SOCKET"),
        &cwd,
    ) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("persistent-worker {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            crate::elog!("persistent-worker: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Before any thread starts: threads inherit the slice.
    if !options.slice.is_zero() {
        if let Err(e) = crate::sched::request_slice(options.slice) {
            if options.verbose {
                crate::elog!(
                    "persistent-worker: the kernel's default time slice kept ({} µs asked: {e})",
                    options.slice.as_micros()
                );
            }
        }
    }
    // Before any request runs: every front end expands through `pool::run`.
    crate::argfile::set_max_bytes(options.max_argfile_bytes);
    let handler = make_handler(&options);
    let code = match options.mode.clone() {
        Mode::OneShot => oneshot::run(handler.as_ref(), options.request_args, cwd),
        Mode::Bazel => run_bazel(handler, &options, cwd),
        #[cfg(feature = "grpc")]
        Mode::Buck2 { socket } => buck2::serve(
            handler,
            &socket,
            &buck2::Settings {
                concurrency: options.concurrency,
                shutdown_grace: options.shutdown_grace,
                verbose: options.verbose,
            },
        ),
        #[cfg(not(feature = "grpc"))]
        Mode::Buck2 { .. } => {
            crate::elog!("persistent-worker: built without the Buck2 front end (feature grpc)");
            2
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run_bazel(handler: Arc<dyn Handler>, options: &Options, cwd: PathBuf) -> i32 {
    // Before any thread exists, so that every thread inherits the mask.
    let signals = match Signals::block() {
        Ok(signals) => signals,
        Err(e) => {
            crate::elog!("persistent-worker: cannot block stop signals: {e}");
            return 2;
        }
    };
    let parent = Parent::watch();
    let protocol_out = match process::take_stdout_for_protocol() {
        Ok(file) => file,
        Err(e) => {
            crate::elog!("persistent-worker: cannot set up stdout for the protocol: {e}");
            return 1;
        }
    };
    crate::elog!(
        "persistent-worker: Bazel worker ({:?}, concurrency {}) pid {} in {}",
        options.wire_format,
        options.concurrency,
        std::process::id(),
        cwd.display()
    );
    let config = Config {
        format: options.wire_format,
        max_message_bytes: options.max_message_bytes,
        cwd,
        verbose: options.verbose,
    };
    let session = Session::new(config.format, Box::new(protocol_out));
    let grace = options.shutdown_grace;
    let stopper = Arc::clone(&session);
    let tool = Arc::clone(&handler);
    let watcher = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || stop_on_signal(&signals, &parent, &stopper, &*tool, grace));
    if let Err(e) = watcher {
        crate::elog!("persistent-worker: cannot start the signal thread: {e}");
        return 2;
    }
    let stdin = BufReader::new(Stdin::new(Arc::clone(&session)));
    let pool = Pool::new(options.concurrency);
    match worker::serve_session(Arc::clone(&handler), pool, &config, stdin, &session) {
        Ok(()) => {
            handler.shutdown();
            0
        }
        Err(e) => {
            crate::elog!("persistent-worker: protocol error, exiting: {e}");
            handler.shutdown();
            // Exit now: requests still running must not keep a broken
            // client waiting, and their output is already shut off.
            std::process::exit(1);
        }
    }
}

/// Bazel sends SIGTERM when it shuts its workers down: every accepted request
/// is answered (as cancelled if it has to be) within `grace`, then the process
/// exits 0. If the parent dies nobody is left to read an answer, so the
/// process exits at once.
fn stop_on_signal(
    signals: &Signals,
    parent: &Parent,
    session: &Session,
    tool: &dyn Handler,
    grace: Duration,
) -> ! {
    loop {
        let signal = signals.wait();
        if signal == libc::SIGHUP {
            if !parent.is_gone() {
                // The thread that started us exited, not the process.
                parent.poll_from_now_on();
                continue;
            }
            crate::elog!(
                "persistent-worker: parent process {} exited; stopping",
                parent.pid()
            );
            std::process::exit(0);
        }
        crate::elog!(
            "persistent-worker: {}: cancelling running requests, waiting up to {} ms",
            lifecycle::signal_name(signal),
            grace.as_millis()
        );
        let stuck = session.stop(grace);
        if stuck > 0 {
            crate::elog!(
                "persistent-worker: answered {stuck} request(s) as cancelled whose tool did not stop"
            );
        }
        // A bridge's children get EOF, then SIGKILL after a bound.
        tool.shutdown();
        crate::elog!("persistent-worker: stopped");
        std::process::exit(0);
    }
}
