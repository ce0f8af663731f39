//! Extractors whose rejections are our `Error`, so malformed input gets problem+json with a
//! specific `code` instead of axum's plain-text rejections.

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::Error;
use crate::log::StreamName;

/// Query parameters; a malformed query is 400 `invalid_parameter`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| Error::InvalidParameter(e.body_text()))
    }
}

/// The `{stream}` path segment, validated.
pub struct Stream(pub StreamName);

#[derive(Deserialize)]
struct StreamParam {
    stream: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Stream {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let axum::extract::Path(p) =
            axum::extract::Path::<StreamParam>::from_request_parts(parts, state)
                .await
                .map_err(|_| Error::InvalidStreamName(raw_stream_segment(parts.uri.path())))?;
        Ok(Stream(StreamName::parse(&p.stream)?))
    }
}

/// The `{stream}` segment as sent (still percent-encoded), for the error when it does not
/// even decode to UTF-8: the client should see its own name back, not a parser message.
fn raw_stream_segment(path: &str) -> String {
    path.strip_prefix("/v1/streams/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// The whole request body, bounded by the router's body limit: reading stops as soon as the
/// limit is passed, so a huge body is never buffered.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        // A declared length over the limit is refused before a byte of the body is read;
        // without one (chunked), reading stops as soon as the limit is passed.
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(Error::PayloadTooLarge { limit });
        }
        let timeout = req
            .extensions()
            .get::<BodyTimeout>()
            .map_or(Duration::MAX, |t| t.0);
        // A whole-body deadline, not a per-read one: a client trickling a byte at a time
        // would reset a per-read timer forever.
        tokio::time::timeout(timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| Error::RequestTimeout {
                timeout_s: timeout.as_secs(),
            })?
            .map(Body)
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    Error::PayloadTooLarge { limit }
                } else {
                    Error::InvalidJson(format!(
                        "could not read the request body: {}",
                        e.body_text()
                    ))
                }
            })
    }
}

/// How long a client may take to send a whole request body.
#[derive(Clone, Copy)]
pub struct BodyTimeout(pub Duration);

/// The body limit in force, recorded for error messages.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);
