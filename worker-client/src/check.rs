//! `worker-client check`: a conformance report card for any persistent
//! worker. A battery of short, bounded probes drives the worker the ways
//! its clients do (Bazel singleplex and multiplex, cancel, JSON, sandboxes,
//! argument files, each remote engine, Buck2 through the bridge) and says of
//! each: supported, unsupported or broken, with the evidence.
//!
//! - this file: the command line, the probes' shared context (request
//!   templates, the files a run makes and removes), the order of the run and
//!   the exit status;
//! - [`stdio`]: probes that talk to the worker on its stdin/stdout;
//! - [`external`]: probes that run `worker-client remote` / `buck2` as
//!   child processes, so each engine is driven by the same code a person
//!   would run by hand;
//! - [`report`]: verdicts, the table and the JSON.
//!
//! Nothing here is needed by the other modes: the module moves with the
//! rest of `worker-client`.

mod external;
mod report;
mod stdio;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use persistent_worker::cli::{number, os_text, text};

use crate::requests;
use report::{Card, Feature, Row};

pub const USAGE: &str = "\
usage: worker-client check [--json] [--timeout-ms N] [--request 'ARGS'] [--slow-request 'ARGS']
                           [--expect FEATURES] [--only FEATURES] [--json-flag 'FLAGS']
                           [--bridge-binary PATH] [--cwd DIR] [--rss-requests N] [--jobs N]
                           -- WORKER...

Runs short, bounded probes against the Bazel-protocol worker `WORKER...
--persistent_worker` and prints a report card: one row per check, with a
verdict (supported, unsupported, BROKEN, unjudged, measured), a reason, and
the evidence for anything that is not a clean pass.

  --request 'ARGS'       a request the worker answers with exit code 0
                         (whitespace-separated); {out} becomes a fresh output
                         file name, {n} a number. Without it an empty request
                         is sent, and checks that need a real one say so
  --slow-request 'ARGS'  a request that takes a while (a few hundred ms):
                         times multiplex overlap and cancellation
  --expect FEATURES      what the worker claims, comma-separated, or 'all':
                         multiplex, cancel, json, sandbox, argfile, buildbuddy,
                         nativelink, buildbarn, buck2, resources. proto is
                         always expected
  --only FEATURES        run only these probes (proto always runs)
  --json-flag 'FLAGS'    the startup flags that select JSON (default:
                         '--worker-protocol json')
  --bridge-binary PATH   persistent-worker for the Buck2 probes (default: the
                         one beside worker-client)
  --cwd DIR              the worker's working directory (default: the current
                         one); the files the probes make there are removed
  --rss-requests N       requests between the two memory readings (default 1000)
  --jobs N               probes run at once after the timed ones (default 3)
  --timeout-ms N         longest wait for any one answer (default 5000)
  --json                 print the card as JSON

exit status: 0 every expected feature holds; 1 some does not; 2 usage error.
";

/// The command line of `check`.
#[derive(Debug, Clone)]
pub struct Check {
    pub command: Vec<String>,
    pub cwd: PathBuf,
    pub request: Option<Vec<String>>,
    pub slow: Option<Vec<String>>,
    pub json_flag: Vec<String>,
    pub timeout: Duration,
    pub expect: Vec<Feature>,
    pub only: Vec<Feature>,
    pub json: bool,
    pub bridge_binary: Option<PathBuf>,
    pub rss_requests: usize,
    pub jobs: usize,
}

/// `Ok(None)` asks for the help text.
pub fn parse(args: Vec<OsString>) -> Result<Option<Check>, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut c = Check {
        command: Vec::new(),
        cwd: PathBuf::new(),
        request: None,
        slow: None,
        json_flag: vec!["--worker-protocol".to_owned(), "json".to_owned()],
        timeout: Duration::from_millis(5000),
        expect: vec![Feature::Proto],
        only: Feature::ALL.to_vec(),
        json: false,
        bridge_binary: None,
        rss_requests: 1000,
        jobs: 3,
    };
    let mut cwd = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("request") => c.request = Some(requests::split(&text(&mut parser)?)),
            Long("slow-request") => c.slow = Some(requests::split(&text(&mut parser)?)),
            Long("expect") => {
                for f in Feature::parse_list(&text(&mut parser)?, "--expect")? {
                    if !c.expect.contains(&f) {
                        c.expect.push(f);
                    }
                }
            }
            Long("only") => {
                let mut only = Feature::parse_list(&text(&mut parser)?, "--only")?;
                if !only.contains(&Feature::Proto) {
                    only.insert(0, Feature::Proto);
                }
                c.only = only;
            }
            Long("json-flag") => c.json_flag = requests::split(&text(&mut parser)?),
            Long("bridge-binary") => {
                c.bridge_binary = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?))
            }
            Long("cwd") => cwd = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?)),
            Long("rss-requests") => c.rss_requests = number(&mut parser, "--rss-requests")?,
            Long("jobs") => {
                c.jobs = number(&mut parser, "--jobs")?;
                if c.jobs == 0 {
                    return Err("--jobs must be at least 1".to_owned());
                }
            }
            Long("timeout-ms") => {
                let ms: u64 = number(&mut parser, "--timeout-ms")?;
                if ms == 0 {
                    return Err("--timeout-ms must be at least 1".to_owned());
                }
                c.timeout = Duration::from_millis(ms);
            }
            Long("json") => c.json = true,
            Short('h') | Long("help") => return Ok(None),
            Value(first) => {
                c.command.push(os_text(first)?);
                for rest in parser.raw_args().map_err(|e| e.to_string())? {
                    c.command.push(os_text(rest)?);
                }
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if c.command.is_empty() {
        return Err(
            "no worker command: put it after '--', e.g. worker-client check -- persistent-worker"
                .to_owned(),
        );
    }
    if let Some(missing) = c.expect.iter().find(|f| !c.only.contains(f)) {
        return Err(format!(
            "--expect {} but --only leaves its probes out",
            missing.name()
        ));
    }
    let here = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
    // A program named by a relative path is found from here, not from
    // --cwd, where every probe starts it.
    if c.command[0].contains('/') && Path::new(&c.command[0]).is_relative() {
        c.command[0] = here.join(&c.command[0]).to_string_lossy().into_owned();
    }
    let cwd = cwd.unwrap_or(here);
    // Absolute: sandbox_dir probes and engine runs name paths under it.
    c.cwd = cwd
        .canonicalize()
        .map_err(|e| format!("--cwd {}: {e}", cwd.display()))?;
    Ok(Some(c))
}

/// A request made from a template: its arguments and the output file it
/// names, if the template has `{out}`.
#[derive(Debug, Clone)]
pub struct Instance {
    pub args: Vec<String>,
    pub out: Option<String>,
}

/// What every probe shares: the options, a counter that keeps names fresh,
/// and the files made in the worker's directory, removed at the end.
pub struct Ctx<'a> {
    pub check: &'a Check,
    next: AtomicUsize,
    made: Mutex<Vec<PathBuf>>,
}

impl Ctx<'_> {
    /// A number no other probe of this run has used.
    pub fn fresh(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// A name unique to this run and probe, for files in the worker's
    /// directory.
    pub fn name(&self, what: &str) -> String {
        format!("check-{}-{}.{what}", std::process::id(), self.fresh())
    }

    /// Remembers a path under the worker's directory to remove at the end.
    pub fn made(&self, path: PathBuf) {
        if let Ok(mut made) = self.made.lock() {
            made.push(path);
        }
    }

    pub fn instantiate(&self, template: &[String]) -> Instance {
        let n = self.fresh();
        let has_out = template.iter().any(|a| a.contains("{out}"));
        let out = has_out.then(|| format!("check-{}-{n}.out", std::process::id()));
        let args = template
            .iter()
            .map(|a| {
                let a = a.replace("{n}", &n.to_string());
                match &out {
                    Some(out) => a.replace("{out}", out),
                    None => a,
                }
            })
            .collect();
        if let Some(out) = &out {
            self.made(self.check.cwd.join(out));
        }
        Instance { args, out }
    }

    /// The ordinary request, or the empty one.
    pub fn request(&self) -> Instance {
        match &self.check.request {
            Some(template) => self.instantiate(template),
            None => Instance {
                args: Vec::new(),
                out: None,
            },
        }
    }

    pub fn slow(&self) -> Option<Instance> {
        self.check.slow.as_ref().map(|t| self.instantiate(t))
    }

    /// The worker's argv with `extra` startup flags, `--persistent_worker` last.
    pub fn argv(&self, extra: &[String]) -> Vec<String> {
        let mut argv = self.check.command.clone();
        argv.extend(extra.iter().cloned());
        argv.push("--persistent_worker".to_owned());
        argv
    }

    pub fn runs(&self, feature: Feature) -> bool {
        self.check.only.contains(&feature)
    }

    /// Writes an argument file: one argument a line.
    pub fn write_args(&self, path: &Path, args: &[String]) -> std::io::Result<()> {
        let mut text = args.join("\n");
        text.push('\n');
        std::fs::write(path, text)
    }
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        let made = match self.made.get_mut() {
            Ok(made) => std::mem::take(made),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        for path in made.iter().rev() {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
        // Only if the probes left it empty: it may be the worker's own.
        let _ = std::fs::remove_dir(self.check.cwd.join("__sandbox"));
    }
}

/// Runs every probe and prints the card; the exit status says whether every
/// claimed feature holds.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let check = match parse(args) {
        Ok(Some(check)) => check,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("worker-client check: {e}\n\nRun 'worker-client check --help' for usage.");
            return ExitCode::from(2);
        }
    };
    let card = run(&check);
    if check.json {
        print!("{}", card.json());
    } else {
        print!("{}", card.table());
    }
    if card.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A probe for the threads: the rows it reports.
type Probe<'p> = Box<dyn FnOnce(&Ctx) -> Vec<Row> + Send + 'p>;

/// Runs `probes` on up to `jobs` threads; their rows in the probes' order.
fn run_probes(ctx: &Ctx, probes: Vec<Probe>, jobs: usize) -> Vec<Row> {
    let count = probes.len();
    let queue = Mutex::new(probes.into_iter().enumerate().collect::<VecDeque<_>>());
    let results: Mutex<Vec<(usize, Vec<Row>)>> = Mutex::new(Vec::with_capacity(count));
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, count.max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((index, probe)) = next else { break };
                let rows = probe(ctx);
                if let Ok(mut results) = results.lock() {
                    results.push((index, rows));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().flat_map(|(_, rows)| rows).collect()
}

pub fn run(check: &Check) -> Card {
    let started = Instant::now();
    let ctx = Ctx {
        check,
        next: AtomicUsize::new(0),
        made: Mutex::new(Vec::new()),
    };
    // The probes that time things run alone, first: a loaded machine would
    // blur their verdicts. The rest wait mostly on start-ups and on workers
    // that do not answer, so they share --jobs threads.
    let mut rows: Vec<Row> = stdio::core(&ctx);
    if ctx.runs(Feature::Multiplex) || ctx.runs(Feature::Cancel) {
        rows.extend(stdio::multiplex(&ctx));
    }
    let mut probes: Vec<Probe> = vec![Box::new(stdio::malformed)];
    if ctx.runs(Feature::Json) {
        probes.push(Box::new(stdio::json));
    }
    if ctx.runs(Feature::Sandbox) || ctx.runs(Feature::Argfile) {
        probes.push(Box::new(stdio::paths));
    }
    for engine in [
        crate::engine::Engine::BuildBuddy,
        crate::engine::Engine::NativeLink,
        crate::engine::Engine::Buildbarn,
    ] {
        if ctx.runs(external::feature_of(engine)) {
            probes.push(Box::new(move |ctx: &Ctx| {
                vec![external::engine(ctx, engine)]
            }));
        }
    }
    if ctx.runs(Feature::Buck2) {
        probes.push(Box::new(external::buck2));
    }
    rows.extend(run_probes(&ctx, probes, check.jobs));
    rows.retain(|r| ctx.runs(r.feature));
    // Rows grouped by feature, in --expect's order, whichever thread ran them.
    rows.sort_by_key(|r| Feature::ALL.iter().position(|f| *f == r.feature));
    Card {
        worker: crate::child::show_command(&check.command),
        rows,
        expected: check.expect.clone(),
        elapsed: started.elapsed(),
    }
}
