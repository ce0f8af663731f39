//! Durability under PostgreSQL crashes (issue 14): eight producers append 4-event batches with
//! unique ids to one stream, an SSE and a WebSocket subscriber follow it live, and the
//! database is crash-restarted (`pg_ctl restart -m immediate`) several times under that load.
//! Every acknowledged (id, seq) must be in the log, the log must be 1..=head without a gap or
//! a repeated id, and every event delivered live must equal the log's event at its seq.
//!
//! The database is a private cluster the test starts (see `pgcluster`): the shared server
//! must never be crashed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::helpers::{SseClient, TestApp};
use crate::pgcluster::PrivateCluster;

const STREAM: &str = "durable";
const PRODUCERS: usize = 8;
const BATCHES: usize = 48;
const PER_BATCH: usize = 4;
const RESTARTS: usize = 8;
/// The whole test (load, crashes, and every client catching up) must end within this.
const BUDGET: Duration = Duration::from_secs(50);

#[derive(Default)]
struct Acks {
    /// Acknowledged id -> seq.
    seqs: HashMap<String, i64>,
    /// Batches acknowledged so far.
    batches: usize,
    /// Answers other than 201 (all 503s, each retried with the same ids).
    refused: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_append_is_lost_and_nothing_uncommitted_is_delivered_across_crashes() {
    let Some(pg) = PrivateCluster::start("durability").await else {
        return;
    };
    let deadline = Instant::now() + BUDGET;
    let app = TestApp::spawn_with(pg.test_db().await, |c| {
        c.reconnect_delay_ms = 20;
        c.db_acquire_timeout_ms = 1000;
    })
    .await;

    let sse_seen = Arc::new(Mutex::new(Vec::<Value>::new()));
    let ws_seen = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sse_reader = tokio::spawn(follow_sse(app.base.clone(), sse_seen.clone()));
    let ws_reader = tokio::spawn(follow_ws(app.addr, ws_seen.clone()));

    let acks = Arc::new(Mutex::new(Acks::default()));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            tokio::spawn(produce(
                app.url(&format!("/v1/streams/{STREAM}/events")),
                p,
                acks.clone(),
                deadline,
            ))
        })
        .collect();

    // Crash the database each time another slice of the batches has been acknowledged, so
    // every crash lands under load.
    let total = PRODUCERS * BATCHES;
    for r in 1..=RESTARTS {
        let target = total * r / (RESTARTS + 1);
        wait_for(
            deadline,
            &format!("{target} batches acknowledged before crash {r}"),
            || acks.lock().unwrap().batches >= target,
        )
        .await;
        pg.crash_restart().await;
    }
    for p in producers {
        p.await.expect("producer");
    }

    let acks = std::mem::take(&mut *acks.lock().unwrap());
    let log = app.read_all(STREAM).await;
    let head = log.len() as i64;
    for (i, ev) in log.iter().enumerate() {
        assert_eq!(
            ev["seq"].as_i64(),
            Some(i as i64 + 1),
            "the log is 1..=head without a gap"
        );
    }
    let mut ids = HashSet::new();
    for ev in &log {
        let id = ev["id"].as_str().expect("every event has an id").to_owned();
        assert!(ids.insert(id.clone()), "id {id} is in the log twice");
    }
    assert_eq!(
        acks.seqs.len(),
        total * PER_BATCH,
        "every event was acknowledged in the end"
    );
    for (id, seq) in &acks.seqs {
        let at = &log[(*seq - 1) as usize];
        assert_eq!(
            at["id"],
            json!(id),
            "acknowledged {id} at seq {seq}, the log has {at}"
        );
    }
    assert_eq!(
        head as usize,
        total * PER_BATCH,
        "nothing but the acknowledged events"
    );

    // Live delivery: each reader got 1..=head in order, once, each equal to the log's event.
    wait_for(deadline, "the live readers caught up with the log", || {
        sse_seen.lock().unwrap().len() as i64 >= head
            && ws_seen.lock().unwrap().len() as i64 >= head
    })
    .await;
    sse_reader.abort();
    ws_reader.abort();
    for (name, seen) in [("SSE", &sse_seen), ("WebSocket", &ws_seen)] {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.len() as i64,
            head,
            "{name} delivered every event exactly once"
        );
        for (i, ev) in seen.iter().enumerate() {
            assert_eq!(
                ev, &log[i],
                "{name} delivered {ev}, the log has {} at that seq",
                log[i]
            );
        }
    }
    eprintln!(
        "durability: {RESTARTS} crash-restarts, {head} events in {} batches, {} answers refused (503, retried)",
        total, acks.refused
    );
    app.shutdown().await;
}

/// Posts BATCHES batches of PER_BATCH events with ids of their own, each retried with the
/// same ids until it is acknowledged (a 503 means: not stored, or perhaps stored; the ids
/// make the retry safe either way).
async fn produce(url: String, p: usize, acks: Arc<Mutex<Acks>>, deadline: Instant) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for b in 0..BATCHES {
        let batch: Vec<Value> = (0..PER_BATCH)
            .map(|e| json!({"type":"token","id":format!("p{p}-b{b}-e{e}"),"data":{"p":p,"b":b,"e":e}}))
            .collect();
        loop {
            assert!(
                Instant::now() < deadline,
                "producer {p} batch {b} never acknowledged"
            );
            let res = client.post(&url).json(&batch).send().await;
            let Ok(res) = res else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            if status == 503 {
                acks.lock().unwrap().refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            assert_eq!(
                status, 201,
                "an append either succeeds or asks for a retry: {body}"
            );
            let mut acks = acks.lock().unwrap();
            for ev in body["events"].as_array().expect("acks") {
                let id = ev["id"].as_str().unwrap().to_owned();
                let seq = ev["seq"].as_i64().unwrap();
                if let Some(before) = acks.seqs.insert(id.clone(), seq) {
                    assert_eq!(before, seq, "{id} acknowledged at two seqs");
                }
            }
            acks.batches += 1;
            break;
        }
    }
}

/// Follows the stream over SSE from the beginning, reconnecting with Last-Event-ID as
/// EventSource does if the response ends; records every envelope.
async fn follow_sse(base: String, seen: Arc<Mutex<Vec<Value>>>) {
    let client = reqwest::Client::new();
    loop {
        let last = seen
            .lock()
            .unwrap()
            .last()
            .map_or(0, |e| e["seq"].as_i64().unwrap());
        let res = client
            .get(format!("{base}/v1/streams/{STREAM}/sse"))
            .header("last-event-id", last.to_string())
            .send()
            .await;
        let Ok(res) = res else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut events = SseClient::new(res);
        while let Some(ev) = events.next().await {
            if ev.event == "message" {
                let env: Value = serde_json::from_str(&ev.data).expect("envelope");
                seen.lock().unwrap().push(env);
            }
        }
    }
}

/// Follows the stream over one WebSocket, resubscribing after the last seq it holds if the
/// subscription ends; records every event (without its `op`).
async fn follow_ws(addr: std::net::SocketAddr, seen: Arc<Mutex<Vec<Value>>>) {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .expect("WebSocket");
    let subscribe = |after: i64| {
        Message::text(json!({"op":"subscribe","stream":STREAM,"after":after}).to_string())
    };
    socket.send(subscribe(0)).await.unwrap();
    while let Some(Ok(msg)) = socket.next().await {
        let Message::Text(text) = msg else { continue };
        let mut v: Value = serde_json::from_str(text.as_str()).unwrap();
        match v["op"].as_str() {
            Some("event") => {
                v.as_object_mut().unwrap().remove("op");
                seen.lock().unwrap().push(v);
            }
            Some("unsubscribed") => {
                let last = seen
                    .lock()
                    .unwrap()
                    .last()
                    .map_or(0, |e| e["seq"].as_i64().unwrap());
                socket.send(subscribe(last)).await.unwrap();
            }
            _ => {}
        }
    }
}

async fn wait_for(deadline: Instant, what: &str, mut cond: impl FnMut() -> bool) {
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
