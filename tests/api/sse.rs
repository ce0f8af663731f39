//! Server-Sent Events as openapi.yaml specifies them, read with a real SSE parser and, where the
//! framing itself is the point, as raw bytes.

use serde_json::{json, Value};

use crate::backend::{backend_test, on_db, TestDb};
use crate::helpers::{stats, wait_until, TestApp, WAIT};
use crate::wire::{self, open_sse, raw_envelopes, seq};

#[backend_test]
async fn catches_up_then_follows_live(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!([{"data":1},{"data":2}])).await;
    let mut sse = app.sse_events("s", "", None).await;
    sse.envelopes_through(1, 2).await;
    app.append("s", json!({"data":3})).await;
    let env = sse.envelopes_through(3, 3).await;
    assert_eq!(env[0]["data"], json!(3));
}

/// The bytes on the wire: headers, `retry:` first, `id:` + `data:` per event with the
/// envelope exactly as replayed, JSON line breaks split into several `data:` lines (which
/// the parser joins back), `event:` only with `named=1`, notices without `id:`.
#[backend_test]
async fn framing_is_exactly_as_specified(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let multi_line = "{\"a\":\n  1,\n  \"b\": [\n2]}";
    let body = format!(
        r#"[{{"type":"token","data":{{"t":"x"}}}},{{"type":"multi","data":{multi_line}}}]"#
    );
    assert_eq!(app.append_raw("s", "", body).await.status(), 201);
    let envs = raw_envelopes(&app, "s").await;
    assert!(envs[1].contains(multi_line), "stored with its line breaks");

    let res = open_sse(&app, "s", "", None).await;
    assert_eq!(res.header("content-type"), "text/event-stream");
    assert_eq!(res.header("cache-control"), "no-cache");
    assert_eq!(res.header("x-accel-buffering"), "no");
    let mut frames = res.frames();
    assert_eq!(frames.next().await.unwrap(), "retry: 2000");
    assert_eq!(
        frames.next_content().await.unwrap(),
        format!("id: 1\ndata: {}", envs[0])
    );
    let split = envs[1].replace('\n', "\ndata: ");
    assert_eq!(
        frames.next_content().await.unwrap(),
        format!("id: 2\ndata: {split}")
    );

    // The real parser reassembles the multi-line envelope byte for byte.
    let mut sse = open_sse(&app, "s", "?after=1", None).await.sse();
    let ev = sse.next().await;
    assert_eq!(ev.data, envs[1]);
    assert_eq!(ev.id, "2");
    assert_eq!(ev.event, "message");

    // named=1 adds the type as the event name.
    let mut frames = open_sse(&app, "s", "?named=1", None).await.frames();
    assert_eq!(frames.next().await.unwrap(), "retry: 2000");
    assert_eq!(
        frames.next_content().await.unwrap(),
        format!("event: token\nid: 1\ndata: {}", envs[0])
    );
    let mut sse = open_sse(&app, "s", "?named=1&after=1", None).await.sse();
    assert_eq!(sse.next().await.event, "multi");

    // A notice: `event: notice`, data, and no `id:`.
    let mut frames = open_sse(&app, "s", "?after=99", None).await.frames();
    frames.next().await.unwrap();
    let notice = frames.next_content().await.unwrap();
    let data = notice.strip_prefix("event: notice\ndata: ").expect(&notice);
    assert!(!data.contains('\n'), "{notice}");
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        v,
        json!({"notice":"reset","stream":"s","detail":v["detail"],"head":2})
    );
}

#[backend_test]
async fn retry_and_keep_alive_follow_the_configuration(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.sse_keepalive_s = 1;
        c.sse_retry_ms = 750;
    })
    .await;
    let mut frames = open_sse(&app, "quiet", "", None).await.frames();
    assert_eq!(frames.next().await.unwrap(), "retry: 750");
    // Nothing happens on this stream: the next frame can only be a keep-alive comment.
    assert_eq!(frames.next().await.unwrap(), ": keep-alive");
    assert_eq!(frames.next().await.unwrap(), ": keep-alive");
    app.append("quiet", json!({"data":1})).await;
    let f = frames.next_content().await.unwrap();
    assert!(f.starts_with("id: 1\ndata: "), "{f}");
}

/// Every way to say where to start.
#[backend_test]
async fn resumes_from_every_kind_of_cursor(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append(
        "s",
        Value::Array((1..=10).map(|i| json!({"data":i})).collect()),
    )
    .await;

    // Default: from the beginning. after=N: after N. Last-Event-ID wins over after.
    open_sse(&app, "s", "", None)
        .await
        .sse()
        .expect_seqs(1, 10)
        .await;
    open_sse(&app, "s", "?after=0", None)
        .await
        .sse()
        .expect_seqs(1, 10)
        .await;
    open_sse(&app, "s", "?after=7", None)
        .await
        .sse()
        .expect_seqs(8, 10)
        .await;
    let mut sse = open_sse(&app, "s", "?after=2", Some("6")).await.sse();
    sse.expect_seqs(7, 10).await;
    // An empty Last-Event-ID (EventSource before any event) falls back to after.
    open_sse(&app, "s", "?after=8", Some(""))
        .await
        .sse()
        .expect_seqs(9, 10)
        .await;
    // At the head: nothing until the next append.
    let mut at_head = open_sse(&app, "s", "?after=10", None).await.sse();
    let mut now = open_sse(&app, "s", "?from=now", None).await.sse();
    // since=: the first event at or after the time.
    let mut since = open_sse(&app, "s", "?since=2000-01-01T00:00:00Z", None)
        .await
        .sse();
    since.expect_seqs(1, 10).await;
    let mut later = open_sse(&app, "s", "?since=2999-01-01T00:00:00Z", None)
        .await
        .sse();

    app.append("s", json!({"data":11})).await;
    for sub in [&mut sse, &mut at_head, &mut now, &mut since, &mut later] {
        sub.expect_seqs(11, 11).await;
    }

    // Past the head: a reset notice saying where it continues, then live events.
    let mut past = open_sse(&app, "s", "", Some("50")).await.sse();
    let n = past.notice().await;
    assert_eq!(n["notice"], "reset");
    assert_eq!(n["head"], 11);
    assert_eq!(n["stream"], "s");
    app.append("s", json!({"data":12})).await;
    past.expect_seqs(12, 12).await;

    // Before the oldest retained event: a gap notice with the oldest, then from there.
    wire::trim(&app.db, "s", 4).await;
    let mut old = open_sse(&app, "s", "?after=1", None).await.sse();
    let n = old.notice().await;
    assert_eq!(n["notice"], "gap");
    assert_eq!(n["oldest"], 5);
    old.expect_seqs(5, 12).await;
    // Exactly at the retention edge: no notice.
    open_sse(&app, "s", "?after=4", None)
        .await
        .sse()
        .expect_seqs(5, 12)
        .await;
    // Events removed but the stream row not yet updated (retention mid-way): the hole in
    // the log is still announced, never skipped silently.
    let deleted = on_db!(app.db, |ex| {
        sqlx::query(
        "delete from events where seq <= 6 and stream_id = (select id from streams where name = 's')"
    )
    .execute(ex)
    .await
    .unwrap()
    .rows_affected()
    });
    assert_eq!(deleted, 2);
    let mut hole = open_sse(&app, "s", "?after=4", None).await.sse();
    let n = hole.notice().await;
    assert_eq!(n["notice"], "gap");
    assert_eq!(n["oldest"], 7);
    hole.expect_seqs(7, 12).await;
}

#[backend_test]
async fn bad_parameters_get_problem_json(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!({"data":1})).await;
    let cases: [(&str, Option<&str>, &str); 9] = [
        ("", Some("abc"), "invalid_cursor"),
        ("", Some("-1"), "invalid_cursor"),
        ("", Some("1.5"), "invalid_cursor"),
        ("?after=2", Some("x1"), "invalid_cursor"),
        ("?after=x", None, "invalid_cursor"),
        ("?after=-3", None, "invalid_cursor"),
        ("?from=later", None, "invalid_parameter"),
        ("?named=yes", None, "invalid_parameter"),
        ("?since=noon", None, "invalid_parameter"),
    ];
    for (query, last_id, code) in cases {
        let res = wire::get_sse(app.addr, "s", query, last_id).await;
        assert_eq!(res.status, 400, "{query} {last_id:?}");
        assert_eq!(res.header("content-type"), "application/problem+json");
        let body = res.text().await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], code, "{query} {last_id:?}: {v}");
    }
    let res = wire::get(app.addr, "/v1/streams/bad%20name/sse", &[], None).await;
    assert_eq!(res.status, 400);
    let v: Value = serde_json::from_str(&res.text().await).unwrap();
    assert_eq!(v["code"], "invalid_stream_name");
}

#[backend_test]
async fn types_filter_events_but_never_hide_the_close(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let body = json!([
        {"type":"a","data":1},{"type":"b","data":2},{"type":"c","data":3},{"type":"a","data":4}
    ]);
    app.append("s", body).await;
    let mut sse = open_sse(&app, "s", "?types=a,c", None).await.sse();
    let seqs = [
        sse.envelope().await,
        sse.envelope().await,
        sse.envelope().await,
    ]
    .map(|e| seq(&e));
    assert_eq!(seqs, [1, 3, 4]);
    app.append("s", json!([{"type":"b","data":5},{"type":"c","data":6}]))
        .await;
    assert_eq!(seq(&sse.envelope().await), 6);
    // stream.closed is always delivered, so a filtered subscriber still learns the end.
    let res = app.close_stream("s", None).await;
    assert_eq!(res.status(), 201);
    let closed = sse.envelope().await;
    assert_eq!(closed["type"], "stream.closed");
    assert_eq!(seq(&closed), 7);
    sse.expect_end().await;
    // Resuming a filtered subscription by its last id skips nothing it asked for.
    let mut again = open_sse(&app, "s", "?types=b", Some("3")).await.sse();
    assert_eq!(seq(&again.envelope().await), 5);
    assert_eq!(again.envelope().await["type"], "stream.closed");
    again.expect_end().await;
}

#[backend_test]
async fn a_closed_stream_ends_responses_and_answers_204_at_its_head(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!([{"data":1,"key":"k"},{"data":2}]))
        .await;
    let mut live = open_sse(&app, "s", "", None).await.sse();
    live.expect_seqs(1, 2).await;
    let res = app
        .close_stream("s", Some(json!({"reason":"finished"})))
        .await;
    assert_eq!(res.status(), 201);
    let closed = live.envelope().await;
    assert_eq!(closed["type"], "stream.closed");
    assert_eq!(closed["data"], json!({"reason":"finished"}));
    live.expect_end().await;

    // At or past the head of a closed stream: 204, so EventSource stops reconnecting.
    for (query, last_id) in [
        ("", Some("3")),
        ("?after=3", None),
        ("?after=9", None),
        ("", Some("9")),
        ("?from=now", None),
        ("?since=2999-01-01T00:00:00Z", None),
    ] {
        let res = wire::get_sse(app.addr, "s", query, last_id).await;
        assert_eq!(res.status, 204, "{query} {last_id:?}");
    }
    // Behind the head: the rest, then the end.
    let mut behind = open_sse(&app, "s", "?after=1", None).await.sse();
    behind.expect_seqs(2, 3).await;
    behind.expect_end().await;
    // from=snapshot: the snapshot, then the close, then the end (never an endless wait).
    let mut snap = open_sse(&app, "s", "?from=snapshot", None).await.sse();
    assert_eq!(seq(&snap.envelope().await), 1);
    assert_eq!(snap.envelope().await["type"], "stream.closed");
    snap.expect_end().await;
}

/// from=snapshot: the latest event per key (in seq order), an `id:` at the snapshot's
/// position, then everything after it.
#[backend_test]
async fn snapshot_then_tail(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append(
        "s",
        json!([
            {"data":1,"key":"b"},{"data":2,"key":"a"},{"data":3},{"data":4,"key":"b"},{"data":5}
        ]),
    )
    .await;
    let envs = raw_envelopes(&app, "s").await;
    let mut frames = open_sse(&app, "s", "?from=snapshot", None).await.frames();
    assert_eq!(frames.next().await.unwrap(), "retry: 2000");
    assert_eq!(
        frames.next().await.unwrap(),
        format!("id: 2\ndata: {}", envs[1])
    );
    assert_eq!(
        frames.next().await.unwrap(),
        format!("id: 4\ndata: {}", envs[3])
    );
    assert_eq!(frames.next().await.unwrap(), "id: 5");
    app.append("s", json!({"data":6,"key":"a"})).await;
    let f = frames.next_content().await.unwrap();
    assert!(f.starts_with("id: 6\ndata: "), "{f}");

    // EventSource reconnecting (Last-Event-ID) to a from=snapshot URL resumes by cursor: no
    // second snapshot.
    let mut again = open_sse(&app, "s", "?from=snapshot", Some("5")).await.sse();
    again.expect_seqs(6, 6).await;

    // With a filter the snapshot is filtered too.
    app.append("s", json!({"type":"other","data":7,"key":"c"}))
        .await;
    let mut sse = open_sse(&app, "s", "?from=snapshot&types=other", None)
        .await
        .sse();
    assert_eq!(seq(&sse.envelope().await), 7);
}

/// A subscription to a stream that does not exist yet waits for it, whatever its start.
#[backend_test]
async fn subscribing_to_a_missing_stream_waits_for_it(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut plain = open_sse(&app, "later", "", None).await.sse();
    let mut snap = open_sse(&app, "later", "?from=snapshot", None).await.sse();
    let mut now = open_sse(&app, "later", "?from=now", None).await.sse();
    let mut since = open_sse(&app, "later", "?since=2000-01-01T00:00:00Z", None)
        .await
        .sse();
    wait_until_subscribed(&app, 4).await;
    app.append("later", json!([{"data":1,"key":"k"},{"data":2}]))
        .await;
    for sub in [&mut plain, &mut snap, &mut now, &mut since] {
        sub.expect_seqs(1, 2).await;
    }
}

async fn wait_until_subscribed(app: &TestApp, n: u64) {
    wait_until("subscriptions to register", || async {
        stats(app).await["subscriptions"].as_u64() == Some(n)
    })
    .await;
}

/// A stream deleted while its last append's fan-out is still on the way, then re-created: a
/// subscriber that opened in between (the stream did not exist) must not take those trailing
/// live events for the new stream's; it gets the new stream's events from the log.
#[backend_test]
async fn live_events_of_a_deleted_incarnation_do_not_reach_a_new_subscriber(db: TestDb) {
    use tailcast::live::{Filter, Frame, Hub, Item, Source, Start, Subscription};
    use tailcast::log::{StoredEvent, StreamName};

    let app = TestApp::spawn(db.clone()).await;
    let hub = Hub::new(16, usize::MAX);
    let source = Source {
        db: db.db.clone(),
        reader: tailcast::log::LogReader::new(db.db.clone(), tailcast::log::Replicas::none()),
        hub: hub.clone(),
        page: 100,
        snapshot_bytes: usize::MAX,
    };
    let name = StreamName::parse("reborn").unwrap();
    let (mut sub, opened) = Subscription::open(
        source,
        name.clone(),
        Start::After(0),
        Filter::default(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(opened.head, 0);
    let frame = |data: &str| {
        let ev = StoredEvent {
            seq: 1,
            ty: "message".into(),
            data: data.into(),
            id: None,
            key: None,
            time: chrono::Utc::now(),
            body: None,
            by: None,
            append: false,
        };
        Frame::new("reborn", &ev, None)
    };
    // The old incarnation's seq 1 arrives late, while the stream does not exist: nothing may
    // be delivered for it (the bounded wait observes that nothing comes; it synchronises
    // nothing). Then the new stream's seq 1 is committed and fanned out.
    hub.publish(&name, vec![frame("\"stale\"")], 1);
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), sub.next()).await;
    if let Ok(Some(Ok(Item::Event(f)))) = &early {
        panic!(
            "a deleted incarnation's event was delivered: {}",
            String::from_utf8_lossy(&f.envelope)
        );
    }
    app.append("reborn", json!({"data": "fresh"})).await;
    hub.publish(&name, vec![frame("\"fresh\"")], 1);
    let item = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("an item in time")
        .expect("the subscription goes on")
        .expect("no error");
    let Item::Event(f) = item else {
        panic!("expected an event, got {item:?}")
    };
    let env: serde_json::Value = serde_json::from_slice(&f.envelope).unwrap();
    assert_eq!(env["seq"], 1);
    assert_eq!(env["data"], "fresh");
}
