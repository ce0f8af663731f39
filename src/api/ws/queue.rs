//! The queue between a WebSocket's loop and its writer task, bounded in messages and in bytes.
//!
//! A message counts against the byte bound from when it is queued until the writer has
//! flushed it to the socket, so what a client that stops reading costs here is at most the
//! bound plus one message (the loop stops reading its subscriptions while the queue is full;
//! they fall back to the log once it drains). Replies to the client's own ops go through
//! too, and count, but are never refused: only subscriptions wait for room.
//!
//! What travels is a batch of messages: the loop queues everything its subscriptions already
//! hold (a catch-up page, a burst) as one batch, and the writer feeds all of it to the socket
//! before one flush, so a catch-up goes out in large writes instead of one per event.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Message;
use tokio::sync::{mpsc, Notify};

struct Shared {
    /// Bytes queued or being written.
    bytes: AtomicUsize,
    max_bytes: usize,
    /// Messages queued or being written.
    messages: AtomicUsize,
    max_messages: usize,
    /// Signalled when the writer has flushed some bytes (one waiter: the loop).
    drained: Notify,
}

/// Messages that go to the socket together, in order.
pub type Batch = Vec<Message>;

/// The loop's end.
pub struct Outbox {
    tx: mpsc::Sender<Batch>,
    shared: Arc<Shared>,
}

/// The writer's end.
pub struct Inbox {
    rx: mpsc::Receiver<Batch>,
    shared: Arc<Shared>,
}

/// A queue with room for more subscription messages only while less than `messages`
/// messages and `max_bytes` bytes are queued or unflushed.
pub fn channel(messages: usize, max_bytes: usize) -> (Outbox, Inbox) {
    let max_messages = messages.max(1);
    let (tx, rx) = mpsc::channel(max_messages);
    let shared = Arc::new(Shared {
        bytes: AtomicUsize::new(0),
        max_bytes,
        messages: AtomicUsize::new(0),
        max_messages,
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
    /// Queues `msg`, waiting while the queue holds its most batches already; false if the
    /// writer is gone.
    pub async fn send(&self, msg: Message) -> bool {
        self.send_batch(vec![msg]).await
    }

    /// Queues `batch` to be written together (one flush), waiting while the queue holds its
    /// most batches already; false if the writer is gone.
    pub async fn send_batch(&self, batch: Batch) -> bool {
        let (n, bytes) = (batch.len(), batch.iter().map(weight).sum());
        self.add(n, bytes);
        if self.tx.send(batch).await.is_err() {
            self.sub(n, bytes);
            return false;
        }
        true
    }

    /// Queues `msg` if a slot is free now.
    pub fn try_send(&self, msg: Message) -> bool {
        let bytes = weight(&msg);
        self.add(1, bytes);
        if self.tx.try_send(vec![msg]).is_err() {
            self.sub(1, bytes);
            return false;
        }
        true
    }

    fn add(&self, messages: usize, bytes: usize) {
        self.shared.messages.fetch_add(messages, Ordering::AcqRel);
        self.shared.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub(&self, messages: usize, bytes: usize) {
        self.shared.messages.fetch_sub(messages, Ordering::AcqRel);
        self.shared.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// True if another subscription message may be queued now.
    pub fn has_room(&self) -> bool {
        self.room_besides(0, 0)
    }

    /// True if another subscription message may be queued after a batch of `messages`
    /// messages and `bytes` bytes that is being gathered (and not queued yet).
    pub fn room_besides(&self, messages: usize, bytes: usize) -> bool {
        let shared = &self.shared;
        self.tx.capacity() > 0
            && shared.messages.load(Ordering::Acquire) + messages < shared.max_messages
            && shared.bytes.load(Ordering::Acquire) + bytes < shared.max_bytes
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
    /// Everything queued, up to `limit` batches, waiting for at least one; 0 when the loop's
    /// end is gone and the queue is drained.
    pub async fn recv_many(&mut self, buf: &mut Vec<Batch>, limit: usize) -> usize {
        self.rx.recv_many(buf, limit).await
    }

    /// Records that `messages` messages of `bytes` bytes taken from the queue are now on the
    /// socket.
    pub fn written(&self, messages: usize, bytes: usize) {
        self.shared.messages.fetch_sub(messages, Ordering::AcqRel);
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
        inbox.written(1, weight(&buf[0][0]));
        let left = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the drain")
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn a_batch_is_one_item_and_counts_every_message() {
        let (out, mut inbox) = channel(4, 1000);
        assert!(out.room_besides(3, 0));
        assert!(
            !out.room_besides(4, 0),
            "a gathered batch counts against the bound"
        );
        assert!(!out.room_besides(0, 1000));
        let batch: Batch = (0..3)
            .map(|i| Message::Text(i.to_string().into()))
            .collect();
        assert!(out.send_batch(batch).await);
        assert!(out.has_room(), "3 of 4 messages");
        assert!(out.send(Message::Text("x".into())).await);
        assert!(!out.has_room(), "4 of 4 messages");
        let mut buf = Vec::new();
        assert_eq!(inbox.recv_many(&mut buf, 8).await, 2);
        assert_eq!(buf[0].len(), 3, "the batch arrives whole, in order");
        inbox.written(4, 4);
        assert!(out.has_room());
        assert_eq!(out.queued_bytes(), 0);
    }
}
