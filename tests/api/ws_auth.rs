//! The auth matrix for the WebSocket: the upgrade × {no token, bad signature, expired,
//! garbage}, then every op × {wrong grant, right grant} on one open connection (a refused op
//! is an `error` op and the connection stays open), token expiry during a connection, the
//! Origin check, and the per-connection limits.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::auth::{admin_append, call, now_s, spawn_secured, token, token_with, ADMIN, SECRET};
use crate::backend::{backend_test, TestDb};
use crate::helpers::{TestApp, WAIT};
use crate::ws_client::WsClient;

async fn head(app: &TestApp, stream: &str) -> Option<i64> {
    let res = call(
        app,
        Method::GET,
        &format!("/v1/streams/{stream}"),
        Some(ADMIN),
        None,
    )
    .await;
    if res.status() == StatusCode::NOT_FOUND {
        return None;
    }
    let v: Value = res.json().await.unwrap();
    v["head"].as_i64()
}

/// The handshake's HTTP status when the server refuses the upgrade.
async fn refused_upgrade(app: &TestApp, path: &str, origin: Option<&str>) -> Option<u16> {
    let mut req = format!("ws://{}{}", app.addr, path)
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", HeaderValue::from_str(o).unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
    {
        Ok(_) => None,
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let body = res.body().as_deref().unwrap_or_default();
            let body = String::from_utf8_lossy(body);
            assert!(!body.contains(SECRET), "{body}");
            Some(res.status().as_u16())
        }
        Err(e) => panic!("unexpected handshake failure: {e}"),
    }
}

fn expect_error(reply: &Value, code: &str) {
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
}

#[backend_test]
async fn the_upgrade_needs_a_valid_token(db: TestDb) {
    let app = spawn_secured(db).await;
    let bad_signature = token_with(
        "some-other-secret-of-enough-length-000",
        json!({"admin": true}),
    );
    let expired = token(json!({"admin": true, "exp": now_s() - 5}));
    assert_eq!(refused_upgrade(&app, "/v1/ws", None).await, Some(401));
    for t in [bad_signature.as_str(), expired.as_str(), "not.a.jwt"] {
        let path = format!("/v1/ws?token={t}");
        assert_eq!(refused_upgrade(&app, &path, None).await, Some(401), "{t}");
    }
    let reader = token(json!({"read": ["x"]}));
    assert_eq!(
        refused_upgrade(&app, &format!("/v1/ws?token={reader}"), None).await,
        None
    );
}

#[backend_test]
async fn every_ws_op_is_checked_against_the_grants(db: TestDb) {
    let app = spawn_secured(db).await;
    admin_append(&app, "w:1", json!("secret")).await;
    let request_id = "r1";
    let res = call(
        &app,
        Method::POST,
        "/v1/streams/w:1/inputs",
        Some(ADMIN),
        Some(&json!({"request_id": request_id, "prompt": "ok?"})),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let head_before = head(&app, "w:1").await;

    // A token that holds every grant, but on other streams.
    let wrong = token(json!({
        "read": ["other:*"], "answer": ["other:*"], "write": ["other:*"]
    }));
    let mut ws = app.ws_path(&format!("/v1/ws?token={wrong}")).await;
    let refused = [
        json!({"op":"subscribe","stream":"w:1","after":0}),
        json!({"op":"publish","stream":"w:1","events":[{"data":1}]}),
        json!({"op":"input","stream":"w:1","request_id":request_id,"data":"yes"}),
        json!({"op":"stop","stream":"w:1"}),
    ];
    for op in &refused {
        let reply = ws.request(op.clone()).await;
        expect_error(&reply, "forbidden");
        assert_eq!(reply["status"], 403, "{reply}");
    }
    // The connection is still open and nothing was written or delivered.
    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong");
    assert_eq!(head(&app, "w:1").await, head_before);

    // Read-only: may subscribe, may not publish, answer or stop.
    let reader = token(json!({"read": ["w:*"]}));
    let mut ws = app.ws_path(&format!("/v1/ws?token={reader}")).await;
    ws.subscribe("w:1", json!({"after": 0})).await;
    assert_eq!(ws.next_event().await["data"], "secret");
    for op in &refused[1..] {
        expect_error(&ws.request(op.clone()).await, "forbidden");
    }
    assert_eq!(head(&app, "w:1").await, head_before);

    // Answer: may answer and stop, may not publish.
    let answerer = token(json!({"answer": ["w:1"]}));
    let mut ws = app.ws_path(&format!("/v1/ws?token={answerer}")).await;
    expect_error(&ws.request(refused[0].clone()).await, "forbidden");
    expect_error(&ws.request(refused[1].clone()).await, "forbidden");
    // The refused attempts above did not answer it: this is the first answer.
    let ack = ws.request(refused[2].clone()).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let ack = ws.request(refused[3].clone()).await;
    assert_eq!(ack["op"], "ack", "{ack}");

    // Write implies answer.
    let writer = token(json!({"write": ["w:*"]}));
    let mut ws = app.ws_path(&format!("/v1/ws?token={writer}")).await;
    let before = head(&app, "w:1").await.unwrap();
    let ack = ws.publish("w:1", json!([{"data": 2}])).await;
    assert_eq!(ack["first_seq"], before + 1);
    let ack = ws.request(refused[3].clone()).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    expect_error(&ws.request(refused[0].clone()).await, "forbidden");
}

#[backend_test]
async fn a_websocket_loses_access_when_its_token_expires(db: TestDb) {
    let app = spawn_secured(db).await;
    admin_append(&app, "wexp:1", json!(1)).await;
    let short = token(json!({"read": ["wexp:*"], "exp": now_s() + 3}));
    let mut ws = app.ws_path(&format!("/v1/ws?token={short}")).await;
    ws.subscribe("wexp:1", json!({"after": 0})).await;
    assert_eq!(ws.next_event().await["seq"], 1);
    let close = loop {
        match ws.recv_message().await {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                expect_error(&v, "unauthorized");
            }
            Message::Close(frame) => break frame.expect("a close frame with a code"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("expired"), "{}", close.reason);
}

#[backend_test]
async fn browser_websockets_must_come_from_an_allowed_origin(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let same_origin = format!("http://{}", app.addr);
    for (origin, refused) in [
        (None, None),
        (Some("https://app.example"), None),
        (Some(same_origin.as_str()), None),
        (Some("https://evil.example"), Some(403)),
        (Some("null"), Some(403)),
    ] {
        assert_eq!(
            refused_upgrade(&app, "/v1/ws", origin).await,
            refused,
            "{origin:?}"
        );
    }
}

#[backend_test]
async fn ws_publishes_count_against_the_publish_rate(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.jwt_secret = Some(SECRET.into());
        c.publish_rate = 0.5;
        c.publish_burst = 2;
    })
    .await;
    let writer = token(json!({"sub": "ws-writer", "write": ["r:*"]}));
    let mut ws: WsClient = app.ws_path(&format!("/v1/ws?token={writer}")).await;
    ws.publish("r:1", json!([{"data": 1}])).await;
    ws.publish("r:1", json!([{"data": 2}])).await;
    let reply = ws
        .request(json!({"op":"publish","stream":"r:1","events":[{"data":3}]}))
        .await;
    expect_error(&reply, "rate_limited");
    assert!(reply["retry_after_s"].as_u64().unwrap() >= 1, "{reply}");
    // The refused publish appended nothing; the connection is still usable.
    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong");
    let res = app
        .client
        .get(app.url("/v1/streams/r:1"))
        .bearer_auth(token(json!({"read": ["r:*"]})))
        .send()
        .await
        .unwrap();
    let info: Value = res.json().await.unwrap();
    assert_eq!(info["head"], 2);
}
