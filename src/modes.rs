//! The program around a [`Handler`]: parse the command line, pick the mode,
//! run that front end. `persistent-worker` is this with the demo tool; another
//! tool becomes a worker by calling [`run_main`] with its own handler.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::bazel::worker::{self, Config};
#[cfg(feature = "grpc")]
use crate::buck2;
use crate::cli::{self, Command, Mode, Options, USAGE};
use crate::pool::Pool;
use crate::request::Handler;
use crate::{oneshot, process};

/// Runs the whole program for the handler that `make_handler` builds from the
/// parsed options, and returns the process exit code.
pub fn run_main(make_handler: impl FnOnce(&Options) -> Arc<dyn Handler>) -> ExitCode {
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            eprintln!("persistent-worker: cannot read the current directory: {e}");
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
            eprintln!("persistent-worker: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
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
            eprintln!("persistent-worker: built without the Buck2 front end (feature grpc)");
            2
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run_bazel(handler: Arc<dyn Handler>, options: &Options, cwd: PathBuf) -> i32 {
    let protocol_out = match process::take_stdout_for_protocol() {
        Ok(file) => file,
        Err(e) => {
            eprintln!("persistent-worker: cannot set up stdout for the protocol: {e}");
            return 1;
        }
    };
    eprintln!(
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
    let stdin = BufReader::new(std::io::stdin().lock());
    let pool = Pool::new(options.concurrency);
    match worker::serve(
        Arc::clone(&handler),
        pool,
        &config,
        stdin,
        Box::new(protocol_out),
    ) {
        Ok(()) => {
            handler.shutdown();
            0
        }
        Err(e) => {
            eprintln!("persistent-worker: protocol error, exiting: {e}");
            handler.shutdown();
            // Exit now: requests still running must not keep a broken
            // client waiting, and their output is already shut off.
            std::process::exit(1);
        }
    }
}
