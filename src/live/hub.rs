//! The per-process live hub: one broadcast channel per stream that has subscribers here,
//! created with the first subscriber and dropped with the last.
//!
//! The hub is only an accelerator. A subscriber that lags (its channel overflowed) or sees a
//! gap (events committed elsewhere that this node has not fanned out yet) re-reads the log;
//! nothing correct depends on the hub delivering everything.
//!
//! It also remembers what it knows of each tracked stream's row (id, head, closed), so that a
//! `from=now` open of a stream that already has subscribers here needs no database read (see
//! [`Known`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::frame::Frame;
use super::ring;
use crate::log::model::TYPE_STREAM_CLOSED;
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
    /// What the hub knows of the stream's row.
    known: Known,
    /// Bumped by every publish, advance and deletion: a row read from the database is only
    /// remembered if nothing moved the stream since its reader registered (see `remember`).
    changes: u64,
}

/// A stream's row as far as the hub can vouch for it: every change to it after this was
/// learnt is one the hub saw (its own commits, other nodes' notifications, deletions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Known {
    /// Nothing: ask the database.
    Unknown,
    /// The stream did not exist.
    Absent,
    /// The stream exists with this id, and its head and closed state as published here. The
    /// head may trail a commit made elsewhere whose notification has not arrived yet; a
    /// subscription starting there receives those events live (or reads them after a gap),
    /// exactly as if they were committed just after it opened.
    Row { id: i64, head: i64, closed: bool },
}

/// What [`Hub::subscribe_known`] saw when it registered the subscriber.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    pub known: Known,
    /// The channel's change count then (for [`Hub::remember`]).
    pub changes: u64,
}

pub struct Hub {
    streams: Mutex<HashMap<StreamName, Channel>>,
    capacity: usize,
    /// Bytes of frames one stream's channel holds for its slowest subscriber.
    max_bytes: usize,
    subscriptions: AtomicUsize,
    /// Times a subscriber's channel overflowed and it went back to the log (this node).
    lag_fallbacks: AtomicU64,
    /// Subscriptions opened from what the hub knew, without reading the database.
    opened_from_hub: AtomicU64,
    /// The runtime the subscribers' tasks run on, where a commit's wake-ups are made (see
    /// [`CommitSink::committed`]); None outside a runtime (then the caller wakes them).
    runtime: Option<tokio::runtime::Handle>,
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
            opened_from_hub: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Registers a subscriber. Everything published after this returns reaches it.
    pub fn subscribe(self: &Arc<Self>, stream: &StreamName) -> LiveReceiver {
        self.subscribe_known(stream).0
    }

    /// Registers a subscriber and tells what the hub knew of the stream at that moment:
    /// every change after it reaches the subscriber.
    pub fn subscribe_known(self: &Arc<Self>, stream: &StreamName) -> (LiveReceiver, Registered) {
        let mut map = self.streams.lock().expect("hub lock");
        let (rx, registered) = match map.get(stream) {
            Some(ch) => {
                let registered = Registered {
                    known: ch.known,
                    changes: ch.changes,
                };
                (ch.tx.subscribe(), registered)
            }
            None => {
                let (tx, rx) = ring::bounded(self.capacity, self.max_bytes);
                let ch = Channel {
                    tx,
                    published: 0,
                    known: Known::Unknown,
                    changes: 0,
                };
                map.insert(stream.clone(), ch);
                metrics::gauge!(m::LIVE_STREAMS).set(map.len() as f64);
                let registered = Registered {
                    known: Known::Unknown,
                    changes: 0,
                };
                (rx, registered)
            }
        };
        drop(map);
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::SUBSCRIPTIONS).increment(1.0);
        let live = LiveReceiver {
            rx,
            guard: Guard {
                hub: self.clone(),
                stream: stream.clone(),
            },
        };
        (live, registered)
    }

    /// Remembers the stream's row as a subscriber registered at `registered` read it from the
    /// database after registering (`None`: there was none) — unless the stream moved in
    /// between, which would make what it read older than what the hub knows.
    pub fn remember(
        &self,
        stream: &StreamName,
        registered: Registered,
        row: Option<(i64, i64, bool)>,
    ) {
        let mut map = self.streams.lock().expect("hub lock");
        if let Some(ch) = map.get_mut(stream) {
            if ch.changes == registered.changes {
                ch.known = match row {
                    Some((id, head, closed)) => Known::Row { id, head, closed },
                    None => Known::Absent,
                };
            }
        }
    }

    /// Notes a subscription opened from [`Known`] alone.
    pub fn note_opened_from_hub(&self) {
        self.opened_from_hub.fetch_add(1, Ordering::Relaxed);
    }

    /// Subscriptions opened without a database read (this node).
    pub fn opened_from_hub(&self) -> u64 {
        self.opened_from_hub.load(Ordering::Relaxed)
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
        let wake = Self::queue(&mut map, stream, events, head);
        drop(map);
        drop(wake);
    }

    /// Queues events for the stream's subscribers; they are woken when the result is dropped.
    fn queue(
        map: &mut HashMap<StreamName, Channel>,
        stream: &StreamName,
        events: Vec<Arc<Frame>>,
        head: i64,
    ) -> Option<ring::Wake<Arc<LiveMsg>>> {
        let ch = map.get_mut(stream)?;
        ch.published = ch.published.max(head);
        ch.changes += 1;
        ch.known = match ch.known {
            // Complete up to `head`: the closing event, if any, is among them.
            Known::Row {
                id,
                head: h,
                closed,
            } if events.last().is_some_and(|f| f.seq == head) => Known::Row {
                id,
                head: h.max(head),
                closed: closed || events.iter().any(|f| f.ty == TYPE_STREAM_CLOSED),
            },
            // Created meanwhile (id unknown here), or not every event is in hand.
            _ => Known::Unknown,
        };
        let bytes = events.iter().map(|f| f.weight()).sum();
        // Err means no receiver is left; the last guard removes the entry.
        ch.tx
            .send_deferred(Arc::new(LiveMsg::Events { events, head }), bytes)
            .ok()
    }

    /// Tells the stream's subscribers its head moved without sending the events.
    pub fn advance(&self, stream: &StreamName, head: i64) {
        let mut map = self.streams.lock().expect("hub lock");
        if let Some(ch) = map.get_mut(stream) {
            if head > ch.published {
                ch.published = head;
                // Whatever moved it (a close among them?) was not seen here.
                ch.changes += 1;
                ch.known = Known::Unknown;
                let _ = ch.tx.send(Arc::new(LiveMsg::Advanced { head }));
            }
        }
    }

    /// Tells the stream's subscribers it was deleted.
    pub fn deleted(&self, stream: &StreamName) {
        let mut map = self.streams.lock().expect("hub lock");
        if let Some(ch) = map.get_mut(stream) {
            // A stream re-created under the same name starts again from seq 1 (and may be
            // re-created before this is called: its row is not known to be absent).
            ch.published = 0;
            ch.changes += 1;
            ch.known = Known::Unknown;
            let _ = ch.tx.send(Arc::new(LiveMsg::Deleted));
        }
    }

    /// Forgets what the hub knew of the stream's row (it may have changed unseen, e.g. while
    /// notifications were lost).
    pub fn forget(&self, stream: &StreamName) {
        let mut map = self.streams.lock().expect("hub lock");
        if let Some(ch) = map.get_mut(stream) {
            ch.changes += 1;
            ch.known = Known::Unknown;
        }
    }

    /// True if the stream has subscribers on this node.
    pub fn wants(&self, stream: &StreamName) -> bool {
        self.streams.lock().expect("hub lock").contains_key(stream)
    }
}

impl CommitSink for Hub {
    /// One pass over the commit's streams, whatever other streams do: the map is locked once
    /// to pick the streams with subscribers here, their frames are encoded outside the lock,
    /// and locked once more to queue them. The subscribers are woken by the returned
    /// closure, which the appender calls after answering its callers.
    fn committed(&self, batch: Vec<Committed>) -> Box<dyn FnOnce() + Send> {
        let wanted: Vec<Committed> = {
            let map = self.streams.lock().expect("hub lock");
            batch
                .into_iter()
                .filter(|c| map.contains_key(&c.stream))
                .collect()
        };
        if wanted.is_empty() {
            return Box::new(|| {});
        }
        let now = Instant::now();
        let encoded: Vec<(StreamName, Vec<Arc<Frame>>, i64)> = wanted
            .into_iter()
            .map(|c| {
                let frames = c
                    .events
                    .iter()
                    .map(|ev| Frame::new(c.stream.as_str(), ev, Some(now)))
                    .collect();
                (c.stream, frames, c.head)
            })
            .collect();
        let mut map = self.streams.lock().expect("hub lock");
        let wakes: Vec<_> = encoded
            .into_iter()
            .filter_map(|(stream, frames, head)| Self::queue(&mut map, &stream, frames, head))
            .collect();
        drop(map);
        let wake = move || wakes.into_iter().for_each(ring::Wake::wake);
        match &self.runtime {
            // The commit thread is not one of the runtime's workers: each task it woke
            // directly went through the runtime's shared queue and could unpark a worker, a
            // thousand times per commit at a thousand subscribers. Woken from a task of the
            // runtime, they go to that worker's own queue, and the commit thread goes back to
            // committing at once.
            Some(rt) => {
                let rt = rt.clone();
                Box::new(move || drop(rt.spawn(async move { wake() })))
            }
            None => Box::new(wake),
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
