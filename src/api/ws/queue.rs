//! The queue between a WebSocket's loop and its writer task, bounded in messages and in bytes.
//!
//! A message counts against the byte bound from when it is queued until the writer has
//! flushed it to the socket, so what a client that stops reading costs here is at most the
//! bound plus one message (the loop stops reading its subscriptions while the queue is full;
//! they fall back to the log once it drains). Replies to the client's own ops go through
//! too, and count, but are never refused: only subscriptions wait for room.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Message;
use tokio::sync::{mpsc, Notify};

struct Shared {
    /// Bytes queued or being written.
    bytes: AtomicUsize,
    max_bytes: usize,
    /// Signalled when the writer has flushed some bytes (one waiter: the loop).
    drained: Notify,
}

/// The loop's end.
pub struct Outbox {
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

/// The writer's end.
pub struct Inbox {
    rx: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
}

/// A queue of at most `messages` messages, with room for more only while less than
/// `max_bytes` is queued or unflushed.
pub fn channel(messages: usize, max_bytes: usize) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let shared = Arc::new(Shared {
        bytes: AtomicUsize::new(0),
        max_bytes,
        drained: Notify::new(),
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        Inbox { rx, shared },
    )
}

/// What a message weighs against the byte bound.
pub fn weight(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) => 0,
    }
}

impl Outbox {
    /// Queues `msg`, waiting while the queue holds `messages` already; false if the writer is
    /// gone.
    pub async fn send(&self, msg: Message) -> bool {
        let n = weight(&msg);
        self.shared.bytes.fetch_add(n, Ordering::AcqRel);
        if self.tx.send(msg).await.is_err() {
            self.shared.bytes.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Queues `msg` if a slot is free now.
    pub fn try_send(&self, msg: Message) -> bool {
        let n = weight(&msg);
        self.shared.bytes.fetch_add(n, Ordering::AcqRel);
        if self.tx.try_send(msg).is_err() {
            self.shared.bytes.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// True if another subscription message may be queued now.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0 && self.shared.bytes.load(Ordering::Acquire) < self.shared.max_bytes
    }

    /// Bytes queued or being written.
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }

    /// Waits until [`Outbox::has_room`] (or the writer is gone). Cancel-safe.
    pub async fn room(&self) {
        while !self.has_room() {
            if self.tx.capacity() == 0 {
                // The permit is dropped at once: it only says a slot came free.
                if self.tx.reserve().await.is_err() {
                    return;
                }
            } else {
                // `notify_one` keeps a permit, so a drain between the check and here counts.
                self.shared.drained.notified().await;
            }
        }
    }

    /// Resolves when the writer is gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

impl Inbox {
    /// Everything queued, up to `limit` messages, waiting for at least one; 0 when the loop's
    /// end is gone and the queue is drained.
    pub async fn recv_many(&mut self, buf: &mut Vec<Message>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }

    /// Records that `bytes` of messages taken from the queue are now on the socket.
    pub fn written(&self, bytes: usize) {
        self.shared.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.shared.drained.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_is_bounded_by_bytes_until_the_writer_flushes() {
        let (out, mut inbox) = channel(100, 10);
        assert!(out.has_room());
        assert!(out.send(Message::Text("0123456789ab".into())).await);
        assert!(!out.has_room(), "12 bytes queued of 10");
        let mut buf = Vec::new();
        assert_eq!(inbox.recv_many(&mut buf, 8).await, 1);
        assert!(!out.has_room(), "taken but not yet written: still counted");
        let waiter = tokio::spawn(async move {
            out.room().await;
            out.queued_bytes()
        });
        inbox.written(weight(&buf[0]));
        let left = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the drain")
            .unwrap();
        assert_eq!(left, 0);
    }
}
