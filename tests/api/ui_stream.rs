//! `GET /v1/streams/{stream}/ui-message-stream`: the AI SDK's UI message stream framing over
//! the same subscription as SSE. The bytes are checked exactly here; the real `ai` package
//! reads the same endpoint in clients/js/test/ai-sdk.test.js.

use serde_json::json;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{wait_until, TestApp};
use crate::wire::{self, Frames, Http};

async fn ui_get(app: &TestApp, stream: &str, query: &str, last_id: Option<&str>) -> Http {
    let path = format!("/v1/streams/{stream}/ui-message-stream{query}");
    let headers: Vec<(&str, &str)> = last_id
        .map(|id| ("last-event-id", id))
        .into_iter()
        .collect();
    wire::get(app.addr, &path, &headers, None).await
}

async fn ui_frames(app: &TestApp, stream: &str, query: &str, last_id: Option<&str>) -> Frames {
    let res = ui_get(app, stream, query, last_id).await;
    assert_eq!(res.status, 200, "GET ui-message-stream{query}");
    assert_eq!(res.header("x-vercel-ai-ui-message-stream"), "v1");
    assert_eq!(res.header("content-type"), "text/event-stream");
    assert_eq!(res.header("cache-control"), "no-cache");
    res.frames()
}

/// Chunks as the AI SDK writes them (`createUIMessageStream`), one `ui` event each.
fn chunks() -> Vec<serde_json::Value> {
    vec![
        json!({"type":"start","messageId":"m1"}),
        json!({"type":"text-start","id":"t"}),
        json!({"type":"text-delta","id":"t","delta":"Hel"}),
        json!({"type":"text-delta","id":"t","delta":"lo"}),
        json!({"type":"text-end","id":"t"}),
        json!({"type":"finish"}),
    ]
}

fn ui_events(chunks: &[serde_json::Value]) -> serde_json::Value {
    chunks
        .iter()
        .map(|c| json!({"type":"ui","data":c}))
        .collect()
}

/// Exact bytes: `id: <seq>` + the chunk alone as `data:`; other types skipped (their seqs
/// too); multi-line JSON split into `data:` lines; `data: [DONE]` after the close; the end.
#[backend_test]
async fn frames_ui_events_exactly_and_ends_with_done(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let c = chunks();
    app.append("chat", ui_events(&c[..2])).await; // seqs 1, 2
    app.append("chat", json!({"type":"progress","data":{"pct":5}}))
        .await; // 3: not ui
    let pretty = "{\"type\":\"text-delta\",\n \"id\":\"t\",\"delta\":\"Hel\"}";
    let body = format!(r#"{{"type":"ui","data":{pretty}}}"#);
    assert_eq!(app.append_raw("chat", "", body).await.status(), 201); // 4
    app.append("chat", ui_events(&c[3..])).await; // 5, 6, 7
    assert_eq!(app.close_stream("chat", None).await.status(), 201); // 8

    let mut frames = ui_frames(&app, "chat", "", None).await;
    let mut want = vec![
        format!("id: 1\ndata: {}", c[0]),
        format!("id: 2\ndata: {}", c[1]),
        "id: 4\ndata: {\"type\":\"text-delta\",\ndata:  \"id\":\"t\",\"delta\":\"Hel\"}".to_owned(),
    ];
    want.extend((3..6).map(|i| format!("id: {}\ndata: {}", i + 2, c[i])));
    want.push("data: [DONE]".to_owned());
    for w in &want {
        assert_eq!(frames.next_content().await.as_ref(), Some(w));
    }
    assert_eq!(frames.next().await, None, "the response ends after [DONE]");
}

#[backend_test]
async fn a_stream_that_does_not_exist_is_204(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let res = ui_get(&app, "nothing-here", "", None).await;
    assert_eq!(res.status, 204);
    assert_eq!(res.text().await, "");
}

/// `?after=` and `Last-Event-ID` (which wins) resume exactly after a seq; at the head of a
/// closed stream only `[DONE]` remains.
#[backend_test]
async fn resumes_from_after_or_last_event_id(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let c = chunks();
    app.append("chat", ui_events(&c)).await; // 1..=6
    app.close_stream("chat", None).await; // 7

    let mut frames = ui_frames(&app, "chat", "?after=4", None).await;
    assert_eq!(
        frames.next_content().await.unwrap(),
        format!("id: 5\ndata: {}", c[4])
    );
    let mut frames = ui_frames(&app, "chat", "?after=1", Some("5")).await;
    assert_eq!(
        frames.next_content().await.unwrap(),
        format!("id: 6\ndata: {}", c[5])
    );
    assert_eq!(frames.next_content().await.unwrap(), "data: [DONE]");
    assert_eq!(frames.next().await, None);

    for (query, last) in [("?after=6", None), ("?after=7", None), ("", Some("7"))] {
        let mut frames = ui_frames(&app, "chat", query, last).await;
        assert_eq!(frames.next_content().await.unwrap(), "data: [DONE]");
        assert_eq!(frames.next().await, None);
    }

    let res = ui_get(&app, "chat", "?after=-1", None).await;
    assert_eq!(res.status, 400);
    assert!(res.text().await.contains("\"code\":\"invalid_cursor\""));
}

/// Opened while the answer is being written: what is there, then each chunk as it is
/// appended, then `[DONE]` when the stream is closed.
#[backend_test]
async fn follows_live_until_the_close(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let c = chunks();
    app.append("chat", ui_events(&c[..1])).await;
    let mut frames = ui_frames(&app, "chat", "", None).await;
    assert_eq!(
        frames.next_content().await.unwrap(),
        format!("id: 1\ndata: {}", c[0])
    );
    for (i, chunk) in c.iter().enumerate().skip(1) {
        app.append("chat", ui_events(std::slice::from_ref(chunk)))
            .await;
        assert_eq!(
            frames.next_content().await.unwrap(),
            format!("id: {}\ndata: {chunk}", i + 1)
        );
    }
    app.append("chat", json!({"type":"log","data":"not for the chat"}))
        .await;
    app.close_stream("chat", None).await;
    assert_eq!(frames.next_content().await.unwrap(), "data: [DONE]");
    assert_eq!(frames.next().await, None);
}

/// A past-the-head cursor is only commented (the AI SDK parser ignores comments); a deleted
/// stream ends the response with an `error` chunk, never a frame the parser cannot read.
#[backend_test]
async fn notices_are_comments_or_error_chunks(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("chat", ui_events(&chunks()[..2])).await;
    let mut frames = ui_frames(&app, "chat", "?after=9", None).await;
    let reset = frames.next_content().await.unwrap();
    assert!(
        reset.starts_with(": notice {\"notice\":\"reset\""),
        "{reset}"
    );

    let res = app.client.delete(app.url("/v1/streams/chat")).send().await;
    assert!(res.unwrap().status().is_success());
    let end = frames.next_content().await.unwrap();
    let data = end.strip_prefix("data: ").expect(&end);
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["type"], "error");
    assert!(
        v["errorText"]
            .as_str()
            .unwrap()
            .starts_with("tailcast deleted: "),
        "{v}"
    );
    assert_eq!(frames.next().await, None);
}

/// Chunks removed by retention: the client gets an `error` chunk saying so, then the rest.
#[backend_test]
async fn a_retention_gap_is_an_error_chunk_then_the_rest(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.retention_max_events = 3;
        c.retention_interval_ms = 20;
    })
    .await;
    let c = chunks();
    app.append("chat", ui_events(&c)).await; // 1..=6; 4..=6 kept
    wait_until("trimmed to the newest 3", || async {
        app.get_json("/v1/streams/chat").await["oldest_seq"] == 4
    })
    .await;
    let mut frames = ui_frames(&app, "chat", "", None).await;
    let gap = frames.next_content().await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(gap.strip_prefix("data: ").expect(&gap)).unwrap();
    assert_eq!(v["type"], "error");
    assert!(
        v["errorText"]
            .as_str()
            .unwrap()
            .starts_with("tailcast gap: events 1..3"),
        "{v}"
    );
    for (i, chunk) in c.iter().enumerate().skip(3) {
        assert_eq!(
            frames.next_content().await.unwrap(),
            format!("id: {}\ndata: {chunk}", i + 1)
        );
    }
    app.shutdown().await;
}
