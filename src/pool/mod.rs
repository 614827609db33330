//! The thread pool every front end dispatches into, and [`run`], the one
//! place a request is executed: argument files expanded, handler called,
//! panics contained, cancellation and timeout reported.
//!
//! Front ends only read and write their wire; they run a handler on their
//! own I/O thread only through [`Pool::run_here`], the same job a pool
//! thread would run (the Bazel front end does, for a short singleplex
//! request: a client in lockstep then pays one thread wake-up per round
//! trip instead of two). A job carries its own completion callback, so the
//! response leaves from the thread that produced it, or, for a request
//! whose tool ignores its timeout, from the timer thread that answers for it.
//!
//! This file owns the queue and its threads ([`Pool`]) and [`run`]. Beside it:
//!
//! - `idle`: how a thread waits for its next job (awake, looking out, asleep)
//!   and when a queued job wakes a sleeper, with the tuning constants and the
//!   measurements behind them. The pool calls it at four points: a thread
//!   started, a job queued, a job finished, the queue closed.
//! - `ticket`: one submitted request's answer, given exactly once by the pool
//!   thread or, early, by the timer; the stuck-thread count and its logs.
//! - `timer`: the thread that answers late requests at their instant.
//!
//! Nothing here knows a wire protocol: a front end hands in a [`Request`] and
//! a callback, and gets back a [`Ticket`]. Never run a handler anywhere but
//! [`run`], and never decide here how an idle thread waits: that is `idle`'s.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::argfile;
use crate::request::{lock, Handler, Request, Response, Stop};

mod idle;
mod ticket;
mod timer;

pub use idle::stay_awake;
use idle::Idle;
pub use ticket::{Ticket, CANCEL_GRACE, TIMEOUT_GRACE};
use timer::Timer;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How a client paces its requests: whether a pool thread that has just
/// answered one should expect the next within a round trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// The client sends its next request once it has this answer (Bazel
    /// singleplex, Buck2 `Execute` and `Exec`): waiting awake for it pays.
    Lockstep,
    /// Requests arrive whatever the answers (multiplex, streams, anything
    /// else): a long wait awake would only take a core from the thread that
    /// reads and answers them.
    Free,
}

/// A job in the pool's queue.
struct Queued {
    job: Job,
    pace: Pace,
}

/// A prepared request's job, not yet queued: until it is, its answer cannot
/// come.
#[must_use = "a prepared request that is never queued is never answered"]
pub struct Pending {
    job: Job,
    pace: Pace,
}

/// A fixed set of threads fed by one unbounded channel: more requests than
/// threads queue, they are never rejected.
pub struct Pool {
    sender: Option<Sender<Queued>>,
    /// The threads' end of the channel until [`Pool::start`] hands it to them.
    unstarted: Mutex<Option<Receiver<Queued>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    idle: Arc<Idle>,
    shared: Arc<Shared>,
}

/// What tickets and jobs need after `submit` has returned.
struct Shared {
    /// Started on the first request answered early.
    timer: OnceLock<Timer>,
    size: usize,
    /// Threads still inside a handler whose request was already answered.
    stuck: AtomicUsize,
}

impl Pool {
    /// Starts `size` worker threads (at least one).
    pub fn new(size: usize) -> Pool {
        let pool = Pool::unstarted(size);
        pool.start();
        pool
    }

    /// A pool whose threads do not exist yet: requests submitted to it queue
    /// until [`Pool::start`]. Lets a front end whose start-up is on a build's
    /// critical path (Buck2 waits for the socket to accept) create its threads
    /// after it is reachable rather than before.
    pub fn unstarted(size: usize) -> Pool {
        let (sender, receiver) = unbounded::<Queued>();
        Pool {
            sender: Some(sender),
            unstarted: Mutex::new(Some(receiver)),
            threads: Mutex::new(Vec::new()),
            idle: Arc::new(Idle::default()),
            shared: Arc::new(Shared {
                timer: OnceLock::new(),
                size: size.max(1),
                stuck: AtomicUsize::new(0),
            }),
        }
    }

    /// Spawns the threads; later calls do nothing.
    pub fn start(&self) {
        let Some(receiver) = lock(&self.unstarted).take() else {
            return;
        };
        let threads = (0..self.shared.size).map(|i| {
            let receiver = receiver.clone();
            let idle = Arc::clone(&self.idle);
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    // The first wait sleeps: a thread that has never run a job
                    // is starting up, and spinning then would only take a core
                    // from the rest of the start-up.
                    let mut next = idle.sleep(&receiver);
                    while let Some(Queued { job, pace }) = next {
                        job();
                        next = idle.next_job(&receiver, pace);
                    }
                })
                .expect("spawning a pool thread")
        });
        lock(&self.threads).extend(threads);
    }

    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// Threads held by a tool that ignored its cancel or timeout and was
    /// answered for; each comes back when its tool returns, if ever.
    pub fn stuck(&self) -> usize {
        self.shared.stuck.load(Ordering::Acquire)
    }

    /// Queues `request`; `done` receives its response, exactly once.
    ///
    /// Normally that is the handler's response, on the pool thread. A request
    /// with a timeout whose handler is still running [`TIMEOUT_GRACE`] after
    /// the deadline is answered as timed out from the timer thread instead, so
    /// the client is not held by a tool that ignores its token; the handler's
    /// late response is then dropped. [`Ticket::cancel`] does the same for a
    /// cancel. A request stopped before a thread takes it never reaches the
    /// handler.
    pub fn submit(
        &self,
        handler: Arc<dyn Handler>,
        request: Request,
        pace: Pace,
        done: impl FnOnce(Response) + Send + 'static,
    ) -> Ticket {
        let (ticket, pending) = self.prepare(handler, request, pace, done);
        self.queue_pending(pending);
        ticket
    }

    /// [`submit`](Self::submit) in two steps: the ticket now, the job queued
    /// by [`queue_pending`](Self::queue_pending). A front end that must file
    /// the ticket under a lock before the answer can come need not hold the
    /// lock while the job is queued (which may wake a thread).
    pub fn prepare(
        &self,
        handler: Arc<dyn Handler>,
        request: Request,
        pace: Pace,
        done: impl FnOnce(Response) + Send + 'static,
    ) -> (Ticket, Pending) {
        let ticket = Ticket::new(&request, Box::new(done), Arc::clone(&self.shared));
        if let Some(deadline) = request.cancel.deadline() {
            ticket.answer_at(
                deadline + TIMEOUT_GRACE,
                Stop::TimedOut,
                "worker: timed out; the tool did not stop when asked and is still running\n",
            );
        }
        let stuck = self.stuck();
        if stuck >= self.size() {
            crate::elog!(
                "worker: WARNING: {} queued: all {stuck} pool thread(s) are stuck in tools \
                 that ignore cancellation; it waits until one of them returns",
                ticket.label()
            );
        }
        let job = ticket.clone();
        let job: Job = Box::new(move || job.run(handler.as_ref(), request));
        (ticket, Pending { job, pace })
    }

    /// Queues a job made by [`prepare`](Self::prepare).
    pub fn queue_pending(&self, pending: Pending) {
        self.queue(pending.job, pending.pace);
    }

    /// Runs a job made by [`prepare`](Self::prepare) on the calling thread,
    /// at once: for a front end whose client waits for this answer before it
    /// sends anything else, so that no pool thread need be woken for it.
    pub fn run_here(&self, pending: Pending) {
        (pending.job)();
    }

    /// Queues an arbitrary job.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        self.queue(Box::new(job), Pace::Free);
    }

    fn queue(&self, job: Job, pace: Pace) {
        if let Some(sender) = &self.sender {
            // Sending fails only when every thread has exited, which cannot
            // happen while `self` holds the sender.
            let _ = sender.send(Queued { job, pace });
            self.idle.ring(sender.len());
        }
    }

    /// Lets the threads go without waiting for them: each ends once the
    /// queue is drained, and one stuck in a handler is simply left behind.
    pub fn detach(mut self) {
        self.sender.take();
        self.idle.ring_all();
        self.threads_mut().clear();
    }

    /// Finishes every queued job, then joins the threads.
    pub fn join(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.sender.take();
        self.idle.ring_all();
        for thread in std::mem::take(self.threads_mut()) {
            let _ = thread.join();
        }
    }

    fn threads_mut(&mut self) -> &mut Vec<JoinHandle<()>> {
        self.threads.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Executes one request to completion on the calling thread.
///
/// `request.args` are raw: argument files are expanded here, against
/// `request.workdir`. A handler panic becomes exit code 1 with the panic text,
/// so one bad request cannot take the worker down.
pub fn run(handler: &dyn Handler, mut request: Request) -> Response {
    request.args = match argfile::expand_owned(std::mem::take(&mut request.args), &request.workdir)
    {
        Ok(args) => args,
        Err(e) => return Response::error(2, format!("{e}\n")),
    };
    let mut response = match catch_unwind(AssertUnwindSafe(|| handler.handle(&request))) {
        Ok(response) => response,
        Err(payload) => Response::error(
            1,
            format!(
                "worker: request handler panicked: {}\n",
                panic_text(&*payload)
            ),
        ),
    };
    // A handler that noticed the stop reports it itself; one that ignored the
    // token still ran past a cancel or a deadline, and the client must know.
    match request.cancel.stopped() {
        Some(Stop::Cancelled) => response.cancelled = true,
        Some(Stop::TimedOut) => response.timed_out = true,
        None => {}
    }
    response
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;
    use std::path::PathBuf;
    use std::time::Duration;

    fn request(args: &[&str]) -> Request {
        Request::new(
            args.iter().map(|s| s.to_string()).collect(),
            PathBuf::from("."),
        )
    }

    #[test]
    fn an_unstarted_pool_queues_until_it_starts() {
        let pool = Pool::unstarted(2);
        let (ran, has_run) = bounded(1);
        pool.spawn(move || {
            let _ = ran.send(());
        });
        // No thread exists yet that could take the job.
        assert!(lock(&pool.threads).is_empty());
        assert!(has_run.is_empty());
        pool.start();
        pool.start();
        assert_eq!(
            lock(&pool.threads).len(),
            2,
            "a second start spawns nothing"
        );
        has_run
            .recv_timeout(Duration::from_secs(10))
            .expect("the queued job runs once the pool starts");
        pool.join();
    }

    #[test]
    fn panics_become_error_responses() {
        let handler = |_: &Request| -> Response { panic!("boom {}", 42) };
        let response = run(&handler, request(&[]));
        assert_eq!(response.exit_code, 1);
        assert!(response.output.contains("boom 42"), "{}", response.output);
    }

    #[test]
    fn argfile_errors_are_exit_code_2() {
        let handler = |_: &Request| Response::ok("unreachable");
        let response = run(&handler, request(&["@/nonexistent/argfile"]));
        assert_eq!(response.exit_code, 2);
        assert!(response.output.contains("/nonexistent/argfile"));
    }

    #[test]
    fn cancellation_is_reported_even_if_the_handler_ignores_it() {
        let req = request(&[]);
        req.cancel.cancel();
        let response = run(&|_: &Request| Response::ok("done"), req);
        assert!(response.cancelled);
    }

    #[test]
    fn pool_runs_jobs_concurrently_and_queues_the_rest() {
        const WAIT: Duration = Duration::from_secs(5);
        let pool = Pool::new(2);
        assert_eq!(pool.size(), 2);
        // Two jobs that each wait for the other prove both ran at once. Every
        // wait is bounded: a serial pool must fail this test, not hang it.
        let (a_tx, a_rx) = bounded::<()>(1);
        let (b_tx, b_rx) = bounded::<()>(1);
        let (started_tx, started_rx) = unbounded::<&str>();
        let (release_tx, release_rx) = bounded::<()>(2);
        let (done_tx, done_rx) = unbounded::<Result<&str, String>>();
        for (name, tx, rx) in [("first", a_tx, b_rx), ("second", b_tx, a_rx)] {
            let (started, release, done) =
                (started_tx.clone(), release_rx.clone(), done_tx.clone());
            pool.spawn(move || {
                let _ = tx.send(());
                let outcome = match rx.recv_timeout(WAIT) {
                    Ok(()) => {
                        let _ = started.send(name);
                        // Holds its thread until the test has looked for the
                        // third job.
                        release
                            .recv_timeout(WAIT)
                            .map(|()| name)
                            .map_err(|_| format!("{name}: never released"))
                    }
                    Err(_) => Err(format!("{name}: its sibling never ran alongside")),
                };
                let _ = done.send(outcome);
            });
        }
        let queued_started = started_tx;
        pool.spawn(move || {
            let _ = queued_started.send("queued");
            let _ = done_tx.send(Ok("queued"));
        });
        let mut running = Vec::new();
        for _ in 0..2 {
            match started_rx.recv_timeout(WAIT) {
                Ok(name) => running.push(name),
                Err(_) => panic!("two jobs never ran at once; started: {running:?}"),
            }
        }
        running.sort();
        assert_eq!(running, ["first", "second"], "the third job ran early");
        // Both threads are taken: the third job must wait for one of them.
        assert!(
            started_rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "a third job ran while both threads were busy"
        );
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        let mut finished: Vec<_> = (0..3)
            .map(|_| done_rx.recv_timeout(WAIT).expect("every job finishes"))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        pool.join();
        finished.sort();
        assert_eq!(finished, ["first", "queued", "second"]);
    }
}
