//! The Bazel worker loop. Requests enter in [`serve`] on the reading thread,
//! run on the pool, and their responses leave through the
//! [`ResponseWriter`] from the pool thread that
//! finished them (or one finishing beside it).
//!
//! Request id 0 is singleplex: an id-0 request waits for the previous one to
//! finish, so they run one at a time and in order. Non-zero ids are
//! multiplex: every request is dispatched at once and answered when done.
//! Either way the id is echoed, because old Bazel versions send non-zero ids
//! to singleplex workers too.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::codec::WireFormat;
use super::framing::FrameError;
use super::sandbox;
use super::writer::ResponseWriter;
use crate::pool::{Pace, Pool, Ticket};
use crate::proto::worker_protocol::{WorkRequest, WorkResponse};
use crate::quote::quoted;
use crate::request::{lock, Handler, Request, Response, Stop};

/// How the loop reads and writes, fixed at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    pub format: WireFormat,
    pub max_message_bytes: usize,
    /// The worker's cwd: Bazel's execution root, the base of `sandbox_dir`.
    pub cwd: PathBuf,
    /// Log every request as if it had `verbosity > 0` (`--verbose`): old
    /// Bazel versions never set verbosity.
    pub verbose: bool,
}

/// The requests a worker has accepted and the stream their answers leave by:
/// what a stop signal needs to reach to answer every one of them.
pub struct Session {
    writer: Arc<ResponseWriter>,
    in_flight: Arc<Mutex<InFlight>>,
    /// Signalled whenever `in_flight` becomes empty or request 0 leaves it,
    /// if anybody waits for that.
    left: Condvar,
    /// Threads waiting on `left`; changed and read only under the lock of
    /// `in_flight`. Notifying costs a system call even with nobody waiting,
    /// and the singleplex request leaves on every round trip.
    waiting: AtomicUsize,
    stopping: AtomicBool,
    identity: Arc<str>,
}

impl Session {
    pub fn new(format: WireFormat, output: Box<dyn Write + Send>) -> Arc<Session> {
        Arc::new(Session {
            writer: Arc::new(ResponseWriter::new(format, output)),
            in_flight: Arc::default(),
            left: Condvar::new(),
            waiting: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            identity: crate::process::identity().into(),
        })
    }

    /// Winds the session down for a stop signal: requests that arrive from
    /// now on are answered as cancelled at once, running ones are cancelled
    /// and get `grace` to answer, and any whose tool ignores the cancel is
    /// then answered as cancelled by the worker. Output is closed afterwards,
    /// so a late answer from a stuck tool never follows. Returns how many
    /// requests the worker had to answer for.
    pub fn stop(&self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let mut table = lock(&self.in_flight);
        self.stopping.store(true, Ordering::Release);
        // The plain token: the stop's own grace, not the cancel's, bounds
        // the wait for tools that ignore it.
        for ticket in table.values() {
            ticket.token().cancel();
        }
        while !table.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            table = self.wait_for_a_leave(table, Some(left));
        }
        let stuck: Vec<i32> = table.keys().copied().collect();
        for &id in &stuck {
            let response = Response::stopped(
                Stop::Cancelled,
                "worker: shutting down; the tool did not stop within the grace period\n",
            );
            self.writer.send(&to_wire(&self.identity, id, response));
        }
        table.clear();
        drop(table);
        self.left.notify_all();
        self.writer.close();
        stuck.len()
    }

    /// Waits, with the table's lock, until a request the session waits for
    /// leaves the table (see `left`), or at most `timeout`.
    fn wait_for_a_leave<'a>(
        &self,
        table: MutexGuard<'a, InFlight>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, InFlight> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let table = match timeout {
            None => self.left.wait(table).unwrap_or_else(|e| e.into_inner()),
            Some(timeout) => match self.left.wait_timeout(table, timeout) {
                Ok((table, _)) => table,
                Err(poisoned) => poisoned.into_inner().0,
            },
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        table
    }
}

/// Serves requests from `input` until end of input, then finishes the requests
/// in flight, writes their responses and returns. A stream that cannot be
/// read as requests returns the error at once, with output already closed.
pub fn serve(
    handler: Arc<dyn Handler>,
    pool: Pool,
    config: &Config,
    input: impl BufRead,
    output: Box<dyn Write + Send>,
) -> Result<(), FrameError> {
    serve_session(
        handler,
        pool,
        config,
        input,
        &Session::new(config.format, output),
    )
}

/// [`serve`] with a session made beforehand, so that a signal handler can
/// [`Session::stop`] it.
pub fn serve_session(
    handler: Arc<dyn Handler>,
    pool: Pool,
    config: &Config,
    mut input: impl BufRead,
    session: &Arc<Session>,
) -> Result<(), FrameError> {
    let writer = Arc::clone(&session.writer);
    let in_flight = Arc::clone(&session.in_flight);
    let identity = Arc::clone(&session.identity);
    loop {
        let work = match config
            .format
            .read_request(&mut input, config.max_message_bytes)
        {
            Ok(Some(work)) => work,
            Ok(None) => break,
            Err(e) => {
                writer.close();
                for ticket in lock(&in_flight).values() {
                    ticket.token().cancel();
                }
                // Joining would wait for handlers that may not honour the
                // cancel; the caller exits, so the threads need not finish.
                pool.detach();
                return Err(e);
            }
        };
        let id = work.request_id;
        let verbose = config.verbose || work.verbosity > 0;
        if verbose {
            log_request(&work);
        }
        if work.cancel {
            match lock(&in_flight).get(&id) {
                Some(ticket) => ticket.cancel(),
                None if verbose => {
                    crate::elog!("worker: cancel for request {id} ignored: it is not in flight")
                }
                None => {}
            }
            continue;
        }
        if id == 0 {
            // Singleplex: the previous id-0 request is answered before
            // anything about this one, even an error. Waiting here rather
            // than after dispatch keeps id 0 from blocking the other ids,
            // which Bazel 2.1 gives to sibling multiplex proxies. Its
            // thread queues its answer before it leaves the table, so an
            // error written for this one still comes after that answer.
            let mut table = lock(&in_flight);
            while table.contains_key(&0) {
                table = session.wait_for_a_leave(table, None);
            }
        }
        let workdir = match sandbox::resolve(&config.cwd, &work.sandbox_dir) {
            Ok(dir) => dir,
            Err(e) => {
                crate::elog!("worker: request {id}: {e}");
                let response = Response::error(1, format!("worker: {e}\n"));
                writer.send(&to_wire(&identity, id, response));
                continue;
            }
        };
        let mut request = Request::new(work.arguments, workdir);
        request.verbosity = work.verbosity;
        request.id = id.to_string();
        {
            let mut table = lock(&in_flight);
            if table.contains_key(&id) {
                drop(table);
                let e = format!("request id {id} is already in flight; ids must be unique");
                crate::elog!("worker: {e}");
                let response = Response::error(1, format!("worker: {e}\n"));
                writer.send(&to_wire(&identity, id, response));
                continue;
            }
            if session.stopping.load(Ordering::Acquire) {
                drop(table);
                let response = Response::stopped(
                    Stop::Cancelled,
                    "worker: shutting down; request not started\n",
                );
                writer.send(&to_wire(&identity, id, response));
                continue;
            }
            if verbose {
                crate::elog!(
                    "worker: request {id} started, {} in flight",
                    table.len() + 1
                );
            }
            let writer = Arc::clone(&writer);
            let session = Arc::clone(session);
            let identity = Arc::clone(&identity);
            // Filed before it is queued, so the answer, which needs the
            // table, cannot come before the ticket is in it; queued after the
            // lock is let go, which may wake a pool thread, so that the
            // threads answering other requests do not wait for that.
            // Singleplex clients send the next request once they have this
            // answer; multiplex ones keep sending.
            let pace = if id == 0 { Pace::Lockstep } else { Pace::Free };
            let (ticket, pending) =
                pool.prepare(Arc::clone(&handler), request, pace, move |response| {
                    let (exit_code, cancelled) = (response.exit_code, response.cancelled);
                    // Encoded before any lock is taken: the reader and the other
                    // pool threads need the table's lock for every request.
                    let frame = writer.encode(&to_wire(&identity, id, response));
                    // Leave the table before answering: once the client has the
                    // response it may reuse the id. The answer is queued before
                    // the table is let go, so whoever finds the table empty and
                    // then writes or closes (a stop, the end of input joining
                    // the pool) comes after this answer; and a request already
                    // answered for by a stop is not answered twice.
                    let mut table = lock(&session.in_flight);
                    if table.remove(&id).is_none() {
                        return;
                    }
                    let left = table.len();
                    // Only an empty table and the singleplex request are waited for.
                    let wake =
                        (left == 0 || id == 0) && session.waiting.load(Ordering::Relaxed) > 0;
                    let turn = writer.queue(frame);
                    drop(table);
                    if verbose {
                        crate::elog!(
                        "worker: request {id} finished, exit code {exit_code}{}, {left} in flight",
                        if cancelled { " (cancelled)" } else { "" }
                    );
                    }
                    turn.write();
                    if wake {
                        session.left.notify_all();
                    }
                });
            table.insert(id, ticket);
            drop(table);
            pool.queue_pending(pending);
        }
    }
    // Every request answered first; only then is it known whether a thread
    // is left in a tool that ignored its cancel, which joining would wait
    // for without end.
    let mut table = lock(&in_flight);
    while !table.is_empty() {
        table = session.wait_for_a_leave(table, None);
    }
    drop(table);
    // The last answer may still be on its way out: its thread lets the table
    // go before it writes. Closing waits for that write, and nothing is
    // written after the end of input.
    writer.close();
    let stuck = pool.stuck();
    if stuck > 0 {
        crate::elog!("worker: end of input; leaving {stuck} stuck pool thread(s) behind");
        pool.detach();
    } else {
        pool.join();
    }
    Ok(())
}

/// The requests in flight by id: looked up three times per request.
type InFlight = HashMap<i32, Ticket, BuildHasherDefault<IdHasher>>;

/// Spreads request ids with one multiplication (Fibonacci hashing) instead of
/// SipHash: the ids come from the one client the worker serves, which could
/// only slow down its own requests by choosing colliding ones.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_i32(&mut self, id: i32) {
        self.0 = u64::from(id as u32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

fn to_wire(identity: &str, id: i32, response: Response) -> WorkResponse {
    let mut header = String::with_capacity(40 + identity.len());
    let _ = writeln!(header, "Bazel persistent worker {identity} {id}");
    // The header goes in front of the tool's output in its own buffer: the
    // output may be megabytes, and a second buffer of that size per response
    // is memory the allocator hands back and faults in again every time.
    let output = if response.output.is_empty() {
        header
    } else {
        let mut output = response.output;
        // Exactly: the amortised doubling of a plain insert would ask for
        // twice the output's size.
        output.reserve_exact(header.len());
        output.insert_str(0, &header);
        output
    };
    let mut wire = WorkResponse::new();
    wire.request_id = id;
    wire.exit_code = response.exit_code;
    wire.was_cancelled = response.cancelled;
    wire.output = output;
    wire
}

fn log_request(work: &WorkRequest) {
    crate::elog!(
        "worker: request {}{}: {} argument(s), {} input(s), verbosity {}{}: {}",
        work.request_id,
        if work.cancel { " (cancel)" } else { "" },
        work.arguments.len(),
        work.inputs.len(),
        work.verbosity,
        if work.sandbox_dir.is_empty() {
            String::new()
        } else {
            format!(", sandbox {}", quoted(&work.sandbox_dir))
        },
        // A request may carry 60 MiB of arguments; the log shows the start.
        quoted(&format!("{:?}", work.arguments)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_goes_in_front_of_the_output_in_its_own_buffer() {
        let mut output = String::with_capacity(1 << 20);
        output.push_str("tool says\n");
        let buffer = output.as_ptr();
        let wire = to_wire("host 1 /dir", 7, Response::error(3, output));
        assert_eq!(
            wire.output,
            "Bazel persistent worker host 1 /dir 7\ntool says\n"
        );
        assert_eq!(wire.output.as_ptr(), buffer, "the output was copied");
        assert_eq!((wire.request_id, wire.exit_code), (7, 3));
    }
}
