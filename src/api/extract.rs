//! Extractors whose rejections are our `Error`, so malformed input gets problem+json with a
//! specific `code` instead of axum's plain-text rejections.

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
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

    async fn from_request(req: Request, _state: &S) -> Result<Self, Error> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        // Past the limit the rest of a body is still read and discarded, up to `drain`: a
        // client that writes its whole body before reading the answer (browsers' and Node's
        // fetch, Python's urllib) otherwise gets a reset connection instead of the 413. Beyond
        // `drain`, or when the client waits for `100 Continue`, it is refused at once.
        let drain = (limit as u64).saturating_mul(3) / 2;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if declared.is_some_and(|n| n > limit as u64 && (n > drain || expects_continue)) {
            return Err(Error::PayloadTooLarge { limit });
        }
        let timeout = req
            .extensions()
            .get::<BodyTimeout>()
            .map_or(Duration::MAX, |t| t.0);
        // A whole-body deadline, not a per-read one: a client trickling a byte at a time
        // would reset a per-read timer forever.
        tokio::time::timeout(timeout, read_bounded(req.into_body(), limit, drain))
            .await
            .map_err(|_| Error::RequestTimeout {
                timeout_s: timeout.as_secs(),
            })?
            .map(Body)
    }
}

/// Reads a body of at most `limit` bytes; a longer one is read on (and dropped) up to `drain`
/// bytes, then refused with 413. Never holds more than `limit` bytes.
async fn read_bounded(
    mut body: axum::body::Body,
    limit: usize,
    drain: u64,
) -> Result<Bytes, Error> {
    let mut buf = BytesMut::new();
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| Error::InvalidJson(format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > limit as u64 {
            buf = BytesMut::new();
            if seen > drain {
                return Err(Error::PayloadTooLarge { limit });
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if seen > limit as u64 {
        return Err(Error::PayloadTooLarge { limit });
    }
    Ok(buf.freeze())
}

/// How long a client may take to send a whole request body.
#[derive(Clone, Copy)]
pub struct BodyTimeout(pub Duration);

/// The body limit in force, recorded for error messages.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);
