//! Presence: who follows each stream now, on every node. `GET …/presence`, the WebSocket
//! `presence` op and `join`/`leave` notices, the counts in `/v1/stats` and the stream list,
//! the grants, and a node killed with SIGKILL taking its followers with it within its lease.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::auth::{call, spawn_secured, token, ADMIN};
use crate::backend::{backend_test, TestDb};
use crate::helpers::{stats, wait_until, TestApp, WAIT};
use crate::node_process::NodeProcess;
use crate::nodes::spawn_node_with;
use crate::ws_client::WsClient;

impl TestApp {
    /// `GET /v1/streams/{stream}/presence`.
    pub async fn presence(&self, stream: &str) -> Value {
        self.get_json(&format!("/v1/streams/{stream}/presence"))
            .await
    }
}

/// The members' `(transport, label)`, sorted.
fn followers(presence: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let label = m["label"].as_str().unwrap_or("-").to_owned();
            (m["transport"].as_str().unwrap().to_owned(), label)
        })
        .collect();
    out.sort();
    out
}

async fn count(app: &TestApp, stream: &str) -> i64 {
    app.presence(stream).await["count"].as_i64().unwrap()
}

/// Waits until `app`'s LISTEN session is up: notices sent before it are not heard (its
/// watchers get a whole `presence` instead).
async fn listening(app: &TestApp) {
    wait_until("the LISTEN connection", || async {
        stats(app).await["listener"]["connected"] == json!(true)
    })
    .await;
}

/// The next `join` or `leave` (events and other ops are skipped).
async fn next_presence_notice(ws: &mut WsClient) -> Value {
    loop {
        let msg = ws.recv().await;
        if msg["op"] == "join" || msg["op"] == "leave" {
            return msg;
        }
    }
}

#[backend_test]
async fn followers_of_every_transport_are_present_until_they_go(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let node = stats(&app).await["node_id"].clone();
    assert_eq!(
        app.presence("run:1").await,
        json!({"stream":"run:1","count":0,"members":[]})
    );

    let sse = app.sse("run:1", "?label=dashboard", None).await;
    assert_eq!(sse.status(), StatusCode::OK);
    let mut ws = app.ws_path("/v1/ws?label=tab-7").await;
    ws.subscribe("run:1", json!({})).await;
    ws.subscribe("run:2", json!({"label":"other"})).await;
    let presence = app.presence("run:1").await;
    assert_eq!(presence["count"], 2, "{presence}");
    assert_eq!(
        followers(&presence),
        vec![
            ("sse".into(), "dashboard".into()),
            ("ws".into(), "tab-7".into())
        ]
    );
    for m in presence["members"].as_array().unwrap() {
        assert_eq!(m["node"], node);
        assert!(
            m.get("sub").is_none(),
            "anonymous followers have no sub: {m}"
        );
        assert!(m["since"].as_str().unwrap().ends_with('Z'));
        assert!(!m["connection_id"].as_str().unwrap().is_empty());
    }
    let ws_member = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["transport"] == "ws")
        .unwrap();
    assert_eq!(ws_member["connection_id"], ws.welcome["connection_id"]);
    assert_eq!(
        followers(&app.presence("run:2").await),
        vec![("ws".into(), "other".into())]
    );

    // The same over the WebSocket, and as counts in the stats and the stream list.
    let reply = ws.request(json!({"op":"presence","stream":"run:1"})).await;
    assert_eq!(reply["op"], "presence");
    assert_eq!(reply["count"], 2);
    assert_eq!(followers(&reply), followers(&presence));
    let limited = ws
        .request(json!({"op":"presence","stream":"run:1","limit":1}))
        .await;
    assert_eq!(
        (
            limited["count"].as_i64(),
            limited["members"].as_array().unwrap().len()
        ),
        (Some(2), 1)
    );
    let s = stats(&app).await;
    assert_eq!(s["presence"]["followers"], 3);
    assert_eq!(s["presence"]["local_followers"], 3);
    app.append("run:1", json!({"data":1})).await;
    app.append("quiet", json!({"data":1})).await;
    let list = app.get_json("/v1/streams").await;
    let subscribers: Vec<(&str, i64)> = list["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["subscribers"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(subscribers, vec![("quiet", 0), ("run:1", 2)]);

    // Leaving: a closed SSE response, an unsubscribe, a closed socket.
    drop(sse);
    wait_until("the SSE follower to leave", || async {
        count(&app, "run:1").await == 1
    })
    .await;
    let bye = ws
        .request(json!({"op":"unsubscribe","stream":"run:1"}))
        .await;
    assert_eq!(bye["op"], "unsubscribed");
    assert_eq!(count(&app, "run:1").await, 0);
    ws.close().await;
    wait_until("the WebSocket follower to leave", || async {
        count(&app, "run:2").await == 0
    })
    .await;
    assert_eq!(stats(&app).await["presence"]["local_followers"], 0);
}

#[backend_test]
async fn watchers_hear_joins_and_leaves(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut watcher = app.ws().await;
    watcher.subscribe("room", json!({"presence":true})).await;
    let own = next_presence_notice(&mut watcher).await;
    assert_eq!(own["op"], "join");
    assert_eq!(own["stream"], "room");
    assert_eq!(
        own["member"]["connection_id"],
        watcher.welcome["connection_id"]
    );

    let mut guest = app.ws_path("/v1/ws?label=guest").await;
    guest.subscribe("room", json!({})).await;
    let join = next_presence_notice(&mut watcher).await;
    assert_eq!(
        (&join["op"], &join["member"]["label"]),
        (&json!("join"), &json!("guest"))
    );
    assert_eq!(join["member"]["transport"], "ws");
    // A follower that does not watch hears nothing of it.
    let sse = app.sse("room", "", None).await;
    let join = next_presence_notice(&mut watcher).await;
    assert_eq!(join["member"]["transport"], "sse");
    guest.close().await;
    let leave = next_presence_notice(&mut watcher).await;
    assert_eq!(
        (&leave["op"], &leave["member"]["label"]),
        (&json!("leave"), &json!("guest"))
    );
    drop(sse);
    let leave = next_presence_notice(&mut watcher).await;
    assert_eq!(
        (&leave["op"], &leave["member"]["transport"]),
        (&json!("leave"), &json!("sse"))
    );
    // Events still arrive in between.
    app.append("room", json!({"data":"hello"})).await;
    assert_eq!(watcher.next_event().await["data"], "hello");
}

#[backend_test]
async fn presence_needs_the_read_grant_and_shows_the_followers_sub(db: TestDb) {
    let app = spawn_secured(db).await;
    let reader = token(json!({"sub":"rita","read":["team:*"]}));
    let outsider = token(json!({"sub":"otto","read":["other:*"],"write":["team:*"]}));
    let mut ws = app.ws_path(&format!("/v1/ws?token={reader}")).await;
    ws.subscribe("team:1", json!({})).await;

    let res = call(
        &app,
        Method::GET,
        "/v1/streams/team:1/presence",
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["count"], 1);
    assert_eq!(body["members"][0]["sub"], "rita");
    for (bearer, status) in [
        (Some(outsider.as_str()), StatusCode::FORBIDDEN),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let res = call(
            &app,
            Method::GET,
            "/v1/streams/team:1/presence",
            bearer,
            None,
        )
        .await;
        assert_eq!(res.status(), status);
        let text = res.text().await.unwrap();
        assert!(
            !text.contains("rita"),
            "a refused read leaked a follower: {text}"
        );
    }
    let mut other = app.ws_path(&format!("/v1/ws?token={outsider}")).await;
    let refused = other
        .request(json!({"op":"presence","stream":"team:1"}))
        .await;
    assert_eq!(
        (&refused["op"], &refused["code"]),
        (&json!("error"), &json!("forbidden"))
    );
    let refused = other
        .request(json!({"op":"subscribe","stream":"team:1","presence":true}))
        .await;
    assert_eq!(refused["code"], "forbidden");
    // Counts in the stats and the list are the admin's.
    let res = call(&app, Method::GET, "/v1/stats", Some(ADMIN), None).await;
    let stats: Value = res.json().await.unwrap();
    assert_eq!(stats["presence"]["followers"], 1);
    // A bad label is refused before anything is followed.
    let res = app
        .sse("team:1", &format!("?token={reader}&label="), None)
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
}

// Several nodes on one database: PostgreSQL only.
#[backend_test(postgres)]
async fn two_nodes_report_the_same_presence_and_hear_each_others_joins(db: TestDb) {
    let lease = |c: &mut tailcast::Config| c.presence_lease_ms = 2000;
    let a = spawn_node_with(&db, "a", lease).await;
    let b = spawn_node_with(&db, "b", lease).await;
    listening(&a).await;
    listening(&b).await;
    let mut watcher = a.ws().await;
    watcher.subscribe("run:9", json!({"presence":true})).await;
    assert_eq!(next_presence_notice(&mut watcher).await["op"], "join");

    let on_a = a.sse("run:9", "?label=on-a", None).await;
    let mut on_b = b.ws_path("/v1/ws?label=on-b").await;
    on_b.subscribe("run:9", json!({})).await;
    let same = || async {
        let (pa, pb) = (a.presence("run:9").await, b.presence("run:9").await);
        pa["count"] == 3 && pa == pb
    };
    wait_until("both nodes to report the same three followers", same).await;
    let presence = a.presence("run:9").await;
    let nodes: Vec<&str> = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.iter().filter(|n| **n == "a").count(), 2, "{presence}");
    assert_eq!(nodes.iter().filter(|n| **n == "b").count(), 1, "{presence}");
    // Node b's follower reached the watcher on node a through the database.
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let n = next_presence_notice(&mut watcher).await;
        assert_eq!(n["op"], "join");
        heard.push(n["member"]["label"].as_str().unwrap().to_owned());
    }
    heard.sort();
    assert_eq!(heard, vec!["on-a", "on-b"]);
    assert_eq!(stats(&b).await["presence"]["followers"], 3);

    on_b.close().await;
    let leave = next_presence_notice(&mut watcher).await;
    assert_eq!(
        (&leave["op"], &leave["member"]["node"]),
        (&json!("leave"), &json!("b"))
    );
    wait_until("both nodes to see b's follower gone", || async {
        let (pa, pb) = (a.presence("run:9").await, b.presence("run:9").await);
        pa["count"] == 2 && pa == pb
    })
    .await;
    drop(on_a);
    wait_until("both nodes to see a's follower gone", || async {
        count(&a, "run:9").await == 1 && count(&b, "run:9").await == 1
    })
    .await;
    // A clean shutdown takes a node's followers along at once, not at its lease's end.
    a.shutdown().await;
    wait_until("a's watcher gone after a's shutdown", || async {
        count(&b, "run:9").await == 0
    })
    .await;
    b.shutdown().await;
}

#[backend_test(postgres)]
async fn a_killed_node_takes_its_followers_with_it_within_its_lease(db: TestDb) {
    const LEASE_MS: u64 = 2000;
    db.db.migrate().await.unwrap();
    let survivor = spawn_node_with(&db, "survivor", |c| c.presence_lease_ms = LEASE_MS).await;
    listening(&survivor).await;
    let lease = LEASE_MS.to_string();
    let doomed = NodeProcess::start(
        db.url(),
        &[
            ("TAILCAST_NODE_ID", "doomed"),
            ("TAILCAST_PRESENCE_LEASE_MS", lease.as_str()),
        ],
    )
    .await;
    let mut watcher = survivor.ws().await;
    watcher.subscribe("job", json!({"presence":true})).await;
    assert_eq!(next_presence_notice(&mut watcher).await["op"], "join");
    // Two followers on the doomed node.
    let client = reqwest::Client::new();
    let mut followers = Vec::new();
    for i in 0..2 {
        let res = client
            .get(doomed.url(&format!("/v1/streams/job/sse?label=f{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        followers.push(res);
    }
    wait_until(
        "the survivor to see the doomed node's followers",
        || async { count(&survivor, "job").await == 3 },
    )
    .await;
    for _ in 0..2 {
        let n = next_presence_notice(&mut watcher).await;
        assert_eq!(
            (&n["op"], &n["member"]["node"]),
            (&json!("join"), &json!("doomed"))
        );
    }

    let killed = std::process::Command::new("kill")
        .args(["-KILL", &doomed.pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let at = Instant::now();
    wait_until("the dead node's followers to vanish", || async {
        count(&survivor, "job").await == 1
    })
    .await;
    let gone = at.elapsed();
    // Its last renewal came at most one lease before the kill; reads ignore it from then on.
    assert!(
        gone <= Duration::from_millis(LEASE_MS) + Duration::from_secs(1),
        "followers of a dead node lingered {gone:?} (lease {LEASE_MS} ms)"
    );
    // The reaper tells the watchers they left, within a lease and a quarter.
    let mut left = Vec::new();
    while left.len() < 2 {
        let n = tokio::time::timeout(WAIT, next_presence_notice(&mut watcher))
            .await
            .expect("leave notices in time");
        assert_eq!(
            (&n["op"], &n["member"]["node"]),
            (&json!("leave"), &json!("doomed"))
        );
        left.push(n["member"]["label"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, vec!["f0", "f1"]);
    assert!(at.elapsed() < Duration::from_secs(15), "{:?}", at.elapsed());
    let rows: i64 = sqlx::query_scalar("select count(*) from presence where node = 'doomed'")
        .fetch_one(db.pg())
        .await
        .unwrap();
    assert_eq!(rows, 0, "the dead node's rows were reaped");
    drop(followers);
    survivor.shutdown().await;
}

/// A reconnect storm: a thousand followers join (and then leave) at once; they cost the
/// database a few batched writes, not one per follower.
#[backend_test(postgres)]
async fn a_storm_of_followers_costs_a_few_writes(db: TestDb) {
    const SOCKETS: usize = 4;
    const PER_SOCKET: usize = 250;
    const FOLLOWERS: usize = SOCKETS * PER_SOCKET;
    let a = spawn_node_with(&db, "a", |_| {}).await;
    let b = spawn_node_with(&db, "b", |_| {}).await;
    let writes = |s: &Value| s["presence"]["writes"].as_u64().unwrap();
    let before = writes(&stats(&a).await);
    let mut sockets = Vec::new();
    for s in 0..SOCKETS {
        sockets.push(a.ws_path(&format!("/v1/ws?label=socket-{s}")).await);
    }
    let started = Instant::now();
    // Every subscribe sent at once (pipelined), then every reply read.
    for (s, ws) in sockets.iter_mut().enumerate() {
        for i in 0..PER_SOCKET {
            ws.send(json!({"op":"subscribe","stream":format!("storm:{s}:{i}"),"from":"now"}))
                .await;
        }
    }
    for ws in &mut sockets {
        for _ in 0..PER_SOCKET {
            assert_eq!(ws.recv().await["op"], "subscribed");
        }
    }
    wait_until("node b to see every follower of node a", || async {
        stats(&b).await["presence"]["followers"] == json!(FOLLOWERS)
    })
    .await;
    let joined = started.elapsed();
    let join_writes = writes(&stats(&a).await) - before;
    for ws in sockets {
        ws.close().await;
    }
    wait_until("node b to see them all gone", || async {
        stats(&b).await["presence"]["followers"] == json!(0)
    })
    .await;
    let total = writes(&stats(&a).await) - before;
    eprintln!(
        "{FOLLOWERS} followers joined in {joined:?} with {join_writes} presence writes; \
         joining and leaving took {total}"
    );
    assert!(
        total <= (FOLLOWERS / 20) as u64,
        "{total} presence writes for {FOLLOWERS} joins and as many leaves"
    );
}

#[backend_test]
async fn the_ai_sdk_view_and_durable_streams_sse_are_followers_too(db: TestDb) {
    let app = TestApp::spawn(db).await;
    app.append("chat", json!({"type":"ui","data":{"type":"start"}}))
        .await;
    let ui = app
        .get("/v1/streams/chat/ui-message-stream?label=assistant-ui")
        .await;
    assert_eq!(ui.status(), StatusCode::OK);
    let created = app
        .client
        .put(app.url("/v1/stream/chat-ds"))
        .header("content-type", "application/json")
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    let ds = app.get("/v1/stream/chat-ds?offset=-1&live=sse").await;
    assert_eq!(ds.status(), StatusCode::OK);
    assert_eq!(
        followers(&app.presence("chat").await),
        vec![("ui".into(), "assistant-ui".into())]
    );
    assert_eq!(
        followers(&app.presence("chat-ds").await),
        vec![("durable".into(), "-".into())]
    );
    drop((ui, ds));
    wait_until("both followers gone", || async {
        count(&app, "chat").await == 0 && count(&app, "chat-ds").await == 0
    })
    .await;
}
