//! Retention: removes a stream's oldest events once it holds more than its `max_events` or
//! they are older than its `max_age_s` (per-stream values, else the server defaults; 0 means
//! no limit).
//!
//! A background task runs a pass every interval. Each pass deletes in short transactions of
//! at most `batch` events, each advancing `streams.trimmed_to` with its delete, so readers
//! always know where the retained log starts: a cursor before it gets the `gap` notice. Any
//! number of nodes may run the task: on PostgreSQL a batch only runs under a
//! transaction-scoped advisory lock, so at most one node trims at a time and each batch
//! re-reads `trimmed_to` under it (on SQLite, one process and its serial writes do the same).
//!
//! A closed stream always keeps its last event (`stream.closed`): a subscriber replaying it
//! must still see the stream end, and a client resuming at the head still gets `204`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::db::{on_db, on_tx, Db, Ts, Tx};
use super::model::ceil_millis;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Key of the advisory lock that serialises trimming across nodes ("tailcast" in ASCII).
const RETENTION_LOCK: i64 = 0x7461_696c_6361_7374;

/// Candidate streams examined per query.
const SCAN_PAGE: i64 = 500;

/// Server-wide defaults and how much one statement may delete.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// 0: no age limit.
    pub max_age_s: i64,
    /// 0: no count limit.
    pub max_events: i64,
    pub batch: i64,
}

/// A stream's retention settings: its overrides (None: the default applies) and the limits
/// in force.
#[derive(Debug, Clone, Serialize)]
pub struct StreamRetention {
    pub stream: String,
    pub max_age_s: Option<i64>,
    pub max_events: Option<i64>,
    pub effective: Limits,
    pub oldest_seq: i64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    pub max_age_s: i64,
    pub max_events: i64,
}

/// The retention columns of a stream's row.
#[derive(sqlx::FromRow)]
struct RetentionRow {
    name: String,
    max_age_s: Option<i64>,
    max_events: Option<i64>,
    trimmed_to: i64,
}

fn retention_from_row(r: RetentionRow, policy: &Policy) -> StreamRetention {
    let RetentionRow {
        name,
        max_age_s,
        max_events,
        trimmed_to,
    } = r;
    StreamRetention {
        stream: name,
        max_age_s,
        max_events,
        effective: Limits {
            max_age_s: max_age_s.unwrap_or(policy.max_age_s),
            max_events: max_events.unwrap_or(policy.max_events),
        },
        oldest_seq: trimmed_to + 1,
    }
}

/// A stream's settings, or None if it does not exist.
pub async fn get(
    db: &Db,
    name: &str,
    policy: &Policy,
) -> Result<Option<StreamRetention>, sqlx::Error> {
    let sql = "select name, max_age_s, max_events, trimmed_to from streams where name = $1";
    let row: Option<RetentionRow> = on_db!(db, read, |ex| {
        sqlx::query_as(sql).bind(name).fetch_optional(ex).await
    })?;
    Ok(row.map(|r| retention_from_row(r, policy)))
}

/// Sets (None: clears) a stream's overrides. None if the stream does not exist.
pub async fn set(
    db: &Db,
    name: &str,
    max_age_s: Option<i64>,
    max_events: Option<i64>,
    policy: &Policy,
) -> Result<Option<StreamRetention>, sqlx::Error> {
    // A plain row update: it waits for an appender batch holding this row's lock, briefly.
    let sql = "update streams set max_age_s = $2, max_events = $3 where name = $1
               returning name, max_age_s, max_events, trimmed_to";
    let row: Option<RetentionRow> = on_db!(db, write, |ex| {
        sqlx::query_as(sql)
            .bind(name)
            .bind(max_age_s)
            .bind(max_events)
            .fetch_optional(ex)
            .await
    })?;
    Ok(row.map(|r| retention_from_row(r, policy)))
}

#[derive(sqlx::FromRow)]
struct Candidate {
    id: i64,
    head: i64,
    closed: bool,
    max_events: i64,
    max_age_s: i64,
}

/// Streams with something to trim, after `after_id`, by id.
async fn candidates(
    db: &Db,
    policy: &Policy,
    now: DateTime<Utc>,
    after_id: i64,
) -> Result<Vec<Candidate>, sqlx::Error> {
    // The oldest retained event is always seq trimmed_to + 1 (the log is gap-free and only
    // retention removes events), so the age test is one primary-key probe per stream.
    let older = match db {
        Db::Postgres(_) => "e.time < $4 - make_interval(secs => coalesce(s.max_age_s, $2)::float8)",
        Db::Sqlite(_) => "e.time < $4 - coalesce(s.max_age_s, $2) * 1000",
    };
    let sql = format!(
        r#"select s.id, s.head, s.closed,
                  coalesce(s.max_events, $1) as max_events,
                  coalesce(s.max_age_s, $2) as max_age_s
           from streams s
           where s.id > $3
             and s.head > s.trimmed_to + (case when s.closed then 1 else 0 end)
             and ((coalesce(s.max_events, $1) > 0
                   and s.head - s.trimmed_to > coalesce(s.max_events, $1))
               or (coalesce(s.max_age_s, $2) > 0
                   and exists (select 1 from events e
                               where e.stream_id = s.id and e.seq = s.trimmed_to + 1
                                 and {older})))
           order by s.id limit $5"#
    );
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql)
            .bind(policy.max_events)
            .bind(policy.max_age_s)
            .bind(after_id)
            .bind(Ts(ceil_millis(now)))
            .bind(SCAN_PAGE)
            .fetch_all(ex)
            .await
    })
}

/// The highest seq that may go: everything at or below it is trimmed.
async fn cut_for(db: &Db, c: &Candidate, now: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    let mut cut = 0;
    if c.max_events > 0 {
        cut = c.head - c.max_events;
    }
    if c.max_age_s > 0 {
        let before = Ts(ceil_millis(now - chrono::Duration::seconds(c.max_age_s)));
        let newest_old: Option<i64> = on_db!(db, read, |ex| {
            sqlx::query_scalar(
                "select seq from events where stream_id = $1 and time < $2
                 order by time desc, seq desc limit 1",
            )
            .bind(c.id)
            .bind(before)
            .fetch_optional(ex)
            .await
        })?;
        cut = cut.max(newest_old.unwrap_or(0));
    }
    if c.closed {
        cut = cut.min(c.head - 1);
    }
    Ok(cut)
}

enum Batch {
    Deleted(u64),
    Done,
    /// Another node holds the retention lock.
    Busy,
}

/// Deletes at most `limit` events at or below `cut`, advancing `trimmed_to` with them.
async fn trim_batch(db: &Db, id: i64, cut: i64, limit: i64) -> Result<Batch, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    if let Tx::Postgres(t) = &mut tx {
        // Released at commit: serialises trimming across nodes without a session to keep.
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
            .bind(RETENTION_LOCK)
            .fetch_one(&mut **t)
            .await?;
        if !locked {
            return Ok(Batch::Busy);
        }
    }
    // Only retention writes trimmed_to, and we hold its lock: this value is current.
    let trimmed: Option<i64> = on_tx!(&mut tx, |ex| {
        sqlx::query_scalar("select trimmed_to from streams where id = $1")
            .bind(id)
            .fetch_optional(ex)
            .await
    })?;
    let Some(trimmed) = trimmed.filter(|t| *t < cut) else {
        return Ok(Batch::Done);
    };
    let upto = cut.min(trimmed + limit);
    // Seqs are gap-free above trimmed_to, so this range holds at most `limit` rows.
    let deleted = on_tx!(&mut tx, |ex| {
        sqlx::query("delete from events where stream_id = $1 and seq > $2 and seq <= $3")
            .bind(id)
            .bind(trimmed)
            .bind(upto)
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    // Last, so the stream row is locked (against the appender) only until the commit.
    on_tx!(&mut tx, |ex| {
        sqlx::query("update streams set trimmed_to = $2 where id = $1")
            .bind(id)
            .bind(upto)
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    tx.commit().await?;
    Ok(Batch::Deleted(deleted))
}

/// One pass over every stream; returns how many events it deleted. Stops early (without
/// error) if another node is trimming, or at `stop`. On SQLite the pages it freed then go
/// back to the filesystem.
pub async fn run_once(
    db: &Db,
    policy: &Policy,
    stop: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let deleted = trim_all(db, policy, stop).await?;
    if deleted > 0 {
        release_space(db, stop).await?;
    }
    Ok(deleted)
}

/// Pages truncated from an SQLite file per statement: a few MiB, so the appender (which needs
/// the same write connection) waits only briefly between them.
const VACUUM_PAGES: i64 = 1024;

/// Shrinks an SQLite file by the pages deleted rows left free (PostgreSQL's own vacuum does
/// this there), in bounded steps, until none is left or `stop`.
pub async fn release_space(db: &Db, stop: &CancellationToken) -> Result<(), sqlx::Error> {
    let Db::Sqlite(lite) = db else {
        return Ok(());
    };
    let free_pages =
        || sqlx::query_scalar::<_, i64>("pragma freelist_count").fetch_one(lite.writer());
    let mut free = free_pages().await?;
    while free > 0 && !stop.is_cancelled() {
        sqlx::query(&format!("pragma incremental_vacuum({VACUUM_PAGES})"))
            .execute(lite.writer())
            .await?;
        let left = free_pages().await?;
        if left >= free {
            // A file made without auto-vacuum cannot be shrunk this way.
            break;
        }
        free = left;
    }
    Ok(())
}

async fn trim_all(db: &Db, policy: &Policy, stop: &CancellationToken) -> Result<u64, sqlx::Error> {
    if policy.max_age_s <= 0 && policy.max_events <= 0 && !has_overrides(db).await? {
        return Ok(0);
    }
    let now = Utc::now();
    let batch = policy.batch.max(1);
    let mut total = 0;
    let mut after_id = 0;
    loop {
        let page = candidates(db, policy, now, after_id).await?;
        let Some(last) = page.last() else {
            return Ok(total);
        };
        after_id = last.id;
        for c in &page {
            let cut = cut_for(db, c, now).await?;
            loop {
                if stop.is_cancelled() {
                    return Ok(total);
                }
                match trim_batch(db, c.id, cut, batch).await? {
                    Batch::Deleted(n) => {
                        total += n;
                        metrics::counter!(m::RETENTION_DELETED).increment(n);
                    }
                    Batch::Done => break,
                    Batch::Busy => return Ok(total),
                }
            }
        }
    }
}

async fn has_overrides(db: &Db) -> Result<bool, sqlx::Error> {
    let sql = "select exists (select 1 from streams where max_age_s > 0 or max_events > 0)";
    on_db!(db, read, |ex| sqlx::query_scalar(sql).fetch_one(ex).await)
}

/// How long a commit token is kept: an in-doubt commit is resolved within seconds.
const COMMIT_TOKEN_AGE: Duration = Duration::from_secs(600);

/// Runs a pass every `every` until `shutdown`; each also drops expired commit tokens.
pub fn spawn(
    db: Db,
    policy: Policy,
    every: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = super::store::prune_commit_tokens(&db, COMMIT_TOKEN_AGE).await {
                tracing::warn!(error = %e, "pruning commit tokens failed");
            }
            match run_once(&db, &policy, &shutdown).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "retention pass"),
                Err(e) => tracing::warn!(error = %e, "retention pass failed"),
            }
        }
    })
}
