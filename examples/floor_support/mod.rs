//! What the benchmark floors share: waiting for the next request awake, as
//! the worker does (its pool always, its reading thread while the machine
//! has a core to spare), and doing a write request's file the way the demo
//! tool does. A floor is the transport with nothing in the way; if it paid a
//! core wake-up (or skipped a file) that the worker does not, the worker
//! would come out faster than its floor and the ratio would measure the
//! waiting policy, not the worker's code. The same holds for the time
//! slice the worker asks of the kernel under load
//! ([`schedule_as_the_worker`]).

#![allow(dead_code)] // Each floor uses the part it needs.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use persistent_worker::pool::{stay_awake, Pace};
use persistent_worker::sched::Spare;

/// The longest the worker's pool waits awake for the next job
/// (`STAY_AWAKE_MAX` in the worker's pool). Floors wait at least as long, so
/// a client in lockstep never finds the floor asleep where it finds the
/// worker awake.
pub const STAY_AWAKE: Duration = Duration::from_micros(500);

/// With `FLOOR_WORKER_SLICE` set in the environment (`ci/bench-tail.sh`
/// sets it), asks for the worker's default time slice for this thread and
/// every thread it starts, as the worker does before its first thread.
/// Beside normal-priority load a floor without it waits out other tasks'
/// slices where the worker preempts them (the Bazel floor had 1.94 % of its
/// requests over 2 ms against the worker's 0.46 %); on a quiet machine the
/// kernel's default made the floors stronger (the gRPC streaming floor with
/// the short slice served 0.68-0.70x the worker's throughput, 1.2x without),
/// so `ci/bench.sh` leaves it. Call it first in `main`; a kernel that
/// refuses leaves floor and worker at its default.
pub fn schedule_as_the_worker() {
    if std::env::var_os("FLOOR_WORKER_SLICE").is_none() {
        return;
    }
    let _ = persistent_worker::sched::request_slice(persistent_worker::cli::DEFAULT_SLICE);
}

/// Standard input, waited for as the worker's Bazel reading thread waits
/// (`src/bazel/input.rs`): while the machine has a core to spare by the
/// worker's own rule ([`Spare`]), awake, spinning on `poll` without a
/// yield, for the worker's learnt time (`pool::stay_awake`: one and a half
/// times the last wait, 50 to 500 µs), then a blocking read; on a busy
/// machine a blocking read at once. A floor that waited longer, or yielded
/// its core to a niced process while it waited, would come out weaker than
/// the worker beside such load (0.12 % of requests over 2 ms against the
/// worker's 0.03 %, when it waited 500 µs yielding). Wrapped in a
/// `BufReader`, it is asked only when the buffer is empty.
pub struct AwakeStdin {
    spare: Spare,
    /// How long the last wait for input took.
    last_gap: Duration,
}

impl Default for AwakeStdin {
    fn default() -> Self {
        AwakeStdin {
            spare: Spare::default(),
            // No gap yet: the short wait.
            last_gap: Duration::MAX,
        }
    }
}

impl Read for AwakeStdin {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let stdin = std::io::stdin();
        let fd = stdin.as_raw_fd();
        let started = Instant::now();
        if self.spare.now() {
            let stay = stay_awake(Pace::Lockstep, self.last_gap);
            loop {
                let mut poll = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no wait.
                let ready = unsafe { libc::poll(&mut poll, 1, 0) };
                if ready != 0 || started.elapsed() >= stay {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let read = stdin.lock().read(buf);
        self.last_gap = started.elapsed();
        read
    }
}

/// Receives from `jobs`, looking for a job awake for up to [`STAY_AWAKE`]
/// before blocking: the floors' threads wait as the worker's pool threads do.
pub fn recv_awake<T>(jobs: &crossbeam_channel::Receiver<T>) -> Option<T> {
    let until = Instant::now() + STAY_AWAKE;
    loop {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
            Err(crossbeam_channel::TryRecvError::Empty) if Instant::now() < until => {
                std::thread::yield_now();
            }
            Err(crossbeam_channel::TryRecvError::Empty) => return jobs.recv().ok(),
        }
    }
}

/// Does what the demo tool does for a write request whose one argument is
/// OUTFILE (or `@FILE` holding it, as a remote engine sends it): writes the
/// file name and a newline to OUTFILE.
pub fn write_outfile(args: &[String]) -> Result<(), String> {
    let first = args.first().ok_or("a write request needs OUTFILE")?;
    let path = match first.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {file}: {e}"))?
            .trim()
            .to_owned(),
        None => first.clone(),
    };
    let path = PathBuf::from(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::write(&path, format!("{name}\n"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
