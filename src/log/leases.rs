//! Every SQL statement about stream leases. A lease is `streams.lease_s`; the stream's last
//! activity is the later of `updated_at` (moved by every append, in the appender's own
//! statement) and `heartbeat_at`, so an append renews the lease at no extra cost.
//!
//! Closing a lapsed stream is the sweeper's (`live::leases`): it appends `stream.closed` with
//! `expected_seq` = the head it saw lapse, so an append that renewed the lease meanwhile
//! wins, and a second sweeper (another node, or this one after a restart) finds the stream
//! closed: closing is idempotent, so the log holds one `stream.closed` whatever happens.
//! A heartbeat that lands between a sweep's look and its close does not save the stream (its
//! lease had already lapsed; the producer's next heartbeat or append gets `stream_closed`).

use chrono::{DateTime, Utc};

use super::db::{on_db, Db, Ts};
use super::model::wire_time;
use super::store::StreamRow;

/// Longest lease, in seconds: 30 days.
pub const MAX_LEASE_S: i64 = 30 * 24 * 3600;

/// What a lease change found.
pub enum Outcome {
    Missing,
    Closed { head: i64 },
    Done(Box<StreamRow>),
}

/// Sets (Some) or removes (None) a stream's lease; setting it counts as activity, so a lease
/// given to a quiet stream does not lapse at once.
pub async fn set(db: &Db, name: &str, lease_s: Option<i64>) -> Result<Outcome, sqlx::Error> {
    let now = Ts(wire_time(Utc::now()));
    on_db!(db, write, |ex| {
        sqlx::query(
            "update streams set lease_s = $2, heartbeat_at = $3 where name = $1 and not closed",
        )
        .bind(name)
        .bind(lease_s)
        .bind(now)
        .execute(ex)
        .await
        .map(|d| d.rows_affected())
    })?;
    current(db, name).await
}

/// Sets the lease only if it differs (an append's `?lease_s=`): a producer that passes the
/// same lease on every append costs one statement that changes nothing.
pub async fn set_if_changed(db: &Db, name: &str, lease_s: Option<i64>) -> Result<(), sqlx::Error> {
    let now = Ts(wire_time(Utc::now()));
    on_db!(db, write, |ex| {
        sqlx::query(
            "update streams set lease_s = $2, heartbeat_at = $3
             where name = $1 and not closed and lease_s is distinct from $2",
        )
        .bind(name)
        .bind(lease_s)
        .bind(now)
        .execute(ex)
        .await
        .map(|d| d.rows_affected())
    })?;
    Ok(())
}

/// Records a heartbeat: the lease (if any) runs from now.
pub async fn heartbeat(db: &Db, name: &str) -> Result<Outcome, sqlx::Error> {
    let now = Ts(wire_time(Utc::now()));
    on_db!(db, write, |ex| {
        sqlx::query("update streams set heartbeat_at = $2 where name = $1 and not closed")
            .bind(name)
            .bind(now)
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    current(db, name).await
}

async fn current(db: &Db, name: &str) -> Result<Outcome, sqlx::Error> {
    // Read through the write side: on SQLite the reader pool could miss the write just made.
    let sql = "select id, name, head, trimmed_to, closed, created_at, updated_at, lease_s,
                      heartbeat_at
               from streams where name = $1";
    let row: Option<StreamRow> = on_db!(db, write, |ex| {
        sqlx::query_as(sql).bind(name).fetch_optional(ex).await
    })?;
    Ok(match row {
        None => Outcome::Missing,
        Some(r) if r.closed => Outcome::Closed { head: r.head },
        Some(r) => Outcome::Done(Box::new(r)),
    })
}

/// An open stream whose lease has lapsed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Lapsed {
    pub name: String,
    pub head: i64,
    pub lease_s: i64,
    #[sqlx(try_from = "Ts")]
    pub last_activity: DateTime<Utc>,
}

/// Up to `limit` open streams whose lease lapsed before `now`, oldest activity first.
pub async fn lapsed(db: &Db, now: DateTime<Utc>, limit: i64) -> Result<Vec<Lapsed>, sqlx::Error> {
    let sql = match db {
        Db::Postgres(_) => {
            "select name, head, lease_s, last_activity from (
               select name, head, lease_s,
                      greatest(updated_at, coalesce(heartbeat_at, updated_at)) as last_activity
               from streams where lease_s is not null and not closed) s
             where last_activity + make_interval(secs => lease_s) <= $1
             order by last_activity limit $2"
        }
        Db::Sqlite(_) => {
            "select name, head, lease_s, last_activity from (
               select name, head, lease_s,
                      max(updated_at, coalesce(heartbeat_at, updated_at)) as last_activity
               from streams where lease_s is not null and not closed) s
             where last_activity + lease_s * 1000 <= $1
             order by last_activity limit $2"
        }
    };
    on_db!(db, read, |ex| {
        sqlx::query_as(sql)
            .bind(Ts(now))
            .bind(limit)
            .fetch_all(ex)
            .await
    })
}

/// How many open streams hold a lease (for `/v1/stats`).
pub async fn leased_count(db: &Db) -> Result<i64, sqlx::Error> {
    on_db!(db, read, |ex| {
        sqlx::query_scalar("select count(*) from streams where lease_s is not null and not closed")
            .fetch_one(ex)
            .await
    })
}
