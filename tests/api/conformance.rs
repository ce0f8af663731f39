//! Conformance with the README and openapi.yaml, checked the way an external client sees the wire: raw response
//! text where the contract shows a shape, and the state a refused request leaves behind.

use jsonwebtoken::{encode, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::{now_s, SECRET};
use crate::backend::{backend_test, TestDb};
use crate::helpers::{read_response, TestApp, WAIT};

/// Asserts that `keys` appear in `text` as object keys, in this order.
fn assert_key_order(text: &str, keys: &[&str]) {
    let mut last = 0;
    for key in keys {
        let needle = format!("\"{key}\":");
        let at = text[last..]
            .find(&needle)
            .unwrap_or_else(|| panic!("{needle} missing or out of order in {text}"));
        last += at + needle.len();
    }
}

#[backend_test]
async fn refused_appends_leave_no_stream_behind(db: TestDb) {
    let app = TestApp::spawn(db).await;
    // expected_seq on a stream that does not exist: the conflict must not create it.
    let res = app
        .append_raw("conf:ghost", "?expected_seq=3", r#"{"data":1}"#)
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "seq_conflict");
    assert_eq!(body["head"], 0);
    let res = app.get("/v1/streams/conf:ghost").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let list = app.get_json("/v1/streams?prefix=conf:").await;
    assert_eq!(list["streams"], json!([]), "{list}");
    // Its first real append still starts the stream at seq 1, and expected_seq=0 works.
    let ok = app
        .append_raw("conf:ghost", "?expected_seq=0", r#"{"data":2}"#)
        .await;
    assert_eq!(ok.status(), StatusCode::CREATED);
    let ok: Value = ok.json().await.unwrap();
    assert_eq!(ok["first_seq"], 1);
    let info = app.get_json("/v1/streams/conf:ghost").await;
    assert_eq!(info["head"], 1);
}

#[backend_test]
async fn json_bodies_keep_the_documented_field_order(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append(
        "conf:order",
        json!({"type": "t", "data": {"z": 1}, "id": "a", "key": "k"}),
    )
    .await;

    let res = app
        .append_raw("conf:order", "?expected_seq=7", r#"{"data":1}"#)
        .await;
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "problem content type"
    );
    let text = res.text().await.unwrap();
    assert!(
        text.starts_with(r#"{"type":"about:blank","title":"#),
        "{text}"
    );
    assert_key_order(
        &text,
        &["type", "title", "status", "code", "detail", "head"],
    );

    let text = app
        .get("/v1/streams/conf:order/events?after=0")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.starts_with(r#"{"stream":"conf:order","events":[{"stream""#),
        "{text}"
    );
    assert_key_order(&text, &["stream", "events", "next_after", "head", "closed"]);

    let text = app
        .get("/v1/streams/conf:order")
        .await
        .text()
        .await
        .unwrap();
    assert_key_order(
        &text,
        &["name", "head", "created_at", "updated_at", "closed"],
    );

    let text = app
        .get("/v1/streams?prefix=conf:")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.starts_with(r#"{"streams":[{"name":"conf:order""#),
        "{text}"
    );
    assert_key_order(&text, &["streams", "next_after_name"]);

    let text = app.get("/v1/stats").await.text().await.unwrap();
    assert_key_order(
        &text,
        &[
            "node_id",
            "uptime_s",
            "connections",
            "sse",
            "ws",
            "subscriptions",
            "live_streams",
        ],
    );
}

#[backend_test]
async fn a_stream_name_that_is_not_utf8_is_echoed_back_as_sent(db: TestDb) {
    let app = TestApp::spawn(db).await;
    for path in [
        "/v1/streams/a%FFb/events",
        "/v1/streams/a%FFb/sse",
        "/v1/streams/a%FFb",
    ] {
        let res = app.get(path).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["code"], "invalid_stream_name", "{path}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("\"a%FFb\""), "{path}: {detail}");
    }
}

#[backend_test]
async fn a_token_without_exp_is_refused_for_that_reason(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.jwt_secret = Some(SECRET.into())).await;
    let no_exp = encode(
        &Header::default(),
        &json!({"sub": "p", "read": ["*"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let with_exp = encode(
        &Header::default(),
        &json!({"sub": "p", "exp": now_s() + 600, "read": ["*"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let get = |token: String| {
        app.client
            .get(app.url("/v1/streams/conf:x/events"))
            .bearer_auth(token)
            .send()
    };
    let res = get(no_exp).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    assert!(
        body["detail"].as_str().unwrap().contains("exp"),
        "the detail names the missing claim: {body}"
    );
    // The same grants with exp pass authentication (the stream just does not exist).
    let res = get(with_exp).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

/// A client that writes its whole over-limit body before reading (what fetch and urllib do)
/// reads the 413 and may go on using the connection, instead of hitting a reset mid-write.
#[backend_test]
async fn an_over_limit_body_sent_in_full_still_gets_its_413(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.max_batch_bytes = 1 << 20).await;
    let data = "x".repeat((1 << 20) + (1 << 18));
    let body = format!(r#"{{"data":"{data}"}}"#);
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    for round in 0..2 {
        let head = format!(
            "POST /v1/streams/conf:big/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let write = async {
            conn.write_all(head.as_bytes()).await?;
            conn.write_all(body.as_bytes()).await
        };
        tokio::time::timeout(WAIT, write)
            .await
            .expect("body written in time")
            .unwrap_or_else(|e| panic!("round {round}: the server cut the upload: {e}"));
        let (status, text) = read_response(&mut conn).await;
        assert_eq!(status, 413, "round {round}: {text}");
        let problem: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(problem["code"], "payload_too_large");
        assert_eq!(problem["limit"], 1 << 20);
    }
    conn.write_all(b"GET /v1/streams/conf:big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, text) = read_response(&mut conn).await;
    assert_eq!(status, 404, "nothing was appended: {text}");
}
