//! The SQL of the Durable Streams surface (`api::durable`): what the protocol adds to a
//! stream of the log (content type, expiry, fork origin, soft deletion, writer and producer
//! state). The stream's data is ordinary events, written by the appender and read by the
//! store's readers; nothing here writes an event.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::db::{on_db, Db, Ts};
use super::store::StreamRow;

/// A Durable Streams stream's row (`ds_streams`).
#[derive(Debug, Clone, PartialEq)]
pub struct DsStream {
    pub name: String,
    pub content_type: String,
    pub ttl_s: Option<i64>,
    pub expires_at: Option<DateTime<Utc>>,
    pub fork_of: Option<String>,
    pub fork_seq: Option<i64>,
    pub fork_sub: Option<i64>,
    pub deleted: bool,
    pub writer_seq: Option<String>,
    pub closed_by: Option<String>,
    pub accessed_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

impl DsStream {
    /// True once its TTL has run out since the last access, or its absolute expiry passed.
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        let by_ttl = self
            .ttl_s
            .is_some_and(|ttl| now >= self.accessed_at + chrono::Duration::seconds(ttl));
        let by_time = self.expires_at.is_some_and(|at| now >= at);
        by_ttl || by_time
    }
}

const COLUMNS: &str =
    "name, content_type, ttl_s, expires_at, fork_of, fork_seq, fork_sub, deleted, \
                       writer_seq, closed_by, accessed_at, created_at";

fn from_row<R>(row: &R) -> Result<DsStream, sqlx::Error>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Ts: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<Ts>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(DsStream {
        name: row.try_get("name")?,
        content_type: row.try_get("content_type")?,
        ttl_s: row.try_get("ttl_s")?,
        expires_at: row.try_get::<Option<Ts>, _>("expires_at")?.map(|t| t.0),
        fork_of: row.try_get("fork_of")?,
        fork_seq: row.try_get("fork_seq")?,
        fork_sub: row.try_get("fork_sub")?,
        deleted: row.try_get("deleted")?,
        writer_seq: row.try_get("writer_seq")?,
        closed_by: row.try_get("closed_by")?,
        accessed_at: row.try_get::<Ts, _>("accessed_at")?.0,
        created_at: row.try_get::<Ts, _>("created_at")?.0,
    })
}

/// A stream's protocol row and, if anything was ever appended to it, its log row: one query,
/// as every request starts with it.
pub async fn stream_with_row(
    db: &Db,
    name: &str,
) -> Result<Option<(DsStream, Option<StreamRow>)>, sqlx::Error> {
    let columns: Vec<String> = COLUMNS.split(", ").map(|c| format!("d.{c}")).collect();
    let columns = columns.join(", ");
    let sql = format!(
        "select {columns}, s.id as s_id, s.head as s_head, s.trimmed_to as s_trimmed_to,
                s.closed as s_closed, s.created_at as s_created_at, s.updated_at as s_updated_at,
                s.lease_s as s_lease_s, s.heartbeat_at as s_heartbeat_at
         from ds_streams d left join streams s on s.name = d.name
         where d.name = $1"
    );
    macro_rules! map {
        ($row:expr) => {{
            let r = $row;
            let ds = from_row(&r)?;
            let id: Option<i64> = r.try_get("s_id")?;
            let row = match id {
                None => None,
                Some(id) => Some(StreamRow {
                    id,
                    name: ds.name.clone(),
                    head: r.try_get("s_head")?,
                    trimmed_to: r.try_get("s_trimmed_to")?,
                    closed: r.try_get("s_closed")?,
                    created_at: r.try_get::<Ts, _>("s_created_at")?.0,
                    updated_at: r.try_get::<Ts, _>("s_updated_at")?.0,
                    lease_s: r.try_get("s_lease_s")?,
                    heartbeat_at: r.try_get("s_heartbeat_at")?,
                }),
            };
            Ok::<_, sqlx::Error>((ds, row))
        }};
    }
    match db {
        Db::Postgres(pool) => match sqlx::query(&sql).bind(name).fetch_optional(pool).await? {
            Some(r) => map!(r).map(Some),
            None => Ok(None),
        },
        Db::Sqlite(lite) => match sqlx::query(&sql)
            .bind(name)
            .fetch_optional(lite.reader())
            .await?
        {
            Some(r) => map!(r).map(Some),
            None => Ok(None),
        },
    }
}

pub async fn stream(db: &Db, name: &str) -> Result<Option<DsStream>, sqlx::Error> {
    let sql = format!("select {COLUMNS} from ds_streams where name = $1");
    match db {
        Db::Postgres(pool) => sqlx::query(&sql)
            .bind(name)
            .fetch_optional(pool)
            .await?
            .map(|r| from_row(&r))
            .transpose(),
        Db::Sqlite(lite) => sqlx::query(&sql)
            .bind(name)
            .fetch_optional(lite.reader())
            .await?
            .map(|r| from_row(&r))
            .transpose(),
    }
}

/// Inserts the row unless one exists for the name; true if this call inserted it.
pub async fn insert(db: &Db, s: &DsStream) -> Result<bool, sqlx::Error> {
    let sql = "insert into ds_streams (name, content_type, ttl_s, expires_at, fork_of, fork_seq,
                                       fork_sub, deleted, writer_seq, closed_by, accessed_at,
                                       created_at)
               values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
               on conflict (name) do nothing";
    let n = on_db!(db, write, |ex| {
        sqlx::query(sql)
            .bind(&s.name)
            .bind(&s.content_type)
            .bind(s.ttl_s)
            .bind(s.expires_at.map(Ts))
            .bind(&s.fork_of)
            .bind(s.fork_seq)
            .bind(s.fork_sub)
            .bind(s.deleted)
            .bind(&s.writer_seq)
            .bind(&s.closed_by)
            .bind(Ts(s.accessed_at))
            .bind(Ts(s.created_at))
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

/// Removes the protocol's rows of a stream (its events are deleted by the store).
pub async fn remove(db: &Db, name: &str) -> Result<(), sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query("delete from ds_producers where name = $1")
            .bind(name)
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    on_db!(db, write, |ex| {
        sqlx::query("delete from ds_streams where name = $1")
            .bind(name)
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Marks a stream soft-deleted (its forks still name it as their source).
pub async fn mark_deleted(db: &Db, name: &str) -> Result<(), sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query("update ds_streams set deleted = true where name = $1")
            .bind(name)
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// How many streams were forked from this one (deleted or not: a soft-deleted fork may
/// still have forks of its own reading through it).
pub async fn fork_count(db: &Db, name: &str) -> Result<i64, sqlx::Error> {
    on_db!(db, read, |ex| {
        sqlx::query_scalar("select count(*) from ds_streams where fork_of = $1")
            .bind(name)
            .fetch_one(ex)
            .await
    })
}

/// Records a read or write, restarting the sliding TTL.
pub async fn touch(db: &Db, name: &str, now: DateTime<Utc>) -> Result<(), sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query("update ds_streams set accessed_at = $2 where name = $1")
            .bind(name)
            .bind(Ts(now))
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Records the last `Stream-Seq` accepted.
pub async fn set_writer_seq(db: &Db, name: &str, seq: &str) -> Result<(), sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query("update ds_streams set writer_seq = $2 where name = $1")
            .bind(name)
            .bind(seq)
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Records which producer request closed the stream.
pub async fn set_closed_by(db: &Db, name: &str, by: &str) -> Result<(), sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query("update ds_streams set closed_by = $2 where name = $1")
            .bind(name)
            .bind(by)
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// A producer's last accepted `(epoch, seq)` on a stream.
pub async fn producer(
    db: &Db,
    name: &str,
    producer_id: &str,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    on_db!(db, read, |ex| {
        sqlx::query_as("select epoch, seq from ds_producers where name = $1 and producer_id = $2")
            .bind(name)
            .bind(producer_id)
            .fetch_optional(ex)
            .await
    })
}

/// Moves a producer's state forward to `(epoch, seq)`; never backwards, so a late writer of
/// an older state (another node, a retry) cannot undo a newer one.
pub async fn advance_producer(
    db: &Db,
    name: &str,
    producer_id: &str,
    epoch: i64,
    seq: i64,
) -> Result<(), sqlx::Error> {
    let sql = "insert into ds_producers (name, producer_id, epoch, seq) values ($1, $2, $3, $4)
               on conflict (name, producer_id) do update set epoch = excluded.epoch,
                                                             seq = excluded.seq
               where ds_producers.epoch < excluded.epoch
                  or (ds_producers.epoch = excluded.epoch and ds_producers.seq < excluded.seq)";
    on_db!(db, write, |ex| {
        sqlx::query(sql)
            .bind(name)
            .bind(producer_id)
            .bind(epoch)
            .bind(seq)
            .execute(ex)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}
