//! The Bazel persistent-worker protocol on stdin/stdout, as Bazel and remote
//! executors drive it.
//!
//! - [`framing`]: varint length-delimited frames (parsing without I/O).
//! - [`json`]: splitting a stream into JSON objects.
//! - [`json_mapping`]: the two messages in protobuf's JSON mapping, by hand.
//! - [`codec`]: `WorkRequest` / `WorkResponse` in either encoding.
//! - [`sandbox`]: validating a request's `sandbox_dir`.
//! - [`worker`]: the read loop, in-flight table and cancellation.
//! - [`writer`]: the response stream, shared by the pool threads.

pub mod codec;
pub mod framing;
pub mod input;
pub mod json;
pub mod json_mapping;
pub mod sandbox;
pub mod worker;
pub mod writer;

pub use codec::WireFormat;
