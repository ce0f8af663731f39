//! Operations: health, readiness, stats, and the Prometheus metrics an operator watches.

use serde_json::{json, Value};
use tailcast::live::{Filter, Item, Start, Subscription};
use tailcast::log::retention::{self, Policy};
use tailcast::log::{AppendSpec, NewEvent, StreamName};
use tailcast::{App, Config};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::backend::{backend_test, on_db, TestDb};
use crate::helpers::{stats, wait_until, TestApp, WAIT};
use crate::node_process::NodeProcess;
use crate::nodes::{spawn_node, spawn_node_with};

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

/// A lagging subscriber (its live buffer overflowed) reads what it missed from the log.
async fn lag_once(db: &TestDb) {
    let mut config = Config::for_database(db.url());
    config.live_buffer = 2;
    let app = App::with_db(config, db.db.clone()).await.unwrap();
    let state = &app.state;
    let stream = StreamName::parse("lagging").unwrap();
    let (mut sub, _) = Subscription::open(
        state.source(),
        stream.clone(),
        Start::After(0),
        Filter::default(),
        false,
    )
    .await
    .unwrap();
    let append = |i: i64| AppendSpec {
        stream: stream.clone(),
        events: vec![NewEvent {
            ty: "message".into(),
            data: i.to_string(),
            id: None,
            key: None,
            body: None,
            by: None,
            append: false,
        }],
        expected_seq: None,
        close: false,
    };
    // Caught up (and so following live) after the first event...
    state.appender.append(append(1)).await.unwrap();
    let first = tokio::time::timeout(WAIT, sub.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(Item::Event(f))) if f.seq == 1));
    // ...then ten commits, ten live messages, a buffer of two: the subscriber lags.
    for i in 2..=11 {
        state.appender.append(append(i)).await.unwrap();
    }
    for seq in 2..=11 {
        let item = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Item::Event(frame) = item else {
            panic!("expected an event, got {item:?}");
        };
        assert_eq!(frame.seq, seq);
    }
    state.shutdown.cancel();
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

#[backend_test]
async fn metrics_cover_appends_delivery_fan_out_lag_and_retention(db: TestDb) {
    let b = spawn_node_with(&db, "m-b", |c| c.write_timeout_s = 1).await;
    // On PostgreSQL the first events come from another node, so the NOTIFY wake-ups are
    // covered too; SQLite serves one node.
    let pg = !db.db.is_sqlite();
    let a = match pg {
        true => Some(spawn_node(&db, "m-a").await),
        false => None,
    };
    if pg {
        wait_until("b listening", || async {
            stats(&b).await["listener"]["connected"] == json!(true)
        })
        .await;
    }
    let mut sub = b.sse_events("m", "", None).await;
    a.as_ref()
        .unwrap_or(&b)
        .append("m", json!([{"data":1},{"data":2}]))
        .await;
    sub.envelopes_through(1, 2).await;
    b.append("m", json!({"data":3})).await;
    sub.envelopes_through(3, 3).await;

    lag_once(&db).await;
    let policy = Policy {
        max_age_s: 0,
        max_events: 1,
        batch: 100,
    };
    let deleted = retention::run_once(&db.db, &policy, &CancellationToken::new())
        .await
        .unwrap();
    assert!(deleted > 0);

    let res = b.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = res.text().await.unwrap();
    // Every series is registered at 0 at start-up, so each must have moved.
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("/metrics lacks {name}:\n{text}"))
    };
    for name in [
        "tailcast_appended_events_total",
        "tailcast_append_batches_total",
        "tailcast_append_latency_seconds_count",
        "tailcast_append_batch_size_count",
        "tailcast_connections{transport=\"sse\"}",
        "tailcast_subscriptions",
        "tailcast_delivered_events_total{transport=\"sse\"}",
        "tailcast_delivery_latency_seconds_count{transport=\"sse\"}",
        "tailcast_catchup_reads_total",
        "tailcast_lag_fallbacks_total",
        "tailcast_retention_deleted_events_total",
    ] {
        assert!(value(name) >= 1.0, "{name} did not move:\n{text}");
    }
    // Set (not counted) by each node's hub, and this process runs many: only present.
    assert!(value("tailcast_live_streams") >= 0.0);
    assert!(text.contains("tailcast_http_requests_total{"), "{text}");
    if pg {
        assert!(value("tailcast_notify_wakeups_total") >= 1.0, "{text}");
    }
    assert!(value("tailcast_appended_events_total") >= 3.0 + 10.0);
    assert!(value("tailcast_retention_deleted_events_total") >= deleted as f64);
    if let Some(a) = a {
        a.shutdown().await;
    }
    b.shutdown().await;
}
