//! WebSocket client helpers for the `/v1/ws` protocol of docs/websocket.md.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// Opens `/v1/ws` and reads the `welcome` op.
pub async fn connect(addr: SocketAddr, local: Option<IpAddr>) -> Result<Ws> {
    let tcp = crate::http::tcp(addr, local).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/v1/ws"), tcp)
        .await
        .context("websocket handshake")?;
    let hello = next_text(&mut ws).await?;
    if !hello.contains("\"welcome\"") {
        bail!("expected welcome, got {hello}");
    }
    Ok(ws)
}

/// The next text frame (pings are answered by tungstenite as it reads).
pub async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .context("no WebSocket frame within 60 s")?
            .context("WebSocket closed")??;
        match msg {
            Message::Text(t) => return Ok(t.to_string()),
            Message::Close(c) => bail!("WebSocket closed by server: {c:?}"),
            _ => {}
        }
    }
}

/// Subscribes after `after` and waits for `subscribed`.
pub async fn subscribe(ws: &mut Ws, stream: &str, after: u64) -> Result<()> {
    let op = format!("{{\"op\":\"subscribe\",\"stream\":\"{stream}\",\"after\":{after}}}");
    ws.send(Message::text(op)).await?;
    loop {
        let t = next_text(ws).await?;
        if t.contains("\"subscribed\"") {
            return Ok(());
        }
        if t.contains("\"error\"") {
            bail!("subscribe to {stream} failed: {t}");
        }
    }
}
