//! Appending from an application's own PostgreSQL transaction (`tailcast.append`): the same
//! rules as the HTTP path, nothing visible (and no seq used) until the application commits,
//! and live subscribers on every node woken by the commit. PostgreSQL only: the SQL API does
//! not exist on the embedded SQLite store.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::backend::{backend_test, TestDb};
use crate::helpers::{wait_until, TestApp};
use crate::nodes::spawn_node;

/// `select tailcast.append(stream, type, data, id)` in `tx`: the event's seq.
async fn sql_append(
    tx: &mut Transaction<'static, Postgres>,
    stream: &str,
    ty: &str,
    data: &str,
    id: Option<&str>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select tailcast.append($1, $2, $3::json, $4)")
        .bind(stream)
        .bind(ty)
        .bind(data)
        .bind(id)
        .fetch_one(&mut **tx)
        .await
}

/// The SQLSTATE and message of a database error.
fn db_error(e: sqlx::Error) -> (String, String) {
    match e {
        sqlx::Error::Database(d) => (
            d.code().unwrap_or_default().into_owned(),
            d.message().into(),
        ),
        other => panic!("not a database error: {other}"),
    }
}

/// The test database's connection options, as user `user`.
fn options_as(db: &TestDb, user: &str) -> PgConnectOptions {
    let opts: PgConnectOptions = db.url().parse().expect("database URL");
    opts.username(user)
}

#[backend_test(postgres)]
async fn a_rolled_back_append_leaves_no_trace_and_no_gap(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    let pool = db.pg();

    // On a new stream: the row it created goes with the rollback.
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        sql_append(&mut tx, "r", "tick", "1", None).await.unwrap(),
        1
    );
    tx.rollback().await.unwrap();
    assert_eq!(app.get("/v1/streams/r").await.status(), 404);

    // On an existing stream: the seq it had is the next append's.
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        sql_append(&mut tx, "r", "tick", "1", None).await.unwrap(),
        1
    );
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        sql_append(&mut tx, "r", "tick", "2", Some("gone"))
            .await
            .unwrap(),
        2
    );
    tx.rollback().await.unwrap();
    let res = app.append("r", json!({"data":"http"})).await;
    assert_eq!(res["first_seq"], 2);
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        sql_append(&mut tx, "r", "tick", "3", Some("gone"))
            .await
            .unwrap(),
        3
    );
    tx.commit().await.unwrap();
    let log = app.read_all("r").await;
    let seqs: Vec<i64> = log.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(log[1]["data"], "http");
    assert_eq!(app.get_json("/v1/streams/r").await["head"], 3);
    app.shutdown().await;
}

#[backend_test(postgres)]
async fn a_committed_append_reaches_live_sse_and_ws_subscribers_on_two_nodes_once(db: TestDb) {
    let a = spawn_node(&db, "a").await;
    let b = spawn_node(&db, "b").await;
    let mut sse_a = a.sse_events("live", "?after=0", None).await;
    let mut sse_b = b.sse_events("live", "?after=0", None).await;
    let mut ws_a = a.ws().await;
    ws_a.subscribe("live", json!({"after":0})).await;
    let mut ws_b = b.ws().await;
    ws_b.subscribe("live", json!({"after":0})).await;

    // Odd spacing and key order: stored and delivered byte for byte.
    let raw = r#"{"z":1,  "a":"h\u00e9","n":1.50}"#;
    let mut tx = db.pg().begin().await.unwrap();
    assert_eq!(
        sql_append(&mut tx, "live", "step", raw, Some("s1"))
            .await
            .unwrap(),
        1
    );
    let seqs: Vec<i64> = sqlx::query_scalar(
        "select tailcast.append_many('live', array['step', 'step'], array['[1]', '[2]']::json[])",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(seqs, [2, 3]);
    tx.commit().await.unwrap();

    let log = a.read_all("live").await;
    assert_eq!(log.len(), 3);
    for sse in [&mut sse_a, &mut sse_b] {
        let first = sse.next().await.expect("the first event");
        assert!(
            first.data.contains(&format!(r#""data":{raw}"#)),
            "{}",
            first.data
        );
        let rest = sse.envelopes_through(2, 3).await;
        assert_eq!(rest, log[1..]);
    }
    for ws in [&mut ws_a, &mut ws_b] {
        for expected in &log {
            let ev = ws.next_event().await;
            assert_eq!(ev["seq"], expected["seq"]);
            assert_eq!(ev["data"], expected["data"]);
        }
    }
    // Once each: the next thing every subscriber gets is the next append.
    a.append("live", json!({"data":"next"})).await;
    for sse in [&mut sse_a, &mut sse_b] {
        assert_eq!(sse.next_envelope().await["seq"], 4);
    }
    for ws in [&mut ws_a, &mut ws_b] {
        assert_eq!(ws.next_event().await["seq"], 4);
    }
    ws_a.close().await;
    ws_b.close().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[backend_test(postgres)]
async fn concurrent_app_transactions_and_http_appends_share_one_gap_free_sequence(db: TestDb) {
    const APPS: usize = 16;
    const PER_APP: usize = 5;
    const HTTP: usize = 4;
    const PER_HTTP: usize = 10;
    let a = spawn_node(&db, "a").await;
    let b = spawn_node(&db, "b").await;
    let mut sse = b.sse_events("mix", "?after=0", None).await;
    let mut ws = a.ws().await;
    ws.subscribe("mix", json!({"after":0})).await;

    // Sixteen application connections of their own, each committing small transactions that
    // also write the application's table, while HTTP producers append on both nodes.
    let apps: PgPool = PgPoolOptions::new()
        .max_connections(APPS as u32)
        .connect_with(options_as(&db, "postgres"))
        .await
        .unwrap();
    sqlx::query("create table app_state (app int, step int)")
        .execute(&apps)
        .await
        .unwrap();
    let app_tasks = (0..APPS).map(|p| {
        let apps = apps.clone();
        async move {
            for i in 0..PER_APP {
                let mut tx = apps.begin().await.unwrap();
                sqlx::query("insert into app_state values ($1, $2)")
                    .bind(p as i32)
                    .bind(i as i32)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let data = json!({"p": format!("app{p}"), "i": i}).to_string();
                sql_append(&mut tx, "mix", "app", &data, Some(&format!("app{p}-{i}")))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }
    });
    let http_tasks = (0..HTTP).map(|p| {
        let node = if p % 2 == 0 { &a } else { &b };
        async move {
            for i in 0..PER_HTTP {
                node.append(
                    "mix",
                    json!({"data":{"p":format!("http{p}"),"i":i},"id":format!("http{p}-{i}")}),
                )
                .await;
            }
        }
    });
    let apps_done = join_all(app_tasks);
    let http_done = join_all(http_tasks);
    tokio::join!(apps_done, http_done);

    let total = APPS * PER_APP + HTTP * PER_HTTP;
    let log = a.read_all("mix").await;
    assert_eq!(log.len(), total);
    let mut ids = HashSet::new();
    let mut next_of: std::collections::HashMap<String, u64> = Default::default();
    for (n, ev) in log.iter().enumerate() {
        assert_eq!(ev["seq"].as_i64().unwrap(), n as i64 + 1, "gap-free");
        assert!(ids.insert(ev["id"].as_str().unwrap().to_owned()), "once");
        let producer = ev["data"]["p"].as_str().unwrap().to_owned();
        let next = next_of.entry(producer.clone()).or_default();
        assert_eq!(
            ev["data"]["i"].as_u64().unwrap(),
            *next,
            "{producer} in order"
        );
        *next += 1;
    }
    let rows: i64 = sqlx::query_scalar("select count(*) from app_state")
        .fetch_one(&apps)
        .await
        .unwrap();
    assert_eq!(rows, (APPS * PER_APP) as i64);

    // Every event delivered once, in order, live on both nodes.
    let got = sse.envelopes_through(1, total as i64).await;
    assert_eq!(got, log);
    for expected in &log {
        let ev = ws.next_event().await;
        assert_eq!(ev["seq"], expected["seq"]);
        assert_eq!(ev["id"], expected["id"]);
    }
    apps.close().await;
    ws.close().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[backend_test(postgres)]
async fn an_app_transaction_holds_its_stream_until_commit_and_no_other(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    let mut held = db.pg().begin().await.unwrap();
    assert_eq!(
        sql_append(&mut held, "held", "t", "1", None).await.unwrap(),
        1
    );
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *held)
        .await
        .unwrap();

    // Other streams go on, over HTTP and in other transactions.
    assert_eq!(app.append("other", json!({"data":1})).await["first_seq"], 1);
    let mut tx = db.pg().begin().await.unwrap();
    assert_eq!(
        sql_append(&mut tx, "other", "t", "2", None).await.unwrap(),
        2
    );
    tx.commit().await.unwrap();

    // An HTTP append to the held stream waits for the application's commit...
    let waiting = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/v1/streams/held/events");
        async move {
            let res = client
                .post(url)
                .json(&json!({"data":2}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
            res.json::<Value>().await.unwrap()
        }
    });
    let blocked_by_app = || async {
        let blockers: Vec<i32> = sqlx::query_scalar(
            "select unnest(pg_blocking_pids(pid)) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_all(db.pg())
        .await
        .unwrap();
        blockers.contains(&pid)
    };
    wait_until("the HTTP append to wait on the held stream", blocked_by_app).await;
    assert!(!waiting.is_finished());
    // ...and takes the seq after the application's.
    held.commit().await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the append goes through after the commit")
        .unwrap();
    assert_eq!(res["first_seq"], 2);
    app.shutdown().await;
}

#[backend_test(postgres)]
async fn only_the_writer_role_may_append_and_it_may_do_nothing_else(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    let admin = db.pg();
    let suffix: String = sqlx::query_scalar("select md5(current_database())")
        .fetch_one(admin)
        .await
        .unwrap();
    let outsider = format!("tc_outsider_{}", &suffix[..12]);
    let writer = format!("tc_writer_{}", &suffix[..12]);
    for (role, grant) in [(&outsider, ""), (&writer, " in role tailcast_writer")] {
        sqlx::query(&format!("create role {role} login{grant}"))
            .execute(admin)
            .await
            .unwrap();
    }

    let out = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options_as(&db, &outsider))
        .await
        .unwrap();
    let refused = sqlx::query_scalar::<_, i64>("select tailcast.append('s', 't', '1')")
        .fetch_one(&out)
        .await
        .unwrap_err();
    assert_eq!(db_error(refused).0, "42501", "insufficient_privilege");
    out.close().await;

    let w = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options_as(&db, &writer))
        .await
        .unwrap();
    let seq: i64 = sqlx::query_scalar("select tailcast.append('s', 't', '1')")
        .fetch_one(&w)
        .await
        .unwrap();
    assert_eq!(seq, 1);
    for forbidden in [
        "select count(*) from events",
        "select count(*) from streams",
        "update streams set head = 7",
        "insert into commit_tokens (token) values (gen_random_uuid())",
        "select (tailcast.append_jobs('x', null, now(), array['s'], array[1], array[null::bigint],
                 array[true], array['stream.closed'], array['{}'], array[null], array[null])).seqs",
    ] {
        let e = sqlx::query(forbidden).execute(&w).await.unwrap_err();
        assert_eq!(db_error(e).0, "42501", "{forbidden}");
    }
    w.close().await;
    assert_eq!(app.get_json("/v1/streams/s").await["head"], 1);
    for role in [&outsider, &writer] {
        sqlx::query(&format!("drop role {role}"))
            .execute(admin)
            .await
            .unwrap();
    }
    app.shutdown().await;
}

#[backend_test(postgres)]
async fn ids_closed_streams_and_bad_input_follow_the_http_rules(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    let pool = db.pg();
    let call = |sql: &'static str| async move {
        let mut tx = pool.begin().await.unwrap();
        let r = sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut *tx).await;
        if r.is_ok() {
            tx.commit().await.unwrap();
        }
        r
    };

    // A known id answers the original seq and writes nothing, from SQL and from HTTP.
    assert_eq!(
        call("select tailcast.append('c', 't', '1', 'x')")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        call("select tailcast.append('c', 't', '2', 'x')")
            .await
            .unwrap(),
        1
    );
    let http = app.append("c", json!({"data":3,"id":"x"})).await;
    assert_eq!(http["events"], json!([{"seq":1,"id":"x","duplicate":true}]));
    let many: Vec<i64> = sqlx::query_scalar(
        "select tailcast.append_many('c', array['t','t','t'], array['1','2','3']::json[],
                                     array['x','y','y'], array[null,'k',null])",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(many, [1, 2, 2], "duplicates of the log and within the call");
    assert_eq!(app.get_json("/v1/streams/c").await["head"], 2);
    assert_eq!(app.read_all("c").await[1]["key"], "k");

    // expected_seq, as over HTTP.
    let e = call("select tailcast.append('c', 't', '1', expected_seq => 1)")
        .await
        .unwrap_err();
    let (code, msg) = db_error(e);
    assert_eq!(code, "TC005");
    assert!(msg.starts_with("seq_conflict: "), "{msg}");
    assert_eq!(
        call("select tailcast.append('c', 't', '1', expected_seq => 2)")
            .await
            .unwrap(),
        3
    );

    // Closed: new events are refused, a retry of an appended id still answers its seq.
    assert_eq!(app.close_stream("c", None).await.status(), 201);
    let e = call("select tailcast.append('c', 't', '1', 'new')")
        .await
        .unwrap_err();
    let (code, msg) = db_error(e);
    assert_eq!(code, "TC004");
    assert!(msg.starts_with("stream_closed: "), "{msg}");
    assert_eq!(
        call("select tailcast.append('c', 't', '1', 'y')")
            .await
            .unwrap(),
        2
    );

    // Invalid input, checked as the HTTP path checks it; nothing is written.
    let long_type = format!("select tailcast.append('d', '{}', '1')", "t".repeat(129));
    let cases: [(&str, &str, &str); 7] = [
        (
            "select tailcast.append('d', 'stream.closed', '1')",
            "TC003",
            "reserved_type",
        ),
        (
            "select tailcast.append('d', 'input.answered', '1')",
            "TC003",
            "reserved_type",
        ),
        (
            "select tailcast.append('d e', 't', '1')",
            "TC001",
            "invalid_stream_name",
        ),
        (
            "select tailcast.append('', 't', '1')",
            "TC001",
            "invalid_stream_name",
        ),
        (
            "select tailcast.append('d', E'a\\nb', '1')",
            "TC002",
            "invalid_event",
        ),
        (
            "select tailcast.append('d', 't', '1', '')",
            "TC002",
            "invalid_event",
        ),
        (long_type.as_str(), "TC002", "invalid_event"),
    ];
    for (sql, want_code, want_prefix) in cases {
        let e = sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(pool)
            .await
            .unwrap_err();
        let (code, msg) = db_error(e);
        assert_eq!(code, want_code, "{sql}");
        assert!(msg.starts_with(&format!("{want_prefix}: ")), "{sql}: {msg}");
    }
    let e = sqlx::query_scalar::<_, i64>("select tailcast.append('d', 't', '{bad')")
        .fetch_one(pool)
        .await
        .unwrap_err();
    assert_eq!(
        db_error(e).0,
        "22P02",
        "invalid JSON is refused by the json type"
    );
    assert_eq!(app.get("/v1/streams/d").await.status(), 404);
    app.shutdown().await;
}

/// The SQL of the README's "Append from your own transaction" examples, run as written.
const README_SQL: [&str; 3] = [
    "update orders set state = 'paid' where id = $1",
    "select tailcast.append($1, 'order.paid', $2::json, $3)",
    "grant tailcast_writer to",
];

#[backend_test(postgres)]
async fn the_readme_examples_run_as_written(db: TestDb) {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## Append from your own transaction")
        .nth(1)
        .expect("the README section")
        .split("\n## ")
        .next()
        .unwrap();
    // psycopg writes placeholders as %s, sqlx as $n: the same statements otherwise.
    let psycopg = |sql: &str| {
        let mut out = sql.to_owned();
        for n in 1..=3 {
            out = out.replace(&format!("${n}"), "%s");
        }
        out
    };
    for sql in README_SQL {
        assert!(
            section.contains(sql),
            "the README's sqlx example lost: {sql}"
        );
        assert!(
            section.contains(&psycopg(sql)),
            "the README's psycopg example lost: {sql}"
        );
    }

    let app = TestApp::spawn(db.clone()).await;
    let pool = db.pg();
    sqlx::query("create table orders (id bigint primary key, state text)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("insert into orders values (42, 'new')")
        .execute(pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(README_SQL[0])
        .bind(42i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    let seq: i64 = sqlx::query_scalar(README_SQL[1])
        .bind("order:42")
        .bind(r#"{"order": 42, "state": "paid"}"#)
        .bind("paid:42")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(seq, 1);
    let log = app.read_all("order:42").await;
    assert_eq!(log[0]["type"], "order.paid");
    assert_eq!(log[0]["id"], "paid:42");
    assert_eq!(log[0]["data"], json!({"order":42,"state":"paid"}));
    app.shutdown().await;
}

/// What `tailcast.append_jobs` answers for one batch.
#[derive(Debug, sqlx::FromRow)]
struct Jobs {
    seqs: Vec<Option<i64>>,
    dups: Vec<Option<bool>>,
    errors: Vec<Option<String>>,
    error_heads: Vec<Option<i64>>,
    written_streams: Vec<String>,
    written_heads: Vec<i64>,
    written_closed: Vec<bool>,
}

/// One job for [`append_jobs`]: stream, expected_seq, close, events as (type, id).
type JobSpec<'a> = (&'a str, Option<i64>, bool, Vec<(&'a str, Option<&'a str>)>);

async fn append_jobs(conn: &mut sqlx::PgConnection, jobs: &[JobSpec<'_>]) -> Jobs {
    let mut stream = Vec::new();
    let mut count = Vec::new();
    let mut expected = Vec::new();
    let mut close = Vec::new();
    let (mut ty, mut data, mut id, mut key) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, e, c, events) in jobs {
        stream.push(*s);
        count.push(events.len() as i32);
        expected.push(*e);
        close.push(*c);
        for (t, i) in events {
            ty.push(*t);
            data.push(format!("\"{}\"", i.unwrap_or("-")));
            id.push(*i);
            key.push(None::<&str>);
        }
    }
    sqlx::query_as(
        "select * from tailcast.append_jobs('test', gen_random_uuid(), now(), $1, $2, $3, $4,
                                            $5, $6, $7, $8)",
    )
    .bind(&stream)
    .bind(&count)
    .bind(&expected)
    .bind(&close)
    .bind(&ty)
    .bind(&data)
    .bind(&id)
    .bind(&key)
    .fetch_one(conn)
    .await
    .unwrap()
}

// The appender's batch, decided job by job exactly as the HTTP rules say (a batch's jobs are
// otherwise only combined by timing): duplicates of the log, of earlier jobs and within a job;
// refused jobs leaving nothing and not failing the others; closing twice.
#[backend_test(postgres)]
async fn one_batch_decides_each_job_against_the_state_the_earlier_ones_left(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    let mut listen = sqlx::postgres::PgListener::connect_with(db.pg())
        .await
        .unwrap();
    listen.listen("tailcast_appends").await.unwrap();
    let mut tx = db.pg().begin().await.unwrap();
    let ev = |id| ("t", Some(id));
    let close = ("stream.closed", None);
    let res = append_jobs(
        &mut tx,
        &[
            ("a", None, false, vec![ev("x"), ev("y")]),    // 1, 2
            ("a", None, false, vec![ev("x")]),             // dup 1
            ("b", Some(5), false, vec![ev("x")]),          // seq_conflict (head 0)
            ("a", Some(2), false, vec![ev("z"), ev("z")]), // 3, dup 3
            ("c", Some(9), false, vec![ev("s")]),          // seq_conflict
            ("c", Some(0), false, vec![ev("s"), ev("q")]), // 1, 2: `s` was refused
            ("c", None, false, vec![ev("q")]),             // dup 2
            ("a", None, true, vec![close]),                // 4, closes
            ("a", None, true, vec![close]),                // dup: head 4
            ("a", Some(0), false, vec![ev("y"), ev("z")]), // all dups: 2, 3
            ("a", None, false, vec![ev("w")]),             // stream_closed (head 4)
        ],
    )
    .await;
    tx.commit().await.unwrap();
    let some = |v: &[i64]| v.iter().map(|s| Some(*s)).collect::<Vec<_>>();
    let mut want_seqs = some(&[1, 2, 1]);
    want_seqs.push(None);
    want_seqs.extend(some(&[3, 3]));
    want_seqs.push(None);
    want_seqs.extend(some(&[1, 2, 2, 4, 4, 2, 3]));
    want_seqs.push(None);
    assert_eq!(res.seqs, want_seqs);
    let dup = |v: &[bool]| v.iter().map(|d| Some(*d)).collect::<Vec<_>>();
    let mut want_dups = dup(&[false, false, true]);
    want_dups.push(None);
    want_dups.extend(dup(&[false, true]));
    want_dups.push(None);
    want_dups.extend(dup(&[false, false, true, false, true, true, true]));
    want_dups.push(None);
    assert_eq!(res.dups, want_dups);
    let conflict = Some("seq_conflict".to_owned());
    let closed = Some("stream_closed".to_owned());
    assert_eq!(
        res.errors,
        [
            None,
            None,
            conflict.clone(),
            None,
            conflict,
            None,
            None,
            None,
            None,
            None,
            closed
        ]
    );
    assert_eq!(res.error_heads[2], Some(0));
    assert_eq!(res.error_heads[4], Some(0));
    assert_eq!(res.error_heads[10], Some(4));
    assert_eq!(res.written_streams, ["a", "c"]);
    assert_eq!(res.written_heads, [4, 2]);
    assert_eq!(res.written_closed, [true, false]);

    // The log holds exactly the written events; the stream only refused appends created is gone.
    let a = app.read_all("a").await;
    let ids: Vec<&Value> = a.iter().map(|e| &e["id"]).collect();
    assert_eq!(ids, [&json!("x"), &json!("y"), &json!("z"), &Value::Null]);
    assert_eq!(a[3]["type"], "stream.closed");
    assert_eq!(app.read_all("c").await.len(), 2);
    assert_eq!(app.get("/v1/streams/b").await.status(), 404);
    // One notification for the batch, after the commit: the node, then `stream head` lines.
    let n = tokio::time::timeout(Duration::from_secs(30), listen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.payload(), "test\na 4\nc 2");

    // Without any id (the other path through the function): closing a closed stream is a
    // duplicate of its head, and new events are refused.
    let mut tx = db.pg().begin().await.unwrap();
    let res = append_jobs(
        &mut tx,
        &[
            ("a", None, true, vec![close]),
            ("a", None, false, vec![("t", None)]),
            ("n", None, false, vec![("t", None), ("t", None)]),
        ],
    )
    .await;
    tx.commit().await.unwrap();
    assert_eq!(res.seqs, [Some(4), None, Some(1), Some(2)]);
    assert_eq!(res.dups, [Some(true), None, Some(false), Some(false)]);
    assert_eq!(res.errors, [None, closed_code(), None]);
    assert_eq!(res.written_streams, ["n"]);
    app.shutdown().await;
}

fn closed_code() -> Option<String> {
    Some("stream_closed".to_owned())
}

/// The append flag from SQL (issue 24): `append => true` on `tailcast.append`, `appends` on
/// `append_many`, stored as sent and folded by compacted reads like HTTP appends; calls
/// written for the signatures without it mean what they meant; `append` needs a `key`. SQL
/// appends have no author (`by`): a compacted read never folds them into a run of an
/// authenticated author's appends, only with other appends without one.
#[backend_test(postgres)]
async fn the_append_flag_from_sql_folds_like_http_appends_and_old_calls_still_work(db: TestDb) {
    let app = crate::auth::spawn_secured(db.clone()).await;
    let pool = db.pg();
    let scalar =
        |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await };
    let alice = crate::auth::token(json!({"sub":"alice","write":["chat"]}));
    let res = crate::auth::call(
        &app,
        reqwest::Method::POST,
        "/v1/streams/chat/events",
        Some(&alice),
        Some(&json!({"type":"msg","key":"answer","data":{"text":"He"}})),
    )
    .await;
    assert!(res.status().is_success(), "{}", res.status());
    // Named, positional, and append_many's array.
    let calls = [
        "select tailcast.append('chat', 'msg', '{\"text\":\"l\"}', key => 'answer', append => true)",
        "select tailcast.append('chat', 'msg', '{\"text\":\"l\"}', null, 'answer', null, true)",
    ];
    assert_eq!(scalar(calls[0]).await.unwrap(), 2);
    assert_eq!(scalar(calls[1]).await.unwrap(), 3);
    let many: Vec<i64> = sqlx::query_scalar(
        "select tailcast.append_many('chat', array['msg','msg'],
             array['{\"text\":\"o\"}', '{\"text\":\"!\"}']::json[],
             keys => array['answer','answer'], appends => array[true, null])",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(many, [4, 5]);

    // Calls without the flag, as 20261128000003 wrote them: no append.
    assert_eq!(
        scalar("select tailcast.append('chat', 't', '1')")
            .await
            .unwrap(),
        6
    );
    assert_eq!(
        scalar("select tailcast.append('chat', 't', '2', 'id-7', 'k', 6)")
            .await
            .unwrap(),
        7
    );
    let old_many: Vec<i64> = sqlx::query_scalar(
        "select tailcast.append_many('chat', array['t'], array['3']::json[], null, null, 7)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(old_many, [8]);

    let read = |path: &'static str| {
        let app = &app;
        async move {
            let res = crate::auth::call(
                app,
                reqwest::Method::GET,
                path,
                Some(crate::auth::ADMIN),
                None,
            )
            .await;
            assert!(res.status().is_success(), "{}", res.status());
            res.json::<Value>().await.unwrap()["events"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    let raw = read("/v1/streams/chat/events").await;
    let flags: Vec<(Value, Value)> = raw
        .iter()
        .map(|e| (e["append"].clone(), e["by"].clone()))
        .collect();
    let (t, none) = (json!(true), Value::Null);
    assert_eq!(
        flags,
        [
            (none.clone(), json!("alice")),
            (t.clone(), none.clone()),
            (t.clone(), none.clone()),
            (t.clone(), none.clone()),
            (none.clone(), none.clone()),
            (none.clone(), none.clone()),
            (none.clone(), none.clone()),
            (none.clone(), none.clone()),
        ]
    );
    // Compacted: alice's start stands alone (another author), the three SQL appends after it
    // fold into one append (the fourth had `null`: no append, a new message of the key).
    let compacted = read("/v1/streams/chat/events?compact=1").await;
    let summary: Vec<(i64, Value, Value, Value)> = compacted
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64().unwrap(),
                e["data"].clone(),
                e["append"].clone(),
                e["folded"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary[..3],
        [
            (1, json!({"text":"He"}), none.clone(), none.clone()),
            (4, json!({"text":"llo"}), t.clone(), json!(3)),
            (5, json!({"text":"!"}), none.clone(), none.clone()),
        ]
    );
    assert_eq!(compacted.len(), 6, "{compacted:?}");

    // `append` needs a key; arrays of different lengths are refused.
    for sql in [
        "select tailcast.append('chat', 't', '1', append => true)",
        "select (tailcast.append_many('chat', array['t'], array['1']::json[], keys => array['k'],
                                      appends => array[true, true]))[1]",
    ] {
        let (code, msg) = db_error(scalar(sql).await.unwrap_err());
        assert_eq!(code, "TC002", "{sql}");
        assert!(msg.starts_with("invalid_event: "), "{msg}");
    }
    assert_eq!(
        read("/v1/streams/chat/events").await.len(),
        8,
        "refusals write nothing"
    );
    app.shutdown().await;
}
