//! Every SQL statement about presence (PostgreSQL only: on SQLite presence is one node's, in
//! memory). See the migration `20261128000004_presence.sql` for the tables.
//!
//! A node's rows count only while its lease (`presence_nodes.lease_until`, database time) has
//! not lapsed: every read joins on a live lease, so a dead node's followers vanish from reads
//! the moment its lease ends, whoever reaps the rows and whenever.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, Serializer};
use sqlx::{PgPool, Postgres, Transaction};

use super::model::format_time;

/// One follower of a stream: a connection (one SSE response, one WebSocket) on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Member {
    pub connection_id: String,
    /// `sse`, `ws`, `ui` (the AI SDK view) or `durable` (Durable Streams SSE).
    pub transport: String,
    pub node: String,
    /// The follower's token `sub`; absent for anonymous callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// What the client called itself (`label=`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(serialize_with = "wire")]
    pub since: DateTime<Utc>,
}

fn wire<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

/// Channel on which nodes announce joins and leaves to each other.
pub const PRESENCE_CHANNEL: &str = "tailcast_presence";

const MEMBER_COLUMNS: &str =
    "p.connection as connection_id, p.transport, p.node, p.sub, p.label, p.since";

/// Members of `stream` on nodes other than `node` whose lease is live, longest-present first,
/// at most `limit`, and how many there are in all.
pub async fn members(
    pool: &PgPool,
    stream: &str,
    node: &str,
    limit: i64,
) -> Result<(i64, Vec<Member>), sqlx::Error> {
    let count: i64 = sqlx::query_scalar(
        "select count(*) from presence p join presence_nodes n on n.node = p.node
         where p.stream = $1 and p.node <> $2 and n.lease_until > clock_timestamp()",
    )
    .bind(stream)
    .bind(node)
    .fetch_one(pool)
    .await?;
    if count == 0 {
        return Ok((0, Vec::new()));
    }
    let members = sqlx::query_as(&format!(
        "select {MEMBER_COLUMNS} from presence p join presence_nodes n on n.node = p.node
         where p.stream = $1 and p.node <> $2 and n.lease_until > clock_timestamp()
         order by p.since, p.node, p.connection limit $3"
    ))
    .bind(stream)
    .bind(node)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok((count, members))
}

/// Followers per stream of `streams` on nodes other than `node` (streams without any are
/// left out).
pub async fn counts(
    pool: &PgPool,
    streams: &[&str],
    node: &str,
) -> Result<HashMap<String, i64>, sqlx::Error> {
    if streams.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select p.stream, count(*) from presence p join presence_nodes n on n.node = p.node
         where p.stream = any($1) and p.node <> $2 and n.lease_until > clock_timestamp()
         group by p.stream",
    )
    .bind(streams)
    .bind(node)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Followers on nodes other than `node`, in all.
pub async fn total(pool: &PgPool, node: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "select count(*) from presence p join presence_nodes n on n.node = p.node
         where p.node <> $1 and n.lease_until > clock_timestamp()",
    )
    .bind(node)
    .fetch_one(pool)
    .await
}

/// Extends `node`'s lease to `lease` from now (database time), creating its row if missing.
/// True if the row had to be created: the node was never registered, or another node reaped
/// it after its lease lapsed, and its presence rows must be written again in full.
///
/// The row lock taken here is held to commit: a reaper deleting this row waits for it and
/// then finds the lease renewed; if the reaper got there first, this insert waits for it and
/// creates the row afresh (and answers true).
pub async fn renew(
    tx: &mut Transaction<'static, Postgres>,
    node: &str,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "insert into presence_nodes (node, lease_until)
         values ($1, clock_timestamp() + make_interval(secs => $2))
         on conflict (node) do update set lease_until = excluded.lease_until
         returning (xmax = 0)",
    )
    .bind(node)
    .bind(lease.as_secs_f64())
    .fetch_one(&mut **tx)
    .await
}

/// Column arrays of members to write.
#[derive(Default)]
pub struct MemberRows<'a> {
    pub stream: Vec<&'a str>,
    pub connection: Vec<&'a str>,
    pub transport: Vec<&'a str>,
    pub sub: Vec<Option<&'a str>>,
    pub label: Vec<Option<&'a str>>,
    pub since: Vec<DateTime<Utc>>,
}

impl<'a> MemberRows<'a> {
    pub fn push(&mut self, stream: &'a str, m: &'a Member) {
        self.stream.push(stream);
        self.connection.push(&m.connection_id);
        self.transport.push(&m.transport);
        self.sub.push(m.sub.as_deref());
        self.label.push(m.label.as_deref());
        self.since.push(m.since);
    }
}

/// Deletes every row of `node` (before writing them all again).
pub async fn clear(tx: &mut Transaction<'static, Postgres>, node: &str) -> Result<(), sqlx::Error> {
    sqlx::query("delete from presence where node = $1")
        .bind(node)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Writes joins (one statement however many).
pub async fn insert(
    tx: &mut Transaction<'static, Postgres>,
    node: &str,
    rows: &MemberRows<'_>,
) -> Result<(), sqlx::Error> {
    if rows.stream.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into presence (stream, node, connection, transport, sub, label, since)
         select s, $1, c, t, u, l, at
         from unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[]) as r(s, c, t, u, l, at)
         on conflict (stream, node, connection) do update
           set transport = excluded.transport, sub = excluded.sub, label = excluded.label,
               since = excluded.since",
    )
    .bind(node)
    .bind(&rows.stream)
    .bind(&rows.connection)
    .bind(&rows.transport)
    .bind(&rows.sub)
    .bind(&rows.label)
    .bind(&rows.since)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Deletes leaves (one statement however many).
pub async fn delete(
    tx: &mut Transaction<'static, Postgres>,
    node: &str,
    streams: &[&str],
    connections: &[&str],
) -> Result<(), sqlx::Error> {
    if streams.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "delete from presence p using unnest($2::text[], $3::text[]) as r(s, c)
         where p.stream = r.s and p.node = $1 and p.connection = r.c",
    )
    .bind(node)
    .bind(streams)
    .bind(connections)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Queues notifications (delivered at commit).
pub async fn notify(
    tx: &mut Transaction<'static, Postgres>,
    payloads: &[String],
) -> Result<(), sqlx::Error> {
    if payloads.is_empty() {
        return Ok(());
    }
    // The count forces every pg_notify to run.
    sqlx::query("select count(pg_notify($1, p)) from unnest($2::text[]) as t(p)")
        .bind(PRESENCE_CHANNEL)
        .bind(payloads)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Removes the nodes whose lease lapsed and returns their members (stream, member). Several
/// nodes may reap at once: each row is deleted, and returned, by one of them only.
pub async fn reap(
    tx: &mut Transaction<'static, Postgres>,
) -> Result<Vec<(String, Member)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        stream: String,
        #[sqlx(flatten)]
        member: Member,
    }
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "with dead as (
           delete from presence_nodes where lease_until < clock_timestamp() returning node)
         delete from presence p using dead where p.node = dead.node
         returning p.stream, {MEMBER_COLUMNS}"
    ))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.stream, r.member)).collect())
}

/// Removes `node` and its rows (a clean shutdown); returns the streams it followed.
pub async fn unregister(
    tx: &mut Transaction<'static, Postgres>,
    node: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let streams: Vec<String> = sqlx::query_scalar(
        "with gone as (delete from presence where node = $1 returning stream)
         select distinct stream from gone",
    )
    .bind(node)
    .fetch_all(&mut **tx)
    .await?;
    sqlx::query("delete from presence_nodes where node = $1")
        .bind(node)
        .execute(&mut **tx)
        .await?;
    Ok(streams)
}
