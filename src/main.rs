//! `persistent-worker`: the demo tool behind every front end, or with
//! `--bridge` any Bazel-protocol worker run as child processes.

use std::process::ExitCode;
use std::sync::Arc;

use persistent_worker::bridge::{self, Bridge};
use persistent_worker::demo::Demo;
use persistent_worker::modes::run_main;
use persistent_worker::request::{Handler, Request, Response};

fn main() -> ExitCode {
    run_main(|options| -> Arc<dyn Handler> {
        let Some(bridge) = &options.bridge else {
            return Arc::new(Demo { work: options.work });
        };
        let cwd = std::env::current_dir().unwrap_or_default();
        let settings = bridge::Settings {
            command: bridge.command.clone(),
            multiplex: bridge.multiplex,
            protocol: bridge.child_protocol,
            cancel_grace: bridge.cancel_grace,
            max_message_bytes: options.max_message_bytes,
            verbose: options.verbose,
            cwd,
            max_env_keys: bridge.max_env_keys,
            max_children: options.concurrency,
            recycle: bridge.recycle,
        };
        match Bridge::new(settings) {
            Ok(bridge) => Arc::new(bridge),
            Err(e) => {
                // Every request then fails with the reason instead of the
                // worker dying before its client can show why.
                let message =
                    format!("bridge: cannot start the thread that starts children: {e}\n");
                Arc::new(move |_: &Request| Response::error(1, message.clone()))
            }
        }
    })
}
