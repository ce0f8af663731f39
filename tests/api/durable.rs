//! The Durable Streams surface (`/v1/stream/{name}`) as a view of the same log: what it writes
//! is what tailcast's REST and SSE read, seq for seq; bytes come back exactly; producer
//! retries never duplicate. (The protocol itself is held to its own conformance suite by
//! e2e/durable-streams/run.)

use base64::Engine as _;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

use crate::backend::{backend_test, on_db, TestDb};
use crate::helpers::TestApp;

fn offset(seq: i64) -> String {
    format!("0000000000000000_{seq:016}")
}

async fn ds_put(app: &TestApp, name: &str, content_type: &str) -> Response {
    app.client
        .put(app.url(&format!("/v1/stream/{name}")))
        .header("content-type", content_type)
        .send()
        .await
        .expect("PUT")
}

async fn ds_post(
    app: &TestApp,
    name: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> Response {
    let mut req = app
        .client
        .post(app.url(&format!("/v1/stream/{name}")))
        .header("content-type", content_type)
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("POST")
}

async fn ds_get(app: &TestApp, name: &str, query: &str) -> Response {
    app.get(&format!("/v1/stream/{name}{query}")).await
}

fn header<'a>(res: &'a Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .map_or("", |v| v.to_str().unwrap_or_default())
}

#[backend_test]
async fn json_appends_are_the_logs_events_with_the_same_seqs(db: TestDb) {
    let app = TestApp::spawn(db).await;
    assert_eq!(
        ds_put(&app, "ds-json", "application/json").await.status(),
        StatusCode::CREATED
    );
    // One level of array is flattened: three messages, three events; bytes kept as sent.
    let res = ds_post(
        &app,
        "ds-json",
        "application/json",
        r#"[{"b":1,"a":2}, [3, 4]]"#,
        &[],
    )
    .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&res, "stream-next-offset"), offset(2));
    let res = ds_post(&app, "ds-json", "application/json", r#"{"c": "x"}"#, &[]).await;
    assert_eq!(header(&res, "stream-next-offset"), offset(3));

    // tailcast's REST replay: the same seqs, the messages as `data`, type `message`.
    let events = app.read_all("ds-json").await;
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(events[0]["data"], json!({"b":1,"a":2}));
    assert_eq!(events[1]["data"], json!([3, 4]));
    assert_eq!(events[2]["data"], json!({"c":"x"}));
    assert!(events.iter().all(|e| e["type"] == "message"));

    // tailcast's SSE: the same events, live after catch-up.
    let mut sse = app.sse_events("ds-json", "", None).await;
    let live = sse.envelopes_through(1, 3).await;
    assert_eq!(live[0]["data"], json!({"b":1,"a":2}));

    // And the Durable Streams read, from the start and from an offset, byte for byte.
    let res = ds_get(&app, "ds-json", "?offset=-1").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "stream-up-to-date"), "true");
    assert_eq!(
        res.text().await.unwrap(),
        r#"[{"b":1,"a":2},[3, 4],{"c": "x"}]"#
    );
    let res = ds_get(&app, "ds-json", &format!("?offset={}", offset(2))).await;
    assert_eq!(res.text().await.unwrap(), r#"[{"c": "x"}]"#);

    // An event appended through tailcast's REST is a message to Durable Streams readers, and
    // reaches a long-poll that waits at the tail; the SSE follower sees it as seq 4.
    let waiting = {
        let client = app.client.clone();
        let url = app.url(&format!(
            "/v1/stream/ds-json?offset={}&live=long-poll",
            offset(3)
        ));
        tokio::spawn(async move { client.get(url).send().await.expect("long-poll") })
    };
    app.append("ds-json", json!({"data": {"d": 4}})).await;
    let res = waiting.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "stream-next-offset"), offset(4));
    assert_eq!(res.text().await.unwrap(), r#"[{"d":4}]"#);
    assert_eq!(
        sse.envelopes_through(4, 4).await[0]["data"],
        json!({"d": 4})
    );

    // Closing through the protocol is tailcast's `stream.closed`, which readers of the
    // protocol never see as data; the tail stays at the last message.
    let res = ds_post(
        &app,
        "ds-json",
        "application/json",
        "",
        &[("stream-closed", "true")],
    )
    .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&res, "stream-next-offset"), offset(4));
    let info = app.get_json("/v1/streams/ds-json").await;
    assert_eq!(info["closed"], json!(true));
    assert_eq!(info["head"], json!(5));
    let res = ds_get(&app, "ds-json", &format!("?offset={}", offset(4))).await;
    assert_eq!(header(&res, "stream-closed"), "true");
    assert_eq!(res.text().await.unwrap(), "[]");
}

#[backend_test]
async fn byte_streams_keep_every_byte_exactly(db: TestDb) {
    let app = TestApp::spawn(db).await;
    assert_eq!(
        ds_put(&app, "ds-bytes", "application/octet-stream")
            .await
            .status(),
        StatusCode::CREATED
    );
    // Every byte value, invalid UTF-8, NULs, CR/LF: nothing may be re-encoded or trimmed.
    let first: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3, 0x28]).collect();
    let second: Vec<u8> = b"\r\n\0 tail \xf0\x9f\x98".to_vec();
    for chunk in [&first, &second] {
        let res = ds_post(
            &app,
            "ds-bytes",
            "application/octet-stream",
            chunk.clone(),
            &[],
        )
        .await;
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
    }
    let res = ds_get(&app, "ds-bytes", "?offset=-1").await;
    assert_eq!(header(&res, "content-type"), "application/octet-stream");
    let body = res.bytes().await.unwrap();
    let expected: Vec<u8> = first.iter().chain(&second).copied().collect();
    assert_eq!(&body[..], &expected[..]);
    // Each append is one event, and reading from the first one's offset gives the second.
    let res = ds_get(&app, "ds-bytes", &format!("?offset={}", offset(1))).await;
    assert_eq!(&res.bytes().await.unwrap()[..], &second[..]);

    // The log holds the bytes themselves (not an encoding of them)...
    let stored: Vec<Vec<u8>> = on_db!(app.db, |ex| {
        sqlx::query_scalar(
            "select e.body from events e join streams s on s.id = e.stream_id
             where s.name = 'ds-bytes' order by e.seq",
        )
        .fetch_all(ex)
        .await
        .unwrap()
    });
    assert_eq!(stored, [first.clone(), second.clone()]);
    // ...and tailcast's envelope carries them base64-encoded, marked as such.
    let events = app.read_all("ds-bytes").await;
    assert_eq!(events[0]["encoding"], json!("base64"));
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(events[0]["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, first);
}

#[backend_test]
async fn producer_retries_never_duplicate(db: TestDb) {
    let app = TestApp::spawn(db).await;
    ds_put(&app, "ds-prod", "application/json").await;
    let producer = |seq: &'static str| {
        [
            ("producer-id", "writer-1"),
            ("producer-epoch", "0"),
            ("producer-seq", seq),
        ]
    };
    let res = ds_post(
        &app,
        "ds-prod",
        "application/json",
        "[1, 2]",
        &producer("0"),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "producer-seq"), "0");

    // The same request again: a duplicate, answered 204, nothing written.
    let res = ds_post(
        &app,
        "ds-prod",
        "application/json",
        "[1, 2]",
        &producer("0"),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    // Ten copies of the next request at once: one is written, the others are duplicates.
    let next = producer("1");
    let sends = (0..10).map(|_| ds_post(&app, "ds-prod", "application/json", "3", &next));
    let statuses: Vec<StatusCode> = futures::future::join_all(sends)
        .await
        .iter()
        .map(Response::status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::OK || *s == StatusCode::NO_CONTENT));

    // Even if the producer's recorded state is lost (a crash between the append's commit
    // and that record), a retry is still a duplicate: the appender knows its event ids.
    on_db!(app.db, |ex| {
        sqlx::query("delete from ds_producers")
            .execute(ex)
            .await
            .unwrap()
            .rows_affected()
    });
    for (body, seq) in [("[1, 2]", "0"), ("3", "1")] {
        let res = ds_post(&app, "ds-prod", "application/json", body, &producer(seq)).await;
        assert_eq!(res.status(), StatusCode::NO_CONTENT, "retry of seq {seq}");
    }

    let res = ds_get(&app, "ds-prod", "?offset=-1").await;
    assert_eq!(res.text().await.unwrap(), "[1,2,3]");
    let data: Vec<Value> = app
        .read_all("ds-prod")
        .await
        .into_iter()
        .map(|e| e["data"].clone())
        .collect();
    assert_eq!(data, [json!(1), json!(2), json!(3)]);

    // A stale epoch is fenced off; a skipped seq is refused with the one expected.
    let res = ds_post(&app, "ds-prod", "application/json", "4", &producer("5")).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(header(&res, "producer-expected-seq"), "2");
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "producer_seq_gap");
    let bumped = [
        ("producer-id", "writer-1"),
        ("producer-epoch", "1"),
        ("producer-seq", "0"),
    ];
    assert_eq!(
        ds_post(&app, "ds-prod", "application/json", "4", &bumped)
            .await
            .status(),
        StatusCode::OK
    );
    let res = ds_post(&app, "ds-prod", "application/json", "5", &producer("2")).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&res, "producer-epoch"), "1");
}
