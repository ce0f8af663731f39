//! Memory per idle connection: the server's VmRSS before and after opening N connections that
//! each follow a quiet stream of their own. The client side is raw sockets (a request written
//! by hand, the answer's first bytes read, nothing buffered), so 10k connections cost the load
//! generator almost nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::http::{source_ip, tcp};
use crate::report::Metrics;
use crate::server::Server;

/// Reads until `needle` has been seen (connection set-up answers are small).
pub async fn read_until(sock: &mut TcpStream, needle: &[u8]) -> Result<()> {
    let mut seen = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while memmem::find(&seen, needle).is_none() {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            bail!(
                "closed before {:?}: {}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&seen)
            );
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

pub async fn open_sse(addr: SocketAddr, i: usize, stream: &str) -> Result<TcpStream> {
    let mut sock = tcp(addr, source_ip(i)).await?;
    let req = format!(
        "GET /v1/streams/{stream}/sse?from=now HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\n\r\n",
        addr
    );
    sock.write_all(req.as_bytes()).await?;
    read_until(&mut sock, b"retry:").await?;
    Ok(sock)
}

pub async fn open_ws(addr: SocketAddr, i: usize, stream: &str) -> Result<TcpStream> {
    let mut sock = tcp(addr, source_ip(i)).await?;
    let req = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        addr
    );
    sock.write_all(req.as_bytes()).await?;
    read_until(&mut sock, b"\r\n\r\n").await?;
    let op = format!("{{\"op\":\"subscribe\",\"stream\":\"{stream}\",\"from\":\"now\"}}");
    sock.write_all(&masked_text_frame(op.as_bytes())).await?;
    read_until(&mut sock, b"\"subscribed\"").await?;
    Ok(sock)
}

/// A client text frame. Clients must mask; an all-zero key leaves the payload as it is.
pub fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Opens `n` idle connections over `via` ("sse" or "ws") and records KiB of server RSS each.
pub async fn idle(
    server: &Server,
    via: &str,
    n: usize,
    prefix: &str,
    m: &mut Metrics,
) -> Result<()> {
    // Let start-up allocations settle before the first reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib()?;
    let limit = Arc::new(Semaphore::new(128));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let limit = limit.clone();
        let stream = format!("{prefix}-{i}");
        let via = via.to_owned();
        let server_addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let _p = limit.acquire().await?;
            let sock = if via == "sse" {
                open_sse(server_addr, i, &stream).await
            } else {
                open_ws(server_addr, i, &stream).await
            };
            drop(_p);
            sock
        }));
    }
    let mut socks = Vec::with_capacity(n);
    for t in tasks {
        socks.push(t.await??);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.rss_kib()?;
    m.set(
        &format!("idle.{via}.kib_per_conn"),
        after.saturating_sub(before) as f64 / n as f64,
    );
    let kib = after.saturating_sub(before) as f64 / n as f64;
    if kib > 0.0 {
        // Subscribers one node holds per GiB of memory, at this cost each.
        m.set(
            &format!("idle.{via}.subs_per_gib"),
            (1u64 << 20) as f64 / kib,
        );
    }
    m.set(
        &format!("idle.{via}.rss_before_mib"),
        before as f64 / 1024.0,
    );
    m.set(&format!("idle.{via}.rss_after_mib"), after as f64 / 1024.0);
    m.set(&format!("idle.{via}.connects_s"), n as f64 / connect_secs);
    drop(socks);
    Ok(())
}
