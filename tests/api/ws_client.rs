#![allow(dead_code)] // a helper library: not every test uses every helper
//! A real WebSocket client (tokio-tungstenite) for tests, with helpers named after the ops.

use std::collections::VecDeque;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::{TestApp, WAIT};

pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The server's `welcome`.
    pub welcome: Value,
    /// WebSocket Ping frames seen so far (answered automatically by tungstenite).
    pub pings: usize,
    /// Messages read while waiting for a reply, handed out by `recv` first.
    backlog: VecDeque<Value>,
}

impl TestApp {
    /// Opens `/v1/ws` and reads the `welcome`.
    pub async fn ws(&self) -> WsClient {
        self.ws_path("/v1/ws").await
    }

    /// Opens a WebSocket on `path` (e.g. with `?token=`) and reads the `welcome`.
    pub async fn ws_path(&self, path: &str) -> WsClient {
        let url = format!("ws://{}{}", self.addr, path);
        let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("WebSocket handshake");
        WsClient::greeted(socket).await
    }
}

impl WsClient {
    /// Opens `/v1/ws` on the server at `addr` (a node of its own process) and reads the
    /// `welcome`.
    pub async fn connect(addr: std::net::SocketAddr) -> WsClient {
        let url = format!("ws://{addr}/v1/ws");
        let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("WebSocket handshake");
        WsClient::greeted(socket).await
    }
}

impl TestApp {
    /// Opens `/v1/ws` over a socket with a tiny receive buffer (a client that can hold little
    /// unread data), and reads the `welcome`.
    pub async fn ws_small_buffer(&self) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(self.addr).await.expect("connect");
        let url = format!("ws://{}/v1/ws", self.addr);
        let (socket, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)),
        )
        .await
        .expect("handshake in time")
        .expect("WebSocket handshake");
        WsClient::greeted(socket).await
    }
}

impl WsClient {
    /// Wraps a freshly opened WebSocket and reads the server's `welcome`, which comes first.
    async fn greeted(socket: WebSocketStream<MaybeTlsStream<TcpStream>>) -> WsClient {
        let mut client = WsClient {
            socket,
            welcome: Value::Null,
            pings: 0,
            backlog: VecDeque::new(),
        };
        let welcome = client.recv().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        client.welcome = welcome;
        client
    }
}

impl WsClient {
    /// Reads frames until the connection ends; true if it ended without a close frame
    /// (dropped by the server) rather than with one.
    pub async fn dropped_without_close(&mut self) -> bool {
        let read = async {
            loop {
                match self.socket.next().await {
                    None | Some(Err(_)) => return true,
                    Some(Ok(Message::Close(_))) => return false,
                    Some(Ok(_)) => {}
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("connection ends in time")
    }

    pub async fn send(&mut self, msg: Value) {
        self.send_text(&msg.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_message(Message::text(text)).await;
    }

    pub async fn send_message(&mut self, msg: Message) {
        tokio::time::timeout(WAIT, self.socket.send(msg))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// Whether no message read ahead (while waiting for a reply) is still to be taken.
    pub fn backlog_is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    /// The next text message as JSON (Ping/Pong frames are counted and skipped).
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.backlog.pop_front() {
            return v;
        }
        self.recv_fresh().await
    }

    async fn recv_fresh(&mut self) -> Value {
        match self.recv_message().await {
            Message::Text(t) => serde_json::from_str(t.as_str()).expect("server sends JSON"),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next message that is not a Ping or Pong.
    pub async fn recv_message(&mut self) -> Message {
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("message in time")
                .expect("connection open")
                .expect("well-formed frame");
            match msg {
                Message::Ping(_) => self.pings += 1,
                Message::Pong(_) => {}
                other => return other,
            }
        }
    }

    /// Reads until `n` Ping frames have arrived in all; any other message is a failure.
    pub async fn await_pings(&mut self, n: usize) {
        let read = async {
            while self.pings < n {
                let msg = self.socket.next().await.expect("open").expect("frame");
                match msg {
                    Message::Ping(_) => self.pings += 1,
                    other => panic!("unexpected message {other:?}"),
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("pings in time");
    }

    /// Reads until the server's close frame; returns it.
    pub async fn recv_close(&mut self) -> Option<CloseFrame> {
        loop {
            match self.recv_message().await {
                Message::Close(frame) => return frame,
                Message::Text(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Sends `msg` and returns the reply that echoes its `ref`; other messages read
    /// meanwhile (events of other subscriptions) stay queued for `recv`, in order.
    pub async fn request(&mut self, mut msg: Value) -> Value {
        let reference = format!("r{}", rand::random::<u32>());
        msg["ref"] = json!(reference);
        self.send(msg).await;
        loop {
            let reply = self.recv_fresh().await;
            if reply["ref"] == json!(reference) {
                return reply;
            }
            assert!(
                reply.get("ref").is_none(),
                "a reply to another request: {reply}"
            );
            self.backlog.push_back(reply);
        }
    }

    /// Subscribes and returns the `subscribed` reply.
    pub async fn subscribe(&mut self, stream: &str, params: Value) -> Value {
        let mut msg = json!({"op":"subscribe","stream":stream});
        if let Value::Object(p) = params {
            for (k, v) in p {
                msg[k] = v;
            }
        }
        let reply = self.request(msg).await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        reply
    }

    /// Publishes and returns the `ack`.
    pub async fn publish(&mut self, stream: &str, events: Value) -> Value {
        let reply = self
            .request(json!({"op":"publish","stream":stream,"events":events}))
            .await;
        assert_eq!(reply["op"], "ack", "{reply}");
        reply
    }

    /// The next `event` op.
    pub async fn next_event(&mut self) -> Value {
        let msg = self.recv().await;
        assert_eq!(msg["op"], "event", "expected an event: {msg}");
        msg
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
