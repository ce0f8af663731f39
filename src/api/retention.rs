//! `GET`/`PUT /v1/streams/{stream}/retention`: a stream's retention overrides (admin).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::extract::{Body, Stream};
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::log::retention;

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/v1/streams/{stream}/retention",
        get(get_retention).put(put_retention),
    )
}

/// Absent or null: the server default applies; 0: no limit for this stream.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionBody {
    #[serde(default)]
    max_age_s: Option<i64>,
    #[serde(default)]
    max_events: Option<i64>,
}

fn parse_body(body: &[u8]) -> Result<RetentionBody> {
    let b: RetentionBody = serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => Error::InvalidParameter(format!("the retention settings: {e}")),
            _ => Error::InvalidJson(format!("the retention settings are not valid JSON: {e}")),
        }
    })?;
    for (name, v) in [("max_age_s", b.max_age_s), ("max_events", b.max_events)] {
        if v.is_some_and(|v| v < 0) {
            return Err(Error::InvalidParameter(format!(
                "{name} must be >= 0 (0: no limit) or null (the server default)"
            )));
        }
    }
    Ok(b)
}

async fn get_retention(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
) -> Result<Response> {
    who.check_admin()?;
    let r = retention::get(&app.db, stream.as_str(), &app.retention_policy())
        .await?
        .ok_or_else(|| Error::StreamNotFound(stream.to_string()))?;
    Ok(Json(r).into_response())
}

async fn put_retention(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Body(body): Body,
) -> Result<Response> {
    who.check_admin()?;
    let b = parse_body(&body)?;
    let r = retention::set(
        &app.db,
        stream.as_str(),
        b.max_age_s,
        b.max_events,
        &app.retention_policy(),
    )
    .await?
    .ok_or_else(|| Error::StreamNotFound(stream.to_string()))?;
    Ok(Json(r).into_response())
}
