//! Operators' REST: replay pages and their bounds, `since=`, NDJSON export, stream listing,
//! metadata, deletion, snapshots, and the error format of every route.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{head, read_response, wait_until, TestApp};
use crate::wire::{self, raw_envelopes, seq};

async fn problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status(), status, "status for {code}");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], "about:blank");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

fn numbered(from: i64, to: i64) -> Value {
    Value::Array((from..=to).map(|i| json!({"data": i})).collect())
}

#[backend_test]
async fn replay_pages_respect_cursor_and_limit_bounds(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", numbered(1, 150)).await;

    let page = app.get_json("/v1/streams/s/events").await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 100, "default limit");
    assert_eq!(seq(&events[0]), 1);
    assert_eq!(page["next_after"], 100);
    assert_eq!(page["head"], 150);
    assert_eq!(page["closed"], false);
    assert_eq!(page["stream"], "s");

    let page = app
        .get_json("/v1/streams/s/events?after=140&limit=1000")
        .await;
    let seqs: Vec<i64> = page["events"].as_array().unwrap().iter().map(seq).collect();
    assert_eq!(seqs, (141..=150).collect::<Vec<_>>());
    assert_eq!(page["next_after"], 150);

    let page = app.get_json("/v1/streams/s/events?after=7&limit=1").await;
    assert_eq!(seq(&page["events"][0]), 8);
    assert_eq!(page["next_after"], 8);

    // Past the head: nothing, and the cursor stays put.
    let page = app.get_json("/v1/streams/s/events?after=500").await;
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next_after"], 500);

    for bad in ["limit=0", "limit=1001", "limit=-5", "limit=x"] {
        let res = app.get(&format!("/v1/streams/s/events?{bad}")).await;
        problem(res, 400, "invalid_parameter").await;
    }
    for bad in ["after=-1", "after=x", "after=1.5"] {
        let res = app.get(&format!("/v1/streams/s/events?{bad}")).await;
        problem(res, 400, "invalid_cursor").await;
    }
    let res = app.get("/v1/streams/nope/events").await;
    problem(res, 404, "stream_not_found").await;
    let res = app.get("/v1/streams/a%20b/events").await;
    problem(res, 400, "invalid_stream_name").await;
}

#[backend_test]
async fn since_starts_at_the_first_event_at_or_after_a_time(db: TestDb) {
    let app = TestApp::spawn(db).await;
    // Three commits at three distinct milliseconds.
    let mut times = Vec::new();
    for batch in 0..3 {
        let first = batch * 3 + 1;
        app.append("s", numbered(first, first + 2)).await;
        let env = &app.read_all("s").await[(first - 1) as usize];
        let t: DateTime<Utc> = env["time"].as_str().unwrap().parse().unwrap();
        times.push(t);
        wait_until(
            "the clock to pass the commit's millisecond",
            || async move { Utc::now() > t + chrono::Duration::milliseconds(1) },
        )
        .await;
    }
    let q = |t: DateTime<Utc>| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .replace('+', "%2B")
    };
    for (batch, t) in times.iter().enumerate() {
        let page = app
            .get_json(&format!("/v1/streams/s/events?since={}", q(*t)))
            .await;
        assert_eq!(seq(&page["events"][0]), batch as i64 * 3 + 1, "since {t}");
        assert_eq!(page["events"].as_array().unwrap().len(), 9 - batch * 3);
    }
    // Between two commits: the later one.
    let between = (times[1] + chrono::Duration::microseconds(500))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let page = app
        .get_json(&format!("/v1/streams/s/events?since={between}"))
        .await;
    assert_eq!(seq(&page["events"][0]), 7);
    // Another offset, same instant.
    let other_zone = times[1]
        .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
        .replace('+', "%2B");
    let page = app
        .get_json(&format!("/v1/streams/s/events?since={other_zone}"))
        .await;
    assert_eq!(seq(&page["events"][0]), 4);
    let page = app
        .get_json("/v1/streams/s/events?since=2000-01-01T00:00:00Z")
        .await;
    assert_eq!(seq(&page["events"][0]), 1);
    let page = app
        .get_json("/v1/streams/s/events?since=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next_after"], 9);

    let res = app.get("/v1/streams/s/events?since=yesterday").await;
    problem(res, 400, "invalid_parameter").await;
    let res = app
        .get("/v1/streams/s/events?after=1&since=2000-01-01T00:00:00Z")
        .await;
    problem(res, 400, "invalid_parameter").await;
}

#[backend_test]
async fn export_streams_every_event_after_the_cursor_as_ndjson(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.read_page = 7).await;
    app.append("s", numbered(1, 50)).await;
    let export = |q: &'static str| {
        let req = app
            .client
            .get(app.url(&format!("/v1/streams/s/events{q}")))
            .header("accept", "application/x-ndjson");
        async move {
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()["content-type"], "application/x-ndjson");
            res.text().await.unwrap()
        }
    };
    let all = raw_envelopes(&app, "s").await;
    let text = export("").await;
    assert!(text.ends_with('\n'));
    assert_eq!(text.lines().collect::<Vec<_>>(), all, "across many pages");
    // `limit` does not cut an export short; `after` starts it.
    let text = export("?after=20&limit=3").await;
    assert_eq!(text.lines().collect::<Vec<_>>(), all[20..]);
    let text = export("?after=50").await;
    assert_eq!(text, "");

    let res = app
        .client
        .get(app.url("/v1/streams/missing/events"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    problem(res, 404, "stream_not_found").await;
}

#[backend_test]
async fn streams_are_listed_by_prefix_with_keyset_paging(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut want = Vec::new();
    for i in 0..23 {
        let name = format!("run:{i:02}");
        app.append(&name, numbered(1, i % 3 + 1)).await;
        want.push(name);
    }
    for other in ["run", "ru", "rum:1", "other", "RUN:1"] {
        app.append(other, json!({"data":0})).await;
    }
    app.close_stream("run:05", None).await;

    let mut got = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .get_json(&format!(
                "/v1/streams?prefix=run:&limit=10&after_name={after}"
            ))
            .await;
        pages += 1;
        for s in page["streams"].as_array().unwrap() {
            let name = s["name"].as_str().unwrap().to_owned();
            let i: i64 = name[4..].parse().unwrap();
            let head = if name == "run:05" { 4 } else { i % 3 + 1 };
            assert_eq!(s["head"], head, "{s}");
            assert_eq!(s["closed"], name == "run:05", "{s}");
            for t in ["created_at", "updated_at"] {
                let t = s[t].as_str().unwrap();
                assert!(t.ends_with('Z') && t.len() == 24, "RFC 3339 ms UTC: {t}");
            }
            got.push(name);
        }
        match page["next_after_name"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(got, want);
    assert_eq!(pages, 3);

    let all = app.get_json("/v1/streams?limit=1000").await;
    let names: Vec<&str> = all["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 28);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "in name (byte) order");
    assert_eq!(all["next_after_name"], Value::Null);
    let none = app.get_json("/v1/streams?prefix=zzz").await;
    assert_eq!(none["streams"], json!([]));

    for bad in ["limit=0", "limit=1001", "limit=x"] {
        let res = app.get(&format!("/v1/streams?{bad}")).await;
        problem(res, 400, "invalid_parameter").await;
    }
}

#[backend_test]
async fn stream_metadata_and_its_404s(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", numbered(1, 3)).await;
    let info = app.get_json("/v1/streams/s").await;
    assert_eq!(info["name"], "s");
    assert_eq!(info["head"], 3);
    assert_eq!(info["closed"], false);
    let created: DateTime<Utc> = info["created_at"].as_str().unwrap().parse().unwrap();
    let updated: DateTime<Utc> = info["updated_at"].as_str().unwrap().parse().unwrap();
    assert!(created <= updated);
    let last = &app.read_all("s").await[2];
    assert_eq!(
        info["updated_at"], last["time"],
        "updated with the last commit"
    );

    problem(
        app.get("/v1/streams/missing").await,
        404,
        "stream_not_found",
    )
    .await;
    problem(
        app.get("/v1/streams/missing/snapshot").await,
        404,
        "stream_not_found",
    )
    .await;
    problem(app.get("/v1/nothing/here").await, 404, "not_found").await;
    let res = app
        .client
        .put(app.url("/v1/streams/s"))
        .send()
        .await
        .unwrap();
    problem(res, 405, "method_not_allowed").await;
}

#[backend_test]
async fn delete_removes_a_stream_and_later_appends_start_over(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", numbered(1, 5)).await;
    app.append("keep", numbered(1, 2)).await;
    let mut sub = wire::open_sse(&app, "s", "", None).await.sse();
    sub.expect_seqs(1, 5).await;

    let res = app
        .client
        .delete(app.url("/v1/streams/s"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let notice = sub.notice().await;
    assert_eq!(notice["notice"], "deleted");
    assert_eq!(notice["stream"], "s");
    sub.expect_end().await;

    problem(app.get("/v1/streams/s").await, 404, "stream_not_found").await;
    problem(
        app.get("/v1/streams/s/events").await,
        404,
        "stream_not_found",
    )
    .await;
    let res = app
        .client
        .delete(app.url("/v1/streams/s"))
        .send()
        .await
        .unwrap();
    problem(res, 404, "stream_not_found").await;
    let res = app
        .client
        .delete(app.url("/v1/streams/a%20b"))
        .send()
        .await
        .unwrap();
    problem(res, 400, "invalid_stream_name").await;
    assert_eq!(
        app.read_all("keep").await.len(),
        2,
        "other streams untouched"
    );

    let res = app.append("s", json!({"data":"again"})).await;
    assert_eq!(res["first_seq"], 1);
}

/// Appends racing a DELETE: every append either landed in the deleted stream (and went with
/// it) or in the new stream that follows, whose seqs start again at 1 with no gap; no append
/// fails and no event of the old stream survives.
#[backend_test]
async fn appends_racing_a_delete_leave_a_consistent_log(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", numbered(1, 10)).await;
    let mut producers = Vec::new();
    for p in 0..4 {
        let client = app.client.clone();
        let url = app.url("/v1/streams/s/events");
        producers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..60 {
                let res = client
                    .post(&url)
                    .json(&json!({"data": format!("{p}-{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                let v: Value = res.json().await.unwrap();
                acked.push((format!("{p}-{i}"), v["first_seq"].as_i64().unwrap()));
            }
            acked
        }));
    }
    wait_until("some appends to land", || async {
        head(&app, "s").await > 40
    })
    .await;
    let res = app
        .client
        .delete(app.url("/v1/streams/s"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let mut acked = Vec::new();
    for p in producers {
        acked.extend(p.await.unwrap());
    }
    let after: Vec<Value> = app.read_all("s").await;
    let seqs: Vec<i64> = after.iter().map(seq).collect();
    assert_eq!(seqs, (1..=after.len() as i64).collect::<Vec<_>>());
    let survivors: BTreeMap<String, i64> = after
        .iter()
        .map(|e| (e["data"].as_str().unwrap().to_owned(), seq(e)))
        .collect();
    assert_eq!(survivors.len(), after.len());
    // Each survivor was acknowledged with the seq it has now.
    for (data, s) in &survivors {
        let acked_seq = acked.iter().find(|(d, _)| d == data).map(|(_, s)| *s);
        assert_eq!(acked_seq, Some(*s), "{data}");
    }
    assert!(after.len() < 240, "the delete removed something");
}

#[backend_test]
async fn snapshot_holds_the_latest_event_per_key_as_of_its_at(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append(
        "s",
        json!([
            {"data":1,"key":"b"},
            {"data":2,"key":"a"},
            {"data":3},
            {"data":4,"key":"b"},
            {"data":5,"key":"c"},
            {"data":6,"key":"a"},
            {"data":7}
        ]),
    )
    .await;
    let snap = app.get_json("/v1/streams/s/snapshot").await;
    assert_eq!(snap["stream"], "s");
    assert_eq!(snap["at"], 7);
    let got: Vec<(String, i64)> = snap["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap().to_owned(), seq(e)))
        .collect();
    assert_eq!(
        got,
        [("a".into(), 6), ("b".into(), 4), ("c".into(), 5)],
        "latest per key, by key"
    );

    // Under concurrent appends every snapshot is exactly the log's state at its `at`.
    let producer = {
        let client = app.client.clone();
        let url = app.url("/v1/streams/s/events");
        tokio::spawn(async move {
            for i in 0..150 {
                let batch: Vec<Value> = (0..3)
                    .map(|j| json!({"data": i * 3 + j, "key": format!("k{}", (i * 7 + j) % 11)}))
                    .collect();
                let res = client.post(&url).json(&batch).send().await.unwrap();
                assert_eq!(res.status(), 201);
            }
        })
    };
    let mut snaps = Vec::new();
    while !producer.is_finished() {
        snaps.push(app.get_json("/v1/streams/s/snapshot").await);
    }
    producer.await.unwrap();
    let log = app.read_all("s").await;
    assert!(snaps.len() > 2, "snapshots taken while appending");
    for snap in snaps {
        let at = snap["at"].as_i64().unwrap();
        let mut want: BTreeMap<String, &Value> = BTreeMap::new();
        for e in log.iter().take(at as usize) {
            if let Some(k) = e["key"].as_str() {
                want.insert(k.to_owned(), e);
            }
        }
        let got: BTreeMap<String, &Value> = snap["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["key"].as_str().unwrap().to_owned(), e))
            .collect();
        assert_eq!(got, want, "snapshot at {at}");
    }
}

/// A 50 MB body is refused with 413 long before it could be buffered, and nothing is
/// appended: with a Content-Length, before a byte of it is read; without one (chunked),
/// as soon as the limit is passed.
#[backend_test]
async fn a_huge_body_is_refused_before_it_is_buffered(db: TestDb) {
    let app = TestApp::spawn(db).await;
    const HUGE: usize = 50 << 20;

    // Declared length: the answer comes while the client has sent no body at all.
    let mut conn = wire::connect(app.addr, None).await;
    let head = format!(
        "POST /v1/streams/s/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {HUGE}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut conn).await;
    assert_eq!(status, 413);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["code"], "payload_too_large");
    assert_eq!(body["limit"], 8 << 20);

    // Chunked: the client keeps sending; the server answers once past the limit.
    let conn = wire::connect(app.addr, None).await;
    let (mut rd, mut wr) = conn.into_split();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let head = "POST /v1/streams/s/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            wr.write_all(head.as_bytes()).await?;
            let piece = format!(r#"{{"data":"{}"}},"#, "x".repeat(64 << 10));
            let chunk = format!("{:x}\r\n[{piece}\r\n", piece.len() + 1);
            wr.write_all(chunk.as_bytes()).await?;
            let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
            while sent.load(std::sync::atomic::Ordering::SeqCst) < HUGE {
                wr.write_all(chunk.as_bytes()).await?;
                sent.fetch_add(piece.len(), std::sync::atomic::Ordering::SeqCst);
            }
            Ok::<_, std::io::Error>(())
        })
    };
    let (status, body) = read_response(&mut rd).await;
    let sent_at_answer = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    assert!(
        sent_at_answer < HUGE / 2,
        "answered only after {sent_at_answer} bytes"
    );
    writer.abort();
    assert_eq!(
        app.get("/v1/streams/s").await.status(),
        404,
        "nothing appended"
    );
}

/// A replay page of big events ends at a byte budget (16 MiB of data) instead of at `limit`
/// events; paging by `next_after` still returns every event exactly once.
#[backend_test]
async fn replay_pages_of_big_events_end_at_a_byte_budget(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let big = "b".repeat((1 << 20) - 16);
    for _ in 0..6 {
        let batch: Vec<Value> = (0..7).map(|_| json!({"data": big})).collect();
        app.append("s", Value::Array(batch)).await;
    }
    let page = app
        .get_json("/v1/streams/s/events?after=0&limit=1000")
        .await;
    let n = page["events"].as_array().unwrap().len();
    assert!((16..=17).contains(&n), "{n} events of 1 MiB in one page");
    assert_eq!(page["next_after"], n);
    let all = app.read_all("s").await;
    assert_eq!(
        all.iter().map(seq).collect::<Vec<_>>(),
        (1..=42).collect::<Vec<_>>()
    );
    let page = app.get_json("/v1/streams/s/events?after=40&limit=5").await;
    assert_eq!(
        page["events"].as_array().unwrap().len(),
        2,
        "short pages unaffected"
    );
}
