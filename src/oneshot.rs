//! One-shot mode, the fallback executable: one request from the command
//! line, run through the same path as a worker request, then exit with the
//! request's exit code. Everything it says goes to stderr, as a build tool
//! shows a one-shot action's stderr.

use std::io::Write;
use std::path::PathBuf;

use crate::request::{Handler, Request};

/// Runs `args` (already expanded, literal `@` escaped) and returns the exit
/// code for the process.
pub fn run(handler: &dyn Handler, args: Vec<String>, workdir: PathBuf) -> i32 {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "persistent-worker {} one-shot",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(err, "ONE-SHOT START");
    let _ = err.flush();
    drop(err);
    let response = crate::pool::run(handler, Request::new(args, workdir));
    handler.shutdown();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "ONE-SHOT END");
    let _ = write!(err, "{}", response.output);
    response.exit_code
}
