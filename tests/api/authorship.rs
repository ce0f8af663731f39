//! Authorship: an event appended by an authenticated caller carries its token's `sub` as
//! `by` (the admin token's is `admin`), on every way of appending (REST and WebSocket
//! publishes, answers, stops, closes, Durable Streams appends), stored so that replay is
//! byte-identical to live; anonymous callers' events have none.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::auth::{call, spawn_secured, token, ADMIN};
use crate::backend::{backend_test, TestDb};
use crate::helpers::TestApp;

/// Every event of `stream`, read with the admin token.
async fn events(app: &TestApp, stream: &str) -> Vec<Value> {
    let res = call(
        app,
        Method::GET,
        &format!("/v1/streams/{stream}/events?after=0&limit=1000"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let page: Value = res.json().await.unwrap();
    page["events"].as_array().unwrap().clone()
}

/// `(type, by)` of every event of `stream`, in order (`by` null when absent).
async fn authors(app: &TestApp, stream: &str) -> Vec<(String, Value)> {
    events(app, stream)
        .await
        .iter()
        .map(|e| {
            let by = e.get("by").cloned().unwrap_or(Value::Null);
            (e["type"].as_str().unwrap().to_owned(), by)
        })
        .collect()
}

async fn post(app: &TestApp, path: &str, bearer: &str, body: Value) -> Value {
    let res = call(app, Method::POST, path, Some(bearer), Some(&body)).await;
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert!(status.is_success(), "POST {path}: {status} {body}");
    body
}

#[backend_test]
async fn rest_appends_answers_stops_and_closes_carry_their_authors_sub(db: TestDb) {
    let app = spawn_secured(db).await;
    let alice = token(json!({"sub":"alice","write":["run:*"]}));
    let carol = token(json!({"sub":"carol","answer":["run:*"]}));
    let nameless = token(json!({"sub":null,"write":["run:*"]}));
    let s = "run:rest";
    post(
        &app,
        &format!("/v1/streams/{s}/events"),
        &alice,
        json!({"data":1}),
    )
    .await;
    post(
        &app,
        &format!("/v1/streams/{s}/events"),
        ADMIN,
        json!([{"data":2},{"data":3}]),
    )
    .await;
    post(
        &app,
        &format!("/v1/streams/{s}/events"),
        &nameless,
        json!({"data":4}),
    )
    .await;
    post(
        &app,
        &format!("/v1/streams/{s}/inputs"),
        &alice,
        json!({"request_id":"deploy","prompt":"Deploy?"}),
    )
    .await;
    post(
        &app,
        &format!("/v1/streams/{s}/inputs/deploy"),
        &carol,
        json!({"data":"yes"}),
    )
    .await;
    post(
        &app,
        &format!("/v1/streams/{s}/stop"),
        &carol,
        json!({"reason":"enough"}),
    )
    .await;
    post(&app, &format!("/v1/streams/{s}/close"), ADMIN, json!({})).await;
    let by = |who: &str| json!(who);
    assert_eq!(
        authors(&app, s).await,
        vec![
            ("message".into(), by("alice")),
            ("message".into(), by("admin")),
            ("message".into(), by("admin")),
            // A token without `sub` authors nothing anyone could name.
            ("message".into(), Value::Null),
            ("input.requested".into(), by("alice")),
            ("input.answered".into(), by("carol")),
            ("control.stop".into(), by("carol")),
            ("stream.closed".into(), by("admin")),
        ]
    );
    // Who approved it, also on the request's status: the answered event says so.
    let answered = &events(&app, s).await[5];
    assert_eq!(
        answered["data"],
        json!({"request_id":"deploy","data":"yes"})
    );
}

#[backend_test]
async fn websocket_publishes_answers_and_stops_carry_their_authors_sub_live_and_on_replay(
    db: TestDb,
) {
    let app = spawn_secured(db).await;
    let bob = token(json!({"sub":"bob","read":["*"],"write":["run:*"]}));
    let dana = token(json!({"sub":"dana","read":["*"],"answer":["run:*"]}));
    let s = "run:ws";
    let mut watcher = app.ws_path(&format!("/v1/ws?token={bob}")).await;
    watcher.subscribe(s, json!({})).await;
    let mut writer = app.ws_path(&format!("/v1/ws?token={bob}")).await;
    writer.publish(s, json!([{"data":"hi"}])).await;
    post(
        &app,
        &format!("/v1/streams/{s}/inputs"),
        ADMIN,
        json!({"request_id":"q","prompt":"ok?"}),
    )
    .await;
    let mut approver = app.ws_path(&format!("/v1/ws?token={dana}")).await;
    let ack = approver
        .request(json!({"op":"input","stream":s,"request_id":"q","data":true}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let ack = approver.request(json!({"op":"stop","stream":s})).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let mut admin = app.ws_path(&format!("/v1/ws?token={ADMIN}")).await;
    admin.publish(s, json!({"data":"from ops"})).await;

    let mut live = Vec::new();
    for _ in 0..5 {
        let mut ev = watcher.next_event().await;
        ev.as_object_mut().unwrap().remove("op");
        live.push(ev);
    }
    let replay = events(&app, s).await;
    assert_eq!(live, replay, "live and replay differ");
    let by: Vec<&Value> = replay.iter().map(|e| &e["by"]).collect();
    assert_eq!(
        by,
        vec![
            &json!("bob"),
            &json!("admin"),
            &json!("dana"),
            &json!("dana"),
            &json!("admin")
        ]
    );
    assert_eq!(replay[2]["type"], "input.answered");
    assert_eq!(replay[3]["type"], "control.stop");
}

#[backend_test]
async fn anonymous_events_have_no_author(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("open", json!({"data":1})).await;
    let mut ws = app.ws().await;
    ws.publish("open", json!({"data":2})).await;
    let res = app
        .client
        .post(app.url("/v1/streams/open/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let text = app
        .get("/v1/streams/open/events?after=0")
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("\"by\""), "{text}");
    assert_eq!(app.read_all("open").await.len(), 3);
}

#[backend_test]
async fn durable_streams_appends_carry_their_authors_sub(db: TestDb) {
    let app = spawn_secured(db).await;
    let erin = token(json!({"sub":"erin","write":["ds:*"]}));
    let put = app
        .client
        .put(app.url("/v1/stream/ds:1"))
        .bearer_auth(&erin)
        .header("content-type", "application/json")
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let append = app
        .client
        .post(app.url("/v1/stream/ds:1"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("[2]")
        .send()
        .await
        .unwrap();
    assert!(append.status().is_success(), "{}", append.status());
    let by: Vec<Value> = events(&app, "ds:1")
        .await
        .iter()
        .map(|e| e["by"].clone())
        .collect();
    assert_eq!(by, vec![json!("erin"), json!("admin")]);
}

// The SQL functions are PostgreSQL's.
#[backend_test(postgres)]
async fn sql_appends_still_work_and_have_no_author(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let pool = app.db.pg().clone();
    let seq: i64 = sqlx::query_scalar("select tailcast.append('sql', 'message', '{\"a\":1}')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(seq, 1);
    let seqs: Vec<i64> = sqlx::query_scalar(
        "select tailcast.append_many('sql', array['t','t'], array['1'::json, '2'::json])",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(seqs, vec![2, 3]);
    // One definition: the redefinition replaced the old argument list, it did not overload it.
    let defs: i64 =
        sqlx::query_scalar("select count(*) from pg_proc where proname = 'append_jobs'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(defs, 1);
    let events = app.read_all("sql").await;
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.get("by").is_none()), "{events:?}");
    // And the appender's own path still writes authors beside them.
    app.append("sql", json!({"data":4})).await;
    assert_eq!(app.read_all("sql").await.len(), 4);
}
