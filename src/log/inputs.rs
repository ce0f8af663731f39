//! Every SQL statement about input requests. The row is the arbiter of who answered first;
//! the log gets the matching event afterwards (see the migration's comment).

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::model::{TYPE_INPUT_ANSWERED, TYPE_INPUT_EXPIRED, TYPE_INPUT_REQUESTED};

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
#[derive(Debug, Clone)]
pub struct InputRow {
    pub stream_id: i64,
    pub stream: String,
    pub request_id: String,
    pub token: String,
    pub seq: Option<i64>,
    pub prompt: String,
    pub schema: Option<String>,
    pub data: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub status: Status,
    pub answer: Option<String>,
    pub resolution_seq: Option<i64>,
}

impl InputRow {
    fn from_row(r: &PgRow) -> Self {
        InputRow {
            stream_id: r.get("stream_id"),
            stream: r.get("stream"),
            request_id: r.get("request_id"),
            token: r.get("token"),
            seq: r.get("seq"),
            prompt: r.get("prompt"),
            schema: r.get("schema"),
            data: r.get("data"),
            expires_at: r.get("expires_at"),
            status: Status::parse(r.get::<&str, _>("status")).unwrap_or(Status::Open),
            answer: r.get("answer"),
            resolution_seq: r.get("resolution_seq"),
        }
    }

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
     r.schema, r.data, r.expires_at, r.status, r.answer, r.resolution_seq";

/// A request is visible once its `input.requested` event is committed: before that nobody
/// can have seen it, and an answer must never precede the question in the log. The seq is
/// filled in just after the append returns; until then the event itself is the proof.
const VISIBLE: &str = "(r.seq is not null or exists (
        select 1 from events e
        where e.stream_id = r.stream_id and e.type = 'input.requested'
          and e.event_id = 'input.requested:' || r.request_id || ':' || r.token))";

/// The id of a stream, creating its row if missing (a request may be a stream's first act).
pub async fn stream_id(pool: &PgPool, name: &str) -> Result<(i64, bool), sqlx::Error> {
    sqlx::query("insert into streams (name) values ($1) on conflict (name) do nothing")
        .bind(name)
        .execute(pool)
        .await?;
    let row = sqlx::query("select id, closed from streams where name = $1")
        .bind(name)
        .fetch_one(pool)
        .await?;
    Ok((row.get(0), row.get(1)))
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
pub async fn insert(pool: &PgPool, n: &NewInput<'_>) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        r#"insert into input_requests
             (stream_id, request_id, token, prompt, schema, data, expires_at)
           values ($1, $2, $3, $4, $5, $6, $7)
           on conflict (stream_id, request_id) do nothing"#,
    )
    .bind(n.stream_id)
    .bind(n.request_id)
    .bind(n.token)
    .bind(n.prompt)
    .bind(n.schema)
    .bind(n.data)
    .bind(n.expires_at)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn set_seq(
    pool: &PgPool,
    stream_id: i64,
    request_id: &str,
    seq: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("update input_requests set seq = $3 where stream_id = $1 and request_id = $2")
        .bind(stream_id)
        .bind(request_id)
        .bind(seq)
        .execute(pool)
        .await?;
    Ok(())
}

/// Removes a request whose `input.requested` append failed (so nobody can have seen it).
pub async fn delete(pool: &PgPool, stream_id: i64, request_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("delete from input_requests where stream_id = $1 and request_id = $2")
        .bind(stream_id)
        .bind(request_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// A visible request of a stream.
pub async fn get(
    pool: &PgPool,
    stream: &str,
    request_id: &str,
) -> Result<Option<InputRow>, sqlx::Error> {
    let sql = format!(
        "select {COLUMNS} from input_requests r join streams s on s.id = r.stream_id
         where s.name = $1 and r.request_id = $2 and {VISIBLE}"
    );
    let row = sqlx::query(&sql)
        .bind(stream)
        .bind(request_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(InputRow::from_row))
}

/// A stream's visible requests, optionally of one status, in seq order.
pub async fn list(
    pool: &PgPool,
    stream: &str,
    status: Option<Status>,
    limit: i64,
) -> Result<Vec<InputRow>, sqlx::Error> {
    let sql = format!(
        "select {COLUMNS} from input_requests r join streams s on s.id = r.stream_id
         where s.name = $1 and ($2::text is null or r.status = $2) and {VISIBLE}
         order by r.seq nulls last, r.created_at limit $3"
    );
    let rows = sqlx::query(&sql)
        .bind(stream)
        .bind(status.map(Status::as_str))
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(InputRow::from_row).collect())
}

/// Records `answer` if the request is still open, visible and not yet due: the first
/// answer wins, because only one update can see `status = 'open'` (the row lock the update
/// takes makes a concurrent one wait, then re-check the condition and find it false).
pub async fn claim_answer(
    pool: &PgPool,
    stream_id: i64,
    request_id: &str,
    answer: &str,
) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "update input_requests r set status = 'answered', answer = $3, resolved_at = now()
         where r.stream_id = $1 and r.request_id = $2 and r.status = 'open'
           and r.expires_at > now() and {VISIBLE}"
    );
    let done = sqlx::query(&sql)
        .bind(stream_id)
        .bind(request_id)
        .bind(answer)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks up to `limit` due open requests expired and returns them. `skip locked`: several
/// nodes sweep at once without waiting on each other or claiming the same row; a request
/// being answered right now is skipped and looked at again next pass.
pub async fn claim_due(pool: &PgPool, limit: i64) -> Result<Vec<InputRow>, sqlx::Error> {
    let sql = format!(
        "with due as (
           select stream_id, request_id from input_requests
           where status = 'open' and expires_at <= now() and seq is not null
           order by expires_at limit $1
           for update skip locked)
         update input_requests r set status = 'expired', resolved_at = now()
         from due, streams s
         where r.stream_id = due.stream_id and r.request_id = due.request_id
           and s.id = r.stream_id
         returning {COLUMNS}"
    );
    let rows = sqlx::query(&sql).bind(limit).fetch_all(pool).await?;
    Ok(rows.iter().map(InputRow::from_row).collect())
}

/// Resolved requests whose event is not known to be in the log, resolved at least `grace_s`
/// seconds ago (younger ones are still being announced by whoever resolved them).
pub async fn unannounced(
    pool: &PgPool,
    grace_s: f64,
    limit: i64,
) -> Result<Vec<InputRow>, sqlx::Error> {
    let sql = format!(
        "select {COLUMNS} from input_requests r join streams s on s.id = r.stream_id
         where r.status <> 'open' and not r.announced
           and r.resolved_at <= now() - make_interval(secs => $1)
         order by r.resolved_at limit $2"
    );
    let rows = sqlx::query(&sql)
        .bind(grace_s)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(InputRow::from_row).collect())
}

/// Records that the resolution event is in the log (at `seq`), or never will be (`None`: the
/// stream was closed first).
pub async fn mark_announced(
    pool: &PgPool,
    stream_id: i64,
    request_id: &str,
    seq: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update input_requests set announced = true, resolution_seq = $3
         where stream_id = $1 and request_id = $2",
    )
    .bind(stream_id)
    .bind(request_id)
    .bind(seq)
    .execute(pool)
    .await?;
    Ok(())
}

/// Repairs requests whose creation was interrupted: fills in the seq of those whose
/// `input.requested` event made it into the log, and removes those that never got one
/// within `grace_s` seconds (nobody can have seen them).
pub async fn repair_unsequenced(pool: &PgPool, grace_s: f64) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "update input_requests r set seq = e.seq from events e
         where r.seq is null and e.stream_id = r.stream_id and e.type = $1
           and e.event_id = 'input.requested:' || r.request_id || ':' || r.token",
    )
    .bind(TYPE_INPUT_REQUESTED)
    .execute(pool)
    .await?;
    let gone = sqlx::query(
        "delete from input_requests
         where seq is null and created_at <= now() - make_interval(secs => $1)",
    )
    .bind(grace_s)
    .execute(pool)
    .await?;
    Ok(gone.rows_affected())
}

/// The event type announcing a resolved request.
pub fn resolution_type(status: Status) -> &'static str {
    match status {
        Status::Expired => TYPE_INPUT_EXPIRED,
        _ => TYPE_INPUT_ANSWERED,
    }
}
