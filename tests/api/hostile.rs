//! A corpus of hostile requests sent byte for byte over raw sockets to a live server: each
//! must get an answer below 500 (or be closed by the HTTP layer) without hurting the server,
//! and the log must be intact afterwards.

use std::net::SocketAddr;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::{now_s, spawn_secured, token, SECRET};
use crate::backend::{backend_test, TestDb};
use crate::helpers::{TestApp, WAIT};

/// Sends `request` as is and returns the response's status and head, or `None` when the
/// server closed the connection without answering. Stops at the end of the response head:
/// a valid SSE request is answered with a body that never ends.
async fn send_raw(addr: SocketAddr, request: &[u8]) -> (Option<u16>, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before reading everything: a failed write is fine.
    // No half-close: hyper takes it as the client going away and drops the response.
    let _ = conn.write_all(request).await;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server answered or closed in time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok());
    (status, text)
}

fn get(target: &[u8], headers: &[u8]) -> Vec<u8> {
    let mut r = b"GET ".to_vec();
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    r.extend_from_slice(headers);
    r.extend_from_slice(b"\r\n");
    r
}

fn post(target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Request targets and headers no client should send.
fn hostile_heads() -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = Vec::new();
    for target in [
        &b"/v1/streams/%00/events"[..],
        b"/v1/streams/%ff%fe/events",
        b"/v1/streams/\xff\xfe/events",
        b"/v1/streams/%E2%9C%93/events",
        b"/v1/streams/a%2Fb/events",
        b"/v1/streams/../../etc/passwd",
        b"/v1/streams//events",
        b"/v1/streams/%/events",
        b"/v1/streams/s/events?after=-1",
        b"/v1/streams/s/events?after=99999999999999999999999",
        b"/v1/streams/s/events?after=1e3",
        b"/v1/streams/s/events?after=%00",
        b"/v1/streams/s/events?limit=0",
        b"/v1/streams/s/events?limit=-9223372036854775808",
        b"/v1/streams/s/events?since=garbage",
        b"/v1/streams/s/events?since=%ff",
        b"/v1/streams/s/events?after=1&since=2026-01-01T00:00:00Z",
        b"/v1/streams/s/events?after=1&after=2",
        b"/v1/streams/s/sse?from=%ff",
        b"/v1/streams/s/sse?from=later",
        b"/v1/streams/s/sse?named=maybe",
        b"/v1/streams/s/sse?after=18446744073709551616",
        b"/v1/streams/s/snapshot?%%%%",
        b"/v1/streams?prefix=%00&after_name=%00",
        b"/v1/streams?prefix=%25&limit=1001",
        b"/v1/streams?after_name=%ff%ff",
        b"/v1/streams?=&=&=&&&",
        b"/v1/streams/s?token=%ff",
        b"*",
        b"http://t/v1/streams",
    ] {
        c.push(get(target, b""));
    }
    let commas = format!("/v1/streams/s/sse?from=now&types={}", ",".repeat(5000));
    c.push(get(commas.as_bytes(), b""));
    let long_name = format!("/v1/streams/{}/events", "a".repeat(201));
    c.push(get(long_name.as_bytes(), b""));
    let absurd = format!("/v1/streams/s/events?{}", "a=b&".repeat(30_000));
    c.push(get(absurd.as_bytes(), b""));
    for header in [
        &b"Last-Event-ID: -5\r\n"[..],
        b"Last-Event-ID: abc\r\n",
        b"Last-Event-ID: \x80\x81\r\n",
        b"Last-Event-ID: 99999999999999999999999999\r\n",
        b"Accept: application/x-ndjson\xff\r\n",
        b"Authorization: \r\n",
        b"X-Nul: a\x00b\r\n",
        b"Bad Header Name: x\r\n",
        b": no-name\r\n",
    ] {
        c.push(get(b"/v1/streams/s/sse?after=0", header));
    }
    let giant = format!("X-Big: {}\r\n", "g".repeat(1 << 20));
    c.push(get(b"/healthz", giant.as_bytes()));
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    c.push(get(b"/healthz", many.as_bytes()));
    c.push(b"BREW /v1/streams HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec());
    c.push(b"GET /healthz\r\n\r\n".to_vec());
    c.push(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec());
    c.push(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00".to_vec());
    c.push(b"\r\n\r\n\r\n".to_vec());
    c.push(b"\x00\x00\x00\x00\x00\x00\x00\x00".to_vec());
    c
}

/// Request bodies no producer should send.
fn hostile_bodies() -> Vec<Vec<u8>> {
    let deep_array = "[".repeat(100_000);
    let deep_data = format!(
        "{{\"data\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_object = "{\"a\":".repeat(100_000);
    let many_empty = format!("[{}{{}}]", "{},".repeat(10_000));
    let long_type = format!("{{\"type\":\"{}\"}}", "t".repeat(10_000));
    vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"}".to_vec(),
        b"null".to_vec(),
        b"\"just a string\"".to_vec(),
        b"[null]".to_vec(),
        b"[[]]".to_vec(),
        deep_array.into_bytes(),
        deep_data.into_bytes(),
        deep_object.into_bytes(),
        many_empty.into_bytes(),
        long_type.into_bytes(),
        b"{\"data\":1e999999}".to_vec(),
        b"{\"data\":-1e-999999}".to_vec(),
        b"{\"data\":123456789012345678901234567890123456789012345678901234567890}".to_vec(),
        b"{\"data\":NaN}".to_vec(),
        b"{\"data\":Infinity}".to_vec(),
        b"\xff\xfe{\"data\":1}".to_vec(),
        b"\xef\xbb\xbf{\"data\":1}".to_vec(),
        b"{\"data\":\"\xff\xfe\"}".to_vec(),
        b"{\"data\":\"a\x00b\"}".to_vec(),
        b"{\"data\":1}\x00".to_vec(),
        b"{\"data\":\"\\u0000\"}".to_vec(),
        b"{\"data\":\"\\ud800\"}".to_vec(),
        b"{\"type\":\"\\u0000\"}".to_vec(),
        b"{\"type\":\"a\\u0007b\"}".to_vec(),
        b"{\"id\":\"\\ud800\"}".to_vec(),
        b"{\"key\":\"\\u0000\"}".to_vec(),
        b"{\"type\":\"a\",\"type\":\"b\"}".to_vec(),
        b"{\"data\":1,\"data\":2}".to_vec(),
        b"{\"type\":[\"a\"]}".to_vec(),
        b"{\"id\":1e400}".to_vec(),
        b"{\"type\":\"stream.closed\"}".to_vec(),
        b"{\"type\":\"\xe2\x80\xae\xf0\x9f\x92\xa9\"}".to_vec(),
        b"[{\"data\":1},".to_vec(),
        b"{\"data\":1} {\"data\":2}".to_vec(),
    ]
}

#[backend_test]
async fn hostile_requests_get_client_errors_and_the_server_carries_on(db: TestDb) {
    // Short deadlines: truncated heads and bodies are answered (or closed) by them.
    let app = TestApp::spawn_with(db, |c| {
        c.header_timeout_s = 2;
        c.body_timeout_s = 2;
    })
    .await;
    app.append("canary", json!([{"data":1},{"data":2}])).await;
    let mut requests = hostile_heads();
    for body in hostile_bodies() {
        requests.push(post("/v1/streams/h:1/events", "", &body));
        requests.push(post("/v1/streams/h:2/events?expected_seq=-1", "", &body));
        requests.push(post("/v1/streams/h:3/close", "", &body));
    }
    // Framing attacks on the body itself.
    for (headers, body) in [
        (
            "Transfer-Encoding: chunked\r\n",
            &b"zz\r\n{}\r\n0\r\n\r\n"[..],
        ),
        (
            "Transfer-Encoding: chunked\r\n",
            b"ffffffffffffffffff\r\nx\r\n",
        ),
        ("Content-Length: 5\r\n", b"{}"),
        ("Content-Length: -1\r\n", b"{}"),
        ("Content-Length: 99999999999999999999\r\n", b"{}"),
        ("Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
    ] {
        let mut r = format!(
            "POST /v1/streams/h:4/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n"
        )
        .into_bytes();
        r.extend_from_slice(body);
        requests.push(r);
    }
    for (i, request) in requests.iter().enumerate() {
        eprintln!(
            "DBG {i} {:?}",
            String::from_utf8_lossy(&request[..request.len().min(100)])
        );
        let (status, text) = send_raw(app.addr, request).await;
        let shown = String::from_utf8_lossy(&request[..request.len().min(120)]);
        if let Some(s) = status {
            assert!(s < 500, "request {i} {shown:?} got {s}: {text:.300}");
        }
    }
    // Still serving, and the log is whole: the canary reads back as written.
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    let canary = app.read_all("canary").await;
    let seqs: Vec<i64> = canary.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2]);
    // Whatever of the corpus was valid JSON was appended whole and gap-free.
    for stream in ["h:1", "h:2", "h:3", "h:4"] {
        let res = app.get(&format!("/v1/streams/{stream}")).await;
        if res.status() == StatusCode::OK {
            let head = res.json::<serde_json::Value>().await.unwrap()["head"]
                .as_i64()
                .unwrap();
            // Read as text: data such as 1e999999 is kept byte-exact, beyond what a client's
            // JSON parser may accept.
            let page = app
                .get(&format!("/v1/streams/{stream}/events?after=0&limit=1000"))
                .await
                .text()
                .await
                .unwrap();
            for seq in 1..=head {
                assert!(
                    page.contains(&format!("\"seq\":{seq},")),
                    "{stream} lacks {seq}"
                );
            }
        }
    }
}

fn jwt(alg: Algorithm, claims: serde_json::Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[backend_test]
async fn hostile_tokens_are_refused_with_401(db: TestDb) {
    let app = spawn_secured(db).await;
    let far = now_s() + 3600;
    let mut tokens = vec![
        "a.b.c".to_owned(),
        "....".to_owned(),
        "x".repeat(10_000),
        // alg=none with admin claims.
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5LCJhZG1pbiI6dHJ1ZX0.".to_owned(),
        jwt(Algorithm::HS512, json!({"sub":"x","exp":far,"admin":true})),
        jwt(Algorithm::HS256, json!({"sub":"x","admin":true})),
        jwt(
            Algorithm::HS256,
            json!({"sub":"x","exp":"never","admin":true}),
        ),
        jwt(Algorithm::HS256, json!({"sub":"x","exp":1e30,"admin":true})),
        jwt(Algorithm::HS256, json!({"sub":"x","exp":-1,"admin":true})),
        jwt(Algorithm::HS256, json!({"sub":"x","exp":far,"read":"*"})),
        jwt(Algorithm::HS256, json!({"sub":"x","exp":far,"read":[1,2]})),
        jwt(
            Algorithm::HS256,
            json!({"sub":"x","exp":far,"admin":"true"}),
        ),
        jwt(
            Algorithm::HS256,
            json!({"sub":"x","exp":far,"nbf":far,"admin":true}),
        ),
    ];
    // A valid token with one signature character changed (not the last: its low bits are
    // padding that a decoder may ignore).
    let valid = token(json!({"read":["*"]}));
    let at = valid.len() - 10;
    let swapped = if &valid[at..=at] == "A" { "B" } else { "A" };
    tokens.push(format!("{}{swapped}{}", &valid[..at], &valid[at + 1..]));
    for t in &tokens {
        for path in ["/v1/streams/s/events", "/v1/stats"] {
            let res = app
                .client
                .get(app.url(path))
                .bearer_auth(t)
                .send()
                .await
                .unwrap();
            let status = res.status();
            let text = res.text().await.unwrap();
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {t:.80}: {text}");
            assert!(!text.contains(t.as_str()), "the token was echoed");
        }
        let target = format!("/v1/streams/s/sse?token={t}");
        let (status, _) = send_raw(app.addr, &get(target.as_bytes(), b"")).await;
        assert!(matches!(status, Some(401) | Some(414)), "{status:?}");
    }
}

/// WebSocket messages no client should send.
fn hostile_frames() -> Vec<String> {
    let mut frames: Vec<String> = [
        "",
        " ",
        "null",
        "[]",
        "42",
        "\"op\"",
        "{",
        "{}",
        "{\"op\":null}",
        "{\"op\":\"\"}",
        "{\"op\":\"subscribe\"}",
        "{\"op\":\"subscribe\",\"stream\":\"\\u0000\"}",
        "{\"op\":\"subscribe\",\"stream\":\"s\",\"after\":-1}",
        "{\"op\":\"subscribe\",\"stream\":\"s\",\"after\":1e999999}",
        "{\"op\":\"subscribe\",\"stream\":\"s\",\"after\":\"1\"}",
        "{\"op\":\"subscribe\",\"stream\":\"s\",\"from\":\"later\"}",
        "{\"op\":\"subscribe\",\"stream\":\"s\",\"types\":[1,null]}",
        "{\"op\":\"subscribe\",\"stream\":\"✓\"}",
        "{\"op\":\"publish\",\"stream\":\"s\",\"events\":\"x\"}",
        "{\"op\":\"publish\",\"stream\":\"s\",\"events\":[]}",
        "{\"op\":\"publish\",\"stream\":\"s\",\"events\":[{\"type\":\"stream.closed\"}]}",
        "{\"op\":\"publish\",\"stream\":\"s\",\"events\":[{\"id\":\"\\u0000\"}]}",
        "{\"op\":\"publish\",\"stream\":\"s\",\"events\":[{\"data\":1}],\"expected_seq\":-5}",
        "{\"op\":\"input\",\"stream\":\"s\",\"request_id\":\"\\u0000\",\"data\":1}",
        "{\"op\":\"stop\",\"stream\":\"s\",\"reason\":",
        "{\"op\":\"unsubscribe\",\"stream\":\"never\"}",
        "\u{feff}{\"op\":\"ping\"}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    frames.push(format!("{{\"op\":\"ping\",\"ref\":{}", "[".repeat(100_000)));
    frames.push(format!("{}{}", "{\"a\":".repeat(50_000), "1"));
    frames.push(format!(
        "{{\"op\":\"publish\",\"stream\":\"s\",\"events\":[{}]}}",
        vec!["{}"; 5000].join(",")
    ));
    frames
}

#[backend_test]
async fn hostile_websocket_messages_get_error_ops_and_the_socket_lives(db: TestDb) {
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::spawn_with(db, |c| c.ws_max_message_bytes = 256 << 10).await;
    let mut bystander = app.ws().await;
    bystander.subscribe("calm", json!({"after": 0})).await;
    let mut ws = app.ws().await;
    for (i, frame) in hostile_frames().iter().enumerate() {
        ws.send_text(frame).await;
        let reply = ws.recv().await;
        assert_eq!(reply["op"], "error", "frame {i} {frame:.80}: {reply}");
        let status = reply["status"].as_u64().unwrap_or(400);
        assert!((400..500).contains(&status), "frame {i}: {reply}");
    }
    ws.send_message(Message::binary(vec![0u8, 159, 146, 150]))
        .await;
    assert_eq!(ws.recv().await["op"], "error");
    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong");
    // Nothing reached the log through the corpus.
    assert_eq!(
        app.get("/v1/streams/s").await.status(),
        StatusCode::NOT_FOUND
    );
    // An oversized message closes that socket with 1009; others carry on.
    ws.send_text(&"x".repeat(300 << 10)).await;
    let close = ws.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
    app.append("calm", json!({"data": 1})).await;
    assert_eq!(bystander.next_event().await["seq"], 1);
}
