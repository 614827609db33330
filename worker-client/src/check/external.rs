//! Probes that run `worker-client` itself as a child process: each remote
//! engine's shape (`worker-client remote --engine E`) and Buck2 through the
//! bridge (`worker-client buck2 -- persistent-worker --bridge -- WORKER`).
//! A probe is then exactly the command a person would run to see more,
//! and the card quotes it as evidence.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::report::{tail_lines, Evidence, Feature, Row, Verdict};
use super::Ctx;
use crate::child::{self, show_command, Tail};
use crate::engine::Engine;

pub fn feature_of(engine: Engine) -> Feature {
    match engine {
        Engine::BuildBuddy => Feature::BuildBuddy,
        Engine::NativeLink => Feature::NativeLink,
        Engine::Buildbarn => Feature::Buildbarn,
    }
}

fn row_id(engine: Engine) -> &'static str {
    match engine {
        Engine::BuildBuddy => "engine.buildbuddy",
        Engine::NativeLink => "engine.nativelink",
        Engine::Buildbarn => "engine.buildbarn",
    }
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs this program with `args`, in `ctx`'s directory, bounded: a child
/// that outlives `limit` is killed.
fn client(ctx: &Ctx, args: &[String], limit: Duration) -> Result<Ran, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find worker-client: {e}"))?;
    let mut command = Command::new(&me);
    command
        .args(args)
        .current_dir(&ctx.check.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut argv = vec![me.to_string_lossy().into_owned()];
    argv.extend(args.iter().cloned());
    let mut process = child::spawn(command, &argv).map_err(|e| e.to_string())?;
    let (Some(out), Some(err)) = (process.stdout.take(), process.stderr.take()) else {
        child::kill(&mut process);
        return Err("the client's pipes were not set up".to_owned());
    };
    let (stdout, stderr) = (Tail::capture(out, false), Tail::capture(err, false));
    let status = child::wait_exit(&mut process, limit);
    if status.is_none() {
        child::kill(&mut process);
    }
    let wait = Duration::from_millis(500);
    Ok(Ran {
        code: status.and_then(|s| s.code()),
        stdout: stdout.text(wait),
        stderr: stderr.text(wait),
    })
}

/// The limit for a whole client run: a few requests' worth plus start-up
/// and the engines' exit grace.
fn limit(ctx: &Ctx) -> Duration {
    ctx.check.timeout * 4 + Duration::from_secs(15)
}

fn worker_says(ran: &Ran) -> String {
    let mut text = tail_lines(&ran.stdout, 12);
    let err = ran.stderr.trim();
    if !err.is_empty() {
        text.push_str("\n--- stderr\n");
        text.push_str(&tail_lines(err, 12));
    }
    text
}

/// Why a run failed, in a line: the client's own error line, else the last
/// line of the response it printed.
fn reason(ran: &Ran) -> String {
    let line = ran
        .stderr
        .lines()
        .find(|l| l.starts_with("worker-client"))
        .or_else(|| {
            ran.stdout
                .lines()
                .rev()
                .find(|l| l.trim_start().starts_with('|'))
        })
        .unwrap_or("");
    line.trim().to_owned()
}

/// One action the engine's way: the worker's command plus one `@argfile`
/// holding the request, as Buck2 sends a remote worker action.
pub fn engine(ctx: &Ctx, engine: Engine) -> Row {
    let id = row_id(engine);
    let feature = feature_of(engine);
    let inst = ctx.request();
    let name = ctx.name("args");
    let path = ctx.check.cwd.join(&name);
    ctx.made(path.clone());
    if let Err(e) = ctx.write_args(&path, &inst.args) {
        return Row::new(id, feature, Verdict::Unjudged, format!("{name}: {e}"));
    }
    let mut args = vec![
        "remote".to_owned(),
        "--engine".to_owned(),
        engine.name().to_owned(),
    ];
    match engine_root(ctx, engine) {
        Some(root) => args.extend(["--root".to_owned(), root.to_string_lossy().into_owned()]),
        None => {
            return Row::new(
                id,
                feature,
                Verdict::Unjudged,
                format!(
                    "no directory outside {} for the engine's own root: give another --cwd",
                    ctx.check.cwd.display()
                ),
            )
        }
    }
    args.extend([
        "--timeout-ms".to_owned(),
        ctx.check.timeout.as_millis().to_string(),
        "--cwd".to_owned(),
        ctx.check.cwd.to_string_lossy().into_owned(),
        "--".to_owned(),
    ]);
    args.extend(ctx.check.command.iter().cloned());
    args.push(format!("@{name}"));
    let sent = format!(
        "worker-client {}\n({name} holds {:?})",
        show_command(&args),
        inst.args
    );
    let ran = match client(ctx, &args, limit(ctx)) {
        Ok(ran) => ran,
        Err(e) => return Row::new(id, feature, Verdict::Unjudged, e),
    };
    let evidence = Some(Evidence {
        sent,
        got: worker_says(&ran),
        stderr: String::new(),
    });
    let answered_empty = ctx.check.request.is_none() && ran.code == Some(1);
    let (verdict, why) = match ran.code {
        Some(0) | Some(1) if answered_empty || ran.code == Some(0) => match &inst.out {
            Some(out) if !ctx.check.cwd.join(out).exists() => (
                Verdict::Unsupported,
                format!("exit_code 0, but {out} was not where the engine collects outputs"),
            ),
            _ if answered_empty => (
                Verdict::Supported,
                "started, answered (the empty request failed, as it may) and stopped".to_owned(),
            ),
            _ => (
                Verdict::Supported,
                "started, answered and stopped the engine's way".to_owned(),
            ),
        },
        Some(1) => (
            Verdict::Unsupported,
            format!("the request failed: {}", reason(&ran)),
        ),
        Some(3) => (Verdict::Unsupported, reason(&ran)),
        Some(code) => (
            Verdict::Unjudged,
            format!(
                "worker-client remote exited with status {code}: {}",
                reason(&ran)
            ),
        ),
        None => (
            Verdict::Broken,
            format!("no result within {} s", limit(ctx).as_secs()),
        ),
    };
    // NativeLink alone hands the worker its `@file` unexpanded, and
    // discards the worker's stderr: say where to look.
    let why = if engine == Engine::NativeLink && verdict == Verdict::Unsupported {
        format!("{why} (NativeLink leaves @file to the worker: see argfile.at)")
    } else {
        why
    };
    Row::new(id, feature, verdict, why).with(evidence)
}

/// The engine's own directory (NativeLink's root, Buildbarn's worker
/// directories): it must lie outside the worker's directory, which the
/// engine copies from, so the system's temporary directory will not do
/// when the worker's directory is that very one (or holds it).
fn engine_root(ctx: &Ctx, engine: Engine) -> Option<PathBuf> {
    let cwd = &ctx.check.cwd;
    let name = ctx.name(&format!("{}-root", engine.name()));
    let candidates = [
        std::env::temp_dir().canonicalize().ok(),
        std::env::var_os("HOME").and_then(|h| PathBuf::from(h).canonicalize().ok()),
        cwd.parent().map(PathBuf::from),
    ];
    let root = candidates
        .into_iter()
        .flatten()
        .map(|dir| dir.join(&name))
        .find(|root| !root.starts_with(cwd))?;
    ctx.made(root.clone());
    Some(root)
}

/// `persistent-worker` for the bridge: `--bridge-binary`, else beside us.
fn bridge_binary(ctx: &Ctx) -> Option<PathBuf> {
    if let Some(path) = &ctx.check.bridge_binary {
        return Some(path.clone());
    }
    let me = std::env::current_exe().ok()?;
    let beside = me.parent()?.join("persistent-worker");
    beside.is_file().then_some(beside)
}

/// Buck2 driving the worker through `persistent-worker --bridge`: two
/// requests at once with `Execute`, then on one `ExecuteStream` call.
pub fn buck2(ctx: &Ctx) -> Vec<Row> {
    let Some(bridge) = bridge_binary(ctx) else {
        return vec![Row::new(
            "buck2.bridge",
            Feature::Buck2,
            Verdict::Unjudged,
            "no persistent-worker beside worker-client: give --bridge-binary".to_owned(),
        )];
    };
    ["buck2.bridge", "buck2.stream"]
        .into_iter()
        .map(|id| {
            let insts = [ctx.request(), ctx.request()];
            let mut args = vec![
                "buck2".to_owned(),
                "--concurrency".to_owned(),
                "2".to_owned(),
                "--timeout-ms".to_owned(),
                ctx.check.timeout.as_millis().to_string(),
                "--cwd".to_owned(),
                ctx.check.cwd.to_string_lossy().into_owned(),
            ];
            if id == "buck2.stream" {
                args.push("--stream".to_owned());
            }
            for inst in &insts {
                // An empty request has no words to join: --arg sends it.
                if inst.args.is_empty() {
                    args.extend(["--request".to_owned(), String::new()]);
                } else {
                    args.extend(["--request".to_owned(), inst.args.join(" ")]);
                }
            }
            args.extend([
                "--".to_owned(),
                bridge.to_string_lossy().into_owned(),
                "--bridge".to_owned(),
                "--".to_owned(),
            ]);
            args.extend(ctx.check.command.iter().cloned());
            let sent = format!("worker-client {}", show_command(&args));
            let ran = match client(ctx, &args, limit(ctx)) {
                Ok(ran) => ran,
                Err(e) => return Row::new(id, Feature::Buck2, Verdict::Unjudged, e),
            };
            let evidence = Some(Evidence {
                sent,
                got: worker_says(&ran),
                stderr: String::new(),
            });
            let rpc = if id == "buck2.stream" {
                "ExecuteStream"
            } else {
                "Execute"
            };
            let missing: Vec<&String> = insts
                .iter()
                .filter_map(|i| i.out.as_ref())
                .filter(|out| !ctx.check.cwd.join(out).exists())
                .collect();
            let empty = ctx.check.request.is_none();
            let (verdict, why) = match ran.code {
                Some(0) | Some(1) if !missing.is_empty() => (
                    Verdict::Unsupported,
                    format!("answered, but {missing:?} not written"),
                ),
                Some(0) => (
                    Verdict::Supported,
                    format!("2 requests at once via {rpc} through the bridge answered"),
                ),
                Some(1) if empty => (
                    Verdict::Supported,
                    format!("2 empty requests via {rpc} answered (and failed, as they may)"),
                ),
                Some(1) => (
                    Verdict::Unsupported,
                    format!("the requests failed: {}", reason(&ran)),
                ),
                Some(3) => (Verdict::Unsupported, reason(&ran)),
                Some(code) => (
                    Verdict::Unjudged,
                    format!(
                        "worker-client buck2 exited with status {code}: {}",
                        reason(&ran)
                    ),
                ),
                None => (
                    Verdict::Broken,
                    format!("no result within {} s", limit(ctx).as_secs()),
                ),
            };
            Row::new(id, Feature::Buck2, verdict, why).with(evidence)
        })
        .collect()
}
