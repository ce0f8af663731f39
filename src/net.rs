//! The TCP listener the server accepts on. Each connection gets `TCP_NODELAY` (events are
//! small and latency matters) and a write timeout: a client that accepts no bytes for that
//! long — a reader that stopped reading, a slowloris — is disconnected instead of pinning
//! buffers forever. It resumes by cursor when it comes back.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

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
pub type Conn = Pin<Box<TimeoutStream<TcpStream>>>;

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
                    return (Box::pin(stream), addr);
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
