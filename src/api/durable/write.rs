//! PUT (create, fork), POST (append, close) and DELETE on `/v1/stream/{name}`.
//!
//! Every event is written by the appender. An idempotent producer's events carry event ids
//! derived from `(Producer-Id, Producer-Epoch, Producer-Seq)`: the `ds_producers` row is
//! only the fast path for the protocol's epoch and gap checks, and if it lags behind the
//! log (a crash between the append and its update), a retry is still a duplicate in the
//! appender, never a second copy.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::{
    error_with, find, find_any, format_offset, header_str, is_json, media_type, parse_offset, set,
    touch, wants_close, Found, Locks, Offset, CLOSED, NEXT_OFFSET,
};
use crate::api::extract::{Body, Stream};
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::live::subscription::PAGE_BYTES;
use crate::log::durable::{self as ds, DsStream};
use crate::log::model::{DEFAULT_TYPE, TYPE_STREAM_CLOSED};
use crate::log::store;
use crate::log::{AppendSpec, NewEvent, StreamName};

/// Event type of a byte-mode append.
const TYPE_BYTES: &str = "bytes";
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
/// Event ids of producer appends start with this; a fork does not copy them (producer state
/// is not inherited).
const PRODUCER_ID_PREFIX: &str = "ds:p:";
/// Largest producer epoch or seq: 2^53 - 1, what JavaScript numbers hold exactly.
const MAX_PRODUCER_NUMBER: i64 = (1 << 53) - 1;

/// Removes a stream for good: its events, then its protocol rows.
pub async fn remove_stream(app: &AppState, name: &StreamName) -> Result<()> {
    if store::delete_stream(&app.db, name.as_str(), &app.node_id).await? {
        app.hub.deleted(name);
    }
    ds::remove(&app.db, name.as_str()).await?;
    Ok(())
}

/// `Stream-TTL`: a non-negative integer without sign, leading zeros or exponent.
fn parse_ttl(raw: &str) -> Result<i64> {
    let ok = !raw.is_empty()
        && raw.bytes().all(|b| b.is_ascii_digit())
        && (raw == "0" || !raw.starts_with('0'));
    ok.then(|| raw.parse::<i64>().ok())
        .flatten()
        .ok_or_else(|| {
            Error::InvalidParameter(format!(
                "Stream-TTL must be a whole number of seconds (like 3600), not {:?}",
                raw.chars().take(32).collect::<String>()
            ))
        })
}

fn parse_expires(raw: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            Error::InvalidParameter(format!(
                "Stream-Expires-At must be an RFC 3339 time, not {:?}",
                raw.chars().take(40).collect::<String>()
            ))
        })
}

fn parse_count(what: &str, raw: &str) -> Result<i64> {
    let ok = !raw.is_empty() && raw.len() <= 16 && raw.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| raw.parse::<i64>().ok())
        .flatten()
        .filter(|n| *n <= MAX_PRODUCER_NUMBER)
        .ok_or_else(|| {
            Error::InvalidParameter(format!(
                "{what} must be a non-negative integer up to 2^53-1, not {:?}",
                raw.chars().take(32).collect::<String>()
            ))
        })
}

/// `(Producer-Id, Producer-Epoch, Producer-Seq)`: all three or none.
#[derive(Debug, Clone)]
struct Producer {
    id: String,
    epoch: i64,
    seq: i64,
}

impl Producer {
    fn from_headers(headers: &HeaderMap) -> Result<Option<Producer>> {
        let id = header_str(headers, "producer-id")?;
        let epoch = header_str(headers, "producer-epoch")?;
        let seq = header_str(headers, "producer-seq")?;
        match (id, epoch, seq) {
            (None, None, None) => Ok(None),
            (Some(id), Some(epoch), Some(seq)) => {
                if id.is_empty() || id.len() > 200 {
                    return Err(Error::InvalidParameter(
                        "Producer-Id must be 1-200 characters".into(),
                    ));
                }
                Ok(Some(Producer {
                    id: id.to_owned(),
                    epoch: parse_count("Producer-Epoch", epoch)?,
                    seq: parse_count("Producer-Seq", seq)?,
                }))
            }
            _ => Err(Error::InvalidParameter(
                "Producer-Id, Producer-Epoch and Producer-Seq go together: send all three or none"
                    .into(),
            )),
        }
    }

    fn tag(&self) -> String {
        format!("{}\n{}\n{}", self.id, self.epoch, self.seq)
    }

    fn event_id(&self, i: usize) -> String {
        format!(
            "{PRODUCER_ID_PREFIX}{}:{}:{}:{i}",
            self.id, self.epoch, self.seq
        )
    }

    fn headers(&self, seq: i64) -> Vec<(&'static str, String)> {
        vec![
            ("producer-epoch", self.epoch.to_string()),
            ("producer-seq", seq.to_string()),
        ]
    }
}

/// A POST or PUT body as events: JSON messages (one level of array flattened) or one byte
/// payload.
fn body_events(
    app: &AppState,
    content_type: &str,
    body: &Bytes,
    allow_empty_array: bool,
) -> Result<Vec<NewEvent>> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    if !is_json(content_type) {
        return Ok(vec![NewEvent {
            ty: TYPE_BYTES.into(),
            data: "null".into(),
            id: None,
            key: None,
            body: Some(body.to_vec()),
            by: None,
            append: false,
        }]);
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| Error::InvalidJson("the body is not UTF-8 JSON".into()))?;
    let value: &RawValue = serde_json::from_str(text)
        .map_err(|e| Error::InvalidJson(format!("the body is not valid JSON: {e}")))?;
    let messages: Vec<&RawValue> = if value.get().starts_with('[') {
        serde_json::from_str(value.get())
            .map_err(|e| Error::InvalidJson(format!("the body is not valid JSON: {e}")))?
    } else {
        vec![value]
    };
    if messages.is_empty() && !allow_empty_array {
        return Err(Error::EmptyBatch);
    }
    let limits = app.limits();
    if messages.len() > limits.max_batch_events {
        return Err(Error::BatchTooLarge {
            count: messages.len(),
            limit: limits.max_batch_events,
        });
    }
    messages
        .into_iter()
        .map(|m| {
            if m.get().len() > limits.max_event_bytes {
                return Err(Error::EventTooLarge {
                    size: m.get().len(),
                    limit: limits.max_event_bytes,
                });
            }
            Ok(NewEvent {
                ty: DEFAULT_TYPE.into(),
                data: m.get().to_owned(),
                id: None,
                key: None,
                body: None,
                by: None,
                append: false,
            })
        })
        .collect()
}

fn closed_event() -> NewEvent {
    NewEvent {
        ty: TYPE_STREAM_CLOSED.into(),
        data: "{}".into(),
        id: None,
        key: None,
        body: None,
        by: None,
        append: false,
    }
}

/// The fork a PUT asks for.
struct ForkRequest {
    source: StreamName,
    offset: Option<i64>,
    sub: i64,
}

fn fork_request(headers: &HeaderMap) -> Result<Option<ForkRequest>> {
    let from = header_str(headers, "stream-forked-from")?;
    let offset = header_str(headers, "stream-fork-offset")?;
    let sub = header_str(headers, "stream-fork-sub-offset")?;
    let Some(from) = from else {
        if offset.is_some() || sub.is_some() {
            return Err(Error::InvalidParameter(
                "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From".into(),
            ));
        }
        return Ok(None);
    };
    let path = from.split(['?', '#']).next().unwrap_or_default();
    let raw = path
        .rsplit_once("/v1/stream/")
        .map_or(path, |(_, name)| name)
        .trim_start_matches('/');
    let source = StreamName::parse(raw)?;
    let offset = match offset {
        None => None,
        Some(o) => match parse_offset(o)? {
            Offset::Start => Some(0),
            Offset::Seq(n) => Some(n),
            Offset::Now => None,
        },
    };
    let sub = match sub {
        None => 0,
        Some(s) => parse_count("Stream-Fork-Sub-Offset", s)?,
    };
    if sub > 0 && offset.is_none() {
        return Err(Error::InvalidParameter(
            "Stream-Fork-Sub-Offset needs Stream-Fork-Offset".into(),
        ));
    }
    Ok(Some(ForkRequest {
        source,
        offset,
        sub,
    }))
}

/// The configuration a PUT asks for, compared with an existing stream's.
struct CreateRequest {
    content_type: Option<String>,
    ttl_s: Option<i64>,
    expires_at: Option<DateTime<Utc>>,
    closed: bool,
    fork: Option<ForkRequest>,
}

fn create_request(headers: &HeaderMap) -> Result<CreateRequest> {
    let ttl_s = header_str(headers, "stream-ttl")?
        .map(parse_ttl)
        .transpose()?;
    let expires_at = header_str(headers, "stream-expires-at")?
        .map(parse_expires)
        .transpose()?;
    if ttl_s.is_some() && expires_at.is_some() {
        return Err(Error::InvalidParameter(
            "give Stream-TTL or Stream-Expires-At, not both".into(),
        ));
    }
    Ok(CreateRequest {
        content_type: header_str(headers, "content-type")?.map(str::to_owned),
        ttl_s,
        expires_at,
        closed: wants_close(headers),
        fork: fork_request(headers)?,
    })
}

fn same_config(req: &CreateRequest, found: &Found) -> bool {
    let ds = &found.ds;
    let ct = req
        .content_type
        .clone()
        .or_else(|| req.fork.as_ref().map(|_| ds.content_type.clone()))
        .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.into());
    let fork_ok = match (&req.fork, &ds.fork_of) {
        (None, None) => true,
        (Some(f), Some(of)) => {
            f.source.as_str() == of
                && f.offset.is_none_or(|o| Some(o) == fork_anchor(ds))
                && f.sub == ds.fork_sub.unwrap_or(0)
        }
        _ => false,
    };
    media_type(&ct) == media_type(&ds.content_type)
        && (req.fork.is_some() || (req.ttl_s == ds.ttl_s && req.expires_at == ds.expires_at))
        && req.closed == found.closed()
        && fork_ok
}

/// The offset a fork was requested at: the seq it inherited through, less its sub-offset
/// (JSON: that many messages; bytes: the one partial append).
fn fork_anchor(ds: &DsStream) -> Option<i64> {
    let seq = ds.fork_seq?;
    let sub = ds.fork_sub.unwrap_or(0);
    if is_json(&ds.content_type) {
        Some(seq - sub)
    } else {
        Some(seq - i64::from(sub > 0))
    }
}

fn created_headers(res: &mut Response, content_type: &str, tail: i64, closed: bool) {
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    set(h, NEXT_OFFSET, &format_offset(tail));
    if closed {
        set(h, CLOSED, "true");
    }
}

pub async fn create(
    State(app): State<AppState>,
    who: Principal,
    Stream(name): Stream,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Write, &name)?;
    let req = create_request(&headers)?;
    // Two rounds at most: a concurrent creator may win the insert below.
    for _ in 0..2 {
        if let Some(found) = find_any(&app, &name).await? {
            if found.ds.deleted {
                return Err(Error::StreamExists(format!(
                    "stream {:?} was deleted and forks still read from it; its name cannot be \
                     reused until they are gone",
                    name.as_str()
                )));
            }
            if !same_config(&req, &found) {
                return Err(Error::StreamExists(format!(
                    "stream {:?} exists with another configuration",
                    name.as_str()
                )));
            }
            let mut res = StatusCode::OK.into_response();
            created_headers(
                &mut res,
                &found.ds.content_type,
                found.tail(),
                found.closed(),
            );
            return Ok(res);
        }
        if store::stream(&app.db, name.as_str()).await?.is_some() {
            return Err(Error::StreamExists(format!(
                "a tailcast stream named {:?} exists; Durable Streams streams are created by PUT",
                name.as_str()
            )));
        }
        let mut row = DsStream {
            name: name.to_string(),
            content_type: req
                .content_type
                .clone()
                .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.into()),
            ttl_s: req.ttl_s,
            expires_at: req.expires_at,
            fork_of: None,
            fork_seq: None,
            fork_sub: None,
            deleted: false,
            writer_seq: None,
            closed_by: None,
            accessed_at: Utc::now(),
            created_at: Utc::now(),
        };
        let fork = match &req.fork {
            Some(f) => Some(plan_fork(&app, f, &req, &mut row).await?),
            None => None,
        };
        let mut events = body_events(&app, &row.content_type, &body, true)?;
        if !ds::insert(&app.db, &row).await? {
            continue;
        }
        let written = async {
            if let Some(fork) = &fork {
                copy_fork(&app, &name, fork).await?;
            }
            if req.closed {
                events.push(closed_event());
            }
            // Authored by the caller: the fork's copies above keep their own authors.
            for ev in &mut events {
                ev.by = who.subject().map(str::to_owned);
            }
            if !events.is_empty() {
                let spec = AppendSpec {
                    stream: name.clone(),
                    events,
                    expected_seq: None,
                    close: req.closed,
                };
                app.appender.append(spec).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = written {
            // Leave nothing half-made behind.
            if let Err(cleanup) = remove_stream(&app, &name).await {
                tracing::warn!(error = %cleanup, stream = %name, "removing a failed create");
            }
            return Err(e);
        }
        let found = find(&app, &name).await?;
        let mut res = StatusCode::CREATED.into_response();
        created_headers(
            &mut res,
            &found.ds.content_type,
            found.tail(),
            found.closed(),
        );
        // Absolute, as the protocol asks: the scheme a proxy in front reports, else http.
        let host = header_str(&headers, "host")?.unwrap_or("localhost");
        let scheme = match header_str(&headers, "x-forwarded-proto")? {
            Some("https") => "https",
            _ => "http",
        };
        if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}/v1/stream/{name}")) {
            res.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(res);
    }
    Err(Error::StreamExists(format!(
        "stream {:?} is being created concurrently",
        name.as_str()
    )))
}

/// What a fork copies from its source: events `1..=through` as they are, then (for a byte
/// sub-offset) the first `partial_bytes` of the next one.
struct ForkPlan {
    source_id: Option<i64>,
    through: i64,
    partial: Option<(i64, usize)>,
}

async fn plan_fork(
    app: &AppState,
    f: &ForkRequest,
    req: &CreateRequest,
    row: &mut DsStream,
) -> Result<ForkPlan> {
    let Some(source) = find_any(app, &f.source).await? else {
        return Err(Error::StreamNotFound(f.source.to_string()));
    };
    if source.ds.deleted {
        return Err(Error::StreamExists(format!(
            "the source stream {:?} was deleted",
            f.source.as_str()
        )));
    }
    match &req.content_type {
        Some(ct) if media_type(ct) != media_type(&source.ds.content_type) => {
            return Err(Error::ContentTypeMismatch(format!(
                "a fork has its source's content type {:?}",
                source.ds.content_type
            )))
        }
        Some(_) => {}
        None => row.content_type = source.ds.content_type.clone(),
    }
    if req.ttl_s.is_none() && req.expires_at.is_none() {
        row.ttl_s = source.ds.ttl_s;
        row.expires_at = source.ds.expires_at;
    }
    let tail = source.tail();
    let anchor = f.offset.unwrap_or(tail);
    if anchor > tail {
        return Err(Error::InvalidParameter(format!(
            "Stream-Fork-Offset {} is past the source's tail {}",
            format_offset(anchor),
            format_offset(tail)
        )));
    }
    if source.row.as_ref().is_some_and(|r| r.trimmed_to > 0) {
        return Err(Error::InvalidParameter(
            "the source stream's oldest events were removed by retention; it cannot be forked"
                .into(),
        ));
    }
    let source_id = source.row.as_ref().map(|r| r.id);
    let mut plan = ForkPlan {
        source_id,
        through: anchor,
        partial: None,
    };
    if f.sub > 0 {
        if source.is_json() {
            if anchor + f.sub > tail {
                return Err(Error::InvalidParameter(format!(
                    "Stream-Fork-Sub-Offset {} is past the source's last message",
                    f.sub
                )));
            }
            plan.through = anchor + f.sub;
        } else {
            let next = match source_id {
                Some(id) if anchor < tail => {
                    store::read_events_bounded(&app.db, id, anchor, anchor + 1, 1, PAGE_BYTES)
                        .await?
                }
                _ => Vec::new(),
            };
            let len = next
                .first()
                .map_or(0, |e| e.body.as_ref().map_or(e.data.len(), Vec::len));
            if f.sub as usize > len {
                return Err(Error::InvalidParameter(format!(
                    "Stream-Fork-Sub-Offset {} is past the end of the next append ({len} bytes)",
                    f.sub
                )));
            }
            if (f.sub as usize) < len {
                plan.partial = Some((anchor + 1, f.sub as usize));
            } else {
                plan.through = anchor + 1;
            }
        }
    }
    row.fork_of = Some(f.source.to_string());
    row.fork_seq = Some(plan.through + i64::from(plan.partial.is_some()));
    row.fork_sub = Some(f.sub);
    Ok(plan)
}

/// Appends the source's events to the new fork, page by page, keeping their seqs (the fork
/// starts empty, and each page is appended only at the head the previous one left).
async fn copy_fork(app: &AppState, name: &StreamName, plan: &ForkPlan) -> Result<()> {
    let Some(source_id) = plan.source_id else {
        return Ok(());
    };
    let upto = plan.through + i64::from(plan.partial.is_some());
    let mut after = 0;
    while after < upto {
        let page = store::read_events_bounded(
            &app.db,
            source_id,
            after,
            upto,
            app.config.read_page.max(1),
            PAGE_BYTES,
        )
        .await?;
        let Some(last) = page.last().map(|e| e.seq) else {
            break;
        };
        let events = page
            .into_iter()
            .filter(|e| e.ty != TYPE_STREAM_CLOSED)
            .map(|e| {
                let mut body = e.body;
                let mut data = e.data;
                if let Some((_, len)) = plan.partial.filter(|(seq, _)| *seq == e.seq) {
                    match &mut body {
                        Some(b) => b.truncate(len),
                        None => {
                            body = Some(data.as_bytes()[..len].to_vec());
                            data = "null".into();
                        }
                    }
                }
                NewEvent {
                    ty: e.ty,
                    data,
                    id: e.id.filter(|id| !id.starts_with(PRODUCER_ID_PREFIX)),
                    key: e.key,
                    body,
                    // A fork's copies keep who wrote the originals.
                    by: e.by,
                    append: e.append,
                }
            })
            .collect();
        let spec = AppendSpec {
            stream: name.clone(),
            events,
            expected_seq: Some(after),
            close: false,
        };
        app.appender.append(spec).await?;
        after = last;
    }
    Ok(())
}

pub async fn append(
    State(app): State<AppState>,
    Extension(locks): Extension<Locks>,
    who: Principal,
    Stream(name): Stream,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Write, &name)?;
    let close = wants_close(&headers);
    let producer = Producer::from_headers(&headers)?;
    let writer_seq = header_str(&headers, "stream-seq")?.map(str::to_owned);
    if body.is_empty() && !close {
        return Err(Error::InvalidParameter(
            "an append needs a body (only a close, Stream-Closed: true, may be empty)".into(),
        ));
    }
    // "Check, append, record" one at a time per writer: see `Locks`.
    let _seq_guard = match &writer_seq {
        Some(_) => Some(locks.lock(format!("{name}\0seq")).await),
        None => None,
    };
    let _producer_guard = match &producer {
        Some(p) => Some(locks.lock(format!("{name}\0p\0{}", p.id)).await),
        None => None,
    };
    let found = find(&app, &name).await?;
    let closed_headers = |found: &Found| {
        vec![
            (CLOSED, "true".to_owned()),
            (NEXT_OFFSET, format_offset(found.tail())),
        ]
    };
    if found.closed() {
        if let Some(p) = &producer {
            if found.ds.closed_by.as_deref() == Some(p.tag().as_str()) {
                let mut extra = closed_headers(&found);
                extra.extend(p.headers(p.seq));
                return Ok(no_content_with(&extra));
            }
        }
        if body.is_empty() {
            return Ok(no_content_with(&closed_headers(&found)));
        }
        return Ok(error_with(
            Error::StreamClosed { head: found.tail() },
            &closed_headers(&found),
        ));
    }
    if !body.is_empty() {
        match header_str(&headers, "content-type")? {
            None => {
                return Err(Error::InvalidParameter(
                    "an append with a body needs a Content-Type".into(),
                ))
            }
            Some(ct) if media_type(ct) != media_type(&found.ds.content_type) => {
                return Err(Error::ContentTypeMismatch(format!(
                    "the stream's content type is {:?}, not {ct:?}",
                    found.ds.content_type
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(p) = &producer {
        if let Some(answer) = check_producer(&app, &name, p).await? {
            return Ok(answer);
        }
    }
    if let (Some(seq), Some(last)) = (&writer_seq, &found.ds.writer_seq) {
        if seq.as_bytes() <= last.as_bytes() {
            return Err(Error::WriterSeqConflict(format!(
                "Stream-Seq {seq:?} is not above the last one accepted, {last:?}"
            )));
        }
    }
    let mut events = body_events(&app, &found.ds.content_type, &body, false)?;
    if let Some(p) = &producer {
        for (i, ev) in events.iter_mut().enumerate() {
            ev.id = Some(p.event_id(i));
        }
    }
    let appends_data = !events.is_empty();
    if close {
        let mut ev = closed_event();
        ev.id = producer.as_ref().map(|p| p.event_id(events.len()));
        events.push(ev);
    }
    for ev in &mut events {
        ev.by = who.subject().map(str::to_owned);
    }
    let spec = AppendSpec {
        stream: name.clone(),
        events,
        expected_seq: None,
        close,
    };
    let res = match app.appender.append(spec).await {
        Ok(res) => res,
        Err(Error::StreamClosed { .. }) => {
            let found = find(&app, &name).await?;
            return Ok(error_with(
                Error::StreamClosed { head: found.tail() },
                &closed_headers(&found),
            ));
        }
        Err(e) => return Err(e),
    };
    let fresh = res.events.iter().any(|e| !e.duplicate);
    if !fresh && close && appends_data && producer.is_none() {
        // Closed by someone else between the check above and this append.
        let found = find(&app, &name).await?;
        return Ok(error_with(
            Error::StreamClosed { head: found.tail() },
            &closed_headers(&found),
        ));
    }
    if let Some(p) = &producer {
        ds::advance_producer(&app.db, name.as_str(), &p.id, p.epoch, p.seq).await?;
        if close {
            ds::set_closed_by(&app.db, name.as_str(), &p.tag()).await?;
        }
    }
    if let Some(seq) = &writer_seq {
        ds::set_writer_seq(&app.db, name.as_str(), seq).await?;
    }
    touch(&app, &found).await?;
    // The new tail: the last event written, less the `stream.closed` a close adds. A retry
    // that was all duplicates wrote nothing, so the stream says where it is.
    let (tail, closed) = if fresh {
        (res.last_seq - i64::from(close), close)
    } else {
        let found = find(&app, &name).await?;
        (found.tail(), found.closed())
    };
    let mut extra = vec![(NEXT_OFFSET, format_offset(tail))];
    if closed {
        extra.push((CLOSED, "true".to_owned()));
    }
    match &producer {
        Some(p) => {
            extra.extend(p.headers(p.seq));
            // A close-only request answers 204 like any close; new data answers 200.
            let status = if fresh && appends_data {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            };
            let mut res = status.into_response();
            add_headers(&mut res, &extra);
            Ok(res)
        }
        None => Ok(no_content_with(&extra)),
    }
}

/// The protocol's producer checks; `Some` is the answer when the append must not go ahead.
async fn check_producer(
    app: &AppState,
    name: &StreamName,
    p: &Producer,
) -> Result<Option<Response>> {
    let state = ds::producer(&app.db, name.as_str(), &p.id).await?;
    let gap = |expected: i64| {
        error_with(
            Error::ProducerSeqGap {
                expected,
                received: p.seq,
            },
            &[
                ("producer-expected-seq", expected.to_string()),
                ("producer-received-seq", p.seq.to_string()),
            ],
        )
    };
    Ok(match state {
        None if p.seq != 0 => Some(gap(0)),
        None => None,
        Some((epoch, _)) if p.epoch < epoch => Some(error_with(
            Error::StaleProducerEpoch {
                current: epoch,
                received: p.epoch,
            },
            &[("producer-epoch", epoch.to_string())],
        )),
        Some((epoch, _)) if p.epoch > epoch => {
            if p.seq != 0 {
                return Err(Error::InvalidParameter(format!(
                    "a new Producer-Epoch ({}) starts at Producer-Seq 0, not {}",
                    p.epoch, p.seq
                )));
            }
            None
        }
        Some((_, last)) if p.seq <= last => {
            let mut res = StatusCode::NO_CONTENT.into_response();
            add_headers(&mut res, &p.headers(last));
            Some(res)
        }
        Some((_, last)) if p.seq > last + 1 => Some(gap(last + 1)),
        Some(_) => None,
    })
}

fn add_headers(res: &mut Response, extra: &[(&'static str, String)]) {
    for (name, value) in extra {
        set(res.headers_mut(), name, value);
    }
}

fn no_content_with(extra: &[(&'static str, String)]) -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    add_headers(&mut res, extra);
    res
}

pub async fn delete(
    State(app): State<AppState>,
    who: Principal,
    Stream(name): Stream,
) -> Result<Response> {
    who.check(Grant::Write, &name)?;
    let Some(found) = find_any(&app, &name).await? else {
        return Err(Error::StreamNotFound(name.to_string()));
    };
    if found.ds.deleted {
        return Err(Error::StreamGone(name.to_string()));
    }
    if ds::fork_count(&app.db, name.as_str()).await? > 0 {
        // Forks hold copies of what they inherited, so the data can go now; the row stays
        // (410 for clients, the name blocked) until the last fork is deleted.
        if store::delete_stream(&app.db, name.as_str(), &app.node_id).await? {
            app.hub.deleted(&name);
        }
        ds::mark_deleted(&app.db, name.as_str()).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    remove_stream(&app, &name).await?;
    // Cascade: a soft-deleted source whose last fork this was goes too, and so on up.
    let mut source = found.ds.fork_of;
    while let Some(src) = source {
        let Some(row) = ds::stream(&app.db, &src).await? else {
            break;
        };
        if !row.deleted || ds::fork_count(&app.db, &src).await? > 0 {
            break;
        }
        remove_stream(&app, &StreamName::parse(&src)?).await?;
        source = row.fork_of;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
