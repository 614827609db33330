//! The protocol-independent request model: what every front end turns its wire
//! message into ([`Request`]), what comes back ([`Response`]), the one trait a
//! tool implements to become a worker ([`Handler`]), and the cancellation
//! token that lets a front end stop a request that is already running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One unit of work, as the handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Arguments after argument-file expansion.
    pub args: Vec<String>,
    /// Extra environment for this request (Buck2 sends some; Bazel none).
    pub env: Vec<(String, String)>,
    /// Directory that relative paths of this request resolve against: the
    /// worker's cwd, or the Bazel `sandbox_dir` under it.
    pub workdir: PathBuf,
    /// Bazel's verbosity; > 0 asks for extra logging on stderr.
    pub verbosity: i32,
    /// Trips when the client cancels the request or its timeout passes.
    pub cancel: CancelToken,
    /// How logs name this request (its protocol id); empty if it has none.
    pub id: String,
}

impl Request {
    /// A request with no env, verbosity 0 and no timeout.
    pub fn new(args: Vec<String>, workdir: PathBuf) -> Request {
        Request {
            args,
            env: Vec::new(),
            workdir,
            verbosity: 0,
            cancel: CancelToken::new(),
            id: String::new(),
        }
    }

    /// Resolves a path named by this request against its working directory.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        self.workdir.join(path)
    }
}

/// Why a request stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Cancelled,
    TimedOut,
}

/// The outcome of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub exit_code: i32,
    /// Text for the user: Bazel's `output`, Buck2's `stderr`.
    pub output: String,
    /// The handler stopped because the request was cancelled.
    pub cancelled: bool,
    /// The handler stopped because the request's timeout passed.
    pub timed_out: bool,
}

impl Response {
    pub fn ok(output: impl Into<String>) -> Response {
        Response {
            output: output.into(),
            ..Response::default()
        }
    }

    pub fn error(exit_code: i32, output: impl Into<String>) -> Response {
        Response {
            exit_code,
            output: output.into(),
            ..Response::default()
        }
    }

    /// A response for a request that stopped early; `exit_code` is what a
    /// client that ignores the flags sees.
    pub fn stopped(stop: Stop, output: impl Into<String>) -> Response {
        Response {
            exit_code: 1,
            output: output.into(),
            cancelled: stop == Stop::Cancelled,
            timed_out: stop == Stop::TimedOut,
        }
    }

    /// Tool output is bytes but both protocols carry UTF-8 strings: invalid
    /// sequences become U+FFFD rather than failing the whole response.
    pub fn with_output_bytes(exit_code: i32, output: &[u8]) -> Response {
        Response::error(exit_code, String::from_utf8_lossy(output))
    }
}

/// A tool that serves requests. Implement this one method and every front
/// end (one-shot, Bazel, Buck2) can drive the tool. It runs on a pool thread,
/// possibly many requests at once, and should poll `request.cancel` (or sleep
/// through [`CancelToken::sleep`]) during long work.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request) -> Response;

    /// Called once by the front end when the worker stops, after running
    /// requests had their grace period: release what outlives a request
    /// (the bridge's child processes). Bounded; the default does nothing.
    fn shutdown(&self) {}
}

impl<F> Handler for F
where
    F: Fn(&Request) -> Response + Send + Sync + 'static,
{
    fn handle(&self, request: &Request) -> Response {
        self(request)
    }
}

/// Shared flag a front end trips to stop a request. Cloning shares the flag.
/// An optional deadline turns into [`Stop::TimedOut`] without a timer thread:
/// every check compares against it.
#[derive(Debug, Clone)]
pub struct CancelToken {
    inner: Arc<TokenInner>,
}

#[derive(Debug)]
struct TokenInner {
    /// Read on every request, twice: a flag, not a lock.
    cancelled: AtomicBool,
    /// Only for [`CancelToken::sleep`]: held while a sleeper checks the flag
    /// and by `cancel` while it wakes sleepers, so no wake-up is lost.
    sleepers: Mutex<()>,
    wake: Condvar,
    deadline: Mutex<Option<Instant>>,
}

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken::new()
    }
}

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken {
            inner: Arc::new(TokenInner {
                cancelled: AtomicBool::new(false),
                sleepers: Mutex::new(()),
                wake: Condvar::new(),
                deadline: Mutex::new(None),
            }),
        }
    }

    /// Sets a timeout counted from now.
    pub fn set_timeout(&self, timeout: Duration) {
        *lock(&self.inner.deadline) = Instant::now().checked_add(timeout);
    }

    /// When the request times out, if it has a timeout.
    pub fn deadline(&self) -> Option<Instant> {
        *lock(&self.inner.deadline)
    }

    /// Cancels the request and wakes any [`CancelToken::sleep`].
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
        let _sleepers = lock(&self.inner.sleepers);
        self.inner.wake.notify_all();
    }

    /// `Some` once the request was cancelled or ran past its deadline.
    /// Cancellation wins when both happened.
    pub fn stopped(&self) -> Option<Stop> {
        if self.inner.cancelled.load(Ordering::Acquire) {
            return Some(Stop::Cancelled);
        }
        match *lock(&self.inner.deadline) {
            Some(deadline) if Instant::now() >= deadline => Some(Stop::TimedOut),
            _ => None,
        }
    }

    /// Sleeps for `duration` unless the request is stopped first.
    pub fn sleep(&self, duration: Duration) -> Result<(), Stop> {
        let end = Instant::now() + duration;
        let deadline = *lock(&self.inner.deadline);
        let mut sleepers = lock(&self.inner.sleepers);
        loop {
            if self.inner.cancelled.load(Ordering::Acquire) {
                return Err(Stop::Cancelled);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Stop::TimedOut);
            }
            if now >= end {
                return Ok(());
            }
            let until = deadline.map_or(end, |d| d.min(end));
            sleepers = match self.inner.wake.wait_timeout(sleepers, until - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Locks a mutex, ignoring poisoning: the guarded values are plain flags that
/// a panicking handler cannot leave half-written.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn cancel_wakes_a_sleeping_request() {
        let token = CancelToken::new();
        let remote = token.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            // SAFETY: gettid(2) has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let _ = done_tx.send(remote.sleep(Duration::from_secs(60)));
        });
        let tid = tid_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the sleeper thread started");
        // Cancelling before the sleeper waits would pass without any wake-up
        // (sleep checks the flag first), so wait until the kernel reports the
        // thread blocked: its only blocking call is the condition variable.
        wait_until_blocked(tid);
        token.cancel();
        let woke = done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("cancel() did not wake the sleeper within 5 s");
        assert_eq!(woke, Err(Stop::Cancelled));
    }

    /// Waits (bounded) until thread `tid` of this process is in state `S`
    /// (interruptible sleep) in the futex call behind a condition variable.
    fn wait_until_blocked(tid: libc::pid_t) {
        let stat = format!("/proc/self/task/{tid}/stat");
        let wchan = format!("/proc/self/task/{tid}/wchan");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state follows the parenthesised command name.
            let sleeping = state
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('S'));
            // wchan is "0" or unreadable on some kernels; then the state alone
            // has to do.
            let in_futex = std::fs::read_to_string(&wchan)
                .map(|w| w.contains("futex") || w == "0" || w.is_empty())
                .unwrap_or(true);
            if sleeping && in_futex {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "thread {tid} never blocked: {state}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn deadline_ends_sleep_as_timeout() {
        let token = CancelToken::new();
        token.set_timeout(Duration::from_millis(10));
        assert_eq!(token.sleep(Duration::from_secs(60)), Err(Stop::TimedOut));
        assert_eq!(token.stopped(), Some(Stop::TimedOut));
    }

    #[test]
    fn sleep_completes_without_stop() {
        let token = CancelToken::new();
        assert_eq!(token.sleep(Duration::from_millis(1)), Ok(()));
        assert_eq!(token.stopped(), None);
    }

    #[test]
    fn lossy_output_replaces_invalid_utf8() {
        let response = Response::with_output_bytes(3, b"ok \xff\xfe end");
        assert_eq!(response.exit_code, 3);
        assert_eq!(response.output, "ok \u{fffd}\u{fffd} end");
    }
}
