//! The HTTP surfaces, one file each, merged into one router here.

pub mod console;
pub mod durable;
pub mod events;
pub mod extract;
pub mod inputs;
pub mod leases;
pub mod ops;
pub mod params;
pub mod presence;
pub mod rest;
pub mod retention;
pub mod sse;
pub mod ui_stream;
pub mod webhooks;
pub mod ws;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::{Extension, Router};
use tower::util::option_layer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::error::Error;
use crate::metrics as m;
use extract::{BodyLimit, BodyTimeout};

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_batch_bytes;
    let request_limits = RequestLimits {
        max_url_bytes: state.config.max_url_bytes,
        max_header_bytes: state.config.max_header_bytes,
    };
    let cors = cors_layer(&state.config.cors_origins);
    Router::new()
        .merge(rest::router())
        .merge(sse::router())
        .merge(ui_stream::router())
        .merge(ops::router())
        .merge(retention::router())
        .merge(console::router())
        .merge(ws::router())
        .merge(inputs::router())
        .merge(presence::router())
        .merge(durable::router())
        .merge(leases::router())
        .merge(webhooks::router())
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(middleware::from_fn(record_request))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(Extension(BodyLimit(body_limit)))
        .layer(Extension(BodyTimeout(state.config.body_timeout())))
        // Backstop for bodies read by other extractors: a long stall between chunks fails the
        // read. Twice the whole-body deadline, so that `Body` answers 408 first.
        .layer(RequestBodyTimeoutLayer::new(
            state.config.body_timeout() * 2,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(make_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(middleware::from_fn_with_state(
            request_limits,
            check_request_size,
        ))
        .layer(option_layer(cors))
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

#[derive(Clone, Copy)]
struct RequestLimits {
    max_url_bytes: usize,
    max_header_bytes: usize,
}

/// 414 / 431 with problem+json for requests over the configured URL and header sizes, before
/// any handler (or the authenticator) looks at them. Hyper's own buffer limit still bounds
/// what is read at all.
async fn check_request_size(
    State(limits): State<RequestLimits>,
    req: Request,
    next: Next,
) -> Response {
    let url = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if url > limits.max_url_bytes {
        return Error::UriTooLong {
            limit: limits.max_url_bytes,
        }
        .into_response();
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers > limits.max_header_bytes {
        return Error::HeadersTooLarge {
            limit: limits.max_header_bytes,
        }
        .into_response();
    }
    next.run(req).await
}

/// CORS for the configured browser origins (`*` = any); none configured, no CORS headers.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| {
            let v = HeaderValue::from_str(o).ok();
            if v.is_none() {
                tracing::warn!(origin = %o, "ignoring a CORS origin that is not a header value");
            }
            v
        }))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
                HeaderName::from_static("x-vercel-ai-ui-message-stream"),
            ])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// True when a browser WebSocket from `origin` may connect: no `Origin` (not a browser), an
/// origin in the configured list (or `*`), or the same origin as the `Host` it connects to.
/// Browsers do not apply CORS to WebSockets, so this check is the only thing that stops a
/// page on another site from using a visitor's access to this server.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if allowed
        .iter()
        .any(|a| a.trim() == "*" || a.trim() == origin)
    {
        return true;
    }
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}
