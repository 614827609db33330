//! The Bazel worker loop. Requests enter in [`serve`] on the reading thread,
//! run on the pool (a short singleplex one on the reading thread itself, see
//! below), and their responses leave through the
//! [`ResponseWriter`] from the pool thread that
//! finished them (or one finishing beside it).
//!
//! Request id 0 is singleplex: an id-0 request waits for the previous one to
//! finish, so they run one at a time and in order. Non-zero ids are
//! multiplex: every request is dispatched at once and answered when done.
//! Either way the id is echoed, because old Bazel versions send non-zero ids
//! to singleplex workers too.
//!
//! A singleplex request runs on the reading thread itself when nothing else
//! is in flight and the previous one took under 10 ms (the first always):
//! its client sends nothing else until the answer, so handing it to a pool
//! thread would only add a wake-up to the round trip, and on a machine
//! busy with a build a wake-up that does not preempt waits out a scheduler
//! tick (Bazel beside `nice 19` hogs: 0.8 to 1.1 % of requests over 2 ms
//! handed over, 0.03 to 0.16 % run here).
//!
//! So the input has two threads of its own, which take turns: one reads,
//! the other stands by. A request that holds the reader for 10 ms is not
//! left deaf to its cancel: the standby (which looks every 10 ms while
//! requests run on the reader, and sleeps after a second without one) takes
//! the input over and reads on; the old reader stands by once its request
//! returns. Neither is the caller's thread, so a tool that never returns
//! cannot keep [`serve`] from returning at the end of input.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
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
    /// How long the last singleplex request took, in µs.
    last_singleplex_us: AtomicU64,
    /// A request ran on the reading thread and was answered; the next one
    /// has not been read yet.
    answered_here: AtomicBool,
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
            last_singleplex_us: AtomicU64::new(0),
            answered_here: AtomicBool::new(false),
        })
    }

    /// Whether the last request ran on the reading thread, which has not read
    /// since: its client, in lockstep, is about to send the next one. Asked
    /// once per answer.
    pub(crate) fn take_answered_here(&self) -> bool {
        self.answered_here.swap(false, Ordering::Relaxed)
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
    input: impl BufRead + Send + 'static,
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
///
/// The input is read on two threads of its own that take turns (see the
/// module's documentation): either may be held by a request's tool, which must not
/// keep this function from returning at the end of input.
pub fn serve_session<I: BufRead + Send + 'static>(
    handler: Arc<dyn Handler>,
    pool: Pool,
    config: &Config,
    input: I,
    session: &Arc<Session>,
) -> Result<(), FrameError> {
    let pool = Arc::new(pool);
    let reader = Arc::new(Reader {
        handler,
        pool: Arc::clone(&pool),
        config: config.clone(),
        session: Arc::clone(session),
    });
    let baton = Arc::new(Baton::<I>::default());
    let (ended_tx, ended) = crossbeam_channel::unbounded();
    let turns = |name: &str, input: Option<I>| {
        let (reader, baton, ended_tx) = (Arc::clone(&reader), Arc::clone(&baton), ended_tx.clone());
        thread::Builder::new().name(name.into()).spawn(move || {
            let _ = ended_tx.send(take_turns(&reader, &baton, input));
        })
    };
    // Counted as standing by before it exists, so that the first request
    // may already run on the reading thread.
    baton.standby_ready.store(true, Ordering::Relaxed);
    let standby = turns("bazel-standby", None);
    if standby.is_err() {
        // Nobody could read a cancel while a request ran on the reading
        // thread: none does.
        baton.standby_ready.store(false, Ordering::Relaxed);
    }
    let reading = turns("bazel-reader", Some(input)).map_err(|e| {
        baton.end();
        FrameError::Io(std::io::Error::new(
            e.kind(),
            format!("starting the reading thread: {e}"),
        ))
    })?;
    drop(ended_tx);
    // One of the two reads to the end and says so; the other says `None`.
    let ended = loop {
        match ended.recv() {
            Ok(Some(ended)) => break ended,
            Ok(None) => {}
            // Both gone without an end: only a panic outside any handler.
            Err(_) => break Ok(()),
        }
    };
    drop(reader);
    if let Err(e) = ended {
        // Joining would wait for handlers that may not honour the cancel;
        // the caller exits, so the threads need not finish.
        baton.end();
        detach(pool);
        return Err(e);
    }
    let writer = &session.writer;
    let in_flight = &session.in_flight;
    // Every request answered first; only then is it known whether a thread
    // is left in a tool that ignored its cancel, which joining would wait
    // for without end.
    let mut table = lock(in_flight);
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
        crate::elog!("worker: end of input; leaving {stuck} stuck thread(s) behind");
        detach(pool);
        return Ok(());
    }
    // Nothing is stuck, so the two end: the one that read the end has, and
    // the other sees it.
    for thread in [Ok(reading), standby].into_iter().flatten() {
        let _ = thread.join();
    }
    match Arc::try_unwrap(pool) {
        Ok(pool) => pool.join(),
        Err(pool) => detach(pool),
    }
    Ok(())
}

/// Lets the pool's threads go without waiting for them, if this is the last
/// hold on it; a thread left in a tool holds it otherwise, and it is let go
/// with the process.
fn detach(pool: Arc<Pool>) {
    if let Ok(pool) = Arc::try_unwrap(pool) {
        pool.detach();
    }
}

/// One of the two threads that share the input: it reads while it holds
/// the input, and stands by while the other does. The one that reads to the
/// end returns it; the other returns `None`.
fn take_turns<I: BufRead + Send>(
    reader: &Reader,
    baton: &Baton<I>,
    mut input: Option<I>,
) -> Option<Result<(), FrameError>> {
    loop {
        if let Some(input) = input.take() {
            if let Some(ended) = reader.read(input, baton) {
                baton.end();
                return Some(ended);
            }
            // Taken over while a request ran here: stand by now.
        }
        input = Some(standby(baton)?);
    }
}

/// The reading loop and what it needs, shared by the two threads that take
/// turns reading.
struct Reader {
    handler: Arc<dyn Handler>,
    pool: Arc<Pool>,
    config: Config,
    session: Arc<Session>,
}

impl Reader {
    /// Reads and dispatches requests until end of input (`Some(Ok)`), an
    /// unreadable stream (`Some(Err)`, output closed), or the standby taking
    /// the input over while a request ran here (`None`). A singleplex
    /// request expected to be short runs on this thread while the other
    /// stands by.
    fn read<I: BufRead + Send>(
        &self,
        mut input: I,
        baton: &Baton<I>,
    ) -> Option<Result<(), FrameError>> {
        let Reader {
            handler,
            pool,
            config,
            session,
        } = self;
        let writer = Arc::clone(&session.writer);
        let in_flight = Arc::clone(&session.in_flight);
        let identity = Arc::clone(&session.identity);
        loop {
            let work = match config
                .format
                .read_request(&mut input, config.max_message_bytes)
            {
                Ok(Some(work)) => work,
                Ok(None) => return Some(Ok(())),
                Err(e) => {
                    writer.close();
                    for ticket in lock(&in_flight).values() {
                        ticket.token().cancel();
                    }
                    return Some(Err(e));
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
                let shared = Arc::clone(session);
                let identity = Arc::clone(&identity);
                // Filed before it is queued, so the answer, which needs the
                // table, cannot come before the ticket is in it; queued after the
                // lock is let go, which may wake a pool thread, so that the
                // threads answering other requests do not wait for that.
                // Singleplex clients send the next request once they have this
                // answer; multiplex ones keep sending.
                let pace = if id == 0 { Pace::Lockstep } else { Pace::Free };
                let here = id == 0
                    && baton.standing_by()
                    && table.is_empty()
                    && request.cancel.deadline().is_none()
                    && session.last_singleplex_us.load(Ordering::Relaxed) < INLINE_UNDER_US;
                let started = Instant::now();
                let (ticket, pending) =
                    pool.prepare(Arc::clone(handler), request, pace, move |response| {
                        if id == 0 {
                            let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                            shared.last_singleplex_us.store(took, Ordering::Relaxed);
                        }
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
                        let mut table = lock(&shared.in_flight);
                        if table.remove(&id).is_none() {
                            return;
                        }
                        let left = table.len();
                        // Only an empty table and the singleplex request are waited for.
                        let wake =
                            (left == 0 || id == 0) && shared.waiting.load(Ordering::Relaxed) > 0;
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
                            shared.left.notify_all();
                        }
                    });
                table.insert(id, ticket);
                drop(table);
                if here {
                    // A cancel for it, or anything else, is read by the
                    // standby if it runs long.
                    baton.hand_over(input);
                    pool.run_here(pending);
                    input = baton.take_back()?;
                    session.answered_here.store(true, Ordering::Relaxed);
                } else {
                    pool.queue_pending(pending);
                }
            }
        }
    }
}

/// A singleplex request runs on the reading thread if the one before took
/// less than this, in µs.
const INLINE_UNDER_US: u64 = 10_000;

/// How long a request may hold the reading thread before the standby takes
/// the input over: a cancel for it waits at most this plus [`TICK`].
const TAKE_OVER_AFTER: Duration = Duration::from_millis(10);

/// How often the standby looks, while requests run on the reading thread.
const TICK: Duration = Duration::from_millis(10);

/// Ticks without a request run on the reading thread before the standby
/// sleeps until the next one (which then wakes it): an idle worker wakes
/// nobody.
const PARK_AFTER_TICKS: u32 = 100;

/// What the reading thread leaves to its standby while it runs a request
/// itself: the input, and when the request started.
struct Baton<I> {
    /// The input while a request runs on the reading thread; whoever takes
    /// it reads on.
    input: Mutex<Option<I>>,
    watch: Mutex<Watch>,
    bell: Condvar,
    /// The other thread stands by (or is about to): a request may run on
    /// the reading thread. Changed under `watch`'s lock.
    standby_ready: AtomicBool,
}

#[derive(Default)]
struct Watch {
    /// When the request running on the reading thread started, if one is.
    running_since: Option<Instant>,
    /// Requests run on the reading thread so far.
    started: u64,
    /// The standby sleeps until the next such request.
    parked: bool,
    /// The reading thread has read to the end: the standby ends.
    ended: bool,
}

impl<I> Default for Baton<I> {
    fn default() -> Self {
        Baton {
            input: Mutex::new(None),
            watch: Mutex::default(),
            bell: Condvar::new(),
            standby_ready: AtomicBool::new(false),
        }
    }
}

impl<I> Baton<I> {
    /// Before a request runs on the reading thread.
    fn hand_over(&self, input: I) {
        *lock(&self.input) = Some(input);
        let mut watch = lock(&self.watch);
        watch.running_since = Some(Instant::now());
        watch.started += 1;
        let parked = watch.parked;
        drop(watch);
        if parked {
            self.bell.notify_one();
        }
    }

    /// After it: the input, unless the standby has taken it over; then
    /// this thread is the standby.
    fn take_back(&self) -> Option<I> {
        let mut watch = lock(&self.watch);
        watch.running_since = None;
        let input = lock(&self.input).take();
        if input.is_none() {
            self.standby_ready.store(true, Ordering::Relaxed);
        }
        drop(watch);
        input
    }

    fn standing_by(&self) -> bool {
        self.standby_ready.load(Ordering::Relaxed)
    }

    fn end(&self) {
        lock(&self.watch).ended = true;
        self.bell.notify_all();
    }
}

/// Standing by: takes the input over from a reading thread held by one
/// request for [`TAKE_OVER_AFTER`] and returns it, to read on; `None` once
/// the other thread has read to the end.
fn standby<I>(baton: &Baton<I>) -> Option<I> {
    let mut seen = 0;
    let mut quiet_ticks = 0;
    let mut watch = lock(&baton.watch);
    loop {
        if watch.ended {
            return None;
        }
        if let Some(since) = watch.running_since {
            if since.elapsed() >= TAKE_OVER_AFTER {
                // Under `watch`, as `take_back` takes it: one of the two
                // gets the input.
                if let Some(input) = lock(&baton.input).take() {
                    baton.standby_ready.store(false, Ordering::Relaxed);
                    drop(watch);
                    crate::elog!(
                        "worker: a singleplex request has held the reading thread for {} ms: \
                         reading goes on in another thread",
                        since.elapsed().as_millis()
                    );
                    return Some(input);
                }
            }
        }
        if watch.started != seen {
            seen = watch.started;
            quiet_ticks = 0;
        } else if watch.running_since.is_none() {
            quiet_ticks += 1;
        }
        if quiet_ticks > PARK_AFTER_TICKS {
            watch.parked = true;
            while !watch.ended && watch.running_since.is_none() {
                watch = baton.bell.wait(watch).unwrap_or_else(|e| e.into_inner());
            }
            watch.parked = false;
            quiet_ticks = 0;
        } else {
            watch = match baton.bell.wait_timeout(watch, TICK) {
                Ok((watch, _)) => watch,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
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

    /// Records the name of the thread each request ran on, by its first
    /// argument. `long` holds its thread until it is cancelled, which only a takeover
    /// lets it be (nobody else reads the cancel); `short` works 1 ms.
    #[derive(Default)]
    struct Where {
        ran: Mutex<Vec<(String, String)>>,
    }

    impl Handler for Where {
        fn handle(&self, request: &Request) -> Response {
            let arg = request.args.first().cloned().unwrap_or_default();
            let name = thread::current().name().unwrap_or("?").to_owned();
            lock(&self.ran).push((arg.clone(), name));
            match arg.as_str() {
                "long" => match request.cancel.sleep(Duration::from_secs(20)) {
                    Err(stop) => Response::stopped(stop, "cancelled"),
                    Ok(()) => Response::error(1, "never cancelled"),
                },
                "short" => {
                    thread::sleep(Duration::from_millis(1));
                    Response::ok("")
                }
                _ => Response::ok(""),
            }
        }
    }

    /// Whether a thread of that name reads the input (pool threads are
    /// `worker-N`).
    fn reads(thread: &str) -> bool {
        thread == "bazel-reader" || thread == "bazel-standby"
    }

    fn serve_requests(requests: &[WorkRequest]) -> Vec<(String, String)> {
        serve_and_answer(requests).0
    }

    /// The threads requests ran on, and the responses in order.
    fn serve_and_answer(requests: &[WorkRequest]) -> (Vec<(String, String)>, Vec<WorkResponse>) {
        let mut input = Vec::new();
        for request in requests {
            input.extend(WireFormat::Proto.encode_request(request));
        }
        let handler = Arc::new(Where::default());
        let config = Config {
            format: WireFormat::Proto,
            max_message_bytes: 1 << 20,
            cwd: PathBuf::from("."),
            verbose: false,
        };
        let tool: Arc<dyn Handler> = handler.clone();
        let output = Output::default();
        serve(
            tool,
            Pool::new(2),
            &config,
            std::io::Cursor::new(input),
            Box::new(output.clone()),
        )
        .unwrap();
        let ran = lock(&handler.ran).clone();
        let written = lock(&output.0).clone();
        let mut answers = Vec::new();
        let mut rest = &written[..];
        while let Ok(Some(answer)) = WireFormat::Proto.read_response(&mut rest, usize::MAX) {
            answers.push(answer);
        }
        (ran, answers)
    }

    fn work(id: i32, arg: &str) -> WorkRequest {
        let mut request = WorkRequest::new();
        request.request_id = id;
        request.arguments = vec![arg.to_owned()];
        request
    }

    #[test]
    fn a_short_singleplex_request_runs_on_the_thread_that_read_it() {
        let requests: Vec<_> = (0..20).map(|i| work(0, &i.to_string())).collect();
        let ran = serve_requests(&requests);
        let on_reader: Vec<bool> = ran.iter().map(|(_, t)| reads(t)).collect();
        assert_eq!(ran.len(), 20);
        // The first, with nothing before it, always; each later one if the
        // one before took under 10 ms, which on a loaded machine a stall
        // can spoil for a few.
        assert!(on_reader[0], "{on_reader:?}");
        let count = on_reader.iter().filter(|&&here| here).count();
        assert!(
            count >= 10,
            "{count} of 20 ran on the reading thread: {on_reader:?}"
        );
    }

    #[test]
    fn multiplex_requests_never_run_on_the_thread_that_reads() {
        let ran = serve_requests(&[
            work(0, "single"),
            work(0, "single"),
            work(1, "multi"),
            work(2, "multi"),
        ]);
        for (arg, thread) in &ran {
            if arg == "multi" {
                assert!(thread.starts_with("worker-"), "{ran:?}");
            }
        }
        assert_eq!(ran.len(), 4);
    }

    /// The response stream, kept for the test to read.
    #[derive(Clone, Default)]
    struct Output(Arc<Mutex<Vec<u8>>>);

    impl Write for Output {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn after_a_takeover_the_threads_swap_and_short_requests_run_on_the_reader_again() {
        let mut cancel = WorkRequest::new();
        cancel.cancel = true;
        let mut requests = vec![work(0, "long"), cancel];
        requests.extend((0..300).map(|_| work(0, "short")));
        let (ran, answers) = serve_and_answer(&requests);
        assert_eq!((ran.len(), answers.len()), (301, 301));
        // The long one held the first reader until the standby took over
        // and read its cancel.
        assert_eq!(ran[0], ("long".to_owned(), "bazel-reader".to_owned()));
        assert!(answers[0].was_cancelled, "{:?}", answers[0]);
        // Once it returned, the first reader stood by, and the new one ran
        // short requests itself again.
        let after: Vec<&str> = ran[1..].iter().map(|(_, t)| t.as_str()).collect();
        assert!(
            after.contains(&"bazel-standby"),
            "no request ran on the new reader: {after:?}"
        );
    }
}
