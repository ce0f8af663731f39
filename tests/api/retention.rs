//! Retention: default and per-stream limits, enforced in bounded batches by a background
//! task, safe with several nodes; readers before the oldest retained event get a `gap`.

use std::time::Duration;

use serde_json::{json, Value};
use tailcast::log::retention::{self, Policy};
use tokio_util::sync::CancellationToken;

use crate::backend::{ago, backend_test, on_db, TestDb};
use crate::helpers::{wait_until, TestApp};

async fn oldest(app: &TestApp, stream: &str) -> i64 {
    app.get_json(&format!("/v1/streams/{stream}")).await["oldest_seq"]
        .as_i64()
        .unwrap()
}

async fn append_n(app: &TestApp, stream: &str, n: usize) {
    let batch: Vec<Value> = (0..n).map(|i| json!({"data":{"i":i}})).collect();
    app.append(stream, Value::Array(batch)).await;
}

async fn put_retention(app: &TestApp, stream: &str, body: &str) -> reqwest::Response {
    app.client
        .put(app.url(&format!("/v1/streams/{stream}/retention")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[backend_test]
async fn the_default_limit_keeps_the_newest_events_and_readers_get_a_gap_notice(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.retention_max_events = 10;
        c.retention_interval_ms = 20;
    })
    .await;
    append_n(&app, "s", 25).await;
    wait_until("trimmed to the newest 10", || async {
        oldest(&app, "s").await == 16
    })
    .await;
    let page = app.get_json("/v1/streams/s/events?after=0").await;
    let seqs: Vec<i64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (16..=25).collect::<Vec<_>>());
    assert_eq!(page["oldest_seq"], 16);

    // From the beginning and from a cursor inside the removed range: a gap, then the rest.
    for last_event_id in [None, Some("3")] {
        let mut sse = app.sse_events("s", "", last_event_id).await;
        let notice = sse.next().await.unwrap();
        assert_eq!(notice.event, "notice");
        let n: Value = serde_json::from_str(&notice.data).unwrap();
        assert_eq!(n["notice"], "gap");
        assert_eq!(n["oldest"], 16);
        sse.envelopes_through(16, 25).await;
    }
    // A cursor inside the retained range sees no notice.
    let mut sse = app.sse_events("s", "?after=20", None).await;
    sse.envelopes_through(21, 25).await;
    app.shutdown().await;
}

#[backend_test]
async fn per_stream_limits_override_the_default(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.retention_interval_ms = 20).await;
    append_n(&app, "a", 20).await;
    append_n(&app, "b", 20).await;
    let res = put_retention(&app, "a", r#"{"max_events":5}"#).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["max_events"], 5);
    assert_eq!(body["max_age_s"], Value::Null);
    assert_eq!(body["effective"], json!({"max_age_s":0,"max_events":5}));

    wait_until("a trimmed", || async { oldest(&app, "a").await == 16 }).await;
    // The pass that trimmed `a` looked at `b` too, and `b` has no limit.
    assert_eq!(oldest(&app, "b").await, 1);
    assert_eq!(app.read_all("b").await.len(), 20);

    // Clearing the override (null) goes back to the default: unlimited.
    let res = put_retention(&app, "a", r#"{"max_events":null}"#).await;
    assert_eq!(res.status(), 200);
    let got = app.get_json("/v1/streams/a/retention").await;
    assert_eq!(got["max_events"], Value::Null);
    assert_eq!(got["oldest_seq"], 16);
    app.shutdown().await;
}

#[backend_test]
async fn bad_retention_settings_get_specific_errors(db: TestDb) {
    let app = TestApp::spawn(db).await;
    append_n(&app, "a", 1).await;
    for (body, status, code) in [
        (r#"{"max_events":-1}"#, 400, "invalid_parameter"),
        (r#"{"max_age_s":"1d"}"#, 400, "invalid_parameter"),
        (r#"{"max_rows":1}"#, 400, "invalid_parameter"),
        (r#"{"max_events":"#, 400, "invalid_json"),
    ] {
        let res = put_retention(&app, "a", body).await;
        assert_eq!(res.status(), status, "{body}");
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["code"], code, "{body}");
    }
    let res = put_retention(&app, "missing", r#"{"max_events":1}"#).await;
    assert_eq!(res.status(), 404);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "stream_not_found");
    // Nothing was half-applied.
    let got = app.get_json("/v1/streams/a/retention").await;
    assert_eq!(got["max_events"], Value::Null);
    app.shutdown().await;
}

#[backend_test]
async fn age_limits_remove_old_events_but_a_closed_stream_keeps_its_end(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.retention_interval_ms = 20).await;
    append_n(&app, "open", 5).await;
    append_n(&app, "done", 5).await;
    let res = app.close_stream("done", None).await;
    assert_eq!(res.status(), 201);
    append_n(&app, "open", 2).await;
    // Age the first five events of `open` and every event of `done` by an hour.
    let hour_ago = ago(Duration::from_secs(3600));
    let aged = on_db!(app.db, |ex| sqlx::query(
        "update events set time = $1
         where seq <= 5 or stream_id = (select id from streams where name = 'done')",
    )
    .bind(hour_ago)
    .execute(ex)
    .await
    .unwrap()
    .rows_affected());
    assert_eq!(aged, 5 + 6);
    for s in ["open", "done"] {
        let res = put_retention(&app, s, r#"{"max_age_s":60}"#).await;
        assert_eq!(res.status(), 200);
    }
    wait_until("old events of `open` gone", || async {
        oldest(&app, "open").await == 6
    })
    .await;
    // Every event of `done` is old, but its last (stream.closed, seq 6) stays.
    wait_until("`done` trimmed", || async {
        oldest(&app, "done").await == 6
    })
    .await;
    let mut sse = app.sse_events("done", "", None).await;
    let n: Value = serde_json::from_str(&sse.next().await.unwrap().data).unwrap();
    assert_eq!(n["notice"], "gap");
    let closed = sse.envelopes_through(6, 6).await;
    assert_eq!(closed[0]["type"], "stream.closed");
    assert!(
        sse.next().await.is_none(),
        "the response ends at stream.closed"
    );
    let res = app.sse("done", "", Some("6")).await;
    assert_eq!(res.status(), 204);
    app.shutdown().await;
}

#[backend_test]
async fn several_nodes_trimming_at_once_delete_each_event_once(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    for s in 0..6 {
        for _ in 0..3 {
            append_n(&app, &format!("s{s}"), 100).await;
        }
    }
    let policy = Policy {
        max_age_s: 0,
        max_events: 50,
        batch: 7,
    };
    let nodes = [
        db.node("r1").await,
        db.node("r2").await,
        db.node("r3").await,
    ];
    let stop = CancellationToken::new();
    let mut deleted = 0;
    // Passes stop early when another node holds the lock; repeat until nothing is left.
    loop {
        let runs = futures::future::join_all(
            nodes
                .iter()
                .map(|n| retention::run_once(&n.db, &policy, &stop)),
        )
        .await;
        let n: u64 = runs.into_iter().map(Result::unwrap).sum();
        if n == 0 {
            break;
        }
        deleted += n;
    }
    assert_eq!(deleted, 6 * 250);
    for s in 0..6 {
        let name = format!("s{s}");
        assert_eq!(oldest(&app, &name).await, 251);
        let events = app.read_all(&name).await;
        let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert_eq!(seqs, (251..=300).collect::<Vec<_>>());
    }
    app.shutdown().await;
}

// The file shrinking is SQLite's (PostgreSQL's own vacuum reclaims space there).
#[backend_test(sqlite)]
async fn on_sqlite_the_space_retention_frees_goes_back_to_the_filesystem(db: TestDb) {
    let tailcast::Db::Sqlite(lite) = db.db.clone() else {
        unreachable!("a sqlite test");
    };
    let app = TestApp::spawn(db.clone()).await;
    let big = "x".repeat(16 << 10);
    for _ in 0..16 {
        let batch: Vec<Value> = (0..16).map(|_| json!({"data": big})).collect();
        app.append("big", Value::Array(batch)).await;
    }
    let pages = || async {
        let n: i64 = sqlx::query_scalar("pragma page_count")
            .fetch_one(lite.reader())
            .await
            .unwrap();
        n
    };
    let before = pages().await;
    let res = put_retention(&app, "big", r#"{"max_events":1}"#).await;
    assert_eq!(res.status(), 200);
    let policy = Policy {
        max_age_s: 0,
        max_events: 0,
        batch: 1000,
    };
    let deleted = retention::run_once(&db.db, &policy, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(deleted, 255);
    let free: i64 = sqlx::query_scalar("pragma freelist_count")
        .fetch_one(lite.reader())
        .await
        .unwrap();
    assert_eq!(free, 0);
    // 256 events of 16 KiB were 4 MiB of pages; one is left.
    let after = pages().await;
    assert!(after * 10 < before, "{before} pages before, {after} after");
    assert_eq!(oldest(&app, "big").await, 256);
    app.shutdown().await;
}
