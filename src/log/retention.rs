//! Retention: removes a stream's oldest events once it holds more than its `max_events` or
//! they are older than its `max_age_s` (per-stream values, else the server defaults; 0 means
//! no limit).
//!
//! A background task runs a pass every interval. Each pass deletes in short transactions of
//! at most `batch` events, each advancing `streams.trimmed_to` with its delete, so readers
//! always know where the retained log starts: a cursor before it gets the `gap` notice. Any
//! number of nodes may run the task: a batch only runs under a transaction-scoped advisory
//! lock, so at most one node trims at a time and each batch re-reads `trimmed_to` under it.
//!
//! A closed stream always keeps its last event (`stream.closed`): a subscriber replaying it
//! must still see the stream end, and a client resuming at the head still gets `204`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
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

fn retention_from_row(r: &sqlx::postgres::PgRow, policy: &Policy) -> StreamRetention {
    let max_age_s: Option<i64> = r.get("max_age_s");
    let max_events: Option<i64> = r.get("max_events");
    StreamRetention {
        stream: r.get("name"),
        max_age_s,
        max_events,
        effective: Limits {
            max_age_s: max_age_s.unwrap_or(policy.max_age_s),
            max_events: max_events.unwrap_or(policy.max_events),
        },
        oldest_seq: r.get::<i64, _>("trimmed_to") + 1,
    }
}

/// A stream's settings, or None if it does not exist.
pub async fn get(
    pool: &PgPool,
    name: &str,
    policy: &Policy,
) -> Result<Option<StreamRetention>, sqlx::Error> {
    let row =
        sqlx::query("select name, max_age_s, max_events, trimmed_to from streams where name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|r| retention_from_row(&r, policy)))
}

/// Sets (None: clears) a stream's overrides. None if the stream does not exist.
pub async fn set(
    pool: &PgPool,
    name: &str,
    max_age_s: Option<i64>,
    max_events: Option<i64>,
    policy: &Policy,
) -> Result<Option<StreamRetention>, sqlx::Error> {
    // A plain row update: it waits for an appender batch holding this row's lock, briefly.
    let row = sqlx::query(
        "update streams set max_age_s = $2, max_events = $3 where name = $1
         returning name, max_age_s, max_events, trimmed_to",
    )
    .bind(name)
    .bind(max_age_s)
    .bind(max_events)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| retention_from_row(&r, policy)))
}

struct Candidate {
    id: i64,
    head: i64,
    closed: bool,
    max_events: i64,
    max_age_s: i64,
}

/// Streams with something to trim, after `after_id`, by id.
async fn candidates(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    after_id: i64,
) -> Result<Vec<Candidate>, sqlx::Error> {
    // The oldest retained event is always seq trimmed_to + 1 (the log is gap-free and only
    // retention removes events), so the age test is one primary-key probe per stream.
    let rows = sqlx::query(
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
                                 and e.time < $4 - make_interval(secs => coalesce(s.max_age_s, $2)::float8))))
           order by s.id limit $5"#,
    )
    .bind(policy.max_events)
    .bind(policy.max_age_s)
    .bind(after_id)
    .bind(now)
    .bind(SCAN_PAGE)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| Candidate {
            id: r.get("id"),
            head: r.get("head"),
            closed: r.get("closed"),
            max_events: r.get("max_events"),
            max_age_s: r.get("max_age_s"),
        })
        .collect())
}

/// The highest seq that may go: everything at or below it is trimmed.
async fn cut_for(pool: &PgPool, c: &Candidate, now: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    let mut cut = 0;
    if c.max_events > 0 {
        cut = c.head - c.max_events;
    }
    if c.max_age_s > 0 {
        let before = now - chrono::Duration::seconds(c.max_age_s);
        let newest_old: Option<i64> = sqlx::query_scalar(
            "select seq from events where stream_id = $1 and time < $2
             order by time desc, seq desc limit 1",
        )
        .bind(c.id)
        .bind(before)
        .fetch_optional(pool)
        .await?;
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
async fn trim_batch(pool: &PgPool, id: i64, cut: i64, limit: i64) -> Result<Batch, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Released at commit: serialises trimming across nodes without a session to keep.
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(RETENTION_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(Batch::Busy);
    }
    // Only retention writes trimmed_to, and we hold its lock: this value is current.
    let trimmed: Option<i64> = sqlx::query_scalar("select trimmed_to from streams where id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(trimmed) = trimmed.filter(|t| *t < cut) else {
        return Ok(Batch::Done);
    };
    let upto = cut.min(trimmed + limit);
    // Seqs are gap-free above trimmed_to, so this range holds at most `limit` rows.
    let deleted = sqlx::query("delete from events where stream_id = $1 and seq > $2 and seq <= $3")
        .bind(id)
        .bind(trimmed)
        .bind(upto)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // Last, so the stream row is locked (against the appender) only until the commit.
    sqlx::query("update streams set trimmed_to = $2 where id = $1")
        .bind(id)
        .bind(upto)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Batch::Deleted(deleted))
}

/// One pass over every stream; returns how many events it deleted. Stops early (without
/// error) if another node is trimming, or at `stop`.
pub async fn run_once(
    pool: &PgPool,
    policy: &Policy,
    stop: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    if policy.max_age_s <= 0 && policy.max_events <= 0 && !has_overrides(pool).await? {
        return Ok(0);
    }
    let now = Utc::now();
    let batch = policy.batch.max(1);
    let mut total = 0;
    let mut after_id = 0;
    loop {
        let page = candidates(pool, policy, now, after_id).await?;
        let Some(last) = page.last() else {
            return Ok(total);
        };
        after_id = last.id;
        for c in &page {
            let cut = cut_for(pool, c, now).await?;
            loop {
                if stop.is_cancelled() {
                    return Ok(total);
                }
                match trim_batch(pool, c.id, cut, batch).await? {
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

async fn has_overrides(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select exists (select 1 from streams where max_age_s > 0 or max_events > 0)",
    )
    .fetch_one(pool)
    .await
}

/// Runs a pass every `every` until `shutdown`.
pub fn spawn(
    pool: PgPool,
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
            match run_once(&pool, &policy, &shutdown).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "retention pass"),
                Err(e) => tracing::warn!(error = %e, "retention pass failed"),
            }
        }
    })
}
