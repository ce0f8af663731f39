//! GET (catch-up, long-poll, SSE) and HEAD on `/v1/stream/{name}`.
//!
//! Every read is a read of the log after an offset (a seq), up to the stream's tail; live
//! reads wait on a `Subscription` that starts at that seq, registered with the hub before
//! the log is read, so an append landing between the read and the wait still wakes it.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use chrono::Utc;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    find, find_any, format_offset, parse_offset, set, touch, Found, Offset, CLOSED, CURSOR,
    NEXT_OFFSET, UP_TO_DATE,
};
use crate::api::extract::Stream;
use crate::app::{AppState, ConnectionGuard, Transport};
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::live::subscription::PAGE_BYTES;
use crate::live::{Filter, Item, Start, Subscription};
use crate::log::model::TYPE_STREAM_CLOSED;
use crate::log::StreamName;

/// How long one SSE response lasts before the server ends it (the client reconnects from
/// its last offset); the protocol asks for about a minute, so that CDNs can collapse.
const SSE_LIFETIME: Duration = Duration::from_secs(60);
/// Cache-Control of catch-up chunks: the data at an offset never changes.
const CACHEABLE: &str = "public, max-age=60, stale-while-revalidate=300";

/// The query of a read: each parameter at most once, none empty.
struct ReadParams {
    offset: Option<Offset>,
    live: Option<Live>,
    cursor: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Live {
    LongPoll,
    Sse,
}

fn parse_params(uri: &Uri) -> Result<ReadParams> {
    let mut offset = None;
    let mut live = None;
    let mut cursor = None;
    let query = uri.query().unwrap_or_default();
    for (k, v) in url_pairs(query)? {
        let slot = match k.as_str() {
            "offset" => &mut offset,
            "live" => &mut live,
            "cursor" => &mut cursor,
            _ => continue,
        };
        if slot.is_some() {
            return Err(Error::InvalidParameter(format!(
                "{k} is given more than once"
            )));
        }
        *slot = Some(v);
    }
    let offset = match offset {
        None => None,
        Some(o) if o.is_empty() => {
            return Err(Error::InvalidParameter("offset must not be empty".into()))
        }
        Some(o) => Some(parse_offset(&o)?),
    };
    let live = match live.as_deref() {
        None => None,
        Some("long-poll") => Some(Live::LongPoll),
        Some("sse") => Some(Live::Sse),
        Some(other) => {
            let shown: String = other.chars().take(32).collect();
            return Err(Error::InvalidParameter(format!(
                "live must be long-poll or sse, not {shown:?}"
            )));
        }
    };
    if live.is_some() && offset.is_none() {
        return Err(Error::InvalidParameter(
            "live reads need an offset (-1 for the beginning, now for the tail)".into(),
        ));
    }
    Ok(ReadParams {
        offset,
        live,
        cursor,
    })
}

/// Decodes `a=b&c=d` (percent-encoding and `+`), keeping repeats so they can be refused.
fn url_pairs(query: &str) -> Result<Vec<(String, String)>> {
    let decode = |s: &str| -> Result<String> {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| Error::InvalidParameter("malformed percent-encoding".into()))?;
                out.push(hex);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out)
            .map_err(|_| Error::InvalidParameter("query parameters must be UTF-8".into()))
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// The data after a seq, up to the tail, as one response body.
struct Chunk {
    body: Vec<u8>,
    /// Messages (JSON) or appends (bytes) in it.
    count: usize,
    /// Seq of the last event in it (the requested seq when empty).
    next: i64,
}

/// Reads one page of the stream after `after`: JSON messages as their array elements, byte
/// payloads concatenated. `as_array` wraps JSON messages in `[...]`.
async fn read_chunk(app: &AppState, found: &Found, after: i64, as_array: bool) -> Result<Chunk> {
    let tail = found.tail();
    let json = found.is_json();
    let mut chunk = Chunk {
        body: Vec::new(),
        count: 0,
        next: after,
    };
    if let Some(row) = found.row.as_ref().filter(|_| after < tail) {
        let limit = app.config.read_page.max(1);
        let need = tail.min(after.max(row.trimmed_to).saturating_add(limit));
        let events = app
            .reader
            .page(row.id, after, tail, need, limit, PAGE_BYTES)
            .await?
            .events;
        for ev in events.iter().filter(|e| e.ty != TYPE_STREAM_CLOSED) {
            if json {
                if chunk.count > 0 {
                    chunk.body.push(b',');
                }
                chunk.body.extend_from_slice(ev.data.as_bytes());
            } else {
                match &ev.body {
                    Some(b) => chunk.body.extend_from_slice(b),
                    None => chunk.body.extend_from_slice(ev.data.as_bytes()),
                }
            }
            chunk.count += 1;
        }
        chunk.next = events.last().map_or(after, |e| e.seq);
    }
    if json && as_array {
        let mut body = Vec::with_capacity(chunk.body.len() + 2);
        body.push(b'[');
        body.extend_from_slice(&chunk.body);
        body.push(b']');
        chunk.body = body;
    }
    Ok(chunk)
}

/// The cursor of a live response (protocol section 10.1): the number of 20-second intervals
/// since 2024-10-09, and always past a cursor the client echoes.
fn live_cursor(client: Option<&str>) -> String {
    const EPOCH_S: i64 = 1_728_432_000;
    const INTERVAL_S: i64 = 20;
    let interval = (Utc::now().timestamp() - EPOCH_S) / INTERVAL_S;
    match client.and_then(|c| c.trim().parse::<i64>().ok()) {
        Some(c) if c >= interval => {
            // 1-3600 s of jitter, in whole intervals (at least one).
            let jitter = (uuid::Uuid::new_v4().as_u128() % 3600) as i64 + 1;
            (c + (jitter / INTERVAL_S).max(1)).to_string()
        }
        _ => interval.to_string(),
    }
}

fn after_of(offset: Option<Offset>, found: &Found) -> Result<i64> {
    let after = match offset.unwrap_or(Offset::Start) {
        Offset::Start => 0,
        Offset::Now => found.tail(),
        Offset::Seq(n) => n,
    };
    if after > found.tail() {
        return Err(Error::InvalidParameter(format!(
            "offset {} is past the stream's tail {}",
            format_offset(after),
            format_offset(found.tail())
        )));
    }
    // Retention removed what follows this offset: say so rather than skip it silently.
    if let Some(trimmed) = found.row.as_ref().map(|r| r.trimmed_to) {
        if after < trimmed {
            return Err(Error::OffsetGone {
                oldest: format_offset(trimmed),
            });
        }
    }
    Ok(after)
}

pub async fn read(
    State(app): State<AppState>,
    who: Principal,
    Stream(name): Stream,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response> {
    who.check(Grant::Read, &name)?;
    let params = parse_params(&uri)?;
    let found = find(&app, &name).await?;
    touch(&app, &found).await?;
    match params.live {
        None => catch_up(&app, &found, params.offset, &headers).await,
        Some(Live::LongPoll) => long_poll(&app, found, &params).await,
        Some(Live::Sse) => sse(app, &who, found, &params).await,
    }
}

/// Headers every data response carries.
fn data_headers(h: &mut HeaderMap, found: &Found, next: i64) {
    if let Ok(v) = HeaderValue::from_str(&found.ds.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    set(h, NEXT_OFFSET, &format_offset(next));
    if next >= found.tail() {
        set(h, UP_TO_DATE, "true");
        if found.closed() {
            set(h, CLOSED, "true");
        }
    }
}

async fn catch_up(
    app: &AppState,
    found: &Found,
    offset: Option<Offset>,
    headers: &HeaderMap,
) -> Result<Response> {
    let now = offset == Some(Offset::Now);
    let after = after_of(offset, found)?;
    let chunk = read_chunk(app, found, after, true).await?;
    let mut res = Response::new(HttpBody::from(chunk.body));
    let h = res.headers_mut();
    data_headers(h, found, chunk.next);
    if now {
        // The tail moves: never cache it, and no ETag (the protocol exempts `now`).
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(res);
    }
    let closed = found.closed() && chunk.next >= found.tail();
    let etag = format!(
        "\"{}:{}:{}{}\"",
        found.ds.name,
        after,
        chunk.next,
        if closed { ":c" } else { "" }
    );
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    set(h, "etag", &etag);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHEABLE));
    if matches {
        *res.body_mut() = HttpBody::empty();
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        res.headers_mut().remove(header::CONTENT_TYPE);
    }
    Ok(res)
}

/// 204 at the tail: nothing arrived in time, or the stream is closed (EOF).
fn no_content(found: &Found, next: i64, cursor: Option<&str>) -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    set(h, NEXT_OFFSET, &format_offset(next));
    set(h, UP_TO_DATE, "true");
    if found.closed() {
        set(h, CLOSED, "true");
    } else {
        set(h, CURSOR, &live_cursor(cursor));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn long_poll(app: &AppState, found: Found, params: &ReadParams) -> Result<Response> {
    let after = after_of(params.offset, &found)?;
    let cursor = params.cursor.as_deref();
    let name = StreamName::parse(&found.ds.name)?;
    // Registered before the log is read again below: see the module comment.
    let (mut sub, _) = Subscription::open(
        app.source(),
        name.clone(),
        Start::After(after),
        Filter::default(),
        false,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_millis(app.config.ds_long_poll_ms);
    let mut found = found;
    loop {
        if after < found.tail() {
            let chunk = read_chunk(app, &found, after, true).await?;
            let mut res = Response::new(HttpBody::from(chunk.body));
            let h = res.headers_mut();
            data_headers(h, &found, chunk.next);
            set(h, CURSOR, &live_cursor(cursor));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHEABLE));
            return Ok(res);
        }
        if found.closed() {
            return Ok(no_content(&found, after, cursor));
        }
        tokio::select! {
            item = sub.next() => match item {
                Some(Ok(Item::Event(_))) => {}
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
                // The stream was deleted (or the hub is shutting down): look again.
                None => {}
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(no_content(&found, after, cursor)),
            _ = app.shutdown.cancelled() => return Ok(no_content(&found, after, cursor)),
        }
        found = find(app, &name).await?;
    }
}

/// The stream as SSE `data` and `control` events (protocol section 5.8).
async fn sse(
    app: AppState,
    who: &Principal,
    found: Found,
    params: &ReadParams,
) -> Result<Response> {
    let after = after_of(params.offset, &found)?;
    let name = StreamName::parse(&found.ds.name)?;
    let (sub, _) = Subscription::open(
        app.source(),
        name.clone(),
        Start::After(after),
        Filter::default(),
        false,
    )
    .await?;
    let media = super::media_type(&found.ds.content_type);
    let base64 = !(media.starts_with("text/") || media == "application/json");
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let follower = crate::api::presence::follow(&app, who, &name, "durable", None);
    let task = SseTask {
        app: app.clone(),
        name,
        sub,
        after,
        cursor: params.cursor.clone(),
        base64,
        tx,
        _conn: ConnectionGuard::new(&app, Transport::Sse),
        _follower: follower,
    };
    tokio::spawn(task.run(found));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut res = Response::new(HttpBody::from_stream(body));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if base64 {
        set(h, "stream-sse-data-encoding", "base64");
    }
    Ok(res)
}

struct SseTask {
    app: AppState,
    name: StreamName,
    sub: Subscription,
    after: i64,
    cursor: Option<String>,
    base64: bool,
    tx: mpsc::Sender<Bytes>,
    _conn: ConnectionGuard,
    _follower: crate::live::presence::PresenceGuard,
}

impl SseTask {
    async fn run(mut self, mut found: Found) {
        let end = Instant::now() + SSE_LIFETIME;
        let mut sent_control = false;
        loop {
            // Everything up to the tail, a page at a time, each page with its control event.
            let mut sent = false;
            while self.after < found.tail() {
                let chunk = match read_chunk(&self.app, &found, self.after, true).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "durable streams SSE read failed");
                        return;
                    }
                };
                if chunk.next <= self.after {
                    break;
                }
                self.after = chunk.next;
                if !self.send_data(&chunk.body).await || !self.send_control(&found).await {
                    return;
                }
                sent = true;
                sent_control = true;
                if found.closed() && self.after >= found.tail() {
                    return;
                }
            }
            if !sent && (!sent_control || found.closed()) {
                if !self.send_control(&found).await || found.closed() {
                    return;
                }
                sent_control = true;
            }
            tokio::select! {
                item = self.sub.next() => match item {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "durable streams SSE subscription failed");
                        return;
                    }
                    None => {}
                },
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep_until(end) => return,
                _ = self.app.shutdown.cancelled() => return,
            }
            found = match find_any(&self.app, &self.name).await {
                Ok(Some(f)) if !f.ds.deleted => f,
                _ => return,
            };
        }
    }

    async fn send_data(&self, payload: &[u8]) -> bool {
        let mut buf = BytesMut::with_capacity(payload.len() + 32);
        buf.put_slice(b"event: data\n");
        if self.base64 {
            buf.put_slice(b"data:");
            buf.put_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(payload)
                    .as_bytes(),
            );
            buf.put_u8(b'\n');
        } else {
            put_data_lines(&mut buf, payload);
        }
        buf.put_u8(b'\n');
        self.tx.send(buf.freeze()).await.is_ok()
    }

    async fn send_control(&self, found: &Found) -> bool {
        let up_to_date = self.after >= found.tail();
        let mut control = json!({ "streamNextOffset": format_offset(self.after) });
        if up_to_date && found.closed() {
            control["streamClosed"] = json!(true);
            control["upToDate"] = json!(true);
        } else {
            control["streamCursor"] = json!(live_cursor(self.cursor.as_deref()));
            if up_to_date {
                control["upToDate"] = json!(true);
            }
        }
        let mut buf = BytesMut::new();
        buf.put_slice(b"event: control\ndata:");
        buf.put_slice(control.to_string().as_bytes());
        buf.put_slice(b"\n\n");
        self.tx.send(buf.freeze()).await.is_ok()
    }
}

/// Writes a payload as SSE `data:` lines, one per line of it (any of `\n`, `\r\n`, `\r`
/// ends a line, so no payload can end the event or start another). `data:` is followed by
/// the line itself, with a space in between only when the line starts with one (a parser
/// drops one leading space).
fn put_data_lines(buf: &mut BytesMut, payload: &[u8]) {
    let mut rest = payload;
    loop {
        let end = rest.iter().position(|b| *b == b'\n' || *b == b'\r');
        let line = &rest[..end.unwrap_or(rest.len())];
        buf.put_slice(b"data:");
        if line.first() == Some(&b' ') {
            buf.put_u8(b' ');
        }
        buf.put_slice(line);
        buf.put_u8(b'\n');
        let Some(i) = end else { return };
        let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[i + skip..];
    }
}

pub async fn head(
    State(app): State<AppState>,
    who: Principal,
    Stream(name): Stream,
) -> Result<Response> {
    who.check(Grant::Read, &name)?;
    let found = find(&app, &name).await?;
    let mut res = StatusCode::OK.into_response();
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&found.ds.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    set(h, NEXT_OFFSET, &format_offset(found.tail()));
    if let Some(ttl) = found.ds.ttl_s {
        set(h, "stream-ttl", &ttl.to_string());
    }
    if let Some(at) = found.ds.expires_at {
        set(h, "stream-expires-at", &crate::log::model::format_time(&at));
    }
    if found.closed() {
        set(h, CLOSED, "true");
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_lines_split_every_line_break_and_keep_leading_spaces() {
        let mut buf = BytesMut::new();
        put_data_lines(&mut buf, b"a\r\n\r\nevent: x\r b\nc");
        assert_eq!(
            &buf[..],
            b"data:a\ndata:\ndata:event: x\ndata:  b\ndata:c\n"
        );
    }
}
