//! Presence: `GET /v1/streams/{stream}/presence` (read grant), and what every transport
//! uses to register its followers. The WebSocket `presence` op and the join/leave notices
//! are in `ws.rs`; the registry itself is `live::presence`.

use std::collections::HashMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::extract::{Query, Stream};
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::live::presence::{check_label, sort_members, PresenceGuard, Snapshot};
use crate::log::presence as store;
use crate::log::{Db, StreamName};

/// Most members one answer lists (the count is always complete).
pub const MAX_MEMBERS: i64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/streams/{stream}/presence", get(presence))
}

#[derive(Deserialize)]
struct PresenceParams {
    limit: Option<i64>,
}

async fn presence(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Query(p): Query<PresenceParams>,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let limit = match p.limit {
        None => MAX_MEMBERS,
        Some(l) if (0..=MAX_MEMBERS).contains(&l) => l,
        Some(l) => {
            return Err(Error::InvalidParameter(format!(
                "limit must be between 0 and {MAX_MEMBERS}, not {l}"
            )))
        }
    };
    Ok(Json(snapshot(&app, &stream, limit).await?).into_response())
}

/// Who follows `stream` now, on every node: this node's followers as they are this instant,
/// the other nodes' as they last wrote them (only nodes whose lease is live).
pub async fn snapshot(app: &AppState, stream: &StreamName, limit: i64) -> Result<Snapshot> {
    let mut members = app.presence.local_members(stream);
    let mut count = members.len() as i64;
    if let Db::Postgres(pool) = &app.db {
        let (others, listed) = store::members(pool, stream.as_str(), &app.node_id, limit).await?;
        count += others;
        members.extend(listed);
    }
    sort_members(&mut members);
    members.truncate(limit.max(0) as usize);
    Ok(Snapshot {
        stream: stream.clone(),
        count,
        members,
    })
}

/// How many follow each of `streams`, on every node (streams nobody follows are left out).
pub async fn counts(app: &AppState, streams: &[&str]) -> Result<HashMap<String, i64>> {
    let mut counts = app.presence.local_counts(streams);
    if let Db::Postgres(pool) = &app.db {
        for (stream, n) in store::counts(pool, streams, &app.node_id).await? {
            *counts.entry(stream).or_default() += n;
        }
    }
    Ok(counts)
}

/// Followers on every node, in all.
pub async fn total(app: &AppState) -> Result<i64> {
    let mut total = app.presence.local_total() as i64;
    if let Db::Postgres(pool) = &app.db {
        total += store::total(pool, &app.node_id).await?;
    }
    Ok(total)
}

/// Registers `who` as a follower of `stream` over `transport` (a fresh connection id) until
/// the guard drops.
pub fn follow(
    app: &AppState,
    who: &Principal,
    stream: &StreamName,
    transport: &str,
    label: Option<&str>,
) -> PresenceGuard {
    let connection_id = uuid::Uuid::now_v7().simple().to_string();
    app.presence
        .join(stream, &connection_id, transport, who.subject(), label)
}

/// A `label=` query parameter: 1-128 characters without control characters.
pub fn parse_label(raw: Option<&str>) -> Result<Option<String>> {
    raw.map(|l| {
        check_label(l)
            .map(|()| l.to_owned())
            .map_err(|d| Error::InvalidParameter(format!("label {d}")))
    })
    .transpose()
}
