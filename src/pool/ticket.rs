//! Tickets: one submitted request's answer and its early delivery.
//!
//! A ticket holds the client's completion callback and hands it to whoever
//! answers first: the pool thread with the handler's response, or the timer
//! thread for a request whose tool ignored its timeout or cancel. It counts
//! the pool threads left stuck in such tools and logs them coming free.
//!
//! It must never answer twice, never hold its state lock while the callback
//! runs (the callback writes to the wire), and never run the handler but
//! through [`run`](super::run).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::timer::Timer;
use super::{run, Shared};
use crate::request::{lock, CancelToken, Handler, Request, Response, Stop};

/// How long past its deadline a request's own handler may take to notice the
/// timeout and answer (with its own message) before the pool answers for it.
pub const TIMEOUT_GRACE: Duration = Duration::from_millis(250);

/// How long after a cancel a handler that ignores its token may keep the
/// client waiting before the pool answers for it.
pub const CANCEL_GRACE: Duration = TIMEOUT_GRACE;

type Done = Box<dyn FnOnce(Response) + Send>;

/// Where a submitted request is, as far as answering early is concerned.
enum JobState {
    Queued,
    Running {
        since: Instant,
        thread: Thread,
    },
    /// Answered early while its handler still runs.
    Stuck {
        since: Instant,
        thread: Thread,
    },
    Done,
}

/// A submitted request: lets its front end cancel it with a bounded wait for
/// the answer, whatever the tool does with its token.
pub struct Ticket(Arc<Submitted>);

/// What the front end, the pool thread and the timer thread share about one
/// request, in one allocation: it is made for every request.
struct Submitted {
    token: CancelToken,
    /// The request's protocol id, for logs.
    id: String,
    /// The completion callback; taken by whoever answers first.
    answer: Mutex<Option<Done>>,
    state: Mutex<JobState>,
    shared: Arc<Shared>,
}

impl Ticket {
    /// A ticket for `request`, not yet answered; `done` takes its answer.
    pub(super) fn new(request: &Request, done: Done, shared: Arc<Shared>) -> Ticket {
        Ticket(Arc::new(Submitted {
            token: request.cancel.clone(),
            id: request.id.clone(),
            answer: Mutex::new(Some(done)),
            state: Mutex::new(JobState::Queued),
            shared,
        }))
    }

    pub(super) fn clone(&self) -> Ticket {
        Ticket(Arc::clone(&self.0))
    }

    /// The request's own token: cancelling it alone leaves the answer to the
    /// handler, however long it takes.
    pub fn token(&self) -> &CancelToken {
        &self.0.token
    }

    /// Cancels the request; if its handler has not answered [`CANCEL_GRACE`]
    /// from now, the pool answers it as cancelled and reports the thread as
    /// stuck.
    pub fn cancel(&self) {
        self.0.token.cancel();
        self.answer_at(
            Instant::now() + CANCEL_GRACE,
            Stop::Cancelled,
            "worker: cancelled; the tool did not stop when asked and is still running\n",
        );
    }

    pub(super) fn answer_at(&self, when: Instant, stop: Stop, message: &'static str) {
        let ticket = self.clone();
        self.0
            .shared
            .timer
            .get_or_init(Timer::start)
            .at(when, move || ticket.answer_early(stop, message));
    }

    /// Delivers the response unless someone answered first: the callback
    /// runs once, whoever calls first.
    fn give(&self, response: Response) {
        let done = lock(&self.0.answer).take();
        if let Some(done) = done {
            done(response);
        }
    }

    /// How logs name the request.
    pub(super) fn label(&self) -> String {
        if self.0.id.is_empty() {
            "a request".to_owned()
        } else {
            format!("request {}", self.0.id)
        }
    }

    /// Runs on the timer thread: answers for a handler that is late, and
    /// records its thread as stuck.
    fn answer_early(&self, stop: Stop, message: &str) {
        let mut state = lock(&self.0.state);
        let stuck_in = match &*state {
            JobState::Done | JobState::Stuck { .. } => return,
            JobState::Queued => None,
            JobState::Running { since, thread } => Some((*since, thread.clone())),
        };
        // Counted before the answer goes out: whoever sees the answer may
        // look at the count next.
        let stuck = match &stuck_in {
            Some((since, thread)) => {
                *state = JobState::Stuck {
                    since: *since,
                    thread: thread.clone(),
                };
                self.0.shared.stuck.fetch_add(1, Ordering::AcqRel) + 1
            }
            None => 0,
        };
        drop(state);
        self.give(Response::stopped(stop, message));
        let Some((since, thread)) = stuck_in else {
            return;
        };
        let size = self.0.shared.size;
        crate::elog!(
            "worker: pool thread {} is stuck: {} has run {:.1} s and its tool ignores \
             its {}; answered for it, the thread stays busy until the tool returns \
             ({stuck} of {size} thread(s) stuck)",
            thread.name().unwrap_or("?"),
            self.label(),
            since.elapsed().as_secs_f64(),
            match stop {
                Stop::Cancelled => "cancel",
                Stop::TimedOut => "timeout",
            },
        );
        if stuck >= size {
            crate::elog!(
                "worker: WARNING: all {size} pool thread(s) are stuck in tools that ignore \
                 cancellation: new requests queue until one of them returns"
            );
        }
    }

    /// Runs on a pool thread.
    pub(super) fn run(&self, handler: &dyn Handler, request: Request) {
        if let Some(stop) = self.0.token.stopped() {
            // Cancelled or timed out while queued: the client may already
            // have its answer, and a stuck tool must not take another thread.
            *lock(&self.0.state) = JobState::Done;
            self.give(Response::stopped(
                stop,
                "worker: stopped before the tool started\n",
            ));
            return;
        }
        *lock(&self.0.state) = JobState::Running {
            since: Instant::now(),
            thread: thread::current(),
        };
        let response = run(handler, request);
        let before = std::mem::replace(&mut *lock(&self.0.state), JobState::Done);
        if let JobState::Stuck { since, thread } = before {
            let left = self.0.shared.stuck.fetch_sub(1, Ordering::AcqRel) - 1;
            crate::elog!(
                "worker: pool thread {} is free again: {} returned after {:.1} s \
                 ({left} thread(s) still stuck)",
                thread.name().unwrap_or("?"),
                self.label(),
                since.elapsed().as_secs_f64()
            );
        }
        self.give(response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Pace, Pool};
    use crossbeam_channel::{bounded, unbounded};
    use std::path::PathBuf;

    /// The requests' timeout. The job must have started by then, or it is
    /// answered as stopped before its tool ran: on a loaded 2-core machine a
    /// new pool thread took longer than 20 ms to run it, one run in five.
    const TIMEOUT: Duration = Duration::from_secs(1);

    fn request(args: &[&str]) -> Request {
        Request::new(
            args.iter().map(|s| s.to_string()).collect(),
            PathBuf::from("."),
        )
    }

    #[test]
    fn a_handler_that_ignores_its_timeout_is_answered_for_once() {
        let pool = Pool::new(1);
        let (release_tx, release_rx) = bounded::<()>(1);
        let release_rx = Mutex::new(release_rx);
        // Blocks until the test lets it go, whatever its token says.
        let stubborn = move |_: &Request| {
            let _ = lock(&release_rx).recv();
            Response::ok("finished late")
        };
        let req = request(&[]);
        req.cancel.set_timeout(TIMEOUT);
        let (done_tx, done_rx) = unbounded::<Response>();
        pool.submit(Arc::new(stubborn), req, Pace::Free, move |r| {
            done_tx.send(r).unwrap()
        });
        let first = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("answered while the handler still runs");
        assert!(first.timed_out, "{first:?}");
        assert!(first.output.contains("did not stop"), "{}", first.output);
        release_tx.send(()).unwrap();
        pool.join();
        assert!(done_rx.try_recv().is_err(), "answered twice");
    }

    #[test]
    fn a_handler_that_honours_its_timeout_answers_itself() {
        let pool = Pool::new(1);
        let polite = |r: &Request| match r.cancel.sleep(Duration::from_secs(60)) {
            Err(stop) => Response::stopped(stop, "own message"),
            Ok(()) => Response::ok("slept"),
        };
        let req = request(&[]);
        req.cancel.set_timeout(TIMEOUT);
        let (done_tx, done_rx) = unbounded::<Response>();
        pool.submit(Arc::new(polite), req, Pace::Free, move |r| {
            done_tx.send(r).unwrap()
        });
        let response = done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(response.timed_out);
        assert_eq!(response.output, "own message");
        pool.join();
        assert!(done_rx.try_recv().is_err(), "answered twice");
    }
}
