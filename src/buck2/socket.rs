//! The Unix socket named by `WORKER_SOCKET`: checking the path before
//! binding, turning it into a gRPC address (also when it is longer than the
//! kernel's limit), binding with mode 0600, and removing it at exit.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why the socket could not be set up; every case exits with code 2.
#[derive(Debug)]
pub struct SocketError(pub String);

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Makes `path` ready to bind: its directory must exist, and whatever is at
/// the path must be a socket (a stale one from an earlier worker), which is
/// removed. Anything else there is someone's data, so it is left alone.
pub fn prepare(path: &Path) -> Result<(), SocketError> {
    let shown = path.display();
    if path.as_os_str().is_empty() {
        return Err(SocketError("WORKER_SOCKET is empty".to_owned()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SocketError(format!(
                "cannot create socket {shown}: {} is not a directory",
                parent.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SocketError(format!(
                "cannot create socket {shown}: directory {} does not exist",
                parent.display()
            )))
        }
        Err(e) => {
            return Err(SocketError(format!(
                "cannot create socket {shown}: cannot inspect {}: {e}",
                parent.display()
            )))
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| SocketError(format!("cannot replace stale socket {shown}: {e}"))),
        Ok(m) => Err(SocketError(format!(
            "refusing to use {shown} as the worker socket: it exists and is {}, not a socket",
            describe(&m.file_type())
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SocketError(format!("cannot inspect {shown}: {e}"))),
    }
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_file() {
        "a regular file"
    } else if kind.is_fifo() {
        "a FIFO"
    } else {
        "a special file"
    }
}

/// A gRPC `unix:` address for a socket path.
pub struct Address {
    pub uri: String,
    /// For paths over [`MAX_SOCKET_PATH`]: the socket's directory, opened so
    /// the address can name it as `/proc/self/fd/N/<name>`, which the kernel
    /// resolves without the length limit applying to the full path. It must
    /// stay open while the address is in use.
    pub dir: Option<OwnedFd>,
}

impl Address {
    pub fn for_path(path: &Path) -> io::Result<Address> {
        let bytes = path.as_os_str().as_bytes();
        if bytes.len() <= MAX_SOCKET_PATH {
            let text = path.to_str().ok_or_else(|| not_utf8(path))?;
            return Ok(Address {
                uri: format!("unix:{text}"),
                dir: None,
            });
        }
        let name = path
            .file_name()
            .ok_or_else(|| invalid(format!("{} does not name a file", path.display())))?;
        let name = name.to_str().ok_or_else(|| not_utf8(path))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = open_dir(parent)?;
        let short = format!("/proc/self/fd/{}/{name}", raw(&dir));
        if short.len() > MAX_SOCKET_PATH || !Path::new("/proc/self/fd").is_dir() {
            return Err(invalid(format!(
                "socket path {} is {} bytes, over the Unix socket limit of {MAX_SOCKET_PATH}, \
                 and cannot be shortened here",
                path.display(),
                bytes.len()
            )));
        }
        Ok(Address {
            uri: format!("unix:{short}"),
            dir: Some(dir),
        })
    }
}

fn raw(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| invalid(format!("{} contains a NUL byte", dir.display())))?;
    // SAFETY: a valid C string; the returned descriptor is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot open {}: {e}", dir.display()),
        ));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn not_utf8(path: &Path) -> io::Error {
    invalid(format!(
        "socket path {} is not valid UTF-8, which gRPC addresses require",
        path.display()
    ))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Runs `bind` with the process umask at 0177, so the socket is created with
/// mode 0600 and no other user can ever connect, not even briefly between a
/// bind and a chmod.
pub fn with_private_umask<T>(bind: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let result = bind();
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    result
}

/// The socket this process created, remembered by inode so that removing it
/// at exit cannot delete a socket some later worker put at the same path.
pub struct Bound {
    pub path: PathBuf,
    id: Option<(u64, u64)>,
}

impl Bound {
    pub fn new(path: &Path) -> Bound {
        let id = std::fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| (m.dev(), m.ino()));
        Bound {
            path: path.to_path_buf(),
            id,
        }
    }

    pub fn remove(&self) {
        let Ok(m) = std::fs::symlink_metadata(&self.path) else {
            return;
        };
        if m.file_type().is_socket() && self.id == Some((m.dev(), m.ino())) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                crate::elog!(
                    "persistent-worker: cannot remove socket {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_paths_are_used_as_they_are() {
        let a = Address::for_path(Path::new("/tmp/x/socket")).unwrap();
        assert_eq!(a.uri, "unix:/tmp/x/socket");
        assert!(a.dir.is_none());
    }

    #[test]
    fn long_paths_go_through_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("d".repeat(120));
        std::fs::create_dir(&deep).unwrap();
        let a = Address::for_path(&deep.join("socket")).unwrap();
        assert!(a.uri.starts_with("unix:/proc/self/fd/"), "{}", a.uri);
        assert!(a.uri.ends_with("/socket"));
        assert!(a.dir.is_some());
    }

    #[test]
    fn prepare_refuses_non_sockets_and_missing_directories() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, "data").unwrap();
        let e = prepare(&file).unwrap_err();
        assert!(e.0.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
        let e = prepare(&d.path().join("missing/socket")).unwrap_err();
        assert!(e.0.contains("does not exist"), "{e}");
        assert!(prepare(&d.path().join("fresh")).is_ok());
    }
}
