//! Graceful shutdown: appends in flight are either acknowledged and durable or failed (and
//! absent), SSE responses end, and the real binary does the same on SIGTERM.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::backend::{backend_test, on_db, TestDb};
use crate::helpers::{listening_addr, terminate, wait_until, SseClient, TestApp, WAIT};

/// Outcome per event id: `Some(seq)` acknowledged, `None` failed.
type Outcomes = Arc<Mutex<HashMap<String, Option<i64>>>>;

/// Producers that append one event per request until a request fails.
fn start_producers(
    base: &str,
    stream: &str,
    producers: usize,
    outcomes: &Outcomes,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..producers)
        .map(|p| {
            let url = format!("{base}/v1/streams/{stream}/events");
            let outcomes = outcomes.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
                for i in 0.. {
                    let id = format!("{p}-{i}");
                    let res = client
                        .post(&url)
                        .json(&json!({"data":{"p":p,"i":i},"id":id}))
                        .send()
                        .await;
                    let seq = match res {
                        Ok(r) if r.status() == 201 => {
                            let body: Value = r.json().await.unwrap();
                            Some(body["first_seq"].as_i64().unwrap())
                        }
                        Ok(r) => {
                            assert_eq!(r.status(), 503, "only shutdown may fail an append");
                            None
                        }
                        Err(_) => None,
                    };
                    outcomes.lock().unwrap().insert(id, seq);
                    if seq.is_none() {
                        return;
                    }
                }
            })
        })
        .collect()
}

fn acknowledged(outcomes: &Outcomes) -> usize {
    outcomes.lock().unwrap().values().flatten().count()
}

/// Every acknowledged id is in the log at its seq; every failed one is absent; the log is
/// gap-free.
async fn check_durable(db: &TestDb, stream: &str, outcomes: &Outcomes) -> i64 {
    let rows: Vec<(i64, String)> = on_db!(db, |ex| sqlx::query_as(
        "select e.seq, e.event_id from events e join streams s on s.id = e.stream_id
         where s.name = $1 order by e.seq",
    )
    .bind(stream)
    .fetch_all(ex)
    .await
    .unwrap());
    let in_log: HashMap<&str, i64> = rows.iter().map(|(s, id)| (id.as_str(), *s)).collect();
    for (n, (seq, _)) in rows.iter().enumerate() {
        assert_eq!(*seq, n as i64 + 1);
    }
    let outcomes = outcomes.lock().unwrap();
    let mut failed = 0;
    for (id, outcome) in outcomes.iter() {
        match outcome {
            Some(seq) => assert_eq!(in_log.get(id.as_str()), Some(seq), "acked {id} lost"),
            None => {
                failed += 1;
                assert!(!in_log.contains_key(id.as_str()), "failed {id} was stored");
            }
        }
    }
    assert!(failed > 0, "every producer stops at a failure");
    assert_eq!(rows.len(), outcomes.len() - failed);
    rows.len() as i64
}

/// Reads the SSE response to its end, checking every event arrives once in order.
async fn drain(sse: &mut SseClient) -> i64 {
    let mut last = 0;
    while let Some(ev) = sse.next().await {
        let env: Value = serde_json::from_str(&ev.data).unwrap();
        last += 1;
        assert_eq!(env["seq"], last);
    }
    last
}

#[backend_test]
async fn appends_in_flight_at_shutdown_are_durable_or_failed_and_sse_ends(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    let mut sse = app.sse_events("s", "", None).await;
    let outcomes = Outcomes::default();
    let producers = start_producers(&app.base, "s", 16, &outcomes);
    wait_until("appends flowing", || async {
        acknowledged(&outcomes) >= 200
    })
    .await;
    app.shutdown().await;
    for p in producers {
        tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
    }
    let head = check_durable(&db, "s", &outcomes).await;
    // The response ended at shutdown (it did not hang), after what was committed before.
    let delivered = tokio::time::timeout(WAIT, drain(&mut sse)).await.unwrap();
    assert!(delivered <= head);
}

#[backend_test]
async fn the_binary_shuts_down_gracefully_on_sigterm_and_never_logs_tokens(db: TestDb) {
    let db = db.close().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailcast"))
        .env("DATABASE_URL", db.url())
        .env("TAILCAST_LISTEN", "127.0.0.1:0")
        .env("TAILCAST_LOG_FORMAT", "json")
        .env("TAILCAST_NODE_ID", "sigterm")
        .env("RUST_LOG", "info,tower_http=debug")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = listening_addr(&mut lines).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let collect = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().unwrap().push(line);
            }
        })
    };
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let res = client
        .get(format!("{base}/v1/streams/nope?token=supersecret-token-1"))
        .header("x-request-id", "rid-sigterm-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["x-request-id"], "rid-sigterm-1");

    let res = client
        .get(format!("{base}/v1/streams/s/sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut sse = SseClient::new(res);
    let outcomes = Outcomes::default();
    let producers = start_producers(&base, "s", 16, &outcomes);
    wait_until("appends flowing", || async {
        acknowledged(&outcomes) >= 200
    })
    .await;

    terminate(&mut child).await;
    for p in producers {
        tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
    }
    let db = db.open().await;
    let head = check_durable(&db, "s", &outcomes).await;
    let delivered = tokio::time::timeout(WAIT, drain(&mut sse)).await.unwrap();
    assert!(delivered <= head);

    tokio::time::timeout(WAIT, collect).await.unwrap().unwrap();
    let log = log.lock().unwrap();
    assert!(
        log.iter().any(|l| l.contains("rid-sigterm-1")),
        "request spans carry the request id"
    );
    assert!(log.iter().any(|l| l.contains("shutting down")));
    for line in log.iter() {
        assert!(!line.contains("supersecret"), "a token was logged: {line}");
    }
}

#[backend_test]
async fn a_request_that_never_finishes_does_not_hold_shutdown_past_its_deadline(db: TestDb) {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(db, |c| c.shutdown_timeout_s = 1).await;
    // Headers promise a body that never fully arrives: the handler waits on it.
    let mut stuck = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stuck
        .write_all(
            b"POST /v1/streams/s/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"data\":",
        )
        .await
        .unwrap();
    let mut sse = app.sse_events("s", "", None).await;
    app.append("s", json!({"data":1})).await;
    sse.envelopes_through(1, 1).await;

    let started = std::time::Instant::now();
    app.shutdown().await;
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900),
        "{took:?}: it waited for nothing"
    );
    assert!(
        took < std::time::Duration::from_secs(3),
        "{took:?}: past the deadline"
    );
    assert!(sse.next().await.is_none(), "the SSE response ended");
    drop(stuck);
}
