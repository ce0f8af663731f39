//! One error type for every surface. Each variant knows its HTTP status and its stable,
//! machine-readable `code`; the same value renders as `application/problem+json` for REST/SSE
//! and as the WebSocket `error` op.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use sqlx::sqlite::SqliteError;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// 400: the stream name breaks the naming rule.
    #[error("invalid stream name {0:?}: use 1-200 characters from A-Z a-z 0-9 _ . : @ -")]
    InvalidStreamName(String),
    /// 400: an event object is malformed (bad `type`, `id`, `key`, unknown field...).
    #[error("{0}")]
    InvalidEvent(String),
    /// 400: producers may not append server-only types.
    #[error("event type {0:?} is reserved for the server")]
    ReservedType(String),
    /// 400: the body is not JSON, or not the JSON shape expected.
    #[error("{0}")]
    InvalidJson(String),
    /// 400: the batch holds no events.
    #[error("the batch holds no events")]
    EmptyBatch,
    /// 400: a query or path parameter is malformed.
    #[error("{0}")]
    InvalidParameter(String),
    /// 400: a cursor (`after`, `Last-Event-ID`) is not a non-negative integer.
    #[error("{0}")]
    InvalidCursor(String),
    /// 413: one event's `data` is over the limit.
    #[error("event data is {size} bytes; the limit is {limit}")]
    EventTooLarge { size: usize, limit: usize },
    /// 413: the batch has too many events.
    #[error("the batch holds {count} events; the limit is {limit}")]
    BatchTooLarge { count: usize, limit: usize },
    /// 413: the request body is over the limit.
    #[error("the request body is over the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 413: the stream's snapshot (newest event per key) is over the configured size.
    #[error("the snapshot is over the limit of {limit} bytes; read the stream's events instead")]
    SnapshotTooLarge { limit: usize },
    /// 409: `expected_seq` did not match the stream's head.
    #[error("expected head {expected}, but the stream's head is {head}")]
    SeqConflict { expected: i64, head: i64 },
    /// 409: the stream is closed.
    #[error("the stream is closed; its last event is seq {head}")]
    StreamClosed { head: i64 },
    /// 404: the stream does not exist.
    #[error("stream {0:?} does not exist")]
    StreamNotFound(String),
    /// 404: no such route.
    #[error("no such resource")]
    NotFound,
    /// 404: no webhook has this id.
    #[error("webhook {0:?} does not exist")]
    WebhookNotFound(String),
    /// 405: the route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 406: the `Accept` header asks for nothing this endpoint produces.
    #[error("{0}")]
    NotAcceptable(String),
    /// 401: no valid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: valid credentials without the needed grant.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the input request does not exist.
    #[error("input request {0:?} does not exist")]
    InputNotFound(String),
    /// 409: the input request was answered already.
    #[error("input request {0:?} was already answered")]
    InputAlreadyAnswered(String),
    /// 409: an input request with this id exists already.
    #[error("input request {0:?} exists already")]
    InputExists(String),
    /// 410: the input request expired.
    #[error("input request {0:?} has expired")]
    InputExpired(String),
    /// 422: the answer does not match the request's JSON Schema.
    #[error("{0}")]
    InputInvalid(String),
    /// 400: the input request's `schema` is not a valid JSON Schema.
    #[error("{0}")]
    InvalidSchema(String),
    /// 426: a plain HTTP request to the WebSocket endpoint.
    #[error("{0}")]
    UpgradeRequired(String),
    /// 400 (WebSocket): a message that is JSON but not an object.
    #[error("{0}")]
    InvalidMessage(String),
    /// 400 (WebSocket): JSON nested deeper than the parser allows.
    #[error("the message is nested too deeply")]
    NestingTooDeep,
    /// 400 (WebSocket): the op is not one the server knows.
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    /// 400 (WebSocket): a required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// 400 (WebSocket): a field has the wrong type or value.
    #[error("field `{field}`: {detail}")]
    InvalidField { field: &'static str, detail: String },
    /// 400 (WebSocket): a field this op does not take (a typo would otherwise be ignored).
    #[error("unknown field {0:?}")]
    UnknownField(String),
    /// 400 (WebSocket): binary frames carry nothing in this protocol.
    #[error("binary frames are not supported; send JSON in text frames")]
    BinaryNotSupported,
    /// 409 (WebSocket): the connection already follows this stream.
    #[error("already subscribed to {0:?}")]
    AlreadySubscribed(String),
    /// 404 (WebSocket): the connection does not follow this stream.
    #[error("not subscribed to {0:?}")]
    NotSubscribed(String),
    /// 429 (WebSocket): the connection holds as many subscriptions as it may.
    #[error("this connection holds {limit} subscriptions, the most allowed")]
    TooManySubscriptions { limit: usize },
    /// 429: too many requests; retry after the given seconds.
    #[error("rate limit exceeded; retry after {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    /// 429: this client address has too many open connections.
    #[error("this client address has too many open connections (limit {limit})")]
    TooManyConnections { limit: usize },
    /// 414: the request target (path and query) is over the limit.
    #[error("the request URL is over the limit of {limit} bytes")]
    UriTooLong { limit: usize },
    /// 431: the request headers are over the limit.
    #[error("the request headers are over the limit of {limit} bytes or 100 fields")]
    HeadersTooLarge { limit: usize },
    /// 408: the request body did not arrive in time.
    #[error("the request body did not arrive within {timeout_s} s")]
    RequestTimeout { timeout_s: u64 },
    /// 503: the database cannot be reached.
    #[error("the event log is unavailable; retry shortly")]
    Unavailable,
    /// 503: the database was lost while committing and could not be asked in time whether the
    /// commit happened. The events may be stored: retry with the same event ids.
    #[error("the database was lost while committing and its outcome is unknown; retry with the same event ids")]
    OutcomeUnknown,
    /// 503: the server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// 500: anything else. The cause stays attached as the source, is logged once where the
    /// error is answered, and is never echoed to the client.
    #[error("internal error")]
    Internal(#[source] Cause),
    /// 409 (Durable Streams): the stream exists with another configuration, or its name is
    /// held by a deleted stream that forks still read from.
    #[error("{0}")]
    StreamExists(String),
    /// 409 (Durable Streams): the request's Content-Type is not the stream's.
    #[error("{0}")]
    ContentTypeMismatch(String),
    /// 409 (Durable Streams): `Stream-Seq` is not above the last one accepted.
    #[error("{0}")]
    WriterSeqConflict(String),
    /// 409 (Durable Streams): `Producer-Seq` skips ahead of the next expected seq.
    #[error("producer seq {received} skips ahead; expected {expected}")]
    ProducerSeqGap { expected: i64, received: i64 },
    /// 403 (Durable Streams): `Producer-Epoch` is older than the producer's current epoch.
    #[error("producer epoch {received} is stale; the current epoch is {current}")]
    StaleProducerEpoch { current: i64, received: i64 },
    /// 410 (Durable Streams): the stream was deleted while forks still read from it.
    #[error("stream {0:?} was deleted")]
    StreamGone(String),
    /// 410 (Durable Streams): the data at this offset was removed by retention.
    #[error("the data after this offset was removed by retention; the oldest offset is {oldest}")]
    OffsetGone { oldest: String },
}

impl Error {
    pub fn status(&self) -> StatusCode {
        use Error::*;
        match self {
            InvalidStreamName(_) | InvalidEvent(_) | ReservedType(_) | InvalidJson(_)
            | EmptyBatch | InvalidParameter(_) | InvalidCursor(_) => StatusCode::BAD_REQUEST,
            InvalidSchema(_)
            | InvalidMessage(_)
            | NestingTooDeep
            | UnknownOp(_)
            | MissingField(_)
            | InvalidField { .. }
            | UnknownField(_)
            | BinaryNotSupported => StatusCode::BAD_REQUEST,
            UpgradeRequired(_) => StatusCode::UPGRADE_REQUIRED,
            AlreadySubscribed(_) => StatusCode::CONFLICT,
            NotSubscribed(_) => StatusCode::NOT_FOUND,
            TooManySubscriptions { .. } => StatusCode::TOO_MANY_REQUESTS,
            EventTooLarge { .. }
            | BatchTooLarge { .. }
            | PayloadTooLarge { .. }
            | SnapshotTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            SeqConflict { .. } | StreamClosed { .. } | InputAlreadyAnswered(_) | InputExists(_) => {
                StatusCode::CONFLICT
            }
            StreamNotFound(_) | NotFound | InputNotFound(_) | WebhookNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Forbidden(_) => StatusCode::FORBIDDEN,
            InputExpired(_) => StatusCode::GONE,
            InputInvalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RateLimited { .. } | TooManyConnections { .. } => StatusCode::TOO_MANY_REQUESTS,
            UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Unavailable | OutcomeUnknown | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            StreamExists(_)
            | ContentTypeMismatch(_)
            | WriterSeqConflict(_)
            | ProducerSeqGap { .. } => StatusCode::CONFLICT,
            StaleProducerEpoch { .. } => StatusCode::FORBIDDEN,
            StreamGone(_) | OffsetGone { .. } => StatusCode::GONE,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use Error::*;
        match self {
            InvalidStreamName(_) => "invalid_stream_name",
            InvalidEvent(_) => "invalid_event",
            ReservedType(_) => "reserved_type",
            InvalidJson(_) => "invalid_json",
            EmptyBatch => "empty_batch",
            InvalidParameter(_) => "invalid_parameter",
            InvalidCursor(_) => "invalid_cursor",
            EventTooLarge { .. } => "event_too_large",
            BatchTooLarge { .. } => "batch_too_large",
            PayloadTooLarge { .. } => "payload_too_large",
            SnapshotTooLarge { .. } => "snapshot_too_large",
            SeqConflict { .. } => "seq_conflict",
            StreamClosed { .. } => "stream_closed",
            StreamNotFound(_) => "stream_not_found",
            NotFound => "not_found",
            WebhookNotFound(_) => "webhook_not_found",
            MethodNotAllowed => "method_not_allowed",
            NotAcceptable(_) => "not_acceptable",
            Unauthorized(_) => "unauthorized",
            Forbidden(_) => "forbidden",
            InputNotFound(_) => "input_not_found",
            InputAlreadyAnswered(_) => "input_already_answered",
            InputExists(_) => "input_exists",
            InputExpired(_) => "input_expired",
            InputInvalid(_) => "input_invalid",
            InvalidSchema(_) => "invalid_schema",
            UpgradeRequired(_) => "upgrade_required",
            InvalidMessage(_) => "invalid_message",
            NestingTooDeep => "nesting_too_deep",
            UnknownOp(_) => "unknown_op",
            MissingField(_) => "missing_field",
            InvalidField { .. } => "invalid_field",
            UnknownField(_) => "unknown_field",
            BinaryNotSupported => "binary_not_supported",
            AlreadySubscribed(_) => "already_subscribed",
            NotSubscribed(_) => "not_subscribed",
            TooManySubscriptions { .. } => "too_many_subscriptions",
            RateLimited { .. } => "rate_limited",
            TooManyConnections { .. } => "too_many_connections",
            UriTooLong { .. } => "uri_too_long",
            HeadersTooLarge { .. } => "headers_too_large",
            RequestTimeout { .. } => "request_timeout",
            Unavailable => "unavailable",
            OutcomeUnknown => "outcome_unknown",
            ShuttingDown => "shutting_down",
            Internal(_) => "internal",
            StreamExists(_) => "stream_exists",
            ContentTypeMismatch(_) => "content_type_mismatch",
            WriterSeqConflict(_) => "writer_seq_conflict",
            ProducerSeqGap { .. } => "producer_seq_gap",
            StaleProducerEpoch { .. } => "stale_producer_epoch",
            StreamGone(_) => "stream_gone",
            OffsetGone { .. } => "offset_gone",
        }
    }

    /// Fields beyond `code` and `detail` that help the client act on the error.
    fn extra(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            Error::SeqConflict { expected, head } => {
                m.insert("head".into(), json!(head));
                m.insert("expected_seq".into(), json!(expected));
            }
            Error::StreamClosed { head } => {
                m.insert("head".into(), json!(head));
            }
            Error::EventTooLarge { limit, .. }
            | Error::BatchTooLarge { limit, .. }
            | Error::PayloadTooLarge { limit }
            | Error::SnapshotTooLarge { limit }
            | Error::TooManyConnections { limit }
            | Error::UriTooLong { limit }
            | Error::HeadersTooLarge { limit } => {
                m.insert("limit".into(), json!(limit));
            }
            Error::RateLimited { retry_after_s } => {
                m.insert("retry_after_s".into(), json!(retry_after_s));
            }
            Error::MissingField(field) | Error::InvalidField { field, .. } => {
                m.insert("field".into(), json!(field));
            }
            Error::TooManySubscriptions { limit } => {
                m.insert("limit".into(), json!(limit));
            }
            _ => {}
        }
        m
    }

    fn title(&self) -> &'static str {
        self.status().canonical_reason().unwrap_or("Error")
    }

    /// The problem+json body (openapi.yaml `Problem`).
    pub fn problem(&self) -> Value {
        let mut body = Map::new();
        body.insert("type".into(), json!("about:blank"));
        body.insert("title".into(), json!(self.title()));
        body.insert("status".into(), json!(self.status().as_u16()));
        body.insert("code".into(), json!(self.code()));
        body.insert("detail".into(), json!(self.to_string()));
        body.extend(self.extra());
        Value::Object(body)
    }

    /// The WebSocket `error` op for this error, echoing the client's `ref`.
    pub fn ws_op(&self, reference: Option<&Value>) -> Value {
        let mut body = Map::new();
        body.insert("op".into(), json!("error"));
        if let Some(r) = reference {
            body.insert("ref".into(), r.clone());
        }
        body.insert("code".into(), json!(self.code()));
        body.insert("message".into(), json!(self.to_string()));
        body.insert("status".into(), json!(self.status().as_u16()));
        body.extend(self.extra());
        Value::Object(body)
    }

    /// A 500 caused by `source` (a driver error, a failed task, or a message).
    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Internal(Cause(Arc::from(source.into())))
    }

    /// Logs the cause of an internal error, with its whole chain of sources: called once,
    /// where the error is answered (a response, a WebSocket `error` op).
    pub fn log(&self) {
        if let Error::Internal(cause) = self {
            tracing::error!(cause = %cause.chain(), "internal error");
        }
    }
}

/// What caused an internal error. Shared (an `Arc`), so that every append of a failed batch
/// carries the same cause instead of a copy flattened to text.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    /// "outer: inner: innermost", for the log.
    pub fn chain(&self) -> String {
        let mut text = self.0.to_string();
        let mut next = self.0.source();
        while let Some(e) = next {
            text.push_str(": ");
            text.push_str(&e.to_string());
            next = e.source();
        }
        text
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            Error::Unavailable
        } else {
            Error::internal(e)
        }
    }
}

/// True for errors that mean "the database is not reachable right now" rather than
/// "this statement is wrong": the client should retry, and gets 503.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) if db.try_downcast_ref::<SqliteError>().is_some() => {
            // SQLite's primary result codes (the low byte of an extended one): 5 BUSY,
            // 6 LOCKED, 10 IOERR, 13 FULL (the disk), 14 CANTOPEN.
            let code: i32 = db.code().and_then(|c| c.parse().ok()).unwrap_or_default();
            matches!(code & 0xff, 5 | 6 | 10 | 13 | 14)
        }
        sqlx::Error::Database(db) => {
            // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
            // 08xxx connection exceptions, 53300 too_many_connections.
            let code = db.code().unwrap_or_default();
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }
        _ => false,
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.log();
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut res = (self.status(), body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Error::RateLimited { retry_after_s } = self {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        if matches!(
            self,
            Error::Unavailable
                | Error::OutcomeUnknown
                | Error::ShuttingDown
                | Error::TooManyConnections { .. }
        ) {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Error::Unauthorized(_)) {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tailcast\""),
            );
        }
        res
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
