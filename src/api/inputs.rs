//! Input requests (an agent asks, a person answers) and stop signals.
//!
//! - `POST /v1/streams/{stream}/inputs` (write): records the request, appends `input.requested`.
//! - `POST /v1/streams/{stream}/inputs/{request_id}` (answer), or the WebSocket `input` op:
//!   the first answer wins; it is checked against the request's JSON Schema and appended as
//!   `input.answered`.
//! - `GET /v1/streams/{stream}/inputs[?status=open]` and `GET …/inputs/{request_id}?wait=30`
//!   (read): what is still to answer, and a long poll for one request's outcome.
//! - `POST /v1/streams/{stream}/stop` (answer), or the WebSocket `stop` op: `control.stop`.
//!
//! Expiry is the sweeper's job (`live::expiry`); it appends `input.expired` the same
//! idempotent way answers are announced here.

use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::events::json_error;
use super::extract::{Body, Query, Stream};
use super::ws::check_request_id;
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::live::hub::LiveMsg;
use crate::log::inputs::{self as store, InputRow, NewInput, Status};
use crate::log::model::{format_time, wire_time, TYPE_CONTROL_STOP, TYPE_INPUT_REQUESTED};
use crate::log::{AppendResult, AppendSpec, NewEvent, StreamName};
use crate::metrics as m;

/// Longest `timeout_ms` a request may ask for: 30 days.
pub const MAX_TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;
/// Longest long poll, in seconds; longer `wait`s are cut to this.
pub const MAX_WAIT_S: u64 = 60;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/streams/{stream}/inputs", post(create).get(list))
        .route(
            "/v1/streams/{stream}/inputs/{request_id}",
            post(answer_rest).get(status),
        )
        .route("/v1/streams/{stream}/stop", post(stop_rest))
}

/// The `{request_id}` path segment, validated.
struct RequestId(String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        #[derive(Deserialize)]
        struct P {
            request_id: String,
        }
        let axum::extract::Path(p) = axum::extract::Path::<P>::from_request_parts(parts, state)
            .await
            .map_err(|e| Error::InvalidParameter(e.body_text()))?;
        check_request_id(&p.request_id)
            .map_err(|d| Error::InvalidParameter(format!("request_id {d}")))?;
        Ok(RequestId(p.request_id))
    }
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("string serialisation")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody<'a> {
    request_id: Option<String>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
    timeout_ms: Option<u64>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Compiles a JSON Schema; 400 `invalid_schema` if it is not one.
fn compile_schema(raw: &str) -> Result<jsonschema::Validator> {
    let schema: Value = serde_json::from_str(raw)
        .map_err(|e| Error::InvalidSchema(format!("the schema is not usable JSON: {e}")))?;
    if !schema.is_object() && !schema.is_boolean() {
        return Err(Error::InvalidSchema(
            "a JSON Schema is an object or a boolean".into(),
        ));
    }
    jsonschema::validator_for(&schema)
        .map_err(|e| Error::InvalidSchema(format!("not a valid JSON Schema: {e}")))
}

async fn create(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Write, &stream)?;
    let b: CreateBody<'_> =
        serde_json::from_slice(&body).map_err(|e| json_error("the input request", e))?;
    let prompt = b.prompt.ok_or(Error::MissingField("prompt"))?.get();
    let request_id = match b.request_id {
        Some(id) => {
            check_request_id(&id).map_err(|detail| Error::InvalidField {
                field: "request_id",
                detail,
            })?;
            id
        }
        None => uuid::Uuid::now_v7().simple().to_string(),
    };
    let schema = b.schema.map(RawValue::get);
    if let Some(s) = schema {
        compile_schema(s)?;
    }
    let timeout_ms = b.timeout_ms.unwrap_or(app.config.input_timeout_ms);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(Error::InvalidField {
            field: "timeout_ms",
            detail: format!("must be between 1 and {MAX_TIMEOUT_MS}"),
        });
    }
    let data = b.data.map(RawValue::get);
    let limit = app.config.max_event_bytes;
    let size = prompt.len() + schema.map_or(0, str::len) + data.map_or(0, str::len);
    if size > limit {
        return Err(Error::EventTooLarge { size, limit });
    }
    let expires_at = wire_time(Utc::now() + chrono::Duration::milliseconds(timeout_ms as i64));

    let (stream_id, closed) = store::stream_id(&app.db, stream.as_str()).await?;
    if closed {
        return Err(stream_closed(&app, &stream).await);
    }
    let token = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let new = NewInput {
        stream_id,
        request_id: &request_id,
        token: &token,
        prompt,
        schema,
        data,
        expires_at,
    };
    // The row first, then the event: by the time anyone can see `input.requested`, the row
    // that arbitrates answers exists.
    if !store::insert(&app.db, &new).await? {
        return Err(Error::InputExists(request_id));
    }
    let mut event = format!(
        "{{\"request_id\":{},\"prompt\":{prompt}",
        json_str(&request_id)
    );
    if let Some(s) = schema {
        event.push_str(&format!(",\"schema\":{s}"));
    }
    event.push_str(&format!(",\"expires_at\":\"{}\"", format_time(&expires_at)));
    if let Some(d) = data {
        event.push_str(&format!(",\"data\":{d}"));
    }
    event.push('}');
    let spec = AppendSpec {
        stream,
        events: vec![NewEvent {
            ty: TYPE_INPUT_REQUESTED.into(),
            data: event,
            id: Some(store::event_id(TYPE_INPUT_REQUESTED, &request_id, &token)),
            key: None,
            body: None,
            by: who.subject().map(str::to_owned),
            append: false,
        }],
        expected_seq: None,
        close: false,
    };
    let res = match app.appender.append(spec).await {
        Ok(res) => res,
        Err(e) => {
            // Nothing was appended, so nobody saw the request: forget it. (If even this
            // fails, the sweeper removes it once it is clearly abandoned.)
            if let Err(del) = store::delete(&app.db, stream_id, &request_id).await {
                tracing::warn!(error = %del, "could not remove an unannounced input request");
            }
            return Err(e);
        }
    };
    let seq = res.first_seq;
    store::set_seq(&app.db, stream_id, &request_id, seq).await?;
    metrics::counter!(m::INPUT_REQUESTS, "outcome" => "requested").increment(1);
    let body = json!({
        "request_id": request_id,
        "seq": seq,
        "expires_at": format_time(&expires_at),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn stream_closed(app: &AppState, stream: &StreamName) -> Error {
    match crate::log::store::stream(&app.db, stream.as_str()).await {
        Ok(Some(row)) => Error::StreamClosed { head: row.head },
        Ok(None) => Error::StreamNotFound(stream.to_string()),
        Err(e) => e.into(),
    }
}

/// The result of an answer: the append result of `input.answered`, and the request.
#[derive(Debug, Serialize)]
pub struct Answered {
    pub request_id: String,
    #[serde(flatten)]
    pub result: AppendResult,
}

/// The error for answering a request that is no longer open.
fn not_open(row: &InputRow) -> Option<Error> {
    match row.status {
        Status::Answered => Some(Error::InputAlreadyAnswered(row.request_id.clone())),
        Status::Expired => Some(Error::InputExpired(row.request_id.clone())),
        Status::Open if row.is_due() => Some(Error::InputExpired(row.request_id.clone())),
        Status::Open => None,
    }
}

/// Answers a request: checked against its schema, first answer wins, then `input.answered`
/// is appended, authored by `who`. `data` is the answer's JSON text, kept byte for byte.
pub async fn answer(
    app: &AppState,
    who: &Principal,
    stream: &StreamName,
    request_id: &str,
    data: &str,
) -> Result<Answered> {
    let not_found = || Error::InputNotFound(request_id.to_owned());
    let row = store::get(&app.db, stream.as_str(), request_id)
        .await?
        .ok_or_else(not_found)?;
    if let Some(e) = not_open(&row) {
        return Err(e);
    }
    if let Some(schema) = &row.schema {
        check_answer(schema, data)?;
    }
    let by = who.subject();
    if !store::claim_answer(&app.db, row.stream_id, request_id, data, by).await? {
        // Someone else resolved it between our read and our update.
        let now = store::get(&app.db, stream.as_str(), request_id)
            .await?
            .ok_or_else(not_found)?;
        return Err(not_open(&now).unwrap_or_else(|| Error::InputExpired(request_id.to_owned())));
    }
    let won = InputRow {
        status: Status::Answered,
        answer: Some(data.to_owned()),
        answered_by: by.map(str::to_owned),
        ..row
    };
    let result = announce(app, &won).await?;
    Ok(Answered {
        request_id: request_id.to_owned(),
        result,
    })
}

/// 422 `input_invalid` unless `data` satisfies `schema`.
fn check_answer(schema: &str, data: &str) -> Result<()> {
    let validator = compile_schema(schema)?;
    let value: Value = serde_json::from_str(data).map_err(|e| {
        Error::InputInvalid(format!(
            "the answer cannot be checked against the schema: {e}"
        ))
    })?;
    let problems: Vec<String> = validator
        .iter_errors(&value)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("at {at}: {e}")
            }
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::InputInvalid(format!(
            "the answer does not match the request's schema: {}",
            problems.join("; ")
        )))
    }
}

/// Appends the event for a resolved request (`input.answered` or `input.expired`) under its
/// idempotency id, then records that it is in the log. Safe to repeat: a second append of
/// the same id is a duplicate, never a second event.
pub async fn announce(app: &AppState, row: &InputRow) -> Result<AppendResult> {
    let ty = store::resolution_type(row.status);
    let data = match row.status {
        Status::Answered => format!(
            "{{\"request_id\":{},\"data\":{}}}",
            json_str(&row.request_id),
            row.answer.as_deref().unwrap_or("null")
        ),
        _ => format!(
            "{{\"request_id\":{},\"expires_at\":\"{}\"}}",
            json_str(&row.request_id),
            format_time(&row.expires_at)
        ),
    };
    let stream = StreamName::parse(&row.stream)?;
    let spec = AppendSpec {
        stream,
        events: vec![NewEvent {
            ty: ty.into(),
            data,
            id: Some(row.event_id(ty)),
            key: None,
            body: None,
            // An expiry is the server's own doing: nobody authored it.
            by: match row.status {
                Status::Answered => row.answered_by.clone(),
                _ => None,
            },
            append: false,
        }],
        expected_seq: None,
        close: false,
    };
    match app.appender.append(spec).await {
        Ok(res) => {
            store::mark_announced(&app.db, row.stream_id, &row.request_id, Some(res.first_seq))
                .await?;
            if !res.events.iter().any(|e| e.duplicate) {
                metrics::counter!(m::INPUT_REQUESTS, "outcome" => row.status.as_str()).increment(1);
            }
            Ok(res)
        }
        Err(e @ Error::StreamClosed { .. }) => {
            // A closed stream takes no more events; nobody is waiting on it any more.
            store::mark_announced(&app.db, row.stream_id, &row.request_id, None).await?;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Appends `control.stop` (data `{"reason":…}`, or `{}`), authored by `who`: the producer
/// sees it on its own subscription and winds down.
pub async fn stop(
    app: &AppState,
    who: &Principal,
    stream: StreamName,
    reason: Option<&str>,
) -> Result<AppendResult> {
    let data = match reason {
        Some(r) => format!("{{\"reason\":{r}}}"),
        None => "{}".to_owned(),
    };
    let spec = AppendSpec {
        stream,
        events: vec![NewEvent {
            ty: TYPE_CONTROL_STOP.into(),
            data,
            id: None,
            key: None,
            body: None,
            by: who.subject().map(str::to_owned),
            append: false,
        }],
        expected_seq: None,
        close: false,
    };
    app.appender.append(spec).await
}

async fn answer_rest(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    RequestId(request_id): RequestId,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Answer, &stream)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct AnswerBody<'a> {
        #[serde(borrow)]
        data: Option<&'a RawValue>,
    }
    let b: AnswerBody<'_> =
        serde_json::from_slice(&body).map_err(|e| json_error("the answer", e))?;
    let data = b.data.ok_or(Error::MissingField("data"))?;
    let res = answer(&app, &who, &stream, &request_id, data.get()).await?;
    Ok((StatusCode::CREATED, Json(res)).into_response())
}

async fn stop_rest(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Answer, &stream)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct StopBody<'a> {
        #[serde(borrow)]
        reason: Option<&'a RawValue>,
    }
    let reason = if is_blank(&body) {
        None
    } else {
        let b: StopBody<'_> =
            serde_json::from_slice(&body).map_err(|e| json_error("the stop request", e))?;
        b.reason
    };
    let res = stop(&app, &who, stream, reason.map(RawValue::get)).await?;
    Ok((StatusCode::CREATED, Json(res)).into_response())
}

/// A request's status as clients see it: an open request past its expiry is expired, even
/// before the sweeper has recorded it.
fn effective(row: &InputRow) -> Status {
    match row.status {
        Status::Open if row.is_due() => Status::Expired,
        s => s,
    }
}

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned())
        .unwrap_or_else(|_| RawValue::from_string("null".to_owned()).expect("null is JSON"))
}

#[derive(Serialize)]
struct Listed {
    request_id: String,
    seq: Option<i64>,
    prompt: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Box<RawValue>>,
    expires_at: String,
    status: &'static str,
}

#[derive(Deserialize)]
struct ListParams {
    status: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Query(p): Query<ListParams>,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let status = match p.status.as_deref() {
        None | Some("all") => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            Error::InvalidParameter("status must be open, answered, expired or all".into())
        })?),
    };
    let limit = match p.limit {
        None => 1000,
        Some(l) if (1..=1000).contains(&l) => l,
        Some(l) => {
            return Err(Error::InvalidParameter(format!(
                "limit must be between 1 and 1000, not {l}"
            )))
        }
    };
    let rows = store::list(&app.db, stream.as_str(), status, limit).await?;
    let inputs: Vec<Listed> = rows
        .iter()
        .filter(|r| status.is_none_or(|s| effective(r) == s))
        .map(|r| Listed {
            request_id: r.request_id.clone(),
            seq: r.seq,
            prompt: raw(&r.prompt),
            schema: r.schema.as_deref().map(raw),
            data: r.data.as_deref().map(raw),
            expires_at: format_time(&r.expires_at),
            status: effective(r).as_str(),
        })
        .collect();
    Ok(Json(json!({ "inputs": inputs })).into_response())
}

#[derive(Deserialize)]
struct StatusParams {
    wait: Option<String>,
}

fn status_body(row: &InputRow) -> Response {
    #[derive(Serialize)]
    struct Body {
        request_id: String,
        status: &'static str,
        seq: Option<i64>,
        expires_at: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<Box<RawValue>>,
    }
    let status = effective(row);
    Json(Body {
        request_id: row.request_id.clone(),
        status: status.as_str(),
        seq: row.seq,
        expires_at: format_time(&row.expires_at),
        data: match status {
            Status::Answered => row.answer.as_deref().map(raw),
            _ => None,
        },
    })
    .into_response()
}

/// `GET …/inputs/{request_id}?wait=N`: the request's status, waiting up to N seconds (at most
/// `MAX_WAIT_S`) while it is open. Woken by the stream's own live channel when an
/// `input.*` event is committed, so an answer is seen at once.
async fn status(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    RequestId(request_id): RequestId,
    Query(p): Query<StatusParams>,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let wait = match p.wait.as_deref() {
        None | Some("") => 0,
        Some(w) => w.trim().parse::<u64>().map_err(|_| {
            Error::InvalidParameter("wait must be a whole number of seconds".into())
        })?,
    }
    .min(MAX_WAIT_S);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    // Listen before reading, so an answer committed in between still wakes us.
    let mut live = app.hub.subscribe(&stream);
    let not_found = || Error::InputNotFound(request_id.clone());
    // Other nodes' commits reach this hub only through cross-node notifications; a slow
    // re-read covers a node that does not forward them.
    let recheck = Duration::from_secs(2);
    loop {
        let row = store::get(&app.db, stream.as_str(), &request_id)
            .await?
            .ok_or_else(not_found)?;
        let now = tokio::time::Instant::now();
        if effective(&row) != Status::Open || now >= deadline {
            return Ok(status_body(&row));
        }
        let until_due = (row.expires_at - Utc::now()).to_std().unwrap_or_default();
        let wake = deadline.min(now + until_due).min(now + recheck);
        tokio::select! {
            _ = app.shutdown.cancelled() => return Ok(status_body(&row)),
            _ = tokio::time::sleep_until(wake) => {}
            _ = wait_input_event(&mut live.rx) => {}
        }
    }
}

/// Resolves when the stream's channel carries something that may concern an input request.
async fn wait_input_event(rx: &mut crate::live::ring::Receiver<std::sync::Arc<LiveMsg>>) {
    loop {
        match rx.recv().await {
            Ok(msg) => match &*msg {
                LiveMsg::Events { events, .. } => {
                    if events.iter().any(|f| f.ty.starts_with("input.")) {
                        return;
                    }
                }
                LiveMsg::Advanced { .. } | LiveMsg::Deleted => return,
            },
            Err(RecvError::Lagged(_)) => return,
            // The hub is gone (shutting down): never resolve; the other branches decide.
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}
