//! The TCP listener the server accepts on. Each connection gets `TCP_NODELAY` (events are
//! small and latency matters) and a write timeout: a client that accepts no bytes for that
//! long — a reader that stopped reading, a slowloris — is disconnected instead of pinning
//! buffers forever. It resumes by cursor when it comes back.
//!
//! It also caps the connections open from one client address: over the cap, a connection is
//! answered `429 too_many_connections` and closed before any request is read, so one client
//! holding many sockets (a flood, a slowloris) cannot starve the others. [`serve`] runs
//! hyper directly so that request headers must arrive within a deadline too (axum::serve
//! configures no timer, which leaves hyper's header-read timeout inert).
//!
//! A request head hyper itself refuses (more than [`MAX_HEADER_FIELDS`] header fields, a head
//! over its buffer, a URL of 64 KiB or more) never reaches the router: hyper answers it with
//! a bare 431 or 414 and closes. [`Conn`] replaces that answer with the documented
//! problem+json (`headers_too_large`, `uri_too_long`); it recognises it as a response written
//! while no request is with the router, which only hyper's own parse-error answer can be.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::Error;
use crate::metrics as m;

/// Header fields a request may carry (hyper's buffer for them; more get 431).
pub const MAX_HEADER_FIELDS: usize = 100;

pub struct TimeoutListener {
    inner: TcpListener,
    write_timeout: Duration,
    clients: Option<Arc<ClientLimit>>,
    rejections: Arc<HeadRejections>,
}

impl TimeoutListener {
    pub fn new(inner: TcpListener, write_timeout: Duration) -> Self {
        TimeoutListener {
            inner,
            write_timeout,
            clients: None,
            rejections: Arc::new(HeadRejections::new(8 << 10, 16 << 10)),
        }
    }

    /// The limits the problem+json answers to heads hyper refuses name (the configured
    /// `max_url_bytes` and `max_header_bytes`).
    pub fn with_head_limits(mut self, max_url_bytes: usize, max_header_bytes: usize) -> Self {
        self.rejections = Arc::new(HeadRejections::new(max_url_bytes, max_header_bytes));
        self
    }

    /// Caps the connections open at once from one IP address (0 = no cap).
    pub fn with_client_limit(mut self, max: usize) -> Self {
        self.clients = (max > 0).then(|| Arc::new(ClientLimit::new(max)));
        self
    }
}

/// A connection whose writes fail with `TimedOut` once blocked for the write timeout, holding
/// its client's connection slot until dropped.
pub struct Conn {
    io: Pin<Box<TimeoutStream<TcpStream>>>,
    _slot: Option<ClientSlot>,
    peer: SocketAddr,
    /// Counted once: the first timed-out write is what disconnects the client.
    timed_out: bool,
    /// What [`serve`] tells the connection about its requests.
    state: Arc<ConnState>,
    rejections: Arc<HeadRejections>,
    /// A problem+json answer standing in for hyper's bare one, still to be written.
    replacement: Option<(&'static [u8], usize)>,
}

/// Shared between a connection and the service [`serve`] runs on it.
#[derive(Default)]
struct ConnState {
    /// Set once a response switched the connection to WebSocket, so its slow-consumer
    /// disconnect is counted under `transport="ws"`: [`Conn`] is the only place counting it.
    upgraded: AtomicBool,
    /// Requests handed to the router whose response body has not been dropped yet.
    in_flight: AtomicUsize,
}

/// Decrements `in_flight` when a response body is dropped (written out, or abandoned).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The answers written in place of hyper's bare 431 and 414.
struct HeadRejections {
    headers_too_large: &'static [u8],
    uri_too_long: &'static [u8],
}

impl HeadRejections {
    fn new(max_url_bytes: usize, max_header_bytes: usize) -> Self {
        // Leaked once per listener (a process has one or two): the answers live as long.
        let leak = |s: String| -> &'static [u8] { Box::leak(s.into_bytes().into_boxed_slice()) };
        HeadRejections {
            headers_too_large: leak(problem_response(
                "431 Request Header Fields Too Large",
                Error::HeadersTooLarge {
                    limit: max_header_bytes,
                },
            )),
            uri_too_long: leak(problem_response(
                "414 URI Too Long",
                Error::UriTooLong {
                    limit: max_url_bytes,
                },
            )),
        }
    }
}

/// A whole HTTP/1.1 response carrying `error` as problem+json, after which the connection
/// closes.
fn problem_response(status_line: &str, error: Error) -> String {
    let problem = error.problem().to_string();
    let retry = match error {
        Error::TooManyConnections { .. } => "retry-after: 1\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: application/problem+json\r\n\
         {retry}connection: close\r\ncontent-length: {}\r\n\r\n{problem}",
        problem.len()
    )
}

impl Conn {
    /// Passes a write result through, reporting a write timeout once per connection. The
    /// reason cannot reach a client that stopped reading, so it goes to the log and to
    /// `tailcast_slow_consumer_disconnects_total`; the client sees its response end early,
    /// its cue to resume by cursor.
    fn observe<T>(&mut self, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &res {
            if e.kind() == io::ErrorKind::TimedOut && !self.timed_out {
                self.timed_out = true;
                let transport = match self.state.upgraded.load(Ordering::Relaxed) {
                    true => "ws",
                    false => "http",
                };
                tracing::warn!(peer = %self.peer, transport, "disconnecting a client that accepted no bytes for the write timeout (slow consumer)");
                metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS, "transport" => transport)
                    .increment(1);
            }
        }
        res
    }

    /// Whether `head` is hyper's own answer to a request head it could not parse: a response
    /// written while no request is with the router (and the connection is still HTTP).
    /// Returns what to write instead.
    fn replacement_for(&self, head: &[u8]) -> Option<&'static [u8]> {
        if self.state.in_flight.load(Ordering::Relaxed) > 0
            || self.state.upgraded.load(Ordering::Relaxed)
        {
            return None;
        }
        if head.starts_with(b"HTTP/1.1 431 ") {
            Some(self.rejections.headers_too_large)
        } else if head.starts_with(b"HTTP/1.1 414 ") {
            Some(self.rejections.uri_too_long)
        } else {
            None
        }
    }

    /// Writes what is left of a replacement answer; Ready(Ok) once it is all out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = self.replacement {
            if done == bytes.len() {
                break;
            }
            let n = match self.io.as_mut().poll_write(cx, &bytes[done..]) {
                Poll::Ready(Ok(n)) => n,
                other => return self.observe(other).map_ok(|_| ()),
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.replacement = Some((bytes, done + n));
        }
        Poll::Ready(Ok(()))
    }

    /// Takes over a write of hyper's bare parse-error answer: reports it written, and writes
    /// the replacement instead. hyper writes nothing after it but closes the connection.
    fn replace(
        &mut self,
        cx: &mut Context<'_>,
        head: &[u8],
        len: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacement.is_some() {
            // Whatever else hyper writes of its answer (it has none after the head) is dropped.
            return Some(self.poll_replacement(cx).map_ok(|()| len));
        }
        let bytes = self.replacement_for(head)?;
        self.replacement = Some((bytes, 0));
        Some(self.poll_replacement(cx).map_ok(|()| len))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(res) = self.replace(cx, buf, buf.len()) {
            return res;
        }
        let res = self.io.as_mut().poll_write(cx, buf);
        self.observe(res)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        let res = self.io.as_mut().poll_flush(cx);
        self.observe(res)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        self.io.as_mut().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let head = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        let len = bufs.iter().map(|b| b.len()).sum();
        if let Some(res) = self.replace(cx, head, len) {
            return res;
        }
        let res = self.io.as_mut().poll_write_vectored(cx, bufs);
        self.observe(res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Open connections per client IP address.
pub struct ClientLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection counted against its client's limit; released on drop.
pub struct ClientSlot {
    limit: Arc<ClientLimit>,
    ip: IpAddr,
}

impl ClientLimit {
    pub fn new(max: usize) -> Self {
        ClientLimit {
            max,
            open: Mutex::default(),
        }
    }

    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            limit: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over its client's limit with a 429 and closes it, without parsing
/// the request: the client is told why instead of seeing a bare reset.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let response = problem_response("429 Too Many Requests", Error::TooManyConnections { limit });
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // Wait for the request head (or a little of it): an HTTP client that gets a response
        // before it has sent its request treats it as a protocol error, not as the answer.
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while head.len() < 16 << 10 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await? {
                0 => break,
                n => head.extend_from_slice(&chunk[..n]),
            }
        }
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Drain what the client already sent: closing a socket with unread bytes makes the
        // kernel send a reset, which can destroy the response before the client reads it.
        let mut sink = [0u8; 4096];
        let mut left = 64 << 10;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
}

impl axum::serve::Listener for TimeoutListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let slot = match &self.clients {
                        None => None,
                        Some(limit) => match limit.acquire(addr.ip()) {
                            Some(slot) => Some(slot),
                            None => {
                                metrics::counter!(m::REFUSED_CONNECTIONS).increment(1);
                                tokio::spawn(refuse(stream, limit.max));
                                continue;
                            }
                        },
                    };
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    let conn = Conn {
                        io: Box::pin(stream),
                        _slot: slot,
                        peer: addr,
                        timed_out: false,
                        state: Arc::default(),
                        rejections: self.rejections.clone(),
                        replacement: None,
                    };
                    return (conn, addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    metrics::counter!(m::ACCEPT_ERRORS).increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The client's address, available to handlers as `ConnectInfo<PeerAddr>`.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TimeoutListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TimeoutListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// A request's future, as hyper holds it while the router answers.
type BoxedCall = Pin<
    Box<dyn Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send>,
>;

/// Serves `router` on every connection `listener` accepts until `stop` is cancelled, then
/// stops accepting, lets each connection finish its current response, and waits for them
/// (the caller bounds the wait). Request headers must arrive within `header_timeout` of the
/// connection opening or of the previous response, which bounds slowloris clients, silent
/// connections and idle keep-alive alike.
///
/// HTTP/1.1 only: cleartext HTTP/2 (which no browser speaks) has no handshake deadline in
/// hyper, so a peer sending half a preface would hold its connection forever. HTTP/2 belongs
/// on the TLS-terminating proxy in front.
pub async fn serve(
    mut listener: TimeoutListener,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    use axum::serve::Listener as _;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_headers(MAX_HEADER_FIELDS);
    let connections = TaskTracker::new();
    loop {
        let (io, addr) = tokio::select! {
            conn = listener.accept() => conn,
            _ = stop.cancelled() => break,
        };
        let (requests, responses) = (io.state.clone(), io.state.clone());
        let service = router
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                requests.in_flight.fetch_add(1, Ordering::Relaxed);
                req.extensions_mut().insert(ConnectInfo(PeerAddr(addr)));
                req.map(axum::body::Body::new)
            })
            .map_response(move |res: axum::response::Response| {
                // 101 is only ever the WebSocket handshake's answer here.
                if res.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
                    responses.upgraded.store(true, Ordering::Relaxed);
                }
                // In flight until hyper drops the body, i.e. has written all of it.
                let guard = InFlight(responses.clone());
                res.map(|body| {
                    axum::body::Body::new(http_body_util::BodyExt::map_frame(body, move |f| {
                        let _ = &guard;
                        f
                    }))
                })
            });
        // hyper keeps a slot the size of the service's future for the whole connection, and a
        // request is inline in it until called: boxed, an idle SSE connection does not carry
        // those ~300 bytes (one short-lived box per request instead).
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let call: BoxedCall = Box::pin(service.clone().oneshot(req));
            call
        });
        // Boxed before the task captures it: moved into the task and pinned there, it would
        // take its ~780 bytes twice in the task's state (the captured value and the local).
        let mut conn = Box::pin(
            builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            let res = tokio::select! {
                res = conn.as_mut() => res,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = res {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
