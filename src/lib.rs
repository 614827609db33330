//! A persistent worker for Buck2 and for the Bazel worker protocol, and the
//! library that turns any tool into one: implement [`request::Handler`],
//! call [`modes::run_main`], and the tool serves Buck2's gRPC protocol, the
//! Bazel protocol and one-shot runs.
//!
//! # Where a request enters, runs, and leaves
//!
//! 1. **The program.** [`modes::run_main`] parses the command line with
//!    [`cli`] (argv and `WORKER_SOCKET` → which mode, with which options),
//!    sets up the process ([`process`]: stdout kept for the protocol, missing
//!    standard descriptors reopened) and starts that mode's front end.
//! 2. **Enters: a front end**, one per protocol, reads wire messages and
//!    turns each into a [`request::Request`]:
//!    - [`bazel`]: Bazel's protocol on stdin/stdout: [`bazel::framing`]
//!      (varint frames) or [`bazel::json`] (an object stream), decoded by
//!      [`bazel::codec`]; [`bazel::sandbox`] checks `sandbox_dir`;
//!      [`bazel::worker`] is the read loop, the in-flight table and cancels;
//!      [`bazel::input`] is stdin as the reading thread waits on it.
//!    - [`buck2`]: Buck2's gRPC services on a Unix socket (feature `grpc`);
//!      [`buck2::command`] turns an `ExecuteCommand` into a request,
//!      [`buck2::lifecycle`] handles signals and the parent's death.
//!    - [`oneshot`]: one request from the command line, then exit.
//! 3. **Runs: the pool.** [`pool`] is the thread pool all front ends dispatch
//!    into, and its `run` the single place a request executes: argument
//!    files expanded ([`argfile`]), the [`request::Handler`] called, a panic
//!    turned into an error response, the [`request::CancelToken`] checked.
//!    One exception to "dispatch": a short singleplex Bazel request runs
//!    through the same `run` on the thread that read it (`Pool::run_here`),
//!    which spares its round trip a thread wake-up.
//!    Its parts are files of their own: the queue and `run`, the idle-thread
//!    policy, tickets (completion and timeouts), the timer.
//! 4. **The handler** does the tool's work: [`demo`] (the demo tool of the
//!    `persistent-worker` binary), [`bridge`] (forwards each request to a
//!    Bazel-protocol worker run as a child process, `--bridge`), or yours.
//! 5. **Leaves:** the handler's [`request::Response`] goes back through the
//!    front end that took the request: [`bazel::writer`] queues Bazel
//!    responses onto stdout, the Buck2 front end answers on the gRPC call,
//!    one-shot writes stderr and exits with the code.
//!
//! Beside the path: [`proto`] (messages generated from `protos/`), [`quote`]
//! (client text in error messages, shortened).
//!
//! Outside the library: `worker-client/`, the workspace's second crate,
//! drives any worker the way Bazel, Buck2 and a remote executor do, and
//! benchmarks it, taking its wire (framing, codecs, protos) from here;
//! `examples/concat_worker.rs` is a second tool built on [`modes::run_main`].
//!
//! # A tool as a worker
//!
//! `no_run`: the example would serve stdin forever.
//!
//! ```no_run
//! use std::sync::Arc;
//! use persistent_worker::modes::run_main;
//! use persistent_worker::request::{Handler, Request, Response};
//!
//! struct Concat;
//!
//! impl Handler for Concat {
//!     fn handle(&self, request: &Request) -> Response {
//!         // request.args: expanded arguments; request.resolve(path): a path in
//!         // the request's directory (its sandbox); request.cancel: stop early.
//!         Response::ok("done\n")
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     run_main(|_options| Arc::new(Concat))
//! }
//! ```

pub mod argfile;
pub mod bazel;
pub mod bridge;
#[cfg(feature = "grpc")]
pub mod buck2;
/// Built without gRPC (the fuzz targets): Buck2's message conversion only.
#[cfg(not(feature = "grpc"))]
pub mod buck2 {
    pub mod command;
    pub mod lifecycle;
}
pub mod cli;
pub mod demo;
pub mod modes;
pub mod oneshot;
pub mod pool;
pub mod process;
pub mod proto;
pub mod quote;
pub mod request;
pub mod sched;
