//! Stream leases: `PATCH /v1/streams/{stream}` (`{"lease_s": N}` or null), an append's
//! `?lease_s=N`, and `POST /v1/streams/{stream}/heartbeat`. Every append and heartbeat renews
//! the lease; once it lapses the sweeper (`live::leases`) closes the stream with
//! `stream.closed` {"reason":"abandoned"}.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;

use super::extract::{Body, Stream};
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::log::leases::{self, Outcome, MAX_LEASE_S};
use crate::log::StreamName;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/streams/{stream}/heartbeat", post(heartbeat))
}

/// Checks a lease: 1 to 30 days in seconds; 0 (or null) removes it.
pub fn parse_lease(lease_s: Option<i64>) -> Result<Option<i64>> {
    match lease_s {
        None | Some(0) => Ok(None),
        Some(s) if (1..=MAX_LEASE_S).contains(&s) => Ok(Some(s)),
        Some(s) => Err(Error::InvalidParameter(format!(
            "lease_s must be between 1 and {MAX_LEASE_S} seconds (0 or null: no lease), not {s}"
        ))),
    }
}

fn answer(stream: &StreamName, outcome: Outcome) -> Result<Response> {
    match outcome {
        Outcome::Missing => Err(Error::StreamNotFound(stream.to_string())),
        Outcome::Closed { head } => Err(Error::StreamClosed { head }),
        Outcome::Done(row) => Ok(Json(row.info()).into_response()),
    }
}

/// `PATCH /v1/streams/{stream}`: the stream's settings a producer may change (its lease).
pub async fn patch_stream(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Body(body): Body,
) -> Result<Response> {
    who.check(Grant::Write, &stream)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        #[serde(default)]
        lease_s: Option<i64>,
    }
    let p: Patch = serde_json::from_slice(&body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => Error::InvalidParameter(format!("the stream settings: {e}")),
            _ => Error::InvalidJson(format!("the stream settings are not valid JSON: {e}")),
        }
    })?;
    let lease = parse_lease(p.lease_s)?;
    answer(&stream, leases::set(&app.db, stream.as_str(), lease).await?)
}

/// `POST /v1/streams/{stream}/heartbeat`: the producer is alive; the lease runs from now.
async fn heartbeat(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
) -> Result<Response> {
    who.check(Grant::Write, &stream)?;
    answer(&stream, leases::heartbeat(&app.db, stream.as_str()).await?)
}
