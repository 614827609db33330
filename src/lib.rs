//! A persistent worker for Buck2 and for the Bazel worker protocol.
//!
//! Where a request enters, runs, and leaves:
//!
//! - [`modes`]: the program around a handler: parse, pick the mode, run it
//!   (`main.rs` calls it with the demo tool).
//! - [`cli`]: argv and `WORKER_SOCKET` → which mode, with which options.
//! - Front ends, one per protocol; each turns wire messages into a
//!   [`request::Request`] and the [`request::Response`] back into wire form:
//!   - [`bazel`]: Bazel's protocol on stdin/stdout (varint frames or JSON).
//!   - [`buck2`]: Buck2's gRPC protocol on a Unix socket.
//!   - [`oneshot`]: one request from the command line, then exit.
//! - [`pool`]: the thread pool all front ends dispatch into, and `run`, the
//!   single place a request executes (argfiles expanded, panics contained).
//! - [`request`]: the protocol-independent request, response, cancellation
//!   token, and the [`request::Handler`] trait a tool implements.
//! - [`argfile`]: `@file` / `--flagfile=file` expansion.
//! - [`quote`]: client text in error messages, shortened.
//! - [`demo`]: the demo tool, one `Handler`.
//! - [`bridge`]: a `Handler` that forwards requests to Bazel-protocol
//!   worker child processes (`--bridge`).
//! - [`process`]: process-wide set-up (identity line, stdout protection).
//! - [`proto`]: messages generated from `protos/`.
//!
//! Outside the library: `src/bin/worker-client/` drives any worker the way
//! Bazel, Buck2 and a remote executor do, and benchmarks it;
//! `examples/concat_worker.rs` is a second tool built on [`modes::run_main`].

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
