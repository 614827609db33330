//! The thread pool every front end dispatches into, and [`run`], the one
//! place a request is executed: argument files expanded, handler called,
//! panics contained, cancellation and timeout reported.
//!
//! Front ends only read and write their wire; they never run a handler on
//! their own I/O threads. A job carries its own completion callback, so the
//! response leaves from the pool thread that produced it, or, for a request
//! whose tool ignores its timeout, from the timer thread that answers for it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::argfile;
use crate::request::{lock, CancelToken, Handler, Request, Response, Stop};

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

/// How long past its deadline a request's own handler may take to notice the
/// timeout and answer (with its own message) before the pool answers for it.
pub const TIMEOUT_GRACE: Duration = Duration::from_millis(250);

/// How long after a cancel a handler that ignores its token may keep the
/// client waiting before the pool answers for it.
pub const CANCEL_GRACE: Duration = TIMEOUT_GRACE;

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
        let ticket = Ticket(Arc::new(Submitted {
            token: request.cancel.clone(),
            id: request.id.clone(),
            answer: Mutex::new(Some(Box::new(done))),
            state: Mutex::new(JobState::Queued),
            shared: Arc::clone(&self.shared),
        }));
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

/// How a thread that has just finished a job waits for the next one: awake
/// for a while, then asleep. A client that sends its next request as soon as
/// it has the answer (a build's steady state) then finds a thread still
/// awake: waking a sleeping thread costs a futex round trip and a scheduler
/// wake-up on the request's path, more than the work of a no-op request (on
/// a virtual machine whose idle core has halted, 20 to 50 µs).
///
/// After a job whose client works in [`Pace::Lockstep`], how long is learnt
/// from the last gap, the time from a thread finishing a job to a thread
/// taking the next one: one and a half times that, to catch the client's
/// rhythm (a Buck2 `Execute` round trip leaves the pool idle for 150 to
/// 250 µs on a 2-core virtual machine, a Bazel one for 20 to 40 µs), within
/// [`STAY_AWAKE_MIN`] and [`STAY_AWAKE_MAX`]. The gap is the pool's, not a
/// thread's: a job may go to a thread woken for it, and then the awake one's
/// own wait spans two. After any other job the wait is the minimum: where
/// requests come whatever the answers, a thread that waits long only takes a
/// core from the one that reads and answers them (`ExecuteStream` at 16 in
/// flight lost 14% of its throughput to learnt waits of up to 500 µs).
///
/// A job queued while a thread waits awake wakes no sleeping thread: the
/// awake one takes it (Bazel's singleplex no-op took twice as long when each
/// job also woke the other thread for nothing), and one that takes a job
/// with more queued behind it wakes a sleeper for those.
///
/// Awake means yielding, so that the wait gives way to any runnable thread.
/// On a machine whose cores are all busy (a build beside its workers) a
/// yield hands the core to the busy process for the rest of its time slice,
/// up to a scheduler tick (4 ms with `HZ=250`), and a job left to the
/// yielding thread waits as long. So a yield that has lasted [`LOST_CORE_US`]
/// no longer counts as awake: a job queued then wakes a sleeper, which the
/// scheduler runs ahead of the busy process; and when the yield comes back,
/// the thread goes to sleep too.
///
/// The other threads, and the awake one once its wait is over, look out for
/// a job a little longer (spinning, then yielding) and then sleep on the
/// pool's own condition variable. Not in the channel's blocking receive: it
/// yields a few times before it sleeps whatever the machine, and while it
/// yields a send cannot wake it; with two pool threads beside a busy
/// process, every job then waited for a yielded thread's time slice (Buck2
/// `Execute` beside `stress-ng --cpu 2`: 0.9-1.6 ms mean latency against
/// 0.3-0.5 ms now). The look-out yields only while another thread sleeps,
/// which a job can wake instead; it is what lets a burst of jobs (multiplex
/// 64) find threads without waking them.
struct Idle {
    /// Threads waiting awake now.
    awake: AtomicUsize,
    /// When a thread last finished a job, in µs since `epoch`.
    finished_us: AtomicU64,
    /// The last gap, in µs.
    last_gap_us: AtomicU64,
    epoch: Instant,
    /// Threads asleep (or about to be) on `bell`; `bell_lock` is held from a
    /// sleeper's last look at the queue to its wait, so a job's ring cannot
    /// fall in between.
    sleeping: AtomicUsize,
    /// When the awake thread's current yield began (µs since `epoch`, at
    /// least 1), 0 when it is not yielding. One slot: one thread awake.
    yielding_since_us: AtomicU64,
    bell_lock: Mutex<()>,
    bell: Condvar,
}

impl Default for Idle {
    fn default() -> Idle {
        Idle {
            awake: AtomicUsize::new(0),
            finished_us: AtomicU64::new(0),
            last_gap_us: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            sleeping: AtomicUsize::new(0),
            yielding_since_us: AtomicU64::new(0),
            bell_lock: Mutex::new(()),
            bell: Condvar::new(),
        }
    }
}

const STAY_AWAKE_MIN: Duration = Duration::from_micros(50);
const STAY_AWAKE_MAX: Duration = Duration::from_micros(500);

/// A yield that lasts longer than this lost the core to another process:
/// the machine is busy, and waiting awake would only wait longer. (Giving way
/// to the worker's own client or reader thread takes less.)
const LOST_CORE_US: u64 = 50;

/// What the pool's idle threads are doing, as a job is queued.
#[derive(Debug, Clone, Copy)]
struct Waits {
    awake: usize,
    /// How long the awake thread has been in its current yield, if it is in one.
    yielding_for_us: Option<u64>,
    sleeping: usize,
}

impl Waits {
    /// Whether `queued` jobs need a sleeping thread woken.
    fn need_a_sleeper(self, queued: usize) -> bool {
        let lost_core = self.yielding_for_us.is_some_and(|us| us > LOST_CORE_US);
        let awake = if lost_core { 0 } else { self.awake };
        queued > awake && self.sleeping > 0
    }
}

/// Before a thread sleeps: spins of 1, 2, 4 … 64 pauses, then yields.
const SPIN_STEPS: u32 = 7;
const BACKOFF_YIELDS: u32 = 4;

/// A yield in the look-out before sleeping that lasts longer than this lost
/// the core to another process. Longer than [`LOST_CORE_US`]: with many pool
/// threads on few cores a yield often goes to the pool's own threads, and a
/// job never depends on a thread in its look-out (it wakes a sleeper).
const BACKOFF_LOST_US: u64 = 500;

/// One thread awake is enough to take the next request at once; more would
/// only take turns on the cores that the busy threads (and the client) need.
const MAX_AWAKE: usize = 1;

/// How long to stay awake after a job paced `pace`, the pool's last gap
/// being `last_gap`. A gap longer than the maximum (a client that paused)
/// gives the minimum, so that an idle worker spends one short wait awake
/// before it sleeps, not a long one.
fn stay_awake(pace: Pace, last_gap: Duration) -> Duration {
    if pace == Pace::Free || last_gap > STAY_AWAKE_MAX {
        return STAY_AWAKE_MIN;
    }
    (last_gap * 3 / 2).clamp(STAY_AWAKE_MIN, STAY_AWAKE_MAX)
}

impl Idle {
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Looks for a job a few more times before sleeping, spinning and then
    /// yielding: in a burst of jobs (multiplex, streams) the next one comes
    /// within that, and taking it costs no wake-up. A yield that lasts over
    /// [`BACKOFF_LOST_US`] ends the look-out: the core went to another
    /// process, and until this thread sleeps no job can wake it.
    /// `Some(None)`: the queue is closed.
    fn look_out(&self, receiver: &Receiver<Queued>) -> Option<Option<Queued>> {
        for step in 0..SPIN_STEPS + BACKOFF_YIELDS {
            match receiver.try_recv() {
                Ok(job) => return Some(Some(job)),
                Err(TryRecvError::Disconnected) => return Some(None),
                Err(TryRecvError::Empty) if step < SPIN_STEPS => {
                    for _ in 0..1u32 << step {
                        std::hint::spin_loop();
                    }
                }
                // Only while another thread sleeps, so that a job queued
                // while this one has lost its core still has someone to wake.
                Err(TryRecvError::Empty) if self.sleeping.load(Ordering::SeqCst) > 0 => {
                    if self.yield_core_us() > BACKOFF_LOST_US {
                        return None;
                    }
                }
                Err(TryRecvError::Empty) => return None,
            }
        }
        None
    }

    /// Gives the core to any runnable thread; returns how long that took, in
    /// µs.
    fn yield_core_us(&self) -> u64 {
        let before = self.now_us();
        thread::yield_now();
        self.now_us().saturating_sub(before)
    }

    /// Waits asleep, after a look-out; `None` once the queue is closed and
    /// empty.
    fn sleep(&self, receiver: &Receiver<Queued>) -> Option<Queued> {
        let job = match self.look_out(receiver) {
            Some(job) => job,
            None => self.wait_for_bell(receiver),
        };
        if job.is_some() {
            self.took();
        }
        job
    }

    fn wait_for_bell(&self, receiver: &Receiver<Queued>) -> Option<Queued> {
        let mut guard = lock(&self.bell_lock);
        self.sleeping.fetch_add(1, Ordering::SeqCst);
        let job = loop {
            // Pairs with the fence in `ring`: either this look finds the job,
            // or the ring after its send sees this thread counted.
            fence(Ordering::SeqCst);
            match receiver.try_recv() {
                Ok(job) => break Some(job),
                Err(TryRecvError::Disconnected) => break None,
                Err(TryRecvError::Empty) => {
                    guard = self.bell.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
            }
        };
        self.sleeping.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        job
    }

    /// Wakes a sleeping thread for the jobs queued, if they are more than
    /// the threads waiting awake can take.
    fn ring(&self, queued: usize) {
        fence(Ordering::SeqCst);
        let since = self.yielding_since_us.load(Ordering::SeqCst);
        let waits = Waits {
            awake: self.awake.load(Ordering::SeqCst),
            yielding_for_us: (since != 0).then(|| self.now_us().saturating_sub(since)),
            sleeping: self.sleeping.load(Ordering::SeqCst),
        };
        if waits.need_a_sleeper(queued) {
            // Through the lock, so that the sleeper is waiting (or will find
            // the job); the notify after it, so that the woken thread does
            // not wake into a lock still held.
            drop(lock(&self.bell_lock));
            self.bell.notify_one();
        }
    }

    /// Wakes every sleeping thread: the queue is closed.
    fn ring_all(&self) {
        let _guard = lock(&self.bell_lock);
        self.bell.notify_all();
    }

    fn took(&self) {
        let gap = self
            .now_us()
            .saturating_sub(self.finished_us.load(Ordering::Relaxed));
        self.last_gap_us.store(gap, Ordering::Relaxed);
    }

    /// The next job for a thread that has just finished one paced `pace`.
    fn next_job(&self, receiver: &Receiver<Queued>, pace: Pace) -> Option<Queued> {
        let now = self.now_us();
        self.finished_us.store(now, Ordering::Relaxed);
        if self.awake.fetch_add(1, Ordering::AcqRel) >= MAX_AWAKE {
            self.awake.fetch_sub(1, Ordering::AcqRel);
            return self.sleep(receiver);
        }
        let last_gap = Duration::from_micros(self.last_gap_us.load(Ordering::Relaxed));
        let stay = stay_awake(pace, last_gap);
        let awake_until = now.saturating_add(stay.as_micros() as u64);
        let job = loop {
            match receiver.try_recv() {
                Ok(job) => {
                    self.took();
                    break Some(job);
                }
                Err(TryRecvError::Disconnected) => break None,
                Err(TryRecvError::Empty) if self.now_us() < awake_until => {
                    // Gives the core to a runnable thread, the client included,
                    // when there is one: the wait must not slow what it waits for.
                    self.yielding_since_us
                        .store(self.now_us().max(1), Ordering::SeqCst);
                    let yielded_us = self.yield_core_us();
                    self.yielding_since_us.store(0, Ordering::SeqCst);
                    if yielded_us > LOST_CORE_US {
                        self.awake.fetch_sub(1, Ordering::AcqRel);
                        return self.sleep(receiver);
                    }
                }
                Err(TryRecvError::Empty) => {
                    // No longer awake while asleep: another thread that
                    // finishes meanwhile may wait awake instead.
                    self.awake.fetch_sub(1, Ordering::AcqRel);
                    return self.sleep(receiver);
                }
            }
        };
        self.awake.fetch_sub(1, Ordering::AcqRel);
        if job.is_some() {
            // A job queued while this thread was counted awake may have
            // skipped its ring on the strength of it: pass the ring on.
            self.ring(receiver.len());
        }
        job
    }
}

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

/// A prepared request's job, not yet queued: until it is, its answer cannot
/// come.
#[must_use = "a prepared request that is never queued is never answered"]
pub struct Pending {
    job: Job,
    pace: Pace,
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
    fn clone(&self) -> Ticket {
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

    fn answer_at(&self, when: Instant, stop: Stop, message: &'static str) {
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
    fn label(&self) -> String {
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
    fn run(&self, handler: &dyn Handler, request: Request) {
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

/// One thread that runs jobs at given instants; it ends when its pool goes.
struct Timer {
    sender: Sender<(Instant, Job)>,
}

impl Timer {
    fn start() -> Timer {
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

    fn at(&self, when: Instant, job: impl FnOnce() + Send + 'static) {
        let _ = self.sender.send((when, Box::new(job)));
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
    fn the_wait_awake_follows_a_lockstep_client_rhythm_within_bounds() {
        let us = Duration::from_micros;
        let lockstep = |gap| stay_awake(Pace::Lockstep, gap);
        // A steady client: the next request comes within the wait.
        assert_eq!(lockstep(us(100)), us(150));
        assert_eq!(lockstep(us(200)), us(300));
        // Quick clients still get the minimum; slow ones no more than the
        // maximum, which still covers the gap itself.
        assert_eq!(lockstep(us(10)), STAY_AWAKE_MIN);
        assert_eq!(lockstep(us(400)), STAY_AWAKE_MAX);
        assert!(lockstep(STAY_AWAKE_MAX) >= STAY_AWAKE_MAX);
        // A client that paused (or none yet): the short wait.
        assert_eq!(lockstep(STAY_AWAKE_MAX + us(1)), STAY_AWAKE_MIN);
        assert_eq!(lockstep(us(u64::MAX)), STAY_AWAKE_MIN);
        // Requests that come whatever the answers: always the short wait.
        for gap in [10, 100, 200, 400, 10_000] {
            assert_eq!(stay_awake(Pace::Free, us(gap)), STAY_AWAKE_MIN);
        }
    }

    #[test]
    fn a_queued_job_wakes_a_sleeper_unless_an_awake_thread_on_its_core_can_take_it() {
        let waits = |awake, yielding_for_us, sleeping| Waits {
            awake,
            yielding_for_us,
            sleeping,
        };
        // Nobody awake: the job needs a sleeper.
        assert!(waits(0, None, 1).need_a_sleeper(1));
        // The awake thread takes it, whether spinning or in a short yield.
        assert!(!waits(1, None, 1).need_a_sleeper(1));
        assert!(!waits(1, Some(LOST_CORE_US), 1).need_a_sleeper(1));
        // More jobs than awake threads: the rest need a sleeper.
        assert!(waits(1, None, 1).need_a_sleeper(2));
        // An awake thread whose yield lost its core cannot take it soon.
        assert!(waits(1, Some(LOST_CORE_US + 1), 1).need_a_sleeper(1));
        // No sleeper to wake.
        assert!(!waits(0, None, 0).need_a_sleeper(3));
    }

    /// Waits, within a bound, until `n` pool threads sleep.
    fn until_asleep(pool: &Pool, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.idle.sleeping.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "{n} pool thread(s) never slept");
            thread::yield_now();
        }
    }

    #[test]
    fn a_job_queued_while_every_thread_sleeps_wakes_one() {
        let pool = Pool::new(2);
        let (ran, has_run) = bounded(4);
        for _ in 0..3 {
            // Also after a job, once the wait awake is over.
            until_asleep(&pool, 2);
            let ran = ran.clone();
            pool.spawn(move || {
                let _ = ran.send(());
            });
            has_run
                .recv_timeout(Duration::from_secs(10))
                .expect("a sleeping thread is woken for the job");
        }
    }

    #[test]
    fn a_pool_whose_threads_sleep_joins_and_drops() {
        let (done, finished) = bounded(2);
        let d = done.clone();
        thread::spawn(move || {
            let pool = Pool::new(3);
            until_asleep(&pool, 3);
            pool.join();
            let _ = d.send(());
        });
        thread::spawn(move || {
            let pool = Pool::new(3);
            until_asleep(&pool, 3);
            drop(pool);
            let _ = done.send(());
        });
        for _ in 0..2 {
            finished
                .recv_timeout(Duration::from_secs(10))
                .expect("closing the queue wakes every sleeping thread");
        }
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
        req.cancel.set_timeout(Duration::from_millis(20));
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
        req.cancel.set_timeout(Duration::from_millis(20));
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
