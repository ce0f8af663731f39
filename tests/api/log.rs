//! The event log through REST: append, idempotency, every rejected append, byte-exact data.

use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::backend::{backend_test, TestDb};
use crate::helpers::{head, TestApp};
use crate::wire::{self, raw_envelopes};

#[backend_test]
async fn append_assigns_seqs_and_replay_returns_data_byte_for_byte(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let body = r#"[{"type":"token","data":{"z":1,  "a":"h\u00e9llo 😀","n":123456789012345678901234567890},"id":"a"},{"data":[1e400, "x"]}]"#;
    let res = app.append_raw("run:1", "", body).await;
    assert_eq!(res.status(), 201);
    let res: Value = res.json().await.unwrap();
    assert_eq!(
        res,
        json!({"stream":"run:1","first_seq":1,"last_seq":2,"events":[{"seq":1,"id":"a"},{"seq":2}]})
    );

    let text = app
        .get("/v1/streams/run:1/events?after=0")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#""data":{"z":1,  "a":"h\u00e9llo 😀","n":123456789012345678901234567890},"id":"a""#
        ),
        "{text}"
    );
    assert!(text.contains(r#""data":[1e400, "x"]"#), "{text}");
    app.shutdown().await;
}

#[backend_test]
async fn a_repeated_event_id_is_stored_once(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!({"data":1,"id":"x"})).await;
    let again = app
        .append(
            "s",
            json!([{"data":2,"id":"x"},{"data":3,"id":"y"},{"data":4,"id":"y"}]),
        )
        .await;
    assert_eq!(
        again["events"],
        json!([{"seq":1,"id":"x","duplicate":true},{"seq":2,"id":"y"},{"seq":2,"id":"y","duplicate":true}])
    );
    assert_eq!(again["first_seq"], 1);
    assert_eq!(again["last_seq"], 2);
    let all = app.read_all("s").await;
    let data: Vec<&Value> = all.iter().map(|e| &e["data"]).collect();
    assert_eq!(data, vec![&json!(1), &json!(3)]);
    // Ids are per stream: the same id elsewhere is a new event.
    let other = app.append("t", json!({"data":5,"id":"x"})).await;
    assert_eq!(other["events"], json!([{"seq":1,"id":"x"}]));
}

/// Many clients retrying the same events at once (each in its own request, so they land in
/// the same or different group commits): each id is stored once, and every caller learns
/// the one seq it got.
#[backend_test]
async fn concurrent_retries_of_one_id_store_it_once(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!({"data":"before"})).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = app.client.clone();
        let url = app.url("/v1/streams/s/events");
        tasks.push(tokio::spawn(async move {
            // Half send a batch whose ids repeat inside it, half the single events.
            let body = if i % 2 == 0 {
                json!([{"data":"A","id":"a"},{"data":"B","id":"b"},{"data":"A2","id":"a"}])
            } else {
                json!({"data":"B","id":"b"})
            };
            let res = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(res.status(), 201);
            res.json::<Value>().await.unwrap()
        }));
    }
    let mut seq_of = std::collections::HashMap::new();
    let mut fresh = 0;
    for t in tasks {
        let res = t.await.unwrap();
        for ack in res["events"].as_array().unwrap() {
            let id = ack["id"].as_str().unwrap().to_owned();
            let seq = ack["seq"].as_i64().unwrap();
            assert_eq!(*seq_of.entry(id).or_insert(seq), seq, "one seq per id");
            if ack.get("duplicate").is_none() {
                fresh += 1;
            }
        }
    }
    assert_eq!(fresh, 2, "exactly one fresh append per id");
    let all = app.read_all("s").await;
    assert_eq!(all.len(), 3);
    let seqs: Vec<i64> = all.iter().map(wire::seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    for env in &all[1..] {
        let id = env["id"].as_str().unwrap();
        assert_eq!(seq_of[id], wire::seq(env));
        assert_eq!(env["data"], if id == "a" { "A" } else { "B" });
    }
}

/// The error body openapi.yaml promises, with the content type.
async fn problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status(), status, "status for {code}");
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "content type for {code}"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["type"], "about:blank", "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    body
}

#[backend_test]
async fn every_rejected_append_has_its_status_and_code_and_leaves_the_log_unchanged(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!([{"data":1,"id":"one"},{"data":2},{"data":3}]))
        .await;
    let before = raw_envelopes(&app, "s").await;

    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "?expected_seq=2",
            r#"{"data":4}"#.into(),
            409,
            "seq_conflict",
        ),
        (
            "?expected_seq=0",
            r#"{"data":4}"#.into(),
            409,
            "seq_conflict",
        ),
        (
            "?expected_seq=-1",
            r#"{"data":4}"#.into(),
            400,
            "invalid_parameter",
        ),
        (
            "?expected_seq=x",
            r#"{"data":4}"#.into(),
            400,
            "invalid_parameter",
        ),
        (
            "",
            r#"{"type":"stream.closed"}"#.into(),
            400,
            "reserved_type",
        ),
        (
            "",
            r#"[{"data":4},{"type":"input.answered"}]"#.into(),
            400,
            "reserved_type",
        ),
        (
            "",
            r#"{"type":"control.stop"}"#.into(),
            400,
            "reserved_type",
        ),
        (
            "",
            r#"{"type":"input.requested"}"#.into(),
            400,
            "reserved_type",
        ),
        (
            "",
            r#"{"type":"input.expired"}"#.into(),
            400,
            "reserved_type",
        ),
        ("", "{".into(), 400, "invalid_json"),
        ("", "nope".into(), 400, "invalid_json"),
        ("", "".into(), 400, "invalid_json"),
        ("", r#"[{"data":4},]"#.into(), 400, "invalid_json"),
        ("", r#"{"data":4} {"data":5}"#.into(), 400, "invalid_json"),
        ("", "42".into(), 400, "invalid_event"),
        ("", r#"{"dta":4}"#.into(), 400, "invalid_event"),
        (
            "",
            r#"[{"data":4},{"type":7}]"#.into(),
            400,
            "invalid_event",
        ),
        ("", r#"{"type":""}"#.into(), 400, "invalid_event"),
        (
            "",
            format!(r#"{{"type":"{}"}}"#, "t".repeat(129)),
            400,
            "invalid_event",
        ),
        ("", r#"{"id":""}"#.into(), 400, "invalid_event"),
        (
            "",
            format!(r#"{{"id":"{}"}}"#, "i".repeat(257)),
            400,
            "invalid_event",
        ),
        ("", r#"{"key":"a\nb"}"#.into(), 400, "invalid_event"),
        ("", "[]".into(), 400, "empty_batch"),
        (
            "",
            format!(r#"{{"data":"{}"}}"#, "x".repeat(1 << 20)),
            413,
            "event_too_large",
        ),
        (
            "",
            serde_json::to_string(&vec![json!({"data":0}); 1001]).unwrap(),
            413,
            "batch_too_large",
        ),
    ];
    for (query, body, status, code) in cases {
        let res = app.append_raw("s", query, body.clone()).await;
        let p = problem(res, status, code).await;
        match code {
            "seq_conflict" => assert_eq!(p["head"], 3, "{p}"),
            "event_too_large" => assert_eq!(p["limit"], 1 << 20, "{p}"),
            "batch_too_large" => assert_eq!(p["limit"], 1000, "{p}"),
            _ => {}
        }
    }
    // Not UTF-8 inside a string.
    let res = app
        .append_raw("s", "", b"{\"data\":\"\xff\xfe\"}".to_vec())
        .await;
    problem(res, 400, "invalid_json").await;
    // Over the 8 MiB batch limit, in a body whose events are each under the event limit.
    let big = format!(r#"{{"data":"{}"}}"#, "y".repeat((1 << 20) - 8));
    let body = format!("[{}]", vec![big; 9].join(","));
    let res = app.append_raw("s", "", body).await;
    let p = problem(res, 413, "payload_too_large").await;
    assert_eq!(p["limit"], 8 << 20);

    assert_eq!(raw_envelopes(&app, "s").await, before, "the log changed");

    // Stream names: each rejected before anything is touched, and nothing is created.
    let long = "n".repeat(201);
    for name in ["a%20b", "a%2Fb", "caf%C3%A9", "a%00", "a*", long.as_str()] {
        let res = app.append_raw(name, "", r#"{"data":1}"#).await;
        problem(res, 400, "invalid_stream_name").await;
    }
    let listed = app.get_json("/v1/streams").await;
    assert_eq!(listed["streams"].as_array().unwrap().len(), 1, "{listed}");

    // At the limits, accepted.
    let name = "n".repeat(200);
    app.append(&name, json!({"data":1})).await;
    let exact = format!(r#"{{"data":"{}"}}"#, "z".repeat((1 << 20) - 2));
    assert_eq!(app.append_raw("s", "", exact).await.status(), 201);
    let batch = serde_json::to_string(&vec![json!({"data":0}); 1000]).unwrap();
    let res = app.append_raw("s", "?expected_seq=4", batch).await;
    assert_eq!(res.status(), 201);
    assert_eq!(head(&app, "s").await, 1004);
}

#[backend_test]
async fn expected_seq_appends_only_at_the_given_head(db: TestDb) {
    let app = TestApp::spawn(db).await;
    // 0: the stream does not exist yet.
    let res = app
        .append_raw("s", "?expected_seq=0", r#"{"data":1}"#)
        .await;
    assert_eq!(res.status(), 201);
    let res = app
        .append_raw("s", "?expected_seq=0", r#"{"data":2}"#)
        .await;
    let p = problem(res, 409, "seq_conflict").await;
    assert_eq!(p["head"], 1);
    assert_eq!(p["expected_seq"], 0);
    let res = app
        .append_raw(
            "s",
            "?expected_seq=1",
            r#"[{"data":2,"id":"k"},{"data":3}]"#,
        )
        .await;
    assert_eq!(res.status(), 201);
    // A retry of that append (same ids) after it succeeded is answered as duplicates, not
    // as a conflict, although the head has moved past expected_seq.
    let res = app
        .append_raw("s", "?expected_seq=1", r#"{"data":2,"id":"k"}"#)
        .await;
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["events"], json!([{"seq":2,"id":"k","duplicate":true}]));
    // Racing writers with the same expected_seq: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let client = app.client.clone();
        let url = app.url("/v1/streams/s/events?expected_seq=3");
        tasks.push(tokio::spawn(async move {
            let res = client
                .post(url)
                .json(&json!({"data":i}))
                .send()
                .await
                .unwrap();
            res.status().as_u16()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes.sort();
    assert_eq!(codes, [201, 409, 409, 409, 409, 409, 409, 409, 409, 409]);
    assert_eq!(head(&app, "s").await, 4);
}

#[backend_test]
async fn a_closed_stream_takes_no_more_appends(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("s", json!({"data":1,"id":"first"})).await;
    let res = app.close_stream("s", Some(json!({"reason":"done"}))).await;
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["events"], json!([{"seq":2}]));
    // Idempotent: closing again changes nothing and says so.
    let res = app.close_stream("s", None).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["events"], json!([{"seq":2,"duplicate":true}]));

    let before = raw_envelopes(&app, "s").await;
    let res = app.append_raw("s", "", r#"{"data":3}"#).await;
    let p = problem(res, 409, "stream_closed").await;
    assert_eq!(p["head"], 2);
    let res = app
        .append_raw("s", "?expected_seq=2", r#"{"data":3}"#)
        .await;
    problem(res, 409, "stream_closed").await;
    // A retry of an append that succeeded before the close still learns its seq.
    let res = app.append_raw("s", "", r#"{"data":1,"id":"first"}"#).await;
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v["events"],
        json!([{"seq":1,"id":"first","duplicate":true}])
    );
    assert_eq!(raw_envelopes(&app, "s").await, before);

    let last: Value = serde_json::from_str(&before[1]).unwrap();
    assert_eq!(last["type"], "stream.closed");
    assert_eq!(last["data"], json!({"reason":"done"}));
    let info = app.get_json("/v1/streams/s").await;
    assert_eq!(info["closed"], true);
    // A bad close body is rejected like any other bad JSON.
    let res = app
        .client
        .post(app.url("/v1/streams/t/close"))
        .body("{")
        .send()
        .await
        .unwrap();
    problem(res, 400, "invalid_json").await;
    assert_eq!(app.get("/v1/streams/t").await.status(), 404);
}

#[derive(serde::Deserialize)]
struct RawData<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

fn raw_data(envelope: &str) -> String {
    let d: RawData<'_> = serde_json::from_str(envelope).expect("envelope");
    d.data.get().to_owned()
}

/// `data` comes back exactly as sent — key order, whitespace, escapes, unicode, numbers no
/// float can hold — from replay, export, snapshot and SSE alike.
#[backend_test]
async fn data_round_trips_byte_for_byte_everywhere(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let samples = [
        r#"{"z":1,"a":2,"m":{"y":[3,2,1],"b":null}}"#,
        r#"{"s":"  two  spaces\ttab \" quote \\ back","t":"\t\n\r"}"#,
        r#"{ "a" : 1 ,  "b" : [ 1 , 2 ] }"#,
        r#"{"raw":"héllo 😀 日本語","esc":"\u00e9\ud83d\ude00\u2028","slash":"\/"}"#,
        r#"[123456789012345678901234567890,1e400,-0.0,1.000000000000000000001,-1E-400]"#,
        r#""just a string""#,
        "true",
        "null",
        "0",
        r#"[[[[[[[[[[{"deep":[]}]]]]]]]]]]"#,
        r#"{"dup":1,"dup":2}"#,
    ];
    let body = format!(
        "[{}]",
        samples
            .iter()
            .enumerate()
            .map(|(i, d)| format!(r#"{{"data":{d},"key":"k{i}"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(app.append_raw("s", "", body).await.status(), 201);

    let replay = raw_envelopes(&app, "s").await;
    let got: Vec<String> = replay.iter().map(|e| raw_data(e)).collect();
    assert_eq!(got, samples);

    let export = app
        .client
        .get(app.url("/v1/streams/s/events?after=0"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines, replay, "export lines equal the replay's envelopes");

    let snap = app
        .get("/v1/streams/s/snapshot")
        .await
        .text()
        .await
        .unwrap();
    #[derive(serde::Deserialize)]
    struct Snap<'a> {
        #[serde(borrow)]
        events: Vec<&'a RawValue>,
    }
    let snap: Snap<'_> = serde_json::from_str(&snap).unwrap();
    let mut snap: Vec<String> = snap.events.iter().map(|e| e.get().to_owned()).collect();
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: i64,
    }
    snap.sort_by_key(|e| serde_json::from_str::<Seq>(e).unwrap().seq);
    assert_eq!(snap, replay, "snapshot envelopes equal the replay's");

    // SSE, both replayed from the log and delivered live.
    let mut sse = wire::open_sse(&app, "s", "", None).await.sse();
    for env in &replay {
        assert_eq!(&sse.next().await.data, env);
    }
    let body = format!(
        "[{}]",
        samples
            .iter()
            .map(|d| format!(r#"{{"data":{d}}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(app.append_raw("s", "", body).await.status(), 201);
    let replay = raw_envelopes(&app, "s").await;
    for env in &replay[samples.len()..] {
        assert_eq!(&sse.next().await.data, env, "live equals replay");
    }
}
