//! The probes that talk to the worker on stdin/stdout: the Bazel protocol
//! in proto (round trip, sequence, ids, a clean stdout, exit at EOF, a
//! malformed request), multiplex and cancel, JSON, `sandbox_dir` and
//! argument files, and memory. Each probe starts a worker of its own, so a
//! worker broken by one probe cannot spoil the verdict of the next.
//!
//! Every wait has a deadline of `--timeout-ms`; timing verdicts compare a
//! gap with the slow request's own duration, measured on the same worker,
//! so a loaded machine slows both sides alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};

use super::report::{quote, Evidence, Feature, Row, Verdict};
use super::{Ctx, Instance};
use crate::bazel::{self, Config, Event, Plan, StdioWorker};
use crate::child;

/// How long a worker has to exit once its stdin closes: NativeLink's grace,
/// the shortest of the engines'.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// How the reading of responses ended.
pub enum End {
    /// As many responses as wanted.
    Done,
    /// stdout closed.
    Eof,
    /// stdout held something that is not a response.
    Broken(String, Vec<u8>),
    /// Nothing (more) by the deadline; what stdout held after the last
    /// complete response, and how many bytes that was.
    Timeout(Vec<u8>, usize),
}

pub struct Seen {
    pub responses: Vec<(WorkResponse, Instant)>,
    pub end: End,
}

impl Seen {
    /// Stray bytes on stdout, if the reading ended on them.
    fn stray(&self) -> Option<String> {
        match &self.end {
            End::Broken(error, shown) => Some(format!(
                "stdout is not a stream of responses ({error}); last bytes: {:?}",
                String::from_utf8_lossy(shown)
            )),
            End::Timeout(pending, n) if *n > 0 => Some(format!(
                "{n} byte(s) on stdout that do not form a response: {:?}",
                String::from_utf8_lossy(pending)
            )),
            _ => None,
        }
    }

    fn ids(&self) -> Vec<i32> {
        self.responses.iter().map(|(r, _)| r.request_id).collect()
    }
}

/// How long bytes on stdout that do not form a response may go without
/// growing before they are judged stray. A worker writes a response in one
/// go, so its bytes follow each other at once; a stray line ahead of a
/// response reads as the start of a frame that never ends, and without
/// this every probe would wait out its whole `--timeout-ms` on it.
const STALL: Duration = Duration::from_secs(1);

/// Reads responses until `enough` holds, the stream ends, or `deadline`.
fn collect(
    worker: &StdioWorker,
    deadline: Instant,
    enough: impl Fn(&[(WorkResponse, Instant)]) -> bool,
) -> Seen {
    let mut responses = Vec::new();
    // Pending bytes at the last look: unchanged over a whole STALL, stray.
    let mut pending_before = 0;
    loop {
        if enough(&responses) {
            return Seen {
                responses,
                end: End::Done,
            };
        }
        let step = deadline.min(Instant::now() + STALL);
        let end = match worker.next_event(step) {
            Some(Event::Response(r, at)) => {
                responses.push((r, at));
                pending_before = 0;
                continue;
            }
            Some(Event::Eof) => End::Eof,
            Some(Event::Broken(error, shown)) => End::Broken(error, shown),
            None => {
                let (pending, n) = worker.pending_stdout();
                if Instant::now() < deadline && (n == 0 || n != pending_before) {
                    pending_before = n;
                    continue;
                }
                End::Timeout(pending, n)
            }
        };
        return Seen { responses, end };
    }
}

/// Sends `requests` at once and reads as many responses.
fn exchange(worker: &mut StdioWorker, requests: &[WorkRequest], timeout: Duration) -> Seen {
    for request in requests {
        if let Err(e) = worker.send(request) {
            return Seen {
                responses: Vec::new(),
                end: End::Broken(e.to_string(), Vec::new()),
            };
        }
    }
    let want = requests.len();
    collect(worker, Instant::now() + timeout, |r| r.len() >= want)
}

pub fn request(args: &[String], id: i32) -> WorkRequest {
    let mut r = WorkRequest::new();
    r.arguments = args.to_vec();
    r.request_id = id;
    r
}

fn spawn(ctx: &Ctx, extra: &[String], format: WireFormat) -> Result<StdioWorker, String> {
    let argv = ctx.argv(extra);
    StdioWorker::spawn(&Config {
        argv: &argv,
        cwd: Some(&ctx.check.cwd),
        format,
        all_fields: false,
        echo_stderr: false,
        discard_stderr: false,
    })
    .map_err(|e| e.to_string())
}

pub fn show_request(r: &WorkRequest) -> String {
    let mut text = format!("request_id {} arguments {:?}", r.request_id, r.arguments);
    if r.cancel {
        text = format!("cancel request_id {}", r.request_id);
    }
    if !r.sandbox_dir.is_empty() {
        text.push_str(&format!(" sandbox_dir {}", r.sandbox_dir));
    }
    text
}

fn show_requests(rs: &[WorkRequest]) -> String {
    rs.iter().map(show_request).collect::<Vec<_>>().join("\n")
}

fn show_response(r: &WorkResponse) -> String {
    let status = if r.was_cancelled {
        "was_cancelled".to_owned()
    } else {
        format!("exit_code {}", r.exit_code)
    };
    let output = r.output.trim_end();
    if output.is_empty() {
        format!("response request_id {} {status}", r.request_id)
    } else {
        format!(
            "response request_id {} {status} output {:?}",
            r.request_id,
            super::report::tail_lines(output, 3)
        )
    }
}

/// Everything that came back, and how the reading ended.
fn show_seen(seen: &Seen, timeout: Duration) -> String {
    let mut lines: Vec<String> = seen
        .responses
        .iter()
        .map(|(r, _)| show_response(r))
        .collect();
    match &seen.end {
        End::Done => {}
        End::Eof => lines.push("then stdout closed (the worker ended)".to_owned()),
        End::Broken(..) | End::Timeout(_, 1..) => lines.push(seen.stray().unwrap_or_default()),
        End::Timeout(..) => lines.push(format!("then nothing within {} ms", timeout.as_millis())),
    }
    lines.join("\n")
}

fn evidence(worker: &StdioWorker, sent: String, got: String) -> Option<Evidence> {
    Some(Evidence {
        sent,
        got,
        stderr: worker.stderr_tail(Duration::from_millis(200)),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Whether a response did what the request asked: exit code 0 and, when
/// the template names `{out}`, that file under `dir`. Without a request of
/// the author's, any answer will do: an empty request may well fail.
fn judge(ctx: &Ctx, inst: &Instance, r: &WorkResponse, dir: &Path) -> Result<String, String> {
    if ctx.check.request.is_none() {
        return Ok(format!(
            "answered the empty request (exit_code {})",
            r.exit_code
        ));
    }
    if r.exit_code != 0 {
        return Err(format!(
            "exit_code {}: {}",
            r.exit_code,
            super::report::tail_lines(r.output.trim_end(), 1)
        ));
    }
    match &inst.out {
        Some(out) if !dir.join(out).exists() => Err(format!(
            "exit_code 0 but {} was not written",
            dir.join(out).display()
        )),
        Some(out) => Ok(format!("exit_code 0, wrote {out}")),
        None => Ok("exit_code 0".to_owned()),
    }
}

fn unjudged_rows(rows: &mut Vec<Row>, ids: &[(&'static str, Feature)], why: &str) {
    for (id, feature) in ids {
        rows.push(Row::new(id, *feature, Verdict::Unjudged, why.to_owned()));
    }
}

/// Singleplex proto on one worker: the round trip (start-up time), a
/// sequence, ids echoed, memory, stdout kept clean, exit at EOF.
pub fn core(ctx: &Ctx) -> Vec<Row> {
    let timeout = ctx.check.timeout;
    let mut rows = Vec::new();
    let later = [
        ("proto.sequence", Feature::Proto),
        ("proto.ids", Feature::Proto),
        ("proto.stdout", Feature::Proto),
        ("proto.eof", Feature::Proto),
        ("resources.startup", Feature::Resources),
        ("resources.rss", Feature::Resources),
    ];
    let mut worker = match spawn(ctx, &[], WireFormat::Proto) {
        Ok(w) => w,
        Err(e) => {
            rows.push(Row::new(
                "proto.roundtrip",
                Feature::Proto,
                Verdict::Broken,
                e,
            ));
            unjudged_rows(&mut rows, &later, "the worker did not start");
            return rows;
        }
    };
    // Stray bytes anywhere on stdout, for proto.stdout.
    let mut stray: Option<(String, String, String)> = None;
    let inst = ctx.request();
    let first_request = request(&inst.args, 0);
    let seen = exchange(&mut worker, std::slice::from_ref(&first_request), timeout);
    let note_stray = |seen: &Seen, sent: &str, stray: &mut Option<(String, String, String)>| {
        if stray.is_none() {
            if let Some(what) = seen.stray() {
                *stray = Some((what, sent.to_owned(), show_seen(seen, timeout)));
            }
        }
    };
    note_stray(&seen, &show_request(&first_request), &mut stray);
    let roundtrip = match seen.responses.first() {
        Some((r, _)) if r.request_id != 0 => Err(format!(
            "answered request 0 with request_id {}",
            r.request_id
        )),
        Some((r, at)) => judge(ctx, &inst, r, &ctx.check.cwd)
            .map(|how| (how, at.saturating_duration_since(worker.spawned))),
        None => Err(match seen.stray() {
            Some(stray) => stray,
            None => format!("no response: {}", show_seen(&seen, timeout)),
        }),
    };
    let startup = match roundtrip {
        Ok((how, startup)) => {
            rows.push(Row::new(
                "proto.roundtrip",
                Feature::Proto,
                Verdict::Supported,
                format!("{how}; first response {} after start", ms(startup)),
            ));
            startup
        }
        Err(why) => {
            let ev = evidence(
                &worker,
                show_request(&first_request),
                show_seen(&seen, timeout),
            );
            rows.push(Row::new("proto.roundtrip", Feature::Proto, Verdict::Broken, why).with(ev));
            unjudged_rows(&mut rows, &later[..2], "the round trip failed");
            // Nothing came back at all: a clean stdout is not shown by that.
            if stray.is_some() || !seen.responses.is_empty() {
                rows.push(stdout_row(stray, &worker));
            } else {
                unjudged_rows(&mut rows, &later[2..3], "the round trip failed");
            }
            unjudged_rows(&mut rows, &later[3..], "the round trip failed");
            return rows;
        }
    };
    let rss_start = crate::measurement::memory(worker.pid());

    // Eight in turn, each once its predecessor is answered, as every client
    // drives a singleplex worker. Requests written together are a multiplex
    // matter (multiplex.ids): @bazel/worker, for one, reads one request per
    // read of stdin and leaves the rest waiting.
    let mut sequence = Ok(());
    let mut sent_all = Vec::new();
    for _ in 0..8 {
        let r = request(&ctx.request().args, 0);
        sent_all.push(r.clone());
        let seen = exchange(&mut worker, std::slice::from_ref(&r), timeout);
        note_stray(&seen, &show_request(&r), &mut stray);
        if seen.ids() != [0] {
            sequence = Err(seen);
            break;
        }
    }
    match sequence {
        Ok(()) => rows.push(Row::new(
            "proto.sequence",
            Feature::Proto,
            Verdict::Supported,
            "8 more requests in turn, each answered once".to_owned(),
        )),
        Err(seen) => {
            let ev = evidence(&worker, show_requests(&sent_all), show_seen(&seen, timeout));
            rows.push(
                Row::new(
                    "proto.sequence",
                    Feature::Proto,
                    Verdict::Broken,
                    format!(
                        "after {} request(s): {}",
                        sent_all.len(),
                        show_seen(&seen, timeout).lines().last().unwrap_or("")
                    ),
                )
                .with(ev),
            );
            unjudged_rows(&mut rows, &later[1..2], "the sequence failed");
            rows.push(stdout_row(stray, &worker));
            unjudged_rows(&mut rows, &later[3..], "the sequence failed");
            return rows;
        }
    }

    // Old Bazel (2.1) sends non-zero ids to singleplex workers.
    let mut ids_row = None;
    for id in [7, 8] {
        let r = request(&ctx.request().args, id);
        let seen = exchange(&mut worker, std::slice::from_ref(&r), timeout);
        note_stray(&seen, &show_request(&r), &mut stray);
        if seen.ids() != [id] {
            let why = match seen.responses.first() {
                Some((got, _)) => format!(
                    "answered request {id} with request_id {}: ids must be echoed",
                    got.request_id
                ),
                None => format!("request {id}: {}", show_seen(&seen, timeout)),
            };
            let ev = evidence(&worker, show_request(&r), show_seen(&seen, timeout));
            ids_row = Some(Row::new("proto.ids", Feature::Proto, Verdict::Broken, why).with(ev));
            break;
        }
    }
    let ids_ok = ids_row.is_none();
    rows.push(ids_row.unwrap_or_else(|| {
        Row::new(
            "proto.ids",
            Feature::Proto,
            Verdict::Supported,
            "non-zero ids 7 and 8 on singleplex requests echoed (old Bazel sends them)".to_owned(),
        )
    }));

    let mut resources = vec![Row::new(
        "resources.startup",
        Feature::Resources,
        Verdict::Measured,
        format!("spawn to first response: {}", ms(startup)),
    )];
    if ctx.runs(Feature::Resources) && ids_ok {
        resources.push(rss(ctx, &mut worker, rss_start));
    }

    rows.push(stdout_row(stray.clone(), &worker));
    if stray.is_some() {
        unjudged_rows(&mut rows, &later[3..4], "stdout was not clean");
        rows.extend(resources);
        return rows;
    }
    let stderr = worker.stderr_tail(Duration::ZERO);
    let closed = Instant::now();
    let eof = match worker.close_and_wait(EXIT_GRACE) {
        Ok(Some(status)) if status.success() => Row::new(
            "proto.eof",
            Feature::Proto,
            Verdict::Supported,
            format!("exited with status 0, {} after stdin closed", ms(closed.elapsed())),
        ),
        Ok(Some(status)) => Row::new(
            "proto.eof",
            Feature::Proto,
            Verdict::Broken,
            format!(
                "the worker {} {} after stdin closed (expected status 0)",
                child::describe(status),
                ms(closed.elapsed())
            ),
        )
        .with(Some(Evidence {
            sent: "stdin closed".to_owned(),
            got: String::new(),
            stderr,
        })),
        // Not broken: every client still gets its answers. But the remote
        // engines stop a worker by closing its stdin and kill it only after
        // their grace, so each stop costs them that long.
        Ok(None) => Row::new(
            "proto.eof",
            Feature::Proto,
            Verdict::Unsupported,
            format!(
                "did not exit within {:.0} s of stdin closing; killed it (engines kill after 5-10 s)",
                EXIT_GRACE.as_secs_f64()
            ),
        )
        .with(Some(Evidence {
            sent: "stdin closed".to_owned(),
            got: String::new(),
            stderr,
        })),
        Err(e) => Row::new("proto.eof", Feature::Proto, Verdict::Broken, first(&e.to_string()))
            .with(Some(Evidence {
                sent: "stdin closed".to_owned(),
                got: e.to_string(),
                stderr: String::new(),
            })),
    };
    rows.push(eof);
    rows.extend(resources);
    rows
}

fn first(text: &str) -> String {
    text.lines().next().unwrap_or("").to_owned()
}

fn stdout_row(stray: Option<(String, String, String)>, worker: &StdioWorker) -> Row {
    match stray {
        None => Row::new(
            "proto.stdout",
            Feature::Proto,
            Verdict::Supported,
            "nothing but responses on stdout".to_owned(),
        ),
        Some((what, sent, got)) => Row::new(
            "proto.stdout",
            Feature::Proto,
            Verdict::Broken,
            what.clone(),
        )
        .with(evidence(worker, sent, format!("{got}\n({what})"))),
    }
}

/// Memory after the first response, and after `--rss-requests` more.
fn rss(ctx: &Ctx, worker: &mut StdioWorker, start: Option<crate::measurement::Memory>) -> Row {
    let n = ctx.check.rss_requests;
    let plan = Plan {
        requests: (0..n).map(|_| request(&ctx.request().args, 0)).collect(),
        window: 1,
        cancel_after: None,
        timeout: ctx.check.timeout,
    };
    let began = Instant::now();
    if let Err(e) = bazel::drive(worker, &plan, &mut |_| {}) {
        return Row::new(
            "resources.rss",
            Feature::Resources,
            Verdict::Broken,
            format!("during {n} requests: {}", first(&e.to_string())),
        )
        .with(Some(Evidence {
            sent: format!("{n} requests like {}", show_request(&plan.requests[0])),
            got: e.to_string(),
            stderr: String::new(),
        }));
    }
    let took = began.elapsed();
    let mib = |kib: u64| kib as f64 / 1024.0;
    match (start, crate::measurement::memory(worker.pid())) {
        (Some(a), Some(b)) => Row::new(
            "resources.rss",
            Feature::Resources,
            Verdict::Measured,
            format!(
                "{:.1} MiB after start, {:.1} MiB after {n} requests ({:+.1}); {n} requests took {}",
                mib(a.rss_kib),
                mib(b.rss_kib),
                mib(b.rss_kib) - mib(a.rss_kib),
                ms(took)
            ),
        ),
        _ => Row::new(
            "resources.rss",
            Feature::Resources,
            Verdict::Unjudged,
            format!(
                "/proc/{}/smaps_rollup not readable; {n} requests took {}",
                worker.pid(),
                ms(took)
            ),
        ),
    }
}

/// A request that does not parse (a field whose length runs past the
/// frame), then two good ones; the worker may answer the bad one with an
/// error, skip it, or exit, but must not answer garbage or stall.
pub fn malformed(ctx: &Ctx) -> Vec<Row> {
    let timeout = ctx.check.timeout;
    let id = "proto.malformed";
    let mut worker = match spawn(ctx, &[], WireFormat::Proto) {
        Ok(w) => w,
        Err(e) => return vec![Row::new(id, Feature::Proto, Verdict::Broken, e)],
    };
    // Frame length 2: field 1 (arguments), length-delimited, whose length
    // varint never ends.
    const BAD: [u8; 3] = [0x02, 0x0a, 0xff];
    let good = request(&ctx.request().args, 0);
    let marker = request(&ctx.request().args, 9);
    let sent = format!(
        "a frame that does not parse: {BAD:02x?}\n{}\n{}",
        show_request(&good),
        show_request(&marker)
    );
    let wrote = worker.send_raw(&BAD) && worker.send(&good).is_ok() && worker.send(&marker).is_ok();
    let seen = collect(&worker, Instant::now() + timeout, |r| {
        r.iter().any(|(r, _)| r.request_id == 9)
    });
    let before: Vec<&WorkResponse> = seen
        .responses
        .iter()
        .map(|(r, _)| r)
        .take_while(|r| r.request_id != 9)
        .collect();
    let got = show_seen(&seen, timeout);
    let (verdict, why) = match &seen.end {
        _ if before.iter().any(|r| r.request_id != 0) => (
            Verdict::Broken,
            "answered with a request_id no request had".to_owned(),
        ),
        End::Done if before.len() == 2 => (
            Verdict::Supported,
            format!(
                "answered it (exit_code {}), then the next requests",
                before[0].exit_code
            ),
        ),
        End::Done if before.len() == 1 => (
            Verdict::Supported,
            "skipped it and answered the next requests".to_owned(),
        ),
        End::Done => (
            Verdict::Broken,
            format!(
                "{} responses for 2 requests before the marker",
                before.len()
            ),
        ),
        End::Eof => (
            Verdict::Supported,
            "exited on it: a client sees a dead worker and starts another".to_owned(),
        ),
        End::Broken(..) | End::Timeout(_, 1..) => {
            (Verdict::Broken, seen.stray().unwrap_or_default())
        }
        End::Timeout(..) if !wrote => (
            Verdict::Supported,
            "stopped reading its stdin on it (closed it)".to_owned(),
        ),
        End::Timeout(..) => (
            Verdict::Broken,
            format!(
                "neither answered the next requests nor exited within {} ms: a client waits \
                 until its own timeout",
                timeout.as_millis()
            ),
        ),
    };
    let ev = evidence(&worker, sent, got);
    vec![Row::new(id, Feature::Proto, verdict, why).with(ev)]
}

/// Multiplex ids, overlap and cancel, on one worker.
pub fn multiplex(ctx: &Ctx) -> Vec<Row> {
    let timeout = ctx.check.timeout;
    let mut rows = Vec::new();
    let mut worker = match spawn(ctx, &[], WireFormat::Proto) {
        Ok(w) => w,
        Err(e) => {
            rows.push(Row::new(
                "multiplex.ids",
                Feature::Multiplex,
                Verdict::Broken,
                e,
            ));
            return rows;
        }
    };
    // Two requests alone first: they take the start-up out of the pair's
    // timing, and the second one's length bounds how long the second
    // answer of the pair may lag.
    let mut warm = request(&ctx.request().args, 1);
    let mut began = Instant::now();
    let mut seen = exchange(&mut worker, std::slice::from_ref(&warm), timeout);
    if seen.ids() == [1] {
        warm = request(&ctx.request().args, 1);
        began = Instant::now();
        seen = exchange(&mut worker, std::slice::from_ref(&warm), timeout);
    }
    if seen.ids() != [1] {
        let ev = evidence(&worker, show_request(&warm), show_seen(&seen, timeout));
        rows.push(
            Row::new(
                "multiplex.ids",
                Feature::Multiplex,
                Verdict::Broken,
                format!("request 1 alone: {}", first(&show_seen(&seen, timeout))),
            )
            .with(ev),
        );
        unjudged_rows(
            &mut rows,
            &[
                ("multiplex.overlap", Feature::Multiplex),
                ("cancel", Feature::Cancel),
            ],
            "multiplex ids failed",
        );
        return rows;
    }
    let one = began.elapsed();
    let pair = [
        request(&ctx.request().args, 2),
        request(&ctx.request().args, 3),
    ];
    let seen = pair_exchange(&mut worker, &pair, timeout, lag(one));
    let mut ids = seen.ids();
    let order = ids.clone();
    ids.sort_unstable();
    if ids != [2, 3] || !matches!(seen.end, End::Done) {
        let why = match seen
            .responses
            .iter()
            .find(|(r, _)| ![2, 3].contains(&r.request_id))
        {
            Some((r, _)) => format!(
                "answered request_id {} to requests 2 and 3: ids must be echoed",
                r.request_id
            ),
            None if matches!(seen.end, End::Timeout(_, 0)) && !order.is_empty() => format!(
                "requests 2 and 3 written together: answered only {order:?}, then nothing \
                 within {} (one alone takes {}): a request that arrives with another is \
                 left unread",
                ms(lag(one)),
                ms(one)
            ),
            None => format!("requests 2 and 3 together: got ids {order:?}"),
        };
        // A wrong id or stray bytes break any client; a second request left
        // unanswered only says the worker is not a multiplex one.
        let verdict = if seen.stray().is_some()
            || seen
                .responses
                .iter()
                .any(|(r, _)| ![2, 3].contains(&r.request_id))
            || ids.windows(2).any(|w| w[0] == w[1])
        {
            Verdict::Broken
        } else {
            Verdict::Unsupported
        };
        let ev = evidence(&worker, show_requests(&pair), show_seen(&seen, lag(one)));
        rows.push(Row::new("multiplex.ids", Feature::Multiplex, verdict, why).with(ev));
        unjudged_rows(
            &mut rows,
            &[
                ("multiplex.overlap", Feature::Multiplex),
                ("cancel", Feature::Cancel),
            ],
            "multiplex ids failed",
        );
        return rows;
    }
    rows.push(Row::new(
        "multiplex.ids",
        Feature::Multiplex,
        Verdict::Supported,
        "requests 2 and 3 sent together, each answered once with its id".to_owned(),
    ));

    let Some(slow) = ctx.slow() else {
        let overlap = if order == [3, 2] {
            Row::new(
                "multiplex.overlap",
                Feature::Multiplex,
                Verdict::Supported,
                "request 3 answered before request 2: they ran at once".to_owned(),
            )
        } else {
            Row::new(
                "multiplex.overlap",
                Feature::Multiplex,
                Verdict::Unjudged,
                "answered in the order sent; give --slow-request to time them".to_owned(),
            )
        };
        rows.push(overlap);
        rows.push(Row::new(
            "cancel",
            Feature::Cancel,
            Verdict::Unjudged,
            "give --slow-request: a cancel needs a request still running".to_owned(),
        ));
        return rows;
    };

    // The slow request alone: the yardstick for the other two probes.
    let alone = request(&slow.args, 4);
    let sent = Instant::now();
    let seen = exchange(&mut worker, std::slice::from_ref(&alone), timeout);
    let Some(length) = seen
        .responses
        .first()
        .filter(|(r, _)| r.request_id == 4 && !r.was_cancelled)
        .map(|(_, at)| at.saturating_duration_since(sent))
    else {
        let ev = evidence(&worker, show_request(&alone), show_seen(&seen, timeout));
        rows.push(
            Row::new(
                "multiplex.overlap",
                Feature::Multiplex,
                Verdict::Broken,
                "the slow request alone was not answered".to_owned(),
            )
            .with(ev),
        );
        unjudged_rows(
            &mut rows,
            &[("cancel", Feature::Cancel)],
            "the slow request failed",
        );
        return rows;
    };
    if let Some((r, _)) = seen.responses.first().filter(|(r, _)| r.exit_code != 0) {
        rows.push(
            Row::new(
                "multiplex.overlap",
                Feature::Multiplex,
                Verdict::Unjudged,
                format!("the slow request failed (exit_code {})", r.exit_code),
            )
            .with(evidence(&worker, show_request(&alone), show_response(r))),
        );
    } else {
        rows.push(overlap(ctx, &mut worker, &slow, length));
    }
    rows.push(cancel(ctx, &mut worker, length));
    rows
}

/// How long the second of two requests sent together may come after the
/// first, when one alone takes `one`: a worker that serializes them needs
/// about `one` more; four times that (at least two seconds) leaves room
/// for a loaded machine, and a worker that left the second unread is told
/// from one that is slow without waiting out the whole --timeout-ms.
fn lag(one: Duration) -> Duration {
    (one * 4).max(Duration::from_secs(2))
}

/// Sends `requests` together, in one write; after the first answer, waits
/// at most `lag` for each further one (and never past `timeout` from the
/// start).
fn pair_exchange(
    worker: &mut StdioWorker,
    requests: &[WorkRequest],
    timeout: Duration,
    lag: Duration,
) -> Seen {
    if let Err(e) = worker.send_together(requests) {
        return Seen {
            responses: Vec::new(),
            end: End::Broken(e.to_string(), Vec::new()),
        };
    }
    let end_all = Instant::now() + timeout;
    let mut seen = collect(worker, end_all, |r| !r.is_empty());
    while matches!(seen.end, End::Done) && seen.responses.len() < requests.len() {
        let more = collect(worker, end_all.min(Instant::now() + lag), |r| !r.is_empty());
        seen.responses.extend(more.responses);
        seen.end = more.end;
    }
    seen
}

/// Two slow requests sent together: a worker that runs them at once
/// answers the second soon after the first; one that serializes them,
/// a whole request's length later.
fn overlap(ctx: &Ctx, worker: &mut StdioWorker, slow: &Instance, length: Duration) -> Row {
    let timeout = ctx.check.timeout;
    let pair = [
        request(&slow.args, 5),
        request(&ctx.slow().map(|s| s.args).unwrap_or_default(), 6),
    ];
    let seen = exchange(worker, &pair, timeout);
    let mut ids = seen.ids();
    ids.sort_unstable();
    if ids != [5, 6] {
        let ev = evidence(worker, show_requests(&pair), show_seen(&seen, timeout));
        return Row::new(
            "multiplex.overlap",
            Feature::Multiplex,
            Verdict::Broken,
            format!("two slow requests together: got ids {:?}", seen.ids()),
        )
        .with(ev);
    }
    let gap = seen.responses[1]
        .1
        .saturating_duration_since(seen.responses[0].1);
    if gap < length / 2 {
        Row::new(
            "multiplex.overlap",
            Feature::Multiplex,
            Verdict::Supported,
            format!(
                "2 slow requests answered {} apart; one alone takes {}: they ran at once",
                ms(gap),
                ms(length)
            ),
        )
    } else {
        Row::new(
            "multiplex.overlap",
            Feature::Multiplex,
            Verdict::Unsupported,
            format!(
                "2 slow requests answered {} apart; one alone takes {}: run one at a time",
                ms(gap),
                ms(length)
            ),
        )
        .with(evidence(
            worker,
            show_requests(&pair),
            show_seen(&seen, timeout),
        ))
    }
}

/// A slow request cancelled a quarter of its length after it was sent,
/// then an ordinary one as a marker: whatever came for the cancelled id
/// by the marker's answer is the verdict.
fn cancel(ctx: &Ctx, worker: &mut StdioWorker, length: Duration) -> Row {
    let timeout = ctx.check.timeout;
    let slow = request(&ctx.slow().map(|s| s.args).unwrap_or_default(), 10);
    let mut cancel = WorkRequest::new();
    cancel.request_id = 10;
    cancel.cancel = true;
    let marker = request(&ctx.request().args, 11);
    let sent_text = format!(
        "{}\n{} ({} later)\n{}",
        show_request(&slow),
        show_request(&cancel),
        ms(length / 4),
        show_request(&marker)
    );
    let sent = Instant::now();
    if let Err(e) = worker.send(&slow) {
        return Row::new(
            "cancel",
            Feature::Cancel,
            Verdict::Broken,
            first(&e.to_string()),
        );
    }
    let early = collect(worker, sent + length / 4, |r| !r.is_empty());
    if !early.responses.is_empty() {
        return Row::new(
            "cancel",
            Feature::Cancel,
            Verdict::Unjudged,
            "the slow request was answered before the cancel was due".to_owned(),
        )
        .with(evidence(worker, sent_text, show_seen(&early, timeout)));
    }
    if worker.send(&cancel).is_err() || worker.send(&marker).is_err() {
        let seen = collect(worker, Instant::now() + timeout, |_| false);
        return Row::new(
            "cancel",
            Feature::Cancel,
            Verdict::Broken,
            "the worker stopped reading its stdin after the cancel".to_owned(),
        )
        .with(evidence(worker, sent_text, show_seen(&seen, timeout)));
    }
    // Both answers: a multiplex worker answers the marker at once, and the
    // cancelled request whenever it stops.
    let seen = collect(worker, sent + length + timeout, |r| {
        [10, 11]
            .iter()
            .all(|id| r.iter().any(|(r, _)| r.request_id == *id))
    });
    let got = show_seen(&seen, timeout);
    let answers: Vec<(&WorkResponse, Duration)> = seen
        .responses
        .iter()
        .filter(|(r, _)| r.request_id == 10)
        .map(|(r, at)| (r, at.saturating_duration_since(sent)))
        .collect();
    let (verdict, why) = match (answers.as_slice(), &seen.end) {
        (_, End::Broken(..) | End::Timeout(_, 1..)) => {
            (Verdict::Broken, seen.stray().unwrap_or_default())
        }
        ([_, _, ..], _) => (
            Verdict::Unsupported,
            "served the cancel as new work: request 10 answered twice (do not declare \
             supports-worker-cancellation)"
                .to_owned(),
        ),
        ([(r, after)], _) if r.was_cancelled && *after < length * 3 / 4 => (
            Verdict::Supported,
            format!(
                "answered was_cancelled {} after sending; the request takes {}",
                ms(*after),
                ms(length)
            ),
        ),
        ([(r, after)], _) if r.was_cancelled => (
            Verdict::Unsupported,
            format!(
                "answered was_cancelled only {} after sending, when the request takes {}: late",
                ms(*after),
                ms(length)
            ),
        ),
        ([(_, after)], _) => (
            Verdict::Unsupported,
            format!(
                "ignored: answered normally {} after sending (allowed, but the work ran on)",
                ms(*after)
            ),
        ),
        ([], End::Timeout(..)) if seen.responses.iter().any(|(r, _)| r.request_id == 11) => (
            Verdict::Broken,
            format!(
                "never answered the cancelled request (waited {}): a client waits for it forever",
                ms(length + timeout)
            ),
        ),
        ([], _) => (Verdict::Broken, format!("no answer: {}", first(&got))),
    };
    Row::new("cancel", Feature::Cancel, verdict, why).with(evidence(worker, sent_text, got))
}

/// JSON framing selected by `--json-flag`: camelCase requests (ids 0 and
/// 5), then snake_case (id 6), which readers must accept too.
pub fn json(ctx: &Ctx) -> Vec<Row> {
    let timeout = ctx.check.timeout;
    let flag = ctx.check.json_flag.clone();
    let mut worker = match spawn(ctx, &flag, WireFormat::Json) {
        Ok(w) => w,
        Err(e) => return vec![Row::new("json.camel", Feature::Json, Verdict::Broken, e)],
    };
    let mut rows = Vec::new();
    let inst = ctx.request();
    let pair = [request(&inst.args, 0), request(&ctx.request().args, 5)];
    let mut failure = None;
    for r in &pair {
        let seen = exchange(&mut worker, std::slice::from_ref(r), timeout);
        let ok = match seen.responses.first() {
            Some((got, _)) if seen.responses.len() == 1 && got.request_id == r.request_id => {
                match r.request_id {
                    0 => judge(ctx, &inst, got, &ctx.check.cwd).err(),
                    _ => None,
                }
            }
            Some((got, _)) => Some(format!(
                "answered request {} with request_id {}",
                r.request_id, got.request_id
            )),
            None => Some(format!(
                "no JSON response: {}",
                show_seen(&seen, timeout).lines().last().unwrap_or("")
            )),
        };
        if let Some(why) = ok {
            let json_line = bazel_json(r);
            failure = Some((why, json_line, show_seen(&seen, timeout)));
            break;
        }
    }
    let argv = crate::child::show_command(&ctx.argv(&flag));
    if let Some((why, sent, got)) = failure {
        rows.push(
            Row::new("json.camel", Feature::Json, Verdict::Unsupported, why).with(evidence(
                &worker,
                format!("started `{argv}`\n{sent}"),
                got,
            )),
        );
        rows.push(Row::new(
            "json.snake",
            Feature::Json,
            Verdict::Unsupported,
            "JSON is not spoken with these flags".to_owned(),
        ));
        return rows;
    }
    rows.push(Row::new(
        "json.camel",
        Feature::Json,
        Verdict::Supported,
        format!(
            "camelCase requests 0 and 5 answered (started with {})",
            flag.join(" ")
        ),
    ));
    let args: Vec<String> = ctx.request().args.iter().map(|a| quote(a)).collect();
    let line = format!(
        "{{\"arguments\": [{}], \"request_id\": 6}}\n",
        args.join(", ")
    );
    let wrote = worker.send_raw(line.as_bytes());
    let seen = collect(&worker, Instant::now() + timeout, |r| !r.is_empty());
    let row = match seen.responses.first() {
        Some((r, _)) if wrote && r.request_id == 6 => Row::new(
            "json.snake",
            Feature::Json,
            Verdict::Supported,
            "snake_case request_id 6 read and echoed".to_owned(),
        ),
        Some((r, _)) => Row::new(
            "json.snake",
            Feature::Json,
            Verdict::Unsupported,
            format!(
                "answered snake_case request_id 6 with request_id {}: reads camelCase only",
                r.request_id
            ),
        ),
        None => Row::new(
            "json.snake",
            Feature::Json,
            Verdict::Unsupported,
            format!(
                "no answer to a snake_case request: {}",
                show_seen(&seen, timeout).lines().last().unwrap_or("")
            ),
        ),
    };
    rows.push(row.with(evidence(
        &worker,
        line.trim_end().to_owned(),
        show_seen(&seen, timeout),
    )));
    rows
}

/// A request as Bazel writes it in JSON (camelCase, defaults left out).
fn bazel_json(r: &WorkRequest) -> String {
    String::from_utf8_lossy(&WireFormat::Json.encode_request(r))
        .trim_end()
        .to_owned()
}

/// Where a request's files are: `sandbox_dir` relative (Bazel's multiplex
/// sandbox) and absolute (NativeLink), `@file` inside a sandbox, and the
/// argument files a worker must expand itself (`@file` from NativeLink,
/// `--flagfile=` from everyone).
pub fn paths(ctx: &Ctx) -> Vec<Row> {
    let cases: [(&'static str, Feature); 5] = [
        ("sandbox.relative", Feature::Sandbox),
        ("sandbox.absolute", Feature::Sandbox),
        ("sandbox.argfile", Feature::Sandbox),
        ("argfile.at", Feature::Argfile),
        ("argfile.flagfile", Feature::Argfile),
    ];
    let mut rows = Vec::new();
    let Some(template) = ctx.check.request.clone() else {
        unjudged_rows(
            &mut rows,
            &cases,
            "give --request with {out} to see where outputs land",
        );
        return rows;
    };
    if !template.iter().any(|a| a.contains("{out}")) {
        unjudged_rows(
            &mut rows,
            &cases,
            "the request names no {out}: nothing shows where outputs land",
        );
        return rows;
    }
    let cwd = ctx.check.cwd.clone();
    let mut worker: Option<StdioWorker> = None;
    for (id, feature) in cases {
        let inst = ctx.instantiate(&template);
        let Some(out) = inst.out.clone() else {
            continue;
        };
        let mut r = request(&inst.args, 0);
        let dir: PathBuf = match id {
            "sandbox.relative" | "sandbox.argfile" => {
                let top = ctx.name("sandbox");
                ctx.made(cwd.join("__sandbox").join(&top));
                let rel = format!("__sandbox/{top}/_main");
                r.sandbox_dir = rel.clone();
                cwd.join(rel)
            }
            "sandbox.absolute" => {
                let op = cwd.join(ctx.name("op"));
                ctx.made(op.clone());
                let work = op.join("work");
                r.sandbox_dir = work.to_string_lossy().into_owned();
                work
            }
            _ => cwd.clone(),
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            rows.push(Row::new(
                id,
                feature,
                Verdict::Unjudged,
                format!("{}: {e}", dir.display()),
            ));
            continue;
        }
        if id != "sandbox.relative" && id != "sandbox.absolute" {
            let name = ctx.name("args");
            let path = dir.join(&name);
            ctx.made(path.clone());
            if let Err(e) = ctx.write_args(&path, &inst.args) {
                rows.push(Row::new(
                    id,
                    feature,
                    Verdict::Unjudged,
                    format!("{name}: {e}"),
                ));
                continue;
            }
            let arg = if id == "argfile.flagfile" {
                format!("--flagfile={name}")
            } else {
                format!("@{name}")
            };
            // A worker that does not expand it may take it for the output's
            // name and write a file called that.
            ctx.made(dir.join(&arg));
            ctx.made(cwd.join(&arg));
            r.arguments = vec![arg];
        }
        let w = match worker.take() {
            Some(w) => w,
            None => match spawn(ctx, &[], WireFormat::Proto) {
                Ok(w) => w,
                Err(e) => {
                    rows.push(Row::new(id, feature, Verdict::Broken, e));
                    continue;
                }
            },
        };
        let mut w = w;
        let seen = exchange(&mut w, std::slice::from_ref(&r), ctx.check.timeout);
        let got = show_seen(&seen, ctx.check.timeout);
        let mut sent = show_request(&r);
        if r.arguments.len() == 1
            && r.arguments[0] != inst.args.first().cloned().unwrap_or_default()
        {
            sent.push_str(&format!("\n(the file holds {:?})", inst.args));
        }
        let row = match seen.responses.first() {
            Some((resp, _)) if seen.responses.len() == 1 && resp.request_id == 0 => {
                let here = dir.join(&out);
                let stray = cwd.join(&out);
                if resp.exit_code == 0 && here.exists() {
                    Row::new(
                        id,
                        feature,
                        Verdict::Supported,
                        format!("exit_code 0, wrote {}", shorten(&here, &cwd)),
                    )
                } else if dir != cwd && stray.exists() {
                    Row::new(
                        id,
                        feature,
                        Verdict::Unsupported,
                        format!(
                            "ignored sandbox_dir: wrote {out} in its cwd, not in {}",
                            shorten(&dir, &cwd)
                        ),
                    )
                } else {
                    Row::new(
                        id,
                        feature,
                        Verdict::Unsupported,
                        format!(
                            "exit_code {}, no {}: {}",
                            resp.exit_code,
                            shorten(&here, &cwd),
                            super::report::tail_lines(resp.output.trim_end(), 1)
                        ),
                    )
                }
            }
            _ => {
                let verdict = if seen.stray().is_some() {
                    Verdict::Broken
                } else {
                    Verdict::Unsupported
                };
                let why = match (&seen.end, seen.responses.is_empty()) {
                    (End::Eof, true) => {
                        "the worker exited on it without answering (stdout closed)".to_owned()
                    }
                    _ => got.lines().last().unwrap_or("").to_owned(),
                };
                Row::new(id, feature, verdict, why)
            }
        };
        let row = row.with(evidence(&w, sent, got));
        // A worker that kept to the protocol serves the next case.
        if matches!(seen.end, End::Done) {
            worker = Some(w);
        }
        rows.push(row);
    }
    rows
}

fn shorten(path: &Path, cwd: &Path) -> String {
    path.strip_prefix(cwd)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}
