//! Process-wide facts and set-up that the front ends share: the identity line
//! that starts every response, and moving stdout out of harm's way when it is
//! the protocol channel.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

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
