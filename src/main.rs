//! `persistent-worker`: picks the mode from the environment and arguments and
//! hands the demo tool to that front end.

use std::io::BufReader;
use std::process::ExitCode;
use std::sync::Arc;

use persistent_worker::bazel::worker::{self, Config};
use persistent_worker::cli::{self, Command, Mode, Options, USAGE};
use persistent_worker::demo::Demo;
use persistent_worker::pool::Pool;
use persistent_worker::request::Handler;
use persistent_worker::{buck2, oneshot, process};

fn main() -> ExitCode {
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
    let handler: Arc<dyn Handler> = Arc::new(Demo { work: options.work });
    let code = match options.mode.clone() {
        Mode::OneShot => oneshot::run(handler.as_ref(), options.request_args, cwd),
        Mode::Bazel => run_bazel(handler, &options, cwd),
        Mode::Buck2 { socket } => buck2::serve(
            handler,
            &socket,
            &buck2::Settings {
                concurrency: options.concurrency,
                shutdown_grace: options.shutdown_grace,
                verbose: options.verbose,
            },
        ),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run_bazel(handler: Arc<dyn Handler>, options: &Options, cwd: std::path::PathBuf) -> i32 {
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
    match worker::serve(handler, pool, &config, stdin, Box::new(protocol_out)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("persistent-worker: protocol error, exiting: {e}");
            // Exit now: requests still running must not keep a broken
            // client waiting, and their output is already shut off.
            std::process::exit(1);
        }
    }
}
