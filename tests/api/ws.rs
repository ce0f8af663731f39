//! The WebSocket protocol with a real client (tokio-tungstenite).

use std::collections::HashMap;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{TestApp, WAIT};

#[backend_test]
async fn welcome_subscribe_publish_and_events_in_order(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!([{"data":1},{"data":2}])).await;
    let mut ws = app.ws().await;
    assert_eq!(ws.welcome["protocol"], 1);
    assert_eq!(ws.welcome["heartbeat_ms"], 30000);
    assert!(ws.welcome["connection_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));

    let sub = ws.subscribe("s", json!({"after":0})).await;
    assert_eq!(sub["stream"], "s");
    assert_eq!(sub["head"], 2);
    for seq in 1..=2 {
        let ev = ws.next_event().await;
        assert_eq!(ev["seq"], seq);
        assert_eq!(ev["stream"], "s");
        assert_eq!(ev["data"], json!(seq));
    }

    // Publishing over the socket gives the REST append result and the event arrives live.
    let ack = ws
        .request(json!({"op":"publish","stream":"s","events":[{"type":"token","data":{"t":"x"},"id":"e3"}]}))
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(ack["stream"], "s");
    assert_eq!(ack["first_seq"], 3);
    assert_eq!(ack["last_seq"], 3);
    assert_eq!(ack["events"], json!([{"seq":3,"id":"e3"}]));
    let ev = ws.next_event().await;
    assert_eq!(ev["seq"], 3);
    assert_eq!(ev["type"], "token");

    // A retry with the same id is a duplicate, exactly as over REST.
    let again = ws.publish("s", json!([{"data":9,"id":"e3"}])).await;
    assert_eq!(
        again["events"],
        json!([{"seq":3,"id":"e3","duplicate":true}])
    );

    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong");
    assert!(pong["time"].as_str().is_some_and(|t| t.ends_with('Z')));

    let un = ws.request(json!({"op":"unsubscribe","stream":"s"})).await;
    assert_eq!(
        un,
        json!({"op":"unsubscribed","ref":un["ref"],"stream":"s"})
    );
    // After unsubscribing, nothing more from that stream: the next message is the pong.
    app.append("s", json!({"data":4})).await;
    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong");
    ws.close().await;
}

#[backend_test]
async fn live_events_are_byte_identical_to_replay(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut ws = app.ws().await;
    ws.subscribe("b", json!({})).await;
    // Published over the socket with odd spacing and key order: kept byte for byte.
    let raw = r#"{"op":"publish","stream":"b","ref":1,"events":[{"data":{"z":1,  "a":"h\u00e9 😀","n":1e400},"key":"k"}]}"#;
    ws.send_text(raw).await;
    let mut live = None;
    for _ in 0..2 {
        match ws.recv_message().await {
            Message::Text(t) if t.as_str().starts_with(r#"{"op":"event","#) => {
                live = Some(t.as_str().to_owned())
            }
            Message::Text(t) => assert!(t.as_str().contains(r#""op":"ack""#), "{t}"),
            other => panic!("{other:?}"),
        }
    }
    let live = live.expect("the event");
    let replay = app
        .get("/v1/streams/b/events?after=0")
        .await
        .text()
        .await
        .unwrap();
    let envelope = format!("{{{}", &live[r#"{"op":"event","#.len()..]);
    assert!(replay.contains(&envelope), "{replay}\n{envelope}");
    assert!(envelope.contains(r#""data":{"z":1,  "a":"h\u00e9 😀","n":1e400}"#));
}

#[backend_test]
async fn subscribe_options_now_types_snapshot_and_notices(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append(
        "o",
        json!([{"type":"a","data":1,"key":"x"},{"type":"b","data":2,"key":"x"},{"type":"a","data":3,"key":"y"}]),
    )
    .await;
    let mut ws = app.ws().await;

    let now = ws.subscribe("o", json!({"from":"now"})).await;
    assert_eq!(now["head"], 3);
    assert_eq!(now["cursor"], 3);
    app.append("o", json!({"type":"a","data":4})).await;
    assert_eq!(ws.next_event().await["seq"], 4);
    ws.request(json!({"op":"unsubscribe","stream":"o"})).await;

    ws.subscribe("o", json!({"after":0,"types":["b"]})).await;
    let ev = ws.next_event().await;
    assert_eq!(
        (ev["seq"].as_i64(), ev["type"].as_str()),
        (Some(2), Some("b"))
    );
    app.append("o", json!([{"type":"a","data":5},{"type":"b","data":6}]))
        .await;
    assert_eq!(ws.next_event().await["seq"], 6);
    ws.request(json!({"op":"unsubscribe","stream":"o"})).await;

    // Snapshot: the latest event per key (x -> 2, y -> 3), then a cursor at the head.
    ws.subscribe("o", json!({"from":"snapshot"})).await;
    assert_eq!(ws.next_event().await["seq"], 2);
    assert_eq!(ws.next_event().await["seq"], 3);
    let cursor = ws.recv().await;
    assert_eq!(cursor, json!({"op":"cursor","stream":"o","seq":6}));
    ws.request(json!({"op":"unsubscribe","stream":"o"})).await;

    // A cursor past the head is not ignored silently.
    ws.subscribe("o", json!({"after":100})).await;
    let notice = ws.recv().await;
    assert_eq!(notice["op"], "notice");
    assert_eq!(notice["notice"], "reset");
    assert_eq!(notice["stream"], "o");
    assert_eq!(notice["head"], 6);
}

#[backend_test]
async fn closing_and_deleting_a_stream_end_its_subscription(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("c", json!({"data":1})).await;
    app.append("d", json!({"data":1})).await;
    let mut ws = app.ws().await;
    ws.subscribe("c", json!({"from":"now"})).await;
    ws.subscribe("d", json!({"from":"now"})).await;

    let res = app
        .client
        .post(app.url("/v1/streams/c/close"))
        .body(r#"{"reason":"done"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let ev = ws.next_event().await;
    assert_eq!(ev["type"], "stream.closed");
    let end = ws.recv().await;
    assert_eq!(
        end,
        json!({"op":"unsubscribed","stream":"c","reason":"closed"})
    );

    let res = app
        .client
        .delete(app.url("/v1/streams/d"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let notice = ws.recv().await;
    assert_eq!(notice["op"], "notice");
    assert_eq!(notice["notice"], "deleted");
    let end = ws.recv().await;
    assert_eq!(
        end,
        json!({"op":"unsubscribed","stream":"d","reason":"deleted"})
    );

    // Both may be subscribed again at once; a closed stream replays to its end, then ends.
    let again = ws.subscribe("c", json!({"after":0})).await;
    assert_eq!(again["closed"], true);
    assert_eq!(ws.next_event().await["seq"], 1);
    assert_eq!(ws.next_event().await["type"], "stream.closed");
    assert_eq!(ws.recv().await["reason"], "closed");
    ws.subscribe("d", json!({"after":0})).await;

    // At the head of a closed stream there is nothing to wait for: told at once.
    let at_head = ws.subscribe("c", json!({"after":2})).await;
    assert_eq!(
        (at_head["head"].as_i64(), at_head["closed"].as_bool()),
        (Some(2), Some(true))
    );
    let end = ws.recv().await;
    assert_eq!(
        end,
        json!({"op":"unsubscribed","stream":"c","reason":"closed"})
    );
    let stats = app.get_json("/v1/stats").await;
    assert_eq!(stats["connections"]["ws"], 1);
}

#[backend_test]
async fn every_malformed_message_gets_a_specific_error_and_the_connection_keeps_working(
    db: TestDb,
) {
    let app = TestApp::spawn(db).await;
    let mut ws = app.ws().await;
    let deep = format!(
        r#"{{"op":"subscribe","stream":"s","types":{}"a"{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "invalid_json"),
        (r#"{"op":"ping""#.into(), "invalid_json"),
        ("[1,2]".into(), "invalid_message"),
        ("\"ping\"".into(), "invalid_message"),
        (deep, "nesting_too_deep"),
        (r#"{"ref":5}"#.into(), "missing_field"),
        (r#"{"op":["ping"]}"#.into(), "invalid_field"),
        (r#"{"op":"teleport"}"#.into(), "unknown_op"),
        (r#"{"op":"subscribe"}"#.into(), "missing_field"),
        (r#"{"op":"subscribe","stream":42}"#.into(), "invalid_field"),
        (
            r#"{"op":"subscribe","stream":"a/b"}"#.into(),
            "invalid_stream_name",
        ),
        (
            r#"{"op":"subscribe","stream":"s","after":1e400}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"op":"subscribe","stream":"s","after":123456789012345678901234567890}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"op":"subscribe","stream":"s","after":-3}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"op":"subscribe","stream":"s","from":"yesterday"}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"op":"subscribe","stream":"s","since":"noon"}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"op":"subscribe","stream":"s","types":[1]}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"op":"subscribe","stream":"s","after":1,"from":"now"}"#.into(),
            "invalid_message",
        ),
        (
            r#"{"op":"subscribe","stream":"s","colour":"red"}"#.into(),
            "unknown_field",
        ),
        (
            r#"{"op":"unsubscribe","stream":"never"}"#.into(),
            "not_subscribed",
        ),
        (r#"{"op":"publish","stream":"s"}"#.into(), "missing_field"),
        (
            r#"{"op":"publish","stream":"s","events":"x"}"#.into(),
            "invalid_event",
        ),
        (
            r#"{"op":"publish","stream":"s","events":[]}"#.into(),
            "empty_batch",
        ),
        (
            r#"{"op":"publish","stream":"s","events":[{"type":"input.answered"}]}"#.into(),
            "reserved_type",
        ),
        (
            r#"{"op":"publish","stream":"s","events":[{"data":1}],"expected_seq":7}"#.into(),
            "seq_conflict",
        ),
        (
            r#"{"op":"publish","stream":"s","events":[{"data":1}],"expected_seq":1.5}"#.into(),
            "invalid_field",
        ),
        (
            r#"{"op":"input","stream":"s","data":1}"#.into(),
            "missing_field",
        ),
        (
            r#"{"op":"input","stream":"s","request_id":"nope","data":1}"#.into(),
            "input_not_found",
        ),
        (r#"{"op":"stop"}"#.into(), "missing_field"),
    ];
    for (i, (text, code)) in cases.iter().enumerate() {
        ws.send_text(text).await;
        let reply = ws.recv().await;
        assert_eq!(reply["op"], "error", "case {i} {text:.80}: {reply}");
        assert_eq!(reply["code"], *code, "case {i} {text:.80}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        // Still usable after every one.
        let pong = ws.request(json!({"op":"ping"})).await;
        assert_eq!(pong["op"], "pong", "after case {i}");
    }

    // `ref` is echoed when it could be read, even on errors.
    let reply = ws
        .request(json!({"op":"subscribe","stream":"bad name"}))
        .await;
    assert_eq!(reply["code"], "invalid_stream_name");
    let reply = ws
        .request(json!({"op":"subscribe","stream":"s","after":0}))
        .await;
    assert_eq!(reply["op"], "subscribed");
    let reply = ws
        .request(json!({"op":"subscribe","stream":"s","after":0}))
        .await;
    assert_eq!(reply["code"], "already_subscribed");
    assert_eq!(reply["stream"], "s");

    ws.send_message(Message::binary(vec![1u8, 2, 3])).await;
    let reply = ws.recv().await;
    assert_eq!(reply["code"], "binary_not_supported");
    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong");
}

#[backend_test]
async fn an_oversized_message_closes_with_1009(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.ws_max_message_bytes = 4096).await;
    let mut ws = app.ws().await;
    let big = json!({"op":"publish","stream":"s","events":[{"data":"x".repeat(5000)}]});
    ws.send(big).await;
    let close = ws.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
    // Nothing was appended.
    assert_eq!(app.get("/v1/streams/s").await.status(), 404);
}

#[backend_test]
async fn shutdown_closes_with_1001(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut ws = app.ws().await;
    ws.subscribe("s", json!({})).await;
    let stopping = tokio::spawn(app.shutdown());
    let close = ws.recv_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[backend_test]
async fn the_server_pings_and_an_answering_client_stays_connected(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.ws_heartbeat_ms = 250).await;
    let mut ws = app.ws().await;
    assert_eq!(ws.welcome["heartbeat_ms"], 250);
    // tungstenite answers each Ping while we read; after many more than 3 intervals the
    // connection is still open.
    ws.send(json!({"op":"subscribe","stream":"quiet"})).await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    ws.await_pings(5).await;
    assert_eq!(ws.request(json!({"op":"ping"})).await["op"], "pong");
}

#[backend_test]
async fn a_silent_client_is_closed_after_three_heartbeats(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.ws_heartbeat_ms = 100).await;
    // A raw client that completes the handshake and then never answers a Ping.
    let mut tcp = raw_ws(&app).await;
    let (opcodes, close_code) = frames_until_closed(&mut tcp).await;
    assert_eq!(opcodes.first(), Some(&0x1), "welcome first: {opcodes:?}");
    assert!(opcodes.contains(&0x9), "pings were sent: {opcodes:?}");
    assert_eq!(close_code, Some(1008), "{opcodes:?}");
}

/// A raw TCP connection that has completed the WebSocket handshake (its 101 not yet read).
async fn raw_ws(app: &TestApp) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let handshake = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    tcp
}

/// Reads a raw WebSocket connection until the server closes it; returns the opcodes of the
/// server's (unmasked) frames in order and the code of its close frame, if it sent one.
async fn frames_until_closed(tcp: &mut tokio::net::TcpStream) -> (Vec<u8>, Option<u16>) {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut received))
        .await
        .expect("closed in time")
        .unwrap();
    let header_end = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(received.starts_with(b"HTTP/1.1 101"));
    let mut frames = &received[header_end..];
    let mut opcodes = Vec::new();
    let mut close_code = None;
    while frames.len() >= 2 {
        let opcode = frames[0] & 0x0f;
        let (len, start) = match frames[1] & 0x7f {
            126 => (u16::from_be_bytes([frames[2], frames[3]]) as usize, 4),
            127 => panic!("unexpectedly large frame"),
            n => (n as usize, 2),
        };
        let payload = &frames[start..start + len];
        if opcode == 0x8 && payload.len() >= 2 {
            close_code = Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
        opcodes.push(opcode);
        frames = &frames[start + len..];
    }
    (opcodes, close_code)
}

#[backend_test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007(db: TestDb) {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn(db).await;
    let mut tcp = raw_ws(&app).await;
    // A final, masked text frame (mask 0: the payload as is) holding bytes that are not UTF-8.
    let payload = [b'{', 0xff, 0xfe, b'}'];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&payload);
    tcp.write_all(&frame).await.unwrap();
    let (opcodes, close_code) = frames_until_closed(&mut tcp).await;
    assert_eq!(opcodes.first(), Some(&0x1), "welcome first: {opcodes:?}");
    assert_eq!(close_code, Some(1007), "{opcodes:?}");
}

#[backend_test]
async fn stop_appends_control_stop_that_the_producer_sees(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut producer = app.ws().await;
    producer
        .subscribe("run", json!({"from":"now","types":["control.stop"]}))
        .await;
    let mut user = app.ws().await;
    let ack = user
        .request(json!({"op":"stop","stream":"run","reason":{"by":"user"}}))
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(ack["first_seq"], 1);
    let ev = producer.next_event().await;
    assert_eq!(ev["type"], "control.stop");
    assert_eq!(ev["data"], json!({"reason":{"by":"user"}}));
    // Also over REST; a producer may not forge it.
    let res = app
        .client
        .post(app.url("/v1/streams/run/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let ev = producer.next_event().await;
    assert_eq!((ev["seq"].as_i64(), &ev["data"]), (Some(2), &json!({})));
    let res = app
        .append_raw("run", "", r#"{"type":"control.stop"}"#)
        .await;
    assert_eq!(res.status(), 400);
}

#[backend_test]
async fn many_subscriptions_on_one_socket_under_concurrent_publishing(db: TestDb) {
    const STREAMS: usize = 8;
    const PER_STREAM: i64 = 150;
    let app = TestApp::spawn(db).await;
    let mut ws = app.ws().await;
    for i in 0..STREAMS {
        ws.subscribe(&format!("m{i}"), json!({"after":0})).await;
    }
    // Every stream is written by its own concurrent producer, in batches of mixed sizes.
    let mut producers = Vec::new();
    for i in 0..STREAMS {
        let client = app.client.clone();
        let url = app.url(&format!("/v1/streams/m{i}/events"));
        producers.push(tokio::spawn(async move {
            let mut n = 0;
            while n < PER_STREAM {
                let size = (1 + (n % 7)).min(PER_STREAM - n);
                let batch: Vec<Value> = (0..size).map(|k| json!({"data": n + k + 1})).collect();
                let res = client
                    .post(&url)
                    .body(Value::Array(batch).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                n += size;
            }
        }));
    }
    let mut next: HashMap<String, i64> = (0..STREAMS).map(|i| (format!("m{i}"), 1)).collect();
    let mut remaining = STREAMS as i64 * PER_STREAM;
    while remaining > 0 {
        let ev = ws.next_event().await;
        let stream = ev["stream"].as_str().unwrap().to_owned();
        let expect = next.get_mut(&stream).unwrap();
        assert_eq!(
            ev["seq"].as_i64(),
            Some(*expect),
            "{stream} in order, no gap"
        );
        assert_eq!(ev["data"].as_i64(), Some(*expect));
        *expect += 1;
        remaining -= 1;
    }
    for p in producers {
        p.await.unwrap();
    }
    assert!(next.values().all(|n| *n == PER_STREAM + 1));
}

#[backend_test]
async fn reconnect_resumes_each_subscription_by_its_cursor(db: TestDb) {
    let app = TestApp::spawn(db).await;
    for s in ["r1", "r2", "r3"] {
        app.append(s, json!([{"data":1},{"data":2},{"data":3}]))
            .await;
    }
    let mut ws = app.ws().await;
    let mut cursors: HashMap<String, i64> = HashMap::new();
    for s in ["r1", "r2", "r3"] {
        ws.subscribe(s, json!({"after":0})).await;
    }
    // Read a few events, remember per-stream cursors, drop the connection mid-stream.
    for _ in 0..5 {
        let ev = ws.next_event().await;
        let seq = ev["seq"].as_i64().unwrap();
        let c = cursors
            .entry(ev["stream"].as_str().unwrap().to_owned())
            .or_insert(0);
        assert_eq!(seq, *c + 1);
        *c = seq;
    }
    drop(ws);
    for s in ["r1", "r2", "r3"] {
        app.append(s, json!([{"data":4},{"data":5}])).await;
    }
    let mut ws = app.ws().await;
    for s in ["r1", "r2", "r3"] {
        let after = cursors.get(s).copied().unwrap_or(0);
        ws.subscribe(s, json!({ "after": after })).await;
    }
    let mut remaining: i64 = ["r1", "r2", "r3"]
        .iter()
        .map(|s| 5 - cursors.get(*s).copied().unwrap_or(0))
        .sum();
    while remaining > 0 {
        let ev = ws.next_event().await;
        let c = cursors
            .entry(ev["stream"].as_str().unwrap().to_owned())
            .or_insert(0);
        assert_eq!(
            ev["seq"].as_i64(),
            Some(*c + 1),
            "resumed exactly after the cursor"
        );
        *c += 1;
        remaining -= 1;
    }
    assert!(cursors.values().all(|c| *c == 5));
    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong", "no extra events after the last");
}

#[backend_test]
async fn a_plain_get_is_told_to_upgrade(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let res = app.get("/v1/ws").await;
    assert_eq!(res.status(), 426);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "upgrade_required");
}

#[backend_test]
async fn a_client_that_stops_reading_still_gets_every_event_in_order(db: TestDb) {
    // A tiny send queue and live buffer: while this client does not read, its queue fills,
    // its subscriptions stop being polled, and their live channels overflow. It must still
    // get everything once it reads again, from the log.
    let app = TestApp::spawn_with(db, |c| {
        c.ws_send_queue = 4;
        c.live_buffer = 2;
    })
    .await;
    let mut ws = app.ws().await;
    ws.subscribe("slow:a", json!({})).await;
    ws.subscribe("slow:b", json!({})).await;
    const N: i64 = 600;
    for chunk in 0..(N / 50) {
        for s in ["slow:a", "slow:b"] {
            let batch: Vec<Value> = (1..=50)
                .map(|i| json!({ "data": chunk * 50 + i }))
                .collect();
            app.append(s, Value::Array(batch)).await;
        }
    }
    let mut next: HashMap<String, i64> =
        HashMap::from([("slow:a".into(), 1), ("slow:b".into(), 1)]);
    for _ in 0..(2 * N) {
        let ev = ws.next_event().await;
        let expect = next.get_mut(ev["stream"].as_str().unwrap()).unwrap();
        assert_eq!(ev["seq"].as_i64(), Some(*expect), "in order, no gap: {ev}");
        assert_eq!(ev["data"].as_i64(), Some(*expect));
        *expect += 1;
    }
    assert_eq!(ws.request(json!({"op":"ping"})).await["op"], "pong");
}

#[backend_test]
async fn a_client_that_never_reads_is_disconnected_by_the_write_timeout(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.write_timeout_s = 1).await;
    let mut ws = app.ws_small_buffer().await;
    ws.send(json!({"op":"subscribe","stream":"big"})).await;
    // Far more than the socket buffers hold, while the client reads nothing.
    let big = "x".repeat(900_000);
    for _ in 0..12 {
        app.append("big", json!({ "data": big })).await;
    }
    // The server gives up on the blocked socket: the connection count drops to zero.
    let gone = async {
        loop {
            let stats = app.get_json("/v1/stats").await;
            if stats["connections"]["ws"] == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, gone)
        .await
        .expect("disconnected in time");
    assert!(ws.dropped_without_close().await);
    // How it is counted: ops::a_slow_consumer_is_counted_once_under_its_own_transport.
}

/// Many subscriptions catching up on one socket while the client keeps sending ops, on a
/// pool far smaller than the number of subscriptions: a subscription that is not being
/// polled must not sit on a pooled connection, or the socket's own next op (and every other
/// client) waits for a connection that never comes back.
#[backend_test]
async fn many_catching_up_subscriptions_do_not_starve_the_pool(db: TestDb) {
    const STREAMS: usize = 24;
    const EVENTS: i64 = 1500;
    let small = db.reopen_with(3, std::time::Duration::from_secs(2)).await;
    let app = TestApp::spawn_with(small, |c| c.read_page = 50).await;
    let batch: Vec<Value> = (0..EVENTS / 3).map(|i| json!({"data": i})).collect();
    for s in 0..STREAMS {
        for _ in 0..3 {
            app.append(&format!("pool-{s}"), json!(batch)).await;
        }
    }
    let mut ws = app.ws().await;
    let mut next: HashMap<String, i64> = HashMap::new();
    let mut done = 0;
    let on_message = |msg: &Value, next: &mut HashMap<String, i64>, done: &mut usize| match msg
        ["op"]
        .as_str()
        .unwrap()
    {
        "subscribed" => {}
        "event" => {
            let stream = msg["stream"].as_str().unwrap().to_owned();
            let expect = next.entry(stream.clone()).or_insert(1);
            assert_eq!(
                msg["seq"].as_i64().unwrap(),
                *expect,
                "{stream} out of order"
            );
            *expect += 1;
            if *expect > EVENTS {
                *done += 1;
            }
        }
        other => panic!("unexpected {other}: {msg}"),
    };
    // Subscribe one stream at a time while the earlier ones are still catching up, so each
    // subscribe op needs a connection while other subscriptions have reads in flight.
    for s in 0..STREAMS {
        ws.send(json!({"op":"subscribe","stream":format!("pool-{s}"),"after":0,"ref":s}))
            .await;
        loop {
            let msg = ws.recv().await;
            on_message(&msg, &mut next, &mut done);
            if msg["op"] == "subscribed" && msg["ref"] == json!(s) {
                break;
            }
        }
    }
    while done < STREAMS {
        let msg = ws.recv().await;
        on_message(&msg, &mut next, &mut done);
    }
    // The pool is still usable by everyone else.
    app.append("pool-after", json!({"data": "still served"}))
        .await;
}

/// Many subscriptions on one socket share `--ws-catchup-bytes`: with a budget smaller than
/// one stream's backlog (and one event larger than the whole budget), every subscription
/// still catches up completely and in order, taking turns.
#[backend_test]
async fn many_subscriptions_catch_up_within_a_small_byte_budget(db: TestDb) {
    const BUDGET: usize = 2048;
    let app = TestApp::spawn_with(db, |c| c.ws_catchup_bytes = BUDGET).await;
    let (streams, per_stream) = (30, 40);
    let filler = "x".repeat(300);
    for s in 0..streams {
        let batch: Vec<Value> = (1..=per_stream)
            .map(|i| json!({"data": {"i": i, "pad": filler}}))
            .collect();
        app.append(&format!("b{s}"), json!(batch)).await;
    }
    // One event larger than the whole budget: read alone, never refused or skipped.
    let big = "y".repeat(3 * BUDGET);
    app.append("b0", json!([{"data": {"big": big}}])).await;

    let mut ws = app.ws().await;
    for s in 0..streams {
        ws.subscribe(&format!("b{s}"), json!({"after": 0})).await;
    }
    let mut next: HashMap<String, i64> = HashMap::new();
    let total = streams * per_stream + 1;
    for _ in 0..total {
        let ev = ws.next_event().await;
        let stream = ev["stream"].as_str().unwrap().to_owned();
        let expected = next.entry(stream.clone()).or_insert(1);
        assert_eq!(ev["seq"], *expected, "{stream} out of order");
        *expected += 1;
        if stream == "b0" && *expected == per_stream + 2 {
            assert_eq!(ev["data"]["big"].as_str().map(str::len), Some(3 * BUDGET));
        }
    }
    assert_eq!(next.len(), streams as usize);
    assert!(next.values().all(|n| *n > per_stream));
    assert_eq!(next["b0"], per_stream + 2);
    // Everything was delivered once: a ping comes back with nothing before it.
    let pong = ws.request(json!({"op":"ping"})).await;
    assert_eq!(pong["op"], "pong");
    assert!(ws.backlog_is_empty());
}
