//! SSE under load, over real sockets: many subscribers with many producers, a reader that
//! stops reading, a reader that never reads again, snapshot-then-tail while appending,
//! reconnects in the middle of a burst, and hand-overs between the log and the live path at
//! random moments. Every test checks every seq.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::backend::{backend_test, TestDb};
use crate::helpers::{self, stats, wait_until, TestApp, WAIT};
use crate::wire::{self, open_sse, raw_envelopes, Next, Sse};

/// Appends `events` events to `stream` from `producers` concurrent producers, in batches of
/// random size up to `max_batch`, each event's data `{"p":producer,"i":index,"pad":…}`.
/// Returns once every append is acknowledged. `head` follows the highest acked seq.
async fn produce(
    app: &TestApp,
    stream: &str,
    producers: usize,
    events: usize,
    max_batch: usize,
    pad: usize,
    head: Arc<AtomicI64>,
) {
    let mut tasks = Vec::new();
    for p in 0..producers {
        let client = app.client.clone();
        let url = app.url(&format!("/v1/streams/{stream}/events"));
        let head = head.clone();
        let share = events / producers + usize::from(p < events % producers);
        let pad = "x".repeat(pad);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(p as u64);
            let mut i = 0;
            while i < share {
                let n = rng.random_range(1..=max_batch).min(share - i);
                let batch: Vec<Value> = (i..i + n)
                    .map(|i| json!({"type":"t","data":{"p":p,"i":i,"pad":pad}}))
                    .collect();
                let res = client.post(&url).json(&batch).send().await.unwrap();
                assert_eq!(res.status(), 201);
                let v: Value = res.json().await.unwrap();
                head.fetch_max(v["last_seq"].as_i64().unwrap(), Ordering::SeqCst);
                i += n;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A fingerprint of envelopes in order.
fn fingerprint<'a>(envelopes: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h = DefaultHasher::new();
    for e in envelopes {
        e.hash(&mut h);
    }
    h.finish()
}

/// Reads ordinary events `first..=last` exactly, checking each `id:` against the expected
/// seq and returning the fingerprint of the envelopes.
async fn read_range(sse: &mut Sse, first: i64, last: i64) -> u64 {
    let mut h = DefaultHasher::new();
    for want in first..=last {
        let ev = sse.next().await;
        assert_eq!(ev.event, "message", "{ev:?}");
        assert_eq!(ev.id, want.to_string(), "expected seq {want}");
        assert!(
            ev.data.contains(&format!(",\"seq\":{want},")),
            "{}",
            ev.data
        );
        ev.data.hash(&mut h);
    }
    h.finish()
}

/// 16 producers append 20k events to one stream while 12 subscribers follow it: 6 from
/// before the first append, 6 joining mid-way (catching up from the log while the stream
/// is live). Every subscriber receives 1..20000 in order, exactly once, byte-identical to the
/// replay; and the log holds each producer's events in the order it sent them.
#[backend_test]
async fn many_subscribers_see_every_event_while_16_producers_append_20k(db: TestDb) {
    const TOTAL: i64 = 20_000;
    let app = TestApp::spawn(db).await;
    let mut subs = Vec::new();
    for _ in 0..6 {
        let mut sse = open_sse(&app, "hot", "", None).await.sse();
        subs.push(tokio::spawn(
            async move { read_range(&mut sse, 1, TOTAL).await },
        ));
    }
    wait_until("the first subscribers to register", || async {
        stats(&app).await["subscriptions"] == 6
    })
    .await;
    let head = Arc::new(AtomicI64::new(0));
    let producing = produce(&app, "hot", 16, TOTAL as usize, 20, 0, head.clone());
    let joiners = async {
        let mut joined = Vec::new();
        for k in 1..=6 {
            let at = TOTAL * k / 8;
            wait_until("the stream to grow", || async {
                head.load(Ordering::SeqCst) >= at
            })
            .await;
            // Half from the beginning, half from the current head.
            let (query, first) = if k % 2 == 0 {
                (String::new(), 1)
            } else {
                let h = head.load(Ordering::SeqCst);
                (format!("?after={h}"), h + 1)
            };
            let mut sse = open_sse(&app, "hot", &query, None).await.sse();
            joined.push((
                first,
                tokio::spawn(async move { read_range(&mut sse, first, TOTAL).await }),
            ));
        }
        joined
    };
    let ((), joined) = tokio::join!(producing, joiners);

    let replay = raw_envelopes(&app, "hot").await;
    assert_eq!(replay.len() as i64, TOTAL);
    let whole = fingerprint(replay.iter().map(String::as_str));
    for s in subs {
        assert_eq!(tokio::time::timeout(WAIT, s).await.unwrap().unwrap(), whole);
    }
    for (first, s) in joined {
        let want = fingerprint(replay[(first - 1) as usize..].iter().map(String::as_str));
        assert_eq!(tokio::time::timeout(WAIT, s).await.unwrap().unwrap(), want);
    }
    // Each producer's events are in the log in the order it sent them.
    let mut next: BTreeMap<u64, u64> = BTreeMap::new();
    for env in &replay {
        let v: Value = serde_json::from_str(env).unwrap();
        let (p, i) = (
            v["data"]["p"].as_u64().unwrap(),
            v["data"]["i"].as_u64().unwrap(),
        );
        let n = next.entry(p).or_insert(0);
        assert_eq!(*n, i, "producer {p} out of order");
        *n += 1;
    }
}

/// A reader that stops reading while a burst far larger than every buffer between it and
/// the server goes by: its subscription stops being polled, its live buffer (two batches
/// here) overflows, and it falls back to the log. When it reads again it gets every event,
/// in order, exactly once.
#[backend_test]
async fn a_reader_that_pauses_still_receives_everything(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.live_buffer = 2;
        c.write_timeout_s = 300;
    })
    .await;
    app.append("s", json!({"data":"first"})).await;
    // A small receive buffer: the bytes in flight are bounded by the server's socket buffer
    // (at most 4 MiB here) plus a few hundred KiB of HTTP buffers.
    let res = wire::get(app.addr, "/v1/streams/s/sse", &[], Some(4096)).await;
    let mut sse = res.sse();
    read_range(&mut sse, 1, 1).await;
    assert_eq!(stats(&app).await["lag_fallbacks"], 0);

    // 16 MiB while the reader is not reading.
    let head = Arc::new(AtomicI64::new(1));
    produce(&app, "s", 4, 4000, 20, 4096, head.clone()).await;
    let last = head.load(Ordering::SeqCst);
    assert_eq!(last, 4001);
    read_range(&mut sse, 2, last).await;
    let lagged = stats(&app).await["lag_fallbacks"].as_u64().unwrap();
    assert!(
        lagged >= 1,
        "the live buffer never overflowed: the test did not test lag"
    );
    // And it is live again afterwards.
    app.append("s", json!({"data":"after"})).await;
    read_range(&mut sse, last + 1, last + 1).await;
}

/// A reader that stops reading for longer than the write timeout is disconnected (the reason
/// is logged and counted: it cannot reach a client that reads nothing). What it had received
/// ends at an event boundary, and resuming from its last id loses and repeats nothing.
#[backend_test]
async fn a_reader_that_stops_for_good_is_disconnected_and_resumes_by_cursor(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.live_buffer = 2;
        c.write_timeout_s = 1;
    })
    .await;
    app.append("s", json!({"data":"first"})).await;
    let res = wire::get(app.addr, "/v1/streams/s/sse", &[], Some(4096)).await;
    let mut sse = res.sse();
    read_range(&mut sse, 1, 1).await;
    assert_eq!(stats(&app).await["connections"]["sse"], 1);

    // Append until the server gives up on the reader (bounded by WAIT and a byte budget).
    let head = Arc::new(AtomicI64::new(1));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        produce(&app, "s", 1, 200, 20, 4096, head.clone()).await;
        if stats(&app).await["connections"]["sse"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never disconnected");
        assert!(
            head.load(Ordering::SeqCst) < 40_000,
            "160 MiB and still connected"
        );
    }
    // (How it is counted: ops::a_slow_consumer_is_counted_once_under_its_own_transport.)
    let last = head.load(Ordering::SeqCst);

    // Drain what reached the client before the cut: whole events, in order.
    let mut cursor = 1;
    loop {
        match sse.next_item().await {
            Next::Event(ev) => {
                assert_eq!(ev.id, (cursor + 1).to_string());
                cursor += 1;
            }
            Next::Broken(_) => break,
            Next::End => panic!("the response ended normally; it was cut"),
        }
    }
    assert!(
        cursor < last,
        "everything arrived; the reader was not cut short"
    );
    let mut resumed = open_sse(&app, "s", "", Some(&cursor.to_string()))
        .await
        .sse();
    read_range(&mut resumed, cursor + 1, last).await;
}

/// from=snapshot while producers append keyed events: each subscriber's snapshot is exactly
/// the latest event per key as of the position it announces, and the tail continues right
/// after that position: no event missed or repeated between the two.
#[backend_test]
async fn snapshot_then_tail_under_concurrent_appends(db: TestDb) {
    const TOTAL: i64 = 3000;
    let app = TestApp::spawn(db).await;
    let head = Arc::new(AtomicI64::new(0));
    let producers = {
        let mut tasks = Vec::new();
        for p in 0..4i64 {
            let client = app.client.clone();
            let url = app.url("/v1/streams/s/events");
            let head = head.clone();
            tasks.push(tokio::spawn(async move {
                for b in 0..(TOTAL / 4 / 5) {
                    // Every event has a key, so every event changes the snapshot.
                    let batch: Vec<Value> = (0..5)
                        .map(|j| json!({"data":[p,b,j],"key":format!("k{}", (p * 7 + b * 5 + j) % 13)}))
                        .collect();
                    let res = client.post(&url).json(&batch).send().await.unwrap();
                    assert_eq!(res.status(), 201);
                    let v: Value = res.json().await.unwrap();
                    head.fetch_max(v["last_seq"].as_i64().unwrap(), Ordering::SeqCst);
                }
            }));
        }
        tasks
    };
    let mut readers = Vec::new();
    for k in 1..=5 {
        let at = TOTAL * k / 7;
        wait_until("the stream to grow", || async {
            head.load(Ordering::SeqCst) >= at
        })
        .await;
        let mut frames = open_sse(&app, "s", "?from=snapshot", None).await.frames();
        readers.push(tokio::spawn(async move {
            assert!(frames.next().await.unwrap().starts_with("retry: "));
            let mut snapshot = Vec::new();
            let position = loop {
                let f = frames.next_content().await.unwrap();
                match f.split_once("\ndata: ") {
                    Some((id, data)) => {
                        let seq: i64 = id.strip_prefix("id: ").unwrap().parse().unwrap();
                        snapshot.push((seq, data.to_owned()));
                    }
                    None => break f.strip_prefix("id: ").unwrap().parse::<i64>().unwrap(),
                }
            };
            let mut tail = Vec::new();
            for want in position + 1..=TOTAL {
                let f = frames.next_content().await.unwrap();
                let (id, data) = f.split_once("\ndata: ").unwrap();
                assert_eq!(id, format!("id: {want}"), "tail after {position}");
                tail.push(data.to_owned());
            }
            (position, snapshot, tail)
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let log = raw_envelopes(&app, "s").await;
    assert_eq!(log.len() as i64, TOTAL);
    for r in readers {
        let (position, snapshot, tail) = tokio::time::timeout(WAIT, r).await.unwrap().unwrap();
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        for (i, env) in log.iter().take(position as usize).enumerate() {
            let v: Value = serde_json::from_str(env).unwrap();
            latest.insert(v["key"].as_str().unwrap().to_owned(), i as i64 + 1);
        }
        let mut want: Vec<i64> = latest.into_values().collect();
        want.sort_unstable();
        let got: Vec<i64> = snapshot.iter().map(|(s, _)| *s).collect();
        assert_eq!(got, want, "snapshot at {position}");
        for (s, data) in &snapshot {
            assert_eq!(data, &log[*s as usize - 1]);
        }
        assert_eq!(tail, log[position as usize..], "tail after {position}");
    }
}

/// A client dropped in the middle of a burst reconnects with Last-Event-ID, again and again,
/// and ends up with every event exactly once.
#[backend_test]
async fn reconnecting_with_last_event_id_mid_burst_loses_and_repeats_nothing(db: TestDb) {
    const TOTAL: i64 = 4000;
    let app = TestApp::spawn(db).await;
    let head = Arc::new(AtomicI64::new(0));
    let burst = produce(&app, "s", 4, TOTAL as usize, 10, 0, head.clone());
    let client = async {
        let mut rng = StdRng::seed_from_u64(7);
        let mut have = 0i64;
        let mut reconnects = 0;
        let mut sse = open_sse(&app, "s", "", None).await.sse();
        while have < TOTAL {
            let ev = sse.next().await;
            if ev.event == "notice" {
                // A subscription that failed (say a catch-up read timed out on a loaded
                // machine) ends its response with an error notice, which carries no id (an
                // SSE parser repeats the last one): the client resumes by Last-Event-ID, as
                // any client does. No other notice belongs in this stream.
                let notice: Value = serde_json::from_str(&ev.data).unwrap();
                assert_eq!(notice["notice"], "error", "unexpected notice {notice}");
                reconnects += 1;
                sse = open_sse(&app, "s", "", Some(&have.to_string())).await.sse();
                continue;
            }
            assert_eq!(ev.event, "message", "{ev:?}");
            assert_eq!(
                ev.id,
                (have + 1).to_string(),
                "after reconnect {reconnects}"
            );
            have += 1;
            if have < TOTAL && rng.random_ratio(1, 300) {
                drop(sse);
                reconnects += 1;
                sse = open_sse(&app, "s", "", Some(&have.to_string())).await.sse();
            }
        }
        reconnects
    };
    let ((), reconnects) = tokio::join!(burst, client);
    assert!(reconnects >= 5, "only {reconnects} reconnects");
}

/// The hand-over between catch-up from the log and the live path, at random moments: a
/// small read page (many page boundaries) and a tiny live buffer (frequent lag), producers
/// appending random batches, and subscribers that start from random cursors (behind, at and
/// past the head, from=now), read a random number of events, drop, and resume by their last
/// id. Each sees exactly the events after its cursor, in order. The seed is printed.
#[backend_test]
async fn handover_between_log_and_live_at_random_moments(db: TestDb) {
    let seed: u64 = std::env::var("TAILCAST_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("handover seed: {seed} (set TAILCAST_TEST_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let page = rng.random_range(2..=40);
    let buffer = rng.random_range(2..=6);
    let app = TestApp::spawn_with(db, |c| {
        c.read_page = page;
        c.live_buffer = buffer;
    })
    .await;
    const TOTAL: i64 = 3000;
    let head = Arc::new(AtomicI64::new(0));
    let producing = produce(&app, "s", 6, TOTAL as usize, 8, 0, head.clone());
    let addr = app.addr;
    let subscribers = async {
        let mut tasks = Vec::new();
        for s in 0..16u64 {
            let mut rng = StdRng::seed_from_u64(seed ^ (s + 1));
            let target = rng.random_range(0..TOTAL);
            wait_until("the stream to grow", || async {
                head.load(Ordering::SeqCst) >= target
            })
            .await;
            let h = head.load(Ordering::SeqCst);
            // `have`: the seq the next event must follow (None: from=now, any start past h).
            let (query, mut have, may_reset) = match rng.random_range(0..4) {
                0 => ("?from=now".to_owned(), None, false),
                1 => {
                    let c = h + rng.random_range(1..5);
                    (format!("?after={c}"), Some(c), true)
                }
                _ => {
                    let c = rng.random_range(0..=h);
                    (format!("?after={c}"), Some(c), false)
                }
            };
            let mut sse = wire::open_sse_at(addr, "s", &query, None).await.sse();
            tasks.push(tokio::spawn(async move {
                let mut reconnects = 0;
                let mut first = true;
                loop {
                    let ev = sse.next().await;
                    if ev.event == "notice" {
                        // Only a cursor past the head gets one, and only before any event.
                        let n: Value = serde_json::from_str(&ev.data).unwrap();
                        assert_eq!(n["notice"], "reset", "{n}");
                        assert!(may_reset && first, "subscriber {s} ({query}): {n}");
                        let reset_to = n["head"].as_i64().unwrap();
                        assert!(reset_to < have.unwrap());
                        have = Some(reset_to);
                        first = false;
                        continue;
                    }
                    first = false;
                    let seq: i64 = ev.id.parse().unwrap();
                    match have {
                        Some(c) => assert_eq!(seq, c + 1, "subscriber {s} ({query}), seed {seed}"),
                        None => assert!(seq > h, "subscriber {s} ({query}), seed {seed}"),
                    }
                    have = Some(seq);
                    if seq == TOTAL + 1 {
                        return reconnects;
                    }
                    if rng.random_ratio(1, 150) {
                        drop(sse);
                        reconnects += 1;
                        let last = seq.to_string();
                        sse = wire::open_sse_at(addr, "s", "", Some(&last)).await.sse();
                    }
                }
            }));
        }
        tasks
    };
    let ((), tasks) = tokio::join!(producing, subscribers);
    // Every subscriber is open now, whether it started behind, at or past the head: one more
    // event is the last one each must see.
    app.append("s", json!({"data":"last"})).await;
    let mut reconnects = 0;
    for t in tasks {
        reconnects += tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
    let lagged = stats(&app).await["lag_fallbacks"].clone();
    println!("page {page}, live buffer {buffer}, {reconnects} reconnects, {lagged} lag fallbacks");
    assert_eq!(helpers::head(&app, "s").await, TOTAL + 1);
}

/// Idle connections cost little: 500 SSE subscribers, each idle on a stream of its own (the
/// costlier case: each has its own live channel), measured in a separate server process.
#[backend_test]
async fn idle_connections_cost_little_memory(db: TestDb) {
    const CONNS: u64 = 500;
    const PER_CONNECTION: u64 = 96 << 10;
    let db = db.close().await;
    let server = wire::Server::start(db.url()).await;
    let addr = server.socket_addr();
    let open = |stream: String| async move {
        let mut frames = wire::open_sse_at(addr, &stream, "", None).await.frames();
        assert_eq!(frames.next().await.unwrap(), "retry: 2000");
        frames
    };
    // Warm up allocator arenas and the database pool first.
    let mut warm = Vec::new();
    for i in 0..50 {
        warm.push(open(format!("warm:{i}")).await);
    }
    let before = wire::rss(server.pid);
    let mut idle = Vec::new();
    for i in 0..CONNS {
        idle.push(open(format!("idle:{i}")).await);
    }
    let grown = wire::rss(server.pid).saturating_sub(before);
    println!("{CONNS} idle SSE connections: {} bytes each", grown / CONNS);
    assert!(
        grown < CONNS * PER_CONNECTION,
        "{CONNS} idle connections took {grown} bytes"
    );
    let stats: Value = reqwest::get(format!("http://{addr}/v1/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["connections"]["sse"], CONNS + 50);
    // And they are alive: the last one still gets its stream's first event.
    let res = reqwest::Client::new()
        .post(format!(
            "http://{addr}/v1/streams/idle:{}/events",
            CONNS - 1
        ))
        .json(&json!({"data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let f = idle.last_mut().unwrap().next_content().await.unwrap();
    assert!(f.starts_with("id: 1\n"), "{f}");
    server.kill().await;
}
