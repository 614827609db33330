//! A remote engine driving a worker: each action's command line is split
//! into startup arguments and the request as the chosen engine splits it
//! ([`crate::engine`]), workers are started once per key in the engine's
//! place and kept across actions, each action becomes one singleplex request
//! (id 0), and workers are retired and stopped as that engine does.
//!
//! The action's files are `--cwd` (default: the current directory). Where
//! the engine gives each action or worker a directory of its own, those
//! files are copied there first and the files the request created or changed
//! are copied back afterwards, as an engine collects outputs.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use persistent_worker::proto::worker_protocol::{Input, WorkRequest};

use crate::bazel::{self, Config, Plan, StdioWorker};
use crate::child::show_command;
use crate::engine::{Engine as EngineKind, Profile, StartDir};
use crate::{digest, Failure, Options, Outcome};

/// One action: its command line as the build tool sends it, and the
/// artifacts of `WorkerInfo.exe` that Buck2 computes `persistentWorkerKey`
/// from.
#[derive(Debug, Clone)]
pub struct Action {
    pub command: Vec<String>,
    pub tool_inputs: Vec<PathBuf>,
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

fn action_base(options: &Options) -> Result<PathBuf, Failure> {
    match &options.cwd {
        Some(cwd) => Ok(cwd.clone()),
        None => std::env::current_dir()
            .map_err(|e| Failure::Usage(format!("cannot read the current directory: {e}"))),
    }
}

/// The action as a BuildBuddy request, and the worker's argv: what the
/// benchmark repeats.
pub fn prepare(options: &Options) -> Result<(Vec<String>, WorkRequest), Failure> {
    let base = action_base(options)?;
    let profile = EngineKind::BuildBuddy.profile();
    let split = profile.split(&options.command);
    if split.startup.is_empty() {
        return Err(Failure::Usage(
            "the command has only flagfiles; the worker's program must come first".to_owned(),
        ));
    }
    let mut request = WorkRequest::new();
    request.arguments = profile
        .request_arguments(&split.request, &base)
        .map_err(Failure::Usage)?;
    request.inputs = inputs(&options.inputs, &base)?;
    request.verbosity = options.verbosity;
    Ok((bazel::worker_argv(&split.startup), request))
}

pub fn spawn(options: &Options, argv: &[String]) -> Result<StdioWorker, Failure> {
    StdioWorker::spawn(&Config {
        argv,
        cwd: options.cwd.as_deref(),
        format: bazel::format_of(options),
        all_fields: true,
        echo_stderr: options.worker_stderr,
        discard_stderr: false,
    })
}

/// A worker the engine keeps, and how much it has served.
struct Kept {
    worker: StdioWorker,
    dir: PathBuf,
    served: usize,
}

/// Per key: the workers started, the requests they served and the actions
/// run one-shot because every worker of the key was busy, for the summary.
#[derive(Default)]
struct Tally {
    started: usize,
    requests: usize,
    one_shot: usize,
    pids: Vec<u32>,
}

/// What the engine knows between actions, shared by the actions in flight.
#[derive(Default)]
struct Engine {
    /// Idle workers by key.
    idle: HashMap<String, Vec<Kept>>,
    /// Workers alive by key, busy or idle.
    alive: HashMap<String, usize>,
    /// In the order keys were first seen.
    tally: Vec<(String, Tally)>,
}

impl Engine {
    fn tally(&mut self, key: &str) -> &mut Tally {
        let index = match self.tally.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                self.tally.push((key.to_owned(), Tally::default()));
                self.tally.len() - 1
            }
        };
        &mut self.tally[index].1
    }
}

/// The engine's own directory while a run lasts: `--root`, or a temporary
/// one removed at the end.
struct Root {
    path: PathBuf,
    remove: bool,
}

impl Root {
    fn new(options: &Options, base: &Path) -> Result<Root, Failure> {
        let (path, remove) = match &options.root {
            Some(root) => (root.clone(), false),
            None => {
                let path = std::env::temp_dir().join(format!(
                    "worker-client-{}-{}",
                    options.engine.name(),
                    std::process::id()
                ));
                (path, true)
            }
        };
        std::fs::create_dir_all(&path)
            .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", path.display())))?;
        let path = path
            .canonicalize()
            .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        if let Ok(base) = base.canonicalize() {
            if path.starts_with(&base) {
                return Err(Failure::Usage(format!(
                    "--root {} lies inside the action's files {} (--cwd): it would copy itself",
                    path.display(),
                    base.display()
                )));
            }
        }
        Ok(Root { path, remove })
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What every action of a run shares.
struct Run<'a> {
    options: &'a Options,
    profile: Profile,
    base: PathBuf,
    root: Option<Root>,
    engine: Mutex<Engine>,
}

impl Run<'_> {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        match self.engine.lock() {
            Ok(engine) => engine,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// How an action is served.
enum Served {
    /// By a kept worker, or one started for it.
    Worker(Kept),
    /// Every worker its key may have is busy: one-shot, as NativeLink does.
    OneShot,
}

pub fn run(options: &Options) -> Result<Outcome, Failure> {
    let profile = options.engine.profile();
    if options.json && !profile.json {
        return Err(Failure::Usage(format!(
            "--json: {} drives workers in proto only",
            profile.engine.name()
        )));
    }
    let base = action_base(options)?;
    let root = match profile.start {
        StartDir::ActionDir => None,
        StartDir::SharedRoot | StartDir::WorkerDir => Some(Root::new(options, &base)?),
    };
    if !options.quiet {
        describe(&profile);
        if !profile.inputs && !options.inputs.is_empty() {
            println!(
                "note: {} sends no inputs: --input is ignored",
                profile.engine.name()
            );
        }
    }
    let run = Run {
        options,
        profile,
        base,
        root,
        engine: Mutex::new(Engine::default()),
    };
    let total = options.actions.len() * options.repeat;
    let mut failed = 0;
    let mut result = Ok(());
    // `--concurrency` actions at once, as that many build actions would
    // reach the engine together; each prints when its wave is done.
    let mut next = 0;
    while next < total && result.is_ok() {
        let wave: Vec<usize> = (next..total.min(next + options.concurrency)).collect();
        next += wave.len();
        // The wave's actions reach the engine together: none can finish
        // and free its worker before the others have asked for one.
        let arrived = Barrier::new(wave.len());
        let outcomes: Vec<(Vec<u8>, Result<bool, Failure>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = wave
                .iter()
                .map(|&n| {
                    let (run, arrived) = (&run, &arrived);
                    scope.spawn(move || {
                        arrived.wait();
                        let mut out = Vec::new();
                        let action = &options.actions[n % options.actions.len()];
                        let served = serve(run, action, n, &mut out);
                        (out, served)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        (
                            Vec::new(),
                            Err(Failure::Usage("an action's thread panicked".to_owned())),
                        )
                    })
                })
                .collect()
        });
        for (out, served) in outcomes {
            let _ = std::io::stdout().write_all(&out);
            match served {
                Ok(true) => {}
                Ok(false) => failed += 1,
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
    }
    // Every kept worker is stopped the engine's way, even after a failure.
    let idle: Vec<Kept> = run.engine().idle.drain().flat_map(|(_, k)| k).collect();
    let mut exit_notes = Vec::new();
    for k in idle {
        let pid = k.worker.pid();
        match k.worker.finish_within(run.profile.exit_grace) {
            Ok(note) => exit_notes.push(format!("pid {pid}: {note}")),
            Err(e) if result.is_ok() => result = Err(e),
            Err(_) => {}
        }
    }
    result?;
    let engine = run.engine();
    println!("worker keys ({}):", run.profile.engine.name());
    for (key, t) in &engine.tally {
        let one_shot = if t.one_shot > 0 {
            format!(", {} one-shot (every worker busy)", t.one_shot)
        } else {
            String::new()
        };
        println!(
            "  {key}: {} worker(s) started (pids {:?}), {} request(s){one_shot}",
            t.started, t.pids, t.requests
        );
    }
    exit_notes.sort();
    println!(
        "{total} action(s), {total} response(s): {failed} failed; {} distinct key(s); \
         protocol OK; {}",
        engine.tally.len(),
        exit_notes.join("; ")
    );
    Ok(Outcome {
        failed_requests: failed,
    })
}

fn describe(p: &Profile) {
    let start = match p.start {
        StartDir::ActionDir => "in the action's directory",
        StartDir::SharedRoot => "in the engine's root; each action's directory is sandbox_dir",
        StartDir::WorkerDir => "in a directory of its own that receives each action's files",
    };
    let retire = match p.max_requests {
        Some(n) => format!("retired after {n} requests"),
        None => "kept while the engine lives".to_owned(),
    };
    let per_key = match p.workers_per_key {
        Some(n) => format!("up to {n} workers per key, one request each, then one-shot"),
        None => "one worker per key and runner, one request at a time".to_owned(),
    };
    println!(
        "engine {}: worker starts {start}; stderr {}; stopped by closing stdin, killed after \
         {:.0} s; {per_key}; {retire}",
        p.engine.name(),
        if p.keep_stderr { "kept" } else { "discarded" },
        p.exit_grace.as_secs_f64(),
    );
}

/// Takes an idle worker of `key`, or the right to start one, or (at the
/// key's limit) says the action runs one-shot.
fn acquire(run: &Run, key: &str) -> Option<Option<Kept>> {
    let mut engine = run.engine();
    if let Some(k) = engine.idle.get_mut(key).and_then(Vec::pop) {
        return Some(Some(k));
    }
    let alive = engine.alive.get(key).copied().unwrap_or(0);
    if run.profile.workers_per_key.is_some_and(|max| alive >= max) {
        engine.tally(key).one_shot += 1;
        return None;
    }
    engine.alive.insert(key.to_owned(), alive + 1);
    let t = engine.tally(key);
    t.started += 1;
    Some(None)
}

/// Serves one action; `Ok(false)` when it failed (non-zero exit). What it
/// has to say goes to `out`.
fn serve(run: &Run, action: &Action, n: usize, out: &mut Vec<u8>) -> Result<bool, Failure> {
    let (options, profile, base) = (run.options, &run.profile, run.base.as_path());
    let quiet = options.quiet;
    let split = profile.split(&action.command);
    if split.startup.is_empty() {
        return Err(Failure::Usage(format!(
            "action `{}` has no startup arguments: the worker's program must come first",
            show_command(&action.command)
        )));
    }
    let key = profile
        .key(
            &split.startup,
            &action.tool_inputs,
            base,
            bazel::format_of(options),
        )
        .map_err(Failure::Usage)?;
    if !quiet {
        let _ = writeln!(out, "action {}: {}", n + 1, show_command(&action.command));
        let _ = writeln!(out, "   key: {key}");
    }
    let served = match acquire(run, &key) {
        Some(Some(kept)) => Served::Worker(kept),
        Some(None) => match start(run, &split.startup, &key, out) {
            Ok(kept) => Served::Worker(kept),
            Err(e) => {
                release(run, &key);
                return Err(e);
            }
        },
        None => Served::OneShot,
    };
    // The action's directory, filled with its files.
    // An operation's own directory (NativeLink's `<root>/<op>/work`) goes
    // once its outputs are collected.
    let operation = match (&served, profile.start, &run.root) {
        (Served::OneShot, StartDir::WorkerDir, Some(root))
        | (_, StartDir::SharedRoot, Some(root)) => Some(root.path.join(format!("op-{}", n + 1))),
        _ => None,
    };
    let action_dir = match (&served, profile.start, &operation) {
        (_, _, Some(operation)) => operation.join("work"),
        (Served::Worker(k), StartDir::WorkerDir, None) => k.dir.clone(),
        _ => base.to_path_buf(),
    };
    let before = if action_dir == base {
        None
    } else {
        copy_tree(base, &action_dir)
            .map_err(|e| Failure::Usage(format!("cannot lay out the action's files: {e}")))?;
        Some(snapshot(&action_dir))
    };
    let ok = match served {
        Served::OneShot => one_shot(run, &action.command, &action_dir, out)?,
        Served::Worker(kept) => {
            let request = request(run, &split.request, &action_dir)?;
            exchange(run, kept, &key, request, out)?
        }
    };
    if let Some(before) = before {
        let collected = collect(&action_dir, base, &before)
            .map_err(|e| Failure::Usage(format!("cannot collect the action's outputs: {e}")))?;
        if !quiet && !collected.is_empty() {
            let _ = writeln!(out, "   outputs collected: {collected:?}");
        }
    }
    if let Some(operation) = operation {
        let _ = std::fs::remove_dir_all(operation);
    }
    Ok(ok)
}

/// A worker for `key` has died or could not start: it no longer counts.
fn release(run: &Run, key: &str) {
    let mut engine = run.engine();
    if let Some(alive) = engine.alive.get_mut(key) {
        *alive = alive.saturating_sub(1);
    }
}

/// Starts a worker in the engine's place for it.
fn start(run: &Run, startup: &[String], key: &str, out: &mut Vec<u8>) -> Result<Kept, Failure> {
    let (options, profile) = (run.options, &run.profile);
    let dir = match (profile.start, &run.root) {
        (StartDir::SharedRoot, Some(root)) => root.path.clone(),
        (StartDir::WorkerDir, Some(root)) => {
            let name = {
                let mut engine = run.engine();
                let started = engine.tally(key).started;
                let index = engine.tally.iter().position(|(k, _)| k == key).unwrap_or(0);
                format!("worker-{}-{started}", index + 1)
            };
            let dir = root.path.join(name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", dir.display())))?;
            dir
        }
        _ => run.base.clone(),
    };
    let argv = bazel::worker_argv(startup);
    let worker = StdioWorker::spawn(&Config {
        argv: &argv,
        cwd: Some(&dir),
        format: bazel::format_of(options),
        all_fields: true,
        echo_stderr: options.worker_stderr && profile.keep_stderr,
        discard_stderr: !profile.keep_stderr,
    })?;
    if !options.quiet {
        let _ = writeln!(
            out,
            "   started `{}` (pid {}) in {}",
            show_command(&argv),
            worker.pid(),
            dir.display()
        );
    }
    run.engine().tally(key).pids.push(worker.pid());
    Ok(Kept {
        worker,
        dir,
        served: 0,
    })
}

/// The action's request as this engine builds it.
fn request(run: &Run, split_off: &[String], action_dir: &Path) -> Result<WorkRequest, Failure> {
    let profile = &run.profile;
    let mut request = WorkRequest::new();
    request.arguments = profile
        .request_arguments(split_off, action_dir)
        .map_err(Failure::Usage)?;
    if profile.inputs {
        request.inputs = inputs(&run.options.inputs, action_dir)?;
    }
    if profile.sandbox_dir {
        request.sandbox_dir = action_dir.to_string_lossy().into_owned();
    }
    request.verbosity = run.options.verbosity;
    Ok(request)
}

/// Sends the request, waits for its response, and puts the worker back or
/// retires it.
fn exchange(
    run: &Run,
    mut kept: Kept,
    key: &str,
    request: WorkRequest,
    out: &mut Vec<u8>,
) -> Result<bool, Failure> {
    let quiet = run.options.quiet;
    let plan = Plan {
        requests: vec![request],
        window: 1,
        cancel_after: None,
        timeout: run.options.timeout,
    };
    let answers = match bazel::drive(&mut kept.worker, &plan, &mut |p| {
        if !quiet {
            bazel::show(out, p);
        }
    }) {
        Ok(answers) => answers,
        Err(e) => {
            release(run, key);
            return Err(e);
        }
    };
    kept.served += 1;
    run.engine().tally(key).requests += 1;
    let ok = answers.iter().all(|a| a.response.exit_code == 0);
    match run.profile.max_requests {
        Some(max) if kept.served >= max => {
            release(run, key);
            let pid = kept.worker.pid();
            let note = kept.worker.finish_within(run.profile.exit_grace)?;
            if !quiet {
                let _ = writeln!(
                    out,
                    "   retired worker pid {pid} after {max} requests: {note}"
                );
            }
        }
        _ => run
            .engine()
            .idle
            .entry(key.to_owned())
            .or_default()
            .push(kept),
    }
    Ok(ok)
}

/// The whole command line run as a plain command in the action's directory.
fn one_shot(run: &Run, command: &[String], dir: &Path, out: &mut Vec<u8>) -> Result<bool, Failure> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Failure::Usage("empty command".to_owned()))?;
    let mut process = std::process::Command::new(program);
    process
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = crate::child::spawn(process, command)?;
    let stderr = match child.stderr.take() {
        Some(stderr) => crate::child::Tail::capture(stderr, false),
        None => crate::child::Tail::capture(std::io::empty(), false),
    };
    let Some(status) = crate::child::wait_exit(&mut child, run.options.timeout) else {
        crate::child::kill(&mut child);
        return Err(Failure::Worker(format!(
            "the one-shot command `{}` did not finish within {} ms (--timeout-ms)",
            show_command(command),
            run.options.timeout.as_millis()
        )));
    };
    if !run.options.quiet {
        let limit = run.profile.workers_per_key.unwrap_or(0);
        let _ = writeln!(
            out,
            "   one-shot (all {limit} workers of this key busy): {}\n{}",
            crate::child::describe(status),
            bazel::indent(&stderr.text(Duration::from_secs(1)))
        );
    }
    Ok(status.success())
}

type Snapshot = HashMap<PathBuf, (u64, Option<SystemTime>)>;

/// Every regular file under `dir`, relative to it, with its size and
/// modification time.
fn snapshot(dir: &Path) -> Snapshot {
    let mut files = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                if let Ok(relative) = path.strip_prefix(dir) {
                    files.insert(relative.to_path_buf(), (meta.len(), meta.modified().ok()));
                }
            }
        }
    }
    files
}

/// Copies the files created or changed since `before` from `dir` back to
/// `base`; returns their relative paths, sorted.
fn collect(dir: &Path, base: &Path, before: &Snapshot) -> std::io::Result<Vec<PathBuf>> {
    let mut changed: Vec<PathBuf> = snapshot(dir)
        .into_iter()
        .filter(|(path, stat)| before.get(path) != Some(stat))
        .map(|(path, _)| path)
        .collect();
    changed.sort();
    for path in &changed {
        let to = base.join(path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(dir.join(path), to)?;
    }
    Ok(changed)
}

/// Copies the tree at `from` into `to` (created if missing), symlinks as
/// symlinks.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_copies_back_only_what_changed() {
        let base = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir(base.path().join("sub")).unwrap();
        std::fs::write(base.path().join("sub/in.txt"), "in").unwrap();
        copy_tree(base.path(), work.path()).unwrap();
        let before = snapshot(work.path());
        std::fs::create_dir(work.path().join("out")).unwrap();
        std::fs::write(work.path().join("out/new.txt"), "new").unwrap();
        let got = collect(work.path(), base.path(), &before).unwrap();
        assert_eq!(got, vec![PathBuf::from("out/new.txt")]);
        assert_eq!(
            std::fs::read_to_string(base.path().join("out/new.txt")).unwrap(),
            "new"
        );
    }
}
