//! Webhooks: a real HTTP receiver (an axum server on port 0) checks every delivery's
//! signature, and that each stream's events arrive in seq order, none skipped, each at least
//! once under one stable delivery id: with an endpoint failing its first attempts, through a
//! node killed with SIGKILL, and beside a slow endpoint that must not delay appends.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use reqwest::StatusCode as Status;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{wait_until, TestApp, WAIT};
use crate::node_process::NodeProcess;

pub(crate) const SECRET: &str = "a-webhook-secret-of-32-bytes-ok!";

/// One delivery as received.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub id: String,
    pub stream: String,
    pub seq: i64,
    pub ty: String,
    pub body: Bytes,
}

#[derive(Default)]
pub(crate) struct Inbox {
    pub received: Vec<Received>,
    /// Requests answered so far (failures included).
    pub requests: usize,
    pub bad_signatures: usize,
}

#[derive(Clone)]
struct Receiver {
    inbox: Arc<Mutex<Inbox>>,
    /// The first this many requests get a 503.
    fail_first: usize,
    /// Each request takes this long to answer.
    delay: Duration,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !r.delay.is_zero() {
        tokio::time::sleep(r.delay).await;
    }
    let mut inbox = r.inbox.lock().unwrap();
    inbox.requests += 1;
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let sig = headers
        .get("tailcast-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if sig != format!("sha256={expected}") {
        inbox.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    if inbox.requests <= r.fail_first {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let env: Value = serde_json::from_slice(&body).unwrap();
    inbox.received.push(Received {
        id: headers["tailcast-delivery"].to_str().unwrap().to_owned(),
        stream: env["stream"].as_str().unwrap().to_owned(),
        seq: env["seq"].as_i64().unwrap(),
        ty: env["type"].as_str().unwrap().to_owned(),
        body,
    });
    StatusCode::NO_CONTENT
}

/// A receiver's routes (`POST /hook`) and its inbox.
pub(crate) fn receiver(fail_first: usize, delay: Duration) -> (Router, Arc<Mutex<Inbox>>) {
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let state = Receiver {
        inbox: inbox.clone(),
        fail_first,
        delay,
    };
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(state);
    (app, inbox)
}

/// Starts a receiver; its URL and inbox.
async fn start_receiver(fail_first: usize, delay: Duration) -> (String, Arc<Mutex<Inbox>>) {
    let (app, inbox) = receiver(fail_first, delay);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, inbox)
}

pub(crate) async fn register(client: &reqwest::Client, base: &str, body: Value) -> Value {
    let res = client
        .post(format!("{base}/v1/webhooks"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(status, Status::CREATED, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Checks what `inbox` got against `expected` (stream -> its seqs that match the webhook):
/// every signature good, per stream every delivery in seq order with none skipped (a
/// redelivery may repeat earlier ones, never jump ahead), the same id and body for every copy
/// of an event, and all of `expected` delivered. Returns how many were redeliveries.
pub(crate) fn check_inbox(inbox: &Inbox, expected: &BTreeMap<String, Vec<i64>>) -> usize {
    assert_eq!(inbox.bad_signatures, 0);
    let mut next: HashMap<&str, usize> = HashMap::new();
    let mut copies: HashMap<String, &Received> = HashMap::new();
    let mut repeats = 0;
    for r in &inbox.received {
        let seqs = expected
            .get(&r.stream)
            .unwrap_or_else(|| panic!("delivered {r:?} of a stream the webhook does not match"));
        let at = next.entry(r.stream.as_str()).or_default();
        let pos = seqs
            .iter()
            .position(|s| *s == r.seq)
            .unwrap_or_else(|| panic!("delivered {r:?}, not one of the webhook's events"));
        assert!(
            pos <= *at,
            "{} seq {} arrived before seq {}: skipped or out of order",
            r.stream,
            r.seq,
            seqs[*at]
        );
        if pos == *at {
            *at += 1;
        } else {
            repeats += 1;
        }
        if let Some(first) = copies.get(&r.id) {
            assert_eq!(first.body, r.body, "one delivery id, two bodies");
        } else {
            copies.insert(r.id.clone(), r);
        }
    }
    for (stream, seqs) in expected {
        assert_eq!(
            next.get(stream.as_str()).copied().unwrap_or_default(),
            seqs.len(),
            "{stream}: not every event delivered"
        );
    }
    repeats
}

fn delivered_count(inbox: &Mutex<Inbox>, stream: &str) -> usize {
    let inbox = inbox.lock().unwrap();
    let mut seqs: Vec<i64> = inbox
        .received
        .iter()
        .filter(|r| r.stream == stream)
        .map(|r| r.seq)
        .collect();
    seqs.sort();
    seqs.dedup();
    seqs.len()
}

#[backend_test]
async fn webhooks_deliver_matching_events_in_order_signed_through_failures(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.webhook_poll_ms = 20;
        c.webhook_retry_ms = 20;
    })
    .await;
    // Events before the webhook exists are not delivered.
    app.append("run:a", json!({"data":"before"})).await;
    let (url, inbox) = start_receiver(3, Duration::ZERO).await;
    let (closed_url, closed_inbox) = start_receiver(0, Duration::ZERO).await;
    let hook = register(
        &app.client,
        &app.base,
        json!({"url": url, "prefix": "run:", "secret": SECRET}),
    )
    .await;
    assert!(hook.get("secret").is_none(), "{hook}");
    register(
        &app.client,
        &app.base,
        json!({"url": closed_url, "prefix": "", "types": ["stream.closed"], "secret": SECRET}),
    )
    .await;
    // Refused registrations.
    for bad in [
        json!({"url": "ftp://x/", "prefix": "", "secret": SECRET}),
        json!({"url": "ws://example.com/", "prefix": "", "secret": SECRET}),
        json!({"url": url, "prefix": "", "secret": "short"}),
        json!({"url": url, "secret": SECRET}),
        json!({"url": url, "prefix": "", "secret": SECRET, "types": []}),
    ] {
        let res = app
            .client
            .post(app.url("/v1/webhooks"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), Status::BAD_REQUEST, "{bad}");
    }

    let mut expected: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for i in 0..40 {
        for s in ["run:a", "run:b"] {
            let res = app.append(s, json!({"data": i})).await;
            expected
                .entry(s.to_owned())
                .or_default()
                .push(res["first_seq"].as_i64().unwrap());
        }
        app.append("other:x", json!({"data": i})).await;
    }
    for s in ["run:a", "run:b"] {
        let res = app.close_stream(s, None).await;
        let seq = res.json::<Value>().await.unwrap()["first_seq"]
            .as_i64()
            .unwrap();
        expected.get_mut(s).unwrap().push(seq);
    }
    app.close_stream("other:x", None).await;
    wait_until("every matching event delivered", || async {
        delivered_count(&inbox, "run:a") == 41 && delivered_count(&inbox, "run:b") == 41
    })
    .await;
    check_inbox(&inbox.lock().unwrap(), &expected);
    assert!(
        inbox.lock().unwrap().requests >= 82 + 3,
        "the failures were retried"
    );

    wait_until("the closures delivered", || async {
        closed_inbox.lock().unwrap().received.len() >= 3
    })
    .await;
    {
        let closed = closed_inbox.lock().unwrap();
        assert!(closed.received.iter().all(|r| r.ty == "stream.closed"));
        let mut streams: Vec<&str> = closed.received.iter().map(|r| r.stream.as_str()).collect();
        streams.sort();
        streams.dedup();
        assert_eq!(streams, ["other:x", "run:a", "run:b"]);
    }

    // The admin view: nothing pending, nothing failing; the metrics name the webhook.
    let id = hook["id"].as_str().unwrap().to_owned();
    wait_until("nothing pending", || async {
        let w = app.get_json(&format!("/v1/webhooks/{id}")).await;
        w["pending_events"] == 0 && w["failing_streams"] == 0 && w["streams"] == 2
    })
    .await;
    let list = app.get_json("/v1/webhooks").await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 2);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let failed =
        format!("tailcast_webhook_deliveries_total{{webhook=\"{id}\",outcome=\"failed\"}} 3");
    assert!(metrics.contains(&failed), "{metrics}");
    for series in [
        "# HELP tailcast_webhook_deliveries_total ",
        "# HELP tailcast_webhook_delivery_lag_seconds ",
        "# HELP tailcast_webhook_active_streams ",
    ] {
        assert!(metrics.contains(series), "{series}: {metrics}");
    }
    for series in [
        format!("tailcast_webhook_deliveries_total{{webhook=\"{id}\",outcome=\"delivered\"}} "),
        format!("tailcast_webhook_delivery_lag_seconds_count{{webhook=\"{id}\"}} "),
        format!("tailcast_webhook_active_streams{{webhook=\"{id}\"}} "),
    ] {
        assert!(metrics.contains(&series), "{series}: {metrics}");
    }
    assert_eq!(app.get_json("/v1/stats").await["webhooks"]["registered"], 2);

    let res = app
        .client
        .delete(app.url(&format!("/v1/webhooks/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), Status::NO_CONTENT);
    assert_eq!(
        app.get(&format!("/v1/webhooks/{id}")).await.status(),
        Status::NOT_FOUND
    );
    app.shutdown().await;
}

/// The settings of the nodes of the crash test: quick polls and retries, a short claim.
const NODE_ENV: &[(&str, &str)] = &[
    ("TAILCAST_WEBHOOK_POLL_MS", "20"),
    ("TAILCAST_WEBHOOK_RETRY_MS", "20"),
    ("TAILCAST_WEBHOOK_TIMEOUT_MS", "500"),
    ("TAILCAST_WEBHOOK_LEASE_MS", "1000"),
    // Two streams at a time per node: with six streams, both nodes must deliver some.
    ("TAILCAST_WEBHOOK_CONCURRENCY", "2"),
];

#[backend_test]
async fn webhook_delivery_survives_a_sigkill_with_nothing_lost_or_skipped(db: TestDb) {
    let pg = !db.is_sqlite();
    let db = db.close().await;
    // 20 ms per request: deliveries are still under way when the node is killed.
    let (url, inbox) = start_receiver(5, Duration::from_millis(20)).await;
    // PostgreSQL: two nodes, one of them killed; SQLite (one process per file): the node is
    // killed and started again on the same file.
    let with_id = |id: &'static str| {
        let mut env = NODE_ENV.to_vec();
        env.push(("TAILCAST_NODE_ID", id));
        env
    };
    let first = NodeProcess::start(db.url(), &with_id("first")).await;
    let other = match pg {
        true => Some(NodeProcess::start(db.url(), &with_id("other")).await),
        false => None,
    };
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    register(
        &client,
        &first.base,
        json!({"url": url, "prefix": "job:", "secret": SECRET}),
    )
    .await;
    let streams: Vec<String> = (0..6).map(|i| format!("job:{i}")).collect();
    let mut expected: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    // One batch of 30 per stream: the backlog builds at once, and is still being delivered
    // when the node is killed.
    let append = |base: String, stream: String, from: usize| {
        let client = client.clone();
        async move {
            let batch: Vec<Value> = (from..from + 30)
                .map(|i| json!({"data": i, "id": format!("e{i}")}))
                .collect();
            let res = client
                .post(format!("{base}/v1/streams/{stream}/events"))
                .json(&batch)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), Status::CREATED);
            let body = res.json::<Value>().await.unwrap();
            let seqs: Vec<i64> = body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_i64().unwrap())
                .collect();
            seqs
        }
    };
    for s in &streams {
        let seqs = append(first.base.clone(), s.clone(), 0).await;
        expected.entry(s.clone()).or_default().extend(seqs);
    }
    wait_until("deliveries under way", || async {
        inbox.lock().unwrap().received.len() >= 40
    })
    .await;
    // kill -9 mid-delivery: while it holds claims on streams with events still to deliver
    // (they stay in the database until they run out, then the survivor takes them over).
    if pg {
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        wait_until("the first node delivering", || async {
            let owned: i64 = sqlx::query_scalar(
                "select count(*) from webhook_positions p join streams s on s.id = p.stream_id
                 where p.owner = 'first' and p.delivered < s.head",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            owned > 0
        })
        .await;
        pool.close().await;
    }
    first.kill().await;
    let survivor = match other {
        Some(node) => node,
        // Another id: the dead node's claims must run out first.
        None => NodeProcess::start(db.url(), &with_id("restarted")).await,
    };
    for s in &streams {
        let seqs = append(survivor.base.clone(), s.clone(), 30).await;
        expected.entry(s.clone()).or_default().extend(seqs);
    }
    wait_until("every event delivered after the kill", || async {
        streams.iter().all(|s| delivered_count(&inbox, s) == 60)
    })
    .await;
    let repeats = check_inbox(&inbox.lock().unwrap(), &expected);
    println!("{repeats} redeliveries after the kill");
    survivor.kill().await;
}

#[backend_test]
async fn a_slow_endpoint_delays_neither_appends_nor_other_webhooks(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.webhook_poll_ms = 20;
        c.webhook_timeout_ms = 10_000;
    })
    .await;
    let (slow_url, slow) = start_receiver(0, Duration::from_secs(2)).await;
    let (fast_url, fast) = start_receiver(0, Duration::ZERO).await;
    for url in [&slow_url, &fast_url] {
        register(
            &app.client,
            &app.base,
            json!({"url": url, "prefix": "", "secret": SECRET}),
        )
        .await;
    }
    let mut worst = Duration::ZERO;
    let start = Instant::now();
    for i in 0..200 {
        let t = Instant::now();
        app.append(&format!("s:{}", i % 4), json!({"data": i}))
            .await;
        worst = worst.max(t.elapsed());
    }
    let appending = start.elapsed();
    wait_until("the fast endpoint has everything", || async {
        (0..4).all(|i| delivered_count(&fast, &format!("s:{i}")) == 50)
    })
    .await;
    let slow_got = slow.lock().unwrap().received.len();
    println!("200 appends in {appending:?} (worst {worst:?}); the slow endpoint got {slow_got}");
    // Two seconds per POST: the slow endpoint has had a handful while the rest went on.
    assert!(slow_got < 40, "the slow endpoint was not slow: {slow_got}");
    assert!(
        worst < Duration::from_millis(1500),
        "an append waited {worst:?} behind a slow webhook"
    );
    app.shutdown().await;
}
