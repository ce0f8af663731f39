//! Every SQL statement about input requests. The row is the arbiter of who answered first;
//! the log gets the matching event afterwards (see the migration's comment).

use chrono::{DateTime, Utc};

use super::db::{execute, on_db, on_tx, Db, Ts};
use super::model::{wire_time, TYPE_INPUT_ANSWERED, TYPE_INPUT_EXPIRED, TYPE_INPUT_REQUESTED};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Answered,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Answered => "answered",
            Status::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "open" => Some(Status::Open),
            "answered" => Some(Status::Answered),
            "expired" => Some(Status::Expired),
            _ => None,
        }
    }
}

/// One input request.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InputRow {
    pub stream_id: i64,
    pub stream: String,
    pub request_id: String,
    pub token: String,
    pub seq: Option<i64>,
    pub prompt: String,
    pub schema: Option<String>,
    pub data: Option<String>,
    #[sqlx(try_from = "Ts")]
    pub expires_at: DateTime<Utc>,
    #[sqlx(try_from = "String")]
    pub status: Status,
    pub answer: Option<String>,
    pub resolution_seq: Option<i64>,
    /// The answerer's token `sub` (None: anonymous, or not answered).
    pub answered_by: Option<String>,
}

impl TryFrom<String> for Status {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Status::parse(&s).ok_or_else(|| format!("unknown input request status {s:?}"))
    }
}

impl InputRow {
    /// The idempotency id of this request's event of type `ty`.
    pub fn event_id(&self, ty: &str) -> String {
        event_id(ty, &self.request_id, &self.token)
    }

    /// Past its expiry time (the sweeper may not have marked it yet).
    pub fn is_due(&self) -> bool {
        self.expires_at <= Utc::now()
    }
}

pub fn event_id(ty: &str, request_id: &str, token: &str) -> String {
    format!("{ty}:{request_id}:{token}")
}

const COLUMNS: &str = "r.stream_id, s.name as stream, r.request_id, r.token, r.seq, r.prompt, \
     r.schema, r.data, r.expires_at, r.status, r.answer, r.resolution_seq, r.answered_by";

/// A request is visible once its `input.requested` event is committed: before that nobody
/// can have seen it, and an answer must never precede the question in the log. The seq is
/// filled in just after the append returns; until then the event itself is the proof.
const VISIBLE: &str = "(r.seq is not null or exists (
        select 1 from events e
        where e.stream_id = r.stream_id and e.type = 'input.requested'
          and e.event_id = 'input.requested:' || r.request_id || ':' || r.token))";

/// The id of a stream, creating its row if missing (a request may be a stream's first act).
pub async fn stream_id(db: &Db, name: &str) -> Result<(i64, bool), sqlx::Error> {
    let now = Ts(wire_time(Utc::now()));
    execute!(
        db,
        "insert into streams (name, created_at, updated_at) values ($1, $2, $2)
             on conflict (name) do nothing",
        name,
        now
    )?;
    on_db!(db, write, |ex| {
        sqlx::query_as("select id, closed from streams where name = $1")
            .bind(name)
            .fetch_one(ex)
            .await
    })
}

/// What a producer asks.
pub struct NewInput<'a> {
    pub stream_id: i64,
    pub request_id: &'a str,
    pub token: &'a str,
    pub prompt: &'a str,
    pub schema: Option<&'a str>,
    pub data: Option<&'a str>,
    pub expires_at: DateTime<Utc>,
}

/// Inserts a new open request; false if one with this id exists in the stream.
pub async fn insert(db: &Db, n: &NewInput<'_>) -> Result<bool, sqlx::Error> {
    let done = execute!(
        db,
        r#"insert into input_requests
                 (stream_id, request_id, token, prompt, schema, data, expires_at, created_at)
               values ($1, $2, $3, $4, $5, $6, $7, $8)
               on conflict (stream_id, request_id) do nothing"#,
        n.stream_id,
        n.request_id,
        n.token,
        n.prompt,
        n.schema,
        n.data,
        Ts(n.expires_at),
        Ts(Utc::now())
    )?;
    Ok(done == 1)
}

pub async fn set_seq(
    db: &Db,
    stream_id: i64,
    request_id: &str,
    seq: i64,
) -> Result<(), sqlx::Error> {
    execute!(
        db,
        "update input_requests set seq = $3 where stream_id = $1 and request_id = $2",
        stream_id,
        request_id,
        seq
    )?;
    Ok(())
}

/// Removes a request whose `input.requested` append failed (so nobody can have seen it).
pub async fn delete(db: &Db, stream_id: i64, request_id: &str) -> Result<(), sqlx::Error> {
    execute!(
        db,
        "delete from input_requests where stream_id = $1 and request_id = $2",
        stream_id,
        request_id
    )?;
    Ok(())
}

/// A visible request of a stream.
pub async fn get(db: &Db, stream: &str, request_id: &str) -> Result<Option<InputRow>, sqlx::Error> {
    let sql = format!(
        "select {COLUMNS} from input_requests r join streams s on s.id = r.stream_id
         where s.name = $1 and r.request_id = $2 and {VISIBLE}"
    );
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql)
            .bind(stream)
            .bind(request_id)
            .fetch_optional(ex)
            .await
    })
}

/// A stream's visible requests, optionally of one status, in seq order.
pub async fn list(
    db: &Db,
    stream: &str,
    status: Option<Status>,
    limit: i64,
) -> Result<Vec<InputRow>, sqlx::Error> {
    let sql = format!(
        "select {COLUMNS} from input_requests r join streams s on s.id = r.stream_id
         where s.name = $1 and ($2 is null or r.status = $2) and {VISIBLE}
         order by r.seq nulls last, r.created_at limit $3"
    );
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql)
            .bind(stream)
            .bind(status.map(Status::as_str))
            .bind(limit)
            .fetch_all(ex)
            .await
    })
}

/// Records `answer` if the request is still open, visible and not yet due: the first
/// answer wins, because only one update can see `status = 'open'` (on PostgreSQL the row
/// lock the update takes makes a concurrent one wait, then re-check the condition and find it
/// false; on SQLite writes are serial).
pub async fn claim_answer(
    db: &Db,
    stream_id: i64,
    request_id: &str,
    answer: &str,
    by: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "update input_requests as r
         set status = 'answered', answer = $3, resolved_at = $4, answered_by = $5
         where r.stream_id = $1 and r.request_id = $2 and r.status = 'open'
           and r.expires_at > $4 and {VISIBLE}"
    );
    let now = Ts(Utc::now());
    let done = execute!(db, &sql, stream_id, request_id, answer, now, by)?;
    Ok(done == 1)
}

/// Marks up to `limit` due open requests expired and returns them. On PostgreSQL `skip
/// locked` lets several nodes sweep at once without waiting on each other or claiming the
/// same row; a request being answered right now is skipped and looked at again next pass.
pub async fn claim_due(db: &Db, limit: i64) -> Result<Vec<InputRow>, sqlx::Error> {
    let now = Ts(Utc::now());
    match db {
        Db::Postgres(pool) => {
            let sql = format!(
                "with due as (
                   select stream_id, request_id from input_requests
                   where status = 'open' and expires_at <= $2 and seq is not null
                   order by expires_at limit $1
                   for update skip locked)
                 update input_requests r set status = 'expired', resolved_at = $2
                 from due, streams s
                 where r.stream_id = due.stream_id and r.request_id = due.request_id
                   and s.id = r.stream_id
                 returning {COLUMNS}"
            );
            sqlx::query_as(&sql)
                .bind(limit)
                .bind(now)
                .fetch_all(pool)
                .await
        }
        // One process, serial writes: read the due rows and mark them in one transaction.
        Db::Sqlite(_) => {
            let mut tx = db.begin_write().await?;
            let sql = format!(
                "select {COLUMNS} from input_requests r join streams s on s.id = r.stream_id
                 where r.status = 'open' and r.expires_at <= $2 and r.seq is not null
                 order by r.expires_at limit $1"
            );
            let mut rows: Vec<InputRow> = on_tx!(&mut tx, |ex| {
                sqlx::query_as(&sql)
                    .bind(limit)
                    .bind(now)
                    .fetch_all(ex)
                    .await
            })?;
            for row in &mut rows {
                execute!(
                    tx &mut tx,
                    "update input_requests set status = 'expired', resolved_at = $3
                     where stream_id = $1 and request_id = $2",
                    row.stream_id,
                    &row.request_id,
                    now
                )?;
                row.status = Status::Expired;
            }
            tx.commit().await?;
            Ok(rows)
        }
    }
}

/// Resolved requests whose event is not known to be in the log, resolved at least `grace_s`
/// seconds ago (younger ones are still being announced by whoever resolved them).
pub async fn unannounced(db: &Db, grace_s: f64, limit: i64) -> Result<Vec<InputRow>, sqlx::Error> {
    let sql = format!(
        "select {COLUMNS} from input_requests r join streams s on s.id = r.stream_id
         where r.status <> 'open' and not r.announced and r.resolved_at <= $1
         order by r.resolved_at limit $2"
    );
    let before = Ts(seconds_ago(grace_s));
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql)
            .bind(before)
            .bind(limit)
            .fetch_all(ex)
            .await
    })
}

fn seconds_ago(s: f64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::milliseconds((s * 1000.0) as i64)
}

/// Records that the resolution event is in the log (at `seq`), or never will be (`None`: the
/// stream was closed first).
pub async fn mark_announced(
    db: &Db,
    stream_id: i64,
    request_id: &str,
    seq: Option<i64>,
) -> Result<(), sqlx::Error> {
    execute!(
        db,
        "update input_requests set announced = true, resolution_seq = $3
             where stream_id = $1 and request_id = $2",
        stream_id,
        request_id,
        seq
    )?;
    Ok(())
}

/// Repairs requests whose creation was interrupted: fills in the seq of those whose
/// `input.requested` event made it into the log, and removes those that never got one
/// within `grace_s` seconds (nobody can have seen them).
///
/// Both statements run every second on every node, so both start from the
/// `input_requests_unsequenced` partial index (a handful of rows), never from a scan of every
/// request or of every event. The update is written as correlated subqueries rather than
/// `update … from events` because SQLite, without statistics, drives that join from `events`.
pub async fn repair_unsequenced(db: &Db, grace_s: f64) -> Result<u64, sqlx::Error> {
    execute!(
        db,
        "update input_requests as r set seq = (
                 select e.seq from events e where e.stream_id = r.stream_id
                   and e.event_id = 'input.requested:' || r.request_id || ':' || r.token)
             where r.seq is null and exists (
                 select 1 from events e where e.stream_id = r.stream_id and e.type = $1
                   and e.event_id = 'input.requested:' || r.request_id || ':' || r.token)",
        TYPE_INPUT_REQUESTED
    )?;
    let before = Ts(seconds_ago(grace_s));
    let gone = execute!(
        db,
        "delete from input_requests where seq is null and created_at <= $1",
        before
    )?;
    Ok(gone)
}

/// The event type announcing a resolved request.
pub fn resolution_type(status: Status) -> &'static str {
    match status {
        Status::Expired => TYPE_INPUT_EXPIRED,
        _ => TYPE_INPUT_ANSWERED,
    }
}
