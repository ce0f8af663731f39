//! Fan-out: many SSE or WebSocket subscribers, events published at a fixed rate, delivered
//! events/s and publish-to-client latency from the send time carried in every payload.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::http::{source_ip, Http};
use crate::report::Metrics;
use crate::util::{event_json, now_us, percentiles_ms, u64_after, Latencies};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transport {
    Sse,
    Ws,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

/// What every subscriber reports into.
#[derive(Default)]
struct Tally {
    ready: AtomicUsize,
    delivered: AtomicU64,
    /// Events whose seq was not the previous one + 1 (a duplicate, a gap, a reorder).
    out_of_order: AtomicU64,
    failed: AtomicUsize,
}

pub struct Fanout {
    pub transport: Transport,
    pub subscribers: usize,
    /// Subscriber i follows stream i % streams.
    pub streams: usize,
    pub rate: u64,
    pub duration: Duration,
    pub prefix: String,
}

impl Fanout {
    pub async fn run(&self, addr: SocketAddr, m: &mut Metrics, key: &str) -> Result<()> {
        let tally = Arc::new(Tally::default());
        let lat = Arc::new(Latencies::new());
        let names: Arc<Vec<String>> = Arc::new(
            (0..self.streams)
                .map(|i| format!("{}-{i}", self.prefix))
                .collect(),
        );
        let connecting = Arc::new(Semaphore::new(64));
        let mut subs = Vec::with_capacity(self.subscribers);
        for i in 0..self.subscribers {
            let (tally, lat, connecting) = (tally.clone(), lat.clone(), connecting.clone());
            let stream = names[i % self.streams].clone();
            let transport = self.transport;
            subs.push(tokio::spawn(async move {
                let res = subscriber(transport, addr, i, &stream, &tally, &lat, &connecting).await;
                if let Err(e) = &res {
                    if tally.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("  subscriber {i} failed: {e:#}");
                    }
                }
            }));
        }
        let ready_by = Instant::now() + Duration::from_secs(180);
        while tally.ready.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed)
            < self.subscribers
        {
            if Instant::now() > ready_by {
                bail!(
                    "only {} of {} subscribers connected",
                    tally.ready.load(Ordering::Relaxed),
                    self.subscribers
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if tally.failed.load(Ordering::Relaxed) > 0 {
            bail!(
                "{} subscribers failed to connect",
                tally.failed.load(Ordering::Relaxed)
            );
        }
        let started = Instant::now();
        let published = publish_paced(addr, names.clone(), self.rate, self.duration).await?;
        let publish_secs = started.elapsed().as_secs_f64();
        let expected = published * self.subscribers as u64 / self.streams as u64;
        // Bounded wait for the stragglers: a subscriber that falls behind shows up as
        // delivered < expected and in the latency tail, not as a hang.
        let grace = Instant::now() + Duration::from_secs(10);
        while tally.delivered.load(Ordering::Relaxed) < expected && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let all_secs = started.elapsed().as_secs_f64();
        for s in &subs {
            s.abort();
        }
        let delivered = tally.delivered.load(Ordering::Relaxed);
        let (p50, p99, max) = percentiles_ms(&lat.merged());
        m.set(
            &format!("{key}.published_s"),
            published as f64 / publish_secs,
        );
        m.set(&format!("{key}.delivered_s"), delivered as f64 / all_secs);
        m.set(
            &format!("{key}.complete"),
            delivered as f64 / expected.max(1) as f64,
        );
        m.set(
            &format!("{key}.out_of_order"),
            tally.out_of_order.load(Ordering::Relaxed) as f64,
        );
        // Diagnostics: how often subscribers had to go back to the log (lag or seq gaps)
        // instead of being served from the live hub.
        match server_metrics(addr).await {
            Err(e) => eprintln!("  (could not read the server's metrics: {e:#})"),
            Ok(text) => {
                for (name, what) in [
                    ("tailcast_catchup_reads_total", "log_reads"),
                    ("tailcast_lag_fallbacks_total", "lag_fallbacks"),
                ] {
                    if let Some(v) = metric_value(&text, name) {
                        m.set(&format!("{key}.{what}"), v);
                    }
                }
            }
        }
        m.set(&format!("{key}.p50_ms"), p50);
        m.set(&format!("{key}.p99_ms"), p99);
        m.set(&format!("{key}.max_ms"), max);
        Ok(())
    }
}

/// Tracks one subscriber's sequence and records each event's latency.
struct Seen<'a> {
    last: u64,
    shard: usize,
    tally: &'a Tally,
    lat: &'a Latencies,
    count: u64,
}

impl Seen<'_> {
    fn event(&mut self, seq: u64, envelope: &[u8]) {
        if seq != self.last + 1 {
            self.tally.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        self.last = seq;
        if let Some(ts) = u64_after(envelope, b"\"ts\":") {
            self.lat.record(self.shard, now_us().saturating_sub(ts));
        }
        self.count += 1;
    }

    fn flush(&mut self) {
        self.tally
            .delivered
            .fetch_add(self.count, Ordering::Relaxed);
        self.count = 0;
    }
}

async fn subscriber(
    transport: Transport,
    addr: SocketAddr,
    i: usize,
    stream: &str,
    tally: &Tally,
    lat: &Latencies,
    connecting: &Semaphore,
) -> Result<()> {
    let mut seen = Seen {
        last: 0,
        shard: i,
        tally,
        lat,
        count: 0,
    };
    match transport {
        Transport::Sse => {
            let permit = connecting.acquire().await?;
            let mut http = Http::connect(addr, source_ip(i)).await?;
            let res = http
                .get(
                    &format!("/v1/streams/{stream}/sse?after=0"),
                    &[("accept", "text/event-stream")],
                )
                .await?;
            if !res.status().is_success() {
                bail!("SSE {stream}: {}", res.status());
            }
            drop(permit);
            tally.ready.fetch_add(1, Ordering::Relaxed);
            crate::sse::follow(res.into_body(), |parser, data| {
                parser.feed(data, |ev| {
                    if let Some(seq) = ev.id.and_then(crate::util::parse_u64) {
                        seen.event(seq, ev.data);
                    }
                });
                seen.flush();
            })
            .await?;
            drop(http);
        }
        Transport::Ws => {
            let permit = connecting.acquire().await?;
            let mut ws = crate::ws::connect(addr, source_ip(i)).await?;
            crate::ws::subscribe(&mut ws, stream, 0).await?;
            drop(permit);
            tally.ready.fetch_add(1, Ordering::Relaxed);
            while let Some(msg) = ws.next().await {
                let Message::Text(t) = msg? else { continue };
                let b = t.as_bytes();
                if b.starts_with(b"{\"op\":\"event\"") {
                    let seq = u64_after(b, b"\"seq\":").context("event without seq")?;
                    seen.event(seq, b);
                    seen.flush();
                }
            }
        }
    }
    Ok(())
}

/// Appends single events at `rate` per second for `dur`, round-robin over `streams`, from a
/// few connections so one slow answer does not hold back the schedule. Returns how many
/// were appended. Each payload carries the time it was sent.
pub async fn publish_paced(
    addr: SocketAddr,
    streams: Arc<Vec<String>>,
    rate: u64,
    dur: Duration,
) -> Result<u64> {
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(100_000);
    let rx = Arc::new(Mutex::new(rx));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut http = Http::connect(addr, None).await?;
        let (rx, done, streams) = (rx.clone(), done.clone(), streams.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(n) = next else { break };
                let stream = &streams[(n % streams.len() as u64) as usize];
                http.append(stream, event_json(now_us(), n, None)).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let start = tokio::time::Instant::now();
    let total = (rate as f64 * dur.as_secs_f64()) as u64;
    for n in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate as f64)).await;
        tx.send(n).await?;
    }
    drop(tx);
    for w in workers {
        w.await??;
    }
    Ok(done.load(Ordering::Relaxed))
}

/// The server's Prometheus text.
pub async fn server_metrics(addr: SocketAddr) -> Result<String> {
    let mut http = Http::connect(addr, None).await?;
    let res = http.get("/metrics", &[]).await?;
    let body = res.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The sum of every sample of `name` (over all label sets).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| l.starts_with(name)) {
        let rest = &line[name.len()..];
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
