//! Benchmark floor for the Bazel protocol's transport: reads varint-framed
//! messages on stdin and writes each one back unchanged on stdout. No
//! protobuf, no threads, one read buffer reused for every frame and one write
//! per frame: what moving the bytes through two pipes costs and no more. It
//! waits for the next frame awake as the worker's pool does
//! (`floor_support`), so the worker's waiting policy is not counted in its
//! favour.
//!
//! An echoed `WorkRequest` decodes as a `WorkResponse` (exit code 0, the same
//! `request_id`; the request's other fields have other wire types or numbers
//! and become unknown fields), so the benchmark client drives this floor
//! exactly as it drives the worker.

#[path = "floor_support/mod.rs"]
mod floor_support;

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::process::ExitCode;

use floor_support::{schedule_as_the_worker, AwakeStdin};

fn main() -> ExitCode {
    schedule_as_the_worker();
    let mut input = BufReader::with_capacity(64 << 10, AwakeStdin::default());
    // SAFETY: fd 1 is open for the whole process; ManuallyDrop keeps it open.
    let mut output = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    let mut frame = Vec::new();
    loop {
        frame.clear();
        match read_frame(&mut input, &mut frame) {
            Ok(true) => {}
            Ok(false) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench_floor_pipe: {e}");
                return ExitCode::from(2);
            }
        }
        if let Err(e) = output.write_all(&frame) {
            eprintln!("bench_floor_pipe: {e}");
            return ExitCode::from(2);
        }
    }
}

/// Appends one whole frame, prefix included, to `frame`; `false` at a clean
/// end of input.
fn read_frame(input: &mut impl BufRead, frame: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut length: u64 = 0;
    for shift in (0..35).step_by(7) {
        let byte = match input.fill_buf()?.first() {
            Some(&b) => b,
            None if shift == 0 => return Ok(false),
            None => return Err(ErrorKind::UnexpectedEof.into()),
        };
        input.consume(1);
        frame.push(byte);
        length |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            let start = frame.len();
            frame.resize(start + length as usize, 0);
            input.read_exact(&mut frame[start..])?;
            return Ok(true);
        }
    }
    Err(std::io::Error::new(
        ErrorKind::InvalidData,
        "varint too long",
    ))
}
