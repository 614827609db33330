//! Argument-file expansion: `@file`, `--flagfile=file`, `-flagfile=file` and
//! `--flagfile file` become the file's lines, one argument per line.
//!
//! Bazel expands `@file` itself but passes `--flagfile=` through, Buck2 sends
//! one unexpanded `@argfile`, and a remote executor does either: so every
//! front end expands here, on the pool thread that runs the request.
//! Relative names, including names found inside argument files, resolve
//! against the request's working directory (its sandbox, when it has one).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::quote::quoted;

/// Deeper nesting than this is almost surely a generator bug; stop early with
/// a message instead of recursing until the stack runs out.
pub const MAX_DEPTH: usize = 16;

/// Default of `--max-argfile-bytes`.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

static MAX_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_BYTES);

/// Sets the byte budget [`expand`] uses from now on (`--max-argfile-bytes`,
/// set once at start-up, before any request runs).
pub fn set_max_bytes(max: usize) {
    MAX_BYTES.store(max, Ordering::Relaxed);
}

/// What one expansion may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes read from all argument files of one expansion together: a small
    /// file included many times over, level after level, would otherwise
    /// multiply into an unbounded argument list.
    pub max_bytes: usize,
    pub max_depth: usize,
}

impl Limits {
    /// The process's limits: [`set_max_bytes`] and [`MAX_DEPTH`].
    pub fn current() -> Limits {
        Limits {
            max_bytes: MAX_BYTES.load(Ordering::Relaxed),
            max_depth: MAX_DEPTH,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgfileError {
    /// The file could not be opened or read (missing, no permission, a
    /// symlink loop).
    Read {
        name: String,
        path: PathBuf,
        reason: String,
    },
    /// The file is not UTF-8, and both protocols carry arguments as strings.
    NotUtf8 {
        name: String,
    },
    /// A file includes itself, directly or through others.
    Cycle {
        chain: Vec<String>,
    },
    TooDeep {
        name: String,
        max: usize,
    },
    /// Not a regular file: reading a FIFO, a device or a socket could block
    /// or never end.
    NotAFile {
        name: String,
        kind: &'static str,
    },
    /// The argument files of one request hold more than the byte budget.
    TooLarge {
        name: String,
        max: usize,
    },
    /// `--flagfile` was the last argument.
    MissingName {
        flag: String,
    },
}

impl fmt::Display for ArgfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgfileError::Read { name, path, reason } => write!(
                f,
                "cannot read argument file '{}' ({}): {reason}",
                quoted(name),
                quoted(&path.to_string_lossy())
            ),
            ArgfileError::NotUtf8 { name } => {
                write!(f, "argument file '{}' is not valid UTF-8", quoted(name))
            }
            ArgfileError::Cycle { chain } => {
                write!(f, "argument files include each other: ")?;
                for (i, name) in chain.iter().enumerate() {
                    let arrow = if i == 0 { "" } else { " -> " };
                    write!(f, "{arrow}{}", quoted(name))?;
                }
                Ok(())
            }
            ArgfileError::TooDeep { name, max } => write!(
                f,
                "argument file '{}' is nested more than {max} levels deep",
                quoted(name)
            ),
            ArgfileError::NotAFile { name, kind } => write!(
                f,
                "argument file '{}' is a {kind}, not a regular file",
                quoted(name)
            ),
            ArgfileError::TooLarge { name, max } => write!(
                f,
                "argument file '{}' takes the argument files of this request past \
                 {max} bytes (--max-argfile-bytes)",
                quoted(name)
            ),
            ArgfileError::MissingName { flag } => {
                write!(f, "'{flag}' needs an argument file name after it")
            }
        }
    }
}

impl std::error::Error for ArgfileError {}

/// Expands every argument file in `args`, recursively, within the process's
/// [`Limits::current`].
pub fn expand(args: &[String], base: &Path) -> Result<Vec<String>, ArgfileError> {
    expand_with(args, base, Limits::current())
}

/// [`expand`] for arguments the caller owns: when none of them names an
/// argument file, they are handed back as they are, without a copy, which is
/// every request of a client that does not use argument files.
pub fn expand_owned(args: Vec<String>, base: &Path) -> Result<Vec<String>, ArgfileError> {
    let plain = |arg: &String| matches!(classify(arg), Arg::Literal(l) if l.len() == arg.len());
    if args.iter().all(plain) {
        return Ok(args);
    }
    expand(&args, base)
}

/// [`expand`] within explicit limits.
pub fn expand_with(
    args: &[String],
    base: &Path,
    limits: Limits,
) -> Result<Vec<String>, ArgfileError> {
    let mut out = Vec::with_capacity(args.len());
    let mut state = State {
        base,
        limits,
        stack: Vec::new(),
        read: 0,
    };
    state.expand_into(args.iter().map(String::as_str), &mut out)?;
    Ok(out)
}

/// One expansion in progress.
struct State<'b> {
    base: &'b Path,
    limits: Limits,
    /// Files being expanded, outermost first: name as written, identity.
    stack: Vec<(String, PathBuf)>,
    /// Bytes read so far, against `limits.max_bytes`.
    read: usize,
}

/// Protects arguments that are already expanded from a second expansion: a
/// literal `@x` (which came from `@@x`) goes back to `@@x`.
pub fn escape(args: Vec<String>) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            if a.starts_with('@') {
                format!("@{a}")
            } else {
                a
            }
        })
        .collect()
}

/// What one argument asks for.
enum Arg<'a> {
    Literal(&'a str),
    File(&'a str),
    /// `--flagfile` / `-flagfile` with the name in the next argument.
    FileInNext(&'a str),
}

fn classify(arg: &str) -> Arg<'_> {
    if let Some(rest) = arg.strip_prefix("@@") {
        return Arg::Literal(&arg[arg.len() - rest.len() - 1..]);
    }
    if let Some(name) = arg.strip_prefix('@').filter(|n| !n.is_empty()) {
        return Arg::File(name);
    }
    for flag in ["--flagfile", "-flagfile"] {
        if arg == flag {
            return Arg::FileInNext(flag);
        }
        if let Some(name) = arg
            .strip_prefix(flag)
            .and_then(|r| r.strip_prefix('='))
            .filter(|n| !n.is_empty())
        {
            return Arg::File(name);
        }
    }
    Arg::Literal(arg)
}

impl State<'_> {
    fn expand_into<'a>(
        &mut self,
        mut args: impl Iterator<Item = &'a str>,
        out: &mut Vec<String>,
    ) -> Result<(), ArgfileError> {
        while let Some(arg) = args.next() {
            match classify(arg) {
                Arg::Literal(literal) => out.push(literal.to_owned()),
                Arg::File(name) => self.expand_file(name, out)?,
                Arg::FileInNext(flag) => match args.next() {
                    Some(name) => self.expand_file(name, out)?,
                    None => {
                        return Err(ArgfileError::MissingName {
                            flag: flag.to_owned(),
                        })
                    }
                },
            }
        }
        Ok(())
    }

    fn expand_file(&mut self, name: &str, out: &mut Vec<String>) -> Result<(), ArgfileError> {
        let path = self.base.join(name);
        // Canonical paths make `a` and `./a` the same file for cycle detection.
        let identity = path.canonicalize().unwrap_or_else(|_| path.clone());
        if let Some(start) = self.stack.iter().position(|(_, p)| *p == identity) {
            let mut chain: Vec<String> =
                self.stack[start..].iter().map(|(n, _)| n.clone()).collect();
            chain.push(name.to_owned());
            return Err(ArgfileError::Cycle { chain });
        }
        if self.stack.len() >= self.limits.max_depth {
            return Err(ArgfileError::TooDeep {
                name: name.to_owned(),
                max: self.limits.max_depth,
            });
        }
        let budget = self.limits.max_bytes - self.read;
        let bytes = read_bounded(&path, budget).map_err(|e| match e {
            ReadError::Io(e) => ArgfileError::Read {
                name: name.to_owned(),
                path: path.clone(),
                reason: e.to_string(),
            },
            ReadError::NotAFile(kind) => ArgfileError::NotAFile {
                name: name.to_owned(),
                kind,
            },
            ReadError::TooLarge => ArgfileError::TooLarge {
                name: name.to_owned(),
                max: self.limits.max_bytes,
            },
        })?;
        self.read += bytes.len();
        let text = String::from_utf8(bytes).map_err(|_| ArgfileError::NotUtf8 {
            name: name.to_owned(),
        })?;
        self.stack.push((name.to_owned(), identity));
        let result = self.expand_into(lines(&text), out);
        self.stack.pop();
        result
    }
}

enum ReadError {
    Io(std::io::Error),
    NotAFile(&'static str),
    TooLarge,
}

/// Reads a regular file of at most `budget` bytes.
///
/// `O_NONBLOCK` makes opening a FIFO return at once instead of waiting for a
/// writer (and is harmless for regular files); the type is then checked on
/// the opened descriptor, so a file swapped in after the check is never the
/// one read. Symlinks are followed: build tools link inputs into sandboxes.
fn read_bounded(path: &Path, budget: usize) -> Result<Vec<u8>, ReadError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(ReadError::Io)?;
    let kind = file.metadata().map_err(ReadError::Io)?.file_type();
    if !kind.is_file() {
        return Err(ReadError::NotAFile(describe(kind)));
    }
    let mut bytes = Vec::new();
    // One byte past the budget tells "exactly full" from "too large"; the
    // file's own size is not trusted, it may grow while being read.
    let limit = u64::try_from(budget).unwrap_or(u64::MAX).saturating_add(1);
    Read::take(&file as &File, limit)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() > budget {
        return Err(ReadError::TooLarge);
    }
    Ok(bytes)
}

fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// One argument per line; `\r\n` endings count as `\n`, and the newline that
/// ends the last line does not start another (empty) argument.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let empty = text.is_empty();
    body.split('\n')
        .filter(move |_| !empty)
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).expect("write argfile");
    }

    #[test]
    fn plain_arguments_pass_through() {
        let d = dir();
        let args = strings(&["a", "-x", "--flag=1", "@", "--flagfile="]);
        assert_eq!(expand(&args, d.path()).unwrap(), args);
    }

    #[test]
    fn owned_arguments_expand_alike_and_plain_ones_are_not_copied() {
        let d = dir();
        write(d.path(), "f", "x\n");
        for form in [
            vec!["a", "-x", "--flag=1", "@", "--flagfile="],
            vec!["a", "@f", "b"],
            vec!["@@f"],
            vec!["--flagfile=f"],
            vec!["-flagfile", "f"],
            vec!["--flagfile"],
        ] {
            let args = strings(&form);
            let by_copy = expand(&args, d.path()).map_err(|e| e.to_string());
            let owned = expand_owned(args, d.path()).map_err(|e| e.to_string());
            assert_eq!(owned, by_copy, "form {form:?}");
        }
        let plain = strings(&["a", "--flag=1", "@"]);
        let buffer = plain.as_ptr();
        let kept = expand_owned(plain, d.path()).unwrap();
        assert_eq!(kept.as_ptr(), buffer, "plain arguments were copied");
    }

    #[test]
    fn at_file_expands_one_argument_per_line() {
        let d = dir();
        write(d.path(), "args", "one\ntwo words\n\nfour\n");
        let got = expand(&strings(&["first", "@args", "last"]), d.path()).unwrap();
        assert_eq!(
            got,
            strings(&["first", "one", "two words", "", "four", "last"])
        );
    }

    #[test]
    fn all_flagfile_spellings_expand() {
        let d = dir();
        write(d.path(), "f", "x\n");
        for form in [
            vec!["--flagfile=f"],
            vec!["-flagfile=f"],
            vec!["--flagfile", "f"],
            vec!["-flagfile", "f"],
            vec!["@f"],
        ] {
            let got = expand(&strings(&form), d.path()).unwrap();
            assert_eq!(got, strings(&["x"]), "form {form:?}");
        }
    }

    #[test]
    fn crlf_and_missing_final_newline() {
        let d = dir();
        write(d.path(), "crlf", "a\r\nb\r\n");
        write(d.path(), "nofinal", "c\nd");
        write(d.path(), "empty", "");
        write(d.path(), "blank", "\n");
        let got = expand(
            &strings(&["@crlf", "@nofinal", "@empty", "@blank"]),
            d.path(),
        )
        .unwrap();
        assert_eq!(got, strings(&["a", "b", "c", "d", ""]));
    }

    #[test]
    fn double_at_is_a_literal_at_argument() {
        let d = dir();
        write(d.path(), "inner", "@@from-file\n");
        let got = expand(&strings(&["@@literal", "@inner"]), d.path()).unwrap();
        assert_eq!(got, strings(&["@literal", "@from-file"]));
    }

    #[test]
    fn escape_undoes_one_expansion() {
        let d = dir();
        write(d.path(), "f", "@@x\nplain\n");
        let once = expand(&strings(&["@f"]), d.path()).unwrap();
        let twice = expand(&escape(once.clone()), d.path()).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn nested_files_resolve_against_the_base_dir() {
        let d = dir();
        fs::create_dir(d.path().join("sub")).unwrap();
        write(d.path(), "sub/outer", "a\n--flagfile=sub/inner\nz\n");
        write(d.path(), "sub/inner", "b\n-flagfile=sub/deepest\n");
        write(d.path(), "sub/deepest", "c\n");
        let got = expand(&strings(&["@sub/outer"]), d.path()).unwrap();
        assert_eq!(got, strings(&["a", "b", "c", "z"]));
    }

    #[test]
    fn same_file_twice_is_not_a_cycle() {
        let d = dir();
        write(d.path(), "f", "x\n");
        let got = expand(&strings(&["@f", "@f"]), d.path()).unwrap();
        assert_eq!(got, strings(&["x", "x"]));
    }

    #[test]
    fn cycles_are_reported_with_their_chain() {
        let d = dir();
        write(d.path(), "a", "@b\n");
        write(d.path(), "b", "@./a\n");
        let err = expand(&strings(&["@a"]), d.path()).unwrap_err();
        assert_eq!(
            err,
            ArgfileError::Cycle {
                chain: strings(&["a", "b", "./a"])
            }
        );
        assert!(err.to_string().contains("a -> b -> ./a"), "{err}");
    }

    #[test]
    fn depth_is_limited() {
        let d = dir();
        for i in 0..=MAX_DEPTH {
            write(d.path(), &format!("f{i}"), &format!("@f{}\n", i + 1));
        }
        write(d.path(), &format!("f{}", MAX_DEPTH + 1), "end\n");
        // f1..f17 is one file more than the limit; f2..f17 fits exactly.
        let err = expand(&strings(&["@f1"]), d.path()).unwrap_err();
        assert!(matches!(err, ArgfileError::TooDeep { .. }), "{err:?}");
        assert!(
            err.to_string().contains("nested more than 16 levels"),
            "{err}"
        );
        let got = expand(&strings(&["@f2"]), d.path()).unwrap();
        assert_eq!(got, strings(&["end"]));
    }

    #[test]
    fn missing_file_names_the_file_and_the_reason() {
        let d = dir();
        let err = expand(&strings(&["@nope"]), d.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("'nope'") && text.contains("No such file"),
            "{text}"
        );
    }

    #[test]
    fn invalid_utf8_and_dangling_flag_are_errors() {
        let d = dir();
        fs::write(d.path().join("bin"), b"\xff\xfe\n").unwrap();
        let err = expand(&strings(&["@bin"]), d.path()).unwrap_err();
        assert_eq!(err, ArgfileError::NotUtf8 { name: "bin".into() });
        let err = expand(&strings(&["--flagfile"]), d.path()).unwrap_err();
        assert_eq!(
            err,
            ArgfileError::MissingName {
                flag: "--flagfile".into()
            }
        );
    }

    fn limits(max_bytes: usize) -> Limits {
        Limits {
            max_bytes,
            max_depth: MAX_DEPTH,
        }
    }

    #[test]
    fn special_files_are_refused_by_kind() {
        let d = dir();
        fs::create_dir(d.path().join("a-dir")).unwrap();
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (arg, kind) in [
            ("@a-dir", "directory"),
            // Opening a FIFO without a writer would block; it must not.
            ("@fifo", "FIFO"),
            ("@/dev/zero", "character device"),
        ] {
            let err = expand(&strings(&[arg]), d.path()).unwrap_err();
            assert!(
                matches!(&err, ArgfileError::NotAFile { kind: k, .. } if *k == kind),
                "{arg}: {err:?}"
            );
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }

    #[test]
    fn byte_budget_counts_exactly() {
        let d = dir();
        write(d.path(), "ten", "123456789\n");
        assert_eq!(
            expand_with(&strings(&["@ten"]), d.path(), limits(10)).unwrap(),
            ["123456789"]
        );
        let err = expand_with(&strings(&["@ten"]), d.path(), limits(9)).unwrap_err();
        assert_eq!(
            err,
            ArgfileError::TooLarge {
                name: "ten".into(),
                max: 9
            }
        );
        assert!(err.to_string().contains("--max-argfile-bytes"), "{err}");
    }

    #[test]
    fn byte_budget_covers_repeated_inclusion() {
        // Each level includes the next ten times: 10^6 leaves from 62 bytes
        // of files, unless the budget counts every inclusion.
        let d = dir();
        write(d.path(), "l0", "leaf\n");
        for level in 1..=6 {
            write(
                d.path(),
                &format!("l{level}"),
                &format!("@l{}\n", level - 1).repeat(10),
            );
        }
        let err = expand_with(&strings(&["@l6"]), d.path(), limits(1 << 16)).unwrap_err();
        assert!(matches!(err, ArgfileError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn symlinks_are_followed_and_loops_reported() {
        let d = dir();
        write(d.path(), "real", "x\n");
        std::os::unix::fs::symlink("real", d.path().join("link")).unwrap();
        assert_eq!(expand(&strings(&["@link"]), d.path()).unwrap(), ["x"]);
        std::os::unix::fs::symlink("loop-b", d.path().join("loop-a")).unwrap();
        std::os::unix::fs::symlink("loop-a", d.path().join("loop-b")).unwrap();
        let err = expand(&strings(&["@loop-a"]), d.path()).unwrap_err();
        assert!(
            err.to_string().contains("symbolic links"),
            "ELOOP expected: {err}"
        );
    }

    #[test]
    fn a_huge_missing_name_gives_a_short_message() {
        let d = dir();
        let name = "n".repeat(4 << 20);
        let err = expand(&[format!("@{name}")], d.path()).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 1000, "{} bytes", text.len());
        assert!(text.contains(&format!("({} bytes)", 4 << 20)), "{text}");
    }
}
