//! Every SQL statement about webhooks: their registrations, and per webhook and stream the
//! delivery position and the delivery lease (see the migration's comments).
//!
//! The position row is the arbiter of who delivers: a node claims it with one conditional
//! update (free, its own, or its lease ran out), and every later write of the position
//! carries `owner = this node`, so a node that lost its claim (frozen past its lease) can no
//! longer move it. On PostgreSQL the update's row lock makes a concurrent claim wait and then
//! re-check the condition; on SQLite writes are serial.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::db::{in_list, on_db, Db, List, Ts};
use super::model::{ceil_millis, format_time, wire_time};

/// A registered webhook.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub prefix: String,
    /// JSON array of event types; None: every type.
    pub types: Option<String>,
    pub secret: String,
    #[sqlx(try_from = "Ts")]
    pub created_at: DateTime<Utc>,
}

impl Webhook {
    /// The event types it receives, None for all.
    pub fn type_list(&self) -> Option<Vec<String>> {
        self.types
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
    }
}

/// A webhook as the API shows it (never its secret), with how its deliveries stand.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookInfo {
    pub id: String,
    pub url: String,
    pub prefix: String,
    pub types: Option<Vec<String>>,
    pub created_at: String,
    /// Streams it has delivered to (or is delivering to).
    pub streams: i64,
    /// Events committed on those streams and not yet answered with a 2xx.
    pub pending_events: i64,
    /// Streams whose next event has failed at least once.
    pub failing_streams: i64,
    /// The most recent failure on one of them.
    pub last_error: Option<String>,
}

const COLUMNS: &str = "id, url, prefix, types, secret, created_at";

pub async fn insert(db: &Db, w: &Webhook) -> Result<(), sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query(
            "insert into webhooks (id, url, prefix, types, secret, created_at)
             values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&w.id)
        .bind(&w.url)
        .bind(&w.prefix)
        .bind(&w.types)
        .bind(&w.secret)
        .bind(Ts(w.created_at))
        .execute(ex)
        .await
        .map(|d| d.rows_affected())
    })?;
    Ok(())
}

/// Every webhook, oldest first.
pub async fn all(db: &Db) -> Result<Vec<Webhook>, sqlx::Error> {
    let sql = format!("select {COLUMNS} from webhooks order by created_at, id");
    on_db!(db, read, |ex| sqlx::query_as(&sql).fetch_all(ex).await)
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Webhook>, sqlx::Error> {
    let sql = format!("select {COLUMNS} from webhooks where id = $1");
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql).bind(id).fetch_optional(ex).await
    })
}

/// Deletes a webhook and its positions; false if there was none.
pub async fn delete(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    let n = on_db!(db, write, |ex| {
        sqlx::query("delete from webhooks where id = $1")
            .bind(id)
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    Ok(n == 1)
}

/// The API's view of `w`, with its delivery totals.
pub async fn info(db: &Db, w: &Webhook) -> Result<WebhookInfo, sqlx::Error> {
    let sql = "select count(*),
                      cast(coalesce(sum(case when s.head > p.delivered
                                             then s.head - p.delivered else 0 end), 0) as bigint),
                      coalesce(sum(case when p.attempts > 0 then 1 else 0 end), 0),
                      (select last_error from webhook_positions
                       where webhook_id = $1 and attempts > 0 limit 1)
               from webhook_positions p join streams s on s.id = p.stream_id
               where p.webhook_id = $1";
    let (streams, pending_events, failing, last_error): (i64, i64, i64, Option<String>) =
        on_db!(db, read, |ex| {
            sqlx::query_as(sql).bind(&w.id).fetch_one(ex).await
        })?;
    Ok(WebhookInfo {
        id: w.id.clone(),
        url: w.url.clone(),
        prefix: w.prefix.clone(),
        types: w.type_list(),
        created_at: format_time(&w.created_at),
        streams,
        pending_events,
        failing_streams: failing,
        last_error,
    })
}

/// A stream with events a webhook has not delivered yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    pub stream_id: i64,
    pub name: String,
}

/// Up to `limit` streams matching `w` with undelivered events that `node` may claim (no
/// position yet, or one free, its own, or whose lease ran out), leaving out `busy` (those
/// this node is delivering right now). A stream without a position is pending if it was
/// written to since the webhook was created. Least recently written first: a stream that is
/// written to all the time cannot keep the others waiting for a free slot.
pub async fn pending(
    db: &Db,
    w: &Webhook,
    node: &str,
    busy: &[i64],
    limit: i64,
) -> Result<Vec<Pending>, sqlx::Error> {
    let not_busy = format!("not ({})", in_list(db.is_sqlite(), "s.id", 6));
    // `name` compares by code point: the names starting with the prefix are one index range.
    let sql = format!(
        "select s.id as stream_id, s.name from streams s
         left join webhook_positions p on p.webhook_id = $1 and p.stream_id = s.id
         where s.name >= $2 and ($3 is null or s.name < $3)
           and ((p.stream_id is null and s.updated_at >= $4 and s.head > 0)
                or (p.delivered < s.head
                    and (p.owner is null or p.owner = $5 or p.lease_until < $7)))
           and {not_busy}
         order by s.updated_at limit $8"
    );
    let successor = super::store::prefix_successor(&w.prefix);
    on_db!(db, read, |ex| {
        sqlx::query_as(&sql)
            .bind(&w.id)
            .bind(&w.prefix)
            .bind(successor.as_deref())
            .bind(Ts(w.created_at))
            .bind(node)
            .bind(List(busy))
            .bind(Ts(Utc::now()))
            .bind(limit)
            .fetch_all(ex)
            .await
    })
}

/// Claims the delivery of `w` on a stream for `node` until `until`; returns the position to
/// deliver after, or None if another node holds an unexpired claim. The first claim creates
/// the position just before the stream's first event committed at or after the webhook's
/// creation (older events are not delivered).
pub async fn claim(
    db: &Db,
    w: &Webhook,
    stream_id: i64,
    node: &str,
    until: DateTime<Utc>,
) -> Result<Option<i64>, sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query(
            "insert into webhook_positions (webhook_id, stream_id, delivered)
             select $1, s.id, coalesce(
                 (select e.seq - 1 from events e where e.stream_id = s.id and e.time >= $3
                  order by e.time, e.seq limit 1),
                 s.head)
             from streams s where s.id = $2
             on conflict (webhook_id, stream_id) do nothing",
        )
        .bind(&w.id)
        .bind(stream_id)
        .bind(Ts(ceil_millis(w.created_at)))
        .execute(ex)
        .await
        .map(|d| d.rows_affected())
    })?;
    let now = Ts(wire_time(Utc::now()));
    on_db!(db, write, |ex| {
        sqlx::query_scalar(
            "update webhook_positions set owner = $3, lease_until = $4
             where webhook_id = $1 and stream_id = $2
               and (owner is null or owner = $3 or lease_until < $5)
             returning delivered",
        )
        .bind(&w.id)
        .bind(stream_id)
        .bind(node)
        .bind(Ts(until))
        .bind(now)
        .fetch_optional(ex)
        .await
    })
}

/// Moves the position to `delivered` (never backwards), clears the failure count and
/// extends the claim; false if `node` no longer holds it.
pub async fn advance(
    db: &Db,
    webhook: &str,
    stream_id: i64,
    node: &str,
    delivered: i64,
    until: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let sql = match db {
        Db::Postgres(_) => {
            "update webhook_positions
             set delivered = greatest(delivered, $4), attempts = 0, last_error = null,
                 lease_until = $5
             where webhook_id = $1 and stream_id = $2 and owner = $3"
        }
        Db::Sqlite(_) => {
            "update webhook_positions
             set delivered = max(delivered, $4), attempts = 0, last_error = null,
                 lease_until = $5
             where webhook_id = $1 and stream_id = $2 and owner = $3"
        }
    };
    let n = on_db!(db, write, |ex| {
        sqlx::query(sql)
            .bind(webhook)
            .bind(stream_id)
            .bind(node)
            .bind(delivered)
            .bind(Ts(until))
            .execute(ex)
            .await
            .map(|d| d.rows_affected())
    })?;
    Ok(n == 1)
}

/// Extends the claim and records the last failure (if any); false if `node` no longer
/// holds it.
pub async fn renew(
    db: &Db,
    webhook: &str,
    stream_id: i64,
    node: &str,
    until: DateTime<Utc>,
    failure: Option<(i32, &str)>,
) -> Result<bool, sqlx::Error> {
    let (attempts, error) = match failure {
        Some((a, e)) => (Some(a), Some(e)),
        None => (None, None),
    };
    let n = on_db!(db, write, |ex| {
        sqlx::query(
            "update webhook_positions
             set lease_until = $4, attempts = coalesce($5, attempts),
                 last_error = coalesce($6, last_error)
             where webhook_id = $1 and stream_id = $2 and owner = $3",
        )
        .bind(webhook)
        .bind(stream_id)
        .bind(node)
        .bind(Ts(until))
        .bind(attempts)
        .bind(error)
        .execute(ex)
        .await
        .map(|d| d.rows_affected())
    })?;
    Ok(n == 1)
}

/// Gives the claim up (nothing left to deliver, or shutting down), so any node may take the
/// stream's next events at once.
pub async fn release(
    db: &Db,
    webhook: &str,
    stream_id: i64,
    node: &str,
) -> Result<(), sqlx::Error> {
    on_db!(db, write, |ex| {
        sqlx::query(
            "update webhook_positions set owner = null, lease_until = null
             where webhook_id = $1 and stream_id = $2 and owner = $3",
        )
        .bind(webhook)
        .bind(stream_id)
        .bind(node)
        .execute(ex)
        .await
        .map(|d| d.rows_affected())
    })?;
    Ok(())
}

/// How many webhooks exist and how many of their streams are failing (for `/v1/stats`).
pub async fn totals(db: &Db) -> Result<(i64, i64), sqlx::Error> {
    on_db!(db, read, |ex| {
        sqlx::query_as(
            "select (select count(*) from webhooks),
                    (select count(*) from webhook_positions where attempts > 0)",
        )
        .fetch_one(ex)
        .await
    })
}
