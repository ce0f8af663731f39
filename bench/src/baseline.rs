//! Raw PostgreSQL baselines, measured in the same run and database as tailcast, on a table of
//! the same shape as `events` (`like events including all`: same columns and indexes).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use hdrhistogram::Histogram;
use sqlx::{Connection, Executor, PgConnection};

use crate::report::Metrics;
use crate::util::{now_us, payload, percentiles_ms};

const TABLE: &str = "bench_events";

/// Stream ids for baseline rows, distinct across scenarios so primary keys never collide.
static NEXT_SID: AtomicI64 = AtomicI64::new(1_000_000);

fn next_sid() -> i64 {
    NEXT_SID.fetch_add(1, Ordering::Relaxed)
}

async fn connect(url: &str) -> Result<PgConnection> {
    let mut last = None;
    // The server is shared: retry briefly if it is at max_connections.
    for _ in 0..20 {
        match PgConnection::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.expect("tried")).context("connecting for the baseline")
}

/// Creates (or empties) the baseline table.
pub async fn prepare(url: &str) -> Result<()> {
    let mut c = connect(url).await?;
    c.execute(format!("create table if not exists {TABLE} (like events including all)").as_str())
        .await?;
    c.execute(format!("truncate {TABLE}").as_str()).await?;
    Ok(())
}

/// (a) One row per transaction (autocommit INSERT) from `conns` connections. Records
/// rows/s, and per-insert latency.
pub async fn row_per_tx(
    url: &str,
    conns: usize,
    dur: Duration,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    let rows = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut conn = connect(url).await?;
        let rows = rows.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
            let sid = next_sid();
            let mut seq = 0i64;
            while Instant::now() < deadline {
                seq += 1;
                let t = Instant::now();
                sqlx::query(&format!(
                    "insert into {TABLE} (stream_id, seq, type, data, time) values ($1, $2, 'token', $3, now())"
                ))
                .bind(sid)
                .bind(seq)
                .bind(payload(now_us(), seq as u64))
                .execute(&mut conn)
                .await?;
                h.saturating_record(t.elapsed().as_micros() as u64);
                rows.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(h)
        }));
    }
    let started = Instant::now();
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    for t in tasks {
        all.add(t.await??)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let (p50, p99, _) = percentiles_ms(&all);
    m.set(
        &format!("{key}.rows_s"),
        rows.load(Ordering::Relaxed) as f64 / secs,
    );
    m.set(&format!("{key}.p50_ms"), p50);
    m.set(&format!("{key}.p99_ms"), p99);
    Ok(())
}

/// (b) Multi-row INSERT of `batch` rows per transaction from `conns` connections.
pub async fn multi_row(
    url: &str,
    conns: usize,
    batch: usize,
    dur: Duration,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    let mut sql = format!("insert into {TABLE} (stream_id, seq, type, data, time) values ");
    for i in 0..batch {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "(${}, ${}, 'token', ${}, now())",
            3 * i + 1,
            3 * i + 2,
            3 * i + 3
        ));
    }
    let sql: Arc<str> = sql.into();
    let rows = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut conn = connect(url).await?;
        let (rows, sql) = (rows.clone(), sql.clone());
        tasks.push(tokio::spawn(async move {
            let sid = next_sid();
            let mut seq = 0i64;
            while Instant::now() < deadline {
                let ts = now_us();
                let mut q = sqlx::query(&sql);
                for _ in 0..batch {
                    seq += 1;
                    q = q.bind(sid).bind(seq).bind(payload(ts, seq as u64));
                }
                q.execute(&mut conn).await?;
                rows.fetch_add(batch as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    m.set(
        &format!("{key}.rows_s"),
        rows.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// One COPY text-format row of the events table's shape.
fn copy_row(buf: &mut String, sid: i64, seq: u64, ts: u64) {
    use std::fmt::Write;
    let _ = writeln!(
        buf,
        "{sid}\t{seq}\ttoken\t{}\t2026-11-23 10:00:00.123+00",
        payload(ts, seq)
    );
}

/// (c) COPY FROM STDIN, `chunk` rows per COPY, on one connection, for `dur`.
pub async fn copy_in(
    url: &str,
    chunk: u64,
    dur: Duration,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    let mut conn = connect(url).await?;
    let started = Instant::now();
    let mut rows = 0u64;
    let mut seq = 0u64;
    let sid = next_sid();
    while started.elapsed() < dur {
        let mut copy = conn
            .copy_in_raw(&format!(
                "copy {TABLE} (stream_id, seq, type, data, time) from stdin"
            ))
            .await?;
        let mut buf = String::with_capacity(1 << 20);
        let ts = now_us();
        for _ in 0..chunk {
            seq += 1;
            copy_row(&mut buf, sid, seq, ts);
            if buf.len() > (1 << 20) - 256 {
                copy.send(std::mem::take(&mut buf).into_bytes()).await?;
            }
        }
        copy.send(buf.into_bytes()).await?;
        rows += copy.finish().await?;
    }
    m.set(
        &format!("{key}.rows_s"),
        rows as f64 / started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Writes `n` events into tailcast's own log as stream `name` (with COPY: seeding is not what
/// is measured), so catch-up has a long stream to read.
pub async fn seed_stream(url: &str, name: &str, n: u64) -> Result<()> {
    let mut conn = connect(url).await?;
    let id: i64 =
        sqlx::query_scalar("insert into streams (name, head) values ($1, $2) returning id")
            .bind(name)
            .bind(n as i64)
            .fetch_one(&mut conn)
            .await?;
    let mut copy = conn
        .copy_in_raw("copy events (stream_id, seq, type, data, time) from stdin")
        .await?;
    let mut buf = String::with_capacity(1 << 20);
    for seq in 1..=n {
        copy_row(&mut buf, id, seq, 0);
        if buf.len() > (1 << 20) - 256 {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    conn.execute("vacuum analyze events").await?;
    Ok(())
}

/// (d) COPY (SELECT … ORDER BY seq) TO STDOUT of a whole stream: the fastest way PostgreSQL
/// hands out the rows a catch-up reads. Returns rows read.
pub async fn copy_out(url: &str, name: &str, m: &mut Metrics, key: &str) -> Result<u64> {
    let mut conn = connect(url).await?;
    let id: i64 = sqlx::query_scalar("select id from streams where name = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await?;
    let started = Instant::now();
    let mut out = conn
        .copy_out_raw(&format!(
            "copy (select seq, type, data, event_id, key, time from events where stream_id = {id} order by seq) to stdout"
        ))
        .await?;
    let mut rows = 0u64;
    while let Some(chunk) = out.next().await {
        rows += memchr::memchr_iter(b'\n', &chunk?).count() as u64;
    }
    m.set(
        &format!("{key}.rows_s"),
        rows as f64 / started.elapsed().as_secs_f64(),
    );
    Ok(rows)
}
