//! Benchmark floor for the Bazel protocol with protobuf: reads varint-framed
//! `WorkRequest`s on stdin, decodes each with the worker's own protobuf
//! crate and messages, and writes a `WorkResponse` with the same id and exit
//! code 0 in one write. It reads frames the way the worker does (decoded in
//! place when they sit whole in the read buffer) and waits for the next
//! request awake as the worker's pool does (`floor_support`). No handler, no
//! pool, no output text: the worker's Bazel proto round trip is measured
//! against this.
//!
//! - `--write`: each request is a write request of the demo tool (OUTFILE or
//!   `@FILE` naming it); the floor writes the file as the demo does before
//!   answering, so that a write row is compared with a floor that creates
//!   the same files.
//! - `--threads N`: the reading thread hands each decoded request through a
//!   crossbeam channel to N threads that do the request and write the
//!   answer: with N = 1 the one hop the worker's design makes (its tools
//!   never run on the thread that reads) and nothing else of the worker;
//!   with more, files written on several cores as the multiplexed worker
//!   writes them. `--via-thread` is `--threads 1`.

#[path = "floor_support/mod.rs"]
mod floor_support;

use std::fs::File;
use std::io::{BufReader, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::sync::Mutex;

use floor_support::{recv_awake, schedule_as_the_worker, write_outfile, AwakeStdin};
use persistent_worker::bazel::framing::{with_frame, DEFAULT_MAX_MESSAGE_BYTES};
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};
use protobuf::Message;

/// Serialises the answers of several threads: one write each, whole.
static STDOUT: Mutex<()> = Mutex::new(());

fn main() -> ExitCode {
    schedule_as_the_worker();
    let mut write = false;
    let mut threads = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--write" => write = true,
            "--via-thread" => threads = 1,
            "--threads" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => threads = n,
                _ => return fail(&"--threads needs a positive count"),
            },
            // The client's --persistent_worker and anything else are not for us.
            _ => {}
        }
    }
    let work = move |request: WorkRequest| answer(request, write);
    if threads == 0 {
        return serve(work).err().unwrap_or(ExitCode::SUCCESS);
    }
    let (to_workers, requests) = crossbeam_channel::unbounded::<WorkRequest>();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let requests = requests.clone();
            std::thread::spawn(move || {
                while let Some(request) = recv_awake(&requests) {
                    work(request)?;
                }
                Ok(())
            })
        })
        .collect();
    let read = serve(|request| to_workers.send(request).map_err(|_| ExitCode::from(2)));
    drop(to_workers);
    let mut code = read.err().unwrap_or(ExitCode::SUCCESS);
    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(failed)) => code = failed,
            Err(_) => code = ExitCode::from(2),
        }
    }
    code
}

/// Reads and decodes requests until end of input, passing each on.
fn serve(mut pass: impl FnMut(WorkRequest) -> Result<(), ExitCode>) -> Result<(), ExitCode> {
    let mut input = BufReader::with_capacity(64 << 10, AwakeStdin::default());
    loop {
        match with_frame(
            &mut input,
            DEFAULT_MAX_MESSAGE_BYTES,
            WorkRequest::parse_from_bytes,
        ) {
            Ok(Some(Ok(request))) => pass(request)?,
            Ok(Some(Err(e))) => return Err(fail(&e)),
            Ok(None) => return Ok(()),
            Err(e) => return Err(fail(&e)),
        }
    }
}

/// Does the request (writes its file with `write`), then encodes the
/// response and writes it in one write.
fn answer(request: WorkRequest, write: bool) -> Result<(), ExitCode> {
    let mut response = WorkResponse::new();
    response.request_id = request.request_id;
    if write {
        if let Err(e) = write_outfile(&request.arguments) {
            response.exit_code = 1;
            response.output = e;
        }
    }
    let out = response
        .write_length_delimited_to_bytes()
        .map_err(|e| fail(&e))?;
    let _turn = STDOUT.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: fd 1 is open for the whole process; ManuallyDrop keeps it open.
    let mut output = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    output.write_all(&out).map_err(|e| fail(&e))
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("bench_floor_proto: {e}");
    ExitCode::from(2)
}
