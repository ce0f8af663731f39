//! `GET /v1/ws`: one WebSocket carrying many subscriptions, publishing, input answers and
//! stop signals.
//!
//! Each connection is one task running one `select!` over {client frame, the connection's
//! subscriptions, heartbeat, shutdown}, plus one writer task that owns the socket's sending
//! half, so frames never interleave. Between them sits a bounded queue. Subscriptions are
//! only polled while that queue has room: a client that reads slowly simply stops pulling
//! events, each `Subscription` falls back to the log when its live buffer overflows, and
//! nothing is ever dropped. A client that stops reading altogether trips the socket's write
//! timeout and is disconnected; it resumes each subscription by its cursor.

mod protocol;
#[cfg(test)]
mod protocol_props;
mod queue;

use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::stream::{FuturesOrdered, SplitSink, SplitStream};
use futures::{FutureExt, SinkExt, Stream, StreamExt};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::{interval_at, MissedTickBehavior};
use tokio_stream::StreamMap;
use tracing::Instrument;

use super::events::{authored, parse_batch};
use super::extract::Query;
use crate::app::{AppState, ConnectionGuard, Transport};
use crate::auth::{Grant, Principal};
use crate::error::Error;
use crate::inputs;
use crate::live::budget::Budget;
use crate::live::presence::{Notice, PresenceGuard};
use crate::live::{Compaction, EndReason, Frame, Item, Start, Subscription, Surface};
use crate::log::model::format_time;
use crate::log::{AppendSpec, StreamName};
use crate::metrics::Deliveries;
use protocol::{error_reply, error_with, reply, Op, Request};

/// The protocol version announced in `welcome`.
pub const PROTOCOL: u32 = 1;

/// Close codes (RFC 6455).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
/// A text frame that is not UTF-8 (RFC 6455 §7.4.1).
const CLOSE_INVALID_DATA: u16 = 1007;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/ws", get(upgrade))
}

#[derive(serde::Deserialize)]
struct WsParams {
    /// How this connection's subscriptions appear in presence (`label=`).
    label: Option<String>,
}

async fn upgrade(
    State(app): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    params: Result<Query<WsParams>, Error>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Auth: browsers apply no CORS to WebSockets, so the Origin is checked here.
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if !super::origin_allowed(
        header(header::ORIGIN),
        header(header::HOST),
        &app.config.cors_origins,
    ) {
        return Error::Forbidden("this origin may not open WebSockets here".into()).into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return Error::UpgradeRequired(e.body_text()).into_response(),
    };
    let label = match params.and_then(|Query(p)| super::presence::parse_label(p.label.as_deref())) {
        Ok(label) => label,
        Err(e) => return e.into_response(),
    };
    let max = app.config.ws_max_message();
    ws.max_message_size(max)
        .max_frame_size(max)
        // tungstenite zero-fills its whole read buffer (128 KiB by default) on the first read,
        // which made an idle WebSocket cost 138 KiB of RSS. Client ops are small; a larger
        // message still gets a buffer of its full length when its header arrives.
        .read_buffer_size(4 * 1024)
        .on_upgrade(move |socket| {
            let span = tracing::debug_span!("ws", subject = who.subject());
            Connection::run(app, who, label, socket).instrument(span)
        })
}

/// What a subscription's stream yields to the connection.
enum SubEvent {
    Item(Item),
    /// A join or leave on the stream (for subscriptions that asked for them).
    Presence(Notice),
    /// The subscription is over, for this reason.
    Ended(EndReason),
    /// The subscription failed: it is over, and the client resumes from its cursor.
    Failed(Error),
}

type SubStream = std::pin::Pin<Box<dyn Stream<Item = SubEvent> + Send>>;

/// A subscription, and what goes with it until it ends.
struct SubState {
    sub: Subscription,
    /// Its presence: leaves when the subscription ends, however it ends.
    _follower: PresenceGuard,
    /// The stream's join and leave notices, if the client asked for them.
    watch: Option<tokio::sync::broadcast::Receiver<Notice>>,
}

/// A subscription (with its presence notices, if any) as a stream that announces its own end.
fn sub_stream(
    sub: Subscription,
    follower: PresenceGuard,
    watch: Option<tokio::sync::broadcast::Receiver<Notice>>,
) -> SubStream {
    use tokio::sync::broadcast::error::RecvError;
    let state = Some(SubState {
        sub,
        _follower: follower,
        watch,
    });
    Box::pin(futures::stream::unfold(state, |state| async move {
        let mut st = state?;
        let next = match &mut st.watch {
            Some(rx) => tokio::select! {
                item = st.sub.next() => Ok(item),
                notice = rx.recv() => Err(notice),
            },
            None => Ok(st.sub.next().await),
        };
        match next {
            Ok(Some(Ok(item))) => Some((SubEvent::Item(item), Some(st))),
            Ok(Some(Err(e))) => Some((SubEvent::Failed(e), None)),
            // The subscription says why it ended; only a hub shutting down leaves it unsaid.
            Ok(None) => Some((
                SubEvent::Ended(st.sub.end().unwrap_or(EndReason::Shutdown)),
                None,
            )),
            Err(Ok(notice)) => Some((SubEvent::Presence(notice), Some(st))),
            // Notices were dropped for this slow reader: it re-reads the whole presence.
            Err(Err(RecvError::Lagged(_))) => Some((SubEvent::Presence(Notice::Sync), Some(st))),
            Err(Err(RecvError::Closed)) => {
                st.watch = None;
                Some((SubEvent::Presence(Notice::Sync), Some(st)))
            }
        }
    }))
}

/// The `reason` of an `unsubscribed` the server sends on its own (docs/websocket.md).
fn end_reason(end: EndReason) -> &'static str {
    match end {
        EndReason::Closed => "closed",
        EndReason::Deleted => "deleted",
        // The connection itself closes next (1001, going away); the wire has no reason of its
        // own for this, and the client resumes by cursor either way.
        EndReason::Shutdown => "closed",
    }
}

/// An event frame as a WebSocket text message. Frames are JSON built from UTF-8 text, so this
/// only fails on a bug; the subscription then ends with an error rather than skip the event.
fn event_text(frame: &Frame) -> Result<Message, Error> {
    Utf8Bytes::try_from(frame.ws().clone())
        .map(Message::Text)
        .map_err(|_| Error::internal(format!("event {} is not UTF-8 text", frame.seq)))
}

/// What woke the connection's loop.
enum Wake {
    Frame(Option<Result<Message, axum::Error>>),
    /// A pipelined publish finished: its `ack` (or error).
    Acked(Message),
    Sub(StreamName, SubEvent),
    Room,
    Tick,
}

/// Why the loop ended.
enum End {
    /// Send this close frame, then finish.
    Close(u16, &'static str),
    /// The client closed, or the socket failed: nothing more to send.
    Gone,
}

struct Connection {
    app: AppState,
    who: Principal,
    /// The id `welcome` announced; this connection's id in every stream's presence.
    connection_id: String,
    /// The `label=` it connected with.
    label: Option<String>,
    subs: StreamMap<StreamName, SubStream>,
    /// What the subscriptions' catch-up pages may hold together (`--ws-catchup-bytes`).
    catchup: Budget,
    out: queue::Outbox,
    /// Publishes whose appends are under way, answered in the order they came. A client may
    /// keep many in flight, and they then share group commits.
    publishes: FuturesOrdered<PendingReply>,
    /// Delivery metrics, looked up once and recorded once per batch (see [`Deliveries`]).
    deliveries: Deliveries,
}

type PendingReply = std::pin::Pin<Box<dyn std::future::Future<Output = Message> + Send>>;

/// Most publishes one connection may have under way; beyond it, its frames wait.
const MAX_PUBLISHES_IN_FLIGHT: usize = 64;

/// Most subscription messages gathered into one batch (one flush), besides the send queue's
/// own bounds.
const MAX_BATCH: usize = 256;

impl Connection {
    async fn run(app: AppState, who: Principal, label: Option<String>, socket: WebSocket) {
        let _conn = ConnectionGuard::new(&app, Transport::Ws);
        let connection_id = uuid::Uuid::now_v7().simple().to_string();
        let (sink, frames) = socket.split();
        let (out, queue) = queue::channel(
            app.config.ws_send_queue.max(4),
            app.config.ws_send_queue_bytes,
        );
        let writer = tokio::spawn(write_loop(sink, queue));
        let heartbeat = app.config.ws_heartbeat();
        let write_timeout = app.config.write_timeout();
        let catchup = Budget::new(app.config.ws_catchup_bytes);
        let mut conn = Connection {
            app,
            who,
            connection_id: connection_id.clone(),
            label,
            subs: StreamMap::new(),
            catchup,
            out,
            publishes: FuturesOrdered::new(),
            deliveries: Deliveries::new("ws"),
        };
        let welcome = json!({
            "connection_id": connection_id,
            "heartbeat_ms": heartbeat.as_millis() as u64,
            "protocol": PROTOCOL,
        });
        let _ = conn.out.send(reply("welcome", None, welcome)).await;
        let mut frames = frames;
        let end = conn.serve(&mut frames, heartbeat).await;
        if let End::Close(code, reason) = end {
            let close = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            // Behind whatever is queued (the client may still be reading it), but bounded.
            let queued = conn.out.send(Message::Close(Some(close)));
            let _ = tokio::time::timeout(Duration::from_secs(1), queued).await;
        }
        // Dropping the queue's sender lets the writer flush what is queued, then finish.
        drop(conn);
        if tokio::time::timeout(write_timeout, writer).await.is_err() {
            tracing::debug!("WebSocket writer did not finish in time");
        }
        // Read until the client answers our close frame (bounded): closing the socket with
        // unread input would make the kernel reset it, losing the close frame in flight.
        let drain = async { while let Some(Ok(_)) = frames.next().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }

    async fn serve(&mut self, frames: &mut SplitStream<WebSocket>, heartbeat: Duration) -> End {
        let shutdown = self.app.shutdown.clone();
        let mut ticks = interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        // Auth: the token's `exp` ends this connection's access (README "Auth and limits").
        let who = self.who.clone();
        let expiry = who.expired();
        tokio::pin!(expiry);
        loop {
            // Only this task sends into the queue, so room seen here is still there when
            // an item arrives below.
            let room = self.out.has_room();
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Close(CLOSE_GOING_AWAY, "server shutting down"),
                _ = &mut expiry => {
                    let expired = Error::Unauthorized("the token has expired".into());
                    let _ = self.out.try_send(error_reply(None, &expired));
                    return End::Close(CLOSE_POLICY, "token expired");
                }
                _ = self.out.closed() => return End::Gone,
                frame = frames.next(), if self.publishes.len() < MAX_PUBLISHES_IN_FLIGHT => {
                    Wake::Frame(frame)
                }
                Some(msg) = self.publishes.next(), if room && !self.publishes.is_empty() => {
                    Wake::Acked(msg)
                }
                Some((stream, ev)) = self.subs.next(), if room && !self.subs.is_empty() => {
                    Wake::Sub(stream, ev)
                }
                // The queue is full: wait for room, then go round again.
                _ = self.out.room(), if !room => Wake::Room,
                _ = ticks.tick() => Wake::Tick,
            };
            match wake {
                Wake::Frame(None) => return End::Gone,
                Wake::Frame(Some(Err(e))) => return read_failure(e),
                Wake::Frame(Some(Ok(msg))) => {
                    heard = Instant::now();
                    if !self.on_frame(msg).await {
                        return End::Gone;
                    }
                }
                Wake::Acked(msg) => self.send(msg).await,
                Wake::Sub(stream, ev) => self.on_sub_events(stream, ev).await,
                Wake::Room => {}
                Wake::Tick => {
                    if heard.elapsed() >= heartbeat * 3 {
                        return End::Close(CLOSE_POLICY, "no heartbeat from the client");
                    }
                    // With a full queue the client is not reading: the write timeout
                    // decides its fate, not a ping that could not be queued.
                    let _ = self.out.try_send(Message::Ping(Default::default()));
                }
            }
        }
    }

    /// Handles one client frame; false when the client is closing.
    async fn on_frame(&mut self, msg: Message) -> bool {
        match msg {
            Message::Text(text) => {
                if let Some(out) = self.on_text(text.as_str()).await {
                    self.send(out).await;
                }
            }
            Message::Binary(_) => {
                self.send(error_reply(None, &Error::BinaryNotSupported))
                    .await
            }
            // Pings are answered by the WebSocket layer; any frame counts as a heartbeat.
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => return false,
        }
        true
    }

    async fn on_text(&mut self, text: &str) -> Option<Message> {
        match protocol::parse(text) {
            Err(rejected) => Some(error_reply(rejected.reference, &rejected.error)),
            Ok(Request {
                reference,
                op:
                    Op::Publish {
                        stream,
                        events,
                        expected_seq,
                    },
            }) => {
                let reply = self.publish(reference, stream, events, expected_seq);
                self.publishes.push_back(reply);
                None
            }
            Ok(Request { reference, op }) => {
                // Replies keep the order of requests: answer the publishes before this op.
                while let Some(msg) = self.publishes.next().await {
                    send(&self.out, msg).await;
                }
                let stream = op_stream(&op).map(|s| s.as_str().to_owned());
                match self.apply(reference, op).await {
                    Ok(msg) => msg,
                    Err(e) => Some(error_with(reference, &e, stream.as_deref())),
                }
            }
        }
    }

    /// Starts a publish; the returned future appends and yields its `ack` or error. Checks
    /// and parsing happen now, the append (and its wait for a group commit) when polled.
    fn publish(
        &self,
        reference: Option<&RawValue>,
        stream: StreamName,
        events: &RawValue,
        expected_seq: Option<i64>,
    ) -> PendingReply {
        let reference: Option<Box<RawValue>> = reference.map(RawValue::to_owned);
        let name = stream.as_str().to_owned();
        let spec = self
            .who
            .check(Grant::Write, &stream)
            .and_then(|()| parse_batch(events.get().as_bytes(), self.app.limits()))
            .map(|events| AppendSpec {
                stream,
                events: authored(events, self.who.subject()),
                expected_seq,
                close: false,
            });
        let appender = self.app.appender.clone();
        Box::pin(async move {
            let res = match spec {
                Ok(spec) => appender.append(spec).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(res) => reply("ack", reference.as_deref(), res),
                Err(e) => error_with(reference.as_deref(), &e, Some(&name)),
            }
        })
    }

    /// Carries out one op; its reply, unless it sent its own.
    async fn apply(
        &mut self,
        reference: Option<&RawValue>,
        op: Op<'_>,
    ) -> Result<Option<Message>, Error> {
        let app = &self.app;
        match op {
            Op::Subscribe {
                stream,
                start,
                filter,
                presence,
                label,
                compact,
            } => {
                self.who.check(Grant::Read, &stream)?;
                if self.subs.contains_key(&stream) {
                    return Err(Error::AlreadySubscribed(stream.to_string()));
                }
                let limit = app.config.ws_max_subscriptions;
                if self.subs.len() >= limit {
                    return Err(Error::TooManySubscriptions { limit });
                }
                let snapshot = start == Start::Snapshot;
                let compact = compact.then_some((Compaction::Messages, Surface::Ws));
                let (mut sub, opened) = Subscription::open_compacted(
                    app.source(),
                    stream.clone(),
                    start,
                    filter,
                    true,
                    compact,
                )
                .await?;
                sub.share_budget(self.catchup.clone());
                let body = json!({
                    "stream": stream,
                    "head": opened.head,
                    "cursor": opened.cursor,
                    "closed": opened.closed,
                });
                if opened.closed && opened.cursor >= opened.head && !snapshot {
                    // Nothing will ever follow (SSE answers 204 here): say so and hold nothing.
                    send(&self.out, reply("subscribed", reference, body)).await;
                    let end = json!({"stream": stream, "reason": "closed"});
                    return Ok(Some(reply("unsubscribed", None, end)));
                }
                // Watching before joining: the follower's own join is its first notice.
                let watch = presence.then(|| app.presence.watch(&stream));
                let follower = app.presence.join(
                    &stream,
                    &self.connection_id,
                    "ws",
                    self.who.subject(),
                    label.as_deref().or(self.label.as_deref()),
                );
                // `subscribed` must precede the stream's first event: send it before the
                // subscription joins the map that events are read from.
                send(&self.out, reply("subscribed", reference, body)).await;
                self.subs.insert(stream, sub_stream(sub, follower, watch));
                Ok(None)
            }
            Op::Unsubscribe { stream } => {
                if self.subs.remove(&stream).is_none() {
                    return Err(Error::NotSubscribed(stream.to_string()));
                }
                Ok(Some(reply(
                    "unsubscribed",
                    reference,
                    json!({"stream": stream}),
                )))
            }
            Op::Publish {
                stream,
                events,
                expected_seq,
            } => {
                // `on_text` pipelines publishes; this path answers one on its own.
                let publish = self.publish(reference, stream, events, expected_seq);
                Ok(Some(publish.await))
            }
            Op::Input {
                stream,
                request_id,
                data,
            } => {
                self.who.check(Grant::Answer, &stream)?;
                let res =
                    inputs::answer(app, &self.who, &stream, &request_id.0, data.get()).await?;
                Ok(Some(reply("ack", reference, res)))
            }
            Op::Stop { stream, reason } => {
                self.who.check(Grant::Answer, &stream)?;
                let res = inputs::stop(app, &self.who, stream, reason.map(RawValue::get)).await?;
                Ok(Some(reply("ack", reference, res)))
            }
            Op::Presence { stream, limit } => {
                self.who.check(Grant::Read, &stream)?;
                let limit = limit.unwrap_or(super::presence::MAX_MEMBERS);
                let limit = limit.min(super::presence::MAX_MEMBERS);
                let snapshot = super::presence::snapshot(app, &stream, limit).await?;
                Ok(Some(reply("presence", reference, snapshot)))
            }
            Op::Ping => Ok(Some(reply(
                "pong",
                reference,
                json!({"time": format_time(&chrono::Utc::now())}),
            ))),
        }
    }

    /// Handles what a subscription yielded, and everything the subscriptions already hold
    /// besides (a catch-up page, a burst: whatever is ready without waiting), up to the send
    /// queue's room: queued as one batch, so it reaches the socket in one flush.
    async fn on_sub_events(&mut self, stream: StreamName, ev: SubEvent) {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let deliveries = self.deliveries.clone();
        let mut tally = deliveries.batch(std::time::Instant::now());
        let mut next = Some((stream, ev));
        while let Some((stream, ev)) = next.take() {
            if let SubEvent::Item(Item::Event(frame)) = &ev {
                tally.add(frame);
            }
            let msg = self.on_sub_event(stream, ev).await;
            bytes += queue::weight(&msg);
            batch.push(msg);
            if batch.len() < MAX_BATCH && self.out.room_besides(batch.len(), bytes) {
                // Polled once, without waiting: a subscription that is not ready keeps its
                // place (its read goes on inside its stream) for the loop's next round.
                next = self.subs.next().now_or_never().flatten();
            }
        }
        deliveries.record(tally);
        let _ = self.out.send_batch(batch).await;
    }

    /// One subscription item as the message for the client.
    async fn on_sub_event(&mut self, stream: StreamName, ev: SubEvent) -> Message {
        match ev {
            SubEvent::Item(Item::Event(frame)) => match event_text(&frame) {
                Ok(msg) => msg,
                // Never skip an event: end the subscription; the client resumes from the
                // last seq it has.
                Err(e) => self.ended(stream, None, Some(e)),
            },
            SubEvent::Item(Item::Notice(n)) => reply("notice", None, n),
            SubEvent::Presence(Notice::Join(member)) => {
                reply("join", None, json!({"stream": stream, "member": member}))
            }
            SubEvent::Presence(Notice::Leave(member)) => {
                reply("leave", None, json!({"stream": stream, "member": member}))
            }
            SubEvent::Presence(Notice::Sync) => {
                // Notices may have been missed: the whole presence, unasked (no `ref`).
                let limit = super::presence::MAX_MEMBERS;
                match super::presence::snapshot(&self.app, &stream, limit).await {
                    Ok(snapshot) => reply("presence", None, snapshot),
                    Err(e) => error_with(None, &e, Some(stream.as_str())),
                }
            }
            SubEvent::Item(Item::Cursor(seq)) => {
                reply("cursor", None, json!({"stream": stream, "seq": seq}))
            }
            SubEvent::Ended(end) => self.ended(stream, Some(end), None),
            SubEvent::Failed(e) => self.ended(stream, None, Some(e)),
        }
    }

    /// Drops a subscription that is over and says so: `unsubscribed` with its reason, or
    /// with `reason: "error"` and the error's code and message.
    fn ended(
        &mut self,
        stream: StreamName,
        end: Option<EndReason>,
        error: Option<Error>,
    ) -> Message {
        // Removed now, so the client may subscribe again as soon as it reads this.
        self.subs.remove(&stream);
        let reason = end.map_or("error", end_reason);
        let mut body = json!({"stream": stream, "reason": reason});
        if let Some(e) = error {
            tracing::warn!(%stream, error = %e, "WebSocket subscription failed");
            body["code"] = e.code().into();
            body["message"] = e.to_string().into();
        }
        reply("unsubscribed", None, body)
    }

    async fn send(&mut self, msg: Message) {
        send(&self.out, msg).await;
    }
}

async fn send(out: &queue::Outbox, msg: Message) {
    // Fails only when the writer is gone; the loop notices through `out.closed()`.
    let _ = out.send(msg).await;
}

fn op_stream<'a>(op: &'a Op<'_>) -> Option<&'a StreamName> {
    match op {
        Op::Subscribe { stream, .. }
        | Op::Unsubscribe { stream }
        | Op::Publish { stream, .. }
        | Op::Input { stream, .. }
        | Op::Stop { stream, .. }
        | Op::Presence { stream, .. } => Some(stream),
        Op::Ping => None,
    }
}

fn read_failure(e: axum::Error) -> End {
    use std::error::Error as _;
    match e
        .source()
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
    {
        Some(tungstenite::Error::Capacity(_)) => End::Close(CLOSE_TOO_BIG, "message too big"),
        // RFC 6455 §8.1: a text message that is not UTF-8 fails the connection with 1007.
        Some(tungstenite::Error::Utf8(_)) => End::Close(CLOSE_INVALID_DATA, "invalid UTF-8"),
        _ => {
            tracing::debug!(error = %e, "WebSocket read failed");
            End::Gone
        }
    }
}

async fn write_loop(mut sink: SplitSink<WebSocket, Message>, mut queue: queue::Inbox) {
    let mut batches = Vec::new();
    // Everything already queued goes out with one flush.
    while queue.recv_many(&mut batches, 64).await > 0 {
        let mut closing = false;
        let (mut messages, mut bytes) = (0, 0);
        for msg in batches.drain(..).flatten() {
            closing = matches!(msg, Message::Close(_));
            messages += 1;
            bytes += queue::weight(&msg);
            if sink.feed(msg).await.is_err() {
                return;
            }
            if closing {
                break;
            }
        }
        // A write timeout (the client stopped reading) is counted and logged by the
        // connection itself (net::Conn), under transport="ws".
        if sink.flush().await.is_err() {
            return;
        }
        // Only now off the connection's books: until flushed, it is memory held for it.
        queue.written(messages, bytes);
        if closing {
            return;
        }
    }
    let _ = sink.close().await;
}
