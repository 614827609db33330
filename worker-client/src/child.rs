//! The worker process: starting it, keeping the end of its stderr for error
//! messages, and saying how it ended.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};

use crate::Failure;

/// Enough stderr to show why a worker died without holding a chatty
/// worker's whole log in memory.
const KEEP_BYTES: usize = 16 * 1024;

/// A shell-like rendering of a command line, for messages.
pub fn show_command(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=./:@,+%{}".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Spawns `command` as the leader of its own process group, as Buck2 does,
/// so that a worker run through a shell script can be ended whole. A
/// missing program is the most common mistake, so the message names it.
pub fn spawn(mut command: Command, argv: &[String]) -> Result<Child, Failure> {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    command.spawn().map_err(|e| {
        Failure::Worker(format!(
            "cannot start the worker `{}`: {e}",
            show_command(argv)
        ))
    })
}

/// The last bytes of a stream, kept by a thread that reads it to the end.
pub struct Tail {
    kept: Arc<Mutex<TailBuf>>,
    done: Receiver<()>,
}

#[derive(Default)]
struct TailBuf {
    bytes: VecDeque<u8>,
    dropped: bool,
}

impl Tail {
    /// Reads `stream` on a thread; with `echo`, copies it to our stderr too.
    pub fn capture(mut stream: impl Read + Send + 'static, echo: bool) -> Tail {
        let kept = Arc::new(Mutex::new(TailBuf::default()));
        let (done_tx, done) = bounded(1);
        let sink = Arc::clone(&kept);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                if echo {
                    let _ = std::io::stderr().write_all(&chunk[..n]);
                }
                let mut buf = match sink.lock() {
                    Ok(buf) => buf,
                    Err(poisoned) => poisoned.into_inner(),
                };
                buf.bytes.extend(&chunk[..n]);
                while buf.bytes.len() > KEEP_BYTES {
                    buf.bytes.pop_front();
                    buf.dropped = true;
                }
            }
            let _ = done_tx.send(());
        });
        Tail { kept, done }
    }

    /// The kept text, after waiting up to `wait` for the stream to end (a
    /// worker that just exited may still have bytes in the pipe).
    pub fn text(&self, wait: Duration) -> String {
        let _ = self.done.recv_timeout(wait);
        let buf = match self.kept.lock() {
            Ok(buf) => buf,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (front, back) = buf.bytes.as_slices();
        let mut bytes = front.to_vec();
        bytes.extend_from_slice(back);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if buf.dropped {
            format!("[... earlier output dropped ...]\n{text}")
        } else {
            text
        }
    }
}

/// `label` and `text` indented as a block, or a note that it was empty.
pub fn block(label: &str, text: &str) -> String {
    let text = text.trim_end();
    if text.is_empty() {
        return format!("\n{label}: (empty)");
    }
    let mut out = format!("\n{label}:");
    for line in text.lines() {
        out.push_str("\n  ");
        out.push_str(line);
    }
    out
}

pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended ({status})"),
    }
}

/// Waits up to `limit` for the child to exit. Polling is what keeps this
/// bounded: `Child::wait` has no timeout.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(2)),
            _ => return None,
        }
    }
}

/// Waits up to `limit` for a worker that was asked to stop (`when`, e.g. "on
/// SIGTERM"), kills it if it does not, and says how it ended. `logs` is
/// appended when the exit was not clean.
pub fn stop_report(
    child: &mut Child,
    limit: Duration,
    when: &str,
    logs: impl FnOnce() -> String,
) -> String {
    match wait_exit(child, limit) {
        Some(status) if status.success() => format!("the worker exited cleanly {when}"),
        Some(status) => format!("warning: the worker {} {when}{}", describe(status), logs()),
        None => {
            kill(child);
            format!(
                "warning: the worker did not exit within {:.1} s {when}; killed it",
                limit.as_secs_f64()
            )
        }
    }
}

/// Ends a child we started, with its process group (see [`spawn`]), and
/// reaps it, so neither it nor a helper it started outlives us.
pub fn kill(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // The group is only signalled while its leader is unreaped, so the id
    // cannot have been reused by then.
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: sends a signal; no memory is involved.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    child.wait().ok()
}
