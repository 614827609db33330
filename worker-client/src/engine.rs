//! Remote engines as data: how BuildBuddy, NativeLink and Buildbarn each turn
//! an action's command line into a worker's startup argv and a `WorkRequest`,
//! where they start the worker, how they key, retire and stop it;
//! [`crate::remote`] drives a worker by whichever profile is chosen.
//!
//! Sources: BuildBuddy's executor runner (`SplitArgsIntoWorkerArgsAndFlagFiles`,
//! `startPersistentWorker`, `expandArguments`) and Buck2's
//! `persistentWorkerKey` (`app/buck2_execute/src/execute/command_executor.rs`);
//! NativeLink v1.6.6 (`nativelink-worker/src/running_actions_manager.rs`,
//! `nativelink-worker/src/persistent_worker/{pool,live_worker}.rs`, and its
//! "Persistent workers" documentation page); Buildbarn's proposed support
//! (bb-remote-execution pull request 255 and bb-adrs pull request 9, open in
//! 2026-09), where anything the proposal leaves open (the exit grace) takes
//! NativeLink's value.
//!
//! Nothing here starts a process: splitting and keying are pure functions,
//! so the facts are tested without a worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use persistent_worker::argfile::MAX_DEPTH;
use persistent_worker::bazel::WireFormat;
use sha2::{Digest, Sha256};

use crate::digest::hex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    BuildBuddy,
    NativeLink,
    Buildbarn,
}

impl Engine {
    pub fn parse(name: &str) -> Result<Engine, String> {
        match name {
            "buildbuddy" => Ok(Engine::BuildBuddy),
            "nativelink" => Ok(Engine::NativeLink),
            "buildbarn" => Ok(Engine::Buildbarn),
            _ => Err(format!(
                "unknown engine '{name}': expected buildbuddy, nativelink or buildbarn"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::BuildBuddy => "buildbuddy",
            Engine::NativeLink => "nativelink",
            Engine::Buildbarn => "buildbarn",
        }
    }

    pub fn profile(self) -> Profile {
        match self {
            // The executor runner: the worker lives in the runner's
            // workspace, which holds the action's inputs; it is kept across
            // actions (`recycle-runner`) per `persistentWorkerKey`.
            Engine::BuildBuddy => Profile {
                engine: self,
                start: StartDir::ActionDir,
                split: SplitRule::FlagfilesAnywhereExpanded,
                sandbox_dir: false,
                inputs: true,
                keep_stderr: true,
                exit_grace: Duration::from_secs(10),
                max_requests: None,
                workers_per_key: None,
                key: KeyRule::PersistentWorkerKey,
                json: true,
            },
            Engine::NativeLink => Profile {
                engine: self,
                start: StartDir::SharedRoot,
                split: SplitRule::FromFirstAt,
                sandbox_dir: true,
                inputs: false,
                keep_stderr: false,
                exit_grace: Duration::from_secs(5),
                max_requests: Some(200),
                workers_per_key: Some(4),
                key: KeyRule::CommandLine,
                json: true,
            },
            // The proposed support (open pull requests, 2026-09): the worker
            // runs in a persistent directory of its own into which each
            // action's inputs are moved.
            Engine::Buildbarn => Profile {
                engine: self,
                start: StartDir::WorkerDir,
                split: SplitRule::AtFilesAnywhereConcatenated,
                sandbox_dir: false,
                inputs: false,
                keep_stderr: true,
                exit_grace: Duration::from_secs(5),
                max_requests: None,
                workers_per_key: None,
                key: KeyRule::PersistentWorkerKey,
                json: false,
            },
        }
    }
}

/// Where the engine starts a worker, and so what its cwd holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartDir {
    /// The action's own directory (the runner's workspace).
    ActionDir,
    /// One root shared by every action; each action has a directory below
    /// it, named to the worker by an absolute `sandbox_dir`.
    SharedRoot,
    /// A directory of the worker's own, into which each action's inputs are
    /// put before its request.
    WorkerDir,
}

/// How the action's command line splits into startup and request arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitRule {
    /// `@f`, `--flagfile=f`, `-flagfile=f` anywhere are the request; the
    /// engine expands `@f` recursively (one argument a line) and passes the
    /// others through for the worker to expand.
    FlagfilesAnywhereExpanded,
    /// Everything from the first argument that begins with `@` is the
    /// request, unexpanded; `--flagfile=` before it is a startup argument.
    FromFirstAt,
    /// `@f` anywhere is stripped from the startup argv; the files' lines,
    /// concatenated, are the request (one level: an `@` line inside stays).
    AtFilesAnywhereConcatenated,
}

/// What the engine keys a worker by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRule {
    /// The `persistentWorkerKey` platform property Buck2 computes from the
    /// artifacts in `WorkerInfo.exe` (hidden ones included), never from
    /// plain arguments; plus the wire format.
    PersistentWorkerKey,
    /// The executable and every argument before the first `@` one, literally,
    /// plus the wire format; file contents play no part.
    CommandLine,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub engine: Engine,
    pub start: StartDir,
    pub split: SplitRule,
    /// `sandbox_dir` is the action's directory as an absolute path.
    pub sandbox_dir: bool,
    /// `inputs` carry every input file with a serialized REAPI digest.
    pub inputs: bool,
    /// The worker's stderr is kept (shown when something fails); otherwise
    /// it goes to /dev/null.
    pub keep_stderr: bool,
    /// How long a worker has to exit once its stdin closes before it is
    /// killed.
    pub exit_grace: Duration,
    /// Requests a worker serves before it is retired.
    pub max_requests: Option<usize>,
    /// Workers per key at most (each serves one request at a time).
    pub workers_per_key: Option<usize>,
    pub key: KeyRule,
    /// The engine can drive a JSON worker.
    pub json: bool,
}

/// The command line as the engine sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct Split {
    /// The startup arguments, before `--persistent_worker` is appended.
    pub startup: Vec<String>,
    /// The request's arguments as the command line carries them.
    pub request: Vec<String>,
}

/// An argument a BuildBuddy-style executor treats as a flagfile: `@`,
/// `-flagfile=` or `--flagfile=` followed by at least one character.
pub fn is_flagfile(arg: &str) -> bool {
    ["@", "--flagfile=", "-flagfile="]
        .iter()
        .any(|prefix| arg.len() > prefix.len() && arg.starts_with(prefix))
}

fn is_at_file(arg: &str) -> bool {
    arg.len() > 1 && arg.starts_with('@')
}

impl Profile {
    pub fn split(&self, command: &[String]) -> Split {
        let (request, startup) = match self.split {
            SplitRule::FlagfilesAnywhereExpanded => {
                command.iter().cloned().partition(|a| is_flagfile(a))
            }
            SplitRule::AtFilesAnywhereConcatenated => {
                command.iter().cloned().partition(|a| is_at_file(a))
            }
            SplitRule::FromFirstAt => {
                let at = command
                    .iter()
                    .position(|a| a.starts_with('@'))
                    .unwrap_or(command.len());
                (command[at..].to_vec(), command[..at].to_vec())
            }
        };
        Split { startup, request }
    }

    /// The request's `arguments`: the split-off arguments, expanded as this
    /// engine expands them, with files read relative to `base`.
    pub fn request_arguments(
        &self,
        request: &[String],
        base: &Path,
    ) -> Result<Vec<String>, String> {
        match self.split {
            SplitRule::FlagfilesAnywhereExpanded => expand(request, base),
            SplitRule::FromFirstAt => Ok(request.to_vec()),
            SplitRule::AtFilesAnywhereConcatenated => {
                let mut out = Vec::new();
                for arg in request {
                    let name = &arg[1..];
                    out.extend(read_lines(name, base)?);
                }
                Ok(out)
            }
        }
    }

    /// The key this engine would file the worker under, for people to read
    /// and for telling workers apart. `tool_inputs` are the artifacts of
    /// `WorkerInfo.exe`.
    pub fn key(
        &self,
        startup: &[String],
        tool_inputs: &[PathBuf],
        base: &Path,
        format: WireFormat,
    ) -> Result<String, String> {
        let format = match format {
            WireFormat::Proto => "proto",
            WireFormat::Json => "json",
        };
        match self.key {
            KeyRule::CommandLine => Ok(format!(
                "{} [{format}]",
                crate::child::show_command(startup)
            )),
            KeyRule::PersistentWorkerKey => {
                let mut sorted: Vec<&PathBuf> = tool_inputs.iter().collect();
                sorted.sort();
                let mut hasher = Sha256::new();
                for path in sorted {
                    let content = std::fs::read(base.join(path))
                        .map_err(|e| format!("cannot read tool input {}: {e}", path.display()))?;
                    hasher.update(path.to_string_lossy().as_bytes());
                    hasher.update([0]);
                    hasher.update(Sha256::digest(&content));
                }
                let digest = hex(&hasher.finalize());
                Ok(format!("persistentWorkerKey={} [{format}]", &digest[..16]))
            }
        }
    }
}

/// Expands `@file` arguments recursively, relative to `base`; `@@x` and
/// `--flagfile=` pass through for the worker. The library's
/// `argfile::expand` expands every spelling, which is right for a worker and
/// wrong for an executor.
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
        let lines = read_lines(name, base)?;
        expand_into(&lines, base, depth + 1, out)?;
    }
    Ok(())
}

/// One argument per line; the line ending, `\n` or `\r\n`, is not part of it.
fn read_lines(name: &str, base: &Path) -> Result<Vec<String>, String> {
    let path = base.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read argument file '{name}' ({}): {e}",
            path.display()
        )
    })?;
    Ok(text
        .split_inclusive('\n')
        .map(|line| {
            let line = line.strip_suffix('\n').unwrap_or(line);
            line.strip_suffix('\r').unwrap_or(line).to_owned()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn buildbuddy_splits_every_flagfile_spelling_anywhere() {
        let got = Engine::BuildBuddy.profile().split(&strings(&[
            "w",
            "--x",
            "@a",
            "--flagfile=b",
            "-flagfile=c",
            "@",
            "--flagfile=",
            "@@d",
        ]));
        assert_eq!(got.startup, strings(&["w", "--x", "@", "--flagfile="]));
        assert_eq!(
            got.request,
            strings(&["@a", "--flagfile=b", "-flagfile=c", "@@d"])
        );
    }

    #[test]
    fn nativelink_splits_at_the_first_at_argument_only() {
        let got = Engine::NativeLink.profile().split(&strings(&[
            "w",
            "--flagfile=opts",
            "-x",
            "@a",
            "--late",
            "@b",
        ]));
        assert_eq!(got.startup, strings(&["w", "--flagfile=opts", "-x"]));
        assert_eq!(got.request, strings(&["@a", "--late", "@b"]));
    }

    #[test]
    fn buildbarn_strips_at_files_anywhere_and_keeps_flagfile_options() {
        let got =
            Engine::Buildbarn
                .profile()
                .split(&strings(&["w", "@a", "--flagfile=f", "--x", "@b"]));
        assert_eq!(got.startup, strings(&["w", "--flagfile=f", "--x"]));
        assert_eq!(got.request, strings(&["@a", "@b"]));
    }

    #[test]
    fn each_engine_expands_its_own_way() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "x\r\n@b\n--flagfile=f\n\n@@lit\n").unwrap();
        std::fs::write(d.path().join("b"), "y\nz").unwrap();
        let request = strings(&["@a", "--flagfile=g", "@@e"]);
        let buildbuddy = Engine::BuildBuddy.profile();
        assert_eq!(
            buildbuddy.request_arguments(&request, d.path()).unwrap(),
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
        let nativelink = Engine::NativeLink.profile();
        assert_eq!(
            nativelink.request_arguments(&request, d.path()).unwrap(),
            request
        );
        let buildbarn = Engine::Buildbarn.profile();
        assert_eq!(
            buildbarn
                .request_arguments(&strings(&["@a", "@b"]), d.path())
                .unwrap(),
            strings(&["x", "@b", "--flagfile=f", "", "@@lit", "y", "z"])
        );
    }

    #[test]
    fn self_inclusion_stops() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "@a\n").unwrap();
        let err = expand(&strings(&["@a"]), d.path()).unwrap_err();
        assert!(err.contains("nested"), "{err}");
    }

    /// The example's problem in one test: two flag sets as plain arguments
    /// share Buck2's key, and a flag kept in a file shares NativeLink's.
    #[test]
    fn keys_follow_each_engines_rule() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("k1"), "--work-ms\n1\n").unwrap();
        std::fs::write(d.path().join("k2"), "--work-ms\n2\n").unwrap();
        let one = strings(&["w", "--work-ms", "1"]);
        let two = strings(&["w", "--work-ms", "2"]);
        let proto = WireFormat::Proto;
        let buck2 = Engine::BuildBuddy.profile();
        let key = |p: &Profile, startup: &[String], tools: &[&str]| {
            let tools: Vec<PathBuf> = tools.iter().map(PathBuf::from).collect();
            p.key(startup, &tools, d.path(), proto).unwrap()
        };
        assert_eq!(key(&buck2, &one, &[]), key(&buck2, &two, &[]));
        assert_ne!(key(&buck2, &one, &["k1"]), key(&buck2, &two, &["k2"]));
        let native = Engine::NativeLink.profile();
        assert_ne!(key(&native, &one, &[]), key(&native, &two, &[]));
        let opts = strings(&["w", "--worker-options", "k1"]);
        assert_eq!(key(&native, &opts, &["k1"]), key(&native, &opts, &["k2"]));
        assert_ne!(
            native.key(&one, &[], d.path(), WireFormat::Json).unwrap(),
            key(&native, &one, &[])
        );
    }
}
