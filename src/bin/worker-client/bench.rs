//! Timing a worker in any mode: start-up, throughput and latency
//! percentiles, as a table and optionally as JSON.
//!
//! Every worker first answers one warm-up request, which is what start-up
//! measures (spawn to first response: process start, socket or pipe set-up
//! and first request together, as a build tool experiences it). The timed
//! requests follow and are not mixed with the warm-up.

use std::fmt::Write as _;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::bazel::{self, Plan, StdioWorker};
use crate::{buck2, child, remote, Failure, Mode, Options, Outcome};

/// One benchmark's results.
pub struct Measurement {
    pub mode: Mode,
    /// How requests travel: `proto`, `json`, `grpc Execute`, ...
    pub transport: String,
    pub concurrency: usize,
    pub startup: Duration,
    /// Wall time of the timed requests.
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub failed: usize,
    /// The output of one failed request, to show why.
    pub first_failure: Option<String>,
    /// The worker's memory after the warm-up request and after the timed
    /// requests, when its `/proc` entry could be read.
    pub memory: Option<MemoryFigures>,
    /// Start-up times of the extra starts asked for with `--startup-runs`.
    pub starts: Vec<Duration>,
}

/// Resident and anonymous (private, not file-backed) memory of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub anon_kib: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFigures {
    pub idle: Memory,
    pub after: Memory,
    /// Peak resident set over the worker's life (`VmHWM`).
    pub peak_rss_kib: u64,
}

/// Reads `/proc/PID/smaps_rollup`; `None` where there is no such file.
pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(Memory {
        rss_kib: kib_field(&text, "Rss:")?,
        anon_kib: kib_field(&text, "Anonymous:")?,
    })
}

/// The peak resident set (`VmHWM` of `/proc/PID/status`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&text, "VmHWM:")
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Memory figures for a worker: `idle` read earlier, the rest now.
pub fn memory_now(pid: u32, idle: Option<Memory>) -> Option<MemoryFigures> {
    Some(MemoryFigures {
        idle: idle?,
        after: memory(pid)?,
        peak_rss_kib: peak_rss_kib(pid)?,
    })
}

pub fn run(options: &Options) -> Result<Outcome, Failure> {
    let Some(bench) = &options.bench else {
        return Err(Failure::Usage("no benchmark options".to_owned()));
    };
    let mut m = match options.mode {
        Mode::Bazel => stdio_bazel(options, bench.requests)?,
        Mode::Remote => stdio_remote(options, bench.requests)?,
        Mode::Buck2 => buck2::bench(options, bench.requests)?,
    };
    for _ in 0..bench.startup_runs {
        let start = match options.mode {
            Mode::Bazel => stdio_bazel_start(options)?,
            // Buck2 starts on the critical path end when the socket
            // accepts: that is when it could take its first request.
            Mode::Buck2 => buck2::time_to_accepting(options)?,
            Mode::Remote => {
                return Err(Failure::Usage(
                    "--startup-runs applies to bazel and buck2 mode".to_owned(),
                ))
            }
        };
        m.starts.push(start);
    }
    print!("{}", table(&m, &options.command));
    if let Some(path) = &bench.json_out {
        std::fs::write(path, json(&m, &options.command))
            .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", path.display())))?;
    }
    if let Some(output) = &m.first_failure {
        eprintln!(
            "worker-client: {} of {} requests failed; the first said:\n{}",
            m.failed,
            m.latencies.len(),
            bazel::indent(output)
        );
    }
    Ok(Outcome {
        failed_requests: m.failed,
    })
}

/// A worker that has answered its warm-up request.
struct Warm {
    worker: StdioWorker,
    startup: Duration,
}

fn warm_up(mut worker: StdioWorker, plan: &Plan) -> Result<Warm, Failure> {
    bazel::drive(&mut worker, plan, &mut |_| {})?;
    let startup = worker.spawned.elapsed();
    Ok(Warm { worker, startup })
}

fn stdio_bazel(options: &Options, requests: usize) -> Result<Measurement, Failure> {
    let c = options.concurrency;
    let multiplex = c > 1 || options.multiplex.is_some();
    let mut all = bazel::plan(options, requests + 1, c, multiplex);
    let timed = Plan {
        requests: all.requests.split_off(1),
        ..bazel::plan(options, 0, c, multiplex)
    };
    let argv = bazel::worker_argv(&options.command);
    let worker = StdioWorker::spawn(&bazel::Config {
        argv: &argv,
        cwd: options.cwd.as_deref(),
        format: bazel::format_of(options),
        all_fields: false,
        echo_stderr: options.worker_stderr,
        discard_stderr: false,
    })?;
    let Warm {
        mut worker,
        startup,
    } = warm_up(worker, &all)?;
    let idle = memory(worker.pid());
    let start = Instant::now();
    let answers = bazel::drive(&mut worker, &timed, &mut |_| {})?;
    let elapsed = start.elapsed();
    let memory = memory_now(worker.pid(), idle);
    worker.finish()?;
    let transport = format!(
        "{}{}",
        if options.json { "json" } else { "proto" },
        if multiplex { " multiplex" } else { "" }
    );
    let mut m = Measurement::new(Mode::Bazel, &transport, c);
    m.startup = startup;
    m.elapsed = elapsed;
    m.memory = memory;
    for a in &answers {
        m.record(a.latency, a.response.exit_code, &a.response.output);
    }
    Ok(m)
}

/// One more start of the worker: spawn to the first response.
fn stdio_bazel_start(options: &Options) -> Result<Duration, Failure> {
    let multiplex = options.concurrency > 1 || options.multiplex.is_some();
    let plan = bazel::plan(options, 1, 1, multiplex);
    let argv = bazel::worker_argv(&options.command);
    let worker = StdioWorker::spawn(&bazel::Config {
        argv: &argv,
        cwd: options.cwd.as_deref(),
        format: bazel::format_of(options),
        all_fields: false,
        echo_stderr: options.worker_stderr,
        discard_stderr: false,
    })?;
    let warm = warm_up(worker, &plan)?;
    warm.worker.finish()?;
    Ok(warm.startup)
}

/// `C` workers, one request at a time each, as `C` executor runners would
/// hold one recycled worker each.
fn stdio_remote(options: &Options, requests: usize) -> Result<Measurement, Failure> {
    let c = options.concurrency;
    let quiet = Options {
        quiet: true,
        ..options.clone()
    };
    let (argv, request) = remote::prepare(&quiet)?;
    let barrier = Arc::new(Barrier::new(c));
    let threads: Vec<_> = (0..c)
        .map(|i| {
            let share = requests / c + usize::from(i < requests % c);
            let (argv, request, barrier) = (argv.clone(), request.clone(), Arc::clone(&barrier));
            let options = quiet.clone();
            std::thread::spawn(move || {
                let plan = |count| Plan {
                    requests: vec![request.clone(); count],
                    window: 1,
                    cancel_after: None,
                    timeout: options.timeout,
                };
                let warmed = remote::spawn(&options, &argv).and_then(|w| warm_up(w, &plan(1)));
                // Everyone waits, even a failed worker, so no thread is
                // left behind at the barrier.
                barrier.wait();
                let Warm {
                    mut worker,
                    startup,
                } = warmed?;
                let start = Instant::now();
                let answers = bazel::drive(&mut worker, &plan(share), &mut |_| {})?;
                let done = start.elapsed();
                worker.finish()?;
                Ok::<_, Failure>((startup, done, answers))
            })
        })
        .collect();
    let transport = if options.json { "json" } else { "proto" };
    let mut m = Measurement::new(Mode::Remote, transport, c);
    let mut first_error = None;
    for thread in threads {
        match thread.join() {
            Ok(Ok((startup, done, answers))) => {
                m.startup = m.startup.max(startup);
                m.elapsed = m.elapsed.max(done);
                for a in &answers {
                    m.record(a.latency, a.response.exit_code, &a.response.output);
                }
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error
                    .get_or_insert(Failure::Worker("a benchmark thread panicked".to_owned()));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(m),
    }
}

impl Measurement {
    /// An empty measurement; `record` adds the answers.
    pub fn new(mode: Mode, transport: &str, concurrency: usize) -> Measurement {
        Measurement {
            mode,
            transport: transport.to_owned(),
            concurrency,
            startup: Duration::ZERO,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            failed: 0,
            first_failure: None,
            memory: None,
            starts: Vec::new(),
        }
    }

    pub fn record(&mut self, latency: Duration, exit_code: i32, output: &str) {
        self.latencies.push(latency);
        if exit_code != 0 {
            self.failed += 1;
            self.first_failure.get_or_insert_with(|| output.to_owned());
        }
    }

    fn sorted_ms(&self) -> Vec<f64> {
        let mut ms: Vec<f64> = self
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    }

    fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.latencies.len() as f64 / secs
        } else {
            0.0
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The middle of sorted values (the mean of the two middle ones for an
/// even count).
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn table(m: &Measurement, command: &[String]) -> String {
    let ms = m.sorted_ms();
    let row = [
        m.mode.name().to_owned(),
        m.transport.clone(),
        m.latencies.len().to_string(),
        m.concurrency.to_string(),
        format!("{:.2}", m.startup.as_secs_f64() * 1000.0),
        format!("{:.0}", m.throughput()),
        format!("{:.3}", percentile(&ms, 50.0)),
        format!("{:.3}", percentile(&ms, 90.0)),
        format!("{:.3}", percentile(&ms, 99.0)),
        format!("{:.3}", percentile(&ms, 99.9)),
        m.failed.to_string(),
    ];
    let header = [
        "mode",
        "protocol",
        "requests",
        "concurrency",
        "start-up ms",
        "requests/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "failed",
    ];
    let mut out = format!("worker: {}\n", child::show_command(command));
    let widths: Vec<usize> = header
        .iter()
        .zip(&row)
        .map(|(h, r)| h.len().max(r.len()))
        .collect();
    for cells in [header.map(str::to_owned), row] {
        let line: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:>w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  "));
    }
    out
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number as JSON (NaN and infinities have no JSON spelling).
fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".to_owned()
    }
}

/// The share (0 to 1) of the sorted latencies `ms` above `limit_ms`.
fn over_share(ms: &[f64], limit_ms: f64) -> f64 {
    if ms.is_empty() {
        return 0.0;
    }
    let within = ms.partition_point(|&x| x <= limit_ms);
    (ms.len() - within) as f64 / ms.len() as f64
}

pub fn json(m: &Measurement, command: &[String]) -> String {
    let ms = m.sorted_ms();
    let mean = if ms.is_empty() {
        0.0
    } else {
        ms.iter().sum::<f64>() / ms.len() as f64
    };
    let command: Vec<String> = command.iter().map(|a| json_string(a)).collect();
    let memory = match &m.memory {
        Some(f) => format!(
            ",\n  \"memory_kib\": {{\"idle_rss\": {}, \"idle_anon\": {}, \"after_rss\": {}, \
             \"after_anon\": {}, \"peak_rss\": {}}}",
            f.idle.rss_kib, f.idle.anon_kib, f.after.rss_kib, f.after.anon_kib, f.peak_rss_kib
        ),
        None => String::new(),
    };
    let starts = if m.starts.is_empty() {
        String::new()
    } else {
        let mut ms: Vec<f64> = m.starts.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        format!(
            ",\n  \"startup_runs\": {},\n  \"startup_median_ms\": {}",
            ms.len(),
            json_number(median(&ms))
        )
    };
    format!(
        "{{\n  \"mode\": {},\n  \"protocol\": {},\n  \"worker\": [{}],\n  \"requests\": {},\n  \
         \"concurrency\": {},\n  \"failed\": {},\n  \"startup_ms\": {},\n  \"elapsed_ms\": {},\n  \
         \"throughput_per_s\": {},\n  \"latency_ms\": {{\"min\": {}, \"mean\": {}, \"p50\": {}, \
         \"p90\": {}, \"p99\": {}, \"p999\": {}, \"max\": {}, \"over_2ms_share\": {}}}{}{}\n}}\n",
        json_string(m.mode.name()),
        json_string(&m.transport),
        command.join(", "),
        m.latencies.len(),
        m.concurrency,
        m.failed,
        json_number(m.startup.as_secs_f64() * 1000.0),
        json_number(m.elapsed.as_secs_f64() * 1000.0),
        json_number(m.throughput()),
        json_number(ms.first().copied().unwrap_or(0.0)),
        json_number(mean),
        json_number(percentile(&ms, 50.0)),
        json_number(percentile(&ms, 90.0)),
        json_number(percentile(&ms, 99.0)),
        json_number(percentile(&ms, 99.9)),
        json_number(ms.last().copied().unwrap_or(0.0)),
        // The share of requests that waited about a scheduler tick or more:
        // under load a p99 flips with it, the share does not.
        json_number(over_share(&ms, 2.0)),
        memory,
        starts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 90.0), 90.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn the_share_over_a_limit_counts_only_what_exceeds_it() {
        assert_eq!(over_share(&[0.5, 1.0, 2.0, 2.5, 4.0], 2.0), 0.4);
        assert_eq!(over_share(&[0.1, 0.2], 2.0), 0.0);
        assert_eq!(over_share(&[], 2.0), 0.0);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
    }
}
