//! The per-process live hub: one broadcast channel per stream that has subscribers here,
//! created with the first subscriber and dropped with the last.
//!
//! The hub is only an accelerator. A subscriber that lags (its channel overflowed) or sees a
//! gap (events committed elsewhere that this node has not fanned out yet) re-reads the log;
//! nothing correct depends on the hub delivering everything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::frame::Frame;
use super::ring;
use crate::log::{CommitSink, Committed, StreamName};
use crate::metrics as m;

/// What a stream's channel carries.
#[derive(Debug)]
pub enum LiveMsg {
    /// Newly committed events, in seq order.
    Events { events: Vec<Arc<Frame>>, head: i64 },
    /// The stream's head moved to `head` but the events were not read here; subscribers
    /// behind it read them from the log.
    Advanced { head: i64 },
    /// The stream was deleted.
    Deleted,
}

struct Channel {
    tx: ring::Sender<Arc<LiveMsg>>,
    /// Highest seq published here (to skip redundant reads after notifications).
    published: i64,
}

pub struct Hub {
    streams: Mutex<HashMap<StreamName, Channel>>,
    capacity: usize,
    /// Bytes of frames one stream's channel holds for its slowest subscriber.
    max_bytes: usize,
    subscriptions: AtomicUsize,
    /// Times a subscriber's channel overflowed and it went back to the log (this node).
    lag_fallbacks: AtomicU64,
}

/// A subscriber's end of a stream's channel. Dropping it unregisters the subscriber.
pub struct LiveReceiver {
    pub(crate) rx: ring::Receiver<Arc<LiveMsg>>,
    guard: Guard,
}

struct Guard {
    hub: Arc<Hub>,
    stream: StreamName,
}

impl Hub {
    /// A hub whose per-stream channels hold at most `capacity` commit batches and
    /// `max_bytes` bytes of encoded events for subscribers that have not taken them.
    pub fn new(capacity: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Hub {
            streams: Mutex::new(HashMap::new()),
            capacity: capacity.max(2),
            max_bytes,
            subscriptions: AtomicUsize::new(0),
            lag_fallbacks: AtomicU64::new(0),
        })
    }

    /// Registers a subscriber. Everything published after this returns reaches it.
    pub fn subscribe(self: &Arc<Self>, stream: &StreamName) -> LiveReceiver {
        let mut map = self.streams.lock().expect("hub lock");
        let rx = match map.get(stream) {
            Some(ch) => ch.tx.subscribe(),
            None => {
                let (tx, rx) = ring::bounded(self.capacity, self.max_bytes);
                map.insert(stream.clone(), Channel { tx, published: 0 });
                metrics::gauge!(m::LIVE_STREAMS).set(map.len() as f64);
                rx
            }
        };
        drop(map);
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::SUBSCRIPTIONS).increment(1.0);
        LiveReceiver {
            rx,
            guard: Guard {
                hub: self.clone(),
                stream: stream.clone(),
            },
        }
    }

    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Records that a subscriber's live buffer overflowed and it is re-reading the log.
    pub fn note_lag_fallback(&self) {
        self.lag_fallbacks.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::LAG_FALLBACKS).increment(1);
    }

    pub fn lag_fallbacks(&self) -> u64 {
        self.lag_fallbacks.load(Ordering::Relaxed)
    }

    pub fn live_streams(&self) -> usize {
        self.streams.lock().expect("hub lock").len()
    }

    /// Names of the streams with subscribers on this node.
    pub fn stream_names(&self) -> Vec<StreamName> {
        self.streams
            .lock()
            .expect("hub lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Highest seq published for `stream` here, if it has subscribers.
    pub fn published(&self, stream: &StreamName) -> Option<i64> {
        self.streams
            .lock()
            .expect("hub lock")
            .get(stream)
            .map(|c| c.published)
    }

    /// Publishes events read from the log (or committed here) to the stream's subscribers.
    pub fn publish(&self, stream: &StreamName, events: Vec<Arc<Frame>>, head: i64) {
        let mut map = self.streams.lock().expect("hub lock");
        if let Some(ch) = map.get_mut(stream) {
            ch.published = ch.published.max(head);
            let bytes = events.iter().map(|f| f.weight()).sum();
            // Err means no receiver is left; the last guard removes the entry.
            let _ = ch
                .tx
                .send_sized(Arc::new(LiveMsg::Events { events, head }), bytes);
        }
    }

    /// Tells the stream's subscribers its head moved without sending the events.
    pub fn advance(&self, stream: &StreamName, head: i64) {
        let mut map = self.streams.lock().expect("hub lock");
        if let Some(ch) = map.get_mut(stream) {
            if head > ch.published {
                ch.published = head;
                let _ = ch.tx.send(Arc::new(LiveMsg::Advanced { head }));
            }
        }
    }

    /// Tells the stream's subscribers it was deleted.
    pub fn deleted(&self, stream: &StreamName) {
        let mut map = self.streams.lock().expect("hub lock");
        if let Some(ch) = map.get_mut(stream) {
            // A stream re-created under the same name starts again from seq 1.
            ch.published = 0;
            let _ = ch.tx.send(Arc::new(LiveMsg::Deleted));
        }
    }

    /// True if the stream has subscribers on this node.
    pub fn wants(&self, stream: &StreamName) -> bool {
        self.streams.lock().expect("hub lock").contains_key(stream)
    }
}

impl CommitSink for Hub {
    fn committed(&self, batch: Vec<Committed>) {
        let now = Instant::now();
        for c in batch {
            if !self.wants(&c.stream) {
                continue;
            }
            let frames = c
                .events
                .iter()
                .map(|ev| Frame::new(c.stream.as_str(), ev, Some(now)))
                .collect();
            self.publish(&c.stream, frames, c.head);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The receiver field is dropped before the guard, so a count of zero means this
        // was the stream's last subscriber. Checked under the map lock, which `subscribe`
        // also holds, so no new subscriber can slip in between.
        let mut map = self.hub.streams.lock().expect("hub lock");
        if map
            .get(&self.stream)
            .is_some_and(|ch| ch.tx.receiver_count() == 0)
        {
            map.remove(&self.stream);
            metrics::gauge!(m::LIVE_STREAMS).set(map.len() as f64);
        }
        drop(map);
        self.hub.subscriptions.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::SUBSCRIPTIONS).decrement(1.0);
    }
}

impl LiveReceiver {
    pub fn stream(&self) -> &StreamName {
        &self.guard.stream
    }
}
