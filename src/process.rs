//! Process-wide facts and set-up that the front ends share: the identity line
//! that starts every response, standard descriptors that are always open,
//! moving stdout out of harm's way when it is the protocol channel, and a log
//! line that cannot panic.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::FromRawFd;

/// Writes one line to stderr, ignoring failure.
///
/// `eprintln!` panics when stderr is gone (a closed pipe gives `EPIPE`); a
/// worker whose log reader died must keep answering requests, so every log
/// line goes through here.
#[macro_export]
macro_rules! elog {
    ($($arg:tt)*) => {
        $crate::process::write_log(::std::format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn write_log(args: std::fmt::Arguments) {
    // One buffer, one write: lines from different threads do not interleave.
    let line = format!("{args}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// Opens `/dev/null` on each of fds 0, 1 and 2 that is closed.
///
/// A parent may start the worker with any of them closed. Left so, the next
/// file or socket the worker opens takes the lowest free number, and a log
/// line or a stray `println!` would then land inside it; stdout
/// protection (`dup2(2, 1)`) would fail outright.
pub fn open_missing_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only asks whether the descriptor exists.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: the path is a valid C string. Lower descriptors are open
        // (checked in order), so open(2) returns `fd` itself; the descriptor
        // is deliberately kept for the life of the process.
        let opened = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if opened >= 0 && opened != fd {
            // SAFETY: moves the descriptor into place and drops the extra.
            unsafe {
                libc::dup2(opened, fd);
                libc::close(opened);
            }
        }
    }
}

/// `<hostname> <pid> <cwd>`, the identity Buck2's example puts in front of
/// every response so a user can tell which worker process served it.
pub fn identity() -> String {
    let cwd = std::env::current_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    format!("{} {} {}", hostname(), std::process::id(), cwd)
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Takes fd 1 for the protocol and points fd 1 at stderr.
///
/// Anything that later writes to "stdout" (a `println!` in a tool, C code, a
/// runtime printing before `main`-level code runs) lands in the log instead of
/// corrupting the framed stream. The returned file is the only way left to
/// reach the real stdout.
pub fn take_stdout_for_protocol() -> io::Result<File> {
    // SAFETY: plain descriptor calls; the new descriptor is owned by the File.
    unsafe {
        let private = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if private < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::dup2(2, 1) < 0 {
            let err = io::Error::last_os_error();
            libc::close(private);
            return Err(err);
        }
        Ok(File::from_raw_fd(private))
    }
}

#[cfg(test)]
mod tests {
    /// Rust's own start-up already reopens fds 0-2 for a Rust `main`, so an
    /// end-to-end test cannot tell whether this function works; a forked
    /// child closes them after start-up and checks them itself.
    #[test]
    fn closed_std_fds_are_reopened_on_dev_null() {
        // SAFETY: the child makes only async-signal-safe calls and exits
        // with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut ok = true;
            unsafe {
                libc::close(0);
                libc::close(2);
                super::open_missing_std_fds();
                for fd in [0, 2] {
                    let mut buf = [0u8; 64];
                    let path = if fd == 0 {
                        c"/proc/self/fd/0"
                    } else {
                        c"/proc/self/fd/2"
                    };
                    let n = libc::readlink(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
                    ok &= n > 0 && buf[..n as usize] == *b"/dev/null";
                }
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "fds 0 and 2 not reopened on /dev/null (status {status})"
        );
    }
}
