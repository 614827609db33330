//! How the Bazel reading thread waits for the next request: [`Stdin`], the
//! worker's standard input, read by [`serve`](super::worker::serve).
//!
//! A singleplex request that is expected to be short runs on the reading
//! thread itself (see `worker`): one wake-up per round trip instead of two.
//! Its answer out, that thread waits for the next request. Blocking in
//! `read` at once would let its core go idle, and waking a halted core costs
//! 20 to 50 µs on a virtual machine, more than the request; so a client in
//! lockstep finds it awake instead, as the pool's idle threads are (see
//! `pool::idle`, whose policy this follows): awake for one and a half times
//! the last gap between an answer and the next request, within 50 and
//! 500 µs, yielding so as to give way to any runnable thread, and asleep in
//! `read` as soon as a yield lasts over 50 µs, which means the core went to
//! another process (a build beside the worker) and waiting awake would only
//! wait longer.
//!
//! It never reads while it waits awake (it polls), so nothing it reads can
//! be lost or reordered, and it never waits awake after a request that ran
//! on the pool: the threads answering those need the cores.

use std::fs::File;
use std::io::{self, Read};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::worker::Session;

const STAY_AWAKE_MIN: Duration = Duration::from_micros(50);
const STAY_AWAKE_MAX: Duration = Duration::from_micros(500);

/// The worker's standard input, waiting awake for a lockstep client.
pub struct Stdin {
    /// Descriptor 0, read directly: a buffer in between (the standard
    /// library's `Stdin` has one) could hold input that `poll` cannot see.
    /// Never closed: the process's standard input outlives this reader.
    file: ManuallyDrop<File>,
    session: Arc<Session>,
    /// How long the last wait for a lockstep request took.
    last_gap: Duration,
}

impl Stdin {
    /// Standard input, for `session`'s reading thread.
    pub fn new(session: Arc<Session>) -> Stdin {
        Stdin {
            // SAFETY: descriptor 0 is open for the process's lifetime (the
            // worker points a closed one at /dev/null at start-up), and the
            // `ManuallyDrop` never closes it.
            file: ManuallyDrop::new(unsafe { File::from_raw_fd(0) }),
            session,
            last_gap: STAY_AWAKE_MAX + Duration::from_micros(1),
        }
    }

    /// Waits awake until input is ready, for at most `stay`.
    fn wait_awake(&self, stay: Duration) {
        let started = Instant::now();
        while !self.ready() && started.elapsed() < stay {
            std::hint::spin_loop();
        }
    }

    /// Whether a read would not block (input, end of input or an error).
    fn ready(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0: never blocks.
        let n = unsafe { libc::poll(&mut poll, 1, 0) };
        n != 0
    }
}

/// One and a half times the last gap, within bounds; the minimum after a
/// client that paused.
fn stay_awake(last_gap: Duration) -> Duration {
    if last_gap > STAY_AWAKE_MAX {
        return STAY_AWAKE_MIN;
    }
    (last_gap * 3 / 2).clamp(STAY_AWAKE_MIN, STAY_AWAKE_MAX)
}

impl Read for Stdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.session.take_answered_here() {
            return self.file.read(buf);
        }
        let started = Instant::now();
        if crate::sched::a_core_each() {
            self.wait_awake(stay_awake(self.last_gap));
        }
        let read = self.file.read(buf);
        self.last_gap = started.elapsed();
        read
    }
}
