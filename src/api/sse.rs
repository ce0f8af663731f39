//! `GET /v1/streams/{stream}/sse`: a subscription framed as Server-Sent Events.
//!
//! The body is written by hand rather than through axum's `Sse` so that each event's frame
//! is encoded once (`Frame::sse`) and the same bytes go to every subscriber. The reading loop
//! (`event_stream`) is shared with the other SSE framing, the AI SDK view in `ui_stream.rs`.

use std::pin::Pin;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::extract::{Query, Stream};
use super::params::{self, Cursor, Since};
use crate::app::{AppState, ConnectionGuard, Transport};
use crate::auth::{Grant, Principal};
use crate::error::{Error, Result};
use crate::live::frame::put_sse_data;
use crate::live::presence::PresenceGuard;
use crate::live::{Compaction, Item, Start, Subscription, Surface};
use crate::log::StreamName;
use crate::metrics::{Deliveries, DeliveryBatch};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/streams/{stream}/sse", get(sse))
}

#[derive(Deserialize, Default)]
pub struct SseParams {
    after: Option<String>,
    from: Option<String>,
    since: Option<String>,
    types: Option<String>,
    named: Option<String>,
    label: Option<String>,
    compact: Option<String>,
}

/// Works out where an SSE request starts: `Last-Event-ID` wins, then `after`, `from`, `since`.
pub fn sse_start(params: &SseParams, headers: &HeaderMap) -> Result<Start> {
    if let Some(Cursor(c)) = Cursor::resume(params.after.as_deref(), headers)? {
        return Ok(Start::After(c));
    }
    if let Some(from) = params.from.as_deref() {
        return params::parse_from(from).ok_or_else(|| {
            Error::InvalidParameter(format!(
                "from must be \"now\" or \"snapshot\", not {:?}",
                from.chars().take(32).collect::<String>()
            ))
        });
    }
    if let Some(s) = &params.since {
        return Ok(Start::Since(Since::parse(s)?.0));
    }
    Ok(Start::After(0))
}

async fn sse(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Query(params): Query<SseParams>,
    headers: HeaderMap,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let start = sse_start(&params, &headers)?;
    let named = params::flag("named", params.named.as_deref())?;
    let label = super::presence::parse_label(params.label.as_deref())?;
    let compact = params::flag("compact", params.compact.as_deref())?;
    let filter = params::types(params.types.as_deref());
    let snapshot = start == Start::Snapshot;
    let compact = compact.then_some((Compaction::Messages, Surface::Sse));
    let (sub, opened) =
        Subscription::open_compacted(app.source(), stream, start, filter, true, compact).await?;
    if opened.closed && opened.cursor >= opened.head && !snapshot {
        // Tells EventSource to stop reconnecting: there is nothing more, ever.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let first = Bytes::from(format!("retry: {}\n\n", app.config.sse_retry_ms));
    let follower = super::presence::follow(&app, &who, sub.stream(), "sse", label.as_deref());
    Ok(event_stream(
        &app,
        &who,
        sub,
        Some(first),
        EventFraming { named },
        follower,
    ))
}

/// How a framing over a subscription turns what it yields into bytes. The reading loop
/// (keep-alive, shutdown, token expiry, coalescing) is the same for every framing.
pub trait Framing: Send + 'static {
    /// The transport label of the delivery metrics.
    const TRANSPORT: &'static str;
    /// The bytes for one item of the subscription.
    fn item(&self, item: Item) -> Bytes;
    /// The last bytes of a response that ends on an error (`code` is an `ErrorCode`).
    fn failure(&self, stream: &StreamName, code: &str, detail: &str) -> Bytes;
}

/// `GET …/sse`'s framing: the envelope per event, notices as `event: notice`.
struct EventFraming {
    named: bool,
}

impl Framing for EventFraming {
    const TRANSPORT: &'static str = "sse";

    fn item(&self, item: Item) -> Bytes {
        match item {
            Item::Event(frame) if self.named => {
                let mut buf = BytesMut::with_capacity(frame.sse().len() + frame.ty.len() + 8);
                buf.put_slice(b"event: ");
                buf.put_slice(frame.ty.as_bytes());
                buf.put_u8(b'\n');
                buf.put_slice(frame.sse());
                buf.freeze()
            }
            Item::Event(frame) => frame.sse().clone(),
            Item::Notice(n) => notice_frame(&serde_json::to_vec(&n).unwrap_or_default()),
            Item::Cursor(seq) => Bytes::from(format!("id: {seq}\n\n")),
        }
    }

    fn failure(&self, stream: &StreamName, code: &str, detail: &str) -> Bytes {
        let notice =
            serde_json::json!({"notice":"error","stream":stream,"code":code,"detail":detail});
        notice_frame(notice.to_string().as_bytes())
    }
}

/// A `text/event-stream` response following `sub` in `framing`, with `first` sent before
/// anything else. Ends at server shutdown, at the token's expiry, when the subscription ends,
/// or after a subscription error; `follower` (its presence) leaves with it.
pub fn event_stream<F: Framing>(
    app: &AppState,
    who: &Principal,
    sub: Subscription,
    first: Option<Bytes>,
    framing: F,
    follower: PresenceGuard,
) -> Response {
    let state = SseState {
        sub,
        framing,
        keepalive: KeepAlive::new(app.config.sse_keepalive()),
        deliveries: Deliveries::new(F::TRANSPORT),
        shutdown: app.shutdown.clone(),
        first,
        done: false,
        // Boxed, and only for a token that expires: most connections have none.
        expiry: who.expiry_deadline().map(|at| Box::pin(sleep_until(at))),
        _conn: ConnectionGuard::new(app, Transport::Sse),
        _follower: follower,
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(chunk), st))
    });
    let mut res = HttpBody::from_stream(body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// Most bytes put into one chunk when coalescing ready events.
const COALESCE_BYTES: usize = 64 * 1024;

/// The keep-alive comment's timer: due `every` after the last bytes written. Writing only
/// notes the time (one clock read per chunk); the timer is re-armed when it fires early, not
/// on every write — resetting a timer per delivered event was ~1.6% of a busy fan-out's CPU.
struct KeepAlive {
    every: Duration,
    timer: Pin<Box<Sleep>>,
    last_write: Instant,
}

impl KeepAlive {
    fn new(every: Duration) -> Self {
        let now = Instant::now();
        KeepAlive {
            every,
            timer: Box::pin(sleep_until(now + every)),
            last_write: now,
        }
    }

    /// Bytes went out at `at`.
    fn wrote(&mut self, at: Instant) {
        self.last_write = at;
    }

    /// Completes when `every` has passed without a write.
    async fn due(&mut self) {
        loop {
            self.timer.as_mut().await;
            let due = self.last_write + self.every;
            if due <= Instant::now() {
                return;
            }
            // Something was written since the timer was armed: wait for the silence to last.
            self.timer.as_mut().reset(due);
        }
    }

    fn sent(&mut self) {
        let now = Instant::now();
        self.last_write = now;
        self.timer.as_mut().reset(now + self.every);
    }
}

struct SseState<F> {
    sub: Subscription,
    framing: F,
    keepalive: KeepAlive,
    deliveries: Deliveries,
    shutdown: CancellationToken,
    first: Option<Bytes>,
    done: bool,
    /// When the caller's token expires: the response ends there (README "Auth and limits").
    expiry: Option<Pin<Box<Sleep>>>,
    _conn: ConnectionGuard,
    _follower: PresenceGuard,
}

impl<F: Framing> SseState<F> {
    /// The next bytes to send, or `None` to end the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.done {
            return None;
        }
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => None,
            // Before events, so a busy stream cannot outlive the token.
            _ = until(&mut self.expiry) => {
                self.done = true;
                Some(self.framing.failure(self.sub.stream(), "unauthorized", "the token has expired"))
            }
            item = self.sub.next() => match item {
                None => None,
                Some(Ok(item)) => Some(self.encode_ready(item)),
                Some(Err(e)) => {
                    // The client reconnects with Last-Event-ID and resumes where it was.
                    tracing::warn!(stream = %self.sub.stream(), error = %e, "SSE subscription failed");
                    self.done = true;
                    Some(self.framing.failure(self.sub.stream(), e.code(), &e.to_string()))
                }
            },
            _ = self.keepalive.due() => {
                self.keepalive.sent();
                Some(Bytes::from_static(b": keep-alive\n\n"))
            }
        }
    }

    /// Encodes `item` and every further item the subscription already holds (up to
    /// `COALESCE_BYTES`) as one chunk. A catch-up page of 1000 events then costs one write
    /// and one chunk header instead of a thousand.
    /// The delivery metrics are recorded once per chunk (see [`Deliveries`]).
    fn encode_ready(&mut self, item: Item) -> Bytes {
        let now = Instant::now();
        self.keepalive.wrote(now);
        let mut batch = self.deliveries.batch(now.into_std());
        let first = self.encode(&mut batch, item);
        let Some(second) = self.sub.try_next() else {
            self.deliveries.record(batch);
            return first;
        };
        let second = self.encode(&mut batch, second);
        let mut buf =
            BytesMut::with_capacity(COALESCE_BYTES.min(64 * (first.len() + second.len())));
        buf.put_slice(&first);
        buf.put_slice(&second);
        while buf.len() < COALESCE_BYTES {
            let Some(item) = self.sub.try_next() else {
                break;
            };
            let bytes = self.encode(&mut batch, item);
            buf.put_slice(&bytes);
        }
        self.deliveries.record(batch);
        buf.freeze()
    }

    fn encode(&self, batch: &mut DeliveryBatch, item: Item) -> Bytes {
        if let Item::Event(frame) = &item {
            batch.add(frame);
        }
        self.framing.item(item)
    }
}

/// Completes when `timer` does, or never without one.
async fn until(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}

fn notice_frame(json: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(json.len() + 24);
    buf.put_slice(b"event: notice\n");
    put_sse_data(&mut buf, json);
    buf.put_u8(b'\n');
    buf.freeze()
}
