//! Benchmark floor for the Bazel protocol with protobuf: reads varint-framed
//! `WorkRequest`s on stdin, decodes each with the worker's own protobuf
//! crate and messages, and writes a `WorkResponse` with the same id and exit
//! code 0 in one write. No threads, no handler, no output text: the worker's
//! Bazel proto no-op round trip is measured against this.

use std::fs::File;
use std::io::{BufReader, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::process::ExitCode;

use persistent_worker::bazel::framing::{read_frame, DEFAULT_MAX_MESSAGE_BYTES};
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};
use protobuf::Message;

fn main() -> ExitCode {
    let mut input = BufReader::with_capacity(64 << 10, std::io::stdin().lock());
    // SAFETY: fd 1 is open for the whole process; ManuallyDrop keeps it open.
    let mut output = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    let mut out = Vec::new();
    loop {
        let frame = match read_frame(&mut input, DEFAULT_MAX_MESSAGE_BYTES) {
            Ok(Some(frame)) => frame,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => return fail(&e),
        };
        let request = match WorkRequest::parse_from_bytes(&frame) {
            Ok(request) => request,
            Err(e) => return fail(&e),
        };
        let mut response = WorkResponse::new();
        response.request_id = request.request_id;
        out.clear();
        if let Err(e) = response.write_length_delimited_to_vec(&mut out) {
            return fail(&e);
        }
        if let Err(e) = output.write_all(&out) {
            return fail(&e);
        }
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("bench_floor_proto: {e}");
    ExitCode::from(2)
}
