//! Every SQL statement of the event log, for both backends ([`Db`]). Functions take the
//! database or a write transaction; the locks each one takes are explained where it takes
//! them. One statement text serves both where PostgreSQL and SQLite agree.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{FromRow, PgPool, QueryBuilder, Row, Sqlite};

use super::db::{in_list, on_db, on_tx, Db, List, SqliteDb, Ts, Tx};
use super::model::{ceil_millis, format_time, StoredEvent, StreamName};

/// Channel on which every appender commit is announced to all nodes.
pub const NOTIFY_CHANNEL: &str = "tailcast_appends";

/// A stream's row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StreamRow {
    pub id: i64,
    pub name: String,
    pub head: i64,
    pub trimmed_to: i64,
    pub closed: bool,
    #[sqlx(try_from = "Ts")]
    pub created_at: DateTime<Utc>,
    #[sqlx(try_from = "Ts")]
    pub updated_at: DateTime<Utc>,
    /// The producer's lease in seconds (see `log::leases`); None: no lease.
    pub lease_s: Option<i64>,
    /// The last heartbeat (or lease change).
    pub heartbeat_at: Option<Ts>,
}

/// A stream as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamInfo {
    pub name: String,
    pub head: i64,
    /// Seq of the oldest retained event (head + 1 when the stream holds none).
    pub oldest_seq: i64,
    pub created_at: String,
    pub updated_at: String,
    pub closed: bool,
    /// Seconds without activity after which the stream is closed as abandoned; null: none.
    pub lease_s: Option<i64>,
    /// The last append or heartbeat.
    pub last_activity_at: String,
    /// When the lease lapses unless renewed; null without a lease or once closed.
    pub lease_expires_at: Option<String>,
}

impl StreamRow {
    pub fn info(&self) -> StreamInfo {
        StreamInfo {
            name: self.name.clone(),
            head: self.head,
            oldest_seq: self.trimmed_to + 1,
            created_at: format_time(&self.created_at),
            updated_at: format_time(&self.updated_at),
            closed: self.closed,
            lease_s: self.lease_s,
            last_activity_at: format_time(&self.last_activity()),
            lease_expires_at: self.lease_expires_at().map(|t| format_time(&t)),
        }
    }

    /// The last append (which moves `updated_at`) or heartbeat.
    pub fn last_activity(&self) -> DateTime<Utc> {
        self.heartbeat_at
            .map_or(self.updated_at, |h| h.0.max(self.updated_at))
    }

    /// When the lease lapses unless renewed (None: no lease, or the stream is closed).
    pub fn lease_expires_at(&self) -> Option<DateTime<Utc>> {
        let lease = self.lease_s.filter(|_| !self.closed)?;
        Some(self.last_activity() + chrono::Duration::seconds(lease))
    }
}

const STREAM_COLUMNS: &str =
    "id, name, head, trimmed_to, closed, created_at, updated_at, lease_s, heartbeat_at";

/// The columns of a [`StoredEvent`], named as its fields.
pub const EVENT_COLUMNS: &str =
    r#"seq, type as ty, data, event_id as id, key, time, body, "by", append"#;

/// Most values one SQLite statement may bind.
const SQLITE_MAX_BINDS: usize = 32_766;

pub async fn stream(db: &Db, name: &str) -> Result<Option<StreamRow>, sqlx::Error> {
    let sql = format!("select {STREAM_COLUMNS} from streams where name = $1");
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql).bind(name).fetch_optional(ex).await
    })
}

/// Streams whose name starts with `prefix`, after `after_name`, in name order (keyset paging).
pub async fn list_streams(
    db: &Db,
    prefix: &str,
    after_name: &str,
    limit: i64,
) -> Result<Vec<StreamRow>, sqlx::Error> {
    // `name` compares by code point (collation "C"; SQLite's BINARY on UTF-8 agrees), so the
    // names starting with `prefix` are the index range [prefix, successor): the scan starts at
    // the page and stops at its end.
    let sql = format!(
        "select {STREAM_COLUMNS} from streams
         where name > $1 and name >= $2 and ($3 is null or name < $3)
         order by name limit $4"
    );
    let successor = prefix_successor(prefix);
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql)
            .bind(after_name)
            .bind(prefix)
            .bind(successor.as_deref())
            .bind(limit)
            .fetch_all(ex)
            .await
    })
}

/// The smallest string greater than every string starting with `prefix`, if there is one.
pub(crate) fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Events with `after < seq <= upto`, oldest first: at most `limit` events, and the page
/// also ends once it holds `max_bytes` of `data` (it
/// always holds at least one event if there is one). A page of a thousand 1 MiB events would
/// be a gigabyte per reader; this keeps catch-up and export memory small whatever the events.
/// A page is complete (the log may hold more) if it has `limit` events or `max_bytes` bytes.
pub async fn read_events_bounded(
    db: &Db,
    stream_id: i64,
    after: i64,
    upto: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let pool = match db {
        Db::Postgres(pool) => pool,
        Db::Sqlite(lite) => {
            return read_sqlite_page(lite, stream_id, after, upto, limit, max_bytes).await
        }
    };
    // `octet_length` of a TOASTed value reads only its header, and rows past the budget are
    // filtered before their `data` is fetched from TOAST.
    let sql = format!(
        r#"select {EVENT_COLUMNS} from (
             select seq, type, data, event_id, key, time, body, "by", append,
                    sum(octet_length(data) + coalesce(octet_length(body), 0)) over (order by seq)
                      - octet_length(data) - coalesce(octet_length(body), 0) as before
             from events
             where stream_id = $1 and seq > $2 and seq <= $3
             order by seq limit $4
           ) page
           where before < $5
           order by seq"#
    );
    sqlx::query_as(&sql)
        .bind(stream_id)
        .bind(after)
        .bind(upto)
        .bind(limit)
        .bind(max_bytes)
        .fetch_all(pool)
        .await
}

/// [`read_events_bounded`] on a read replica, if it has replayed far enough: `None` if the
/// replica has no row for the stream yet or its head there is below `need`; otherwise the
/// replica's head and the page (which then holds every event the primary would return up to
/// `need`). Head and page come from one statement, hence one snapshot, and an append moves a
/// stream's head in the transaction that inserts its events: a replica whose head is at
/// `need` holds every event up to it. A lagging replica costs one index probe (the page's
/// scan is gated on the head).
pub async fn read_replica_page(
    pool: &PgPool,
    stream_id: i64,
    after: i64,
    upto: i64,
    need: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Option<(i64, Vec<StoredEvent>)>, sqlx::Error> {
    let sql = format!(
        r#"select r.head as replica_head, page.*
           from (select head from streams where id = $1) r
           left join lateral (
             select {EVENT_COLUMNS} from (
               select seq, type, data, event_id, key, time, body, "by", append,
                      sum(octet_length(data) + coalesce(octet_length(body), 0)) over (order by seq)
                        - octet_length(data) - coalesce(octet_length(body), 0) as before
               from events
               where stream_id = $1 and seq > $2 and seq <= $3 and r.head >= $6
               order by seq limit $4
             ) bounded
             where before < $5
           ) page on true
           order by page.seq"#
    );
    let rows = sqlx::query(&sql)
        .bind(stream_id)
        .bind(after)
        .bind(upto)
        .bind(limit)
        .bind(max_bytes)
        .bind(need)
        .fetch_all(pool)
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let head: i64 = first.try_get("replica_head")?;
    if head < need {
        return Ok(None);
    }
    let mut page = Vec::with_capacity(rows.len());
    for row in &rows {
        // The left join's one all-null row when the range holds no event.
        if row.try_get::<Option<i64>, _>("seq")?.is_some() {
            page.push(StoredEvent::from_row(row)?);
        }
    }
    Ok(Some((head, page)))
}

/// [`read_events_bounded`] on SQLite.
async fn read_sqlite_page(
    lite: &SqliteDb,
    stream_id: i64,
    after: i64,
    upto: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    // In-process, rows arrive one by one: stop reading at the budget. (PostgreSQL's window
    // sum would cost SQLite a third of its read speed, with no out-of-line values to spare.)
    let sql = format!(
        "select {EVENT_COLUMNS} from events
         where stream_id = $1 and seq > $2 and seq <= $3 order by seq limit $4"
    );
    let mut rows = sqlx::query_as::<_, StoredEvent>(&sql)
        .bind(stream_id)
        .bind(after)
        .bind(upto)
        .bind(limit)
        .fetch(lite.reader());
    let mut page = Vec::new();
    let mut bytes = 0;
    while let Some(ev) = rows.try_next().await? {
        bytes += event_bytes(&ev) as i64;
        page.push(ev);
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(page)
}

/// What an event counts against a page's byte budget: its `data` and its byte payload.
pub fn event_bytes(ev: &StoredEvent) -> usize {
    ev.data.len() + ev.body.as_ref().map_or(0, Vec::len)
}

/// True if a page read with [`read_events_bounded`] may have stopped before the log's end.
pub fn page_is_full(events: &[StoredEvent], limit: i64, max_bytes: i64) -> bool {
    let bytes: usize = events.iter().map(event_bytes).sum();
    events.len() as i64 >= limit || bytes as i64 >= max_bytes
}

/// The seq just before the first event at or after `since` (a cursor), or the head if none is.
pub async fn cursor_at_time(
    db: &Db,
    stream: &StreamRow,
    since: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    let sql = "select seq from events where stream_id = $1 and time >= $2
               order by time, seq limit 1";
    let seq: Option<i64> = on_db!(db, read, |ex| {
        sqlx::query_scalar(sql)
            .bind(stream.id)
            .bind(Ts(ceil_millis(since)))
            .fetch_optional(ex)
            .await
    })?;
    Ok(seq.map_or(stream.head, |s| s - 1))
}

/// The latest event of every key with `seq <= at`, ordered by key.
/// The newest event of every key at or below `at`, or `None` if their data and bodies add up
/// to more than `max_bytes` (rows are streamed and counted, so an oversized snapshot costs
/// at most `max_bytes` of memory before it is refused).
pub async fn snapshot(
    db: &Db,
    stream_id: i64,
    at: i64,
    max_bytes: usize,
) -> Result<Option<Vec<StoredEvent>>, sqlx::Error> {
    let sql = match db {
        Db::Postgres(_) => format!(
            r#"select distinct on (key) {EVENT_COLUMNS} from events
               where stream_id = $1 and key is not null and seq <= $2
               order by key, seq desc"#
        ),
        // SQLite has no `distinct on`: the newest per key is the one no newer event of its
        // key (at or below `at`) follows, found through the (stream_id, key, seq) index.
        Db::Sqlite(_) => format!(
            r#"select {EVENT_COLUMNS} from events e
               where stream_id = $1 and key is not null and seq <= $2
                 and not exists (select 1 from events n
                                 where n.stream_id = e.stream_id and n.key = e.key
                                   and n.seq > e.seq and n.seq <= $2)
               order by key"#
        ),
    };
    read_bounded(db, &sql, stream_id, at, max_bytes).await
}

/// The current message of every key at or below `at`, for a compacted snapshot: the events
/// of each key from its last event without `append` (or from its first, if every retained
/// one is an append) through `at`, ordered by key, then seq; `None` if their data and bodies
/// add up to more than `max_bytes` (counted as they stream in, as for [`snapshot`]).
pub async fn snapshot_messages(
    db: &Db,
    stream_id: i64,
    at: i64,
    max_bytes: usize,
) -> Result<Option<Vec<StoredEvent>>, sqlx::Error> {
    // `append` is a boolean on PostgreSQL and 0/1 on SQLite: `case when append` reads both.
    let sql = format!(
        r#"select {EVENT_COLUMNS} from events e
           join (select key as k, max(case when append then null else seq end) as start
                   from events
                  where stream_id = $1 and key is not null and seq <= $2
                  group by key) m on m.k = e.key
           where e.stream_id = $1 and e.seq <= $2 and e.seq >= coalesce(m.start, 0)
           order by e.key, e.seq"#
    );
    read_bounded(db, &sql, stream_id, at, max_bytes).await
}

/// Runs a snapshot query (`$1` the stream id, `$2` the seq it is taken at) and collects its
/// events, or `None` once their data and bodies add up to more than `max_bytes` (counted as
/// they stream in, so an oversized snapshot is never held whole).
async fn read_bounded(
    db: &Db,
    sql: &str,
    stream_id: i64,
    at: i64,
    max_bytes: usize,
) -> Result<Option<Vec<StoredEvent>>, sqlx::Error> {
    on_db!(db, read, |ex| {
        let mut rows = sqlx::query_as::<_, StoredEvent>(sql)
            .bind(stream_id)
            .bind(at)
            .fetch(ex);
        let (mut events, mut bytes) = (Vec::new(), 0usize);
        while let Some(ev) = rows.try_next().await? {
            bytes += ev.data.len() + ev.body.as_ref().map_or(0, Vec::len);
            if bytes > max_bytes {
                return Ok(None);
            }
            events.push(ev);
        }
        Ok(Some(events))
    })
}

/// Deletes a stream and its events. Returns false if it did not exist.
pub async fn delete_stream(db: &Db, name: &str, node: &str) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    // On PostgreSQL, taking the row lock first waits for an appender batch on this stream to
    // commit, so the delete never interleaves with an append in flight (on SQLite, the write
    // transaction excludes the appender's).
    let sql = match tx {
        Tx::Postgres(_) => "select id from streams where name = $1 for update",
        Tx::Sqlite(_) => "select id from streams where name = $1",
    };
    let id: Option<i64> = on_tx!(&mut tx, |ex| {
        sqlx::query_scalar(sql).bind(name).fetch_optional(ex).await
    })?;
    let Some(id) = id else {
        return Ok(false);
    };
    on_tx!(&mut tx, |ex| {
        sqlx::query("delete from events where stream_id = $1")
            .bind(id)
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    on_tx!(&mut tx, |ex| {
        sqlx::query("delete from streams where id = $1")
            .bind(id)
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    if let Tx::Postgres(tx) = &mut tx {
        // A head of -1 tells the other nodes the stream is gone.
        sqlx::query("select pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(format!("{node}\n{name} -1"))
            .execute(&mut **tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Locks (creating where missing) the rows of `names`, sorted, and returns them by name.
///
/// On PostgreSQL rows are locked in name order so that two appenders (on any nodes) whose
/// batches share streams cannot deadlock; the locks are held until the caller's transaction
/// commits, which is what keeps per-stream commit order equal to seq order. On SQLite the
/// transaction already holds the database's write lock.
/// Rows it creates get `time` (the batch's commit time) as their creation time, so that a
/// stream's `created_at` never comes after the `time` of its first event. The ids of the rows
/// this transaction created come back too: [`drop_created_streams`] removes those no append
/// ended up writing to.
pub async fn lock_streams(
    tx: &mut Tx,
    names: &[&str],
    time: DateTime<Utc>,
) -> Result<(HashMap<String, StreamRow>, HashSet<i64>), sqlx::Error> {
    let named = in_list(tx.is_sqlite(), "name", 1);
    let (select, insert) = match tx {
        Tx::Postgres(_) => (
            format!("select {STREAM_COLUMNS} from streams where {named} order by name for update"),
            // A concurrent creator may win the insert; `do nothing` then leaves its row, which
            // the select after it locks (waiting for that creator to commit).
            "insert into streams (name, created_at, updated_at)
             select n, $2, $2 from unnest($1::text[]) as t(n) order by n
             on conflict (name) do nothing
             returning id",
        ),
        Tx::Sqlite(_) => (
            format!("select {STREAM_COLUMNS} from streams where {named} order by name"),
            // `where true` lets SQLite parse the upsert clause after a select.
            "insert into streams (name, created_at, updated_at)
             select value, $2, $2 from json_each($1) where true
             on conflict (name) do nothing
             returning id",
        ),
    };
    let rows: Vec<StreamRow> = on_tx!(tx, |ex| {
        sqlx::query_as(&select)
            .bind(List(names))
            .fetch_all(ex)
            .await
    })?;
    let mut found: HashMap<String, StreamRow> =
        rows.into_iter().map(|r| (r.name.clone(), r)).collect();
    let mut created = HashSet::new();
    // Normally one round. Another: a stream another node created (our insert did nothing)
    // and an admin deleted before the select below could lock it; create it again. The
    // caller answers any stream still missing after a few rounds with an error.
    for _ in 0..4 {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !found.contains_key(*n))
            .collect();
        if missing.is_empty() {
            break;
        }
        let ids: Vec<i64> = on_tx!(tx, |ex| {
            sqlx::query_scalar(insert)
                .bind(List(&missing))
                .bind(Ts(time))
                .fetch_all(ex)
                .await
        })?;
        let rows: Vec<StreamRow> = on_tx!(tx, |ex| {
            sqlx::query_as(&select)
                .bind(List(&missing))
                .fetch_all(ex)
                .await
        })?;
        created.extend(ids);
        found.extend(rows.into_iter().map(|r| (r.name.clone(), r)));
    }
    Ok((found, created))
}

/// Deletes stream rows created earlier in this transaction that nothing was appended to (every
/// append to them failed), so a refused append leaves no empty stream behind.
pub async fn drop_created_streams(tx: &mut Tx, ids: &[i64]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "delete from streams where {} and head = 0",
        in_list(tx.is_sqlite(), "id", 1)
    );
    on_tx!(tx, |ex| {
        sqlx::query(&sql)
            .bind(List(ids))
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    Ok(())
}

/// `(stream_id, event_id) -> seq` for the ids that already exist.
pub async fn existing_ids(
    tx: &mut Tx,
    stream_ids: &[i64],
    event_ids: &[&str],
) -> Result<HashMap<(i64, String), i64>, sqlx::Error> {
    if event_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, String, i64)> = match tx {
        Tx::Postgres(t) => {
            sqlx::query_as(
                r#"select e.stream_id, e.event_id, e.seq
                   from unnest($1::bigint[], $2::text[]) as t(sid, eid)
                   join events e on e.stream_id = t.sid and e.event_id = t.eid"#,
            )
            .bind(stream_ids)
            .bind(event_ids)
            .fetch_all(&mut **t)
            .await?
        }
        Tx::Sqlite(t) => {
            let pairs: Vec<(i64, &str)> = stream_ids
                .iter()
                .copied()
                .zip(event_ids.iter().copied())
                .collect();
            sqlx::query_as(
                r#"select e.stream_id, e.event_id, e.seq
                   from json_each($1) as t
                   join events e on e.stream_id = t.value ->> 0 and e.event_id = t.value ->> 1"#,
            )
            .bind(List(&pairs))
            .fetch_all(&mut **t)
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|(sid, eid, seq)| ((sid, eid), seq))
        .collect())
}

/// Column arrays for one multi-row insert.
#[derive(Default)]
pub struct EventRows<'a> {
    pub stream_id: Vec<i64>,
    pub seq: Vec<i64>,
    pub ty: Vec<&'a str>,
    pub data: Vec<&'a str>,
    pub id: Vec<Option<&'a str>>,
    pub key: Vec<Option<&'a str>>,
    pub body: Vec<Option<&'a [u8]>>,
    pub by: Vec<Option<&'a str>>,
    pub append: Vec<bool>,
}

/// Inserts every row (in one statement on PostgreSQL, in as few as SQLite's bind limit
/// allows), all with the batch's commit time.
pub async fn insert_events(
    tx: &mut Tx,
    rows: &EventRows<'_>,
    time: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    if rows.seq.is_empty() {
        return Ok(());
    }
    match tx {
        Tx::Postgres(t) => {
            sqlx::query(
                r#"insert into events (stream_id, seq, type, data, event_id, key, time, body, "by",
                                      append)
                   select sid, seq, ty, data, eid, k, $7, b, w, a
                   from unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $8::bytea[], $9::text[], $10::bool[])
                        as t(sid, seq, ty, data, eid, k, b, w, a)"#,
            )
            .bind(&rows.stream_id)
            .bind(&rows.seq)
            .bind(&rows.ty)
            .bind(&rows.data)
            .bind(&rows.id)
            .bind(&rows.key)
            .bind(Ts(time))
            .bind(&rows.body)
            .bind(&rows.by)
            .bind(&rows.append)
            .execute(&mut **t)
            .await?;
        }
        Tx::Sqlite(t) => {
            const COLUMNS: usize = 10;
            let indices: Vec<usize> = (0..rows.seq.len()).collect();
            for chunk in indices.chunks(SQLITE_MAX_BINDS / COLUMNS) {
                let mut q = QueryBuilder::<Sqlite>::new(
                    r#"insert into events (stream_id, seq, type, data, event_id, key, time, body, "by", append) "#,
                );
                q.push_values(chunk, |mut b, &i| {
                    b.push_bind(rows.stream_id[i])
                        .push_bind(rows.seq[i])
                        .push_bind(rows.ty[i])
                        .push_bind(rows.data[i])
                        .push_bind(rows.id[i])
                        .push_bind(rows.key[i])
                        .push_bind(Ts(time))
                        .push_bind(rows.body[i])
                        .push_bind(rows.by[i])
                        .push_bind(rows.append[i]);
                });
                q.build().persistent(false).execute(&mut **t).await?;
            }
        }
    }
    Ok(())
}

/// A batch of append jobs as the column arrays `tailcast.append_jobs` takes (see its
/// migration): one element per job in `stream`..`close`, one per event (the events of the
/// first job first) in `ty`..`body`.
#[derive(Default)]
pub struct JobRows<'a> {
    pub stream: Vec<&'a str>,
    pub count: Vec<i32>,
    pub expected: Vec<Option<i64>>,
    pub close: Vec<bool>,
    pub ty: Vec<&'a str>,
    pub data: Vec<&'a str>,
    pub id: Vec<Option<&'a str>>,
    pub key: Vec<Option<&'a str>>,
    /// Byte payloads (Durable Streams byte mode); sent as one null when no event has one.
    pub body: Vec<Option<&'a [u8]>>,
    /// Authors; sent as one null when no event has one.
    pub by: Vec<Option<&'a str>>,
    /// Append flags; sent as one null when no event has one set.
    pub append: Vec<bool>,
}

/// What `tailcast.append_jobs` decided, per event, per job and per stream written.
#[derive(Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct JobsOutcome {
    /// Per event: its seq (a duplicate's: the original's); None if its job was refused.
    pub seqs: Vec<Option<i64>>,
    /// Per event: true if a duplicate.
    pub dups: Vec<Option<bool>>,
    /// Per job: None, `stream_closed` or `seq_conflict`.
    pub errors: Vec<Option<String>>,
    /// Per job: the head that refused it.
    pub error_heads: Vec<Option<i64>>,
    pub written_streams: Vec<String>,
    pub written_heads: Vec<i64>,
    pub written_closed: Vec<bool>,
}

/// Applies a whole batch with one statement (PostgreSQL): locks the streams (held until the
/// transaction ends: sent outside one, the call is its own transaction), de-duplicates ids, assigns seqs, inserts, moves the heads, queues the NOTIFY (with
/// `node` as its first line) and, if anything was written, records `token` in
/// `commit_tokens` with its answer (see [`commit_outcome`], [`recorded_answer`]). The same function applications call through
/// `tailcast.append`, so both follow one implementation of the rules.
pub async fn append_jobs(
    conn: &mut sqlx::PgConnection,
    node: &str,
    token: uuid::Uuid,
    time: DateTime<Utc>,
    rows: &JobRows<'_>,
) -> Result<JobsOutcome, sqlx::Error> {
    sqlx::query_as(
        "select * from tailcast.append_jobs($1, $2::uuid, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                                            $12, $13, $14)",
    )
    .bind(node)
    .bind(token.to_string())
    .bind(Ts(time))
    .bind(&rows.stream)
    .bind(&rows.count)
    .bind(&rows.expected)
    .bind(&rows.close)
    .bind(&rows.ty)
    .bind(&rows.data)
    .bind(&rows.id)
    .bind(&rows.key)
    .bind(rows.body.iter().any(Option::is_some).then_some(&rows.body))
    .bind(rows.by.iter().any(Option::is_some).then_some(&rows.by))
    .bind(rows.append.iter().any(|a| *a).then_some(&rows.append))
    .fetch_one(conn)
    .await
}

/// Sets the new heads (and closed flags) of the streams a batch wrote to.
pub async fn update_heads(
    tx: &mut Tx,
    ids: &[i64],
    heads: &[i64],
    closed: &[bool],
    time: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    match tx {
        Tx::Postgres(t) => {
            sqlx::query(
                r#"update streams s set head = t.head, closed = t.closed, updated_at = $4
                   from unnest($1::bigint[], $2::bigint[], $3::bool[]) as t(id, head, closed)
                   where s.id = t.id"#,
            )
            .bind(ids)
            .bind(heads)
            .bind(closed)
            .bind(Ts(time))
            .execute(&mut **t)
            .await?;
        }
        Tx::Sqlite(t) => {
            // One statement for every stream: under load each statement is a round trip to
            // the driver's thread (the bench's 64-client appends: 6.7k -> 10k events/s).
            let rows: Vec<(i64, i64, bool)> = ids
                .iter()
                .zip(heads)
                .zip(closed)
                .map(|((id, head), closed)| (*id, *head, *closed))
                .collect();
            sqlx::query(
                r#"update streams set head = t.value ->> 1, closed = t.value ->> 2, updated_at = $2
                   from json_each($1) as t
                   where streams.id = t.value ->> 0"#,
            )
            .bind(List(&rows))
            .bind(Ts(time))
            .execute(&mut **t)
            .await?;
        }
    }
    Ok(())
}

/// Creates the database named in `url` if it does not exist (connecting to `postgres`).
pub async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::postgres::PgConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    let opts: PgConnectOptions = url.parse()?;
    let Some(db) = opts.get_database().map(str::to_owned) else {
        return Ok(());
    };
    if opts.clone().connect().await.is_ok() {
        return Ok(());
    }
    let mut admin = opts.database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&db)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", db.replace('"', "\"\""));
        if let Err(e) = sqlx::query(&format!("create database {quoted}"))
            .execute(&mut admin)
            .await
        {
            // Another process may have created it meanwhile.
            tracing::debug!(error = %e, "create database");
        }
    }
    admin.close().await
}

/// The stream's name and head as carried in a notification payload.
pub fn notify_payloads(node: &str, heads: &[(&StreamName, i64)]) -> Vec<String> {
    // pg_notify payloads must stay under 8000 bytes: split into several when needed.
    const LIMIT: usize = 7000;
    let mut out = Vec::new();
    let mut cur = String::new();
    for (name, head) in heads {
        let item = format!("{name} {head}");
        if !cur.is_empty() && cur.len() + item.len() + 1 > LIMIT {
            out.push(std::mem::take(&mut cur));
        }
        if cur.is_empty() {
            cur.push_str(node);
        }
        cur.push('\n');
        cur.push_str(&item);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Succeeds if the database answers a trivial query.
pub async fn ping(db: &Db) -> Result<(), sqlx::Error> {
    on_db!(db, read, |ex| sqlx::query("select 1")
        .execute(ex)
        .await
        .map(|_| ()))
}

/// The current head of each named stream that exists (PostgreSQL: the notify path).
pub async fn stream_heads(
    pool: &PgPool,
    names: &[&str],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query("select name, head from streams where name = any($1)")
        .bind(names)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect())
}

/// Events with `after < seq <= upto` of a stream known by name (what notifications carry),
/// oldest first, at most `limit` (PostgreSQL: the notify path).
pub async fn read_events_by_name(
    pool: &PgPool,
    name: &str,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(
        r#"select e.seq, e.type as ty, e.data, e.event_id as id, e.key, e.time, e.body, e."by",
                  e.append
           from streams s join events e on e.stream_id = s.id
           where s.name = $1 and e.seq > $2 and e.seq <= $3
           order by e.seq limit $4"#,
    )
    .bind(name)
    .bind(after)
    .bind(upto)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Queues notifications for the other nodes (PostgreSQL delivers them at commit) and records
/// `token` in `commit_tokens` in the same transaction, so that a commit whose outcome is
/// unknown can be looked up by its data with [`commit_outcome`]. Returns whether the token
/// was written: only on PostgreSQL (an in-process SQLite commit is never in doubt) and only
/// when there is something to announce (a batch that wrote nothing has nothing to lose).
pub async fn notify_and_mark(
    tx: &mut Tx,
    payloads: &[String],
    token: uuid::Uuid,
) -> Result<bool, sqlx::Error> {
    let Tx::Postgres(tx) = tx else {
        return Ok(false);
    };
    if payloads.is_empty() {
        return Ok(false);
    }
    // A data-modifying CTE always runs; the count forces every pg_notify in `sent` to run.
    sqlx::query(
        "with sent as (select pg_notify($1, p) from unnest($2::text[]) as t(p)),
              mark as (insert into commit_tokens (token) values ($3::uuid))
         select count(*) from sent",
    )
    .bind(NOTIFY_CHANNEL)
    .bind(payloads)
    .bind(token.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// What became of a transaction that wrote `token` (see [`notify_and_mark`]) and lost its
/// connection during COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// It did not commit, and now never will.
    NotCommitted,
    /// Its backend is still finishing it; ask again.
    Pending,
}

/// Looks `token` up by inserting it again in a transaction of its own. If the original
/// transaction is still in progress, the insert waits for it on the primary key (up to
/// `wait`, then [`CommitOutcome::Pending`]); if it committed, the insert conflicts; if it
/// aborted (or never reached disk before a crash), the insert succeeds — and is rolled back,
/// which settles the question: the original can no longer commit. PostgreSQL only.
pub async fn commit_outcome(
    db: &Db,
    token: uuid::Uuid,
    wait: std::time::Duration,
) -> Result<CommitOutcome, sqlx::Error> {
    let Db::Postgres(pool) = db else {
        return Ok(CommitOutcome::NotCommitted);
    };
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "set local lock_timeout = {}",
        wait.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await?;
    let probe = sqlx::query_scalar::<_, i32>(
        "insert into commit_tokens (token) values ($1::uuid) on conflict do nothing returning 1",
    )
    .bind(token.to_string())
    .fetch_optional(&mut *tx)
    .await;
    let outcome = match probe {
        Ok(Some(_)) => CommitOutcome::NotCommitted,
        Ok(None) => CommitOutcome::Committed,
        // 55P03 lock_not_available: the original transaction still holds the key.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            CommitOutcome::Pending
        }
        Err(e) => return Err(e),
    };
    tx.rollback().await?;
    Ok(outcome)
}

/// The answer `tailcast.append_jobs` recorded with `token`, once [`commit_outcome`] found the
/// token committed: what a caller that lost its connection during the call (sent outside a
/// transaction, so the call was its commit) never received. None for a token recorded without
/// an answer (by [`notify_and_mark`], or before migration 20261128000010).
pub async fn recorded_answer(
    db: &Db,
    token: uuid::Uuid,
) -> Result<Option<JobsOutcome>, sqlx::Error> {
    let Db::Postgres(pool) = db else {
        return Ok(None);
    };
    sqlx::query_as(
        "select seqs, dups, errors, error_heads, written_streams, written_heads, written_closed
           from commit_tokens where token = $1::uuid and seqs is not null",
    )
    .bind(token.to_string())
    .fetch_optional(pool)
    .await
}

/// Deletes commit tokens older than `age`: an in-doubt commit is resolved within seconds.
pub async fn prune_commit_tokens(db: &Db, age: std::time::Duration) -> Result<u64, sqlx::Error> {
    let Db::Postgres(pool) = db else {
        return Ok(0);
    };
    let deleted =
        sqlx::query("delete from commit_tokens where at < now() - make_interval(secs => $1)")
            .bind(age.as_secs_f64())
            .execute(pool)
            .await?;
    Ok(deleted.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    #[test]
    fn prefix_successor_bounds_the_prefix_range() {
        assert_eq!(prefix_successor(""), None);
        assert_eq!(prefix_successor("run:").as_deref(), Some("run;"));
        assert_eq!(prefix_successor("az").as_deref(), Some("a{"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
    }
}
