//! The log under load: many concurrent appenders on one stream with a reader tailing it, and
//! a 200k-event NDJSON export measured in a separate server process.

use std::collections::HashMap;

use futures::StreamExt;
use serde_json::{json, Value};
use tailcast::log::db::Ts;

use crate::backend::{backend_test, on_db, TestDb};
use crate::helpers::{TestApp, WAIT};
use crate::wire::{self, peak_rss, seq};

/// 32 appenders each append 500 single events to one stream (the case group commit exists
/// for) while a reader tails it by `after=`. Seqs are exactly 1..16000, each appender's
/// acknowledgements name the event actually stored there, and the tailing reader never sees
/// a seq before every lower one is visible (each page starts right after its cursor).
#[backend_test]
async fn concurrent_appenders_get_gap_free_seqs_and_a_tailing_reader_sees_no_holes(db: TestDb) {
    const APPENDERS: usize = 32;
    const EACH: usize = 500;
    const TOTAL: i64 = (APPENDERS * EACH) as i64;
    let app = TestApp::spawn(db).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(APPENDERS)
        .timeout(WAIT)
        .build()
        .unwrap();

    let tailer = {
        let client = client.clone();
        let url = app.url("/v1/streams/hot/events");
        tokio::spawn(async move {
            let mut after = 0i64;
            let mut reads = 0u64;
            let mut seen = Vec::with_capacity(TOTAL as usize);
            while after < TOTAL {
                let res = client
                    .get(format!("{url}?after={after}&limit=1000"))
                    .send()
                    .await
                    .unwrap();
                reads += 1;
                if res.status() == 404 {
                    continue; // not created yet
                }
                let page: Value = res.json().await.unwrap();
                for env in page["events"].as_array().unwrap() {
                    assert_eq!(seq(env), after + 1, "a tailing reader saw a hole");
                    after += 1;
                    seen.push((
                        env["data"]["a"].as_u64().unwrap(),
                        env["data"]["i"].as_u64().unwrap(),
                    ));
                }
                assert_eq!(page["next_after"], after);
            }
            (seen, reads)
        })
    };

    let mut appenders = Vec::new();
    for a in 0..APPENDERS {
        let client = client.clone();
        let url = app.url("/v1/streams/hot/events");
        appenders.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(EACH);
            for i in 0..EACH {
                let res = client
                    .post(&url)
                    .json(&json!({"type":"t","data":{"a":a,"i":i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                let v: Value = res.json().await.unwrap();
                assert_eq!(v["first_seq"], v["last_seq"]);
                seqs.push(v["first_seq"].as_i64().unwrap());
            }
            seqs
        }));
    }
    let mut owner: HashMap<i64, (u64, u64)> = HashMap::new();
    for (a, t) in appenders.into_iter().enumerate() {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one appender's sequential appends got increasing seqs"
        );
        for (i, s) in seqs.into_iter().enumerate() {
            assert!(
                owner.insert(s, (a as u64, i as u64)).is_none(),
                "seq {s} acked twice"
            );
        }
    }
    let mut all: Vec<i64> = owner.keys().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=TOTAL).collect::<Vec<_>>());

    let (seen, reads) = tokio::time::timeout(WAIT, tailer).await.unwrap().unwrap();
    assert!(reads > 2, "the reader tailed while appends ran");
    for (i, who) in seen.iter().enumerate() {
        assert_eq!(
            owner[&(i as i64 + 1)],
            *who,
            "seq {} holds another event",
            i + 1
        );
    }
    let stored = app.read_all("hot").await;
    assert_eq!(stored.len() as i64, TOTAL);
}

/// Exports 200k events (about 170 MB of NDJSON) from a tailcast server running as its own
/// process, so its memory is measured alone, and reads the export as a stream, keeping only
/// the current partial line. The server's peak RSS grows by a small fraction of the export;
/// the same holds for an SSE subscriber catching up the whole stream from seq 0.
#[backend_test]
async fn ndjson_export_of_200k_events_runs_in_bounded_memory(db: TestDb) {
    const EVENTS: i64 = 200_000;
    const BOUND: u64 = 48 << 20;
    seed_big_stream(
        &db,
        EVENTS,
        "token",
        r#"'{"i":' || g || ',"pad":"' || $4 || '"}'"#,
        &"x".repeat(700),
    )
    .await;
    let db = db.close().await;
    let server = wire::Server::start(db.url()).await;
    let (addr, pid) = (server.addr.clone(), server.pid);
    let client = reqwest::Client::new();
    let export = |after: i64| {
        client
            .get(format!("http://{addr}/v1/streams/big/events?after={after}"))
            .header("accept", "application/x-ndjson")
            .send()
    };
    // Warm up the paths an export takes, then take the baseline.
    let (lines_read, _) = count_lines(export(EVENTS - 2000).await.unwrap(), EVENTS - 2000).await;
    assert_eq!(lines_read, 2000);
    let before = reset_peak_rss(pid);

    let res = export(0).await.unwrap();
    assert_eq!(res.status(), 200);
    let (lines_read, bytes) = count_lines(res, 0).await;
    assert_eq!(lines_read, EVENTS as u64);
    let grown = peak_rss(pid).saturating_sub(before);
    println!("export of {bytes} bytes: server peak RSS grew by {grown} bytes");
    assert!(
        bytes > 3 * BOUND,
        "the export ({bytes} bytes) dwarfs the bound"
    );
    assert!(
        grown < BOUND,
        "server peak RSS grew by {grown} bytes while exporting {bytes} bytes"
    );

    // A subscriber catching up the whole stream over SSE holds at most a page at a time too.
    let before = reset_peak_rss(pid);
    let res = client
        .get(format!("http://{addr}/v1/streams/big/sse?after=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    count_sse_events(res, EVENTS).await;
    let grown = peak_rss(pid).saturating_sub(before);
    println!("SSE catch-up of {EVENTS} events: server peak RSS grew by {grown} bytes");
    assert!(
        grown < BOUND,
        "server peak RSS grew by {grown} bytes while an SSE subscriber caught up"
    );
    server.kill().await;
}

/// Counts NDJSON lines as they stream in, checking each line's seq follows the last, without
/// holding more than one partial line. Returns (lines, bytes).
async fn count_lines(res: reqwest::Response, after: i64) -> (u64, u64) {
    const PREFIX: &[u8] = br#"{"stream":"big","seq":"#;
    let mut body = res.bytes_stream();
    let mut partial: Vec<u8> = Vec::new();
    let mut expect = after + 1;
    let mut lines = 0u64;
    let mut bytes = 0u64;
    let read = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.expect("export chunk");
            bytes += chunk.len() as u64;
            for_each_line(&mut partial, &chunk, |line| {
                assert!(line.starts_with(PREFIX), "line {lines} is not an envelope");
                let digits: Vec<u8> = line[PREFIX.len()..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .copied()
                    .collect();
                let s: i64 = std::str::from_utf8(&digits).unwrap().parse().unwrap();
                assert_eq!(s, expect, "export out of order");
                expect += 1;
                lines += 1;
            });
        }
    };
    tokio::time::timeout(WAIT * 4, read)
        .await
        .expect("export in time");
    assert!(partial.is_empty(), "export ended inside a line");
    (lines, bytes)
}

/// Reads SSE events 1..=last as they stream in, checking each `id:` follows the last, without
/// holding more than one partial line.
async fn count_sse_events(res: reqwest::Response, last: i64) {
    let mut body = res.bytes_stream();
    let mut partial: Vec<u8> = Vec::new();
    let mut expect = 1;
    let read = async {
        while expect <= last {
            let chunk = body
                .next()
                .await
                .expect("SSE until the last event")
                .unwrap();
            for_each_line(&mut partial, &chunk, |line| {
                if let Some(id) = line.strip_prefix(b"id: ") {
                    let id: i64 = std::str::from_utf8(id).unwrap().parse().unwrap();
                    assert_eq!(id, expect, "SSE out of order");
                    expect += 1;
                }
            });
        }
    };
    tokio::time::timeout(WAIT * 4, read)
        .await
        .expect("catch-up in time");
}

/// Calls `each` with every line `chunk` completes (without its `\n`), carrying the unfinished
/// tail over in `partial`, so a reader holds at most one partial line.
fn for_each_line(partial: &mut Vec<u8>, chunk: &[u8], mut each: impl FnMut(&[u8])) {
    let mut rest = chunk;
    while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
        partial.extend_from_slice(&rest[..nl]);
        rest = &rest[nl + 1..];
        each(partial);
        partial.clear();
    }
    partial.extend_from_slice(rest);
}

/// Creates stream `big` holding events 1..=`events` of type `typ`, written straight into the
/// log by SQL: far faster than appending. `data_sql` is an SQL expression over the seq `g` and
/// `$4`, which is bound to `pad` (the same text on both backends: `||` concatenates on each).
async fn seed_big_stream(db: &TestDb, events: i64, typ: &str, data_sql: &str, pad: &str) {
    db.db.migrate().await.unwrap();
    let now = Ts(chrono::Utc::now());
    on_db!(db, |ex| {
        let id: i64 = sqlx::query_scalar(
            "insert into streams (name, head, created_at, updated_at)
             values ('big', $1, $2, $2) returning id",
        )
        .bind(events)
        .bind(now)
        .fetch_one(ex)
        .await
        .unwrap();
        // A recursive count rather than generate_series, which SQLite lacks.
        sqlx::query(&format!(
            "with recursive n(g) as (select 1 union all select g + 1 from n where g < $2)
             insert into events (stream_id, seq, type, data, time)
             select $1, g, $3, {data_sql}, $5 from n"
        ))
        .bind(id)
        .bind(events)
        .bind(typ)
        .bind(pad)
        .bind(now)
        .execute(ex)
        .await
        .unwrap();
    })
}

/// Resets a process's peak RSS to its current RSS (Linux `clear_refs` 5), returning it.
fn reset_peak_rss(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset peak RSS");
    peak_rss(pid)
}

/// Big events: 300 events of ~900 KB each (about 270 MB). A subscriber catching up and an
/// export each hold a bounded number of bytes at a time, not a page of 1000 such events.
#[backend_test]
async fn catch_up_and_export_of_big_events_stay_bounded_in_memory(db: TestDb) {
    const EVENTS: i64 = 300;
    const BOUND: u64 = 64 << 20;
    seed_big_stream(
        &db,
        EVENTS,
        "blob",
        r#"'"' || $4 || '"'"#,
        &"x".repeat(900_000),
    )
    .await;
    let db = db.close().await;
    let server = wire::Server::start(db.url()).await;
    let (addr, pid) = (server.addr.clone(), server.pid);
    let client = reqwest::Client::new();

    let before = reset_peak_rss(pid);
    let res = client
        .get(format!("http://{addr}/v1/streams/big/sse?after=0"))
        .send()
        .await
        .unwrap();
    count_sse_events(res, EVENTS).await;
    let grown = peak_rss(pid).saturating_sub(before);
    println!("SSE catch-up of {EVENTS} ~900 KB events: peak RSS grew by {grown} bytes");
    assert!(grown < BOUND, "peak RSS grew by {grown} bytes");

    let before = reset_peak_rss(pid);
    let res = client
        .get(format!("http://{addr}/v1/streams/big/events?after=0"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    let mut body = res.bytes_stream();
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = tokio::time::timeout(WAIT, body.next()).await.unwrap() {
        let chunk = chunk.unwrap();
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    assert_eq!(lines, EVENTS as u64);
    let grown = peak_rss(pid).saturating_sub(before);
    println!("export of {bytes} bytes: peak RSS grew by {grown} bytes");
    assert!(grown < BOUND, "peak RSS grew by {grown} bytes");
    server.kill().await;
}
