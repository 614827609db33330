//! The idle-thread policy: how a pool thread waits for its next job, and
//! whether a job just queued must wake a sleeping thread. It owns the
//! tuning constants, each beside the measurement that set it.
//!
//! It never runs, holds or reorders a job: the queue hands it the channel's
//! receiving end and it returns what it took, in queue order. It never
//! blocks a thread that queues a job (`ring` takes the bell's lock only
//! long enough to pass it), and it must never leave a job queued with every
//! thread asleep: a sleeper counts itself under `bell_lock` before its last
//! look at the queue, and a job's ring looks at that count after its send.
//!
//! # The policy, and why
//!
//! How a thread that has just finished a job waits for the next one: awake
//! for a while, then asleep. A client that sends its next request as soon as
//! it has the answer (a build's steady state) then finds a thread still
//! awake: waking a sleeping thread costs a futex round trip and a scheduler
//! wake-up on the request's path, more than the work of a no-op request (on
//! a virtual machine whose idle core has halted, 20 to 50 µs).
//!
//! After a job whose client works in [`Pace::Lockstep`], how long is learnt
//! from the last gap, the time from a thread finishing a job to a thread
//! taking the next one: one and a half times that, to catch the client's
//! rhythm (a Buck2 `Execute` round trip leaves the pool idle for 150 to
//! 250 µs on a 2-core virtual machine, a Bazel one for 20 to 40 µs), within
//! [`STAY_AWAKE_MIN`] and [`STAY_AWAKE_MAX`]. The gap is the pool's, not a
//! thread's: a job may go to a thread woken for it, and then the awake one's
//! own wait spans two. After any other job the wait is the minimum: where
//! requests come whatever the answers, a thread that waits long only takes a
//! core from the one that reads and answers them (`ExecuteStream` at 16 in
//! flight lost 14% of its throughput to learnt waits of up to 500 µs).
//!
//! A job queued while a thread waits awake wakes no sleeping thread: the
//! awake one takes it (Bazel's singleplex no-op took twice as long when each
//! job also woke the other thread for nothing), and one that takes a job
//! with more queued behind it wakes a sleeper for those.
//!
//! Awake means yielding, so that the wait gives way to any runnable thread.
//! On a machine whose cores are all busy (a build beside its workers) a
//! yield hands the core to the busy process for the rest of its time slice,
//! up to a scheduler tick (4 ms with `HZ=250`), and a job left to the
//! yielding thread waits as long. So a yield that has lasted [`LOST_CORE_US`]
//! no longer counts as awake: a job queued then wakes a sleeper, which the
//! scheduler runs ahead of the busy process; and when the yield comes back,
//! the thread goes to sleep too.
//!
//! The other threads, and the awake one once its wait is over, look out for
//! a job a little longer (spinning, then yielding) and then sleep on the
//! pool's own condition variable. Not in the channel's blocking receive: it
//! yields a few times before it sleeps whatever the machine, and while it
//! yields a send cannot wake it; with two pool threads beside a busy
//! process, every job then waited for a yielded thread's time slice (Buck2
//! `Execute` beside `stress-ng --cpu 2`: 0.9-1.6 ms mean latency against
//! 0.3-0.5 ms now). The look-out yields only while another thread sleeps,
//! which a job can wake instead; it is what lets a burst of jobs (multiplex
//! 64) find threads without waking them.

use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

use super::{Pace, Queued};
use crate::request::lock;

/// The state of a pool's idle threads, shared by all of them.
pub(super) struct Idle {
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
/// before it sleeps, not a long one. Public so that the benchmark floors
/// wait by the worker's rule.
///
/// ```
/// use std::time::Duration;
/// use persistent_worker::pool::{stay_awake, Pace};
/// // A lockstep client that came back after 40 µs is waited for 60 µs.
/// let gap = Duration::from_micros(40);
/// assert_eq!(stay_awake(Pace::Lockstep, gap), Duration::from_micros(60));
/// ```
pub fn stay_awake(pace: Pace, last_gap: Duration) -> Duration {
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
    pub(super) fn sleep(&self, receiver: &Receiver<Queued>) -> Option<Queued> {
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
    pub(super) fn ring(&self, queued: usize) {
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
    pub(super) fn ring_all(&self) {
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
    pub(super) fn next_job(&self, receiver: &Receiver<Queued>, pace: Pace) -> Option<Queued> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use crossbeam_channel::bounded;

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
}
