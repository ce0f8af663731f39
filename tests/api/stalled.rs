//! Stalled readers cost a bounded amount of memory (issue 14): a WebSocket client and an SSE
//! client that stop reading (real sockets with small receive buffers) while 64 MiB is
//! published to the stream they follow (192 MiB in BENCHMARKS.md's run: the same bound; the
//! suite keeps to a smaller volume for time, still far above what the bound lets through). The server's resident memory — the real binary, a
//! process of its own, so the test's own buffers do not count — must grow by far less than
//! what was published; and once the readers read again, each gets every seq exactly once, in
//! order (they fell back to the log, as a lagging reader does).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::backend::{backend_test, TestDb};
use crate::helpers::WAIT;
use crate::node_process::NodeProcess;
use crate::wire::{self, rss};

const STREAM: &str = "stalled";
/// Each event's `data`: a JSON string of this many bytes.
const EVENT_BYTES: usize = 64 * 1024;
const PER_BATCH: usize = 16;
/// Batches published before the baseline is taken (the readers are stalled by then).
const WARM_UP: usize = 8;
/// Batches published while the readers stay stalled: 64 × 1 MiB. Without a byte bound the
/// live buffer (1024 batches) would keep every one of them for the stalled readers.
const BATCHES: usize = 64;
/// The most the server may grow by while they are published (half of what is published).
const GROWTH_LIMIT: u64 = 32 << 20;

#[backend_test]
async fn stalled_ws_and_sse_readers_cost_bounded_memory_and_resume_exactly(db: TestDb) {
    let url = db.close().await.url().to_owned();
    let node = NodeProcess::start(
        &url,
        &[
            // The readers stall for the whole publish: they must not be cut off for it.
            ("TAILCAST_WRITE_TIMEOUT_S", "600"),
            // A client that reads nothing answers no Ping either: no heartbeat verdict.
            ("TAILCAST_WS_HEARTBEAT_MS", "600000"),
            ("TAILCAST_LIVE_BUFFER_BYTES", &(4usize << 20).to_string()),
            ("TAILCAST_WS_SEND_QUEUE_BYTES", &(1usize << 20).to_string()),
        ],
    )
    .await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let mut next_id = 1usize;
    let mut publish = async |batches: usize| {
        for _ in 0..batches {
            let batch: Vec<Value> = (0..PER_BATCH)
                .map(|_| {
                    let id = format!("e{next_id}");
                    next_id += 1;
                    json!({"id": id, "data": "x".repeat(EVENT_BYTES)})
                })
                .collect();
            let res = client
                .post(node.url(&format!("/v1/streams/{STREAM}/events")))
                .json(&batch)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
        }
    };
    publish(1).await;

    // The WebSocket reader: subscribed from the start, then reads nothing.
    let tcp = wire::connect(node.addr, Some(16 * 1024)).await;
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{}/v1/ws", node.addr),
        MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("WebSocket handshake");
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));
    ws.send(Message::text(
        json!({"op":"subscribe","stream":STREAM,"after":0}).to_string(),
    ))
    .await
    .unwrap();
    // The SSE reader: the response head is read, the body is not.
    let sse = wire::get(
        node.addr,
        &format!("/v1/streams/{STREAM}/sse?after=0"),
        &[],
        Some(16 * 1024),
    )
    .await;
    assert_eq!(sse.status, 200);

    publish(WARM_UP).await;
    let before = rss(node.pid);
    let started = std::time::Instant::now();
    publish(BATCHES).await;
    let after = rss(node.pid);
    let took = started.elapsed();
    let published = (BATCHES * PER_BATCH * EVENT_BYTES) as u64;
    let grown = after.saturating_sub(before);
    eprintln!(
        "stalled readers: published {} MiB in {took:?}, server RSS {} -> {} MiB (+{} MiB)",
        published >> 20,
        before >> 20,
        after >> 20,
        grown >> 20
    );
    assert!(
        grown < GROWTH_LIMIT,
        "two stalled readers made the server grow by {} MiB while {} MiB was published",
        grown >> 20,
        published >> 20
    );

    // They read again: every seq once, in order, each the event published with it.
    let total = next_id - 1;
    let ws_reader = tokio::spawn(async move {
        let mut expect = 1usize;
        while expect <= total {
            let msg = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("WebSocket message in time")
                .expect("open")
                .expect("a message");
            let Message::Text(text) = msg else { continue };
            if !text.as_str().starts_with("{\"op\":\"event\"") {
                continue;
            }
            let (seq, id) = seq_and_id(text.as_str());
            assert_eq!(seq, expect, "WebSocket seq out of order");
            assert_eq!(id, format!("e{seq}"));
            expect += 1;
        }
    });
    let sse_reader = tokio::spawn(async move {
        let mut chunks = sse.chunks();
        let mut buf: Vec<u8> = Vec::new();
        // Bytes of `buf` already searched for a frame's end.
        let mut scanned = 0usize;
        let mut expect = 1usize;
        while expect <= total {
            let from = scanned.saturating_sub(1);
            if let Some(i) = buf[from..].windows(2).position(|w| w == b"\n\n") {
                let end = from + i;
                let frame = std::str::from_utf8(&buf[..end]).expect("UTF-8 frame");
                if frame.starts_with("id: ") {
                    let data = frame.split_once("\ndata: ").expect("data").1;
                    let (seq, id) = seq_and_id(data);
                    assert_eq!(seq, expect, "SSE seq out of order");
                    assert_eq!(id, format!("e{seq}"));
                    expect += 1;
                }
                buf.drain(..end + 2);
                scanned = 0;
                continue;
            }
            scanned = buf.len();
            let chunk = tokio::time::timeout(WAIT, chunks.next())
                .await
                .expect("SSE bytes in time")
                .expect("SSE open")
                .expect("SSE chunk");
            buf.extend_from_slice(&chunk);
        }
    });
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(120), async {
        ws_reader.await.expect("WebSocket reader");
        sse_reader.await.expect("SSE reader");
    })
    .await
    .expect("the readers caught up in time");
    eprintln!(
        "stalled readers: both read {total} events in {:?}",
        started.elapsed()
    );
}

/// The `seq` and `id` of an event's JSON (envelope or WebSocket `event` op), without parsing
/// its 64 KiB of data: `seq` comes before `data`, `id` after it.
fn seq_and_id(json: &str) -> (usize, String) {
    let at = json.find("\"seq\":").expect("a seq") + 6;
    let digits: String = json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let at = json.rfind("\"id\":\"").expect("an id") + 6;
    let id: String = json[at..].chars().take_while(|c| *c != '"').collect();
    (digits.parse().unwrap(), id)
}
