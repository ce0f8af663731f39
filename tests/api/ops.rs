//! Operations: health, readiness, stats, and the Prometheus metrics an operator watches.

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::backend::{backend_test, on_db, TestDb};
use crate::helpers::{stats, wait_until, TestApp, WAIT};
use crate::node_process::NodeProcess;
use crate::nodes::spawn_node;

#[backend_test]
async fn health_readiness_and_stats(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.node_id = Some("ops-1".into())).await;
    assert_eq!(app.get_json("/healthz").await["status"], "ok");
    assert_eq!(app.get_json("/readyz").await["status"], "ready");

    let s = stats(&app).await;
    assert_eq!(s["node_id"], "ops-1");
    assert_eq!(s["connections"], json!({"sse":0,"ws":0}));
    assert_eq!(s["subscriptions"], 0);
    assert_eq!(s["database"], "ok");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["commit"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(
        (&s["streams"], &s["events"], &s["open_input_requests"]),
        (&json!(0), &json!(0), &json!(0))
    );

    app.append("a", json!({"data":1})).await;
    app.append("c", json!([{"data":1}, {"data":2}])).await;
    let res = app
        .client
        .post(format!("{}/v1/streams/c/inputs", app.base))
        .json(&json!({"request_id":"q","prompt":"?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let s = stats(&app).await;
    // Two streams; 1 + 2 events and the input.requested event; one open request.
    assert_eq!(
        (&s["streams"], &s["events"], &s["open_input_requests"]),
        (&json!(2), &json!(4), &json!(1))
    );
    let mut one = app.sse_events("a", "", None).await;
    let _two = app.sse_events("a", "", None).await;
    let _three = app.sse_events("b", "", None).await;
    one.envelopes_through(1, 1).await;
    let s = stats(&app).await;
    assert_eq!(s["connections"], json!({"sse":3,"ws":0}));
    assert_eq!(s["subscriptions"], 3);
    assert_eq!(s["live_streams"], 2);
    assert!(s["uptime_s"].is_u64());
    // Only PostgreSQL has a LISTEN session; on SQLite one process serves the file and its
    // appender feeds the hub directly, so stats show no listener at all.
    if app.db.is_sqlite() {
        assert_eq!(s["backend"], "sqlite");
        assert_eq!(s["listener"], Value::Null);
    } else {
        assert_eq!(s["backend"], "postgres");
        wait_until("listening", || async {
            stats(&app).await["listener"]["connected"] == json!(true)
        })
        .await;
    }

    drop(one);
    wait_until("the closed response is no longer counted", || async {
        stats(&app).await["connections"]["sse"] == 2
    })
    .await;
    app.shutdown().await;
}

/// /readyz answers anyone: when the database's answer is an error, it says so without the
/// driver's text (which names tables, hosts, SQL).
#[backend_test]
async fn readyz_does_not_echo_database_errors(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    assert_eq!(app.get_json("/readyz").await["status"], "ready");
    // The readiness query now fails with the driver's "no such table"/"does not exist".
    on_db!(db, |ex| sqlx::query(
        "alter table _sqlx_migrations rename to hidden_migrations"
    )
    .execute(ex)
    .await
    .unwrap()
    .rows_affected());
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let text = res.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "database_unavailable", "{text}");
    assert_eq!(body["detail"], "query failed", "{text}");
    assert!(!text.contains("_sqlx_migrations"), "{text}");
    app.shutdown().await;
}

/// More than any socket buffers hold, for a client that reads nothing.
async fn flood(app: &TestApp, stream: &str) {
    let big = "y".repeat(900_000);
    for _ in 0..12 {
        app.append(stream, json!({"data":big})).await;
    }
}

/// A WebSocket and then an SSE client that stop reading are each disconnected after the write
/// timeout, and each is counted once, under its own transport (an upgraded connection is a
/// WebSocket to the connection layer too). The node is a process of its own, so its
/// `/metrics` holds this test's counts alone and exact values can be asserted; the counting
/// is the connection layer's, the same on either store.
#[backend_test(postgres)]
async fn a_slow_consumer_is_counted_once_under_its_own_transport(db: TestDb) {
    let node = NodeProcess::start(db.url(), &[("TAILCAST_WRITE_TIMEOUT_S", "1")]).await;
    let app = TestApp::attach(node.addr, db.clone());
    let disconnects = || async {
        let text = app.get("/metrics").await.text().await.unwrap();
        let value = |transport: &str| -> f64 {
            let name =
                format!("tailcast_slow_consumer_disconnects_total{{transport=\"{transport}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(name.as_str())?.trim().parse().ok())
                .unwrap_or_else(|| panic!("/metrics lacks {name}:\n{text}"))
        };
        (value("http"), value("ws"))
    };
    assert_eq!(disconnects().await, (0.0, 0.0));

    let mut ws = app.ws_small_buffer().await;
    ws.subscribe("big-ws", json!({})).await;
    flood(&app, "big-ws").await;
    wait_until("the WebSocket slow consumer disconnected", || async {
        stats(&app).await["connections"]["ws"] == 0
    })
    .await;
    assert!(ws.dropped_without_close().await);
    assert_eq!(disconnects().await, (0.0, 1.0));

    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut conn = sock.connect(app.addr).await.unwrap();
    conn.write_all(b"GET /v1/streams/big-sse/sse HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_until("the SSE response open", || async {
        stats(&app).await["connections"]["sse"] == 1
    })
    .await;
    flood(&app, "big-sse").await;
    wait_until("the SSE slow consumer disconnected", || async {
        stats(&app).await["connections"]["sse"] == 0
    })
    .await;
    drop(conn);
    assert_eq!(disconnects().await, (1.0, 1.0));
}

/// Every series an operator watches moves. The node whose `/metrics` is read is a process of
/// its own: the metrics recorder is process-global, so in this test process other tests'
/// appends, deliveries and lags would satisfy the assertions. Everything counted here is
/// this test's own doing on that node.
#[backend_test]
async fn metrics_cover_appends_delivery_fan_out_lag_and_retention(db: TestDb) {
    // On PostgreSQL the first events come from another node (in this process), so the
    // NOTIFY wake-ups are covered too; SQLite serves one node, and its file is the node's.
    let (a, _db) = match db.is_sqlite() {
        true => (None, Err(db.close().await)),
        false => (Some(spawn_node(&db, "m-a").await), Ok(db)),
    };
    let url = match &_db {
        Ok(db) => db.url().to_owned(),
        Err(closed) => closed.url().to_owned(),
    };
    let b = NodeProcess::start(
        &url,
        &[
            ("TAILCAST_NODE_ID", "m-b"),
            // Two commit batches of live buffer: a stalled reader lags for sure.
            ("TAILCAST_LIVE_BUFFER", "2"),
            ("TAILCAST_RETENTION_INTERVAL_MS", "50"),
        ],
    )
    .await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let get_json = |path: &str| {
        let req = client.get(b.url(path));
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let append = |stream: &str, body: Value| {
        let req = client
            .post(b.url(&format!("/v1/streams/{stream}/events")))
            .json(&body);
        async move { assert_eq!(req.send().await.unwrap().status(), 201) }
    };
    if a.is_some() {
        wait_until("b listening", || async {
            get_json("/v1/stats").await["listener"]["connected"] == json!(true)
        })
        .await;
    }

    // Delivery (and on PostgreSQL fan-out from another node's commit).
    let res = client.get(b.url("/v1/streams/m/sse")).send().await.unwrap();
    let mut sub = crate::helpers::SseClient::new(res);
    let mut ws = crate::ws_client::WsClient::connect(b.addr).await;
    ws.subscribe("m", json!({})).await;
    let first = json!([{"data":1},{"data":2}]);
    match &a {
        Some(a) => drop(a.append("m", first).await),
        None => append("m", first).await,
    }
    sub.envelopes_through(1, 2).await;
    append("m", json!({"data":3})).await;
    sub.envelopes_through(3, 3).await;
    for seq in 1..=3 {
        assert_eq!(ws.next_event().await["seq"], seq);
    }

    // A lag: a reader that stops reading while more commits than the live buffer holds pass.
    let stalled = crate::wire::get(b.addr, "/v1/streams/lag/sse?after=0", &[], Some(16384)).await;
    assert_eq!(stalled.status, 200);
    let big = "y".repeat(900_000);
    for _ in 0..16 {
        append("lag", json!({"data": big})).await;
    }
    stalled.sse().expect_seqs(1, 16).await;

    // Retention: a stream that keeps one event of three.
    append("old", json!([{"data":1},{"data":2},{"data":3}])).await;
    let res = client
        .put(b.url("/v1/streams/old/retention"))
        .json(&json!({"max_events": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let metrics = || async {
        let res = client.get(b.url("/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        res.text().await.unwrap()
    };
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("/metrics lacks {name}:\n{text}"))
    };
    wait_until("retention removed two events", || async {
        value(&metrics().await, "tailcast_retention_deleted_events_total") == 2.0
    })
    .await;
    let text = metrics().await;
    // Every series is registered at 0 at start-up, so each must have moved.
    for name in [
        "tailcast_append_batches_total",
        "tailcast_append_latency_seconds_count",
        "tailcast_append_batch_size_count",
        "tailcast_connections{transport=\"sse\"}",
        "tailcast_subscriptions",
        "tailcast_delivery_latency_seconds_count{transport=\"sse\"}",
        "tailcast_delivery_latency_seconds_count{transport=\"ws\"}",
        "tailcast_catchup_reads_total",
        "tailcast_lag_fallbacks_total",
    ] {
        assert!(value(&text, name) >= 1.0, "{name} did not move:\n{text}");
    }
    // This node appended 1 + 16 + 3 events and delivered 3 + 16 (node a's two count in a).
    let appended = match a {
        Some(_) => 20.0,
        None => 22.0,
    };
    assert_eq!(value(&text, "tailcast_appended_events_total"), appended);
    assert_eq!(
        value(&text, "tailcast_delivered_events_total{transport=\"sse\"}"),
        19.0
    );
    assert_eq!(
        value(&text, "tailcast_delivered_events_total{transport=\"ws\"}"),
        3.0
    );
    assert!(value(&text, "tailcast_live_streams") >= 1.0);
    assert!(text.contains("tailcast_http_requests_total{"), "{text}");
    if let Some(a) = a {
        assert!(
            value(&text, "tailcast_notify_wakeups_total") >= 1.0,
            "{text}"
        );
        a.shutdown().await;
    }
}
