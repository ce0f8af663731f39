//! `GET /v1/streams/{stream}/ui-message-stream`: a stream's `ui` events in the Vercel AI SDK's
//! UI message stream framing, so `useChat` (`DefaultChatTransport.reconnectToStream`) and
//! `readUIMessageStream` can resume an answer from tailcast.
//!
//! One more framing over the same `Subscription` and reading loop as `GET …/sse`
//! (`sse::event_stream`); only the bytes differ. What the AI SDK's parser (`parseJsonEventStream`:
//! eventsource-parser, then JSON per `data`) needs, and so what this sends:
//! - each `ui` event's `data` alone, as `data:` lines (one UIMessageChunk each), preceded by
//!   `id: <seq>` so a client can resume with `Last-Event-ID` (the parser ignores `id:`);
//! - `data: [DONE]` once `stream.closed` is reached, then the end of the response: the SDK's
//!   reader ends with the body, not at `[DONE]` (which it skips);
//! - no `event:` frames: the parser reads every `data` as a chunk whatever its event name, so
//!   notices travel as SSE comments (`: notice {…}`, ignored) or, where the answer cannot be
//!   complete, as a UIMessageChunk of type `error` (`errorText` "tailcast <code>: <detail>").
//! - the headers of the SDK's own `UI_MESSAGE_STREAM_HEADERS`, `x-vercel-ai-ui-message-stream: v1`
//!   among them.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

use super::extract::{Query, Stream};
use super::params::{self, Cursor};
use super::sse::{event_stream, Framing};
use crate::app::AppState;
use crate::auth::{Grant, Principal};
use crate::error::Result;
use crate::live::frame::put_sse_data;
use crate::live::{Compaction, Filter, Item, Notice, NoticeKind, Start, Subscription, Surface};
use crate::log::model::TYPE_STREAM_CLOSED;
use crate::log::StreamName;

/// The event type whose `data` is one UIMessageChunk.
pub const TYPE_UI: &str = "ui";

/// The AI SDK's end-of-stream frame.
const DONE: &[u8] = b"data: [DONE]\n\n";

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/v1/streams/{stream}/ui-message-stream",
        get(ui_message_stream),
    )
}

#[derive(Deserialize, Default)]
struct UiParams {
    after: Option<String>,
    label: Option<String>,
    compact: Option<String>,
}

async fn ui_message_stream(
    State(app): State<AppState>,
    who: Principal,
    Stream(stream): Stream,
    Query(params): Query<UiParams>,
    headers: HeaderMap,
) -> Result<Response> {
    who.check(Grant::Read, &stream)?;
    let Cursor(after) = Cursor::resume(params.after.as_deref(), &headers)?.unwrap_or(Cursor(0));
    let label = super::presence::parse_label(params.label.as_deref())?;
    let compact = params::flag("compact", params.compact.as_deref())?;
    let filter = Filter::types([TYPE_UI.to_owned()]);
    // Compacted: the catch-up's text and reasoning deltas come joined, one chunk per run of a
    // part.
    let compact = compact.then_some((Compaction::UiDeltas, Surface::Ui));
    let start = Start::After(after);
    let (sub, opened) =
        Subscription::open_compacted(app.source(), stream, start, filter, true, compact).await?;
    if !opened.exists {
        // The AI SDK's "no active stream": `reconnectToStream` resolves to null.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let mut res = if opened.closed && opened.cursor >= opened.head {
        // Everything was delivered before: only the end remains to say.
        let mut res = Bytes::from_static(DONE).into_response();
        let h = res.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        res
    } else {
        let follower = super::presence::follow(&app, &who, sub.stream(), "ui", label.as_deref());
        event_stream(&app, &who, sub, None, UiFraming, follower)
    };
    res.headers_mut().insert(
        "x-vercel-ai-ui-message-stream",
        HeaderValue::from_static("v1"),
    );
    Ok(res)
}

struct UiFraming;

impl Framing for UiFraming {
    const TRANSPORT: &'static str = "ui";

    fn item(&self, item: Item) -> Bytes {
        match item {
            Item::Event(frame) if frame.ty == TYPE_STREAM_CLOSED => Bytes::from_static(DONE),
            Item::Event(frame) => frame.ui().clone(),
            Item::Notice(n) => notice(&n),
            // Only snapshot starts yield cursors, and this view never starts from one.
            Item::Cursor(seq) => Bytes::from(format!("id: {seq}\n\n")),
        }
    }

    fn failure(&self, _stream: &StreamName, code: &str, detail: &str) -> Bytes {
        error_chunk(code, detail)
    }
}

/// A notice in this framing. A cursor past the head (`reset`) loses nothing and is only
/// commented; removed events (`gap`) and a deleted stream mean the answer the client builds
/// is not the one that was written, so the client is told with an `error` chunk.
fn notice(n: &Notice) -> Bytes {
    match n.notice {
        NoticeKind::Gap | NoticeKind::Deleted => error_chunk(n.notice.as_str(), &n.detail),
        _ => {
            let json = serde_json::to_string(n).unwrap_or_default();
            Bytes::from(format!(": notice {json}\n\n"))
        }
    }
}

/// `{"type":"error","errorText":"tailcast <code>: <detail>"}`: the UIMessageChunk the AI SDK
/// surfaces as the chat's error.
fn error_chunk(code: &str, detail: &str) -> Bytes {
    let chunk =
        serde_json::json!({"type":"error","errorText":format!("tailcast {code}: {detail}")});
    let mut buf = BytesMut::new();
    put_sse_data(&mut buf, chunk.to_string().as_bytes());
    buf.put_u8(b'\n');
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chunk_is_one_ui_message_chunk() {
        let b = error_chunk("gap", "events 1..2 were removed\nby retention");
        let text = std::str::from_utf8(&b).unwrap();
        let json = text
            .strip_prefix("data: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","errorText":"tailcast gap: events 1..2 were removed\nby retention"})
        );
    }
}
