//! A second tool on the same library: concatenates input files into an output
//! file. Everything a worker needs (the three modes, the pool, argument files,
//! cancellation, sandboxing) comes from `run_main`; the tool is one method.
//!
//!     cargo run --example concat_worker -- --out all.txt a.txt b.txt
//!     cargo run --example concat_worker -- --persistent_worker   # Bazel worker

use std::fs;
use std::process::ExitCode;
use std::sync::Arc;

use persistent_worker::modes::run_main;
use persistent_worker::request::{Handler, Request, Response};

struct Concat;

impl Handler for Concat {
    fn handle(&self, request: &Request) -> Response {
        let (out, inputs) = match request.args.split_first() {
            Some((flag, rest)) if flag == "--out" && !rest.is_empty() => (&rest[0], &rest[1..]),
            _ => return Response::error(2, "usage: --out OUTFILE INPUT...\n"),
        };
        let mut joined = Vec::new();
        for input in inputs {
            if let Some(stop) = request.cancel.stopped() {
                return Response::stopped(stop, "concat: stopped\n");
            }
            match fs::read(request.resolve(input)) {
                Ok(bytes) => joined.extend_from_slice(&bytes),
                Err(e) => return Response::error(1, format!("concat: {input}: {e}\n")),
            }
        }
        match fs::write(request.resolve(out), &joined) {
            Ok(()) => Response::ok(format!("concat: {} input(s) into {out}\n", inputs.len())),
            Err(e) => Response::error(1, format!("concat: {out}: {e}\n")),
        }
    }
}

fn main() -> ExitCode {
    run_main(|_| Arc::new(Concat))
}

#[cfg(test)]
mod tests {
    use super::*;
    use persistent_worker::pool;

    #[test]
    fn concatenates_through_the_shared_request_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "alpha\n").unwrap();
        fs::write(dir.path().join("b"), "beta\n").unwrap();
        fs::write(dir.path().join("args"), "--out\njoined\na\nb\n").unwrap();
        let request = Request::new(vec!["@args".into()], dir.path().to_path_buf());
        let response = pool::run(&Concat, request);
        assert_eq!(response.exit_code, 0, "{}", response.output);
        assert_eq!(
            fs::read_to_string(dir.path().join("joined")).unwrap(),
            "alpha\nbeta\n"
        );
    }

    #[test]
    fn missing_input_and_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Request::new(
            vec!["--out".into(), "o".into(), "nope".into()],
            dir.path().into(),
        );
        assert_eq!(pool::run(&Concat, missing).exit_code, 1);
        let usage = Request::new(vec!["o".into()], dir.path().into());
        assert_eq!(pool::run(&Concat, usage).exit_code, 2);
    }
}
