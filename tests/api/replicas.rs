//! Read replicas (`--database-read-url`): replay, NDJSON export and subscription catch-up read
//! from a real PostgreSQL streaming replica when it has replayed far enough, and from the
//! primary otherwise, exactly either way.
//!
//! Each test starts a private primary and a hot standby of it (`pg_basebackup -R`, see
//! `pgcluster`), never touching the shared server. Exactness while the standby lags is shown
//! by pausing its replay (`pg_wal_replay_pause()`); that reads really reach the standby, by
//! its own `pg_stat_activity` (the reader's `application_name` is `tailcast-read`) and by the
//! node's `/v1/stats` counters (per node, so no other test can move them).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{stats, wait_until, SseClient, TestApp, WAIT};
use crate::pgcluster::PrivateCluster;

/// A primary, a hot standby following it, and a test database on the primary.
struct Pair {
    db: TestDb,
    standby: PrivateCluster,
    /// Test queries on the standby (replay control, what it has, who reads it).
    on_standby: PgPool,
    // Last: the standby goes first, so it never outlives its primary by much.
    _primary: PrivateCluster,
}

async fn pair(test: &str) -> Option<Pair> {
    let primary = PrivateCluster::start(test).await?;
    let db = primary.test_db().await;
    let standby = primary.standby().await;
    let on_standby = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(WAIT)
        .connect(&standby.url())
        .await
        .expect("connect to the standby");
    Some(Pair {
        db,
        standby,
        on_standby,
        _primary: primary,
    })
}

impl Pair {
    async fn app(&self, tweak: impl FnOnce(&mut tailcast::Config)) -> TestApp {
        let url = self.standby.url();
        TestApp::spawn_with(self.db.clone(), |c| {
            c.database_read_url = vec![url];
            tweak(c);
        })
        .await
    }

    /// Waits until the standby has replayed everything the primary has written so far.
    async fn caught_up(&self) {
        let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
            .fetch_one(self.db.pg())
            .await
            .unwrap();
        wait_until("the standby to replay the primary's WAL", || async {
            sqlx::query_scalar::<_, bool>("select pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&lsn)
                .fetch_one(&self.on_standby)
                .await
                .unwrap_or(false)
        })
        .await;
    }

    /// Stops the standby's replay (it keeps receiving WAL, and answering queries, as of now).
    async fn pause(&self) {
        sqlx::query("select pg_wal_replay_pause()")
            .execute(&self.on_standby)
            .await
            .unwrap();
        wait_until("replay to pause", || async {
            sqlx::query_scalar::<_, String>("select pg_get_wal_replay_pause_state()")
                .fetch_one(&self.on_standby)
                .await
                .is_ok_and(|s| s == "paused")
        })
        .await;
    }

    async fn resume(&self) {
        sqlx::query("select pg_wal_replay_resume()")
            .execute(&self.on_standby)
            .await
            .unwrap();
    }

    /// The stream's head as the standby has it.
    async fn standby_head(&self, stream: &str) -> Option<i64> {
        sqlx::query_scalar("select head from streams where name = $1")
            .bind(stream)
            .fetch_optional(&self.on_standby)
            .await
            .unwrap()
    }

    /// Sessions of tailcast's reader on the standby whose last statement read events.
    async fn reader_sessions_on_standby(&self) -> i64 {
        reader_sessions(&self.on_standby).await
    }
}

async fn reader_sessions(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where application_name = 'tailcast-read' and query like '%from events%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// This node's counters for its one replica: (pages served, lagging, unavailable).
async fn replica_counts(app: &TestApp) -> (u64, u64, u64) {
    let s = stats(app).await;
    let r = &s["read_replicas"][0];
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
    (n("pages"), n("lagging"), n("unavailable"))
}

/// Appends `count` events to `stream`, `{"i": seq}` each (the stream must be new or hold
/// `first - 1` events), in batches of 25.
async fn append_numbered(app: &TestApp, stream: &str, first: i64, count: i64) {
    let mut next = first;
    while next < first + count {
        let end = (next + 25).min(first + count);
        let batch: Vec<Value> = (next..end).map(|i| json!({"data": {"i": i}})).collect();
        app.append(stream, json!(batch)).await;
        next = end;
    }
}

/// Asserts `events` are exactly seqs `from..=to`, each carrying its own number.
fn assert_exact(events: &[Value], from: i64, to: i64, what: &str) {
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    let expected: Vec<i64> = (from..=to).collect();
    assert_eq!(seqs, expected, "{what}");
    for e in events {
        assert_eq!(e["data"]["i"], e["seq"], "{what}: data of {e}");
    }
}

async fn export(app: &TestApp, stream: &str, after: i64) -> Vec<Value> {
    let res = app
        .client
        .get(app.url(&format!("/v1/streams/{stream}/events?after={after}")))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.expect("a complete export");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn replay_page(app: &TestApp, stream: &str, after: i64, limit: i64) -> Vec<Value> {
    let page = app
        .get_json(&format!(
            "/v1/streams/{stream}/events?after={after}&limit={limit}"
        ))
        .await;
    page["events"].as_array().unwrap().clone()
}

/// Catches up over SSE from `after` through `head`, then proves the subscription is live by
/// appending one more event and receiving it.
async fn sse_catch_up_then_live(app: &TestApp, stream: &str, after: i64, head: i64) {
    let mut sub: SseClient = app
        .sse_events(stream, &format!("?after={after}"), None)
        .await;
    let got = sub.envelopes_through(after + 1, head).await;
    assert_exact(&got, after + 1, head, "SSE catch-up");
    append_numbered(app, stream, head + 1, 1).await;
    let live = sub.envelopes_through(head + 1, head + 1).await;
    assert_exact(&live, head + 1, head + 1, "SSE live after catch-up");
}

#[tokio::test]
async fn catch_up_replay_and_export_read_the_replica_once_it_has_replayed_far_enough() {
    let Some(pair) = pair("replica_serves_reads").await else {
        return;
    };
    let app = pair.app(|_| {}).await;
    append_numbered(&app, "r", 1, 120).await;
    pair.caught_up().await;
    assert_eq!(pair.standby_head("r").await, Some(120));

    assert_exact(&app.read_all("r").await, 1, 120, "replay");
    assert_exact(&export(&app, "r", 0).await, 1, 120, "export");
    assert_exact(&export(&app, "r", 100).await, 101, 120, "export after 100");
    sse_catch_up_then_live(&app, "r", 0, 120).await;

    // Every page came from the standby: none was left to the primary.
    let (pages, lagging, unavailable) = replica_counts(&app).await;
    assert!(pages >= 5, "pages served by the replica: {pages}");
    assert_eq!((lagging, unavailable), (0, 0));
    // And the standby saw those reads; the primary never had a reader session.
    assert!(pair.reader_sessions_on_standby().await >= 1);
    assert_eq!(reader_sessions(pair.db.pg()).await, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn while_the_replicas_replay_is_paused_every_read_is_exact_and_only_what_it_has_is_read_there(
) {
    let Some(pair) = pair("replica_paused").await else {
        return;
    };
    // Pages of 40: a catch-up from 0 reads its first pages on the standby and the rest, which
    // the standby has not replayed, on the primary.
    let app = pair.app(|c| c.read_page = 40).await;
    append_numbered(&app, "p", 1, 100).await;
    pair.caught_up().await;
    pair.pause().await;
    append_numbered(&app, "p", 101, 50).await;
    assert_eq!(pair.standby_head("p").await, Some(100), "replay is paused");

    // The whole stream: more than the standby has, so the primary serves it.
    let (pages0, lagging0, _) = replica_counts(&app).await;
    assert_exact(&app.read_all("p").await, 1, 150, "replay");
    let (pages1, lagging1, _) = replica_counts(&app).await;
    assert!(lagging1 > lagging0, "the lagging replica was passed over");
    assert_eq!(
        pages1, pages0,
        "no page of the full replay came from the replica"
    );

    // A page the standby holds entirely is read there, and is the primary's page.
    assert_exact(&replay_page(&app, "p", 0, 50).await, 1, 50, "page 1..50");
    let (pages2, lagging2, _) = replica_counts(&app).await;
    assert_eq!((pages2, lagging2), (pages1 + 1, lagging1));
    // One that reaches past what it has replayed is not.
    assert_exact(
        &replay_page(&app, "p", 90, 20).await,
        91,
        110,
        "page 91..110",
    );
    assert_eq!(replica_counts(&app).await.1, lagging2 + 1);

    assert_exact(&export(&app, "p", 0).await, 1, 150, "export");
    assert_exact(&export(&app, "p", 120).await, 121, 150, "export after 120");
    // Catch-up across the standby's head: 1..80 there, 81..150 on the primary, then live.
    let (pages3, lagging3, _) = replica_counts(&app).await;
    sse_catch_up_then_live(&app, "p", 0, 150).await;
    let (pages4, lagging4, unavailable) = replica_counts(&app).await;
    assert!(
        pages4 >= pages3 + 2,
        "catch-up read its first pages on the replica"
    );
    assert!(lagging4 > lagging3, "and the rest on the primary");
    assert_eq!(unavailable, 0);

    // Once replay resumes and reaches the head, the standby serves the whole stream again.
    pair.resume().await;
    pair.caught_up().await;
    assert_eq!(pair.standby_head("p").await, Some(151));
    assert_exact(&app.read_all("p").await, 1, 151, "replay after resume");
    let (pages5, lagging5, _) = replica_counts(&app).await;
    assert!(pages5 > pages4);
    assert_eq!(lagging5, lagging4);
    app.shutdown().await;
}

/// Appends to message `answer` of `stream`: a start (`"s"`) if `first` is 1, and appends
/// (`"."`) up to seq `last`, in batches of 25.
async fn append_tokens(app: &TestApp, stream: &str, first: i64, last: i64) {
    let mut next = first;
    while next <= last {
        let end = (next + 25).min(last + 1);
        let batch: Vec<Value> = (next..end)
            .map(|seq| match seq {
                1 => json!({"key":"answer","data":"s"}),
                _ => json!({"key":"answer","append":true,"data":"."}),
            })
            .collect();
        app.append(stream, json!(batch)).await;
        next = end;
    }
}

/// A compacted read of `stream` from 0 (a JSON page, then the NDJSON export) must be the
/// one message of `append_tokens`, through `head`.
async fn assert_compacted(app: &TestApp, stream: &str, head: i64, what: &str) {
    let page = app
        .get_json(&format!("/v1/streams/{stream}/events?compact=1&limit=1000"))
        .await;
    let res = app
        .client
        .get(app.url(&format!("/v1/streams/{stream}/events?compact=1")))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    let text = res.text().await.expect("a complete export");
    let exported: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (events, how) in [
        (page["events"].as_array().unwrap(), "page"),
        (&exported, "export"),
    ] {
        assert_eq!(events.len(), 1, "{what}, {how}: {events:?}");
        let e = &events[0];
        assert_eq!(
            (&e["seq"], &e["folded"]),
            (&json!(head), &json!(head)),
            "{what}, {how}"
        );
        let text = "s".to_owned() + &".".repeat(head as usize - 1);
        assert_eq!(e["data"], json!(text), "{what}, {how}");
    }
}

/// Compacted reads (`compact=1`: JSON pages and the export) take their log pages through the
/// same reader as any replay: from the standby once it has replayed far enough, the rest from
/// the primary, folded exactly either way.
#[tokio::test]
async fn compacted_reads_read_the_replica_like_any_replay() {
    let Some(pair) = pair("replica_compacted").await else {
        return;
    };
    let app = pair.app(|c| c.read_page = 40).await;
    append_tokens(&app, "c", 1, 100).await;
    pair.caught_up().await;
    let (pages0, lagging0, _) = replica_counts(&app).await;
    assert_compacted(&app, "c", 100, "replica caught up").await;
    let (pages1, lagging1, unavailable) = replica_counts(&app).await;
    // 100 events in log pages of 40, twice: six pages, all on the standby.
    assert!(
        pages1 >= pages0 + 6,
        "pages served by the replica: {pages0} -> {pages1}"
    );
    assert_eq!((lagging1, unavailable), (lagging0, 0));
    assert!(pair.reader_sessions_on_standby().await >= 1);
    assert_eq!(reader_sessions(pair.db.pg()).await, 0);

    // Replay paused at 100, head 150: each read's first pages there, the rest on the primary.
    pair.pause().await;
    append_tokens(&app, "c", 101, 150).await;
    assert_eq!(pair.standby_head("c").await, Some(100), "replay is paused");
    assert_compacted(&app, "c", 150, "replica paused").await;
    let (pages2, lagging2, unavailable) = replica_counts(&app).await;
    assert!(
        pages2 >= pages1 + 4,
        "1..80 on the replica: {pages1} -> {pages2}"
    );
    assert!(
        lagging2 >= lagging1 + 2,
        "81.. on the primary: {lagging1} -> {lagging2}"
    );
    assert_eq!(unavailable, 0);
    pair.resume().await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_replica_that_is_down_costs_a_fallback_never_an_error_and_is_used_again_when_back() {
    let Some(pair) = pair("replica_down").await else {
        return;
    };
    let app = pair.app(|c| c.database_read_timeout_ms = 500).await;
    append_numbered(&app, "d", 1, 60).await;
    pair.caught_up().await;
    assert_exact(&app.read_all("d").await, 1, 60, "replay");
    let (pages0, _, unavailable0) = replica_counts(&app).await;
    assert!(pages0 >= 1);
    assert_eq!(unavailable0, 0);

    pair.standby.stop().await;
    append_numbered(&app, "d", 61, 10).await;
    assert_exact(&app.read_all("d").await, 1, 70, "replay, replica down");
    assert_exact(&export(&app, "d", 0).await, 1, 70, "export, replica down");
    sse_catch_up_then_live(&app, "d", 30, 70).await;
    let s = stats(&app).await;
    let r = &s["read_replicas"][0];
    assert!(r["unavailable"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(r["pages"].as_u64().unwrap(), pages0, "{s}");

    // Back: after its backoff the replica serves reads again.
    pair.standby.restart().await;
    pair.caught_up().await;
    wait_until("the replica to serve a read again", || async {
        app.read_all("d").await.len() == 71 && replica_counts(&app).await.0 > pages0
    })
    .await;
    app.shutdown().await;
}

// Needs no replica: an address that accepts TCP connections and never answers.
#[backend_test(postgres)]
async fn a_replica_that_never_answers_costs_at_most_the_read_timeout(db: TestDb) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://postgres@{}/postgres",
        silent.local_addr().unwrap()
    );
    let app = TestApp::spawn_with(db, |c| {
        c.database_read_url = vec![url];
        c.database_read_timeout_ms = 300;
    })
    .await;
    append_numbered(&app, "s", 1, 30).await;
    let started = Instant::now();
    assert_exact(&app.read_all("s").await, 1, 30, "replay");
    // The first page waited for the silent replica (300 ms), then the primary answered.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let s = stats(&app).await;
    let r = &s["read_replicas"][0];
    // Both pages of the replay (the events, then the empty page that ends it) were left to
    // the primary: the first after the timeout, the second at once (the replica is skipped).
    assert!(r["unavailable"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(r["pages"], 0, "{s}");
    drop(silent);
    app.shutdown().await;
}

#[tokio::test]
async fn a_read_url_with_the_embedded_store_is_refused_at_start_up() {
    let db = TestDb::sqlite().await;
    let mut config = tailcast::Config::for_database(db.url());
    config.database_read_url = vec!["postgres://postgres@127.0.0.1:5432/postgres".into()];
    let err = tailcast::App::with_db(config, db.db.clone())
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("--database-read-url") && msg.contains("postgres://"),
        "{msg}"
    );
}
