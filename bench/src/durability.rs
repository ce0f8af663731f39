//! Durability under load: producers append events with ids while SSE and WebSocket
//! subscribers follow; tailcast is SIGKILLed mid-run and restarted on the same port. Then:
//! every acknowledged append is in the log at the seq it was acknowledged with, the log is
//! gap-free with unique ids (producers retry unacknowledged appends with the same id), and
//! every subscriber, resuming by cursor, saw each seq exactly once and in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;

use crate::http::Http;
use crate::report::Metrics;
use crate::server::Server;
use crate::sse::SseParser;
use crate::store::StoreDb;
use crate::util::{event_json, now_us, parse_u64, u64_after};

#[derive(Default)]
struct SubStats {
    last: AtomicU64,
    duplicates: AtomicU64,
    gaps: AtomicU64,
    reconnects: AtomicU64,
}

impl SubStats {
    fn saw(&self, seq: u64) {
        let last = self.last.load(Ordering::Relaxed);
        if seq <= last {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            if seq > last + 1 {
                self.gaps.fetch_add(1, Ordering::Relaxed);
            }
            self.last.store(seq, Ordering::Relaxed);
        }
    }
}

pub struct Durability {
    pub producers: usize,
    pub subscribers: usize,
    pub duration: Duration,
    pub stream: String,
}

impl Durability {
    pub async fn run(&self, server: &mut Server, db: &StoreDb, m: &mut Metrics) -> Result<()> {
        let addr = server.addr;
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
        let mut producers = Vec::new();
        for p in 0..self.producers {
            let (stop, acked, stream) = (stop.clone(), acked.clone(), self.stream.clone());
            producers.push(tokio::spawn(produce(addr, p, stream, stop, acked)));
        }
        let subs: Vec<Arc<SubStats>> = (0..self.subscribers).map(|_| Arc::default()).collect();
        let mut sub_tasks = Vec::new();
        for (i, st) in subs.iter().enumerate() {
            let (st, stream) = (st.clone(), self.stream.clone());
            let ws = i % 2 == 1;
            sub_tasks.push(tokio::spawn(async move {
                loop {
                    let res = if ws {
                        follow_ws(addr, &stream, &st).await
                    } else {
                        follow_sse(addr, &stream, &st).await
                    };
                    if let Err(_e) = res {
                        st.reconnects.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        tokio::time::sleep(self.duration / 2).await;
        let acked_before_kill = acked.lock().expect("acked").len();
        server.kill().await?;
        server.restart().await?;
        tokio::time::sleep(self.duration / 2).await;
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            p.await??;
        }
        let log = db.read_log(&self.stream).await?;
        let head = log.len() as u64;
        // Subscribers catch up to the head they now know exists (bounded wait).
        let until = Instant::now() + Duration::from_secs(60);
        while subs.iter().any(|s| s.last.load(Ordering::Relaxed) < head) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in &sub_tasks {
            t.abort();
        }

        let mut lost = 0u64;
        let acked = acked.lock().expect("acked");
        for (seq, id) in acked.iter() {
            if log.get(*seq as usize - 1).map(|(_, i)| i.as_deref()) != Some(Some(id.as_str())) {
                lost += 1;
            }
        }
        let log_gaps = log
            .iter()
            .enumerate()
            .filter(|(i, (seq, _))| *seq != *i as u64 + 1)
            .count();
        let mut ids: Vec<&str> = log.iter().filter_map(|(_, id)| id.as_deref()).collect();
        ids.sort_unstable();
        let total_ids = ids.len();
        ids.dedup();
        let dup_ids = total_ids - ids.len();
        let sum = |f: fn(&SubStats) -> u64| subs.iter().map(|s| f(s)).sum::<u64>();
        let sub_dups = sum(|s| s.duplicates.load(Ordering::Relaxed));
        let sub_gaps = sum(|s| s.gaps.load(Ordering::Relaxed));
        let incomplete = subs
            .iter()
            .filter(|s| s.last.load(Ordering::Relaxed) != head)
            .count();
        m.set("durability.acked", acked.len() as f64);
        m.set("durability.acked_before_kill", acked_before_kill as f64);
        m.set("durability.log_events", head as f64);
        m.set("durability.lost", lost as f64);
        m.set("durability.log_gaps", log_gaps as f64);
        m.set("durability.duplicate_ids", dup_ids as f64);
        m.set("durability.subscriber_duplicates", sub_dups as f64);
        m.set("durability.subscriber_gaps", sub_gaps as f64);
        m.set("durability.subscribers_incomplete", incomplete as f64);
        m.set(
            "durability.reconnects",
            sum(|s| s.reconnects.load(Ordering::Relaxed)) as f64,
        );
        let ok = lost == 0
            && log_gaps == 0
            && dup_ids == 0
            && sub_dups == 0
            && sub_gaps == 0
            && incomplete == 0;
        m.set("durability.ok", if ok { 1.0 } else { 0.0 });
        if acked_before_kill == 0 || acked.len() <= acked_before_kill {
            bail!("durability: nothing was acknowledged on one side of the kill ({acked_before_kill} before, {} in all)", acked.len());
        }
        Ok(())
    }
}

/// Appends single events with ids; an append whose answer was lost is retried with the same
/// id until it is acknowledged (a duplicate answer carries the original seq).
async fn produce(
    addr: SocketAddr,
    p: usize,
    stream: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, String)>>>,
) -> Result<()> {
    let mut http: Option<Http> = None;
    let mut n = 0u64;
    let give_up = Duration::from_secs(60);
    while !stop.load(Ordering::Relaxed) {
        let id = format!("p{p}-{n}");
        let body = event_json(now_us(), n, Some(&id));
        let since = Instant::now();
        loop {
            if http.is_none() {
                http = Http::connect(addr, None).await.ok();
            }
            if let Some(h) = http.as_mut() {
                match h.append(&stream, body.clone()).await {
                    Ok(seq) => {
                        acked.lock().expect("acked").push((seq, id.clone()));
                        break;
                    }
                    Err(_) => http = None,
                }
            }
            if since.elapsed() > give_up {
                bail!("append {id} not acknowledged within {give_up:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n += 1;
    }
    Ok(())
}

async fn follow_sse(addr: SocketAddr, stream: &str, st: &SubStats) -> Result<()> {
    let mut http = Http::connect(addr, None).await?;
    let last = st.last.load(Ordering::Relaxed).to_string();
    let res = http
        .get(
            &format!("/v1/streams/{stream}/sse"),
            &[("last-event-id", &last)],
        )
        .await?;
    if !res.status().is_success() {
        bail!("SSE: {}", res.status());
    }
    let mut body = res.into_body();
    let mut parser = SseParser::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        parser.feed(&data, |ev| {
            if let Some(seq) = ev.id.and_then(parse_u64) {
                st.saw(seq);
            }
        });
    }
    bail!("SSE response ended")
}

async fn follow_ws(addr: SocketAddr, stream: &str, st: &SubStats) -> Result<()> {
    let mut ws = crate::ws::connect(addr, None).await?;
    crate::ws::subscribe(&mut ws, stream, st.last.load(Ordering::Relaxed)).await?;
    while let Some(msg) = ws.next().await {
        let Message::Text(t) = msg? else { continue };
        if t.as_bytes().starts_with(b"{\"op\":\"event\"") {
            if let Some(seq) = u64_after(t.as_bytes(), b"\"seq\":") {
                st.saw(seq);
            }
        }
    }
    let _ = ws.close(None).await;
    bail!("WebSocket ended")
}

/// (seq, event id) of every event of the stream, in seq order, straight from PostgreSQL.
pub async fn read_pg_log(db_url: &str, stream: &str) -> Result<Vec<(u64, Option<String>)>> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(db_url).await?;
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as(
        "select e.seq, e.event_id from events e join streams s on s.id = e.stream_id
         where s.name = $1 order by e.seq",
    )
    .bind(stream)
    .fetch_all(&mut c)
    .await?;
    Ok(rows.into_iter().map(|(s, i)| (s as u64, i)).collect())
}
