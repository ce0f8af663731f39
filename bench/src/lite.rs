//! The embedded store: the benchmark's SQLite file (the one the server under test opens),
//! seeded directly, read back for the durability check, and the raw-SQLite baselines measured
//! on that same file with tailcast's pragmas (WAL, `synchronous = FULL`, foreign keys on)
//! through the same driver (sqlx), into a table of the same shape as `events` (its own DDL,
//! read from the file and renamed; the foreign key to `streams` included).
//!
//! The baselines run while no tailcast holds the file (the harness stops the server first).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use hdrhistogram::Histogram;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Executor, Row};

use crate::report::Metrics;
use crate::util::{now_us, payload, percentiles_ms};

const TABLE: &str = "bench_events";

/// The time of every seeded event: 2026-11-23 10:00:00.123 UTC in milliseconds (the same
/// instant the PostgreSQL seed writes).
const SEED_TIME_MS: i64 = 1_795_428_000_123;

/// Numbers the baseline streams' names.
static NEXT_BASELINE: AtomicU64 = AtomicU64::new(1);

/// tailcast's connection settings for its SQLite file (src/log/db.rs): WAL, fsync at every
/// commit, foreign keys enforced.
fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30))
}

async fn connect(path: &Path) -> Result<SqliteConnection> {
    options(path)
        .connect()
        .await
        .with_context(|| format!("opening {}", path.display()))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The SQLite library's version (the one sqlx bundles; tailcast links the same one).
pub async fn version(path: &Path) -> Result<String> {
    let mut c = connect(path).await?;
    let v: String = sqlx::query_scalar("select sqlite_version()")
        .fetch_one(&mut c)
        .await?;
    c.close().await?;
    Ok(v)
}

/// Writes `n` events into tailcast's own log as stream `name`, in one statement that generates
/// the rows inside SQLite (seeding is not what is measured), then checkpoints the WAL into the
/// database so that catch-up reads the table, not a 200 MB log. Every event's `data` is
/// byte-for-byte what the PostgreSQL seed writes: `payload(0, seq)`.
pub async fn seed_stream(path: &Path, name: &str, n: u64) -> Result<()> {
    let sample = payload(0, 0);
    let (head, tail) = sample
        .split_once("\"n\":0")
        .context("payload without its counter")?;
    let head = format!("{head}\"n\":");
    let mut c = connect(path).await?;
    let mut tx = c.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "insert into streams (name, head, created_at, updated_at) values (?1, ?2, ?3, ?3)
         returning id",
    )
    .bind(name)
    .bind(n as i64)
    .bind(SEED_TIME_MS)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "with recursive s(seq) as (select 1 union all select seq + 1 from s where seq < ?2)
         insert into events (stream_id, seq, type, data, time)
         select ?1, seq, 'token', ?3 || seq || ?4, ?5 from s",
    )
    .bind(id)
    .bind(n as i64)
    .bind(&head)
    .bind(tail)
    .bind(SEED_TIME_MS)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    c.execute("pragma wal_checkpoint(truncate)").await?;
    c.execute("analyze").await?;
    c.close().await?;
    Ok(())
}

/// (seq, event id) of every event of the stream, in seq order, straight from the file.
pub async fn read_log(path: &Path, stream: &str) -> Result<Vec<(u64, Option<String>)>> {
    let mut c = connect(path).await?;
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as(
        "select e.seq, e.event_id from events e join streams s on s.id = e.stream_id
         where s.name = ?1 order by e.seq",
    )
    .bind(stream)
    .fetch_all(&mut c)
    .await?;
    c.close().await?;
    Ok(rows.into_iter().map(|(s, i)| (s as u64, i)).collect())
}

/// Replaces the first occurrence of `word` in `sql` that stands alone (not part of a longer
/// identifier) with `with`.
fn replace_word(sql: &str, word: &str, with: &str) -> Option<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(i) = sql[from..].find(word).map(|i| i + from) {
        let before = sql[..i].chars().next_back();
        let after = sql[i + word.len()..].chars().next();
        if !before.is_some_and(ident) && !after.is_some_and(ident) {
            return Some(format!("{}{with}{}", &sql[..i], &sql[i + word.len()..]));
        }
        from = i + word.len();
    }
    None
}

/// `events`' DDL (table or index, as stored in sqlite_master) rewritten for `bench_events`.
fn renamed_ddl(kind: &str, name: &str, sql: &str) -> Result<String> {
    let s = replace_word(sql, "events", TABLE)
        .with_context(|| format!("no table name in the DDL of {kind} {name}: {sql}"))?;
    Ok(if kind == "index" {
        replace_word(&s, name, &format!("bench_{name}"))
            .with_context(|| format!("no index name in the DDL of {name}: {sql}"))?
    } else {
        s
    })
}

/// Creates (again) the baseline table: `events`' own DDL and indexes, renamed.
pub async fn prepare(path: &Path) -> Result<()> {
    let mut c = connect(path).await?;
    let ddl: Vec<(String, String, String)> = sqlx::query_as(
        "select type, name, sql from sqlite_master
         where tbl_name = 'events' and sql is not null order by type = 'index', name",
    )
    .fetch_all(&mut c)
    .await?;
    if !ddl.iter().any(|(kind, _, _)| kind == "table") {
        bail!("no events table in {} (not migrated?)", path.display());
    }
    c.execute(format!("drop table if exists {TABLE}").as_str())
        .await?;
    for (kind, name, sql) in &ddl {
        c.execute(renamed_ddl(kind, name, sql)?.as_str()).await?;
    }
    c.close().await?;
    Ok(())
}

/// A stream row for baseline rows to belong to (`events.stream_id` references `streams`, and
/// the foreign key is checked on every insert, as in tailcast's). SQLite picks the id: the
/// server creates streams between baseline runs.
async fn baseline_stream(c: &mut SqliteConnection) -> Result<i64> {
    let n = NEXT_BASELINE.fetch_add(1, Ordering::Relaxed);
    let id = sqlx::query_scalar(
        "insert into streams (name, created_at, updated_at) values (?1, ?2, ?2) returning id",
    )
    .bind(format!("bench-baseline-{}-{n}", std::process::id()))
    .bind(now_ms())
    .fetch_one(&mut *c)
    .await?;
    Ok(id)
}

/// (a) One row per transaction (an autocommit INSERT: one WAL append and one fsync each) on
/// one connection, for `dur`: rows/s and per-insert latency.
pub async fn row_per_tx(path: &Path, dur: Duration, m: &mut Metrics, key: &str) -> Result<()> {
    let mut c = connect(path).await?;
    let sid = baseline_stream(&mut c).await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let sql = format!(
        "insert into {TABLE} (stream_id, seq, type, data, time) values (?1, ?2, 'token', ?3, ?4)"
    );
    let started = Instant::now();
    let mut seq = 0i64;
    while started.elapsed() < dur {
        seq += 1;
        let t = Instant::now();
        sqlx::query(&sql)
            .bind(sid)
            .bind(seq)
            .bind(payload(now_us(), seq as u64))
            .bind(now_ms())
            .execute(&mut c)
            .await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    let secs = started.elapsed().as_secs_f64();
    c.close().await?;
    let (p50, p99, _) = percentiles_ms(&h);
    m.set(&format!("{key}.rows_s"), seq as f64 / secs);
    m.set(&format!("{key}.p50_ms"), p50);
    m.set(&format!("{key}.p99_ms"), p99);
    Ok(())
}

/// (b) One multi-row INSERT of `batch` rows per transaction on one connection (SQLite has one
/// writer at a time; more connections would only queue on its lock), for `dur`; the rows go
/// round-robin to `streams` streams. One stream is the plain baseline; one row in each of 64
/// streams is what a perfect group commit of 64 single-event clients on their own streams
/// writes: each stream's rows sit on their own index pages, and the WAL takes whole pages.
pub async fn multi_row(
    path: &Path,
    batch: usize,
    streams: usize,
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
            "(?{}, ?{}, 'token', ?{}, ?{})",
            4 * i + 1,
            4 * i + 2,
            4 * i + 3,
            4 * i + 4
        ));
    }
    let mut c = connect(path).await?;
    let mut sids = Vec::with_capacity(streams);
    for _ in 0..streams.max(1) {
        sids.push(baseline_stream(&mut c).await?);
    }
    let started = Instant::now();
    let mut rows = 0u64;
    while started.elapsed() < dur {
        let (ts, ms) = (now_us(), now_ms());
        let mut q = sqlx::query(&sql);
        for i in 0..batch {
            // Seqs 1, 2, … within each stream.
            let n = rows + i as u64;
            let (sid, seq) = (sids[n as usize % sids.len()], n / sids.len() as u64 + 1);
            q = q.bind(sid).bind(seq as i64).bind(payload(ts, seq)).bind(ms);
        }
        q.execute(&mut c).await?;
        rows += batch as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    c.close().await?;
    m.set(&format!("{key}.rows_s"), rows as f64 / secs);
    Ok(())
}

/// (c) A sequential read of a whole stream in seq order (every column a catch-up reads), on
/// one read-only connection, rows streamed from the driver as they come. Returns rows read.
pub async fn read_stream(path: &Path, name: &str, m: &mut Metrics, key: &str) -> Result<u64> {
    let mut c = options(path).read_only(true).connect().await?;
    let id: i64 = sqlx::query_scalar("select id from streams where name = ?1")
        .bind(name)
        .fetch_one(&mut c)
        .await?;
    let started = Instant::now();
    let mut rows = 0u64;
    let mut bytes = 0usize;
    {
        let mut all = sqlx::query(
            "select seq, type, data, event_id, key, time from events
             where stream_id = ?1 order by seq",
        )
        .bind(id)
        .fetch(&mut c);
        while let Some(row) = all.try_next().await? {
            let seq: i64 = row.try_get(0)?;
            let data: &str = row.try_get(2)?;
            if seq as u64 != rows + 1 {
                bail!("read seq {seq} after {rows}");
            }
            bytes += data.len();
            rows += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    c.close().await?;
    m.set(&format!("{key}.rows_s"), rows as f64 / secs);
    m.set(
        &format!("{key}.mib_s"),
        bytes as f64 / secs / (1 << 20) as f64,
    );
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_the_events_ddl() {
        let table = "create table events (\n    stream_id integer not null references streams (id),\n    event_id text,\n    primary key (stream_id, seq)\n)";
        assert_eq!(
            renamed_ddl("table", "events", table).unwrap(),
            table.replacen("table events", "table bench_events", 1)
        );
        let index = "create unique index events_idempotency on events (stream_id, event_id) where event_id is not null";
        assert_eq!(
            renamed_ddl("index", "events_idempotency", index).unwrap(),
            "create unique index bench_events_idempotency on bench_events (stream_id, event_id) where event_id is not null"
        );
        assert!(renamed_ddl("table", "x", "create table other_events (a)").is_err());
    }

    /// The seed writes exactly the payloads the PostgreSQL seed does, and the baselines run
    /// on a file migrated with tailcast's own SQL.
    #[tokio::test]
    async fn seeds_and_measures_a_migrated_file() {
        let dir = std::env::temp_dir().join(format!(
            "tailcast-bench-test-{}-{}",
            std::process::id(),
            now_us()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let mut c = options(&path)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/sqlite");
        let mut files: Vec<_> = std::fs::read_dir(&migrations)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            sqlx::raw_sql(&std::fs::read_to_string(f).unwrap())
                .execute(&mut c)
                .await
                .unwrap();
        }
        c.close().await.unwrap();

        seed_stream(&path, "s", 300).await.unwrap();
        let mut c = connect(&path).await.unwrap();
        let rows: Vec<(i64, String, i64)> =
            sqlx::query_as("select seq, data, time from events order by seq")
                .fetch_all(&mut c)
                .await
                .unwrap();
        c.close().await.unwrap();
        assert_eq!(rows.len(), 300);
        for (i, (seq, data, time)) in rows.iter().enumerate() {
            assert_eq!(*seq, i as i64 + 1);
            assert_eq!(data, &payload(0, *seq as u64));
            assert_eq!(*time, SEED_TIME_MS);
        }
        assert_eq!(read_log(&path, "s").await.unwrap().len(), 300);

        let mut m = Metrics::default();
        prepare(&path).await.unwrap();
        let d = Duration::from_millis(100);
        row_per_tx(&path, d, &mut m, "a").await.unwrap();
        multi_row(&path, 100, 1, d, &mut m, "b").await.unwrap();
        multi_row(&path, 8, 8, d, &mut m, "d").await.unwrap();
        assert_eq!(read_stream(&path, "s", &mut m, "c").await.unwrap(), 300);
        assert!(m.get("a.rows_s").unwrap() > 0.0);
        assert!(m.get("b.rows_s").unwrap() >= 100.0);
        assert!(m.get("d.rows_s").unwrap() >= 8.0);
        // Streams created between baseline runs (the server's) do not get in the way.
        let mut c = connect(&path).await.unwrap();
        sqlx::query("insert into streams (name, created_at, updated_at) values ('x', 0, 0)")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        prepare(&path).await.unwrap();
        row_per_tx(&path, d, &mut m, "a").await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
