//! Benchmark floor for the Bazel protocol with protobuf: reads varint-framed
//! `WorkRequest`s on stdin, decodes each with the worker's own protobuf
//! crate and messages, and writes a `WorkResponse` with the same id and exit
//! code 0 in one write. It reads frames the way the worker does (decoded in
//! place when they sit whole in the read buffer). No threads, no handler, no
//! output text: the worker's Bazel proto no-op round trip is measured against
//! this.
//!
//! With `--via-thread`, the reading thread hands each decoded request through
//! a crossbeam channel to a second thread that encodes and writes the answer:
//! the one hop the worker's design makes (its tools never run on the thread
//! that reads), and nothing else of the worker. The difference between the
//! two floors is that hop's price on the machine at hand.

use std::fs::File;
use std::io::{BufReader, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::process::ExitCode;

use persistent_worker::bazel::framing::{with_frame, DEFAULT_MAX_MESSAGE_BYTES};
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};
use protobuf::Message;

fn main() -> ExitCode {
    // Other arguments (the client's --persistent_worker) are not for us.
    if !std::env::args().any(|arg| arg == "--via-thread") {
        return serve(answer).err().unwrap_or(ExitCode::SUCCESS);
    }
    let (to_writer, requests) = crossbeam_channel::unbounded::<i32>();
    let writer = std::thread::spawn(move || {
        for id in requests {
            if let Err(code) = answer(id) {
                return code;
            }
        }
        ExitCode::SUCCESS
    });
    let read = serve(|id| to_writer.send(id).map_err(|_| ExitCode::from(2)));
    drop(to_writer);
    match (read, writer.join()) {
        (Ok(()), Ok(code)) => code,
        (Err(code), _) => code,
        (Ok(()), Err(_)) => ExitCode::from(2),
    }
}

/// Reads and decodes requests until end of input, passing each id on.
fn serve(mut pass: impl FnMut(i32) -> Result<(), ExitCode>) -> Result<(), ExitCode> {
    let mut input = BufReader::with_capacity(64 << 10, std::io::stdin().lock());
    loop {
        match with_frame(
            &mut input,
            DEFAULT_MAX_MESSAGE_BYTES,
            WorkRequest::parse_from_bytes,
        ) {
            Ok(Some(Ok(request))) => pass(request.request_id)?,
            Ok(Some(Err(e))) => return Err(fail(&e)),
            Ok(None) => return Ok(()),
            Err(e) => return Err(fail(&e)),
        }
    }
}

/// Encodes the response to request `id` and writes it in one write.
fn answer(id: i32) -> Result<(), ExitCode> {
    let mut response = WorkResponse::new();
    response.request_id = id;
    let out = response
        .write_length_delimited_to_bytes()
        .map_err(|e| fail(&e))?;
    // SAFETY: fd 1 is open for the whole process; ManuallyDrop keeps it open.
    let mut output = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    output.write_all(&out).map_err(|e| fail(&e))
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("bench_floor_proto: {e}");
    ExitCode::from(2)
}
