//! Database outages: appends fail fast with 503 `unavailable`, `/readyz` says 503, open
//! subscriptions stay connected and resume, and the service recovers by itself.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{stats, wait_until, TestApp, WAIT};
use crate::nodes::{postgres_addr, spawn_node_with, terminate_backends, Proxy};

async fn status_of(app: &TestApp, path: &str) -> u16 {
    app.get(path).await.status().as_u16()
}

// Cuts PostgreSQL's socket through a proxy: a server-database link only PostgreSQL has.
#[backend_test(postgres)]
async fn while_the_database_is_unreachable_appends_fail_fast_and_subscriptions_wait(db: TestDb) {
    let proxy = Proxy::start(postgres_addr(db.pg())).await;
    let app_pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(proxy.options(db.pg(), "tailcast-node:x"))
        .await
        .unwrap();
    let app = TestApp::spawn_with(TestDb::postgres(app_pool).await, |c| {
        c.node_id = Some("x".into());
        c.reconnect_delay_ms = 50;
        c.read_page = 100;
    })
    .await;

    // A long stream (more than socket buffers hold) so that a catch-up spans the outage.
    let filler = "x".repeat(1000);
    for b in 0..4 {
        let batch: Vec<Value> = (0..500)
            .map(|i| json!({"data":{"n":b * 500 + i,"pad":filler}}))
            .collect();
        app.append("long", Value::Array(batch)).await;
    }
    app.append("s", json!([{"data":1},{"data":2}])).await;
    let mut live = app.sse_events("s", "", None).await;
    live.envelopes_through(1, 2).await;
    let mut catching_up = app.sse_events("long", "", None).await;
    catching_up.envelopes_through(1, 200).await;

    proxy.cut();
    let t = Instant::now();
    let res = app.append_raw("s", "", r#"{"data":3}"#).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Known down: later appends do not wait for a connection at all.
    let t = Instant::now();
    let res = app.append_raw("s", "", r#"{"data":3}"#).await;
    assert_eq!(res.status(), 503);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    assert_eq!(status_of(&app, "/readyz").await, 503);
    assert_eq!(status_of(&app, "/healthz").await, 200);
    let s = stats(&app).await;
    assert_eq!(s["database"], "unavailable");
    // New subscriptions cannot start without the log: 503, not a hang.
    let res = app.sse("s", "", None).await;
    assert_eq!(res.status(), 503);
    wait_until("the listener notices", || async {
        stats(&app).await["listener"]["connected"] == json!(false)
    })
    .await;

    proxy.restore();
    wait_until("ready again", || async {
        status_of(&app, "/readyz").await == 200
    })
    .await;
    // The same event id on every try: an attempt that failed in doubt is not duplicated.
    wait_until("appends accepted again", || async {
        app.append_raw("s", "", r#"{"data":3,"id":"after-outage"}"#)
            .await
            .status()
            == 201
    })
    .await;
    app.append("s", json!([{"data":4},{"data":5}])).await;

    // The subscriptions opened before the outage carry on, exactly once and in order.
    let got = live.envelopes_through(3, 5).await;
    let data: Vec<&Value> = got.iter().map(|e| &e["data"]).collect();
    assert_eq!(data, [&json!(3), &json!(4), &json!(5)]);
    let rest = catching_up.envelopes_through(201, 2000).await;
    for (i, ev) in rest.iter().enumerate() {
        assert_eq!(ev["data"]["n"], json!(200 + i));
    }
    assert_eq!(stats(&app).await["database"], "ok");
    app.shutdown().await;
}

/// Appends `{"p":p,"i":i}` with id `p-i` until acknowledged, retrying failures with the same
/// id; returns the acknowledged seqs.
async fn produce_with_retries(
    app: &TestApp,
    stream: &str,
    p: usize,
    count: usize,
    acked: &AtomicUsize,
    seqs: &Mutex<HashMap<String, i64>>,
) {
    let url = app.url(&format!("/v1/streams/{stream}/events"));
    for i in 0..count {
        let id = format!("{p}-{i}");
        let body = json!({"data":{"p":p,"i":i},"id":id});
        let deadline = Instant::now() + WAIT;
        loop {
            let res = app.client.post(&url).json(&body).send().await;
            match res {
                Ok(r) if r.status() == 201 => {
                    let r: Value = r.json().await.unwrap();
                    // A failed append left nothing behind (a commit cut off mid-way is looked
                    // up, not guessed), so a retry is never answered as a duplicate.
                    assert_eq!(
                        r["events"][0].get("duplicate"),
                        None,
                        "{id} failed yet stored"
                    );
                    let seq = r["first_seq"].as_i64().unwrap();
                    seqs.lock().unwrap().insert(id.clone(), seq);
                    acked.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Ok(r) => assert_eq!(r.status(), 503, "only outages may fail appends"),
                Err(e) => panic!("the server itself must stay up: {e}"),
            }
            assert!(Instant::now() < deadline, "append {id} never succeeded");
            // A client's retry back-off.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// Terminates PostgreSQL's backends (pg_terminate_backend) under two nodes: PostgreSQL only.
#[backend_test(postgres)]
async fn terminating_every_backend_during_appends_and_subscriptions_loses_and_duplicates_nothing(
    db: TestDb,
) {
    let fast = |c: &mut tailcast::Config| c.reconnect_delay_ms = 20;
    let a = spawn_node_with(&db, "a", fast).await;
    let b = spawn_node_with(&db, "b", fast).await;
    let mut subs = Vec::new();
    for node in [&a, &b] {
        subs.push(node.sse_events("s", "", None).await);
        subs.push(node.sse_events("s", "", None).await);
    }

    let (producers, per_producer) = (4, 60);
    let acked = AtomicUsize::new(0);
    let seqs = Mutex::new(HashMap::new());
    let produce = futures::future::join_all((0..producers).map(|p| {
        let node = if p % 2 == 0 { &a } else { &b };
        produce_with_retries(node, "s", p, per_producer, &acked, &seqs)
    }));
    let kill = async {
        let mut killed = 0;
        for threshold in [30, 90, 150, 200] {
            wait_until("appends progressing", || async {
                acked.load(Ordering::SeqCst) >= threshold
            })
            .await;
            // Pools, appenders and LISTEN connections of both nodes, mid-flight.
            killed += terminate_backends(db.pg(), "tailcast-%").await;
        }
        killed
    };
    let (_, killed) = tokio::join!(produce, kill);
    assert!(killed >= 4, "the test must actually kill connections");

    let log = a.read_all("s").await;
    let total = producers * per_producer;
    assert_eq!(
        log.len(),
        total,
        "no acknowledged event lost, none duplicated"
    );
    let seqs = seqs.into_inner().unwrap();
    let mut ids = HashSet::new();
    for (n, ev) in log.iter().enumerate() {
        assert_eq!(ev["seq"].as_i64().unwrap(), n as i64 + 1);
        let id = ev["id"].as_str().unwrap();
        assert!(ids.insert(id.to_owned()), "{id} stored twice");
        assert_eq!(seqs[id], n as i64 + 1, "{id} acknowledged at another seq");
    }
    for sub in &mut subs {
        assert_eq!(sub.envelopes_through(1, total as i64).await, log);
    }

    // Recovered by itself: both nodes ready, listening, and delivering live.
    for node in [&a, &b] {
        wait_until("ready", || async {
            status_of(node, "/readyz").await == 200
        })
        .await;
        wait_until("listening", || async {
            stats(node).await["listener"]["connected"] == json!(true)
        })
        .await;
    }
    let next = total as i64 + 1;
    wait_until("appends accepted", || async {
        b.append_raw("s", "", r#"{"data":"last","id":"last"}"#)
            .await
            .status()
            == 201
    })
    .await;
    for sub in &mut subs {
        assert_eq!(sub.envelopes_through(next, next).await[0]["data"], "last");
    }
    a.shutdown().await;
    b.shutdown().await;
}

// Commit tokens exist on PostgreSQL only: a SQLite commit is in-process, never in doubt.
#[backend_test(postgres)]
async fn a_commit_cut_off_mid_way_is_looked_up_by_its_token_not_by_transaction_id(db: TestDb) {
    use std::time::Duration;
    use tailcast::log::store::{self, CommitOutcome};
    db.db.migrate().await.unwrap();
    let payloads = vec!["node\ns 1".to_owned()];
    let wait = Duration::from_millis(200);
    let outcome = |token| store::commit_outcome(&db.db, token, wait);

    let committed = uuid::Uuid::new_v4();
    let mut tx = db.db.begin_write().await.unwrap();
    assert!(store::notify_and_mark(&mut tx, &payloads, committed)
        .await
        .unwrap());
    tx.commit().await.unwrap();
    assert_eq!(outcome(committed).await.unwrap(), CommitOutcome::Committed);

    let aborted = uuid::Uuid::new_v4();
    let mut tx = db.db.begin_write().await.unwrap();
    assert!(store::notify_and_mark(&mut tx, &payloads, aborted)
        .await
        .unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(outcome(aborted).await.unwrap(), CommitOutcome::NotCommitted);
    // The lookup settles it: it does not leave the token behind to confuse a later lookup.
    assert_eq!(outcome(aborted).await.unwrap(), CommitOutcome::NotCommitted);

    // While the writer is still open, the lookup waits for it, then reports it pending; a
    // lookup that is waiting when the writer commits finds it (whichever reaches the server
    // first, the answer is the same).
    let open = uuid::Uuid::new_v4();
    let mut tx = db.db.begin_write().await.unwrap();
    assert!(store::notify_and_mark(&mut tx, &payloads, open)
        .await
        .unwrap());
    assert_eq!(outcome(open).await.unwrap(), CommitOutcome::Pending);
    let (looked, committed_meanwhile) = tokio::join!(
        store::commit_outcome(&db.db, open, Duration::from_secs(30)),
        tx.commit()
    );
    committed_meanwhile.unwrap();
    assert_eq!(looked.unwrap(), CommitOutcome::Committed);

    // A token recorded without an answer (the transaction above) has none to give.
    assert_eq!(
        store::recorded_answer(&db.db, committed).await.unwrap(),
        None
    );

    // A call of `tailcast.append_jobs` sent outside a transaction is its own commit: a caller
    // that lost the connection during it finds the token committed, and the answer the call
    // would have returned recorded with it (seqs, duplicates, refusals, new heads).
    let tailcast::log::db::Db::Postgres(pool) = &db.db else {
        unreachable!("postgres only")
    };
    let mut conn = pool.acquire().await.unwrap();
    let rows = |stream: &'static str, n: usize, expected: Option<i64>| store::JobRows {
        stream: vec![stream],
        count: vec![n as i32],
        expected: vec![expected],
        close: vec![false],
        ty: vec!["token"; n],
        data: vec!["{}"; n],
        id: vec![None; n],
        key: vec![None; n],
        body: vec![None; n],
        by: vec![None; n],
        append: vec![false; n],
    };
    let now = chrono::Utc::now();
    let mut answers = Vec::new();
    // A new stream (the general path), then two on its row (the one-UPDATE path), the
    // second refused by its expected_seq.
    for (n, expected) in [(2, None), (3, Some(2)), (1, Some(1))] {
        let token = uuid::Uuid::new_v4();
        let answer = store::append_jobs(
            &mut conn,
            "node",
            token,
            now,
            &rows("one-trip", n, expected),
        )
        .await
        .unwrap();
        answers.push((token, answer));
    }
    let (first, second) = (&answers[0], &answers[1]);
    assert_eq!(first.1.seqs, vec![Some(1), Some(2)]);
    assert_eq!(second.1.seqs, vec![Some(3), Some(4), Some(5)]);
    assert_eq!(second.1.written_heads, vec![5]);
    for (token, answer) in &answers[..2] {
        assert_eq!(outcome(*token).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(
            store::recorded_answer(&db.db, *token)
                .await
                .unwrap()
                .as_ref(),
            Some(answer)
        );
    }
    // The refused call wrote nothing, so it left no token: looked up, it never committed.
    let (refused, answer) = &answers[2];
    assert_eq!(answer.errors, vec![Some("seq_conflict".to_owned())]);
    assert_eq!(answer.error_heads, vec![Some(5)]);
    assert_eq!(
        outcome(*refused).await.unwrap(),
        CommitOutcome::NotCommitted
    );
    drop(conn);

    // Nothing to announce: nothing was written, so there is no token to look up.
    let mut tx = db.db.begin_write().await.unwrap();
    assert!(!store::notify_and_mark(&mut tx, &[], uuid::Uuid::new_v4())
        .await
        .unwrap());
    tx.rollback().await.unwrap();

    // Old tokens are pruned; fresh ones stay.
    assert_eq!(
        store::prune_commit_tokens(&db.db, Duration::from_secs(600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(outcome(committed).await.unwrap(), CommitOutcome::Committed);
}
