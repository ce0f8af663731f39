//! Results: every figure of every run as JSON, and the Markdown tables of BENCHMARKS.md
//! (median over runs, min–max spread, ratio to the raw baseline of the same run: PostgreSQL's
//! for a run on PostgreSQL, SQLite's for a run on the embedded store). Each store's tables
//! have their own markers in BENCHMARKS.md, so a run on one store leaves the other's intact.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::Store;

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
    /// PostgreSQL's version (runs on PostgreSQL).
    #[serde(default)]
    pub postgres: String,
    /// SQLite's version (runs on the embedded store).
    #[serde(default)]
    pub sqlite: String,
    /// The SQLite file's directory and its filesystem (runs on the embedded store).
    #[serde(default)]
    pub data_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    /// The store tailcast ran on (results written before there was a choice: PostgreSQL).
    #[serde(default)]
    pub store: Store,
    pub started_utc: String,
    pub finished_utc: String,
    /// /proc/loadavg's 1-, 5- and 15-minute figures when the run started and ended.
    #[serde(default)]
    pub load_start: String,
    #[serde(default)]
    pub load_end: String,
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

    /// The Markdown that goes between this store's result markers of BENCHMARKS.md.
    pub fn markdown(&self, fanout: &[usize]) -> String {
        match self.store {
            Store::Postgres => self.markdown_postgres(fanout),
            Store::Sqlite => self.markdown_sqlite(fanout),
        }
    }

    fn table(&self, rows: Vec<Row>) -> String {
        let mut t = String::from(
            "| figure | median | spread | ratio to baseline | target | met? |\n|---|---|---|---|---|---|\n",
        );
        for r in &rows {
            t.push_str(&format!("| {} |\n", self.cell(r).join(" | ")));
        }
        t.push('\n');
        t
    }

    /// True if any run measured any of `rows`.
    fn measured(&self, rows: &[Row]) -> bool {
        rows.iter().any(|r| !self.values(&r.key).is_empty())
    }

    /// When, with what command, on what machine (and how busy it was).
    fn preamble(&self, store: &str) -> String {
        let m = &self.machine;
        let load = if self.load_start.is_empty() {
            String::new()
        } else {
            format!(
                " Load average (1, 5, 15 min): {} at the start, {} at the end.",
                self.load_start, self.load_end
            )
        };
        format!(
            "Measured {} – {} UTC with\n\n```\n{}\n```\n\nMachine: {} cores ({}), {:.1} GiB RAM, Linux {}, {}.{load} \
             {} run(s); each cell is the median, the spread is min–max over runs, and ratios are \
             computed within each run against that run's own baseline, then the median taken.\n\n",
            self.started_utc, self.finished_utc, self.command, m.nproc, m.cpu, m.memory_gib, m.kernel, store, self.runs.len()
        )
    }

    fn markdown_postgres(&self, fanout: &[usize]) -> String {
        let mut out = self.preamble(&self.machine.postgres);
        out.push_str("### Raw PostgreSQL baselines (same database, same row shape)\n\n");
        out.push_str(&self.table(vec![
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
        out.push_str(&self.table(vec![
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
        out.push_str(&self.table(catchup_rows("base.copy_out.rows_s", Some(0.5))));
        out.push_str(&joiner_section(self));
        out.push_str("### Fan-out (publish-to-client latency: from the publisher's send, so it includes the append)\n\n");
        out.push_str(&self.table(fanout_rows(fanout)));
        out.push_str("### Idle connections (server RSS growth / connections)\n\n");
        out.push_str(&self.table(idle_rows()));
        out.push_str("### Durability (SIGKILL mid-run, restart, resume)\n\n");
        out.push_str(&self.table(durability_rows()));
        out.push_str(&self.failures());
        out
    }

    fn markdown_sqlite(&self, fanout: &[usize]) -> String {
        let m = &self.machine;
        let store = format!(
            "SQLite {} (the library sqlx bundles; tailcast links the same one), database file in {}",
            m.sqlite, m.data_dir
        );
        let mut out = self.preamble(&store);
        out.push_str(
            "### Raw SQLite baselines (same file, same pragmas: WAL, synchronous=FULL; same row shape; through sqlx)\n\n",
        );
        out.push_str(&self.table(vec![
            row(
                "(a) INSERT, one row per transaction, 1 connection: p50",
                "lite.row_tx_1.p50_ms",
                "ms",
                None,
                None,
            ),
            row(
                "(a) INSERT, one row per transaction, 1 connection: p99",
                "lite.row_tx_1.p99_ms",
                "ms",
                None,
                None,
            ),
            row(
                "(a) INSERT, one row per transaction, 1 connection",
                "lite.row_tx_1.rows_s",
                "rows/s",
                None,
                None,
            ),
            row(
                "(b) multi-row INSERT, 100 rows per transaction, 1 connection",
                "lite.multirow_100.rows_s",
                "rows/s",
                None,
                None,
            ),
            row(
                "(c) multi-row INSERT of one row into each of 64 streams per transaction, 1 connection",
                "lite.spread_64.rows_s",
                "rows/s",
                None,
                None,
            ),
            row(
                "(d) SELECT … WHERE stream_id = ? ORDER BY seq, whole seeded stream",
                "lite.read_seq.rows_s",
                "rows/s",
                None,
                None,
            ),
        ]));
        out.push_str("### Append (ratios to the SQLite baselines)\n\n");
        out.push_str(&self.table(vec![
            row(
                "1 sequential client, REST: p50 latency (vs (a) p50)",
                "append.seq.p50_ms",
                "ms",
                Some("lite.row_tx_1.p50_ms"),
                None,
            ),
            row(
                "1 sequential client, REST: p99 latency (vs (a) p99)",
                "append.seq.p99_ms",
                "ms",
                Some("lite.row_tx_1.p99_ms"),
                None,
            ),
            row(
                "1 sequential client, REST (vs (a))",
                "append.seq.events_s",
                "events/s",
                Some("lite.row_tx_1.rows_s"),
                None,
            ),
            row(
                "64 clients, single events, REST (vs (a))",
                "append.rest64.events_s",
                "events/s",
                Some("lite.row_tx_1.rows_s"),
                None,
            ),
            row(
                "64 clients, single events, pipelined WS publish (vs (a))",
                "append.ws64.events_s",
                "events/s",
                Some("lite.row_tx_1.rows_s"),
                None,
            ),
            row(
                "64 clients, single events, REST (vs (c))",
                "append.rest64.events_s",
                "events/s",
                Some("lite.spread_64.rows_s"),
                None,
            ),
            row(
                "64 clients, single events, pipelined WS publish (vs (c))",
                "append.ws64.events_s",
                "events/s",
                Some("lite.spread_64.rows_s"),
                None,
            ),
            row(
                "8 clients, 100 events per request, REST (vs (b))",
                "append.batch100.events_s",
                "events/s",
                Some("lite.multirow_100.rows_s"),
                None,
            ),
        ]));
        out.push_str("### Append, as the server saw it (its /metrics, per scenario: append requests per commit, mean time of one commit)\n\n");
        let mut rows = Vec::new();
        for (label, key) in [
            ("1 sequential client", "append.seq"),
            ("64 REST clients", "append.rest64"),
            ("64 WS clients, pipelined", "append.ws64"),
            ("8 REST clients × 100 events", "append.batch100"),
        ] {
            rows.push(row(
                &format!("{label}: requests per commit"),
                &format!("{key}.server_jobs_per_commit"),
                "",
                None,
                None,
            ));
            rows.push(row(
                &format!("{label}: commit time"),
                &format!("{key}.server_commit_ms"),
                "ms",
                None,
                None,
            ));
        }
        out.push_str(&self.table(rows));
        out.push_str("### Catch-up from cursor 0 (ratio to (d) sequential read)\n\n");
        out.push_str(&self.table(catchup_rows("lite.read_seq.rows_s", None)));
        out.push_str(&joiner_section(self));
        out.push_str("### Durability (SIGKILL mid-run, restart on the same file, resume)\n\n");
        out.push_str(&self.table(durability_rows()));
        let fan = fanout_rows(fanout);
        if self.measured(&fan) {
            out.push_str("### Fan-out (publish-to-client latency: from the publisher's send, so it includes the append)\n\n");
            out.push_str(&self.table(fan));
        }
        let idle = idle_rows();
        if self.measured(&idle) {
            out.push_str("### Idle connections (server RSS growth / connections)\n\n");
            out.push_str(&self.table(idle));
        }
        out.push_str(&self.failures());
        out
    }

    /// True if any run measured a figure whose name `pred` accepts.
    pub fn has(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.runs.iter().any(|r| r.0.keys().any(|k| pred(k)))
    }

    /// The ceilings of one primary (private clusters; `ceiling.*` scenarios), for the
    /// section between the ceiling markers.
    pub fn markdown_ceiling(&self, nodes: &[usize]) -> String {
        let mut out = self.preamble(&self.machine.postgres);
        out.push_str(
            "### NOTIFY and appends with N tailcast nodes LISTENing (one private primary)\n\n",
        );
        let mut rows = Vec::new();
        for n in nodes {
            let key = format!("ceiling.notify.{n}");
            rows.push(row(
                &format!("{n} node(s): bare pg_notify commits, 16 sessions"),
                &format!("{key}.raw_notify_s"),
                "notifications/s",
                None,
                None,
            ));
            rows.push(row(
                &format!("{n} node(s): single-event appends, 64 REST clients on one node"),
                &format!("{key}.append.events_s"),
                "events/s",
                None,
                None,
            ));
            rows.push(row(
                &format!("{n} node(s): their group commits (one NOTIFY each)"),
                &format!("{key}.commits_s"),
                "notifications/s",
                None,
                None,
            ));
            rows.push(row(
                &format!("{n} node(s): append p99"),
                &format!("{key}.append.p99_ms"),
                "ms",
                None,
                None,
            ));
        }
        out.push_str(&self.table(rows));
        out.push_str("### Catch-up reads: on the primary vs moved to one streaming replica\n\n");
        let mut rows = Vec::new();
        for label in ["primary", "replica"] {
            let key = format!("ceiling.replica.{label}");
            rows.push(row(
                &format!("reads on the {label}: NDJSON export from cursor 0, 4 readers"),
                &format!("{key}.catchup_events_s"),
                "events/s",
                None,
                None,
            ));
            rows.push(row(
                &format!("reads on the {label}: meanwhile, 16 single-event appenders"),
                &format!("{key}.append.events_s"),
                "events/s",
                None,
                None,
            ));
        }
        rows.push(row(
            "pages the replica served",
            "ceiling.replica.replica.pages_on_replica",
            "",
            None,
            None,
        ));
        out.push_str(&self.table(rows));
        out.push_str(&self.failures());
        out
    }

    fn failures(&self) -> String {
        let mut out = String::new();
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

/// The late joiner's table (issue 24), if it was measured.
fn joiner_section(r: &Report) -> String {
    let mut rows = Vec::new();
    for (view, label) in [("sse", "SSE envelopes"), ("ui", "AI SDK UI message stream")] {
        rows.extend([
            row(
                &format!("{label}, full replay: bytes to the current text"),
                &format!("joiner.{view}.full_bytes"),
                "bytes",
                None,
                None,
            ),
            row(
                &format!("{label}, compacted: bytes to the current text"),
                &format!("joiner.{view}.compact_bytes"),
                "bytes",
                None,
                None,
            ),
            row(
                &format!("{label}, compacted bytes as % of the full replay's"),
                &format!("joiner.{view}.bytes_pct"),
                "%",
                None,
                Some(Target::AtMost(2.0)),
            ),
            row(
                &format!("{label}, full replay: time to the current text"),
                &format!("joiner.{view}.full_ms"),
                "ms",
                None,
                None,
            ),
            row(
                &format!("{label}, compacted: time to the current text"),
                &format!("joiner.{view}.compact_ms"),
                "ms",
                None,
                None,
            ),
        ]);
    }
    if !r.measured(&rows) {
        return String::new();
    }
    let mut out = String::from(
        "### Late joiner to a 10,000-token answer (issue 24; stream open, one message of appends)\n\n",
    );
    out.push_str(&r.table(rows));
    out
}

fn catchup_rows(base: &'static str, target: Option<f64>) -> Vec<Row> {
    ["sse", "ws", "ndjson"]
        .iter()
        .map(|t| {
            row(
                &format!("catch-up over {t}"),
                &format!("catchup.{t}.events_s"),
                "events/s",
                Some(base),
                target.map(Target::RatioAtLeast),
            )
        })
        .collect()
}

fn fanout_rows(fanout: &[usize]) -> Vec<Row> {
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
    rows
}

fn idle_rows() -> Vec<Row> {
    vec![
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
        row(
            "idle SSE subscribers per GiB of server memory",
            "idle.sse.subs_per_gib",
            "",
            None,
            None,
        ),
        row(
            "idle WebSocket subscribers per GiB of server memory",
            "idle.ws.subs_per_gib",
            "",
            None,
            None,
        ),
    ]
}

fn durability_rows() -> Vec<Row> {
    vec![
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
    ]
}

fn yes(b: bool) -> String {
    if b {
        "yes".into()
    } else {
        "**no**".into()
    }
}

/// A row of a peer table: `{scenario}.tailcast.{figure}` next to `{scenario}.{peer}.{figure}`.
struct PeerRow {
    label: String,
    scenario: String,
    figure: &'static str,
    unit: &'static str,
    target: Option<PeerTarget>,
}

enum PeerTarget {
    /// tailcast / peer at most this.
    RatioAtMost(f64),
    /// tailcast / peer at least this.
    RatioAtLeast(f64),
    /// tailcast's figure itself at most this.
    AtMost(f64),
}

fn peer_row(
    label: &str,
    scenario: &str,
    figure: &'static str,
    unit: &'static str,
    target: Option<PeerTarget>,
) -> PeerRow {
    PeerRow {
        label: label.into(),
        scenario: scenario.into(),
        figure,
        unit,
        target,
    }
}

impl Report {
    /// A median with its unit and, over several runs, its min–max spread.
    fn median_cell(&self, key: &str, unit: &str) -> String {
        let vals = self.values(key);
        let Some(med) = median(vals.clone()) else {
            return "—".into();
        };
        let mut cell = format!("{} {unit}", fmt(med)).trim_end().to_owned();
        if vals.len() > 1 {
            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            cell.push_str(&format!(" ({}–{})", fmt(lo), fmt(hi)));
        }
        cell
    }

    fn peer_table(&self, peer: &str, rows: &[PeerRow]) -> String {
        let mut t = format!(
            "| figure | tailcast | {peer} | tailcast/{peer} | target | met? |\n|---|---|---|---|---|---|\n"
        );
        for r in rows {
            let ours = format!("{}.tailcast.{}", r.scenario, r.figure);
            let theirs = format!("{}.{peer}.{}", r.scenario, r.figure);
            if self.values(&ours).is_empty() && self.values(&theirs).is_empty() {
                continue;
            }
            let ratio = median(self.ratios(&ours, &theirs));
            let ratio_s = ratio.map_or(String::new(), |x| format!("{x:.2}×"));
            let tc = median(self.values(&ours));
            let (target, met) = match &r.target {
                None => (String::new(), String::new()),
                Some(PeerTarget::RatioAtMost(x)) => {
                    (format!("≤ {x}×"), yes(ratio.is_some_and(|v| v <= *x)))
                }
                Some(PeerTarget::RatioAtLeast(x)) => {
                    (format!("≥ {x}×"), yes(ratio.is_some_and(|v| v >= *x)))
                }
                Some(PeerTarget::AtMost(x)) => (
                    format!("tailcast ≤ {x} {}", r.unit),
                    yes(tc.is_some_and(|v| v <= *x)),
                ),
            };
            t.push_str(&format!(
                "| {} | {} | {} | {ratio_s} | {target} | {met} |\n",
                r.label,
                self.median_cell(&ours, r.unit),
                self.median_cell(&theirs, r.unit),
            ));
        }
        t.push('\n');
        t
    }

    /// The section between a peer's markers (`nchan` or `sockudo`): each figure on tailcast
    /// and on the peer within the same run, and their ratio.
    pub fn markdown_peer(&self, peer: &str) -> String {
        let fanout: Vec<u64> = self.sizes["fanout"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let idle = self.sizes["idle_connections"].as_u64().unwrap_or(0);
        let rate = self.sizes["rate"].as_u64().unwrap_or(0);
        let (via, name) = if peer == "sockudo" {
            ("WebSocket", "Sockudo")
        } else {
            ("SSE", "Nchan")
        };
        let mut out = self.preamble(&self.machine.postgres);
        out.push_str(&format!(
            "### Fan-out: N {via} subscribers on one stream/channel, {rate} publishes/s (tailcast: single-event REST appends)\n\n"
        ));
        let mut rows = Vec::new();
        for n in &fanout {
            let sc = format!("{peer}.fanout.{n}");
            let big = *n >= 5000;
            let cpu_target = if big {
                Some(PeerTarget::RatioAtMost(0.5))
            } else if peer == "nchan" {
                Some(PeerTarget::RatioAtMost(1.0))
            } else {
                None
            };
            let with_pg_target = (peer == "nchan" && !big).then_some(PeerTarget::RatioAtMost(1.5));
            rows.extend([
                peer_row(
                    &format!("{n} subscribers: server CPU per 1000 deliveries"),
                    &sc,
                    "cpu_ms_per_1k",
                    "ms",
                    cpu_target,
                ),
                peer_row(
                    &format!("{n} subscribers: … of which PostgreSQL's (tailcast only)"),
                    &sc,
                    "pg_cpu_ms_per_1k",
                    "ms",
                    None,
                ),
                peer_row(
                    &format!("{n} subscribers: server CPU per 1000 deliveries, PostgreSQL counted"),
                    &sc,
                    "total_cpu_ms_per_1k",
                    "ms",
                    with_pg_target,
                ),
                peer_row(
                    &format!("{n} subscribers: delivery latency p50"),
                    &sc,
                    "p50_ms",
                    "ms",
                    None,
                ),
                peer_row(
                    &format!("{n} subscribers: delivery latency p99"),
                    &sc,
                    "p99_ms",
                    "ms",
                    (*n == 1000).then_some(PeerTarget::RatioAtMost(1.0)),
                ),
                peer_row(
                    &format!("{n} subscribers: delivery latency max"),
                    &sc,
                    "max_ms",
                    "ms",
                    None,
                ),
                peer_row(
                    &format!("{n} subscribers: publish latency p50"),
                    &sc,
                    "publish_p50_ms",
                    "ms",
                    (*n == 100).then_some(PeerTarget::RatioAtMost(1.5)),
                ),
                peer_row(
                    &format!("{n} subscribers: publish latency p99"),
                    &sc,
                    "publish_p99_ms",
                    "ms",
                    (*n == 1000).then_some(PeerTarget::RatioAtMost(1.5)),
                ),
                peer_row(
                    &format!("{n} subscribers: published"),
                    &sc,
                    "published_s",
                    "/s",
                    None,
                ),
                peer_row(
                    &format!("{n} subscribers: delivered / expected"),
                    &sc,
                    "complete",
                    "",
                    None,
                ),
                peer_row(
                    &format!("{n} subscribers: server memory at the end (Pss)"),
                    &sc,
                    "mem_mib",
                    "MiB",
                    None,
                ),
            ]);
        }
        out.push_str(&self.peer_table(peer, &rows));
        out.push_str(&format!(
            "### {idle} idle {via} subscriptions, one stream/channel each\n\n"
        ));
        let sc = format!("{peer}.idle");
        let mem_target = if peer == "sockudo" { 0.2 } else { 1.0 };
        out.push_str(&self.peer_table(
            peer,
            &[
                peer_row(
                    "server memory per connection (Pss growth / connections)",
                    &sc,
                    "kib_per_conn",
                    "KiB",
                    Some(PeerTarget::RatioAtMost(mem_target)),
                ),
                peer_row(
                    "subscriptions opened",
                    &sc,
                    "opens_s",
                    "/s",
                    (peer == "nchan").then_some(PeerTarget::RatioAtLeast(0.5)),
                ),
                peer_row(
                    "server memory with all of them open (Pss)",
                    &sc,
                    "mem_mib",
                    "MiB",
                    None,
                ),
            ],
        ));
        let sc = format!("{peer}.publish");
        let rows = [
            peer_row(
                "server CPU per publish (tailcast: single-event REST append)",
                &sc,
                "cpu_ms",
                "ms",
                Some(PeerTarget::AtMost(0.3)),
            ),
            peer_row(
                "… PostgreSQL's CPU per append (tailcast only)",
                &sc,
                "pg_cpu_ms",
                "ms",
                Some(PeerTarget::AtMost(0.45)),
            ),
            peer_row(
                "server CPU per publish, PostgreSQL counted",
                &sc,
                "total_cpu_ms",
                "ms",
                None,
            ),
            peer_row("publish latency p50", &sc, "p50_ms", "ms", None),
            peer_row("publish latency p99", &sc, "p99_ms", "ms", None),
            peer_row("published", &sc, "published_s", "/s", None),
        ];
        if self.has(|k| k.starts_with(&format!("{sc}."))) {
            let prate = self.sizes["publish_rate"].as_u64().unwrap_or(0);
            out.push_str(&format!(
                "### Publishing with nobody subscribed, {prate}/s from 8 connections: CPU per append next to CPU per {name} publish\n\n"
            ));
            out.push_str(&self.peer_table(peer, &rows));
        }
        out.push_str(&self.failures());
        out
    }
}

/// The markers of each peer's section (runs with `nchan.*` or `sockudo.*` figures).
pub const PEER_MARKERS: [(&str, (&str, &str)); 2] = [
    (
        "nchan",
        ("<!-- nchan-results:start -->", "<!-- nchan-results:end -->"),
    ),
    (
        "sockudo",
        (
            "<!-- sockudo-results:start -->",
            "<!-- sockudo-results:end -->",
        ),
    ),
];

/// The markers between which `store`'s results go.
pub fn markers(store: Store) -> (&'static str, &'static str) {
    match store {
        Store::Postgres => ("<!-- results:start -->", "<!-- results:end -->"),
        Store::Sqlite => (
            "<!-- sqlite-results:start -->",
            "<!-- sqlite-results:end -->",
        ),
    }
}

/// The markers between which the ceilings go (PostgreSQL runs with `ceiling.*`).
pub const CEILING_MARKERS: (&str, &str) = (
    "<!-- ceiling-results:start -->",
    "<!-- ceiling-results:end -->",
);

/// Replaces what lies between `store`'s result markers in `doc` with `table`.
pub fn splice(store: Store, doc: &str, table: &str) -> Option<String> {
    splice_between(markers(store), doc, table)
}

/// Replaces what lies between the `(start, end)` markers in `doc` with `table`.
pub fn splice_between((start, end): (&str, &str), doc: &str, table: &str) -> Option<String> {
    let s = doc.find(start)? + start.len();
    let e = doc.find(end)?;
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
            store: Store::Postgres,
            started_utc: String::new(),
            finished_utc: String::new(),
            load_start: String::new(),
            load_end: String::new(),
            machine: Machine {
                nproc: 2,
                memory_gib: 1.0,
                cpu: "c".into(),
                kernel: "k".into(),
                postgres: "p".into(),
                sqlite: String::new(),
                data_dir: String::new(),
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
            splice(
                Store::Postgres,
                "a<!-- results:start -->old<!-- results:end -->z",
                "new\n"
            )
            .unwrap(),
            "a<!-- results:start -->\nnew\n<!-- results:end -->z"
        );
    }

    #[test]
    fn each_store_has_its_own_section() {
        let doc = "<!-- results:start -->pg<!-- results:end -->\n\
                   <!-- sqlite-results:start -->old<!-- sqlite-results:end -->";
        assert_eq!(
            splice(Store::Sqlite, doc, "lite\n").unwrap(),
            "<!-- results:start -->pg<!-- results:end -->\n\
             <!-- sqlite-results:start -->\nlite\n<!-- sqlite-results:end -->"
        );
        assert!(splice(
            Store::Sqlite,
            "<!-- results:start --><!-- results:end -->",
            "x"
        )
        .is_none());
    }

    #[test]
    fn results_written_before_the_store_choice_are_postgres() {
        let old = r#"{"command":"bench/run","started_utc":"a","finished_utc":"b",
            "machine":{"nproc":2,"memory_gib":1.0,"cpu":"c","kernel":"k","postgres":"PostgreSQL 15"},
            "sizes":{"fanout":[100]},"runs":[{"base.row_tx_1.p50_ms":0.3}],"errors":[]}"#;
        let r: Report = serde_json::from_str(old).unwrap();
        assert_eq!(r.store, Store::Postgres);
        let md = r.markdown(&[100]);
        assert!(md.contains("PostgreSQL 15. 1 run(s)"), "{md}");
        assert!(md.contains("### Raw PostgreSQL baselines"));
    }

    #[test]
    fn the_sqlite_section_compares_with_sqlite_baselines() {
        let mut m = Metrics::default();
        m.0.insert("lite.row_tx_1.rows_s".into(), 100.0);
        m.0.insert("append.rest64.events_s".into(), 1000.0);
        m.0.insert("durability.lost".into(), 0.0);
        let r = Report {
            command: "bench/run --store sqlite".into(),
            store: Store::Sqlite,
            started_utc: String::new(),
            finished_utc: String::new(),
            load_start: "1.00 2.00 3.00".into(),
            load_end: "4.00 5.00 6.00".into(),
            machine: Machine {
                nproc: 2,
                memory_gib: 1.0,
                cpu: "c".into(),
                kernel: "k".into(),
                postgres: String::new(),
                sqlite: "3.46.0".into(),
                data_dir: "/tmp/x on ext4".into(),
            },
            sizes: serde_json::Value::Null,
            runs: vec![m],
            errors: vec![],
        };
        let md = r.markdown(&[100]);
        assert!(md.contains("SQLite 3.46.0"), "{md}");
        assert!(md.contains("1.00 2.00 3.00 at the start, 4.00 5.00 6.00 at the end"));
        assert!(
            md.contains(
                "| 64 clients, single events, REST (vs (a)) | 1.0k events/s | 1 run | 10.00× |"
            ),
            "{md}"
        );
        assert!(!md.contains("PostgreSQL"), "{md}");
        // Fan-out and idle connections were not run: no empty tables for them.
        assert!(!md.contains("Fan-out"), "{md}");
    }

    #[test]
    fn a_peer_section_puts_tailcast_next_to_the_peer() {
        let mut m = Metrics::default();
        for (k, v) in [
            ("nchan.fanout.1000.tailcast.cpu_ms_per_1k", 30.0),
            ("nchan.fanout.1000.nchan.cpu_ms_per_1k", 40.0),
            ("nchan.fanout.1000.tailcast.pg_cpu_ms_per_1k", 5.0),
            ("nchan.idle.tailcast.opens_s", 100.0),
            ("nchan.idle.nchan.opens_s", 400.0),
        ] {
            m.0.insert(k.into(), v);
        }
        let r = Report {
            command: "bench/run --only nchan".into(),
            store: Store::Postgres,
            started_utc: String::new(),
            finished_utc: String::new(),
            load_start: String::new(),
            load_end: String::new(),
            machine: Machine {
                nproc: 2,
                memory_gib: 1.0,
                cpu: "c".into(),
                kernel: "k".into(),
                postgres: "p".into(),
                sqlite: String::new(),
                data_dir: String::new(),
            },
            sizes: serde_json::json!({"fanout": [1000], "idle_connections": 10, "rate": 100}),
            runs: vec![m],
            errors: vec![],
        };
        let md = r.markdown_peer("nchan");
        assert!(
            md.contains("| 1000 subscribers: server CPU per 1000 deliveries | 30.0 ms | 40.0 ms | 0.75× | ≤ 1× | yes |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| 1000 subscribers: … of which PostgreSQL's (tailcast only) | 5.00 ms | — |  |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| subscriptions opened | 100 /s | 400 /s | 0.25× | ≥ 0.5× | **no** |"),
            "{md}"
        );
        // Figures nobody measured get no row, and nothing of the publish table.
        assert!(!md.contains("delivery latency p99"), "{md}");
        assert!(!md.contains("Publishing with nobody subscribed"), "{md}");
        let doc = "<!-- nchan-results:start -->old<!-- nchan-results:end -->";
        let (_, marks) = PEER_MARKERS[0];
        assert!(splice_between(marks, doc, &md).unwrap().contains("0.75×"));
    }
}
