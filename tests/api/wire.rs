#![allow(dead_code)] // helpers shared by the log and SSE tests; not every test uses each one
//! Clients for the log and SSE tests that need more control than `TestApp`'s: an HTTP/1.1
//! client (hyper) on a socket whose receive buffer we size, so that a reader that stops
//! reading really stops the server's writes; SSE parsed by a real parser and, where framing
//! matters, split into raw frames; bounded waits on conditions; database fixtures.

use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::backend::{on_db, TestDb};
use crate::helpers::{listening_addr, TestApp, WAIT};

/// Connects to `addr`; with `rcvbuf`, the socket's receive buffer is that small (and the
/// kernel stops growing it), so little can pile up on the client's side.
pub async fn connect(addr: SocketAddr, rcvbuf: Option<u32>) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    sock.connect(addr).await.expect("connect")
}

/// An HTTP response whose body is read only when asked.
pub struct Http {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    body: Option<Incoming>,
    conn: Option<ConnGuard>,
}

/// The task driving a client connection; dropping it closes the connection, as a client
/// that goes away does.
pub struct ConnGuard(JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET path` over a fresh connection, with extra headers.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    rcvbuf: Option<u32>,
) -> Http {
    let io = TokioIo::new(connect(addr, rcvbuf).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .expect("HTTP handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = tokio::time::timeout(WAIT, sender.send_request(req.body(Empty::new()).unwrap()))
        .await
        .expect("response head in time")
        .expect("response");
    let (parts, body) = res.into_parts();
    Http {
        status: parts.status,
        headers: parts.headers,
        body: Some(body),
        conn: Some(ConnGuard(conn)),
    }
}

impl Http {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |v| v.to_str().expect("ASCII header"))
    }

    /// The body as a stream of chunks (ending with an error if the connection breaks).
    pub fn chunks(mut self) -> ChunkStream {
        let body = self.body.take().expect("body taken once");
        let conn = self.conn.take();
        Box::pin(body.into_data_stream().map(move |r| {
            let _keep_open = &conn;
            r.map_err(|e| e.to_string())
        }))
    }

    /// The whole body as text (for short responses).
    pub async fn text(self) -> String {
        let mut chunks = self.chunks();
        let mut out = Vec::new();
        let read = async {
            while let Some(c) = chunks.next().await {
                out.extend_from_slice(&c.expect("body"));
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("body in time");
        String::from_utf8(out).expect("UTF-8 body")
    }

    /// Parses the body as SSE with a real parser.
    pub fn sse(self) -> Sse {
        Sse::new(self.chunks())
    }

    /// Splits the body into raw SSE frames.
    pub fn frames(self) -> Frames {
        Frames {
            chunks: self.chunks(),
            buf: Vec::new(),
        }
    }
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// Opens `GET /v1/streams/{stream}/sse{query}` and expects 200.
pub async fn open_sse(app: &TestApp, stream: &str, query: &str, last_id: Option<&str>) -> Http {
    open_sse_at(app.addr, stream, query, last_id).await
}

/// `open_sse` for tasks that hold only the server's address.
pub async fn open_sse_at(
    addr: SocketAddr,
    stream: &str,
    query: &str,
    last_id: Option<&str>,
) -> Http {
    let res = get_sse(addr, stream, query, last_id).await;
    assert_eq!(
        res.status,
        StatusCode::OK,
        "GET /v1/streams/{stream}/sse{query}"
    );
    res
}

/// `GET /v1/streams/{stream}/sse{query}` with an optional `Last-Event-ID`, whatever its status.
pub async fn get_sse(addr: SocketAddr, stream: &str, query: &str, last_id: Option<&str>) -> Http {
    let path = format!("/v1/streams/{stream}/sse{query}");
    let headers: Vec<(&str, &str)> = last_id
        .map(|id| ("last-event-id", id))
        .into_iter()
        .collect();
    get(addr, &path, &headers, None).await
}

/// What an SSE reader met next.
#[derive(Debug)]
pub enum Next {
    Event(Event),
    /// The response ended normally.
    End,
    /// The connection broke (or the body was malformed).
    Broken(String),
}

/// An SSE response read through `eventsource-stream`.
pub struct Sse {
    events: Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>,
}

impl Sse {
    pub fn new(chunks: ChunkStream) -> Self {
        let events = chunks.eventsource().map(|r| r.map_err(|e| e.to_string()));
        Sse {
            events: Box::pin(events),
        }
    }

    pub async fn next_item(&mut self) -> Next {
        match tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("SSE event in time")
        {
            Some(Ok(ev)) => Next::Event(ev),
            Some(Err(e)) => Next::Broken(e),
            None => Next::End,
        }
    }

    /// The next event; panics at the end of the response.
    pub async fn next(&mut self) -> Event {
        match self.next_item().await {
            Next::Event(ev) => ev,
            other => panic!("expected an SSE event, got {other:?}"),
        }
    }

    /// The next ordinary event's envelope, checking that its `id` is its seq.
    pub async fn envelope(&mut self) -> Value {
        let ev = self.next().await;
        assert_eq!(ev.event, "message", "not an ordinary event: {ev:?}");
        let env: Value = serde_json::from_str(&ev.data).expect("envelope JSON");
        assert_eq!(ev.id, env["seq"].to_string(), "id line is not the seq");
        env
    }

    /// Reads envelopes `first..=last` exactly, in order.
    pub async fn expect_seqs(&mut self, first: i64, last: i64) -> Vec<Value> {
        let mut out = Vec::new();
        for want in first..=last {
            let env = self.envelope().await;
            assert_eq!(env["seq"], want, "expected seq {want}, got {env}");
            out.push(env);
        }
        out
    }

    /// The next event must be a notice; returns its JSON.
    pub async fn notice(&mut self) -> Value {
        let ev = self.next().await;
        assert_eq!(ev.event, "notice", "expected a notice: {ev:?}");
        serde_json::from_str(&ev.data).expect("notice JSON")
    }

    /// The response must end now (no further event).
    pub async fn expect_end(&mut self) {
        match self.next_item().await {
            Next::End => {}
            other => panic!("expected the response to end, got {other:?}"),
        }
    }
}

/// Raw SSE frames: the text between blank lines, exactly as sent.
pub struct Frames {
    chunks: ChunkStream,
    buf: Vec<u8>,
}

impl Frames {
    /// The next frame (without its terminating blank line), or None at the end.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return Some(String::from_utf8(frame).expect("UTF-8 frame"));
            }
            let chunk = tokio::time::timeout(WAIT, self.chunks.next())
                .await
                .expect("SSE bytes in time");
            match chunk {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                Some(Err(e)) => panic!("SSE connection broke: {e}"),
                None => {
                    assert!(self.buf.is_empty(), "trailing partial frame {:?}", self.buf);
                    return None;
                }
            }
        }
    }

    /// The next frame that is not a keep-alive comment.
    pub async fn next_content(&mut self) -> Option<String> {
        loop {
            let f = self.next().await?;
            if f != ": keep-alive" {
                return Some(f);
            }
        }
    }
}

/// The raw envelopes of a stream as the REST replay returns them, byte for byte.
pub async fn raw_envelopes(app: &TestApp, stream: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Page {
        events: Vec<Box<serde_json::value::RawValue>>,
        next_after: i64,
    }
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let res = app
            .get(&format!(
                "/v1/streams/{stream}/events?after={after}&limit=1000"
            ))
            .await;
        assert_eq!(res.status(), 200);
        let page: Page = serde_json::from_str(&res.text().await.unwrap()).unwrap();
        if page.events.is_empty() {
            return out;
        }
        after = page.next_after;
        out.extend(page.events.into_iter().map(|e| e.get().to_owned()));
    }
}

/// Simulates retention: removes events `1..=upto` of `stream` as the retention task would.
pub async fn trim(db: &TestDb, stream: &str, upto: i64) {
    on_db!(db, |ex| {
        let id: i64 = sqlx::query_scalar("select id from streams where name = $1")
            .bind(stream)
            .fetch_one(ex)
            .await
            .unwrap();
        sqlx::query("delete from events where stream_id = $1 and seq <= $2")
            .bind(id)
            .bind(upto)
            .execute(ex)
            .await
            .unwrap();
        sqlx::query("update streams set trimmed_to = $2 where id = $1")
            .bind(id)
            .bind(upto)
            .execute(ex)
            .await
            .unwrap();
    })
}

/// The seq of an envelope.
pub fn seq(env: &Value) -> i64 {
    env["seq"].as_i64().expect("seq")
}

/// Peak resident memory of a process, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// Current resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The `tailcast` binary running as its own process on the test's database (so that its
/// memory can be measured alone, or so that it can be killed).
pub struct Server {
    pub addr: String,
    pub pid: u32,
    child: tokio::process::Child,
}

impl Server {
    /// Starts the binary on the database `url` (`ClosedDb::url`: this process must not
    /// hold a SQLite file the server is to open) and waits until it listens.
    pub async fn start(url: &str) -> Server {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailcast"))
            .env("DATABASE_URL", url)
            .env("TAILCAST_LISTEN", "127.0.0.1:0")
            .env("TAILCAST_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start tailcast");
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = listening_addr(&mut lines).await;
        // Keep draining its log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { addr, pid, child }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.addr.parse().unwrap()
    }

    /// Kills the process with SIGKILL (no graceful shutdown: nothing of it runs after this)
    /// and waits until it is gone.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}
