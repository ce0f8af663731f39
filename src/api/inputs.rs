//! Input requests and stop signals over REST: thin adapters over [`crate::inputs`].
//!
//! - `POST /v1/streams/{stream}/inputs` (write): records the request, appends `input.requested`.
//! - `POST /v1/streams/{stream}/inputs/{request_id}` (answer): the first answer wins.
//! - `GET /v1/streams/{stream}/inputs[?status=open]` and `GET …/inputs/{request_id}?wait=30`
//!   (read): what is still to answer, and a long poll for one request's outcome.
//! - `POST /v1/streams/{stream}/stop` (answer): `control.stop`.
//!
//! The WebSocket `input` and `stop` ops call the same domain functions (`api::ws`).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use super::events::json_error;
use super::extract::{Body, Query, Stream};
use super::params::{PageLimit, RequestId};
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::inputs::{self, effective, NewRequest};
use crate::log::inputs::{InputRow, Status};
use crate::log::model::format_time;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/streams/{stream}/inputs", post(create).get(list))
        .route(
            "/v1/streams/{stream}/inputs/{request_id}",
            post(answer).get(status),
        )
        .route("/v1/streams/{stream}/stop", post(stop))
}

fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

async fn create(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Write, &stream)?;
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
    let b: CreateBody<'_> =
        serde_json::from_slice(&body).map_err(|e| json_error("the input request", e))?;
    let req = NewRequest {
        prompt: b.prompt.ok_or(Error::MissingField("prompt"))?.get(),
        request_id: b.request_id.map(RequestId::field).transpose()?.map(|r| r.0),
        schema: b.schema.map(RawValue::get),
        timeout_ms: b.timeout_ms,
        data: b.data.map(RawValue::get),
    };
    let created = inputs::create(&app, &who, stream, req).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn answer(
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
    let res = inputs::answer(&app, &who, &stream, &request_id, data.get()).await?;
    Ok((StatusCode::CREATED, Json(res)).into_response())
}

async fn stop(
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
    let res = inputs::stop(&app, &who, stream, reason.map(RawValue::get)).await?;
    Ok((StatusCode::CREATED, Json(res)).into_response())
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
    let PageLimit(limit) = PageLimit::parse(p.limit, PageLimit::MAX)?;
    let rows = inputs::list(&app, &stream, status, limit).await?;
    let inputs: Vec<Listed> = rows
        .iter()
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

/// `GET …/inputs/{request_id}?wait=N`: the request's status, waiting up to N seconds while
/// it is open (see [`inputs::wait`]).
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
    };
    let row = inputs::wait(&app, &stream, &request_id, Duration::from_secs(wait)).await?;
    Ok(status_body(&row))
}
