//! The guest's test results, read from its serial lines, and JUnit XML.
//!
//! Protocol (README, "Guest test protocol"): before a test the guest writes
//! its name to the test-marker port; each test prints `ok NAME`,
//! `FAIL NAME: reason` or `skip NAME: reason`; the last line is
//! `N passed, M failed`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::trace::{Event, Recorder, test_name};

/// How one test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `ok NAME`.
    Pass,
    /// `FAIL NAME: reason`.
    Fail(String),
    /// `skip NAME: reason`.
    Skip(String),
    /// The VM ended while the test ran (timeout, crash): the reason.
    Error(String),
}

impl Verdict {
    /// The result line's first word (`error` for a test the VM ended).
    pub(crate) fn word(&self) -> &'static str {
        match self {
            Verdict::Pass => "ok",
            Verdict::Fail(_) => "FAIL",
            Verdict::Skip(_) => "skip",
            Verdict::Error(_) => "error",
        }
    }
}

/// One test's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestResult {
    /// The test's name.
    pub(crate) name: String,
    /// Its verdict.
    pub(crate) verdict: Verdict,
    /// From its marker (or the previous result) to its result line.
    pub(crate) time: Duration,
}

/// Everything the guest reported.
#[derive(Debug)]
pub(crate) struct GuestReport {
    results: Vec<TestResult>,
    /// The name last written to the marker port, and when.
    current: Option<(String, Instant)>,
    last_event: Instant,
    summary: Option<(u64, u64)>,
    /// `--trace`: test boundaries go there too.
    trace: Option<Arc<Recorder>>,
}

impl GuestReport {
    /// An empty report starting now.
    pub(crate) fn new() -> Self {
        Self {
            results: Vec::new(),
            current: None,
            last_event: Instant::now(),
            summary: None,
            trace: None,
        }
    }

    /// Records every test boundary in `trace` too.
    pub(crate) fn set_trace(&mut self, trace: Arc<Recorder>) {
        self.trace = Some(trace);
    }

    /// The marker port announced `name`.
    pub(crate) fn test_started(&mut self, name: String) {
        if let Some(trace) = &self.trace {
            trace.push(Event::TestStart {
                name: test_name(&name),
            });
        }
        self.current = Some((name, Instant::now()));
    }

    /// The test the marker port named last, unless it has a result since.
    pub(crate) fn current_test(&self) -> Option<&str> {
        self.current.as_ref().map(|(n, _)| n.as_str())
    }

    /// One complete serial line (without the newline).
    pub(crate) fn line(&mut self, line: &str) {
        let line = line.trim_end_matches(['\r', '\n']).trim_start();
        let parsed = if let Some(name) = line.strip_prefix("ok ") {
            Some((name.trim().to_string(), Verdict::Pass))
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            let (name, reason) = split_reason(rest);
            Some((name, Verdict::Fail(reason)))
        } else if let Some(rest) = line.strip_prefix("skip ") {
            let (name, reason) = split_reason(rest);
            Some((name, Verdict::Skip(reason)))
        } else {
            if let Some(summary) = parse_summary(line) {
                self.summary = Some(summary);
            }
            None
        };
        if let Some((name, verdict)) = parsed {
            if let Some(trace) = &self.trace {
                trace.push(Event::TestEnd {
                    name: test_name(&name),
                    verdict: verdict.word(),
                });
            }
            let now = Instant::now();
            let start = match &self.current {
                Some((n, t)) if *n == name => *t,
                _ => self.last_event,
            };
            if self.current.as_ref().is_some_and(|(n, _)| *n == name) {
                self.current = None;
            }
            self.last_event = now;
            self.results.push(TestResult {
                name,
                verdict,
                time: now.duration_since(start),
            });
        }
    }

    /// The VM ended abnormally: the test still running gets an error.
    pub(crate) fn abort_current(&mut self, reason: &str) {
        if let Some((name, start)) = self.current.take() {
            self.results.push(TestResult {
                name,
                verdict: Verdict::Error(reason.to_string()),
                time: start.elapsed(),
            });
        }
    }

    /// Results so far.
    #[cfg(test)]
    pub(crate) fn results(&self) -> &[TestResult] {
        &self.results
    }

    /// The guest's closing `N passed, M failed` line, if seen.
    pub(crate) fn summary(&self) -> Option<(u64, u64)> {
        self.summary
    }

    /// JUnit XML of the results, as one `<testsuite>` named `suite`.
    pub(crate) fn junit(&self, suite: &str, properties: &[(&str, String)]) -> String {
        let count = |f: fn(&Verdict) -> bool| self.results.iter().filter(|r| f(&r.verdict)).count();
        let failures = count(|v| matches!(v, Verdict::Fail(_)));
        let skipped = count(|v| matches!(v, Verdict::Skip(_)));
        let errors = count(|v| matches!(v, Verdict::Error(_)));
        let total: f64 = self.results.iter().map(|r| r.time.as_secs_f64()).sum();
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            x,
            "<testsuites tests=\"{n}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\">",
            n = self.results.len()
        );
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{total:.3}\">",
            escape(suite),
            self.results.len()
        );
        if !properties.is_empty() {
            x.push_str("    <properties>\n");
            for (k, v) in properties {
                let _ = writeln!(
                    x,
                    "      <property name=\"{}\" value=\"{}\"/>",
                    escape(k),
                    escape(v)
                );
            }
            x.push_str("    </properties>\n");
        }
        for r in &self.results {
            let _ = write!(
                x,
                "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\"",
                escape(&r.name),
                escape(suite),
                r.time.as_secs_f64()
            );
            let (tag, msg) = match &r.verdict {
                Verdict::Pass => {
                    x.push_str("/>\n");
                    continue;
                }
                Verdict::Fail(m) => ("failure", m),
                Verdict::Skip(m) => ("skipped", m),
                Verdict::Error(m) => ("error", m),
            };
            let _ = writeln!(
                x,
                ">\n      <{tag} message=\"{}\"/>\n    </testcase>",
                escape(msg)
            );
        }
        x.push_str("  </testsuite>\n</testsuites>\n");
        x
    }
}

fn split_reason(rest: &str) -> (String, String) {
    match rest.split_once(':') {
        Some((name, reason)) => (name.trim().to_string(), reason.trim().to_string()),
        None => (rest.trim().to_string(), String::new()),
    }
}

/// `N passed, M failed` (optionally followed by more counts).
fn parse_summary(line: &str) -> Option<(u64, u64)> {
    let (passed, rest) = line.split_once(" passed, ")?;
    let failed = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((passed.trim().parse().ok()?, failed.parse().ok()?))
}

/// XML attribute escaping; control characters become spaces.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parsed_into_results_and_summary() {
        let mut r = GuestReport::new();
        r.test_started("a".into());
        r.line("ok a\r");
        r.line("FAIL b: expected 3 interrupts, got 2");
        r.line("skip c: needs 2 cpus");
        r.line("some chatter");
        r.line("2 passed, 1 failed");
        let v: Vec<_> = r
            .results()
            .iter()
            .map(|t| (t.name.as_str(), t.verdict.clone()))
            .collect();
        assert_eq!(
            v,
            vec![
                ("a", Verdict::Pass),
                ("b", Verdict::Fail("expected 3 interrupts, got 2".into())),
                ("c", Verdict::Skip("needs 2 cpus".into())),
            ]
        );
        assert_eq!(r.summary(), Some((2, 1)));
        assert_eq!(r.current_test(), None);
    }

    #[test]
    fn abort_records_running_test_as_error() {
        let mut r = GuestReport::new();
        r.test_started("slow".into());
        r.abort_current("timeout after 5 s");
        assert_eq!(
            r.results()[0].verdict,
            Verdict::Error("timeout after 5 s".into())
        );
    }

    #[test]
    fn junit_counts_and_escapes() {
        let mut r = GuestReport::new();
        r.line("ok x<y");
        r.line("FAIL z: a \"quoted\" & <bad>");
        r.line("skip s: why");
        let xml = r.junit("guest", &[("irqchip", "kernel".into())]);
        assert!(
            xml.contains("tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""),
            "{xml}"
        );
        assert!(xml.contains("name=\"x&lt;y\""), "{xml}");
        assert!(xml.contains("<failure message=\"a &quot;quoted&quot; &amp; &lt;bad&gt;\"/>"));
        assert!(xml.contains("<skipped message=\"why\"/>"));
        assert!(xml.contains("<property name=\"irqchip\" value=\"kernel\"/>"));
    }

    #[test]
    fn summary_with_trailing_counts() {
        assert_eq!(
            parse_summary("10 passed, 0 failed, 2 skipped"),
            Some((10, 0))
        );
        assert_eq!(parse_summary("passed, failed"), None);
    }
}
