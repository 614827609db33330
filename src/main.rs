//! `persistent-worker`: the demo tool behind every front end.

use std::process::ExitCode;
use std::sync::Arc;

use persistent_worker::demo::Demo;
use persistent_worker::modes::run_main;

fn main() -> ExitCode {
    run_main(|options| Arc::new(Demo { work: options.work }))
}
