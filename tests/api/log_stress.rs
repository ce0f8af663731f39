//! The log under load: many concurrent appenders on one stream with a reader tailing it, and
//! a 200k-event NDJSON export measured in a separate server process.

use std::collections::HashMap;
use std::process::Stdio;

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{TestApp, WAIT};
use crate::wire::seq;

/// 32 appenders each append 500 single events to one stream (the case group commit exists
/// for) while a reader tails it by `after=`. Seqs are exactly 1..16000, each appender's
/// acknowledgements name the event actually stored there, and the tailing reader never sees
/// a seq before every lower one is visible (each page starts right after its cursor).
#[sqlx::test]
async fn concurrent_appenders_get_gap_free_seqs_and_a_tailing_reader_sees_no_holes(pool: PgPool) {
    const APPENDERS: usize = 32;
    const EACH: usize = 500;
    const TOTAL: i64 = (APPENDERS * EACH) as i64;
    let app = TestApp::spawn(pool).await;
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

/// The URL of the test's own database, for a server started as a separate process.
fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let (base, query) = base
        .split_once('?')
        .map_or((base.as_str(), ""), |(b, q)| (b, q));
    let root = &base[..base.rfind('/').expect("a database path")];
    if query.is_empty() {
        format!("{root}/{db}")
    } else {
        format!("{root}/{db}?{query}")
    }
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// Exports 200k events (about 170 MB of NDJSON) from a tailcast server running as its own
/// process, so its memory is measured alone, and reads the export as a stream, keeping only
/// the current partial line. The server's peak RSS grows by a small fraction of the export.
#[sqlx::test]
async fn ndjson_export_of_200k_events_runs_in_bounded_memory(pool: PgPool) {
    const EVENTS: i64 = 200_000;
    const BOUND: u64 = 48 << 20;
    tailcast::log::MIGRATOR.run(&pool).await.unwrap();
    let id: i64 =
        sqlx::query_scalar("insert into streams (name, head) values ('big', $1) returning id")
            .bind(EVENTS)
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query(
        r#"insert into events (stream_id, seq, type, data, time)
           select $1, g, 'token', '{"i":' || g || ',"pad":"' || repeat('x', 700) || '"}', now()
           from generate_series(1, $2) as g"#,
    )
    .bind(id)
    .bind(EVENTS)
    .execute(&pool)
    .await
    .unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailcast"))
        .env("DATABASE_URL", database_url(&pool))
        .env("TAILCAST_LISTEN", "127.0.0.1:0")
        .env("TAILCAST_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tailcast");
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "listening" {
                return v["fields"]["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("tailcast exited before listening");
    })
    .await
    .expect("tailcast listening in time");
    // Keep draining its log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

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
    let before = peak_rss(pid);

    let res = export(0).await.unwrap();
    assert_eq!(res.status(), 200);
    let (lines_read, bytes) = count_lines(res, 0).await;
    assert_eq!(lines_read, EVENTS as u64);
    let grown = peak_rss(pid).saturating_sub(before);
    assert!(
        bytes > 3 * BOUND,
        "the export ({bytes} bytes) dwarfs the bound"
    );
    assert!(
        grown < BOUND,
        "server peak RSS grew by {grown} bytes while exporting {bytes} bytes"
    );
    child.kill().await.unwrap();
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
            let mut rest = &chunk[..];
            while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                partial.extend_from_slice(&rest[..nl]);
                rest = &rest[nl + 1..];
                assert!(
                    partial.starts_with(PREFIX),
                    "line {lines} is not an envelope"
                );
                let digits: Vec<u8> = partial[PREFIX.len()..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .copied()
                    .collect();
                let s: i64 = std::str::from_utf8(&digits).unwrap().parse().unwrap();
                assert_eq!(s, expect, "export out of order");
                expect += 1;
                lines += 1;
                partial.clear();
            }
            partial.extend_from_slice(rest);
        }
    };
    tokio::time::timeout(WAIT * 4, read)
        .await
        .expect("export in time");
    assert!(partial.is_empty(), "export ended inside a line");
    (lines, bytes)
}
