//! Limits under abuse: floods and slowloris clients are bounded, get clear errors, and other
//! clients keep being served. Every loop is bounded and every wait is under a timeout.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::auth::{call, token, SECRET};
use crate::backend::{backend_test, TestDb};
use crate::helpers::{read_response, TestApp, WAIT};

/// A loopback address other than 127.0.0.1: another client, as far as per-address limits go.
const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip)
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn connect_from(ip: IpAddr, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip, 0)).unwrap();
    socket.connect(server).await.unwrap()
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(conn: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut out))
        .await
        .expect("the server closed the connection in time");
    String::from_utf8_lossy(&out).into_owned()
}

async fn problem(res: reqwest::Response) -> Value {
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "status {}",
        res.status()
    );
    res.json().await.unwrap()
}

#[backend_test]
async fn connections_per_client_address_are_capped_and_others_still_served(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.max_connections_per_client = 4).await;
    app.append("cap:1", json!({"data":1})).await;
    // Four long-lived SSE responses hold four connections from 127.0.0.1.
    let mut held = Vec::new();
    for _ in 0..4 {
        let res = app.sse("cap:1", "?after=0", None).await;
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    let fresh = client_from(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let res = fresh.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "1");
    let body = problem(res).await;
    assert_eq!(body["code"], "too_many_connections");
    assert_eq!(body["limit"], 4);
    // Another address is not affected.
    let other = client_from(OTHER_CLIENT);
    let res = other
        .get(app.url("/v1/streams/cap:1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Closing one frees its slot (released when the server sees the close).
    held.pop();
    let deadline = Instant::now() + WAIT;
    loop {
        let c = client_from(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let status = c.get(app.url("/healthz")).send().await.unwrap().status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(Instant::now() < deadline, "the slot was never released");
        tokio::task::yield_now().await;
    }
}

#[backend_test]
async fn slowloris_headers_are_cut_off_and_others_served_meanwhile(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.header_timeout_s = 1;
        c.max_connections_per_client = 8;
    })
    .await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..8 {
        let mut conn = connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), app.addr).await;
        if i % 2 == 0 {
            // Half send a partial request head, half send nothing at all.
            conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
        }
        slow.push(conn);
    }
    // The address is at its cap; another client is served all the same.
    let other = client_from(OTHER_CLIENT);
    for _ in 0..20 {
        let res = other.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    for conn in &mut slow {
        let sent = read_to_close(conn).await;
        assert!(
            !sent.contains("200 OK"),
            "a slow request was served: {sent}"
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "cut off after {took:?}");
    // Their slots are free again.
    let res = client_from(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[backend_test]
async fn a_slow_request_body_gets_408_and_appends_nothing(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.body_timeout_s = 1).await;
    let mut conn = connect_from(IpAddr::V4(Ipv4Addr::LOCALHOST), app.addr).await;
    conn.write_all(
        b"POST /v1/streams/slow:1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"data\":",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, conn.read(&mut buf))
        .await
        .expect("answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    let res = app.get("/v1/streams/slow:1").await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[backend_test]
async fn oversized_bodies_batches_urls_and_headers_get_specific_errors(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.max_batch_bytes = 2000;
        c.max_batch_events = 3;
        c.max_url_bytes = 1024;
        c.max_header_bytes = 4096;
    })
    .await;
    let big = json!({"data": "x".repeat(3000)}).to_string();
    let res = app.append_raw("lim:1", "", big).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem(res).await["code"], "payload_too_large");
    let four = json!([{"data":1},{"data":2},{"data":3},{"data":4}]).to_string();
    let res = app.append_raw("lim:1", "", four).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = problem(res).await;
    assert_eq!(body["code"], "batch_too_large");
    assert_eq!(body["limit"], 3);
    assert_eq!(
        app.get("/v1/streams/lim:1").await.status(),
        StatusCode::NOT_FOUND
    );
    let res = app
        .get(&format!(
            "/v1/streams/lim:1/events?after=0&pad={}",
            "a".repeat(1100)
        ))
        .await;
    assert_eq!(res.status(), StatusCode::URI_TOO_LONG);
    assert_eq!(problem(res).await["code"], "uri_too_long");
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("x-big", "b".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(problem(res).await["code"], "headers_too_large");
}

#[backend_test]
async fn a_publish_flood_is_rate_limited_per_token_while_others_publish(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.jwt_secret = Some(SECRET.into());
        c.publish_rate = 1.0;
        c.publish_burst = 5;
    })
    .await;
    let flooder = token(json!({"sub":"flooder","write":["flood:*"],"read":["*"]}));
    let steady = token(json!({"sub":"steady","write":["steady:*"],"read":["*"]}));
    let started = Instant::now();
    let flood = (0..200).map(|i| {
        let (app, flooder) = (&app, &flooder);
        async move {
            let body = json!({"data": i});
            call(
                app,
                Method::POST,
                "/v1/streams/flood:1/events",
                Some(flooder),
                Some(&body),
            )
            .await
        }
    });
    let results = futures::future::join_all(flood).await;
    let mut accepted = 0;
    for res in results {
        match res.status() {
            StatusCode::CREATED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                let retry: u64 = res.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry >= 1);
                assert_eq!(problem(res).await["code"], "rate_limited");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 5 + elapsed.ceil() as i64;
    assert!(
        accepted >= 5 && accepted <= allowed,
        "{accepted} accepted in {elapsed}s"
    );
    // Exactly the accepted appends are in the log, gap-free.
    let res = call(
        &app,
        Method::GET,
        "/v1/streams/flood:1/events?limit=1000",
        Some(&flooder),
        None,
    )
    .await;
    let page: Value = res.json().await.unwrap();
    let seqs: Vec<i64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=accepted).collect::<Vec<_>>());
    // Another subject's bucket is untouched.
    for i in 0..5 {
        let body = json!({"data": i});
        let res = call(
            &app,
            Method::POST,
            "/v1/streams/steady:1/events",
            Some(&steady),
            Some(&body),
        )
        .await;
        assert_eq!(res.status(), StatusCode::CREATED);
    }
}

#[backend_test]
async fn subscriptions_per_websocket_are_capped(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.ws_max_subscriptions = 3).await;
    let mut ws = app.ws().await;
    for i in 0..3 {
        ws.subscribe(&format!("sub:{i}"), json!({"after": 0})).await;
    }
    let reply = ws
        .request(json!({"op":"subscribe","stream":"sub:3","after":0}))
        .await;
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], "too_many_subscriptions", "{reply}");
    // Freeing one makes room again.
    let reply = ws
        .request(json!({"op":"unsubscribe","stream":"sub:0"}))
        .await;
    assert_eq!(reply["op"], "unsubscribed");
    ws.subscribe("sub:3", json!({"after": 0})).await;
}

#[backend_test]
async fn a_websocket_flooding_bad_frames_does_not_slow_a_subscriber(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut subscriber = app.ws().await;
    subscriber.subscribe("steady:ws", json!({"after": 0})).await;
    let mut flooder = app.ws().await;
    let flood = async {
        // Every frame is answered: the flooder's own replies are what it has to read.
        for i in 0..2000 {
            flooder.send_text(&format!("{{\"op\":\"nope{i}\"}}")).await;
        }
        for _ in 0..2000 {
            assert_eq!(flooder.recv().await["code"], "unknown_op");
        }
    };
    let steady = async {
        for i in 1..=50 {
            app.append("steady:ws", json!({"data": i})).await;
        }
        for seq in 1..=50 {
            assert_eq!(subscriber.next_event().await["seq"], seq);
        }
    };
    tokio::time::timeout(WAIT, async { tokio::join!(flood, steady) })
        .await
        .expect("both finish in time");
}

/// Heads the HTTP library itself refuses before any handler runs (more header fields than it
/// parses, however small; a URL of 64 KiB or more) get the same problem+json as tailcast's
/// own limits, and a connection that was serving requests before gets it too.
#[backend_test]
async fn heads_the_http_library_refuses_get_problem_json(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
    let long = format!("/healthz?pad={}", "a".repeat(70 << 10));
    for (head, status, code) in [
        (
            format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            format!("GET {long} HTTP/1.1\r\nhost: x\r\n\r\n"),
            414,
            "uri_too_long",
        ),
    ] {
        let mut conn = TcpStream::connect(app.addr).await.unwrap();
        // A request first: the answer must also replace hyper's on a kept-alive connection.
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut conn).await.0, 200);
        conn.write_all(head.as_bytes()).await.unwrap();
        let (got, body) = read_response(&mut conn).await;
        assert_eq!(got, status, "{body}");
        let problem: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["code"], code, "{problem}");
        assert!(problem["limit"].is_u64(), "{problem}");
    }
}

/// A snapshot is built in memory for whoever asks (the REST snapshot, every `from=snapshot`
/// subscriber): over `--max-snapshot-bytes` of event data it is refused with
/// `snapshot_too_large` instead, on every surface that builds one.
#[backend_test]
async fn a_snapshot_over_the_byte_limit_is_refused(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.max_snapshot_bytes = 4000).await;
    let small: Vec<Value> = (0..3)
        .map(|k| json!({"key": format!("k{k}"), "data": "x".repeat(1000)}))
        .collect();
    app.append("snap", Value::Array(small)).await;
    let res = app.get("/v1/streams/snap/snapshot").await;
    assert_eq!(res.status(), StatusCode::OK);
    // A fourth key puts the newest events over 4000 bytes.
    app.append("snap", json!({"key":"k3","data":"x".repeat(1000)}))
        .await;
    let res = app.get("/v1/streams/snap/snapshot").await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = problem(res).await;
    assert_eq!(body["code"], "snapshot_too_large", "{body}");
    assert_eq!(body["limit"], 4000);
    let res = app.sse("snap", "?from=snapshot", None).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem(res).await["code"], "snapshot_too_large");
    let mut ws = app.ws().await;
    let reply = ws
        .request(json!({"op":"subscribe","stream":"snap","from":"snapshot"}))
        .await;
    assert_eq!(reply["code"], "snapshot_too_large", "{reply}");
}
