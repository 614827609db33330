//! What one benchmark records (latencies, failures, start-up, a worker's
//! memory) and the statistics read off it (percentiles, median).
//!
//! Both the stdio drivers in `bench` and the gRPC driver in `buck2` fill a
//! [`Measurement`]; keeping it here lets `bench` call `buck2` without `buck2`
//! reaching back into `bench`.

use std::time::Duration;

use crate::Mode;

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

    pub fn sorted_ms(&self) -> Vec<f64> {
        let mut ms: Vec<f64> = self
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    }

    pub fn throughput(&self) -> f64 {
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
