//! The protocol-independent request model: what every front end turns its wire
//! message into ([`Request`]), what comes back ([`Response`]), the one trait a
//! tool implements to become a worker ([`Handler`]), and the cancellation
//! token that lets a front end stop a request that is already running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One unit of work, as the handler sees it: every front end (a Bazel
/// `WorkRequest`, a Buck2 `ExecuteCommand`, one-shot's argv) is turned into
/// one of these before it reaches the pool, so a [`Handler`] never sees a
/// protocol.
///
/// A handler reads `args` and resolves the paths they name with
/// [`Request::resolve`], never against the process's own directory: under
/// Bazel's multiplex sandboxing each request has a directory of its own.
///
/// ```
/// use std::path::PathBuf;
/// use persistent_worker::request::Request;
///
/// let request = Request::new(vec!["out/a.txt".into()], PathBuf::from("/work/sandbox/1"));
/// assert_eq!(request.args, ["out/a.txt"]);
/// assert_eq!(request.resolve("out/a.txt"), PathBuf::from("/work/sandbox/1/out/a.txt"));
/// // A front end trips the token; the handler sees it through `stopped`.
/// assert_eq!(request.cancel.stopped(), None);
/// ```
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
    /// A request with no env, verbosity 0, no id and no timeout: what a
    /// front end starts from, and what a test of a handler needs.
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

    /// Resolves a path named by this request against its working directory
    /// ([`Request::workdir`]); an absolute path stays as it is.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        self.workdir.join(path)
    }
}

/// Why a request stopped early: what [`CancelToken::stopped`] and
/// [`CancelToken::sleep`] report, and what [`Response::stopped`] turns into
/// the protocol's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The client cancelled the request (a Bazel `cancel`, a dropped Buck2
    /// call, a Buck2 `Exec` cancel event) or the worker is shutting down.
    Cancelled,
    /// The request's deadline (Buck2's `timeout_s`) passed.
    TimedOut,
}

/// The outcome of one request, as a [`Handler`] returns it; each front end
/// writes it back in its own wire form (Bazel's `WorkResponse`, Buck2's
/// `ExecuteResponse`, one-shot's stderr and exit code).
///
/// ```
/// use persistent_worker::request::{Response, Stop};
///
/// let done = Response::ok("demo: wrote out/a.txt\n");
/// assert_eq!((done.exit_code, done.cancelled), (0, false));
///
/// let usage = Response::error(2, "expected exactly one OUTFILE\n");
/// assert_eq!(usage.exit_code, 2);
///
/// // A tool that stopped because its token tripped says why.
/// let late = Response::stopped(Stop::TimedOut, "stopped before writing out/a.txt\n");
/// assert!(late.timed_out && late.exit_code != 0);
///
/// // Tool output is bytes; invalid UTF-8 does not fail the response.
/// let raw = Response::with_output_bytes(1, b"caf\xe9\n");
/// assert_eq!(raw.output, "caf\u{fffd}\n");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The tool's exit code: 0 is success, as for a process.
    pub exit_code: i32,
    /// Text for the user: Bazel's `output`, Buck2's `stderr`.
    pub output: String,
    /// The handler stopped because the request was cancelled.
    pub cancelled: bool,
    /// The handler stopped because the request's timeout passed.
    pub timed_out: bool,
}

impl Response {
    /// Success (exit code 0) with `output` for the user.
    pub fn ok(output: impl Into<String>) -> Response {
        Response {
            output: output.into(),
            ..Response::default()
        }
    }

    /// Failure with `exit_code` (which should not be 0) and `output` saying
    /// why.
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
///
/// A panic in `handle` does not kill the worker: the pool turns it into an
/// error response for that request. A closure `Fn(&Request) -> Response` is a
/// handler too. [`crate::modes::run_main`] gives a handler all the modes.
///
/// ```
/// use std::path::PathBuf;
/// use std::time::Duration;
/// use persistent_worker::request::{Handler, Request, Response};
///
/// /// Writes its one argument's file name into that file, slowly.
/// struct Touch;
///
/// impl Handler for Touch {
///     fn handle(&self, request: &Request) -> Response {
///         let [outfile] = request.args.as_slice() else {
///             return Response::error(2, "usage: OUTFILE\n");
///         };
///         // Long work sleeps through the token, so a cancel or the
///         // request's timeout ends it at once.
///         if let Err(stop) = request.cancel.sleep(Duration::from_millis(1)) {
///             return Response::stopped(stop, "stopped\n");
///         }
///         match std::fs::write(request.resolve(outfile), format!("{outfile}\n")) {
///             Ok(()) => Response::ok(format!("wrote {outfile}\n")),
///             Err(e) => Response::error(1, format!("{outfile}: {e}\n")),
///         }
///     }
/// }
///
/// let dir = std::env::temp_dir();
/// let bad = Touch.handle(&Request::new(vec![], dir.clone()));
/// assert_eq!(bad.exit_code, 2);
///
/// let cancelled = Request::new(vec!["never.txt".into()], dir);
/// cancelled.cancel.cancel();
/// assert!(Touch.handle(&cancelled).cancelled);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Serves one request. Called on a pool thread, concurrently with other
    /// requests up to `--concurrency`; the response goes back to the client
    /// that sent the request.
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
///
/// ```
/// use std::time::Duration;
/// use persistent_worker::request::{CancelToken, Stop};
///
/// let token = CancelToken::new();
/// let front_end = token.clone();
/// assert_eq!(token.sleep(Duration::from_millis(1)), Ok(()));
/// front_end.cancel();
/// assert_eq!(token.stopped(), Some(Stop::Cancelled));
/// assert_eq!(token.sleep(Duration::from_secs(60)), Err(Stop::Cancelled));
/// ```
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
    /// A token that is not cancelled and has no deadline.
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
