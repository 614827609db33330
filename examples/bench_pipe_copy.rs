//! Benchmark floor for the cost per MiB of moving a message through a pipe:
//! one thread writes SIZE bytes into a pipe, another reads them straight into
//! a buffer of SIZE bytes, as a peer receiving a whole message does. The time
//! from the first write to the last byte read is one point; several sizes,
//! several times each, so that `ci/bench_report.py` fits the slope (µs per
//! MiB) from repeated points rather than from one run. This is the copy the
//! size rows of the worker (a request in, a response out) cannot do without.
//!
//! usage: bench_pipe_copy REPEATS OUT.json
//! OUT.json: {"points": [[MiB, µs], ...]}

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::time::Instant;

const SIZES_KIB: [usize; 4] = [64, 1024, 4096, 16384];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(repeats), Some(out)) = (
        args.get(1).and_then(|n| n.parse::<usize>().ok()),
        args.get(2),
    ) else {
        eprintln!("usage: bench_pipe_copy REPEATS OUT.json");
        return ExitCode::from(2);
    };
    let mut points = Vec::new();
    for _ in 0..repeats {
        for kib in SIZES_KIB {
            match one_copy(kib << 10) {
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
fn one_copy(size: usize) -> std::io::Result<f64> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned here alone.
    let (mut reader, mut writer) =
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let message = vec![0x5a_u8; size];
    let mut received = vec![0_u8; size];
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
