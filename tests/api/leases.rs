//! Stream leases: heartbeats and appends keep a leased stream open; once its producer goes
//! silent (here: a real producer process killed with SIGKILL), the stream is closed with one
//! `stream.closed` {"reason":"abandoned"}, however many nodes sweep.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::backend::{backend_test, TestDb};
use crate::helpers::{wait_until, TestApp, WAIT};
use crate::nodes::spawn_node_with;

async fn info(app: &TestApp, stream: &str) -> Value {
    app.get_json(&format!("/v1/streams/{stream}")).await
}

async fn patch(app: &TestApp, stream: &str, body: Value) -> reqwest::Response {
    app.client
        .patch(app.url(&format!("/v1/streams/{stream}")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn heartbeat(app: &TestApp, stream: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/v1/streams/{stream}/heartbeat")))
        .send()
        .await
        .unwrap()
}

/// Every event of a stream, through REST replay.
async fn events(app: &TestApp, stream: &str) -> Vec<Value> {
    let page = app
        .get_json(&format!("/v1/streams/{stream}/events?limit=1000"))
        .await;
    page["events"].as_array().unwrap().clone()
}

fn closes(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["type"] == "stream.closed")
        .collect()
}

#[backend_test]
async fn heartbeats_and_appends_keep_a_lease_and_silence_closes_the_stream_once(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.lease_sweep_ms = 20).await;

    // A lease needs a stream; PATCH on a missing one is 404, bad values are 400.
    assert_eq!(
        patch(&app, "run:1", json!({"lease_s": 1})).await.status(),
        StatusCode::NOT_FOUND
    );
    let res = app.append_raw("run:1", "?lease_s=2", r#"{"data":1}"#).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    for bad in [
        json!({"lease_s": -1}),
        json!({"lease_s": 99_999_999}),
        json!({"lease": 1}),
    ] {
        let res = patch(&app, "run:1", bad.clone()).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let res = app
        .append_raw("run:1", "?lease_s=-5", r#"{"data":1}"#)
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let meta = info(&app, "run:1").await;
    assert_eq!(meta["lease_s"], 2);
    assert!(meta["last_activity_at"].is_string(), "{meta}");
    assert!(meta["lease_expires_at"].is_string(), "{meta}");
    assert_eq!(
        app.get_json("/v1/stats").await["leased_streams"],
        1,
        "stats count the open leased stream"
    );

    // Two lease periods of heartbeats (every 250 ms, a lease of 2 s), then two of appends:
    // the stream stays open throughout.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let res = heartbeat(&app, "run:1").await;
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["closed"], false, "closed despite heartbeats: {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        app.append("run:1", json!({"data":"tick"})).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(info(&app, "run:1").await["closed"], false);

    // Silence: the sweeper closes it, once, as abandoned.
    wait_until("the lapsed stream closed", || async {
        info(&app, "run:1").await["closed"] == true
    })
    .await;
    let log = events(&app, "run:1").await;
    let closed = closes(&log);
    assert_eq!(closed.len(), 1, "{log:?}");
    assert_eq!(closed[0]["data"]["reason"], "abandoned");
    assert_eq!(closed[0]["data"]["lease_s"], 2);
    assert_eq!(closed[0], log.last().unwrap());
    let meta = info(&app, "run:1").await;
    assert!(meta["lease_expires_at"].is_null(), "{meta}");
    // A producer coming back finds it closed.
    assert_eq!(
        heartbeat(&app, "run:1").await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        app.append_raw("run:1", "", r#"{"data":2}"#).await.status(),
        StatusCode::CONFLICT
    );

    // PATCH sets a lease on an existing stream, and null removes it.
    app.append("run:2", json!({"data":1})).await;
    let res = patch(&app, "run:2", json!({"lease_s": 60})).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["lease_s"], 60);
    let res = patch(&app, "run:2", json!({"lease_s": null})).await;
    assert!(res.json::<Value>().await.unwrap()["lease_s"].is_null());
    assert_eq!(app.get_json("/v1/stats").await["leased_streams"], 0);
    app.shutdown().await;
}

/// A producer as a process of its own: heartbeats `stream` every 100 ms until killed.
fn start_producer(base: &str, stream: &str) -> tokio::process::Child {
    let script = format!(
        "while curl -sf -X POST {base}/v1/streams/{stream}/heartbeat >/dev/null; do sleep 0.1; done"
    );
    tokio::process::Command::new("sh")
        .args(["-c", &script])
        .kill_on_drop(true)
        .spawn()
        .expect("start the producer")
}

#[backend_test(postgres)]
async fn a_killed_producers_streams_are_closed_as_abandoned_exactly_once_by_two_nodes(db: TestDb) {
    // Two nodes sweeping every 10 ms: both see every lapse and race to close it.
    let a = spawn_node_with(&db, "a", |c| c.lease_sweep_ms = 10).await;
    let b = spawn_node_with(&db, "b", |c| c.lease_sweep_ms = 10).await;
    let streams: Vec<String> = (0..12).map(|i| format!("job:{i}")).collect();
    let mut producers = Vec::new();
    for (i, s) in streams.iter().enumerate() {
        let node = if i % 2 == 0 { &a } else { &b };
        let res = node
            .append_raw(s, "?lease_s=2", r#"{"data":"start"}"#)
            .await;
        assert_eq!(res.status(), StatusCode::CREATED);
        producers.push(start_producer(&node.base, s));
    }
    // Alive for two lease periods while heartbeating.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        for s in &streams {
            assert_eq!(info(&a, s).await["closed"], false, "{s} closed while alive");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // kill -9 the producers.
    for mut p in producers {
        p.kill().await.unwrap();
    }
    for s in &streams {
        wait_until("an abandoned stream closed", || async {
            info(&b, s).await["closed"] == true
        })
        .await;
    }
    for s in &streams {
        let log = events(&a, s).await;
        let closed = closes(&log);
        assert_eq!(closed.len(), 1, "{s}: {log:?}");
        assert_eq!(closed[0]["data"]["reason"], "abandoned", "{s}");
    }
    // Both nodes still sweep: a later pass finds nothing to close twice. A fresh node (as
    // after a restart) does not either.
    let c = spawn_node_with(&db, "c", |c| c.lease_sweep_ms = 10).await;
    wait_until("the new node's stats", || async {
        c.get_json("/v1/stats").await["leased_streams"] == 0
    })
    .await;
    let metrics = c.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("tailcast_abandoned_streams_total"),
        "{metrics}"
    );
    for s in &streams {
        assert_eq!(closes(&events(&c, s).await).len(), 1, "{s}");
    }
    tokio::time::timeout(WAIT, async {
        a.shutdown().await;
        b.shutdown().await;
        c.shutdown().await;
    })
    .await
    .unwrap();
}
