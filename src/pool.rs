//! The thread pool every front end dispatches into, and [`run`], the one
//! place a request is executed: argument files expanded, handler called,
//! panics contained, cancellation and timeout reported.
//!
//! Front ends only read and write their wire; they never run a handler on
//! their own I/O threads. A job carries its own completion callback, so the
//! response leaves from the pool thread that produced it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{unbounded, Sender};

use crate::argfile;
use crate::request::{Handler, Request, Response};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads fed by one unbounded channel: more requests than
/// threads queue, they are never rejected.
pub struct Pool {
    sender: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `size` worker threads (at least one).
    pub fn new(size: usize) -> Pool {
        let (sender, receiver) = unbounded::<Job>();
        let threads = (0..size.max(1))
            .map(|i| {
                let receiver = receiver.clone();
                thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        for job in receiver {
                            job();
                        }
                    })
                    .expect("spawning a pool thread")
            })
            .collect();
        Pool {
            sender: Some(sender),
            threads,
        }
    }

    pub fn size(&self) -> usize {
        self.threads.len()
    }

    /// Queues `request`; `done` receives its response on the pool thread.
    pub fn submit(
        &self,
        handler: Arc<dyn Handler>,
        request: Request,
        done: impl FnOnce(Response) + Send + 'static,
    ) {
        self.spawn(move || done(run(handler.as_ref(), request)));
    }

    /// Queues an arbitrary job.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(sender) = &self.sender {
            // Sending fails only when every thread has exited, which cannot
            // happen while `self` holds the sender.
            let _ = sender.send(Box::new(job));
        }
    }

    /// Finishes every queued job, then joins the threads.
    pub fn join(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.sender.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
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
    request.args = match argfile::expand(&request.args, &request.workdir) {
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
        Some(crate::request::Stop::Cancelled) => response.cancelled = true,
        Some(crate::request::Stop::TimedOut) => response.timed_out = true,
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

    fn request(args: &[&str]) -> Request {
        Request::new(
            args.iter().map(|s| s.to_string()).collect(),
            PathBuf::from("."),
        )
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
        let pool = Pool::new(2);
        assert_eq!(pool.size(), 2);
        // Two jobs that each wait for the other prove both ran at once.
        let (a_tx, a_rx) = bounded::<()>(1);
        let (b_tx, b_rx) = bounded::<()>(1);
        let (done_tx, done_rx) = unbounded::<&str>();
        let d1 = done_tx.clone();
        pool.spawn(move || {
            a_tx.send(()).unwrap();
            b_rx.recv().unwrap();
            d1.send("first").unwrap();
        });
        let d2 = done_tx.clone();
        pool.spawn(move || {
            b_tx.send(()).unwrap();
            a_rx.recv().unwrap();
            d2.send("second").unwrap();
        });
        pool.spawn(move || done_tx.send("queued").unwrap());
        pool.join();
        let mut finished: Vec<_> = done_rx.iter().collect();
        finished.sort();
        assert_eq!(finished, ["first", "queued", "second"]);
    }
}
