//! Several nodes on one database: producers and subscribers spread over all of them, and
//! a node losing its LISTEN connection mid-stream.

use std::collections::HashSet;

use futures::future::join_all;
use serde_json::{json, Value};

use crate::backend::{backend_test, TestDb};
use crate::helpers::{stats, wait_until, SseClient, TestApp};
use crate::nodes::{spawn_node, spawn_node_with, terminate_backends};

async fn listening(app: &TestApp) -> bool {
    stats(app).await["listener"]["connected"] == json!(true)
}

/// Appends `count` events one request at a time, each `{"p":producer,"i":i}`.
async fn produce(app: &TestApp, stream: &str, producer: usize, count: usize) {
    for i in 0..count {
        app.append(
            stream,
            json!({"type":"tick","data":{"p":producer,"i":i},"id":format!("{producer}-{i}")}),
        )
        .await;
    }
}

/// Reads `1..=head` from every subscriber and checks each saw exactly the log, in order.
async fn check_subscribers(subs: &mut [SseClient], log: &[Value]) {
    let head = log.len() as i64;
    for sub in subs.iter_mut() {
        let got = sub.envelopes_through(1, head).await;
        assert_eq!(got, log, "a subscriber's events differ from the log");
    }
}

/// Every producer's events are all in the log, once each, in each producer's order.
fn check_log(log: &[Value], producers: usize, per_producer: usize) {
    assert_eq!(log.len(), producers * per_producer);
    let mut next = vec![0u64; producers];
    for (n, ev) in log.iter().enumerate() {
        assert_eq!(ev["seq"].as_i64().unwrap(), n as i64 + 1);
        let p = ev["data"]["p"].as_u64().unwrap() as usize;
        assert_eq!(
            ev["data"]["i"].as_u64().unwrap(),
            next[p],
            "producer {p} order"
        );
        next[p] += 1;
    }
}

// Several nodes sharing one database, woken by LISTEN/NOTIFY: PostgreSQL only.
#[backend_test(postgres)]
async fn producers_and_subscribers_on_three_nodes_see_every_event_once_in_order(db: TestDb) {
    let nodes = [
        spawn_node(&db, "a").await,
        spawn_node(&db, "b").await,
        spawn_node(&db, "c").await,
    ];
    let mut subs = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            subs.push(node.sse_events("run:1", "", None).await);
        }
    }
    // Two producers per node, all writing to the one stream at once.
    let per_producer = 40;
    join_all((0..6).map(|p| produce(&nodes[p % 3], "run:1", p, per_producer))).await;
    let log = nodes[0].read_all("run:1").await;
    check_log(&log, 6, per_producer);
    check_subscribers(&mut subs, &log).await;

    // Every node answers from the same log.
    for node in &nodes[1..] {
        assert_eq!(node.read_all("run:1").await, log);
    }
    for node in nodes {
        node.shutdown().await;
    }
}

// Several nodes sharing one database, woken by LISTEN/NOTIFY: PostgreSQL only.
#[backend_test(postgres)]
async fn events_appended_on_one_node_reach_subscribers_on_the_others(db: TestDb) {
    let a = spawn_node(&db, "a").await;
    let b = spawn_node(&db, "b").await;
    let c = spawn_node(&db, "c").await;
    // Subscribers only where nothing is appended: only NOTIFY can wake them.
    let mut subs = [
        b.sse_events("s1", "", None).await,
        b.sse_events("s2", "", None).await,
        c.sse_events("s1", "", None).await,
        c.sse_events("s2", "?after=0", None).await,
    ];
    // Multi-event batches and single events, to two streams at once.
    for i in 0..30 {
        let batch: Vec<Value> = (0..(i % 4 + 1))
            .map(|k| json!({"data":{"i":i,"k":k}}))
            .collect();
        let (r1, r2) = tokio::join!(
            a.append("s1", Value::Array(batch.clone())),
            a.append("s2", Value::Array(batch)),
        );
        assert_eq!(r1["last_seq"], r2["last_seq"]);
    }
    let log1 = a.read_all("s1").await;
    let log2 = a.read_all("s2").await;
    check_subscribers(&mut subs[0..1], &log1).await;
    check_subscribers(&mut subs[1..2], &log2).await;
    check_subscribers(&mut subs[2..3], &log1).await;
    check_subscribers(&mut subs[3..4], &log2).await;

    // A deletion on one node ends the subscriptions on the others with a notice.
    let res = a
        .client
        .delete(a.url("/v1/streams/s1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    for sub in subs.iter_mut().step_by(2) {
        let ev = sub.next().await.expect("deleted notice");
        assert_eq!(ev.event, "notice");
        let notice: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(notice["notice"], "deleted");
        assert!(
            sub.next().await.is_none(),
            "the response ends after deletion"
        );
    }
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

// Several nodes sharing one database, woken by LISTEN/NOTIFY: PostgreSQL only.
#[backend_test(postgres)]
async fn killing_a_nodes_listen_connection_mid_stream_loses_nothing(db: TestDb) {
    let a = spawn_node(&db, "a").await;
    // A long first reconnect delay keeps B deaf long enough for appends to land meanwhile:
    // only the re-check after reconnecting can then deliver them.
    let b = spawn_node_with(&db, "b", |c| c.reconnect_delay_ms = 1500).await;
    wait_until("B listening", || listening(&b)).await;
    let mut subs = [
        b.sse_events("s", "", None).await,
        b.sse_events("s", "", None).await,
    ];

    // Mid-stream: a producer on A keeps appending while B's LISTEN connection is killed.
    let total = 120;
    let producer = {
        let (client, url) = (a.client.clone(), a.url("/v1/streams/s/events"));
        tokio::spawn(async move {
            for i in 0..total {
                let res = client
                    .post(&url)
                    .json(&json!({"data":{"i":i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
            }
        })
    };
    let seen = subs[0].envelopes_through(1, 20).await;
    assert_eq!(seen.len(), 20);
    assert_eq!(terminate_backends(db.pg(), "tailcast-listen:b").await, 1);
    producer.await.unwrap();
    let log = a.read_all("s").await;
    assert_eq!(log.len(), total);
    assert_eq!(subs[0].envelopes_through(21, total as i64).await, log[20..]);
    assert_eq!(subs[1].envelopes_through(1, total as i64).await, log);

    // Quiet stream, then: kill, append while B is certainly not listening, nothing else
    // follows. Only the re-check can deliver these.
    wait_until("B listening again", || listening(&b)).await;
    let before = stats(&b).await["listener"]["reconnects"].as_u64().unwrap();
    assert_eq!(terminate_backends(db.pg(), "tailcast-listen:b").await, 1);
    // Deaf for the 1.5 s reconnect delay (had we polled too slowly to see it, the appends
    // below would come after the reconnection: still correct, only a weaker test).
    wait_until("B notices", || async {
        let l = &stats(&b).await["listener"];
        l["connected"] == json!(false) || l["reconnects"].as_u64().unwrap() > before
    })
    .await;
    a.append("s", json!([{"data":"x"},{"data":"y"}])).await;
    let tail = [
        subs[0]
            .envelopes_through(total as i64 + 1, total as i64 + 2)
            .await,
        subs[1]
            .envelopes_through(total as i64 + 1, total as i64 + 2)
            .await,
    ];
    for t in tail {
        let data: Vec<&Value> = t.iter().map(|e| &e["data"]).collect();
        assert_eq!(data, [&json!("x"), &json!("y")]);
    }
    wait_until("B listening once more", || listening(&b)).await;
    assert!(stats(&b).await["listener"]["reconnects"].as_u64().unwrap() >= 2);

    // And the live path works again after the re-check.
    a.append("s", json!({"data":"z"})).await;
    let z = subs[0]
        .envelopes_through(total as i64 + 3, total as i64 + 3)
        .await;
    assert_eq!(z[0]["data"], "z");
    let ids: HashSet<i64> = a
        .read_all("s")
        .await
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), total + 3);
    a.shutdown().await;
    b.shutdown().await;
}

// Several nodes sharing one database, woken by LISTEN/NOTIFY: PostgreSQL only.
#[backend_test(postgres)]
async fn the_listen_session_may_use_its_own_database_url(db: TestDb) {
    let url = db.url().to_owned();
    let a = spawn_node(&db, "a").await;
    let b = spawn_node_with(&db, "b", |c| c.listen_database_url = Some(url)).await;
    wait_until("B listening", || listening(&b)).await;
    let mut sub = b.sse_events("s", "", None).await;
    a.append("s", json!([{"data":1},{"data":2}])).await;
    sub.envelopes_through(1, 2).await;

    let mut config = tailcast::Config::for_database(db.url());
    config.listen_database_url = Some("not a url".into());
    let err = tailcast::App::with_db(config, db.db.clone())
        .await
        .err()
        .expect("a malformed URL is refused at start-up");
    assert!(err.to_string().contains("listen-database-url"), "{err}");
    a.shutdown().await;
    b.shutdown().await;
}
