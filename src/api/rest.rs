//! REST: append, close, read and replay, export, list, metadata, delete, snapshot.

use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::json;

use super::events::{authored, parse_batch};
use super::extract::{Body, Query, Stream};
use super::params::{self, Cursor, PageLimit, Since};
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::live::compact;
use crate::live::subscription::PAGE_BYTES;
use crate::log::model::{encode_envelope, TYPE_STREAM_CLOSED};
use crate::log::store::{self, StreamRow};
use crate::log::{AppendSpec, NewEvent, StreamName};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/streams", get(list_streams))
        .route(
            "/v1/streams/{stream}",
            get(stream_info)
                .delete(delete_stream)
                .patch(super::leases::patch_stream),
        )
        .route("/v1/streams/{stream}/events", post(append).get(read_events))
        .route("/v1/streams/{stream}/close", post(close))
        .route("/v1/streams/{stream}/snapshot", get(snapshot))
}

#[derive(Deserialize)]
struct AppendParams {
    expected_seq: Option<i64>,
    /// Sets the stream's lease (as `PATCH` does) once the append succeeds.
    lease_s: Option<i64>,
}

async fn append(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Query(params): Query<AppendParams>,
    Body(body): Body,
) -> Result<Response> {
    if params.expected_seq.is_some_and(|s| s < 0) {
        return Err(Error::InvalidParameter("expected_seq must be >= 0".into()));
    }
    who.check(Grant::Write, &stream)?;
    let lease = params
        .lease_s
        .map(|l| super::leases::parse_lease(Some(l)))
        .transpose()?;
    let events = authored(parse_batch(&body, app.limits())?, who.subject());
    let spec = AppendSpec {
        stream,
        events,
        expected_seq: params.expected_seq,
        close: false,
    };
    let res = app.appender.append(spec).await?;
    if let Some(lease) = lease {
        // After the append: it may be what created the stream. The events are committed
        // whatever happens here, so a failure is logged, never answered as a failed append
        // (a client would append them again); the next append's `lease_s` sets it.
        if let Err(e) =
            crate::log::leases::set_if_changed(&app.db, res.stream.as_str(), lease).await
        {
            tracing::warn!(stream = %res.stream, error = %e, "appended, but could not set the lease");
        }
    }
    Ok((StatusCode::CREATED, Json(res)).into_response())
}

#[derive(Deserialize)]
struct CloseBody {
    reason: Option<serde_json::Value>,
}

async fn close(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Write, &stream)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let b: CloseBody = serde_json::from_slice(&body)
            .map_err(|e| super::events::json_error("the close request", e))?;
        b.reason
    };
    let data = match reason {
        Some(r) => json!({ "reason": r }).to_string(),
        None => "{}".to_owned(),
    };
    let spec = AppendSpec {
        stream,
        events: vec![NewEvent::composed(TYPE_STREAM_CLOSED, data).by(who.subject())],
        expected_seq: None,
        close: true,
    };
    let res = app.appender.append(spec).await?;
    let status = if res.events.iter().any(|e| e.duplicate) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(res)).into_response())
}

/// Looks a stream up, or 404 `stream_not_found`.
pub async fn existing_stream(app: &AppState, stream: &StreamName) -> Result<StreamRow> {
    store::stream(&app.db, stream.as_str())
        .await?
        .ok_or_else(|| Error::StreamNotFound(stream.to_string()))
}

async fn stream_info(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let row = existing_stream(&app, &stream).await?;
    Ok(Json(row.info()).into_response())
}

async fn delete_stream(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
) -> Result<Response> {
    who.check_admin()?;
    if !store::delete_stream(&app.db, stream.as_str(), &app.node_id).await? {
        return Err(Error::StreamNotFound(stream.to_string()));
    }
    app.hub.deleted(&stream);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct ListParams {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after_name: String,
    limit: Option<i64>,
}

async fn list_streams(
    State(app): State<AppState>,
    who: Principal,
    Query(p): Query<ListParams>,
) -> Result<Response> {
    who.check_admin()?;
    let PageLimit(limit) = PageLimit::parse(p.limit, 100)?;
    // PostgreSQL text cannot hold NUL: refuse control characters before they reach a query.
    for (name, value) in [("prefix", &p.prefix), ("after_name", &p.after_name)] {
        if value.chars().any(char::is_control) || value.len() > 1024 {
            return Err(Error::InvalidParameter(format!(
                "{name} must be at most 1024 bytes without control characters"
            )));
        }
    }
    let rows = store::list_streams(&app.db, &p.prefix, &p.after_name, limit).await?;
    let next = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.name.clone()));
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let followers = super::presence::counts(&app, &names).await?;
    let streams: Vec<_> = rows
        .iter()
        .map(|r| {
            let mut info = json!(r.info());
            info["subscribers"] = followers.get(&r.name).copied().unwrap_or(0).into();
            info
        })
        .collect();
    Ok(Json(json!({ "streams": streams, "next_after_name": next.flatten() })).into_response())
}

/// Most `data` bytes in one JSON replay page.
const REPLAY_PAGE_BYTES: i64 = 16 << 20;

#[derive(Deserialize)]
struct ReadParams {
    after: Option<String>,
    limit: Option<i64>,
    since: Option<String>,
    compact: Option<String>,
}

async fn read_events(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Query(p): Query<ReadParams>,
    headers: HeaderMap,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let PageLimit(limit) = PageLimit::parse(p.limit, 100)?;
    let row = existing_stream(&app, &stream).await?;
    let after = match (p.after.as_deref(), p.since.as_deref()) {
        (Some(a), None) => Cursor::parse("after", a)?.0,
        (None, Some(s)) => store::cursor_at_time(&app.db, &row, Since::parse(s)?.0).await?,
        (None, None) => 0,
        (Some(_), Some(_)) => {
            return Err(Error::InvalidParameter(
                "give either after or since, not both".into(),
            ));
        }
    };
    let compact = params::flag("compact", p.compact.as_deref())?;
    if compact {
        compact::Surface::Rest.count_read();
    }
    if wants_ndjson(&headers) {
        return Ok(export(app, stream, row, after, compact));
    }
    if compact {
        // `limit` counts the events sent, a folded one as one.
        let limits = compacted_limits(&app, limit as usize, REPLAY_PAGE_BYTES as usize);
        let page = compact::read_page(&app.reader, &stream, &row, after, limits).await?;
        let envelopes = page.events.iter().map(|f| f.envelope.clone());
        return Ok(events_page(&stream, envelopes, page.next_after, &row));
    }
    // A page also ends at REPLAY_PAGE_BYTES of data (never before its first event): the page is
    // built in memory, and `limit` big events could otherwise take gigabytes. Clients page by
    // `next_after` until a page comes back empty, so a shorter page loses nothing.
    let need = page_need(&row, after, limit);
    let events = app
        .reader
        .page(row.id, after, row.head, need, limit, REPLAY_PAGE_BYTES)
        .await?
        .events;
    let next_after = events.last().map_or(after, |e| e.seq);
    let envelopes = events.iter().map(|ev| encode_envelope(stream.as_str(), ev));
    Ok(events_page(&stream, envelopes, next_after, &row))
}

/// What a compacted read may hold: `events` envelopes, about `bytes` bytes, reading the log in
/// the server's pages.
fn compacted_limits(app: &AppState, events: usize, bytes: usize) -> compact::PageLimits {
    compact::PageLimits {
        events,
        bytes,
        read: app.config.read_page,
        read_bytes: PAGE_BYTES,
    }
}

/// The JSON replay page: `{"stream","events":[…],"next_after","head","oldest_seq","closed"}`.
fn events_page(
    stream: &StreamName,
    envelopes: impl Iterator<Item = Bytes>,
    next_after: i64,
    row: &StreamRow,
) -> Response {
    // Envelopes are spliced in as encoded, so replay is byte-identical to live delivery.
    let mut body = BytesMut::with_capacity(4096);
    body.put_slice(b"{\"stream\":");
    body.put_slice(
        serde_json::to_string(stream.as_str())
            .unwrap_or_default()
            .as_bytes(),
    );
    body.put_slice(b",\"events\":[");
    for (i, envelope) in envelopes.enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(&envelope);
    }
    let tail = json!({
        "next_after": next_after,
        "head": row.head,
        "oldest_seq": row.trimmed_to + 1,
        "closed": row.closed,
    })
    .to_string();
    body.put_slice(b"],");
    body.put_slice(&tail.as_bytes()[1..]);
    ([(header::CONTENT_TYPE, "application/json")], body.freeze()).into_response()
}

/// The seq a page of up to `limit` events after `after` must be able to reach, of a stream
/// whose row the primary returned: its head, or `limit` seqs past the first retained event
/// after `after` if that comes first. A replica whose head has reached it holds at least one
/// event of the page if the primary does (so its page is never empty where the primary's
/// is not), and may serve the old part of a stream that is being appended to right now.
pub fn page_need(row: &StreamRow, after: i64, limit: i64) -> i64 {
    row.head
        .min(after.max(row.trimmed_to).saturating_add(limit.max(1)))
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/x-ndjson"))
}

/// Every event after `after` up to the head as of now, one envelope per line, read from the
/// log page by page so memory stays constant whatever the stream's length (compacted: one
/// envelope per run, see `live::compact`).
fn export(
    app: AppState,
    stream: StreamName,
    row: StreamRow,
    after: i64,
    compact: bool,
) -> Response {
    let page = app.config.read_page;
    let state = Some((app, after));
    let body = futures::stream::unfold(state, move |state| {
        let stream = stream.clone();
        let row = row.clone();
        async move {
            let (app, cursor) = state?;
            if cursor >= row.head {
                return None;
            }
            let read = async {
                if compact {
                    let limits = compacted_limits(&app, page as usize, PAGE_BYTES as usize);
                    let page =
                        compact::read_page(&app.reader, &stream, &row, cursor, limits).await?;
                    let envelopes: Vec<Bytes> =
                        page.events.iter().map(|f| f.envelope.clone()).collect();
                    Ok::<_, sqlx::Error>((envelopes, page.next_after))
                } else {
                    let need = page_need(&row, cursor, page);
                    let events = app
                        .reader
                        .page(row.id, cursor, row.head, need, page, PAGE_BYTES)
                        .await?
                        .events;
                    let next = events.last().map_or(cursor, |e| e.seq);
                    let envelopes = events
                        .iter()
                        .map(|ev| encode_envelope(stream.as_str(), ev))
                        .collect();
                    Ok((envelopes, next))
                }
            };
            match read.await {
                Ok((envelopes, _)) if envelopes.is_empty() => None,
                Ok((envelopes, next)) => {
                    let mut buf = BytesMut::new();
                    for envelope in &envelopes {
                        buf.put_slice(envelope);
                        buf.put_u8(b'\n');
                    }
                    Some((Ok::<Bytes, std::io::Error>(buf.freeze()), Some((app, next))))
                }
                Err(e) => {
                    // Headers are gone: the only honest signal left is an aborted body.
                    tracing::warn!(error = %e, "export aborted");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        }
    });
    let mut res = HttpBody::from_stream(body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    res
}

#[derive(Deserialize)]
struct SnapshotParams {
    compact: Option<String>,
}

async fn snapshot(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Query(p): Query<SnapshotParams>,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let compact = params::flag("compact", p.compact.as_deref())?;
    let row = existing_stream(&app, &stream).await?;
    let limit = app.config.max_snapshot_bytes;
    let too_large = || Error::SnapshotTooLarge { limit };
    let envelopes: Vec<Bytes> = if compact {
        // Each key's current message, folded (by key, as the latest events are).
        compact::Surface::Rest.count_read();
        let events = store::snapshot_messages(&app.db, row.id, row.head, limit)
            .await?
            .ok_or_else(too_large)?;
        compact::fold_snapshot(&stream, events, compact::Surface::Rest, |_| true)
            .iter()
            .map(|f| f.envelope.clone())
            .collect()
    } else {
        store::snapshot(&app.db, row.id, row.head, limit)
            .await?
            .ok_or_else(too_large)?
            .iter()
            .map(|ev| encode_envelope(stream.as_str(), ev))
            .collect()
    };
    let mut body = BytesMut::new();
    body.put_slice(b"{\"stream\":");
    body.put_slice(
        serde_json::to_string(stream.as_str())
            .unwrap_or_default()
            .as_bytes(),
    );
    body.put_slice(format!(",\"at\":{},\"events\":[", row.head).as_bytes());
    for (i, envelope) in envelopes.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(envelope);
    }
    body.put_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body.freeze()).into_response())
}
