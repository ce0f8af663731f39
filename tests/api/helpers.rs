#![allow(dead_code)] // a helper library: not every test binary uses every helper
//! `TestApp`: a real tailcast server on a real socket, on the test's own database (either
//! backend: see `backend`), with helpers named after the API.

use std::net::SocketAddr;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use tailcast::{App, Config};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::backend::TestDb;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    /// The server's database; SQL run through it meets the server's own connections.
    pub db: TestDb,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(db: TestDb) -> TestApp {
        Self::spawn_with(db, |_| {}).await
    }

    /// Starts a server whose configuration `tweak` may change.
    pub async fn spawn_with(db: TestDb, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = Config::for_database(db.url());
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let app = App::with_db(config, db.db.clone()).await.expect("start");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));
        TestApp {
            addr,
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
            db,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Drives a server running elsewhere (a `NodeProcess`) with the same helpers; `db` is its
    /// database, shared with it (PostgreSQL: a SQLite file is locked by the process).
    /// `shutdown` leaves that server running.
    pub fn attach(addr: SocketAddr, db: TestDb) -> TestApp {
        TestApp {
            addr,
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
            db,
            stop: None,
            task: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Stops the server gracefully and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("shutdown in time")
                .expect("server task")
                .expect("server result");
        }
    }

    /// `POST /v1/streams/{stream}/events` with a raw body.
    pub async fn append_raw(
        &self,
        stream: &str,
        query: &str,
        body: impl Into<reqwest::Body>,
    ) -> Response {
        self.client
            .post(self.url(&format!("/v1/streams/{stream}/events{query}")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("append request")
    }

    /// Appends and expects 201; returns the result.
    pub async fn append(&self, stream: &str, body: Value) -> Value {
        let res = self.append_raw(stream, "", body.to_string()).await;
        let status = res.status();
        let text = res.text().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "append to {stream}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// `POST /v1/streams/{stream}/close`, with `body` as its JSON body if given.
    pub async fn close_stream(&self, stream: &str, body: Option<Value>) -> Response {
        let mut req = self
            .client
            .post(self.url(&format!("/v1/streams/{stream}/close")));
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.expect("POST close")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert_eq!(res.status(), StatusCode::OK, "GET {path}");
        res.json().await.unwrap()
    }

    /// Every event of a stream, read through the paged REST replay.
    pub async fn read_all(&self, stream: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .get_json(&format!(
                    "/v1/streams/{stream}/events?after={after}&limit=1000"
                ))
                .await;
            let events = page["events"].as_array().unwrap().clone();
            if events.is_empty() {
                return out;
            }
            after = page["next_after"].as_i64().unwrap();
            out.extend(events);
        }
    }

    /// Opens an SSE response; `query` starts with `?` or is empty.
    pub async fn sse(&self, stream: &str, query: &str, last_event_id: Option<&str>) -> Response {
        let mut req = self
            .client
            .get(self.url(&format!("/v1/streams/{stream}/sse{query}")))
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        req.send().await.expect("SSE request")
    }

    /// Opens an SSE response and parses it with a real SSE parser.
    pub async fn sse_events(
        &self,
        stream: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let res = self.sse(stream, query, last_event_id).await;
        assert_eq!(res.status(), StatusCode::OK);
        SseClient::new(res)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>;

/// A parsed SSE response.
pub struct SseClient {
    events: EventStream,
}

impl SseClient {
    pub fn new(res: Response) -> Self {
        let events = res
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()));
        SseClient {
            events: Box::pin(events),
        }
    }

    /// The next SSE event (keep-alive comments are not events), or None at the end.
    pub async fn next(&mut self) -> Option<Event> {
        tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("SSE event in time")
            .map(|r| r.expect("well-formed SSE"))
    }

    /// The next event's envelope, asserting it is an ordinary event whose id is its seq.
    pub async fn next_envelope(&mut self) -> Value {
        let ev = self.next().await.expect("an event");
        assert_eq!(ev.event, "message", "not an ordinary event: {ev:?}");
        let env: Value = serde_json::from_str(&ev.data).expect("envelope JSON");
        assert_eq!(ev.id, env["seq"].to_string());
        env
    }

    /// Reads envelopes until one with `seq == last` (inclusive), checking there is no gap.
    pub async fn envelopes_through(&mut self, first: i64, last: i64) -> Vec<Value> {
        let mut out = Vec::new();
        let mut expect = first;
        while expect <= last {
            let env = self.next_envelope().await;
            assert_eq!(env["seq"].as_i64().unwrap(), expect, "seq out of order");
            expect += 1;
            out.push(env);
        }
        out
    }
}

/// Waits (bounded by [`WAIT`]) until `cond` holds, re-checking it every few milliseconds: a
/// polling interval, not a synchronisation (the loop exits on the condition).
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `GET /v1/stats`.
pub async fn stats(app: &TestApp) -> Value {
    app.get_json("/v1/stats").await
}

/// A stream's head as `GET /v1/streams/{stream}` reports it (0 if it does not exist).
pub async fn head(app: &TestApp, stream: &str) -> i64 {
    let res = app.get(&format!("/v1/streams/{stream}")).await;
    if res.status() == 404 {
        return 0;
    }
    let v: Value = res.json().await.unwrap();
    v["head"].as_i64().unwrap()
}

/// Reads one HTTP/1.1 response with a `content-length` body from a raw socket: (status, body).
pub async fn read_response<R: tokio::io::AsyncRead + Unpin>(conn: &mut R) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    let status = head[9..12].parse().unwrap();
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into();
                    return (status, body);
                }
            }
            let n = conn.read(&mut chunk).await.expect("read the response");
            assert!(n > 0, "the connection closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("response in time")
}

/// Reads the tailcast binary's JSON log (`TAILCAST_LOG_FORMAT=json`) until its "listening"
/// line and returns the address it bound; panics if it exits first or takes longer than WAIT.
pub async fn listening_addr<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> String {
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "listening" {
                return v["fields"]["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("tailcast exited before listening");
    })
    .await
    .expect("tailcast listening in time")
}

/// Sends SIGTERM (a graceful stop) to a child `tailcast` and waits for it to exit 0.
pub async fn terminate(child: &mut tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits within the deadline")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
