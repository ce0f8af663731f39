//! Results: every figure of every run as JSON, and the Markdown tables of BENCHMARKS.md
//! (median over runs, min–max spread, ratio to the raw-PostgreSQL baseline of the same run).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The figures of one run, by name (`append.rest64.events_s`, …).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn set(&mut self, key: &str, value: f64) {
        eprintln!("  {key} = {value:.3}");
        self.0.insert(key.to_owned(), value);
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.get(key).copied().filter(|v| v.is_finite())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_gib: f64,
    pub cpu: String,
    pub kernel: String,
    pub postgres: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub started_utc: String,
    pub finished_utc: String,
    pub machine: Machine,
    pub sizes: serde_json::Value,
    pub runs: Vec<Metrics>,
    /// Scenarios that failed, as "run N: scenario: error".
    pub errors: Vec<String>,
}

enum Target {
    /// Ratio to the baseline at least this.
    RatioAtLeast(f64),
    /// The figure itself at most this.
    AtMost(f64),
    /// The figure itself exactly this (pass/fail counts).
    Equals(f64),
}

struct Row {
    label: String,
    key: String,
    unit: &'static str,
    base: Option<&'static str>,
    target: Option<Target>,
}

fn row(
    label: &str,
    key: &str,
    unit: &'static str,
    base: Option<&'static str>,
    target: Option<Target>,
) -> Row {
    Row {
        label: label.into(),
        key: key.into(),
        unit,
        base,
        target,
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if a >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    fn values(&self, key: &str) -> Vec<f64> {
        self.runs.iter().filter_map(|m| m.get(key)).collect()
    }

    fn ratios(&self, key: &str, base: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|m| Some(m.get(key)? / m.get(base)?))
            .collect()
    }

    fn cell(&self, r: &Row) -> Vec<String> {
        let vals = self.values(&r.key);
        let Some(med) = median(vals.clone()) else {
            return vec![
                r.label.clone(),
                "not measured".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
            ];
        };
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let spread = if vals.len() > 1 {
            format!("{}–{}", fmt(lo), fmt(hi))
        } else {
            "1 run".into()
        };
        let ratio = r.base.and_then(|b| median(self.ratios(&r.key, b)));
        let ratio_s = ratio.map_or(String::new(), |x| format!("{x:.2}×"));
        let (target, met) = match &r.target {
            None => (String::new(), String::new()),
            Some(Target::RatioAtLeast(t)) => (
                format!("≥ {t}× baseline"),
                yes(ratio.is_some_and(|x| x >= *t)),
            ),
            Some(Target::AtMost(t)) => (format!("≤ {t} {}", r.unit), yes(med <= *t)),
            Some(Target::Equals(t)) => (format!("= {t}"), yes(vals.iter().all(|v| v == t))),
        };
        vec![
            r.label.clone(),
            format!("{} {}", fmt(med), r.unit),
            spread,
            ratio_s,
            target,
            met,
        ]
    }

    /// The Markdown that goes between the result markers of BENCHMARKS.md.
    pub fn markdown(&self, fanout: &[usize]) -> String {
        let mut out = String::new();
        let m = &self.machine;
        out.push_str(&format!(
            "Measured {} – {} UTC with\n\n```\n{}\n```\n\nMachine: {} cores ({}), {:.1} GiB RAM, Linux {}, {}. \
             {} run(s); each cell is the median, the spread is min–max over runs, and ratios are \
             computed within each run against that run's own baseline, then the median taken.\n\n",
            self.started_utc, self.finished_utc, self.command, m.nproc, m.cpu, m.memory_gib, m.kernel, m.postgres, self.runs.len()
        ));
        let header = "| figure | median | spread | ratio to baseline | target | met? |\n|---|---|---|---|---|---|\n";
        let table = |rows: Vec<Row>| {
            let mut t = String::from(header);
            for r in &rows {
                t.push_str(&format!("| {} |\n", self.cell(r).join(" | ")));
            }
            t.push('\n');
            t
        };
        out.push_str("### Raw PostgreSQL baselines (same database, same row shape)\n\n");
        out.push_str(&table(vec![
            row(
                "(a) INSERT, one row per transaction, 1 connection: p50",
                "base.row_tx_1.p50_ms",
                "ms",
                None,
                None,
            ),
            row(
                "(a) INSERT, one row per transaction, 1 connection: p99",
                "base.row_tx_1.p99_ms",
                "ms",
                None,
                None,
            ),
            row(
                "(a) INSERT, one row per transaction, 64 connections",
                "base.row_tx_64.rows_s",
                "rows/s",
                None,
                None,
            ),
            row(
                "(b) multi-row INSERT, 100 rows per transaction",
                "base.multirow_100.rows_s",
                "rows/s",
                None,
                None,
            ),
            row(
                "(c) COPY FROM STDIN",
                "base.copy_in.rows_s",
                "rows/s",
                None,
                None,
            ),
            row(
                "(d) COPY (SELECT … ORDER BY seq) TO STDOUT",
                "base.copy_out.rows_s",
                "rows/s",
                None,
                None,
            ),
        ]));
        out.push_str("### Append\n\n");
        out.push_str(&table(vec![
            row(
                "1 sequential client, REST: p50 latency",
                "append.seq.p50_ms",
                "ms",
                Some("base.row_tx_1.p50_ms"),
                None,
            ),
            row(
                "1 sequential client, REST: p99 latency",
                "append.seq.p99_ms",
                "ms",
                Some("base.row_tx_1.p99_ms"),
                None,
            ),
            row(
                "64 clients, single events, REST",
                "append.rest64.events_s",
                "events/s",
                Some("base.row_tx_64.rows_s"),
                Some(Target::RatioAtLeast(5.0)),
            ),
            row(
                "64 clients, single events, pipelined WS publish",
                "append.ws64.events_s",
                "events/s",
                Some("base.row_tx_64.rows_s"),
                Some(Target::RatioAtLeast(5.0)),
            ),
            row(
                "batched, 100 events per request (REST)",
                "append.batch100.events_s",
                "events/s",
                Some("base.multirow_100.rows_s"),
                Some(Target::RatioAtLeast(0.8)),
            ),
        ]));
        out.push_str("### Catch-up from cursor 0 (ratio to (d) COPY read)\n\n");
        out.push_str(&table(
            ["sse", "ws", "ndjson"]
                .iter()
                .map(|t| {
                    row(
                        &format!("catch-up over {t}"),
                        &format!("catchup.{t}.events_s"),
                        "events/s",
                        Some("base.copy_out.rows_s"),
                        Some(Target::RatioAtLeast(0.5)),
                    )
                })
                .collect(),
        ));
        out.push_str("### Fan-out (publish-to-client latency: from the publisher's send, so it includes the append)\n\n");
        let mut rows = Vec::new();
        let mut groups: Vec<(String, String)> = Vec::new();
        for t in ["sse", "ws"] {
            for n in fanout {
                groups.push((
                    format!("{n} {t} subscribers, one stream"),
                    format!("fanout.{t}.{n}"),
                ));
            }
        }
        groups.push((
            "one SSE subscriber on each of many streams".into(),
            "streams.sse".into(),
        ));
        for (label, key) in groups {
            let p99_target = (key.ends_with(".1000")).then_some(Target::AtMost(50.0));
            rows.push(row(
                &format!("{label}: published"),
                &format!("{key}.published_s"),
                "events/s",
                None,
                None,
            ));
            rows.push(row(
                &format!("{label}: delivered"),
                &format!("{key}.delivered_s"),
                "events/s",
                None,
                None,
            ));
            rows.push(row(
                &format!("{label}: delivered / expected"),
                &format!("{key}.complete"),
                "",
                None,
                None,
            ));
            rows.push(row(
                &format!("{label}: p50"),
                &format!("{key}.p50_ms"),
                "ms",
                None,
                None,
            ));
            rows.push(row(
                &format!("{label}: p99"),
                &format!("{key}.p99_ms"),
                "ms",
                None,
                p99_target,
            ));
            rows.push(row(
                &format!("{label}: max"),
                &format!("{key}.max_ms"),
                "ms",
                None,
                None,
            ));
        }
        out.push_str(&table(rows));
        out.push_str("### Idle connections (server RSS growth / connections)\n\n");
        out.push_str(&table(vec![
            row(
                "idle SSE connection",
                "idle.sse.kib_per_conn",
                "KiB",
                None,
                Some(Target::AtMost(16.0)),
            ),
            row(
                "idle WebSocket connection",
                "idle.ws.kib_per_conn",
                "KiB",
                None,
                Some(Target::AtMost(24.0)),
            ),
        ]));
        out.push_str("### Durability (SIGKILL mid-run, restart, resume)\n\n");
        out.push_str(&table(vec![
            row("acknowledged appends", "durability.acked", "", None, None),
            row(
                "acknowledged but missing from the log",
                "durability.lost",
                "",
                None,
                Some(Target::Equals(0.0)),
            ),
            row(
                "gaps in the log",
                "durability.log_gaps",
                "",
                None,
                Some(Target::Equals(0.0)),
            ),
            row(
                "duplicate event ids in the log",
                "durability.duplicate_ids",
                "",
                None,
                Some(Target::Equals(0.0)),
            ),
            row(
                "seqs a subscriber saw twice",
                "durability.subscriber_duplicates",
                "",
                None,
                Some(Target::Equals(0.0)),
            ),
            row(
                "seqs a subscriber skipped",
                "durability.subscriber_gaps",
                "",
                None,
                Some(Target::Equals(0.0)),
            ),
            row(
                "subscribers that did not reach the head",
                "durability.subscribers_incomplete",
                "",
                None,
                Some(Target::Equals(0.0)),
            ),
        ]));
        if !self.errors.is_empty() {
            out.push_str("### Scenarios that failed\n\n");
            for e in &self.errors {
                out.push_str(&format!("- {e}\n"));
            }
            out.push('\n');
        }
        out
    }
}

fn yes(b: bool) -> String {
    if b {
        "yes".into()
    } else {
        "**no**".into()
    }
}

/// Replaces what lies between the result markers of `doc` with `table`.
pub fn splice(doc: &str, table: &str) -> Option<String> {
    const START: &str = "<!-- results:start -->";
    const END: &str = "<!-- results:end -->";
    let s = doc.find(START)? + START.len();
    let e = doc.find(END)?;
    (s <= e).then(|| format!("{}\n{}{}", &doc[..s], table, &doc[e..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_per_run_then_median() {
        let run = |v: f64, b: f64| {
            let mut m = Metrics::default();
            m.0.insert("x".into(), v);
            m.0.insert("b".into(), b);
            m
        };
        let r = Report {
            command: String::new(),
            started_utc: String::new(),
            finished_utc: String::new(),
            machine: Machine {
                nproc: 2,
                memory_gib: 1.0,
                cpu: "c".into(),
                kernel: "k".into(),
                postgres: "p".into(),
            },
            sizes: serde_json::Value::Null,
            runs: vec![run(10.0, 1.0), run(30.0, 10.0), run(20.0, 4.0)],
            errors: vec![],
        };
        assert_eq!(median(r.ratios("x", "b")), Some(5.0));
        let cells = r.cell(&row(
            "x",
            "x",
            "u",
            Some("b"),
            Some(Target::RatioAtLeast(5.0)),
        ));
        assert_eq!(cells[1], "20.0 u");
        assert_eq!(cells[2], "10.0–30.0");
        assert_eq!(cells[5], "yes");
        assert_eq!(
            splice("a<!-- results:start -->old<!-- results:end -->z", "new\n").unwrap(),
            "a<!-- results:start -->\nnew\n<!-- results:end -->z"
        );
    }
}
