//! A BuildBuddy-style remote executor: the action's command line is split
//! into the worker's own arguments and its flagfiles; the worker starts once
//! with `--persistent_worker` appended; each action becomes one singleplex
//! request (id 0) whose arguments are the `@` files expanded here.
//!
//! Only `@file` is expanded: `@@x` and `--flagfile=`/`-flagfile=` go to the
//! worker as they are, so a worker that forgets to expand those itself is
//! caught. The library's `argfile::expand` expands every spelling, which is
//! right for a worker and wrong for this client.

use std::path::{Path, PathBuf};

use persistent_worker::argfile::MAX_DEPTH;
use persistent_worker::proto::worker_protocol::{Input, WorkRequest};

use crate::bazel::{self, Config, Plan, StdioWorker};
use crate::{digest, Failure, Options, Outcome};

/// The command line as the executor sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Split {
    pub worker_args: Vec<String>,
    pub flagfiles: Vec<String>,
}

/// An argument the executor treats as a flagfile: `@`, `-flagfile=` or
/// `--flagfile=` followed by at least one character.
pub fn is_flagfile(arg: &str) -> bool {
    ["@", "--flagfile=", "-flagfile="]
        .iter()
        .any(|prefix| arg.len() > prefix.len() && arg.starts_with(prefix))
}

pub fn split(command: &[String]) -> Split {
    let (flagfiles, worker_args) = command.iter().cloned().partition(|a| is_flagfile(a));
    Split {
        worker_args,
        flagfiles,
    }
}

/// Expands `@file` arguments recursively, relative to `base`.
pub fn expand(args: &[String], base: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    expand_into(args, base, 0, &mut out)?;
    Ok(out)
}

fn expand_into(
    args: &[String],
    base: &Path,
    depth: usize,
    out: &mut Vec<String>,
) -> Result<(), String> {
    for arg in args {
        let name = match arg.strip_prefix('@') {
            Some(name) if !name.is_empty() && !name.starts_with('@') => name,
            _ => {
                out.push(arg.clone());
                continue;
            }
        };
        if depth >= MAX_DEPTH {
            return Err(format!(
                "argument file '{name}' is nested more than {MAX_DEPTH} levels deep"
            ));
        }
        let path = base.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read argument file '{name}' ({}): {e}",
                path.display()
            )
        })?;
        let lines: Vec<String> = lines(&text).map(str::to_owned).collect();
        expand_into(&lines, base, depth + 1, out)?;
    }
    Ok(())
}

/// One argument per line; the line ending, `\n` or `\r\n`, is not part of it.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n').map(|line| {
        let line = line.strip_suffix('\n').unwrap_or(line);
        line.strip_suffix('\r').unwrap_or(line)
    })
}

fn inputs(paths: &[PathBuf], base: &Path) -> Result<Vec<Input>, Failure> {
    paths
        .iter()
        .map(|path| {
            let content = std::fs::read(base.join(path)).map_err(|e| {
                Failure::Usage(format!("cannot read input {}: {e}", path.display()))
            })?;
            let mut input = Input::new();
            input.path = path.to_string_lossy().into_owned();
            input.digest = digest::reapi_digest(&content);
            Ok(input)
        })
        .collect()
}

/// The action as a request, and the worker's argv.
pub fn prepare(options: &Options) -> Result<(Vec<String>, WorkRequest), Failure> {
    let base = match &options.cwd {
        Some(cwd) => cwd.clone(),
        None => std::env::current_dir()
            .map_err(|e| Failure::Usage(format!("cannot read the current directory: {e}")))?,
    };
    let split = split(&options.command);
    if split.worker_args.is_empty() {
        return Err(Failure::Usage(
            "the command has only flagfiles; the worker's program must come first".to_owned(),
        ));
    }
    let mut request = WorkRequest::new();
    request.arguments = expand(&split.flagfiles, &base).map_err(Failure::Usage)?;
    request.inputs = inputs(&options.inputs, &base)?;
    request.verbosity = options.verbosity;
    if !options.quiet {
        println!("worker args: {:?}", split.worker_args);
        println!("flagfiles: {:?}", split.flagfiles);
    }
    Ok((bazel::worker_argv(&split.worker_args), request))
}

pub fn spawn(options: &Options, argv: &[String]) -> Result<StdioWorker, Failure> {
    StdioWorker::spawn(&Config {
        argv,
        cwd: options.cwd.as_deref(),
        format: bazel::format_of(options),
        all_fields: true,
        echo_stderr: options.worker_stderr,
    })
}

pub fn run(options: &Options) -> Result<Outcome, Failure> {
    let (argv, request) = prepare(options)?;
    let plan = Plan {
        requests: vec![request; options.repeat],
        window: 1,
        cancel_after: None,
        timeout: options.timeout,
    };
    let mut worker = spawn(options, &argv)?;
    bazel::converse(
        options,
        bazel::worker_label(&argv, &worker),
        &mut worker,
        &plan,
    )
    .and_then(|summary| bazel::finish(worker, summary, plan.requests.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn split_separates_flagfiles() {
        let got = split(&strings(&[
            "w",
            "--x",
            "@a",
            "--flagfile=b",
            "-flagfile=c",
            "@",
            "--flagfile=",
            "@@d",
        ]));
        assert_eq!(got.worker_args, strings(&["w", "--x", "@", "--flagfile="]));
        assert_eq!(
            got.flagfiles,
            strings(&["@a", "--flagfile=b", "-flagfile=c", "@@d"])
        );
    }

    #[test]
    fn only_at_files_expand() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "x\r\n@b\n--flagfile=f\n\n@@lit\n").unwrap();
        std::fs::write(d.path().join("b"), "y\nz").unwrap();
        let got = expand(&strings(&["@a", "--flagfile=g", "@@e"]), d.path()).unwrap();
        assert_eq!(
            got,
            strings(&[
                "x",
                "y",
                "z",
                "--flagfile=f",
                "",
                "@@lit",
                "--flagfile=g",
                "@@e"
            ])
        );
    }

    #[test]
    fn self_inclusion_stops() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "@a\n").unwrap();
        let err = expand(&strings(&["@a"]), d.path()).unwrap_err();
        assert!(err.contains("nested"), "{err}");
    }
}
