//! Input requests (an agent asks, a person answers) and stop signals.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::extract::{Body, Stream};
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::log::model::TYPE_CONTROL_STOP;
use crate::log::{AppendResult, AppendSpec, NewEvent, StreamName};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/streams/{stream}/stop", post(stop_rest))
}

/// Appends `control.stop` (data `{"reason":…}`, or `{}`): the producer sees it on its own
/// subscription and winds down.
pub async fn stop(
    app: &AppState,
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
        }],
        expected_seq: None,
        close: false,
    };
    app.appender.append(spec).await
}

pub async fn answer(
    _app: &AppState,
    _stream: &StreamName,
    request_id: &str,
    _data: &str,
) -> Result<AppendResult> {
    Err(Error::InputNotFound(request_id.to_owned()))
}

async fn stop_rest(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Answer, &stream)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct StopBody<'a> {
            #[serde(borrow)]
            reason: Option<&'a serde_json::value::RawValue>,
        }
        let b: StopBody<'_> = serde_json::from_slice(&body)
            .map_err(|e| super::events::json_error("the stop request", e))?;
        b.reason.map(|r| r.get().to_owned())
    };
    let res = stop(&app, stream, reason.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(res)).into_response())
}
