//! What an operator scrapes from a fresh server: every metric the README names is there from
//! the start, with its HELP text and the label names the README gives; the README names every
//! metric exported; and deploy/'s alert rules and dashboard query only metrics that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{listening_addr, terminate, WAIT};

const README: &str = include_str!("../../README.md");

/// The metrics of the README's `GET /metrics` item: name -> label names.
fn readme_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let start = README
        .find("- `GET /metrics`")
        .expect("README documents /metrics");
    let end = start
        + README[start..]
            .find("[`deploy/`]")
            .expect("the list ends at deploy/");
    let mut out = BTreeMap::new();
    for code in README[start..end].split('`').skip(1).step_by(2) {
        // Names, not example selectors like `…{status="503"}`.
        if !(code.starts_with("tailcast_") || code.starts_with("process_")) || code.contains('=') {
            continue;
        }
        let (name, labels) = match code.split_once('{') {
            Some((n, l)) => (
                n,
                l.trim_end_matches('}')
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
            ),
            None => (code, BTreeSet::new()),
        };
        out.insert(name.to_owned(), labels);
    }
    assert!(out.len() > 30, "README's metric list not found: {out:?}");
    out
}

/// A scrape parsed: metric name (from `# TYPE`) -> (help, type, label-name sets of its samples).
struct Scrape {
    text: String,
    metrics: BTreeMap<String, (String, String, BTreeSet<BTreeSet<String>>)>,
}

fn parse(text: String) -> Scrape {
    let mut metrics: BTreeMap<String, (String, String, BTreeSet<BTreeSet<String>>)> =
        BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            metrics.entry(name.into()).or_default().0 = help.into();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            metrics.entry(name.into()).or_default().1 = ty.into();
        } else if !line.is_empty() && !line.starts_with('#') {
            let series = line.rsplit_once(' ').unwrap().0;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let labels: BTreeSet<String> = labels
                .trim_end_matches('}')
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                .filter(|k| k != "le")
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| metrics.get(*b).is_some_and(|m| m.1 == "histogram"))
                })
                .unwrap_or(name);
            metrics.entry(base.into()).or_default().2.insert(labels);
        }
    }
    Scrape { text, metrics }
}

/// Scrapes a freshly started binary twice (the first scrape is the server's first request;
/// the second also shows the per-route HTTP series it created).
async fn fresh_scrapes() -> (Scrape, Scrape) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailcast"))
        .env_remove("DATABASE_URL")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/m.db", dir.path().display()),
        )
        .env("TAILCAST_LISTEN", "127.0.0.1:0")
        .env("TAILCAST_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = listening_addr(&mut lines).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let mut scrapes = Vec::new();
    for _ in 0..2 {
        let res = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        scrapes.push(parse(res.text().await.unwrap()));
    }
    terminate(&mut child).await;
    let second = scrapes.pop().unwrap();
    (scrapes.pop().unwrap(), second)
}

#[tokio::test]
async fn a_fresh_server_exports_every_metric_the_readme_names_with_help_and_labels() {
    let documented = readme_metrics();
    let (first, second) = fresh_scrapes().await;
    assert!(!first.text.is_empty());
    for (scrape, which) in [(&first, "first"), (&second, "second")] {
        for (name, labels) in &documented {
            // The per-route HTTP series appear with their route's first request.
            if which == "first" && name.starts_with("tailcast_http_") {
                continue;
            }
            // A webhook's series appear when a node first sees the webhook, and a fresh
            // server has none: tests/api/webhooks.rs checks their help and labels.
            if name.starts_with("tailcast_webhook_") {
                continue;
            }
            let Some((help, ty, series)) = scrape.metrics.get(name) else {
                panic!(
                    "{which} scrape lacks {name}, which the README names:\n{}",
                    scrape.text
                );
            };
            assert!(help.len() > 10, "{name} has no HELP text");
            assert!(!ty.is_empty(), "{name} has no TYPE");
            assert!(
                series.contains(labels),
                "{name}: README gives labels {labels:?}, the {which} scrape has {series:?}"
            );
        }
    }
    // The README names every metric there is, and the registry matches the scrape.
    for name in second.metrics.keys() {
        assert!(documented.contains_key(name), "README does not name {name}");
    }
    for name in tailcast::metrics::names() {
        assert!(documented.contains_key(name), "README does not name {name}");
    }
    // Counters start at 0 on a fresh server.
    let appended = first
        .text
        .lines()
        .find_map(|l| l.strip_prefix("tailcast_appended_events_total "));
    assert_eq!(appended, Some("0"));
}

/// Every metric name in a PromQL expression (ours are prefixed; `up` is Prometheus's own).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("tailcast_") || w.starts_with("process_") || *w == "up")
        .map(str::to_owned)
        .collect()
}

fn exprs_in_json(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => exprs_in_json(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs_in_json(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn deploy_rules_and_dashboard_query_only_exported_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules: Value = serde_norway::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/prometheus/tailcast-alerts.yml")).unwrap(),
    )
    .unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/tailcast-dashboard.json")).unwrap(),
    )
    .unwrap();
    let (_, scrape) = fresh_scrapes().await;
    for (file, doc, least) in [("alert rules", &rules, 10), ("dashboard", &dashboard, 25)] {
        let mut exprs = Vec::new();
        exprs_in_json(doc, &mut exprs);
        let mut used = BTreeSet::new();
        for expr in &exprs {
            for name in metric_names(expr) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| scrape.metrics.get(*b).is_some_and(|m| m.1 == "histogram"))
                    .unwrap_or(&name);
                assert!(
                    base == "up" || scrape.metrics.contains_key(base),
                    "the {file} query {name}, which tailcast does not export: {expr}"
                );
                used.insert(base.to_owned());
            }
        }
        assert!(used.len() >= least, "the {file} use only {used:?}");
    }
}
