//! Drives `persistent-worker` with real Bazel servers as the worker's client:
//! Bazel 2.1.0 (installed from the npm registry into a cache under the target
//! directory) over length-prefixed protobuf, and Bazel 4 (Debian's
//! `bazel-bootstrap`, `/usr/bin/bazel-4`) over JSON, multiplexed, and with
//! `--worker_sandboxing`.
//!
//! The workspace under `testdata/bazel/` is copied into a temporary
//! directory together with the freshly built worker binary; Bazel runs with a
//! private `--output_user_root` there and is shut down at the end, also when
//! the test fails. The two tests take turns so that neither's timing is
//! judged while the other's server competes for the CPU.
//!
//! A test whose Bazel is not available is skipped, loudly: the notice goes
//! straight to the test process's stderr, which the test harness does not
//! capture, so it shows in a plain `cargo test` run next to the `ok`. Set
//! `REQUIRE_REAL_BAZEL=1` to turn a skip into a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

const BAZEL_VERSION: &str = "2.1.0";
const NPM_PACKAGE: &str = "@bazel/bazel-linux_x64";
/// The workspace name in `testdata/bazel/WORKSPACE`.
const WORKSPACE_NAME: &str = "persistent_worker_bazel_test";
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// One Bazel command, including the first one that unpacks Bazel and starts
/// its server.
const BAZEL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long processes may take to go away after `bazel shutdown`.
const STRAY_TIMEOUT: Duration = Duration::from_secs(20);
/// Rounds of the multiplex build allowed to show all 4 requests overlapping.
const MULTIPLEX_ROUNDS: usize = 3;
/// Work time of each multiplex action (`--work-ms` in `demo/BUILD`).
const MULTIPLEX_WORK_S: f64 = 2.0;
/// Critical path a multiplex build of 4 actions must stay under. Bazel times
/// each worker action from sending the request to reading the answer, so
/// with fewer than 4 worker threads the last action waits a whole work
/// period for a free thread and the critical path is at least two periods
/// (four with one thread, which is also the serial bound). With 4 threads it
/// is one period plus Bazel's overhead, which reached 0.9 s on a loaded
/// machine: a 2 s period keeps that well clear of the bound.
const MULTIPLEX_CRITICAL_PATH_S: f64 = 2.0 * MULTIPLEX_WORK_S;
const REQUIRE_ENV: &str = "REQUIRE_REAL_BAZEL";
/// Debian's Bazel 4 (package `bazel-bootstrap`), or this variable's value.
const BAZEL_4_DEFAULT: &str = "/usr/bin/bazel-4";
const BAZEL_4_ENV: &str = "BAZEL_4";
/// Debian unpacks Bazel's embedded files here instead of appending them to
/// the binary, which then needs `--install_base` pointing at them.
const DEBIAN_INSTALL_BASE: &str = "/usr/share/bazel";

/// Both tests start Bazel servers; one at a time keeps the timings honest on
/// a small machine.
static ONE_BAZEL_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Startup banner of every worker action's output (the first line of
/// `WorkResponse.output`).
const BANNER: &str = "Bazel persistent worker ";

/// Flags for every `bazel build`: plain output, enough local parallelism for
/// the 4 multiplex actions on a small machine, one singleplex worker process
/// (so that the same process must serve the build after a failure), and the
/// worker strategy for the mnemonics of the demo rule.
const BUILD_FLAGS: &[&str] = &[
    "--color=no",
    "--curses=no",
    "--jobs=8",
    "--local_cpu_resources=8",
    "--worker_max_instances=DemoWorker=1",
    "--worker_max_instances=DemoJson=1",
    "--worker_max_instances=DemoSandboxed=1",
    "--strategy=DemoWorker=worker",
    "--strategy=DemoMultiplex=worker",
    "--worker_verbose",
];

/// What Bazel 4 needs on top of [`BUILD_FLAGS`] for the JSON and sandboxed
/// targets (Bazel 2.1 rejects the JSON flag).
const BAZEL_4_BUILD_FLAGS: &[&str] = &[
    "--experimental_worker_allow_json_protocol",
    "--strategy=DemoJson=worker",
    "--strategy=DemoJsonMultiplex=worker",
    "--strategy=DemoSandboxed=worker",
];

struct Finished {
    status: ExitStatus,
    /// stdout followed by stderr (Bazel writes its progress and the actions'
    /// output to stderr).
    text: String,
}

/// Runs `cmd` to completion or until `timeout`, then kills it. Output goes to
/// files under `log_dir` so that a chatty child cannot block on a full pipe.
fn run_bounded(cmd: &mut Command, timeout: Duration, log_dir: &Path, name: &str) -> Finished {
    fs::create_dir_all(log_dir).expect("create the directory for command output");
    let out_path = log_dir.join(format!("{name}.stdout"));
    let err_path = log_dir.join(format!("{name}.stderr"));
    let out = fs::File::create(&out_path).expect("create stdout file");
    let err = fs::File::create(&err_path).expect("create stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("wait for child") {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{cmd:?} did not finish within {timeout:?}; output so far:\n{}",
                    read_output(&out_path, &err_path)
                );
            }
            None => sleep(Duration::from_millis(50)),
        }
    };
    Finished {
        status,
        text: read_output(&out_path, &err_path),
    }
}

fn read_output(out: &Path, err: &Path) -> String {
    let mut text = String::new();
    for path in [out, err] {
        if let Ok(mut f) = fs::File::open(path) {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    text
}

/// Why the test cannot run Bazel at all.
struct Skip(String);

/// Reports a skip where a plain `cargo test` shows it, or fails the test
/// under `REQUIRE_REAL_BAZEL=1`.
///
/// `eprintln!` would not do: the harness captures it and shows it only for
/// a failing test. Writing to the process's stderr handle directly bypasses
/// that capture.
fn skip(what: &str, Skip(reason): Skip) {
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v != "0" && !v.is_empty()) {
        panic!("{REQUIRE_ENV} is set but {what} is not available: {reason}");
    }
    let bar = "=".repeat(70);
    let notice = format!(
        "\n{bar}\nSKIPPED: bazel_real: {what} is not available\nSKIPPED: reason: {reason}\n\
         SKIPPED: nothing was tested against {what}; set {REQUIRE_ENV}=1 to make this fail\n{bar}\n"
    );
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(notice.as_bytes());
    let _ = stderr.flush();
}

/// Debian's Bazel 4 and the start-up flags it needs, or why there is none.
fn find_bazel_4() -> Result<(PathBuf, Vec<String>), Skip> {
    let exe = std::env::var_os(BAZEL_4_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BAZEL_4_DEFAULT));
    if !exe.is_file() {
        return Err(Skip(format!(
            "{} does not exist (Debian package bazel-bootstrap, or set {BAZEL_4_ENV})",
            exe.display()
        )));
    }
    let mut startup = Vec::new();
    let base = Path::new(DEBIAN_INSTALL_BASE);
    if exe.starts_with("/usr/bin") && base.join("A-server.jar").is_file() {
        startup.push(format!("--install_base={DEBIAN_INSTALL_BASE}"));
        // The files there belong to the package, not to a Bazel extraction
        // Bazel could verify.
        startup.push("--trust_install_base".to_owned());
    }
    Ok((exe, startup))
}

/// Returns the Bazel binary, installing it with npm into the cache when it is
/// not there yet.
fn install_bazel(scratch: &Path) -> Result<PathBuf, Skip> {
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        return Err(Skip(format!(
            "{NPM_PACKAGE} only exists for Linux on x86_64"
        )));
    }
    let cache_root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let cache = cache_root.join(format!("bazel-{BAZEL_VERSION}-npm"));
    let binary_in = |prefix: &Path| {
        prefix
            .join("node_modules")
            .join(NPM_PACKAGE)
            .join(format!("bazel-{BAZEL_VERSION}-linux-x86_64"))
    };
    let bazel = binary_in(&cache);
    if bazel.is_file() {
        return Ok(bazel);
    }
    // Install into a private directory and move it into place, so that test
    // runs sharing the target directory never see a half-installed package.
    let staging = cache_root.join(format!(
        "bazel-{BAZEL_VERSION}-npm.staging.{}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).expect("create the npm staging directory");
    let spec = format!("{NPM_PACKAGE}@{BAZEL_VERSION}");
    eprintln!(
        "bazel_real: installing {spec} with npm into {}",
        cache.display()
    );
    let mut npm = Command::new("npm");
    npm.arg("install").arg("--prefix").arg(&staging).args([
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        &spec,
    ]);
    let installed = match can_run("npm") {
        Err(e) => Err(format!("cannot run npm: {e}")),
        Ok(()) => {
            let done = run_bounded(&mut npm, NPM_TIMEOUT, scratch, "npm-install");
            if done.status.success() && binary_in(&staging).is_file() {
                Ok(())
            } else {
                // npm's last lines name the cause; the rest is in its log.
                let lines: Vec<&str> = done.text.lines().collect();
                let tail = lines[lines.len().saturating_sub(12)..].join("\n");
                Err(format!(
                    "`npm install {spec}` failed ({}):\n{tail}",
                    done.status
                ))
            }
        }
    };
    if let Err(reason) = installed {
        let _ = fs::remove_dir_all(&staging);
        return Err(Skip(reason));
    }
    if fs::rename(&staging, &cache).is_err() {
        // Another run finished first; use its copy.
        let _ = fs::remove_dir_all(&staging);
    }
    if bazel.is_file() {
        Ok(bazel)
    } else {
        panic!("npm installed {spec} but {} is missing", bazel.display())
    }
}

/// Whether a program can be started at all (to tell "no npm" from "npm
/// failed").
fn can_run(program: &str) -> std::io::Result<()> {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|_| ())
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("read a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// Command lines of all processes that mention `needle`, by pid.
fn processes_mentioning(needle: &str) -> BTreeMap<u32, String> {
    let mut found = BTreeMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(raw) = fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(needle) {
                found.insert(pid, cmdline);
            }
        }
    }
    found
}

fn process_alive(pid: u32) -> bool {
    // A zombie has an empty command line: count it as gone.
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// A Bazel server with a private output root in a temporary directory. Drop
/// shuts it down (and, should that fail, kills what is left of it) before
/// the directory is removed.
struct Bazel {
    exe: PathBuf,
    /// Start-up options before the command.
    startup: Vec<String>,
    /// Options of every `bazel build`.
    build_flags: Vec<String>,
    root: PathBuf,
    workspace: PathBuf,
    logs: PathBuf,
    runs: usize,
    stopped: bool,
    dir: Option<tempfile::TempDir>,
}

impl Bazel {
    fn new(
        exe: PathBuf,
        startup: Vec<String>,
        build_flags: Vec<String>,
        dir: tempfile::TempDir,
    ) -> Self {
        let base = dir.path().to_path_buf();
        let workspace = base.join("workspace");
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/bazel"),
            &workspace,
        );
        fs::copy(
            env!("CARGO_BIN_EXE_persistent-worker"),
            workspace.join("worker/persistent-worker"),
        )
        .expect("copy the worker binary into the test workspace");
        Bazel {
            exe,
            startup,
            build_flags,
            root: base.join("output_user_root"),
            workspace,
            logs: base.join("logs"),
            runs: 0,
            stopped: false,
            dir: Some(dir),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.current_dir(&self.workspace)
            .arg(format!("--output_user_root={}", self.root.display()))
            .args(&self.startup)
            .args([
                "--nohome_rc",
                "--nosystem_rc",
                "--noworkspace_rc",
                // Should this process die without shutting the server down,
                // the server still goes away by itself.
                "--max_idle_secs=300",
            ]);
        cmd
    }

    fn run(&mut self, args: &[&str]) -> Finished {
        self.runs += 1;
        let name = format!("bazel-{:02}-{}", self.runs, args[0]);
        let mut cmd = self.command();
        cmd.args(args);
        let started = Instant::now();
        let done = run_bounded(&mut cmd, BAZEL_TIMEOUT, &self.logs, &name);
        eprintln!(
            "bazel_real: `bazel {}` -> {} in {:.1}s",
            args.join(" "),
            done.status,
            started.elapsed().as_secs_f64()
        );
        done
    }

    fn build(&mut self, targets: &[&str]) -> Finished {
        self.build_with(&[], targets)
    }

    fn build_with(&mut self, flags: &[&str], targets: &[&str]) -> Finished {
        let build_flags = self.build_flags.clone();
        let mut args = vec!["build"];
        args.extend(build_flags.iter().map(String::as_str));
        args.extend_from_slice(flags);
        args.extend_from_slice(targets);
        self.run(&args)
    }

    fn build_ok(&mut self, targets: &[&str]) -> String {
        self.build_ok_with(&[], targets)
    }

    fn build_ok_with(&mut self, flags: &[&str], targets: &[&str]) -> String {
        let done = self.build_with(flags, targets);
        assert!(
            done.status.success(),
            "bazel build {targets:?} failed ({}):\n{}",
            done.status,
            done.text
        );
        done.text
    }

    /// Rewrites the input shared by every demo action so that the next build
    /// runs them again.
    fn set_stamp(&self, text: &str) {
        fs::write(self.workspace.join("demo/stamp.txt"), format!("{text}\n"))
            .expect("write demo/stamp.txt");
    }

    fn output_file(&self, target: &str) -> String {
        let path = self
            .workspace
            .join("bazel-bin/demo")
            .join(format!("{target}.txt"));
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read output {}: {e}", path.display()))
    }

    fn worker_logs(&self, mnemonic: &str) -> Vec<PathBuf> {
        let mut logs = Vec::new();
        if let Ok(bases) = fs::read_dir(&self.root) {
            for base in bases.flatten() {
                if let Ok(files) = fs::read_dir(base.path().join("bazel-workers")) {
                    for file in files.flatten() {
                        let name = file.file_name().to_string_lossy().into_owned();
                        if name.ends_with(&format!("-{mnemonic}.log")) {
                            logs.push(file.path());
                        }
                    }
                }
            }
        }
        logs.sort();
        logs
    }

    fn server_pid(&self) -> Option<u32> {
        for base in fs::read_dir(&self.root).ok()?.flatten() {
            if let Ok(text) = fs::read_to_string(base.path().join("server/server.pid.txt")) {
                return text.trim().parse().ok();
            }
        }
        None
    }

    fn root_needle(&self) -> String {
        self.root.display().to_string()
    }

    /// `bazel shutdown`, then waits (bounded) until no process mentioning the
    /// output root is left. Returns the survivors.
    fn shutdown(&mut self) -> BTreeMap<u32, String> {
        self.stopped = true;
        let done = self.run(&["shutdown"]);
        if !done.status.success() {
            eprintln!("bazel_real: `bazel shutdown` failed:\n{}", done.text);
        }
        let deadline = Instant::now() + STRAY_TIMEOUT;
        loop {
            let left = processes_mentioning(&self.root_needle());
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        if !self.stopped {
            let left = self.shutdown();
            for pid in left.keys() {
                eprintln!("bazel_real: killing leftover process {pid}");
                // SAFETY: plain kill(2) on a process found by its command line
                // naming this test's private output root.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        // Bazel leaves read-only directories behind; make them removable.
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("KEEP_BAZEL_TEST_DIR").is_some() {
                eprintln!("bazel_real: keeping {}", dir.keep().display());
            } else {
                let _ = dir.close();
            }
        }
    }
}

/// What a worker action's output says about the process that ran it.
#[derive(Debug)]
struct Banner {
    pid: u32,
    cwd: String,
    request_id: i32,
    /// The whole output as Bazel shows it, up to the next line of Bazel's own.
    shown: String,
}

/// Finds the output Bazel printed for the action of `label` (after a line
/// `INFO: From Demo worker action for <label>:` or the `ERROR: ...` line of a
/// failed action) and parses its first line, the worker's banner.
fn action_output(text: &str, label: &str) -> Banner {
    let header = format!("Demo worker action for {label}");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            (l.starts_with("INFO: From ") || l.starts_with("ERROR: ")) && l.contains(&header)
        })
        .unwrap_or_else(|| panic!("Bazel showed no output for {label}:\n{text}"));
    let shown: Vec<&str> = lines[at + 1..]
        .iter()
        .take_while(|l| {
            !(l.starts_with("INFO: ")
                || l.starts_with("ERROR: ")
                || l.starts_with("Target ")
                || l.starts_with('['))
        })
        .copied()
        .collect();
    let first = shown.first().copied().unwrap_or_default();
    let rest = first
        .strip_prefix(BANNER)
        .unwrap_or_else(|| panic!("output of {label} does not start with {BANNER:?}:\n{text}"));
    // `<hostname> <pid> <cwd> <request_id>`; the cwd has no spaces here.
    let fields: Vec<&str> = rest.split(' ').collect();
    assert_eq!(fields.len(), 4, "unexpected banner for {label}: {first:?}");
    Banner {
        pid: fields[1]
            .parse()
            .unwrap_or_else(|e| panic!("pid in banner {first:?}: {e}")),
        cwd: fields[2].to_string(),
        request_id: fields[3]
            .parse()
            .unwrap_or_else(|e| panic!("request id in banner {first:?}: {e}")),
        shown: shown.join("\n"),
    }
}

/// The largest `N` of the worker's `--verbose` lines `... started, N in
/// flight`. Written at dispatch, so it shows that Bazel sent the requests
/// together, not that the worker ran them together.
fn max_in_flight(log: &str) -> usize {
    log.lines()
        .filter_map(|l| {
            let (_, tail) = l.split_once(" started, ")?;
            tail.strip_suffix(" in flight")?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// The seconds of Bazel's `INFO: Elapsed time: X s, Critical Path: Y s`.
fn critical_path(text: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (_, tail) = l.split_once("Critical Path: ")?;
        tail.trim().strip_suffix('s')?.trim().parse().ok()
    })
}

fn labels(names: &[String]) -> Vec<String> {
    names.iter().map(|n| format!("//demo:{n}")).collect()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// Builds the 4 multiplex targets `names` (each works 2 s) until a round
/// shows them overlapping in one worker process: a critical path under
/// [`MULTIPLEX_CRITICAL_PATH_S`] and all 4 requests in flight at once.
/// Returns the worker's pid.
fn check_multiplex(bazel: &mut Bazel, names: &[String], mnemonic: &str) -> u32 {
    let mut multiplex_pid = None;
    let mut rounds = Vec::new();
    let mut last_log = String::new();
    for round in 1..=MULTIPLEX_ROUNDS {
        bazel.set_stamp(&format!("{mnemonic} round {round}"));
        let before = match bazel.worker_logs(mnemonic).as_slice() {
            [log] => fs::read_to_string(log)
                .expect("read the multiplex worker log")
                .len(),
            _ => 0,
        };
        let text = bazel.build_ok(&as_strs(&labels(names)));
        let mut pids = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for name in names {
            assert_eq!(bazel.output_file(name), format!("{name}.txt\n"));
            let banner = action_output(&text, &format!("//demo:{name}"));
            pids.insert(banner.pid);
            ids.insert(banner.request_id);
        }
        assert_eq!(
            pids.len(),
            1,
            "round {round}: the multiplex requests went to more than one process:\n{text}"
        );
        let pid = *pids.iter().next().expect("one pid");
        if let Some(previous) = multiplex_pid {
            assert_eq!(
                previous, pid,
                "round {round}: a new multiplex worker process was started"
            );
        }
        multiplex_pid = Some(pid);

        let logs = bazel.worker_logs(mnemonic);
        assert_eq!(
            logs.len(),
            1,
            "one log file (one worker process) expected for {mnemonic}: {logs:?}"
        );
        let log = fs::read_to_string(&logs[0]).expect("read the multiplex worker log");
        assert!(
            log.contains(&format!("pid {pid} ")),
            "the multiplex worker log does not name process {pid}:\n{log}"
        );
        let this_round = &log[before.min(log.len())..];
        for name in names {
            assert!(
                this_round.contains(&format!("/{name}.txt\"")),
                "round {round}: the worker log has no request for {name}:\n{this_round}"
            );
        }
        let in_flight = max_in_flight(this_round);
        let critical = critical_path(&text)
            .unwrap_or_else(|| panic!("no `Critical Path:` in Bazel's output:\n{text}"));
        eprintln!(
            "bazel_real: {mnemonic} round {round}: pid {pid}, request ids {ids:?}, \
             at most {in_flight} in flight, critical path {critical:.2} s \
             (bound {MULTIPLEX_CRITICAL_PATH_S:.1} s, serial {:.1} s)",
            names.len() as f64 * MULTIPLEX_WORK_S
        );
        rounds.push((in_flight, critical));
        last_log = log;
        if in_flight >= names.len() && critical < MULTIPLEX_CRITICAL_PATH_S {
            assert_eq!(
                ids.len(),
                names.len(),
                "concurrent requests must have distinct ids: {ids:?}"
            );
            return pid;
        }
    }
    panic!(
        "the {} {mnemonic} requests never ran at once in {MULTIPLEX_ROUNDS} rounds \
         (in flight, critical path in s per round: {rounds:?}; a critical path of \
         {MULTIPLEX_CRITICAL_PATH_S} s or more means the worker did not overlap them); \
         its log:\n{last_log}",
        names.len()
    )
}

/// Builds the singleplex targets `names` in one worker process running in
/// `cwd_suffix`; returns its pid.
fn check_singleplex(bazel: &mut Bazel, names: &[String], stamp: &str, cwd_suffix: &str) -> u32 {
    bazel.set_stamp(stamp);
    let text = bazel.build_ok(&as_strs(&labels(names)));
    let count = names.len();
    // `INFO: 4 processes: 4 worker.` (Bazel 2.1) or `INFO: 5 processes: 1
    // internal, 4 worker.` (Bazel 4).
    let processes = text
        .lines()
        .find(|l| l.starts_with("INFO: ") && l.contains(" processes: "))
        .unwrap_or_default();
    assert!(
        processes.contains(&format!(" {count} worker")),
        "the {count} singleplex actions did not all run as worker actions:\n{text}"
    );
    let mut pids = BTreeSet::new();
    for name in names {
        assert_eq!(bazel.output_file(name), format!("{name}.txt\n"));
        let banner = action_output(&text, &format!("//demo:{name}"));
        assert!(
            banner.cwd.ends_with(cwd_suffix),
            "worker cwd {} does not end in {cwd_suffix}",
            banner.cwd
        );
        pids.insert(banner.pid);
    }
    assert_eq!(
        pids.len(),
        1,
        "one singleplex worker process was expected:\n{text}"
    );
    let pid = *pids.iter().next().expect("one pid");
    assert!(
        process_alive(pid),
        "singleplex worker {pid} is gone after the build"
    );
    let example = action_output(&text, &format!("//demo:{}", names[0]));
    eprintln!(
        "bazel_real: Bazel shows for //demo:{}:\n  INFO: From Demo worker action for //demo:{}:\n  {}",
        names[0],
        names[0],
        example.shown.replace('\n', "\n  ")
    );
    pid
}

/// A request the worker rejects fails the build with the worker's message;
/// the same process serves the next build of `after`.
fn check_failure(bazel: &mut Bazel, bad: &str, after: &str, pid: u32) {
    bazel.set_stamp(&format!("failure of {bad}"));
    let failed = bazel.build(&[&format!("//demo:{bad}")]);
    assert!(
        !failed.status.success(),
        "a request with two OUTFILEs must fail the build:\n{}",
        failed.text
    );
    assert!(
        // `... failed (Exit 2)` (Bazel 2.1) or `... failed: (Exit 2): ...`
        // (Bazel 4).
        failed.text.lines().any(|l| l
            .contains(&format!("Demo worker action for //demo:{bad} failed"))
            && l.contains("(Exit 2)")),
        "Bazel did not report the worker's exit code 2:\n{}",
        failed.text
    );
    let banner = action_output(&failed.text, &format!("//demo:{bad}"));
    assert_eq!(
        banner.pid, pid,
        "the failing request went to another process"
    );
    assert!(
        banner.shown.contains("usage:"),
        "Bazel did not show the worker's usage message:\n{}",
        failed.text
    );
    assert!(process_alive(pid), "the worker died after a failed request");
    let text = bazel.build_ok(&[&format!("//demo:{after}")]);
    assert_eq!(bazel.output_file(after), format!("{after}.txt\n"));
    let banner = action_output(&text, &format!("//demo:{after}"));
    assert_eq!(
        banner.pid, pid,
        "the build after the failure was not served by the same worker process"
    );
}

/// Everything goes away with the server: the server and the `alive`
/// workers run until `bazel shutdown`; afterwards they, the `earlier` ones
/// (which Bazel may already have replaced), and every other process naming
/// the output root are gone.
fn check_shutdown(bazel: &mut Bazel, alive: &[u32], earlier: &[u32]) {
    let server_pid = bazel.server_pid().expect("the Bazel server's pid file");
    let mut running = vec![server_pid];
    running.extend_from_slice(alive);
    for &pid in &running {
        assert!(
            process_alive(pid),
            "process {pid} is gone before `bazel shutdown`"
        );
    }
    let mut all = running;
    all.extend_from_slice(earlier);
    let left = bazel.shutdown();
    assert!(
        left.is_empty(),
        "processes left after `bazel shutdown` (waited {STRAY_TIMEOUT:?}): {left:#?}"
    );
    for &pid in &all {
        assert!(
            !process_alive(pid),
            "process {pid} survived `bazel shutdown`"
        );
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory")
}

fn one_bazel_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A failed sibling test poisons the lock; its Bazel is shut down anyway.
    ONE_BAZEL_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn real_bazel_drives_the_worker() {
    let _turn = one_bazel_at_a_time();
    let started = Instant::now();
    let dir = temp_dir("bazel-real.");
    let bazel_exe = match install_bazel(&dir.path().join("logs")) {
        Ok(exe) => exe,
        Err(why) => return skip(&format!("Bazel {BAZEL_VERSION}"), why),
    };
    eprintln!("bazel_real: using {}", bazel_exe.display());
    let build_flags = BUILD_FLAGS.iter().map(|f| f.to_string()).collect();
    let mut bazel = Bazel::new(bazel_exe, Vec::new(), build_flags, dir);
    let execroot_suffix = format!("/execroot/{WORKSPACE_NAME}");

    // Multiplex: 4 targets with --work-ms 2000 must run at once in a single
    // worker process.
    //
    // This case runs first on purpose. Bazel 2.1 numbers its workers from 0
    // per server and uses that number as the request_id, for multiplex
    // proxies too, so one of these requests carries id 0 (which also means
    // "singleplex"); it must still run alongside the others.
    let multiplex_pid = check_multiplex(&mut bazel, &names("multi", 4), "DemoMultiplex");

    // Singleplex: 4 targets, one worker process (--worker_max_instances=1),
    // every output checked.
    let single_pid = check_singleplex(
        &mut bazel,
        &names("single", 4),
        "singleplex",
        &execroot_suffix,
    );
    assert_ne!(
        single_pid, multiplex_pid,
        "multiplex and singleplex share a process"
    );

    check_failure(&mut bazel, "bad-args", "after-failure", single_pid);
    check_shutdown(&mut bazel, &[single_pid, multiplex_pid], &[]);
    eprintln!(
        "bazel_real: Bazel {BAZEL_VERSION} passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn real_bazel_4_drives_the_worker_over_json_and_sandboxed() {
    let _turn = one_bazel_at_a_time();
    let started = Instant::now();
    let (exe, startup) = match find_bazel_4() {
        Ok(found) => found,
        Err(why) => return skip("Bazel 4", why),
    };
    eprintln!("bazel_real: using {} {startup:?}", exe.display());
    let build_flags = BUILD_FLAGS
        .iter()
        .chain(BAZEL_4_BUILD_FLAGS)
        .map(|f| f.to_string())
        .collect();
    let mut bazel = Bazel::new(exe, startup, build_flags, temp_dir("bazel-real-4."));
    let execroot_suffix = format!("/execroot/{WORKSPACE_NAME}");

    // (Debian's build answers `bazel version` with "Version information not
    // available"; the JSON flag, which Bazel 2.1 rejects, shows the version
    // is new enough.)

    // JSON, multiplexed: 4 x 2 s overlapping in one process.
    let json_multiplex_pid =
        check_multiplex(&mut bazel, &names("json-multi", 4), "DemoJsonMultiplex");

    // JSON, singleplex, then a failing JSON request and a good one after it
    // in the same process.
    let json_pid = check_singleplex(
        &mut bazel,
        &names("json-single", 4),
        "json singleplex",
        &execroot_suffix,
    );
    assert!(
        process_alive(json_multiplex_pid),
        "the JSON multiplex worker {json_multiplex_pid} is gone after the singleplex build"
    );
    check_failure(&mut bazel, "json-bad-args", "json-single-0", json_pid);

    // Protobuf with --worker_sandboxing: Bazel stages each action's inputs in
    // a directory of the worker's own and starts the worker there.
    let sandboxed = names("sandboxed", 2);
    bazel.set_stamp("sandboxed");
    let text = bazel.build_ok_with(&["--worker_sandboxing"], &as_strs(&labels(&sandboxed)));
    let mut sandboxed_pids = BTreeSet::new();
    for name in &sandboxed {
        assert_eq!(bazel.output_file(name), format!("{name}.txt\n"));
        let banner = action_output(&text, &format!("//demo:{name}"));
        assert!(
            banner.cwd.contains("/bazel-workers/") && !banner.cwd.ends_with(&execroot_suffix),
            "a sandboxed worker ran in {}, not in a directory of its own under bazel-workers",
            banner.cwd
        );
        eprintln!(
            "bazel_real: sandboxed worker for {name} runs in {}",
            banner.cwd
        );
        sandboxed_pids.insert(banner.pid);
    }
    assert_eq!(
        sandboxed_pids.len(),
        1,
        "one sandboxed worker process was expected:\n{text}"
    );
    let sandboxed_pid = *sandboxed_pids.iter().next().expect("one pid");

    // Bazel 4 restarts its worker pool when worker options such as
    // --worker_sandboxing change, so only the sandboxed worker is still up.
    check_shutdown(
        &mut bazel,
        &[sandboxed_pid],
        &[json_multiplex_pid, json_pid],
    );
    eprintln!(
        "bazel_real: Bazel 4 passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
