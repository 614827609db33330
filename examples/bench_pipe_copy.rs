//! Benchmark floor for the cost per MiB of moving a message through a pipe
//! (the Bazel protocol's transport) or, with `--socket`, a connected Unix
//! socket (the Buck2 protocol's): one thread writes SIZE bytes in, another
//! reads them straight into a buffer of SIZE bytes, as a peer receiving a
//! whole message does. The time from the first write to the last byte read is
//! one point; several sizes, several times each, so that `ci/bench_report.py`
//! fits the slope (µs per MiB) from repeated points rather than from one run.
//! This is the copy the size rows of the worker (a request in, a response
//! out) cannot do without. The two transports differ: a pipe holds 64 KiB, so
//! a MiB costs the reader and writer some thirty wake-ups of each other, and a
//! socket's buffer holds several times that.
//!
//! usage: bench_pipe_copy REPEATS OUT.json [--socket]
//! OUT.json: {"points": [[MiB, µs], ...]}

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Instant;

const SIZES_KIB: [usize; 4] = [64, 1024, 4096, 16384];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(repeats), Some(out)) = (
        args.get(1).and_then(|n| n.parse::<usize>().ok()),
        args.get(2),
    ) else {
        eprintln!("usage: bench_pipe_copy REPEATS OUT.json [--socket]");
        return ExitCode::from(2);
    };
    let socket = match args.get(3).map(String::as_str) {
        None => false,
        Some("--socket") => true,
        Some(other) => {
            eprintln!("bench_pipe_copy: unknown argument {other:?}");
            return ExitCode::from(2);
        }
    };
    let mut points = Vec::new();
    for _ in 0..repeats {
        for kib in SIZES_KIB {
            let copied = if socket {
                socket_copy(kib << 10)
            } else {
                pipe_copy(kib << 10)
            };
            match copied {
                Ok(us) => points.push(format!("[{}, {us:.1}]", kib as f64 / 1024.0)),
                Err(e) => {
                    eprintln!("bench_pipe_copy: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    let json = format!("{{\"points\": [{}]}}\n", points.join(", "));
    if let Err(e) = std::fs::write(out, json) {
        eprintln!("bench_pipe_copy: cannot write {out}: {e}");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

/// Moves `size` bytes through a fresh pipe; returns the time it took, in µs.
fn pipe_copy(size: usize) -> std::io::Result<f64> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned here alone.
    let (reader, writer) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    copy(reader, writer, size)
}

/// Moves `size` bytes through a fresh pair of connected Unix stream sockets.
fn socket_copy(size: usize) -> std::io::Result<f64> {
    let (reader, writer) = UnixStream::pair()?;
    copy(reader, writer, size)
}

fn copy(
    mut reader: impl Read + Send + 'static,
    mut writer: impl Write,
    size: usize,
) -> std::io::Result<f64> {
    let message = vec![0x5a_u8; size];
    // Not zeroes: a zeroed buffer of this size is fresh pages from the
    // kernel, faulted in one by one as the read fills them, a cost a peer
    // reading into memory it has used before does not pay (the Buck2
    // request's cost per MiB came out at 0.84x this copy's with them).
    let mut received = vec![0xa5_u8; size];
    let started = Instant::now();
    let read = std::thread::spawn(move || reader.read_exact(&mut received).map(|()| received));
    writer.write_all(&message)?;
    let received = read
        .join()
        .map_err(|_| std::io::Error::other("the reading thread panicked"))??;
    let elapsed = started.elapsed();
    if received != message {
        return Err(std::io::Error::other(
            "the bytes read are not the bytes written",
        ));
    }
    Ok(elapsed.as_secs_f64() * 1e6)
}
