//! How the Bazel reading thread waits for the next request: [`Stdin`], the
//! worker's standard input, read by [`serve`](super::worker::serve).
//!
//! A short singleplex request runs on the reading thread itself (see
//! `worker`), and its answer out, that thread waits for the next request.
//! Blocking in `read` at once lets its core go idle, and waking a halted
//! core costs 20 to 50 µs on a virtual machine, more than the request; so
//! while the machine has a core to spare ([`Spare`]: no recent reading of
//! the runnable count found more than one task over the cores), a client
//! in lockstep finds the thread awake instead, polling, for as long as the
//! pool's idle threads wait after a lockstep request (`pool::stay_awake`:
//! one and a half times the last gap between an answer and the next
//! request, within 50 and 500 µs).
//!
//! On a busy machine it blocks at once. Measured (`ci/bench-tail.sh`,
//! Bazel, 10,000 requests that each write a file, beside two `nice 19` hogs
//! per core): waiting awake there, even polling without a yield, left 0.64 %
//! of requests over 2 ms against 0.03 to 0.16 % blocking. The CPU time a
//! thread spends awake is time the scheduler then owes the busy processes,
//! and a request that arrives while they take it waits out their slice.
//!
//! It never reads while it waits awake (it polls), so nothing can be lost or
//! reordered, and it waits awake only after a request that ran on the
//! reading thread: after one sent to the pool, the pool's threads need the
//! cores.

use std::fs::File;
use std::io::{self, Read};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::worker::Session;
use crate::pool::{stay_awake, Pace};
use crate::sched::Spare;

/// The worker's standard input, waiting awake for a lockstep client.
pub struct Stdin {
    /// Descriptor 0, read directly: a buffer in between (the standard
    /// library's `Stdin` has one) could hold input that `poll` cannot see.
    /// Never closed: the process's standard input outlives this reader.
    file: ManuallyDrop<File>,
    session: Arc<Session>,
    /// How long the last wait for a lockstep request took.
    last_gap: Duration,
    /// Whether the machine has a core to spare for waiting awake.
    spare: Spare,
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
            // No gap yet: the short wait.
            last_gap: Duration::MAX,
            spare: Spare::default(),
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

impl Read for Stdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.session.take_answered_here() {
            return self.file.read(buf);
        }
        let started = Instant::now();
        if self.spare.now() {
            self.wait_awake(stay_awake(Pace::Lockstep, self.last_gap));
        }
        let read = self.file.read(buf);
        self.last_gap = started.elapsed();
        read
    }
}
