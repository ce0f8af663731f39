//! Compacted reads (`compact=1`, WebSocket `"compact":true`, the AI SDK view's `compact=1`):
//! late joiners get whole messages, then the exact live tail. What a reader rebuilds from a
//! full replay up to a cursor and a compacted read after it must be what a full replay
//! rebuilds, from any cursor, on every surface, while the stream is being written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};

use tailcast::live::{Compaction, Filter, Item, Start, Subscription, Surface};
use tailcast::log::{AppendSpec, NewEvent, StreamName};
use tailcast::{App, Config};

use crate::backend::{backend_test, TestDb};
use crate::helpers::{wait_until, TestApp, WAIT};
use crate::node_process::NodeProcess;
use crate::wire::{self, Next};

/// A message as a reader holds it: its key (None: an event without one) and its data.
type Message = (Option<String>, Value);

/// The merge rule (openapi.yaml `NewEvent.append`), written here apart from the server's.
fn merge(m: &Value, w: &Value) -> Value {
    match (m, w) {
        (Value::Object(m), Value::Object(w)) => {
            let mut out = m.clone();
            for (k, v) in w {
                let merged = match (out.get(k), v) {
                    (Some(Value::String(a)), Value::String(b)) => Value::String(a.clone() + b),
                    _ => v.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::String(a), Value::String(b)) => Value::String(a.clone() + b),
        _ => w.clone(),
    }
}

/// The messages after applying `events` (envelopes) one by one to `held`.
fn apply(held: &[Message], events: &[Value]) -> Vec<Message> {
    let mut msgs = held.to_vec();
    let mut open: HashMap<String, usize> = HashMap::new();
    for (i, (k, _)) in msgs.iter().enumerate() {
        if let Some(k) = k {
            open.insert(k.clone(), i);
        }
    }
    for e in events {
        let key = e["key"].as_str().map(str::to_owned);
        match (&key, e["append"] == json!(true)) {
            (Some(k), true) if open.contains_key(k) => {
                let i = open[k];
                msgs[i].1 = merge(&msgs[i].1, &e["data"]);
            }
            _ => {
                if let Some(k) = &key {
                    open.insert(k.clone(), msgs.len());
                }
                msgs.push((key, e["data"].clone()));
            }
        }
    }
    msgs
}

/// Every envelope of a compacted REST read after `after`, page by page (`limit` per page).
async fn compacted_rest(app: &TestApp, stream: &str, after: i64, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = after;
    loop {
        let page = app
            .get_json(&format!(
                "/v1/streams/{stream}/events?after={after}&limit={limit}&compact=1"
            ))
            .await;
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        assert!(events.len() <= limit, "{page}");
        assert_eq!(page["next_after"], events.last().unwrap()["seq"]);
        after = page["next_after"].as_i64().unwrap();
        out.extend(events);
    }
}

/// A compacted SSE read after `after`, up to the envelope with seq `head`.
async fn compacted_sse(app: &TestApp, stream: &str, after: i64, head: i64) -> Vec<Value> {
    let mut sse = wire::open_sse(app, stream, "?compact=1", Some(&after.to_string()))
        .await
        .sse();
    let mut out = Vec::new();
    while out.last().map_or(after, wire::seq) < head {
        out.push(sse.envelope().await);
    }
    out
}

/// A compacted WebSocket subscription after `after`, up to the event with seq `head`.
async fn compacted_ws(app: &TestApp, stream: &str, after: i64, head: i64) -> Vec<Value> {
    let mut ws = app.ws().await;
    ws.subscribe(stream, json!({"after": after, "compact": true}))
        .await;
    let mut out = Vec::new();
    while out.last().map_or(after, wire::seq) < head {
        let mut ev = ws.next_event().await;
        ev.as_object_mut().unwrap().remove("op");
        out.push(ev);
    }
    ws.close().await;
    out
}

/// Seqs strictly increasing after `after`; folded envelopes fold at least two events.
fn check_cursors(events: &[Value], after: i64) {
    let mut prev = after;
    for e in events {
        let seq = wire::seq(e);
        assert!(seq > prev, "seq {seq} after {prev}: {e}");
        prev = seq;
        if let Some(n) = e.get("folded") {
            assert!(n.as_i64().unwrap() >= 2, "{e}");
        }
    }
}

/// Events as a producer appends them: key (of three), append flag, data (objects of two
/// fields, strings, or other values, so that every branch of the merge rule is taken).
fn events_strategy() -> impl Strategy<Value = Vec<Value>> {
    let scalar = prop_oneof![
        4 => "[ab\"é]{0,3}".prop_map(Value::from),
        1 => Just(Value::Null),
        1 => (0i64..3).prop_map(Value::from),
    ];
    let data = prop_oneof![
        3 => prop::collection::btree_map("[pq]", scalar.clone(), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        2 => scalar,
    ];
    let event = (prop::option::weighted(0.85, 0u8..3), any::<bool>(), data).prop_map(
        |(key, append, data)| match key {
            Some(k) => json!({"key": format!("k{k}"), "append": append, "data": data}),
            None => json!({"type": "progress", "data": data}),
        },
    );
    prop::collection::vec(event, 1..40)
}

/// For random interleavings of appends and plain events across keys, cut at random cursors:
/// (a full replay up to the cursor, then a compacted read after it) rebuilds the messages of
/// a full replay — over REST (in pages of random sizes), SSE and WebSocket — and so does
/// resuming a compacted read from any seq it delivered.
#[backend_test]
async fn compact_then_resume_rebuilds_the_full_replay(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut runner = TestRunner::default();
    for case in 0..10 {
        let stream = format!("prop-{case}");
        let events = events_strategy().new_tree(&mut runner).unwrap().current();
        let batch = (1usize..6).new_tree(&mut runner).unwrap().current();
        for chunk in events.chunks(batch) {
            app.append(&stream, Value::from(chunk.to_vec())).await;
        }
        let raw = app.read_all(&stream).await;
        let head = raw.len() as i64;
        let full = apply(&[], &raw);
        let cut = (0..=head).new_tree(&mut runner).unwrap().current();
        let held = apply(&[], &raw[..cut as usize]);
        let limit = (1usize..5).new_tree(&mut runner).unwrap().current();
        let what = format!("case {case}: cut {cut}, limit {limit}, events {events:?}");

        let rest = compacted_rest(&app, &stream, cut, limit).await;
        check_cursors(&rest, cut);
        assert_eq!(apply(&held, &rest), full, "REST, {what}");
        let sse = compacted_sse(&app, &stream, cut, head).await;
        check_cursors(&sse, cut);
        assert_eq!(apply(&held, &sse), full, "SSE, {what}");
        let ws = compacted_ws(&app, &stream, cut, head).await;
        check_cursors(&ws, cut);
        assert_eq!(apply(&held, &ws), full, "WebSocket, {what}");
        // The three surfaces fold alike (a page boundary may split a run over REST).
        assert_eq!(sse, ws, "{what}");

        // Resuming from any delivered seq is exact.
        for i in 0..sse.len() {
            let at = wire::seq(&sse[i]);
            let held_then = apply(&held, &sse[..=i]);
            let rest = compacted_rest(&app, &stream, at, 1000).await;
            assert_eq!(apply(&held_then, &rest), full, "resume at {at}, {what}");
        }
    }
}

/// Envelopes exactly: a folded message carries the last event's seq, id and time, the key,
/// the merged data and `folded`; a lone event is sent as stored; `append` is stored as sent.
#[backend_test]
async fn a_folded_envelope_is_exact(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append(
        "s",
        json!([
            {"type":"msg","key":"m","data":{"role":"assistant","text":""}},
            {"type":"msg","key":"m","append":true,"data":{"text":"Hel"}},
            {"type":"msg","key":"m","append":true,"data":{"text":"lo"},"id":"last"},
            {"type":"tick","data":1},
            {"type":"msg","key":"m","append":true,"data":{"text":"!"}},
        ]),
    )
    .await;
    let raw = wire::raw_envelopes(&app, "s").await;
    assert!(
        raw[1].contains(r#""key":"m","append":true,"time""#),
        "{}",
        raw[1]
    );
    let page = app.get_json("/v1/streams/s/events?compact=1").await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    let time = raw[2].split("\"time\":").nth(1).unwrap();
    let want = format!(
        r#"{{"stream":"s","seq":3,"type":"msg","data":{{"role":"assistant","text":"Hello"}},"id":"last","key":"m","folded":3,"time":{time}"#
    );
    let body = app
        .get("/v1/streams/s/events?compact=1")
        .await
        .text()
        .await
        .unwrap();
    assert!(body.contains(&want), "{body}\nwant {want}");
    assert!(body.contains(&raw[3]), "a lone event is as stored");
    assert!(body.contains(&raw[4]), "a lone append is as stored");
    assert_eq!(page["next_after"], 5);

    // The NDJSON export compacts alike.
    let export = app
        .client
        .get(app.url("/v1/streams/s/events?compact=1"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines.len(), 3, "{export}");
    assert_eq!(lines[0], want);

    // An append names the message it extends: without a key it is refused.
    let res = app
        .append_raw("s", "", r#"{"append":true,"data":"x"}"#)
        .await;
    assert_eq!(res.status(), 400);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "invalid_event");
    let res = app.get("/v1/streams/s/events?compact=yes").await;
    assert_eq!(res.status(), 400);
}

/// A late joiner while the answer is still being written: the catch-up comes folded (appends
/// made during it included), the live tail event by event, and together they rebuild the
/// answer exactly.
#[backend_test]
async fn live_appends_during_a_compacted_catch_up(db: TestDb) {
    let app = Arc::new(TestApp::spawn(db).await);
    app.append("live", json!({"key":"answer","data":{"text":""}}))
        .await;
    let token = |i: usize| json!({"key":"answer","append":true,"data":{"text":format!("t{i} ")}});
    for b in 0..20 {
        let batch: Vec<Value> = (b * 50..(b + 1) * 50).map(token).collect();
        app.append("live", Value::from(batch)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 1000;
            // Writes while the reader catches up, and goes on for a while after it is live.
            let mut after_stop = 0;
            while after_stop < 10 {
                if stop.load(Ordering::SeqCst) {
                    after_stop += 1;
                }
                let batch: Vec<Value> = (i..i + 5).map(token).collect();
                i += 5;
                app.append("live", Value::from(batch)).await;
            }
            assert_eq!(app.close_stream("live", None).await.status(), 201);
        })
    };
    let mut sse = wire::open_sse(&app, "live", "?compact=1", None).await.sse();
    let first = sse.envelope().await;
    stop.store(true, Ordering::SeqCst);
    assert!(
        first["folded"].as_i64().unwrap() > 1000,
        "the catch-up comes folded: {first}"
    );
    let mut got = vec![first];
    loop {
        match sse.next_item().await {
            Next::Event(ev) => {
                let env: Value = serde_json::from_str(&ev.data).unwrap();
                assert_eq!(ev.id, env["seq"].to_string());
                // The catch-up was folded into the first event: the rest is the live tail.
                assert_eq!(
                    env.get("folded"),
                    None,
                    "live events come one by one: {env}"
                );
                got.push(env);
            }
            Next::End => break,
            other => panic!("{other:?}"),
        }
    }
    writer.await.unwrap();
    check_cursors(&got, 0);
    let raw = app.read_all("live").await;
    assert_eq!(wire::seq(got.last().unwrap()), raw.len() as i64);
    assert_eq!(apply(&[], &got), apply(&[], &raw));
    let text = apply(&[], &got)[0].1["text"].as_str().unwrap().to_owned();
    assert!(
        text.starts_with("t0 t1 t2 ") && text.contains(" t1049 "),
        "{text}"
    );
}

/// The AI SDK view: consecutive text deltas of one part come as one chunk (events of other
/// types between them do not count); resuming from its id is exact.
#[backend_test]
async fn the_ui_view_joins_text_deltas(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let ui = |c: Value| json!({"type":"ui","data":c});
    app.append(
        "chat",
        json!([
            ui(json!({"type":"start","messageId":"m1"})),
            ui(json!({"type":"reasoning-start","id":"r"})),
            ui(json!({"type":"reasoning-delta","id":"r","delta":"hm"})),
            ui(json!({"type":"reasoning-delta","id":"r","delta":"m"})),
            ui(json!({"type":"reasoning-end","id":"r"})),
            ui(json!({"type":"text-start","id":"t"})),
            ui(json!({"type":"text-delta","id":"t","delta":"Hel"})),
            {"type":"progress","data":{"pct":50}},
            ui(json!({"type":"text-delta","id":"t","delta":"lo"})),
            ui(json!({"type":"text-delta","id":"t","delta":" wor"})),
        ]),
    )
    .await;
    let path = "/v1/streams/chat/ui-message-stream?compact=1";
    let res = wire::get(app.addr, path, &[], None).await;
    assert_eq!(res.status, 200);
    let mut frames = res.frames();
    let want = [
        r#"id: 1\ndata: {"type":"start","messageId":"m1"}"#,
        r#"id: 2\ndata: {"type":"reasoning-start","id":"r"}"#,
        r#"id: 4\ndata: {"type":"reasoning-delta","id":"r","delta":"hmm"}"#,
        r#"id: 5\ndata: {"type":"reasoning-end","id":"r"}"#,
        r#"id: 6\ndata: {"type":"text-start","id":"t"}"#,
        r#"id: 10\ndata: {"type":"text-delta","id":"t","delta":"Hello wor"}"#,
    ];
    for w in want {
        assert_eq!(frames.next_content().await.unwrap(), w.replace("\\n", "\n"));
    }
    // The live tail, chunk by chunk.
    app.append(
        "chat",
        json!([
            ui(json!({"type":"text-delta","id":"t","delta":"ld"})),
            ui(json!({"type":"text-delta","id":"t","delta":"!"})),
            ui(json!({"type":"text-end","id":"t"})),
        ]),
    )
    .await;
    for w in [
        r#"id: 11\ndata: {"type":"text-delta","id":"t","delta":"ld"}"#,
        r#"id: 12\ndata: {"type":"text-delta","id":"t","delta":"!"}"#,
        r#"id: 13\ndata: {"type":"text-end","id":"t"}"#,
    ] {
        assert_eq!(frames.next_content().await.unwrap(), w.replace("\\n", "\n"));
    }
    assert_eq!(app.close_stream("chat", None).await.status(), 201);
    assert_eq!(frames.next_content().await.unwrap(), "data: [DONE]");
    assert_eq!(frames.next().await, None);

    // Resuming from the folded chunk's id goes on after it, again compacted.
    let res = wire::get(app.addr, path, &[("last-event-id", "10")], None).await;
    let mut frames = res.frames();
    assert_eq!(
        frames.next_content().await.unwrap(),
        "id: 12\ndata: {\"type\":\"text-delta\",\"id\":\"t\",\"delta\":\"ld!\"}"
    );
}

/// `from=snapshot` with compaction: each key's current message, folded from its last event
/// without `append` (its older messages and events without a key are not sent; a key with
/// only appends comes as an append), in seq order, then the snapshot's position and the live
/// tail event by event. Without compaction the snapshot stays the latest event per key.
#[backend_test]
async fn a_compacted_snapshot_sends_each_keys_current_message(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let msg = |key: &str, append: bool, data: Value| json!({"type":"msg","key":key,"append":append,"data":data});
    app.append(
        "snap",
        json!([
            msg("a", false, json!({"role":"assistant","text":"old"})), // 1
            msg("a", true, json!({"text":" one"})),                    // 2
            msg("a", false, json!({"role":"assistant","text":"He"})),  // 3: a's current message
            msg("b", true, json!("x")),                                // 4: b has only appends
            msg("a", true, json!({"text":"ll"})),                      // 5
            {"data":"no key"},                                         // 6
            msg("b", true, json!("y")),                                // 7
            msg("a", true, json!({"text":"o"})),                       // 8
            msg("c", false, json!({"n":1})),                           // 9
        ]),
    )
    .await;
    let raw = app.read_all("snap").await;
    let folded = |seq: usize, key: &str, data: Value, n: i64, append: bool| {
        let mut e = json!({"stream":"snap","seq":seq,"type":"msg","data":data,"key":key,
                           "folded":n,"time":raw[seq - 1]["time"]});
        if append {
            e["append"] = json!(true);
        }
        e
    };
    let want = vec![
        folded(7, "b", json!("xy"), 2, true),
        folded(8, "a", json!({"role":"assistant","text":"Hello"}), 3, false),
        raw[8].clone(),
    ];
    // GET …/snapshot?compact=1: the same messages, by key (as its latest events are).
    let rest = app.get_json("/v1/streams/snap/snapshot?compact=1").await;
    assert_eq!(rest["at"], 9);
    let by_key = [want[1].clone(), want[0].clone(), want[2].clone()];
    assert_eq!(rest["events"], json!(by_key), "{rest}");

    let mut sse = wire::open_sse(&app, "snap", "?from=snapshot&compact=1", None)
        .await
        .sse();
    let mut ws = app.ws().await;
    let reply = ws
        .subscribe("snap", json!({"from":"snapshot","compact":true}))
        .await;
    assert_eq!(reply["cursor"], 9, "{reply}");
    let mut ws_got = Vec::new();
    for _ in 0..want.len() {
        let mut ev = ws.next_event().await;
        ev.as_object_mut().unwrap().remove("op");
        ws_got.push(ev);
    }
    assert_eq!(ws_got, want, "WebSocket");
    assert_eq!(ws.recv().await["op"], "cursor");
    let mut sse_got = Vec::new();
    for _ in 0..want.len() {
        sse_got.push(sse.envelope().await);
    }
    assert_eq!(sse_got, want, "SSE");

    // The live tail after it, one by one.
    let tail = [
        msg("a", true, json!({"text":"!"})),
        msg("a", true, json!({"text":"?"})),
    ];
    app.append("snap", json!(tail)).await;
    for seq in [10, 11] {
        let env = sse.envelope().await;
        assert_eq!((wire::seq(&env), env.get("folded")), (seq, None), "{env}");
        let mut ev = ws.next_event().await;
        ev.as_object_mut().unwrap().remove("op");
        assert_eq!(ev, env);
    }
    ws.close().await;

    // Not compacted: the latest event of each key, as before.
    let mut plain = wire::open_sse(&app, "snap", "?from=snapshot", None)
        .await
        .sse();
    let seqs: Vec<i64> = [
        plain.envelope().await,
        plain.envelope().await,
        plain.envelope().await,
    ]
    .iter()
    .map(wire::seq)
    .collect();
    assert_eq!(seqs, [7, 9, 11]);
}

/// The subscription's next item, which must be an event: its envelope.
async fn next(sub: &mut Subscription) -> Value {
    match tokio::time::timeout(WAIT, sub.next()).await.unwrap() {
        Some(Ok(Item::Event(f))) => serde_json::from_slice(&f.envelope).unwrap(),
        other => panic!("expected an event, got {other:?}"),
    }
}

/// A compacted subscription sent back to the log by the live path (its live buffer
/// overflowed) gets that catch-up compacted too, from the last seq it holds, by the same
/// rules; then it is live again, event by event.
#[backend_test]
async fn a_lagging_compacted_subscription_catches_up_compacted(db: TestDb) {
    let mut config = Config::for_database(db.url());
    config.live_buffer = 2;
    let app = App::with_db(config, db.db.clone()).await.unwrap();
    let state = &app.state;
    let stream = StreamName::parse("lagging").unwrap();
    let (mut sub, _) = Subscription::open_compacted(
        state.source(),
        stream.clone(),
        Start::After(0),
        Filter::default(),
        false,
        Some((Compaction::Messages, Surface::Sse)),
    )
    .await
    .unwrap();
    let append = |data: &str, append: bool| AppendSpec {
        stream: stream.clone(),
        events: vec![NewEvent {
            ty: "msg".into(),
            data: data.into(),
            id: None,
            key: Some("answer".into()),
            body: None,
            by: None,
            append,
        }],
        expected_seq: None,
        close: false,
    };
    // Caught up, so following live, after the first event...
    state
        .appender
        .append(append(r#""He""#, false))
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert_eq!((wire::seq(&first), first.get("folded")), (1, None));
    // ...then ten commits, ten live messages, a buffer of two: the subscriber lags.
    let lags = state.hub.lag_fallbacks();
    for i in 0..10 {
        let token = format!("\"{}\"", char::from(b'a' + i));
        state.appender.append(append(&token, true)).await.unwrap();
    }
    wait_until("the hub published all eleven", || async {
        state.hub.published(&stream) == Some(11)
    })
    .await;
    let caught_up = next(&mut sub).await;
    assert_eq!(state.hub.lag_fallbacks(), lags + 1, "the subscriber lagged");
    assert_eq!(caught_up["seq"], 11, "{caught_up}");
    assert_eq!(caught_up["folded"], 10, "{caught_up}");
    assert_eq!(caught_up["append"], true, "{caught_up}");
    assert_eq!(caught_up["data"], "abcdefghij");
    // Live again: the next event alone.
    state.appender.append(append(r#""!""#, true)).await.unwrap();
    let live = next(&mut sub).await;
    assert_eq!((wire::seq(&live), live.get("folded")), (12, None));
    state.shutdown.cancel();
}

/// `tailcast_compact_reads_total` and `tailcast_compact_folded_events_total` count each
/// surface's compacted reads and the events folded away (n - 1 per folded event). The node is
/// a process of its own, so its `/metrics` holds this test's counts alone and exact values can
/// be asserted; the counting is the same on either store.
#[backend_test(postgres)]
async fn compaction_metrics_count_reads_and_folded_events_by_surface(db: TestDb) {
    let node = NodeProcess::start(db.url(), &[]).await;
    let app = TestApp::attach(node.addr, db.clone());
    let counts = || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        let value = |name: &str, surface: &str| -> i64 {
            let series = format!("{name}{{surface=\"{surface}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
                .unwrap_or_else(|| panic!("/metrics lacks {series}:\n{text}"))
        };
        ["rest", "sse", "ws", "ui"].map(|s| {
            (
                value("tailcast_compact_reads_total", s),
                value("tailcast_compact_folded_events_total", s),
            )
        })
    };
    assert_eq!(counts().await, [(0, 0); 4]);

    // One message of ten events, then the close.
    let mut batch = vec![json!({"key":"m","data":"0"})];
    batch.extend((1..10).map(|i| json!({"key":"m","append":true,"data":i.to_string()})));
    app.append("metered", Value::from(batch)).await;
    assert_eq!(app.close_stream("metered", None).await.status(), 201);

    let page = app.get_json("/v1/streams/metered/events?compact=1").await;
    assert_eq!(page["events"][0]["folded"], 10, "{page}");
    let mut sse = wire::open_sse(&app, "metered", "?compact=1", None)
        .await
        .sse();
    assert_eq!(sse.envelope().await["folded"], 10);
    assert_eq!(sse.envelope().await["type"], "stream.closed");
    sse.expect_end().await;
    let got = compacted_ws(&app, "metered", 0, 11).await;
    assert_eq!(got[0]["folded"], 10);
    // The AI SDK view: no `ui` events here, nothing to fold.
    let res = wire::get(
        app.addr,
        "/v1/streams/metered/ui-message-stream?compact=1",
        &[],
        None,
    )
    .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.text().await.trim_end(), "data: [DONE]");

    assert_eq!(counts().await, [(1, 9), (1, 9), (1, 9), (1, 0)]);
}

/// A compacted snapshot loads each key's whole current message: `--max-snapshot-bytes`
/// counts all of it, so one the latest events fit in may be refused compacted
/// (`snapshot_too_large`), on the endpoint and on subscriptions alike.
#[backend_test]
async fn a_compacted_snapshot_counts_whole_messages_against_the_limit(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.max_snapshot_bytes = 4000).await;
    let token = json!({"key":"m","append":true,"data":"x".repeat(1000)});
    app.append("big", json!([{"key":"m","data":"start"}, token, token]))
        .await;
    let plain = app.get("/v1/streams/big/snapshot").await;
    assert_eq!(plain.status(), 200);
    let compacted = app.get_json("/v1/streams/big/snapshot?compact=1").await;
    assert_eq!(compacted["events"][0]["folded"], 3, "{compacted}");
    app.append("big", json!([token, token])).await;
    assert_eq!(app.get("/v1/streams/big/snapshot").await.status(), 200);
    let res = app.get("/v1/streams/big/snapshot?compact=1").await;
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "snapshot_too_large", "{body}");
    let res = app.sse("big", "?from=snapshot&compact=1", None).await;
    assert_eq!(res.status(), 413);
    let mut ws = app.ws().await;
    let reply = ws
        .request(json!({"op":"subscribe","stream":"big","from":"snapshot","compact":true}))
        .await;
    assert_eq!(reply["code"], "snapshot_too_large", "{reply}");
}
