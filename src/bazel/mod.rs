//! The Bazel persistent-worker protocol on stdin/stdout, as Bazel and remote
//! executors drive it.
//!
//! - [`framing`]: varint length-delimited frames (parsing without I/O).
//! - [`json`]: splitting a stream into JSON objects.
//! - [`codec`]: `WorkRequest` / `WorkResponse` in either encoding.
//! - [`sandbox`]: validating a request's `sandbox_dir`.
//! - [`worker`]: the read loop, in-flight table, cancellation and writer.

pub mod codec;
pub mod framing;
pub mod json;
pub mod sandbox;
pub mod worker;

pub use codec::WireFormat;
