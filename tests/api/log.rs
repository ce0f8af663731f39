//! The event log through REST: append, idempotency, errors, replay.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::TestApp;

#[sqlx::test]
async fn append_assigns_seqs_and_replay_returns_data_byte_for_byte(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    let body = r#"[{"type":"token","data":{"z":1,  "a":"h\u00e9llo 😀","n":123456789012345678901234567890},"id":"a"},{"data":[1e400, "x"]}]"#;
    let res = app.append_raw("run:1", "", body).await;
    assert_eq!(res.status(), 201);
    let res: Value = res.json().await.unwrap();
    assert_eq!(
        res,
        json!({"stream":"run:1","first_seq":1,"last_seq":2,"events":[{"seq":1,"id":"a"},{"seq":2}]})
    );

    let text = app
        .get("/v1/streams/run:1/events?after=0")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#""data":{"z":1,  "a":"h\u00e9llo 😀","n":123456789012345678901234567890},"id":"a""#
        ),
        "{text}"
    );
    assert!(text.contains(r#""data":[1e400, "x"]"#), "{text}");
    app.shutdown().await;
}

#[sqlx::test]
async fn a_repeated_event_id_is_stored_once(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.append("s", json!({"data":1,"id":"x"})).await;
    let again = app
        .append(
            "s",
            json!([{"data":2,"id":"x"},{"data":3,"id":"y"},{"data":4,"id":"y"}]),
        )
        .await;
    assert_eq!(
        again["events"],
        json!([{"seq":1,"id":"x","duplicate":true},{"seq":2,"id":"y"},{"seq":2,"id":"y","duplicate":true}])
    );
    let all = app.read_all("s").await;
    let data: Vec<&Value> = all.iter().map(|e| &e["data"]).collect();
    assert_eq!(data, vec![&json!(1), &json!(3)]);
}
