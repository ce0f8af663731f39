//! The TCP listener the server accepts on. Each connection gets `TCP_NODELAY` (events are
//! small and latency matters) and a write timeout: a client that accepts no bytes for that
//! long — a reader that stopped reading, a slowloris — is disconnected instead of pinning
//! buffers forever. It resumes by cursor when it comes back.
//!
//! The reason for such a disconnect cannot reach the client: the only way to it is the very
//! connection that stopped accepting bytes. So the reason goes to the server's log (with the
//! peer's address) and to `tailcast_slow_consumer_disconnects_total`; the client sees its
//! connection end without the response's normal end, which is its cue to resume by cursor.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

use crate::metrics as m;

pub struct TimeoutListener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl TimeoutListener {
    pub fn new(inner: TcpListener, write_timeout: Duration) -> Self {
        TimeoutListener {
            inner,
            write_timeout,
        }
    }
}

/// A connection whose writes fail with `TimedOut` once blocked for the write timeout.
pub struct Conn {
    inner: Pin<Box<TimeoutStream<TcpStream>>>,
    peer: SocketAddr,
    timed_out: bool,
}

impl Conn {
    /// Passes a write result through, reporting a write timeout once per connection.
    fn observe<T>(&mut self, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &res {
            if e.kind() == io::ErrorKind::TimedOut && !self.timed_out {
                self.timed_out = true;
                tracing::warn!(peer = %self.peer, "disconnecting a client that accepted no bytes for the write timeout (slow consumer)");
                metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS).increment(1);
            }
        }
        res
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = self.inner.as_mut().poll_write(cx, buf);
        self.observe(res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = self.inner.as_mut().poll_write_vectored(cx, bufs);
        self.observe(res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = self.inner.as_mut().poll_flush(cx);
        self.observe(res)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}

impl axum::serve::Listener for TimeoutListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    let conn = Conn {
                        inner: Box::pin(stream),
                        peer: addr,
                        timed_out: false,
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
