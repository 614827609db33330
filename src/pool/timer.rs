//! The timer thread: runs a job at a given instant (a late request's early
//! answer). It starts with the first such job and ends with its pool.
//!
//! It must never run a handler or anything that blocks: every job it holds
//! waits behind the one it runs, and an early answer is only a callback.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::thread;
use std::time::Instant;

use crossbeam_channel::{unbounded, RecvTimeoutError, Sender};

use super::Job;

/// One thread that runs jobs at given instants; it ends when its pool goes.
pub(super) struct Timer {
    sender: Sender<(Instant, Job)>,
}

impl Timer {
    pub(super) fn start() -> Timer {
        let (sender, receiver) = unbounded::<(Instant, Job)>();
        let spawned = thread::Builder::new()
            .name("worker-timeouts".into())
            .spawn(move || {
                // Ordered by instant, then by arrival; jobs wait in `jobs`.
                let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
                let mut jobs: HashMap<u64, Job> = HashMap::new();
                let mut next = 0u64;
                loop {
                    let now = Instant::now();
                    while let Some(Reverse((at, key))) = due.peek().copied() {
                        if at > now {
                            break;
                        }
                        due.pop();
                        if let Some(job) = jobs.remove(&key) {
                            job();
                        }
                    }
                    let received = match due.peek() {
                        Some(Reverse((at, _))) => {
                            receiver.recv_timeout(at.saturating_duration_since(Instant::now()))
                        }
                        None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match received {
                        Ok((at, job)) => {
                            due.push(Reverse((at, next)));
                            jobs.insert(next, job);
                            next += 1;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread, requests are still answered by their
            // handlers; only the early answer is lost.
            crate::elog!("worker: cannot start the timeout thread: {e}");
        }
        Timer { sender }
    }

    pub(super) fn at(&self, when: Instant, job: impl FnOnce() + Send + 'static) {
        let _ = self.sender.send((when, Box::new(job)));
    }
}
