//! Input requests (an agent asks, a person answers) and stop signals: the rules, whatever the
//! transport. `api::inputs` (REST) and `api::ws` (the `input` and `stop` ops) are thin
//! adapters over this module; the sweeper in [`expiry`] expires what nobody answered.
//!
//! - [`create`]: records the request, then appends `input.requested`.
//! - [`answer`]: the first answer wins; it is checked against the request's JSON Schema and
//!   appended as `input.answered`.
//! - [`announce`]: appends a resolution (`input.answered` or `input.expired`) under its
//!   idempotency id, so a repeat is a duplicate, never a second event.
//! - [`wait`]: a request's outcome, waiting while it is open (the long poll).
//! - [`stop`]: appends `control.stop`.

pub mod expiry;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::app::AppState;
use crate::auth::Principal;
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

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("string serialisation")
}

/// A new input request as a client sent it. `request_id`, when given, has been checked by
/// the transport (`api::params::RequestId`); the JSON parts are the client's bytes.
pub struct NewRequest<'a> {
    pub request_id: Option<String>,
    pub prompt: &'a str,
    pub schema: Option<&'a str>,
    pub timeout_ms: Option<u64>,
    pub data: Option<&'a str>,
}

/// A request that passed every check and has its id and expiry.
struct Checked<'a> {
    request_id: String,
    prompt: &'a str,
    schema: Option<&'a str>,
    data: Option<&'a str>,
    expires_at: DateTime<Utc>,
}

/// The answer to a creation.
#[derive(Debug, Serialize)]
pub struct Created {
    pub request_id: String,
    pub seq: i64,
    pub expires_at: String,
}

/// Creates an input request: checked, recorded, announced as `input.requested` (authored by
/// `who`), then marked with the seq of that event.
pub async fn create(
    app: &AppState,
    who: &Principal,
    stream: StreamName,
    req: NewRequest<'_>,
) -> Result<Created> {
    let checked = check(app, req)?;
    let (stream_id, token) = record(app, &stream, &checked).await?;
    let event = requested_event(&checked, &token, who);
    let seq = publish(app, stream, stream_id, &checked.request_id, event).await?;
    store::set_seq(&app.db, stream_id, &checked.request_id, seq).await?;
    metrics::counter!(m::INPUT_REQUESTS, "outcome" => "requested").increment(1);
    Ok(Created {
        request_id: checked.request_id,
        seq,
        expires_at: format_time(&checked.expires_at),
    })
}

/// Step 1 of [`create`]: the schema compiles, the timeout and size are within bounds; picks
/// the id (a UUIDv7 when the client gave none) and the expiry.
fn check<'a>(app: &AppState, req: NewRequest<'a>) -> Result<Checked<'a>> {
    let request_id = req
        .request_id
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    if let Some(s) = req.schema {
        compile_schema(s)?;
    }
    let timeout_ms = req.timeout_ms.unwrap_or(app.config.input_timeout_ms);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(Error::InvalidField {
            field: "timeout_ms",
            detail: format!("must be between 1 and {MAX_TIMEOUT_MS}"),
        });
    }
    let limit = app.config.max_event_bytes;
    let size = req.prompt.len() + req.schema.map_or(0, str::len) + req.data.map_or(0, str::len);
    if size > limit {
        return Err(Error::EventTooLarge { size, limit });
    }
    Ok(Checked {
        request_id,
        prompt: req.prompt,
        schema: req.schema,
        data: req.data,
        expires_at: wire_time(Utc::now() + chrono::Duration::milliseconds(timeout_ms as i64)),
    })
}

/// Step 2 of [`create`]: the row that arbitrates answers, in an open stream. Returns the
/// stream's id and the token that makes this request's event ids unique.
async fn record(app: &AppState, stream: &StreamName, req: &Checked<'_>) -> Result<(i64, String)> {
    let (stream_id, closed) = store::stream_id(&app.db, stream.as_str()).await?;
    if closed {
        return Err(stream_closed(app, stream).await);
    }
    let token = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let new = NewInput {
        stream_id,
        request_id: &req.request_id,
        token: &token,
        prompt: req.prompt,
        schema: req.schema,
        data: req.data,
        expires_at: req.expires_at,
    };
    // The row first, then the event: by the time anyone can see `input.requested`, the row
    // that arbitrates answers exists.
    if !store::insert(&app.db, &new).await? {
        return Err(Error::InputExists(req.request_id.clone()));
    }
    Ok((stream_id, token))
}

/// Step 3 of [`create`]: the `input.requested` event, with the client's JSON kept byte for
/// byte.
fn requested_event(req: &Checked<'_>, token: &str, who: &Principal) -> NewEvent {
    let mut data = format!(
        "{{\"request_id\":{},\"prompt\":{}",
        json_str(&req.request_id),
        req.prompt
    );
    if let Some(s) = req.schema {
        data.push_str(&format!(",\"schema\":{s}"));
    }
    data.push_str(&format!(
        ",\"expires_at\":\"{}\"",
        format_time(&req.expires_at)
    ));
    if let Some(d) = req.data {
        data.push_str(&format!(",\"data\":{d}"));
    }
    data.push('}');
    NewEvent {
        ty: TYPE_INPUT_REQUESTED.into(),
        data,
        id: Some(store::event_id(
            TYPE_INPUT_REQUESTED,
            &req.request_id,
            token,
        )),
        key: None,
        body: None,
        by: who.subject().map(str::to_owned),
        append: false,
    }
}

/// Step 4 of [`create`]: appends the event; its seq. A failed append forgets the request,
/// since nobody saw it.
async fn publish(
    app: &AppState,
    stream: StreamName,
    stream_id: i64,
    request_id: &str,
    event: NewEvent,
) -> Result<i64> {
    match app.appender.append(one_event(stream, event)).await {
        Ok(res) => Ok(res.first_seq),
        Err(e) => {
            // If even this fails, the sweeper removes it once it is clearly abandoned.
            if let Err(del) = store::delete(&app.db, stream_id, request_id).await {
                tracing::warn!(error = %del, "could not remove an unannounced input request");
            }
            Err(e)
        }
    }
}

fn one_event(stream: StreamName, event: NewEvent) -> AppendSpec {
    AppendSpec {
        stream,
        events: vec![event],
        expected_seq: None,
        close: false,
    }
}

async fn stream_closed(app: &AppState, stream: &StreamName) -> Error {
    match crate::log::store::stream(&app.db, stream.as_str()).await {
        Ok(Some(row)) => Error::StreamClosed { head: row.head },
        Ok(None) => Error::StreamNotFound(stream.to_string()),
        Err(e) => e.into(),
    }
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
    // An expiry is the server's own doing: nobody authored it.
    let by = match row.status {
        Status::Answered => row.answered_by.as_deref(),
        _ => None,
    };
    let event = NewEvent {
        id: Some(row.event_id(ty)),
        ..NewEvent::composed(ty, data).by(by)
    };
    let spec = one_event(StreamName::parse(&row.stream)?, event);
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
    let event = NewEvent::composed(TYPE_CONTROL_STOP, data).by(who.subject());
    app.appender.append(one_event(stream, event)).await
}

/// A request's status as clients see it: an open request past its expiry is expired, even
/// before the sweeper has recorded it.
pub fn effective(row: &InputRow) -> Status {
    match row.status {
        Status::Open if row.is_due() => Status::Expired,
        s => s,
    }
}

/// A stream's requests (`status`: only those whose effective status it is), at most `limit`.
pub async fn list(
    app: &AppState,
    stream: &StreamName,
    status: Option<Status>,
    limit: i64,
) -> Result<Vec<InputRow>> {
    let rows = store::list(&app.db, stream.as_str(), status, limit).await?;
    Ok(rows
        .into_iter()
        .filter(|r| status.is_none_or(|s| effective(r) == s))
        .collect())
}

/// A request, waiting up to `wait` (at most `MAX_WAIT_S`) while it is open. Woken by the
/// stream's own live channel when an `input.*` event is committed, so an answer is seen at
/// once.
pub async fn wait(
    app: &AppState,
    stream: &StreamName,
    request_id: &str,
    wait: Duration,
) -> Result<InputRow> {
    let deadline = tokio::time::Instant::now() + wait.min(Duration::from_secs(MAX_WAIT_S));
    // Listen before reading, so an answer committed in between still wakes us.
    let mut live = app.hub.subscribe(stream);
    let not_found = || Error::InputNotFound(request_id.to_owned());
    // Other nodes' commits reach this hub only through cross-node notifications; a slow
    // re-read covers a node that does not forward them.
    let recheck = Duration::from_secs(2);
    loop {
        let row = store::get(&app.db, stream.as_str(), request_id)
            .await?
            .ok_or_else(not_found)?;
        let now = tokio::time::Instant::now();
        if effective(&row) != Status::Open || now >= deadline {
            return Ok(row);
        }
        let until_due = (row.expires_at - Utc::now()).to_std().unwrap_or_default();
        let wake = deadline.min(now + until_due).min(now + recheck);
        tokio::select! {
            _ = app.shutdown.cancelled() => return Ok(row),
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
