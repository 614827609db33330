//! Argument-file expansion: `@file`, `--flagfile=file`, `-flagfile=file` and
//! `--flagfile file` become the file's lines, one argument per line.
//!
//! Bazel expands `@file` itself but passes `--flagfile=` through, Buck2 sends
//! one unexpanded `@argfile`, and a remote executor does either: so every
//! front end expands here, on the pool thread that runs the request.
//! Relative names, including names found inside argument files, resolve
//! against the request's working directory (its sandbox, when it has one).

use std::fmt;
use std::path::{Path, PathBuf};

/// Deeper nesting than this is almost surely a generator bug; stop early with
/// a message instead of recursing until the stack runs out.
pub const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgfileError {
    /// The file could not be read (missing, a directory, no permission).
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
                "cannot read argument file '{name}' ({}): {reason}",
                path.display()
            ),
            ArgfileError::NotUtf8 { name } => {
                write!(f, "argument file '{name}' is not valid UTF-8")
            }
            ArgfileError::Cycle { chain } => {
                write!(
                    f,
                    "argument files include each other: {}",
                    chain.join(" -> ")
                )
            }
            ArgfileError::TooDeep { name } => write!(
                f,
                "argument file '{name}' is nested more than {MAX_DEPTH} levels deep"
            ),
            ArgfileError::MissingName { flag } => {
                write!(f, "'{flag}' needs an argument file name after it")
            }
        }
    }
}

impl std::error::Error for ArgfileError {}

/// Expands every argument file in `args`, recursively.
pub fn expand(args: &[String], base: &Path) -> Result<Vec<String>, ArgfileError> {
    let mut out = Vec::with_capacity(args.len());
    let mut stack = Vec::new();
    expand_into(args.iter().map(String::as_str), base, &mut stack, &mut out)?;
    Ok(out)
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

fn expand_into<'a>(
    args: impl Iterator<Item = &'a str>,
    base: &Path,
    stack: &mut Vec<(String, PathBuf)>,
    out: &mut Vec<String>,
) -> Result<(), ArgfileError> {
    let mut args = args;
    while let Some(arg) = args.next() {
        match classify(arg) {
            Arg::Literal(literal) => out.push(literal.to_owned()),
            Arg::File(name) => expand_file(name, base, stack, out)?,
            Arg::FileInNext(flag) => match args.next() {
                Some(name) => expand_file(name, base, stack, out)?,
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

fn expand_file(
    name: &str,
    base: &Path,
    stack: &mut Vec<(String, PathBuf)>,
    out: &mut Vec<String>,
) -> Result<(), ArgfileError> {
    let path = base.join(name);
    // Canonical paths make `a` and `./a` the same file for cycle detection.
    let identity = path.canonicalize().unwrap_or_else(|_| path.clone());
    if let Some(start) = stack.iter().position(|(_, p)| *p == identity) {
        let mut chain: Vec<String> = stack[start..].iter().map(|(n, _)| n.clone()).collect();
        chain.push(name.to_owned());
        return Err(ArgfileError::Cycle { chain });
    }
    if stack.len() >= MAX_DEPTH {
        return Err(ArgfileError::TooDeep {
            name: name.to_owned(),
        });
    }
    let bytes = std::fs::read(&path).map_err(|e| ArgfileError::Read {
        name: name.to_owned(),
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|_| ArgfileError::NotUtf8 {
        name: name.to_owned(),
    })?;
    stack.push((name.to_owned(), identity));
    let result = expand_into(lines(&text), base, stack, out);
    stack.pop();
    result
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
}
