//! The HTTP surfaces, one file each, merged into one router here.

pub mod events;
pub mod extract;
pub mod inputs;
pub mod ops;
pub mod rest;
pub mod sse;
pub mod ws;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::error::Error;
use crate::metrics as m;
use extract::BodyLimit;

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_batch_bytes;
    Router::new()
        .merge(rest::router())
        .merge(sse::router())
        .merge(ops::router())
        .merge(ws::router())
        .merge(inputs::router())
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(middleware::from_fn(record_request))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(Extension(BodyLimit(body_limit)))
        .layer(TraceLayer::new_for_http().make_span_with(make_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// A span per request, named by route; the query string (which may hold a token) is left out.
fn make_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!("request", method = %req.method(), route, path = req.uri().path(), request_id)
}

async fn record_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(m::HTTP_LATENCY, "route" => route).record(start.elapsed().as_secs_f64());
    res
}
