//! The Durable Streams protocol (ElectricSQL's HTTP protocol for resumable streams) at
//! `/v1/stream/{name}`: a view of the same log as tailcast's own surfaces.
//!
//! A Durable Streams stream is an ordinary stream of the log. Each JSON message (a POST body,
//! or each element of a POSTed array) is one event of type `message` whose `data` is the
//! message as sent; each byte-mode POST is one event of type `bytes` whose payload is kept
//! in `events.body` exactly as received. An offset is the seq of the last event read,
//! zero-padded so that offsets sort as strings; closing appends the log's `stream.closed`
//! event, which the protocol never shows. Appends go through the appender (its idempotency
//! ids make producer retries duplicates); reads go through the store's readers, and live
//! reads wait on a `Subscription`. What the protocol adds to a stream (content type, expiry,
//! fork origin, soft deletion, producer state) lives in `ds_streams` / `ds_producers`
//! (`log::durable`), so every node sees it. See docs/durable-streams.md.
//!
//! `write` holds PUT, POST and DELETE; `read` holds GET (catch-up, long-poll, SSE) and HEAD.

mod read;
mod write;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Extension, Router};
use chrono::Utc;

use crate::app::AppState;
use crate::error::{Error, Result};
use crate::log::durable::{self as ds, DsStream};
use crate::log::store::StreamRow;
use crate::log::StreamName;

pub const NEXT_OFFSET: &str = "stream-next-offset";
pub const UP_TO_DATE: &str = "stream-up-to-date";
pub const CLOSED: &str = "stream-closed";
pub const CURSOR: &str = "stream-cursor";

/// Every header the protocol defines, for CORS (`Access-Control-Allow-Headers` and
/// `-Expose-Headers`): browsers hide response headers that are not exposed.
const PROTOCOL_HEADERS: &str = "content-type, authorization, stream-next-offset, \
    stream-up-to-date, stream-closed, stream-cursor, stream-ttl, stream-expires-at, stream-seq, \
    stream-forked-from, stream-fork-offset, stream-fork-sub-offset, producer-id, \
    producer-epoch, producer-seq, producer-expected-seq, producer-received-seq, \
    stream-sse-data-encoding, etag, if-none-match, location, cache-control, last-event-id";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/stream/{stream}",
            put(write::create)
                .post(write::append)
                .get(read::read)
                .head(read::head)
                .delete(write::delete)
                .options(preflight),
        )
        .layer(middleware::from_fn(protocol_headers))
        .layer(Extension(Locks::default()))
}

/// The security and CORS headers the protocol asks of every response, errors included.
async fn protocol_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(PROTOCOL_HEADERS),
    );
    res
}

/// CORS preflight: any origin, the protocol's methods and headers.
async fn preflight() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, PUT, POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(PROTOCOL_HEADERS),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    res
}

/// Per-node serialisation of the writes whose checks read state the append then moves on
/// (`Stream-Seq`, producer seqs): "validate, append, record" runs one at a time per key, as
/// the protocol requires. Across nodes, the producer's event ids still make a racing retry
/// a duplicate (see `write`).
#[derive(Clone, Default)]
pub struct Locks(Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl Locks {
    pub async fn lock(&self, key: String) -> LockGuard {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = m.clone().lock_owned().await;
        LockGuard {
            locks: self.clone(),
            key,
            _guard: Some(guard),
        }
    }
}

pub struct LockGuard {
    locks: Locks,
    key: String,
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self._guard.take();
        let mut map = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        // Nobody else holds or waits for it: forget it, so the map stays small.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// An offset as a reader sends it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offset {
    /// `-1` or no offset: the beginning.
    Start,
    /// `now`: the current tail.
    Now,
    /// After this seq.
    Seq(i64),
}

/// Digits in each half of an offset: a fixed width, so offsets sort as strings.
const OFFSET_DIGITS: usize = 16;
/// Largest seq an offset can carry (16 decimal digits).
const MAX_OFFSET_SEQ: i64 = 9_999_999_999_999_999;

/// `0000000000000000_{seq}`: the shape of the reference server's offsets (whose zero offset
/// the conformance suite writes out), with the seq, zero-padded, in the second half. The
/// first half is reserved (always zero).
pub fn format_offset(seq: i64) -> String {
    format!(
        "{:0w$}_{:0w$}",
        0,
        seq.clamp(0, MAX_OFFSET_SEQ),
        w = OFFSET_DIGITS
    )
}

/// Parses an offset token: `-1`, `now`, or one this server minted.
pub fn parse_offset(raw: &str) -> Result<Offset> {
    let digits = |s: &str| s.len() == OFFSET_DIGITS && s.bytes().all(|b| b.is_ascii_digit());
    match raw {
        "-1" => Ok(Offset::Start),
        "now" => Ok(Offset::Now),
        _ => match raw.split_once('_') {
            Some((epoch, seq))
                if digits(epoch) && digits(seq) && epoch.bytes().all(|b| b == b'0') =>
            {
                seq.parse::<i64>()
                    .map(Offset::Seq)
                    .map_err(|_| bad_offset(raw))
            }
            _ => Err(bad_offset(raw)),
        },
    }
}

fn bad_offset(raw: &str) -> Error {
    let shown: String = raw.chars().take(40).collect();
    Error::InvalidParameter(format!(
        "offset {shown:?} is not an offset this server issued (nor -1 or now)"
    ))
}

/// The part of a content type that decides the stream's mode, lowercased: `application/json`
/// from `Application/JSON; charset=utf-8`.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

pub fn is_json(content_type: &str) -> bool {
    media_type(content_type) == "application/json"
}

/// A header's value as text, if present (and 400 if it is not visible ASCII).
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            Error::InvalidParameter(format!("the {name} header must be visible ASCII"))
        }),
    }
}

/// `Stream-Closed: true` (any case) is a close; any other value is no header at all.
pub fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get(CLOSED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// A Durable Streams stream as a request finds it.
#[derive(Debug, Clone)]
pub struct Found {
    pub ds: DsStream,
    /// The log's row; None while nothing was ever appended.
    pub row: Option<StreamRow>,
}

impl Found {
    /// The seq of the last data event: the head, less the `stream.closed` event that is
    /// always a closed stream's last.
    pub fn tail(&self) -> i64 {
        match &self.row {
            Some(r) if r.closed => r.head - 1,
            Some(r) => r.head,
            None => 0,
        }
    }

    pub fn closed(&self) -> bool {
        self.row.as_ref().is_some_and(|r| r.closed)
    }

    pub fn is_json(&self) -> bool {
        is_json(&self.ds.content_type)
    }
}

/// Looks a stream up for a client request: 404 if missing or expired (an expired stream is
/// removed on the way), 410 if soft-deleted.
pub async fn find(app: &AppState, name: &StreamName) -> Result<Found> {
    let found = find_any(app, name).await?;
    match found {
        Some(f) if f.ds.deleted => Err(Error::StreamGone(name.to_string())),
        Some(f) => Ok(f),
        None => Err(Error::StreamNotFound(name.to_string())),
    }
}

/// Like [`find`], but a soft-deleted stream is returned (fork creation and deletion need it).
pub async fn find_any(app: &AppState, name: &StreamName) -> Result<Option<Found>> {
    let Some((ds, row)) = ds::stream_with_row(&app.db, name.as_str()).await? else {
        return Ok(None);
    };
    if !ds.deleted && ds.expired(Utc::now()) {
        write::remove_stream(app, name).await?;
        return Ok(None);
    }
    Ok(Some(Found { ds, row }))
}

/// Restarts a stream's sliding TTL (only streams that have one pay for the write).
pub async fn touch(app: &AppState, found: &Found) -> Result<()> {
    if found.ds.ttl_s.is_some() {
        ds::touch(&app.db, &found.ds.name, Utc::now()).await?;
    }
    Ok(())
}

/// An error answer with the protocol's headers added (`Stream-Closed`, producer state...).
pub fn error_with(e: Error, extra: &[(&'static str, String)]) -> Response {
    let mut res = e.into_response();
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            res.headers_mut().insert(HeaderName::from_static(name), v);
        }
    }
    res
}

pub fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_as_strings_and_parse_back() {
        let seqs = [0, 9, 10, 99, 100, MAX_OFFSET_SEQ];
        let offs: Vec<String> = seqs.into_iter().map(format_offset).collect();
        let mut sorted = offs.clone();
        sorted.sort();
        assert_eq!(offs, sorted);
        assert_eq!(offs[0], "0000000000000000_0000000000000000");
        for (o, n) in offs.iter().zip(seqs) {
            assert_eq!(parse_offset(o).unwrap(), Offset::Seq(n));
        }
        assert_eq!(parse_offset("-1").unwrap(), Offset::Start);
        assert_eq!(parse_offset("now").unwrap(), Offset::Now);
        for bad in [
            "",
            "12",
            "abc",
            "0,1",
            "-2",
            &"9".repeat(19),
            &"0".repeat(20),
        ] {
            assert!(parse_offset(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn media_types_ignore_case_and_parameters() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("application/jsonl"));
        assert_eq!(media_type(" text/Plain ;x=y"), "text/plain");
    }
}
