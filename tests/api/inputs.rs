//! Input requests end to end: an agent asks, a person answers over WebSocket or REST.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::backend::{ago, backend_test, on_db, TestDb};
use crate::helpers::{TestApp, WAIT};
use crate::ws_client::WsClient;

impl TestApp {
    /// `POST /v1/streams/{stream}/inputs`; returns status and body.
    pub async fn create_input(&self, stream: &str, body: Value) -> (StatusCode, Value) {
        let res = self
            .client
            .post(self.url(&format!("/v1/streams/{stream}/inputs")))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (res.status(), res.json().await.unwrap())
    }

    /// `POST /v1/streams/{stream}/inputs/{id}` with `{"data": data}`.
    pub async fn answer_input(&self, stream: &str, id: &str, data: Value) -> (StatusCode, Value) {
        let res = self
            .client
            .post(self.url(&format!("/v1/streams/{stream}/inputs/{id}")))
            .body(json!({ "data": data }).to_string())
            .send()
            .await
            .unwrap();
        (res.status(), res.json().await.unwrap())
    }
}

impl WsClient {
    /// Reads events until one of type `ty` (others are skipped); returns it.
    pub async fn event_of_type(&mut self, ty: &str) -> Value {
        loop {
            let ev = self.recv().await;
            if ev["op"] == "event" && ev["type"] == ty {
                return ev;
            }
        }
    }
}

/// Reads until the `input.expired` of `request_id`.
async fn expired(ws: &mut WsClient, request_id: &str) {
    loop {
        let ev = ws.event_of_type("input.expired").await;
        if ev["data"]["request_id"] == request_id {
            return;
        }
    }
}

fn count_of(events: &[Value], ty: &str, request_id: &str) -> usize {
    events
        .iter()
        .filter(|e| e["type"] == ty && e["data"]["request_id"] == request_id)
        .count()
}

#[backend_test]
async fn the_interactive_flow(db: TestDb) {
    let app = TestApp::spawn(db).await;
    // The agent follows its own stream for answers and stop signals.
    let mut agent = app.ws().await;
    agent
        .subscribe("run:1", json!({"types":["input.answered","control.stop"]}))
        .await;
    // The person's client follows everything.
    let mut person = app.ws().await;
    person.subscribe("run:1", json!({"after":0})).await;

    for t in ["Hel", "lo"] {
        agent
            .publish("run:1", json!([{"type":"token","data":{"text":t}}]))
            .await;
    }
    let schema =
        json!({"type":"object","properties":{"approve":{"type":"boolean"}},"required":["approve"]});
    let (status, created) = app
        .create_input(
            "run:1",
            json!({"request_id":"q1","prompt":"Deploy?","schema":schema,"timeout_ms":60000,"data":{"env":"prod"}}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["request_id"], "q1");
    assert_eq!(created["seq"], 3);
    assert!(created["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    for t in ["Hel", "lo"] {
        let ev = person.next_event().await;
        assert_eq!(ev["data"]["text"], t);
    }
    let asked = person.next_event().await;
    assert_eq!(asked["type"], "input.requested");
    assert_eq!(asked["seq"], 3);
    assert_eq!(asked["data"]["request_id"], "q1");
    assert_eq!(asked["data"]["prompt"], "Deploy?");
    assert_eq!(asked["data"]["schema"], schema);
    assert_eq!(asked["data"]["data"], json!({"env":"prod"}));
    assert_eq!(asked["data"]["expires_at"], created["expires_at"]);

    // Still to answer, for a client that joins late.
    let open = app.get_json("/v1/streams/run:1/inputs?status=open").await;
    assert_eq!(open["inputs"][0]["request_id"], "q1");
    assert_eq!(open["inputs"][0]["status"], "open");
    assert_eq!(open["inputs"][0]["prompt"], "Deploy?");

    let ack = person
        .request(json!({"op":"input","stream":"run:1","request_id":"q1","data":{"approve":true}}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["request_id"], "q1");
    assert_eq!(ack["first_seq"], 4);

    let answered = agent.next_event().await;
    assert_eq!(answered["type"], "input.answered");
    assert_eq!(
        answered["data"],
        json!({"request_id":"q1","data":{"approve":true}})
    );

    agent
        .publish("run:1", json!({"type":"result","data":"deployed"}))
        .await;
    let res = app.close_stream("run:1", None).await;
    assert_eq!(res.status(), 201);
    assert_eq!(person.event_of_type("result").await["data"], "deployed");
    person.event_of_type("stream.closed").await;
    let end = person.recv().await;
    assert_eq!(end["op"], "unsubscribed");
    assert_eq!(end["reason"], "closed");
    let closed = agent.next_event().await;
    assert_eq!(
        closed["type"], "stream.closed",
        "closing reaches every subscriber"
    );

    let st = app.get_json("/v1/streams/run:1/inputs/q1").await;
    assert_eq!(
        st,
        json!({"request_id":"q1","status":"answered","seq":3,"expires_at":created["expires_at"],"data":{"approve":true}})
    );
    let open = app.get_json("/v1/streams/run:1/inputs?status=open").await;
    assert_eq!(open["inputs"], json!([]));
}

#[backend_test]
async fn two_clients_racing_exactly_one_wins(db: TestDb) {
    let app = TestApp::spawn(db).await;
    for round in 0..5 {
        let id = format!("race{round}");
        let (status, _) = app
            .create_input("r", json!({"request_id":id,"prompt":"pick"}))
            .await;
        assert_eq!(status, 201);
        let mut a = app.ws().await;
        let mut b = app.ws().await;
        let msg =
            |who: &str| json!({"op":"input","stream":"r","request_id":id,"data":who,"ref":who});
        // Both answers are on the wire before either reply is read.
        a.send(msg("a")).await;
        b.send(msg("b")).await;
        let (ra, rb) = (a.recv().await, b.recv().await);
        let ops = [ra["op"].as_str().unwrap(), rb["op"].as_str().unwrap()];
        assert_eq!(
            ops.iter().filter(|o| **o == "ack").count(),
            1,
            "exactly one winner: {ra} {rb}"
        );
        let loser = if ra["op"] == "error" { &ra } else { &rb };
        assert_eq!(loser["code"], "input_already_answered");
        let winner = if ra["op"] == "ack" { "a" } else { "b" };
        let events = app.read_all("r").await;
        assert_eq!(count_of(&events, "input.answered", &id), 1);
        let ans = events
            .iter()
            .find(|e| e["type"] == "input.answered" && e["data"]["request_id"] == id)
            .unwrap();
        assert_eq!(ans["data"]["data"], winner);
    }

    // Many REST answers at once: one 201, the rest 409.
    app.create_input("r", json!({"request_id":"many","prompt":"?"}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let client = app.client.clone();
        let url = app.url("/v1/streams/r/inputs/many");
        tasks.push(tokio::spawn(async move {
            let res = client
                .post(url)
                .body(json!({ "data": i }).to_string())
                .send()
                .await
                .unwrap();
            res.status()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        11,
        "{statuses:?}"
    );
    assert_eq!(
        count_of(&app.read_all("r").await, "input.answered", "many"),
        1
    );
}

#[backend_test]
async fn an_unanswered_request_expires_once(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| c.input_sweep_ms = 20).await;
    let mut ws = app.ws().await;
    ws.subscribe("e", json!({"from":"now"})).await;
    let (status, created) = app
        .create_input(
            "e",
            json!({"request_id":"late","prompt":"?","timeout_ms":50}),
        )
        .await;
    assert_eq!(status, 201);
    let expired = ws.event_of_type("input.expired").await;
    assert_eq!(
        expired["data"],
        json!({"request_id":"late","expires_at":created["expires_at"]})
    );

    let (status, body) = app.answer_input("e", "late", json!(1)).await;
    assert_eq!(status, 410);
    assert_eq!(body["code"], "input_expired");
    let mut over_ws = ws
        .request(json!({"op":"input","stream":"e","request_id":"late","data":1}))
        .await;
    assert_eq!(over_ws["code"], "input_expired");
    let st = app.get_json("/v1/streams/e/inputs/late?wait=30").await;
    assert_eq!(st["status"], "expired");
    assert!(st.get("data").is_none());

    // A second request expires after many more sweeps; the first is still expired once.
    app.create_input(
        "e",
        json!({"request_id":"later","prompt":"?","timeout_ms":100}),
    )
    .await;
    over_ws = ws.event_of_type("input.expired").await;
    assert_eq!(over_ws["data"]["request_id"], "later");
    let events = app.read_all("e").await;
    assert_eq!(count_of(&events, "input.expired", "late"), 1);
    assert_eq!(count_of(&events, "input.expired", "later"), 1);
}

#[backend_test]
async fn expiry_is_exactly_once_with_two_nodes_and_across_a_restart(db: TestDb) {
    let fast = |c: &mut tailcast::Config| c.input_sweep_ms = 10;
    let node1 = TestApp::spawn_with(db.clone(), fast).await;
    let node2 = TestApp::spawn_with(db.clone(), fast).await;
    for i in 0..20 {
        let node = if i % 2 == 0 { &node1 } else { &node2 };
        let (status, _) = node
            .create_input(
                "n",
                json!({"request_id":format!("q{i}"),"prompt":"?","timeout_ms":30}),
            )
            .await;
        assert_eq!(status, 201);
    }
    // A last request expiring later: once its event exists, both nodes have swept many times
    // over the others.
    node1
        .create_input(
            "n",
            json!({"request_id":"last","prompt":"?","timeout_ms":300}),
        )
        .await;
    // Either node may expire it; each socket sees what its own node commits live.
    let mut ws1 = node1.ws().await;
    let mut ws2 = node2.ws().await;
    ws1.subscribe("n", json!({"after":0})).await;
    ws2.subscribe("n", json!({"after":0})).await;
    tokio::select! {
        _ = expired(&mut ws1, "last") => {}
        _ = expired(&mut ws2, "last") => {}
    }
    let events = node1.read_all("n").await;
    for i in 0..20 {
        assert_eq!(
            count_of(&events, "input.expired", &format!("q{i}")),
            1,
            "q{i}"
        );
    }
    assert_eq!(count_of(&events, "input.expired", "last"), 1);
    node1.shutdown().await;
    node2.shutdown().await;

    // Crashes between "resolved" and "appended": one node claimed a request and died before
    // appending; another appended but died before recording it. A restarted node repairs
    // both, and neither event appears twice.
    let node = TestApp::spawn(db.clone()).await;
    node.create_input(
        "c",
        json!({"request_id":"lost","prompt":"?","timeout_ms":600000}),
    )
    .await;
    node.create_input(
        "c",
        json!({"request_id":"dup","prompt":"?","timeout_ms":600000}),
    )
    .await;
    let (status, _) = node.answer_input("c", "dup", json!("yes")).await;
    assert_eq!(status, 201);
    node.shutdown().await;
    let hour_ago = ago(Duration::from_secs(3600));
    let lost = on_db!(db, |ex| sqlx::query(
        "update input_requests set status = 'expired', resolved_at = $1,
         announced = false where request_id = 'lost'",
    )
    .bind(hour_ago)
    .execute(ex)
    .await
    .unwrap()
    .rows_affected());
    let dup = on_db!(db, |ex| sqlx::query(
        "update input_requests set resolved_at = $1, announced = false
         where request_id = 'dup'",
    )
    .bind(hour_ago)
    .execute(ex)
    .await
    .unwrap()
    .rows_affected());
    assert_eq!((lost, dup), (1, 1));
    let restarted = TestApp::spawn_with(db.clone(), fast).await;
    let mut ws = restarted.ws().await;
    ws.subscribe("c", json!({"after":0})).await;
    let ev = ws.event_of_type("input.expired").await;
    assert_eq!(ev["data"]["request_id"], "lost");
    // Both rows end up announced; the log holds each resolution once.
    let announced = async {
        loop {
            let n: i64 = on_db!(db, |ex| sqlx::query_scalar(
                "select count(*) from input_requests
                 where request_id in ('lost', 'dup') and announced and resolution_seq is not null",
            )
            .fetch_one(ex)
            .await
            .unwrap());
            if n == 2 {
                break;
            }
            ws.request(json!({"op":"ping"})).await;
        }
    };
    tokio::time::timeout(WAIT, announced)
        .await
        .expect("repaired in time");
    let events = restarted.read_all("c").await;
    assert_eq!(count_of(&events, "input.expired", "lost"), 1);
    assert_eq!(count_of(&events, "input.answered", "dup"), 1);
}

#[backend_test]
async fn answers_are_checked_against_the_schema(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let schema = json!({"type":"object","properties":{"n":{"type":"integer","minimum":1}},"required":["n"],"additionalProperties":false});
    app.create_input(
        "s",
        json!({"request_id":"q","prompt":"How many?","schema":schema}),
    )
    .await;
    for bad in [
        json!({}),
        json!({"n":0}),
        json!({"n":"3"}),
        json!({"n":2,"x":1}),
        json!([1]),
    ] {
        let (status, body) = app.answer_input("s", "q", bad.clone()).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["code"], "input_invalid");
    }
    let mut ws = app.ws().await;
    let reply = ws
        .request(json!({"op":"input","stream":"s","request_id":"q","data":{"n":-1}}))
        .await;
    assert_eq!(reply["code"], "input_invalid");
    assert!(reply["message"].as_str().unwrap().contains("/n"), "{reply}");
    // A rejected answer does not use up the request.
    let reply = ws
        .request(json!({"op":"input","stream":"s","request_id":"q","data":{"n":3}}))
        .await;
    assert_eq!(reply["op"], "ack", "{reply}");
    assert_eq!(count_of(&app.read_all("s").await, "input.answered", "q"), 1);

    // A schema that is not one is refused when the request is made.
    for schema in [json!({"type":"nonsense"}), json!(5), json!({"minimum":"x"})] {
        let (status, body) = app
            .create_input("s", json!({"prompt":"?","schema":schema}))
            .await;
        assert_eq!(status, 400, "{schema}: {body}");
        assert_eq!(body["code"], "invalid_schema");
    }
}

#[backend_test]
async fn long_poll_wakes_on_the_answer(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.create_input("p", json!({"request_id":"q","prompt":"?"}))
        .await;
    let st = app.get_json("/v1/streams/p/inputs/q").await;
    assert_eq!(st["status"], "open");
    let client = app.client.clone();
    let url = app.url("/v1/streams/p/inputs/q?wait=60");
    let poll = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        (body, started.elapsed())
    });
    // The poll is parked on the request; answering wakes it at once (well before 60 s).
    let mut ws = app.ws().await;
    let ack = ws
        .request(json!({"op":"input","stream":"p","request_id":"q","data":"ok"}))
        .await;
    assert_eq!(ack["op"], "ack");
    let (body, elapsed) = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap();
    assert_eq!(body["status"], "answered");
    assert_eq!(body["data"], "ok");
    assert!(elapsed < std::time::Duration::from_secs(30), "{elapsed:?}");
}

#[backend_test]
async fn bad_input_requests_get_specific_errors(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let (status, body) = app.create_input("x", json!({"schema":true})).await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (400, Some("missing_field"))
    );
    let (status, body) = app
        .create_input("x", json!({"prompt":"?","colour":1}))
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (400, Some("invalid_event"))
    );
    let (status, body) = app
        .create_input("x", json!({"prompt":"?","timeout_ms":0}))
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (400, Some("invalid_field"))
    );
    let (status, body) = app
        .create_input("x", json!({"prompt":"?","request_id":""}))
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (400, Some("invalid_field"))
    );
    let (status, body) = app.create_input("x", json!({"prompt":"?"})).await;
    assert_eq!(status, 201);
    let id = body["request_id"].as_str().unwrap().to_owned();
    assert!(
        !id.is_empty(),
        "the server names requests that come unnamed"
    );
    let (status, body) = app
        .create_input("x", json!({"prompt":"?","request_id":id}))
        .await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (409, Some("input_exists"))
    );
    let (status, body) = app.answer_input("x", "nobody", json!(1)).await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (404, Some("input_not_found"))
    );
    let res = app
        .client
        .post(app.url(&format!("/v1/streams/x/inputs/{id}")))
        .body("{\"dta\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app.get("/v1/streams/x/inputs?status=maybe").await;
    assert_eq!(res.status(), 400);
    let res = app.get("/v1/streams/x/inputs/nobody").await;
    assert_eq!(res.status(), 404);

    // Closed streams take no requests.
    app.close_stream("x", None).await;
    let (status, body) = app.create_input("x", json!({"prompt":"?"})).await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (409, Some("stream_closed"))
    );
    // Nothing half-written: exactly one request (the first) exists.
    let all = app.get_json("/v1/streams/x/inputs").await;
    assert_eq!(all["inputs"].as_array().unwrap().len(), 1);
}

/// The sweeper's repair of interrupted creations: a request whose `input.requested` event is
/// in the log gets its seq back; one whose event never made it is removed once it is older
/// than the grace period.
#[backend_test]
async fn the_sweeper_repairs_interrupted_creations(db: TestDb) {
    let app = TestApp::spawn(db.clone()).await;
    for id in ["kept", "gone"] {
        let (status, _) = app
            .create_input(
                "u",
                json!({"request_id":id,"prompt":"?","timeout_ms":600000}),
            )
            .await;
        assert_eq!(status, 201);
    }
    let seq_of = |id: &'static str| {
        let db = db.clone();
        async move {
            on_db!(db, |ex| sqlx::query_scalar::<_, Option<i64>>(
                "select seq from input_requests where request_id = $1"
            )
            .bind(id)
            .fetch_optional(ex)
            .await
            .unwrap())
        }
    };
    let kept_seq = seq_of("kept").await.flatten().expect("a sequenced request");
    app.shutdown().await;
    // "kept" lost its seq after its event was appended; "gone" never got an event (its token
    // matches none) and was created long ago.
    let changed = on_db!(db, |ex| sqlx::query(
        "update input_requests set seq = null,
           token = case when request_id = 'gone' then 'never-appended' else token end,
           created_at = $1"
    )
    .bind(ago(Duration::from_secs(3600)))
    .execute(ex)
    .await
    .unwrap()
    .rows_affected());
    assert_eq!(changed, 2);
    let _node = TestApp::spawn_with(db.clone(), |c| c.input_sweep_ms = 10).await;
    let repaired = async {
        while seq_of("kept").await != Some(Some(kept_seq)) || seq_of("gone").await.is_some() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, repaired)
        .await
        .expect("repaired in time");
}
