//! The report card of `worker-client check`: one row per probe with a
//! verdict, a short reason and, for anything that is not a clean pass, the
//! evidence (what was sent, what came back, the end of the worker's stderr);
//! printed as a table for people or as JSON for CI, and the exit status a
//! worker's own CI gates on.

use std::fmt::Write as _;
use std::time::Duration;

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Supported,
    /// The worker does not do this; a client that needs it will not work.
    Unsupported,
    /// The worker tried and broke the protocol, or did something a client
    /// takes for a dead worker.
    Broken,
    /// The probe could not decide (no slow request, nothing to look at).
    Unjudged,
    /// A figure, not a pass or fail.
    Measured,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Supported => "supported",
            Verdict::Unsupported => "unsupported",
            Verdict::Broken => "BROKEN",
            Verdict::Unjudged => "unjudged",
            Verdict::Measured => "measured",
        }
    }

    /// A claim resting on this row holds. An unjudged row does not: a gate
    /// that passes on what it could not see would pass anything.
    pub fn holds(self) -> bool {
        matches!(self, Verdict::Supported | Verdict::Measured)
    }
}

/// What a worker can claim with `--expect`; every row belongs to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Singleplex delimited protobuf: every worker's duty, always expected.
    Proto,
    Multiplex,
    Cancel,
    Json,
    Sandbox,
    /// The worker expands `@file` and `--flagfile=` itself.
    Argfile,
    BuildBuddy,
    NativeLink,
    Buildbarn,
    /// Under Buck2 through `persistent-worker --bridge`.
    Buck2,
    Resources,
}

impl Feature {
    pub const ALL: [Feature; 11] = [
        Feature::Proto,
        Feature::Multiplex,
        Feature::Cancel,
        Feature::Json,
        Feature::Sandbox,
        Feature::Argfile,
        Feature::BuildBuddy,
        Feature::NativeLink,
        Feature::Buildbarn,
        Feature::Buck2,
        Feature::Resources,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Proto => "proto",
            Feature::Multiplex => "multiplex",
            Feature::Cancel => "cancel",
            Feature::Json => "json",
            Feature::Sandbox => "sandbox",
            Feature::Argfile => "argfile",
            Feature::BuildBuddy => "buildbuddy",
            Feature::NativeLink => "nativelink",
            Feature::Buildbarn => "buildbarn",
            Feature::Buck2 => "buck2",
            Feature::Resources => "resources",
        }
    }

    /// A comma-separated list; `all` names every feature.
    pub fn parse_list(list: &str, flag: &str) -> Result<Vec<Feature>, String> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                return Ok(Feature::ALL.to_vec());
            }
            let feature = Feature::ALL
                .iter()
                .copied()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    let names: Vec<&str> = Feature::ALL.iter().map(|f| f.name()).collect();
                    format!(
                        "{flag}: unknown feature '{name}' (known: {}, all)",
                        names.join(", ")
                    )
                })?;
            if !out.contains(&feature) {
                out.push(feature);
            }
        }
        Ok(out)
    }
}

/// What a probe saw, for anything that is not a clean pass.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub sent: String,
    pub got: String,
    pub stderr: String,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub id: &'static str,
    pub feature: Feature,
    pub verdict: Verdict,
    pub reason: String,
    pub evidence: Option<Evidence>,
}

impl Row {
    pub fn new(id: &'static str, feature: Feature, verdict: Verdict, reason: String) -> Row {
        Row {
            id,
            feature,
            verdict,
            reason,
            evidence: None,
        }
    }

    pub fn with(mut self, evidence: Option<Evidence>) -> Row {
        // A clean pass needs no evidence; keep the card short.
        if !self.verdict.holds() {
            self.evidence = evidence;
        }
        self
    }
}

pub struct Card {
    pub worker: String,
    pub rows: Vec<Row>,
    /// Claimed with `--expect`; `Proto` is always among them.
    pub expected: Vec<Feature>,
    pub elapsed: Duration,
}

/// How many lines of the worker's stderr a piece of evidence shows.
const STDERR_LINES: usize = 8;

impl Card {
    /// The rows that break a claim: the run fails if there is any.
    pub fn failures(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| self.expected.contains(&r.feature) && !r.verdict.holds())
            .collect()
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "worker: {}", self.worker);
        let width = self
            .rows
            .iter()
            .map(|r| r.id.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(out, "{:<width$}  {:<11}  REASON", "CHECK", "VERDICT");
        for r in &self.rows {
            let mark = if self.expected.contains(&r.feature) && !r.verdict.holds() {
                " (expected)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{:<width$}  {:<11}  {}{mark}",
                r.id,
                r.verdict.word(),
                first_line(&r.reason)
            );
        }
        let with_evidence: Vec<&Row> = self.rows.iter().filter(|r| r.evidence.is_some()).collect();
        if !with_evidence.is_empty() {
            out.push_str("\nevidence:\n");
        }
        for r in with_evidence {
            let Some(e) = &r.evidence else { continue };
            let _ = writeln!(out, "[{}] {}", r.id, r.reason);
            if !e.sent.is_empty() {
                let _ = writeln!(out, "  sent: {}", indent_rest(&e.sent));
            }
            if !e.got.is_empty() {
                let _ = writeln!(out, "  got:  {}", indent_rest(&e.got));
            }
            let tail = tail_lines(&e.stderr, STDERR_LINES);
            if !tail.is_empty() {
                out.push_str("  worker stderr (last lines):\n");
                for line in tail.lines() {
                    let _ = writeln!(out, "    | {line}");
                }
            }
        }
        let failures = self.failures();
        let expected: Vec<&str> = self.expected.iter().map(|f| f.name()).collect();
        let _ = writeln!(
            out,
            "\n{} check(s) in {:.1} s; expected: {}",
            self.rows.len(),
            self.elapsed.as_secs_f64(),
            expected.join(", ")
        );
        if failures.is_empty() {
            out.push_str("result: every expected feature holds\n");
        } else {
            let ids: Vec<&str> = failures.iter().map(|r| r.id).collect();
            let _ = writeln!(out, "result: FAIL: {}", ids.join(", "));
        }
        out
    }

    pub fn json(&self) -> String {
        let mut out = String::from("{\n");
        let _ = writeln!(out, "  \"worker\": {},", quote(&self.worker));
        let _ = writeln!(out, "  \"elapsed_ms\": {},", self.elapsed.as_millis());
        let expected: Vec<String> = self.expected.iter().map(|f| quote(f.name())).collect();
        let _ = writeln!(out, "  \"expected\": [{}],", expected.join(", "));
        let failures: Vec<String> = self.failures().iter().map(|r| quote(r.id)).collect();
        let _ = writeln!(out, "  \"ok\": {},", failures.is_empty());
        let _ = writeln!(out, "  \"failed\": [{}],", failures.join(", "));
        out.push_str("  \"checks\": [\n");
        for (i, r) in self.rows.iter().enumerate() {
            let evidence = match &r.evidence {
                Some(e) => format!(
                    "{{\"sent\": {}, \"got\": {}, \"stderr\": {}}}",
                    quote(&e.sent),
                    quote(&e.got),
                    quote(&tail_lines(&e.stderr, STDERR_LINES))
                ),
                None => "null".to_owned(),
            };
            let _ = write!(
                out,
                "    {{\"id\": {}, \"feature\": {}, \"verdict\": {}, \"reason\": {}, \"evidence\": {evidence}}}",
                quote(r.id),
                quote(r.feature.name()),
                quote(match r.verdict {
                    Verdict::Broken => "broken",
                    other => other.word(),
                }),
                quote(&r.reason),
            );
            out.push_str(if i + 1 < self.rows.len() { ",\n" } else { "\n" });
        }
        out.push_str("  ]\n}\n");
        out
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn indent_rest(text: &str) -> String {
    text.trim_end().replace('\n', "\n        ")
}

/// The last `n` non-empty lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A JSON string literal.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(verdict: Verdict, expected: &[Feature]) -> Card {
        Card {
            worker: "w".to_owned(),
            rows: vec![
                Row::new(
                    "proto.roundtrip",
                    Feature::Proto,
                    Verdict::Supported,
                    "ok".into(),
                ),
                Row::new("cancel", Feature::Cancel, verdict, "why".into()).with(Some(Evidence {
                    sent: "cancel 4".into(),
                    got: "nothing".into(),
                    stderr: "a\nb\n".into(),
                })),
            ],
            expected: expected.to_vec(),
            elapsed: Duration::from_millis(1500),
        }
    }

    #[test]
    fn only_expected_features_fail_the_run() {
        assert!(card(Verdict::Unsupported, &[Feature::Proto])
            .failures()
            .is_empty());
        let claimed = card(Verdict::Unsupported, &[Feature::Proto, Feature::Cancel]);
        assert_eq!(claimed.failures().len(), 1);
        let unjudged = card(Verdict::Unjudged, &[Feature::Proto, Feature::Cancel]);
        assert_eq!(unjudged.failures().len(), 1);
        assert!(card(Verdict::Supported, &[Feature::Proto, Feature::Cancel])
            .failures()
            .is_empty());
    }

    #[test]
    fn evidence_is_kept_only_for_what_did_not_pass() {
        let passed = card(Verdict::Supported, &[Feature::Proto]);
        assert!(passed.rows[1].evidence.is_none());
        let failed = card(Verdict::Broken, &[Feature::Proto]);
        let table = failed.table();
        assert!(table.contains("sent: cancel 4"), "{table}");
        assert!(table.contains("    | b"), "{table}");
    }

    #[test]
    fn json_escapes_and_names_the_failures() {
        let c = card(Verdict::Broken, &[Feature::Proto, Feature::Cancel]);
        let json = c.json();
        assert!(json.contains("\"ok\": false"), "{json}");
        assert!(json.contains("\"failed\": [\"cancel\"]"), "{json}");
        assert!(json.contains("\"stderr\": \"a\\nb\""), "{json}");
        assert_eq!(quote("\u{1}\""), "\"\\u0001\\\"\"");
    }

    #[test]
    fn expect_lists_parse() {
        assert_eq!(
            Feature::parse_list("cancel, json,cancel", "--expect").unwrap(),
            vec![Feature::Cancel, Feature::Json]
        );
        assert_eq!(Feature::parse_list("all", "--expect").unwrap().len(), 11);
        assert!(Feature::parse_list("teleport", "--expect")
            .unwrap_err()
            .contains("known:"));
    }
}
