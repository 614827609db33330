//! How the Buck2 worker ends: SIGTERM/SIGINT drain it within a grace period,
//! the death of the parent (Buck2's daemon) stops it at once, and either way
//! the socket file goes away.
//!
//! Signals are blocked in every thread and taken synchronously with
//! `sigwait` by the thread that started the server, so shutdown code runs
//! as ordinary code rather than in a signal handler.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use crate::request::{lock, CancelToken};

/// The signal the kernel sends when the parent goes away (`PR_SET_PDEATHSIG`).
/// SIGHUP also means "the terminal that started us is gone", which deserves
/// the same treatment.
const PARENT_DEATH_SIGNAL: libc::c_int = libc::SIGHUP;

/// Blocked stop signals, waited for with [`Signals::wait`].
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread. Must run before
    /// any other thread starts: threads inherit the mask, and a stop signal
    /// delivered to a thread that has it unblocked would kill the process
    /// without cleanup.
    pub fn block() -> io::Result<Signals> {
        // SAFETY: the set is initialised by sigemptyset before use; the
        // calls only read and write it and the thread's signal mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGTERM, libc::SIGINT, PARENT_DEATH_SIGNAL] {
                libc::sigaddset(&mut set, signal);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(Signals { set })
        }
    }

    /// Waits for the next stop signal.
    pub fn wait(&self) -> libc::c_int {
        loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is a valid, initialised signal set.
            let rc = unsafe { libc::sigwait(&self.set, &mut signal) };
            if rc == 0 {
                return signal;
            }
        }
    }
}

pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Who our parent was at start-up, to tell a real parent death from the
/// kernel's other reason for the death signal.
pub struct Parent {
    pid: libc::pid_t,
    polling: AtomicBool,
}

impl Parent {
    /// Asks the kernel for SIGHUP when the parent dies.
    ///
    /// The kernel sends it when the parent *thread* that forked us exits, even
    /// if its process lives on (a runtime's short-lived blocking thread may
    /// have spawned us), so [`Parent::is_gone`] checks that we were actually
    /// re-parented before acting on it.
    pub fn watch() -> Parent {
        // SAFETY: getppid cannot fail.
        let pid = unsafe { libc::getppid() };
        #[cfg(target_os = "linux")]
        {
            // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes
            // nothing but this process's death-signal setting.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    PARENT_DEATH_SIGNAL as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            if rc != 0 {
                crate::elog!(
                    "persistent-worker: cannot watch the parent process: {}",
                    io::Error::last_os_error()
                );
            }
        }
        Parent {
            pid,
            polling: AtomicBool::new(false),
        }
    }

    /// The parent died, whether before or after [`Parent::watch`] asked to be
    /// told.
    pub fn is_gone(&self) -> bool {
        // SAFETY: getppid cannot fail.
        unsafe { libc::getppid() != self.pid }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Falls back to polling once the kernel's one-shot death signal has been
    /// spent on the exit of a forking thread: a thread raises SIGHUP in this
    /// process when the parent really goes. Idempotent.
    pub fn poll_from_now_on(&self) {
        if self.polling.swap(true, Ordering::AcqRel) {
            return;
        }
        let parent = self.pid;
        let spawned = thread::Builder::new()
            .name("parent-watch".into())
            .spawn(move || loop {
                thread::sleep(PARENT_POLL);
                // SAFETY: getppid cannot fail; kill signals our own process.
                unsafe {
                    if libc::getppid() != parent {
                        libc::kill(libc::getpid(), PARENT_DEATH_SIGNAL);
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            crate::elog!("persistent-worker: cannot watch the parent process: {e}");
        }
    }
}

/// How often the fallback parent watch looks; nothing signals a parent's
/// death a second time, so polling is the only way left.
const PARENT_POLL: Duration = Duration::from_millis(200);

/// What the server has in flight: the cancellation tokens of running
/// requests (to cancel them when the grace period ends) and the wakers of
/// open calls (to tell them to wind down).
#[derive(Default)]
pub struct Tracker {
    draining: AtomicBool,
    state: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    next: u64,
    requests: HashMap<u64, CancelToken>,
    calls: HashMap<u64, Waker>,
}

/// A registration in the [`Tracker`]; dropping it unregisters.
pub struct Ticket {
    tracker: Arc<Tracker>,
    key: u64,
    call: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = lock(&self.tracker.state);
        if self.call {
            state.calls.remove(&self.key);
        } else {
            state.requests.remove(&self.key);
        }
    }
}

impl Tracker {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Registers a running request's token.
    pub fn request(self: &Arc<Self>, token: CancelToken) -> Ticket {
        let mut state = lock(&self.state);
        let key = state.next;
        state.next += 1;
        state.requests.insert(key, token);
        Ticket {
            tracker: Arc::clone(self),
            key,
            call: false,
        }
    }

    /// Registers an open call, woken when draining starts.
    pub fn call(self: &Arc<Self>, waker: Waker) -> Ticket {
        let mut state = lock(&self.state);
        let key = state.next;
        state.next += 1;
        state.calls.insert(key, waker);
        Ticket {
            tracker: Arc::clone(self),
            key,
            call: true,
        }
    }

    /// Waits until no call is open and no request runs, or until `deadline`;
    /// true if it got there. Calls end on their own once draining (each
    /// finishes what it has), so this is polled, briefly, only at shutdown.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            {
                let state = lock(&self.state);
                if state.calls.is_empty() && state.requests.is_empty() {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(IDLE_POLL);
        }
    }

    /// Stops new work: calls see [`Tracker::is_draining`] and finish what they
    /// have. Returns the number of requests still running.
    pub fn drain(&self) -> usize {
        self.draining.store(true, Ordering::Release);
        let state = lock(&self.state);
        for waker in state.calls.values() {
            waker.wake_by_ref();
        }
        state.requests.len()
    }

    /// Cancels every running request; returns how many there were.
    pub fn cancel_all(&self) -> usize {
        let state = lock(&self.state);
        for token in state.requests.values() {
            token.cancel();
        }
        state.requests.len()
    }
}

struct Unpark(thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `future` on this thread until it is ready or `deadline` passes.
/// gRPC's futures are completed by its own threads and only need a waker
/// that works from anywhere, which a parked thread provides.
pub fn block_on_until<F: Future + Unpin>(future: &mut F, deadline: Instant) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = Pin::new(&mut *future).poll(&mut cx) {
            return Some(output);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::park_timeout(deadline - now);
    }
}

/// How often shutdown looks whether the last call has ended.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// How long gRPC's teardown may take to flush the last responses at exit.
pub const TEARDOWN: Duration = Duration::from_millis(1000);

/// Between the last call's end and gRPC closing the connections: time for
/// the final answers to reach the clients and be read. Nothing tells the
/// server a client has read its answer, so this is a bound; shutdown is off
/// every build's critical path.
pub const LINGER: Duration = Duration::from_millis(200);

/// How long cancelled requests get to report back after the grace period:
/// handlers that honour their token stop within milliseconds.
pub const AFTER_CANCEL: Duration = Duration::from_millis(2000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_unregister_and_cancel_all_reaches_running_requests() {
        let tracker = Arc::new(Tracker::default());
        let token = CancelToken::new();
        let ticket = tracker.request(token.clone());
        let other = tracker.request(CancelToken::new());
        drop(other);
        assert_eq!(tracker.cancel_all(), 1);
        assert_eq!(token.stopped(), Some(crate::request::Stop::Cancelled));
        drop(ticket);
        assert_eq!(tracker.drain(), 0);
        assert!(tracker.is_draining());
    }

    #[test]
    fn block_on_until_gives_up_at_the_deadline() {
        let mut never = std::future::pending::<()>();
        let start = Instant::now();
        assert!(block_on_until(&mut never, start + Duration::from_millis(20)).is_none());
        assert!(start.elapsed() >= Duration::from_millis(20));
        let mut ready = std::future::ready(5);
        assert_eq!(block_on_until(&mut ready, Instant::now()), Some(5));
    }
}
