//! Append scenarios: one sequential client's latency, 64 concurrent single-event clients over
//! REST and over pipelined WebSocket publish, and batched appends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::http::Http;
use crate::report::Metrics;
use crate::util::{batch_json, event_json, now_us, percentiles_ms};

/// The server's appender counters (from /metrics): jobs (append requests) committed, commits,
/// and seconds spent in commits.
#[derive(Clone, Copy)]
pub struct AppenderCounters {
    jobs: f64,
    batches: f64,
    commit_s: f64,
}

impl AppenderCounters {
    pub async fn read(addr: SocketAddr) -> Option<AppenderCounters> {
        let text = crate::fanout::server_metrics(addr).await.ok()?;
        // Absent until the first commit.
        let v = |name: &str| crate::fanout::metric_value(&text, name).unwrap_or(0.0);
        Some(AppenderCounters {
            jobs: v("tailcast_append_batch_size_sum"),
            batches: v("tailcast_append_batch_size_count"),
            commit_s: v("tailcast_append_commit_seconds_sum"),
        })
    }

    /// Group commits (each sends one NOTIFY) made since `before`.
    pub async fn commits_since(addr: SocketAddr, before: Option<AppenderCounters>) -> Option<f64> {
        let (b, a) = (before?, AppenderCounters::read(addr).await?);
        Some(a.batches - b.batches)
    }

    /// Records what the server did since `before` under `key`: append requests per commit
    /// and the mean time of one commit (lock, insert, fsync), diagnostics for the report.
    pub async fn record_since(
        addr: SocketAddr,
        before: Option<AppenderCounters>,
        m: &mut Metrics,
        key: &str,
    ) {
        let (Some(b), Some(a)) = (before, AppenderCounters::read(addr).await) else {
            return;
        };
        let batches = a.batches - b.batches;
        if batches > 0.0 {
            m.set(
                &format!("{key}.server_jobs_per_commit"),
                (a.jobs - b.jobs) / batches,
            );
            m.set(
                &format!("{key}.server_commit_ms"),
                (a.commit_s - b.commit_s) / batches * 1000.0,
            );
        }
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds")
}

/// One client appending one event at a time, each after the previous one's answer.
pub async fn sequential(
    addr: SocketAddr,
    stream: &str,
    dur: Duration,
    m: &mut Metrics,
) -> Result<()> {
    let mut http = Http::connect(addr, None).await?;
    let mut h = hist();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < dur {
        let t = Instant::now();
        http.append(stream, event_json(now_us(), n, None)).await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
        n += 1;
    }
    let (p50, p99, _) = percentiles_ms(&h);
    m.set("append.seq.p50_ms", p50);
    m.set("append.seq.p99_ms", p99);
    m.set(
        "append.seq.events_s",
        n as f64 / started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// `clients` REST clients, each on its own connection and stream, each appending `batch`
/// events per request (1: single events) as fast as answers come back.
pub async fn concurrent_rest(
    addr: SocketAddr,
    prefix: &str,
    clients: usize,
    batch: usize,
    dur: Duration,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    let events = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Http::connect(addr, None).await?);
    }
    let started = Instant::now();
    let deadline = started + dur;
    let mut tasks = Vec::new();
    for (c, mut http) in conns.into_iter().enumerate() {
        let events = events.clone();
        let stream = format!("{prefix}-{c}");
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let body = if batch == 1 {
                    event_json(now_us(), n, None)
                } else {
                    batch_json(batch, n)
                };
                let t = Instant::now();
                http.append(&stream, body).await?;
                h.saturating_record(t.elapsed().as_micros() as u64);
                n += batch as u64;
                events.fetch_add(batch as u64, Ordering::Relaxed);
            }
            anyhow::Ok(h)
        }));
    }
    let mut all = hist();
    for t in tasks {
        all.add(t.await??)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let (p50, p99, _) = percentiles_ms(&all);
    m.set(
        &format!("{key}.events_s"),
        events.load(Ordering::Relaxed) as f64 / secs,
    );
    m.set(&format!("{key}.p50_ms"), p50);
    m.set(&format!("{key}.p99_ms"), p99);
    Ok(())
}

/// `clients` WebSocket connections, each publishing single events to its own stream with up
/// to `window` publishes awaiting their `ack`.
pub async fn concurrent_ws(
    addr: SocketAddr,
    prefix: &str,
    clients: usize,
    window: usize,
    dur: Duration,
    m: &mut Metrics,
) -> Result<()> {
    let acked = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(crate::ws::connect(addr, None).await?);
    }
    let started = Instant::now();
    let deadline = started + dur;
    let mut tasks = Vec::new();
    for (c, ws) in conns.into_iter().enumerate() {
        let acked = acked.clone();
        let stream = format!("{prefix}-{c}");
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let credit = Arc::new(Semaphore::new(window));
            let writer = {
                let credit = credit.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        credit.acquire().await?.forget();
                        let ev = event_json(now_us(), n, None);
                        let op = format!(
                            "{{\"op\":\"publish\",\"stream\":\"{stream}\",\"ref\":\"{n}\",\"events\":[{ev}]}}"
                        );
                        tx.send(Message::text(op)).await?;
                        n += 1;
                    }
                    anyhow::Ok((n, tx))
                })
            };
            let mut got = 0u64;
            let mut sent = None;
            let mut writer = Some(writer);
            loop {
                if let Some(n) = sent {
                    if got >= n {
                        break;
                    }
                }
                let next = tokio::select! {
                    msg = rx.next() => msg,
                    w = async { writer.as_mut().expect("checked").await }, if writer.is_some() => {
                        writer = None;
                        let (n, _tx) = w??;
                        sent = Some(n);
                        continue;
                    }
                };
                let Some(msg) = next else { bail!("WebSocket closed while publishing") };
                let Message::Text(t) = msg? else { continue };
                if t.contains("\"op\":\"ack\"") {
                    got += 1;
                    acked.fetch_add(1, Ordering::Relaxed);
                    credit.add_permits(1);
                } else if t.contains("\"op\":\"error\"") {
                    bail!("publish failed: {t}");
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    m.set(
        "append.ws64.events_s",
        acked.load(Ordering::Relaxed) as f64 / secs,
    );
    Ok(())
}
