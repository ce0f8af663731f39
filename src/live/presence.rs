//! Presence: who follows each stream right now, on every node. Never written to the log.
//!
//! Each node keeps its own followers here, in memory: a subscription joins when it starts
//! (SSE response, WebSocket `subscribe`, AI SDK view, Durable Streams SSE) and leaves when its
//! [`PresenceGuard`] drops, however it ends. On SQLite (one node) that is all there is. On
//! PostgreSQL every node also publishes its followers for the others (`live::presence_sync`):
//! a writer task folds joins and leaves into batched writes and NOTIFYs, and renews the
//! node's lease; reads combine this node's members (always current) with the other nodes'
//! rows whose lease has not lapsed.
//!
//! Join and leave notices go to local *watchers* (WebSocket subscriptions that asked for them)
//! through a bounded channel per stream. A watcher that falls behind, or whose node may have
//! missed other nodes' notices (a lost LISTEN connection), gets [`Notice::Sync`]: "read the
//! whole presence again", never silence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use serde::Serialize;
use tokio::sync::{broadcast, Notify};

use crate::log::model::wire_time;
pub use crate::log::presence::Member;
use crate::log::StreamName;

/// Notices one stream's watchers may have unread before the slowest is told to re-read.
const WATCH_CAPACITY: usize = 256;
/// Longest client-supplied label, in characters.
pub const MAX_LABEL_CHARS: usize = 128;

/// Checks a client-supplied label: 1-128 characters, no control characters.
pub fn check_label(raw: &str) -> Result<(), String> {
    let n = raw.chars().count();
    if n == 0 || n > MAX_LABEL_CHARS || raw.chars().any(char::is_control) {
        return Err(format!(
            "must be 1-{MAX_LABEL_CHARS} characters without control characters"
        ));
    }
    Ok(())
}

/// What a watcher hears about a stream.
#[derive(Debug, Clone)]
pub enum Notice {
    Join(Arc<Member>),
    Leave(Arc<Member>),
    /// Notices may have been missed: read the whole presence again.
    Sync,
}

/// A stream's presence as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub stream: StreamName,
    pub count: i64,
    /// The longest-present first, at most the limit asked for.
    pub members: Vec<Member>,
}

/// A join or leave not yet written for the other nodes (PostgreSQL only).
#[derive(Debug, Clone)]
pub enum Change {
    Join(Arc<Member>),
    Leave(Arc<Member>),
}

type Key = (StreamName, String);

#[derive(Default)]
struct Inner {
    members: HashMap<StreamName, HashMap<String, Arc<Member>>>,
    watchers: HashMap<StreamName, broadcast::Sender<Notice>>,
    /// Changes for the writer, newest per (stream, connection); `None` when nobody writes.
    pending: Option<HashMap<Key, Change>>,
    total: usize,
}

/// This node's followers and watchers.
pub struct Presence {
    node: Arc<str>,
    inner: Mutex<Inner>,
    /// Woken when `pending` gains a change.
    pub(crate) dirty: Notify,
    /// Transactions the writer committed (PostgreSQL).
    writes: AtomicU64,
}

impl Presence {
    /// A registry for `node`; `shared` when other nodes read it (PostgreSQL), so joins and
    /// leaves are kept for the writer.
    pub fn new(node: Arc<str>, shared: bool) -> Arc<Presence> {
        let inner = Inner {
            pending: shared.then(HashMap::new),
            ..Inner::default()
        };
        Arc::new(Presence {
            node,
            inner: Mutex::new(inner),
            dirty: Notify::new(),
            writes: AtomicU64::new(0),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Transactions this node's presence writer committed (0 on SQLite): however many
    /// followers come and go, a few per second at most.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub(crate) fn note_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a follower of `stream` until the returned guard drops.
    pub fn join(
        self: &Arc<Self>,
        stream: &StreamName,
        connection_id: &str,
        transport: &str,
        sub: Option<&str>,
        label: Option<&str>,
    ) -> PresenceGuard {
        let member = Arc::new(Member {
            connection_id: connection_id.to_owned(),
            transport: transport.to_owned(),
            node: self.node.to_string(),
            sub: sub.map(str::to_owned),
            label: label.map(str::to_owned),
            since: wire_time(Utc::now()),
        });
        let mut inner = self.lock();
        let previous = inner
            .members
            .entry(stream.clone())
            .or_default()
            .insert(connection_id.to_owned(), member.clone());
        if previous.is_none() {
            inner.total += 1;
        }
        let key = (stream.clone(), connection_id.to_owned());
        if let Some(pending) = &mut inner.pending {
            pending.insert(key, Change::Join(member.clone()));
            self.dirty.notify_one();
        }
        tell(&mut inner, stream, Notice::Join(member));
        drop(inner);
        PresenceGuard {
            presence: self.clone(),
            stream: stream.clone(),
            connection_id: connection_id.to_owned(),
        }
    }

    fn leave(&self, stream: &StreamName, connection_id: &str) {
        let mut inner = self.lock();
        let Some(members) = inner.members.get_mut(stream) else {
            return;
        };
        let Some(member) = members.remove(connection_id) else {
            return;
        };
        if members.is_empty() {
            inner.members.remove(stream);
        }
        inner.total -= 1;
        let key = (stream.clone(), connection_id.to_owned());
        if let Some(pending) = &mut inner.pending {
            match pending.get(&key) {
                // Joined and left before the writer saw it: the other nodes need hear nothing.
                Some(Change::Join(_)) => {
                    pending.remove(&key);
                }
                _ => {
                    pending.insert(key, Change::Leave(member.clone()));
                    self.dirty.notify_one();
                }
            }
        }
        tell(&mut inner, stream, Notice::Leave(member));
    }

    /// Hears the joins and leaves of `stream`, from every node, from now on.
    pub fn watch(&self, stream: &StreamName) -> broadcast::Receiver<Notice> {
        let mut inner = self.lock();
        inner
            .watchers
            .entry(stream.clone())
            .or_insert_with(|| broadcast::channel(WATCH_CAPACITY).0)
            .subscribe()
    }

    /// Hands a notice from another node to this node's watchers of `stream`.
    pub fn tell(&self, stream: &StreamName, notice: Notice) {
        tell(&mut self.lock(), stream, notice);
    }

    /// Tells every watcher to read the presence again (notices from other nodes may have
    /// been lost).
    pub fn sync_all(&self) {
        let mut inner = self.lock();
        inner.watchers.retain(|_, tx| tx.send(Notice::Sync).is_ok());
    }

    /// True if someone on this node watches `stream`.
    pub fn watched(&self, stream: &StreamName) -> bool {
        self.lock().watchers.contains_key(stream)
    }

    /// Followers on this node, in all.
    pub fn local_total(&self) -> usize {
        self.lock().total
    }

    /// This node's followers of `stream`.
    pub fn local_members(&self, stream: &StreamName) -> Vec<Member> {
        self.lock()
            .members
            .get(stream)
            .map(|m| m.values().map(|m| (**m).clone()).collect())
            .unwrap_or_default()
    }

    /// How many followers of each of `streams` this node has.
    pub fn local_counts(&self, streams: &[&str]) -> HashMap<String, i64> {
        let inner = self.lock();
        streams
            .iter()
            .filter_map(|s| {
                let name = StreamName::parse(s).ok()?;
                let n = inner.members.get(&name)?.len();
                Some(((*s).to_owned(), n as i64))
            })
            .collect()
    }

    /// Every follower on this node (a full rewrite of its rows).
    pub fn all_local(&self) -> Vec<(StreamName, Arc<Member>)> {
        self.lock()
            .members
            .iter()
            .flat_map(|(s, m)| m.values().map(move |m| (s.clone(), m.clone())))
            .collect()
    }

    /// The changes not yet written (PostgreSQL), leaving none.
    pub fn take_pending(&self) -> Vec<(StreamName, Change)> {
        let mut inner = self.lock();
        match &mut inner.pending {
            Some(p) => p.drain().map(|((s, _), c)| (s, c)).collect(),
            None => Vec::new(),
        }
    }

    /// Puts back changes a failed write took, unless a newer change of the same follower
    /// arrived meanwhile.
    pub fn requeue(&self, changes: Vec<(StreamName, Change)>) {
        let mut inner = self.lock();
        if let Some(pending) = &mut inner.pending {
            for (stream, change) in changes {
                let id = match &change {
                    Change::Join(m) | Change::Leave(m) => m.connection_id.clone(),
                };
                pending.entry((stream, id)).or_insert(change);
            }
        }
    }

    /// Drops the channels of streams nobody watches any more.
    pub fn prune_watchers(&self) {
        self.lock().watchers.retain(|_, tx| tx.receiver_count() > 0);
    }
}

fn tell(inner: &mut Inner, stream: &StreamName, notice: Notice) {
    if let Some(tx) = inner.watchers.get(stream) {
        if tx.send(notice).is_err() {
            // Nobody is listening any more.
            inner.watchers.remove(stream);
        }
    }
}

/// A follower's membership: dropping it is the leave.
pub struct PresenceGuard {
    presence: Arc<Presence>,
    stream: StreamName,
    connection_id: String,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence.leave(&self.stream, &self.connection_id);
    }
}

/// Sorts members longest-present first (then by node and connection, for a stable order).
pub fn sort_members(members: &mut [Member]) {
    members.sort_by(|a, b| {
        (a.since, &a.node, &a.connection_id).cmp(&(b.since, &b.node, &b.connection_id))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> StreamName {
        StreamName::parse(s).unwrap()
    }

    #[test]
    fn guards_join_and_leave_and_watchers_hear_both() {
        let p = Presence::new("n1".into(), true);
        let s = name("run:1");
        let mut rx = p.watch(&s);
        let g = p.join(&s, "c1", "sse", Some("alice"), None);
        assert_eq!(p.local_total(), 1);
        assert!(
            matches!(rx.try_recv().unwrap(), Notice::Join(m) if m.sub.as_deref() == Some("alice"))
        );
        drop(g);
        assert!(matches!(rx.try_recv().unwrap(), Notice::Leave(m) if m.connection_id == "c1"));
        assert_eq!(p.local_total(), 0);
        assert!(p.local_members(&s).is_empty());
        // Joined and left before any write: nothing for the other nodes.
        assert!(p.take_pending().is_empty());
    }

    #[test]
    fn pending_keeps_the_newest_change_per_follower() {
        let p = Presence::new("n1".into(), true);
        let s = name("s");
        let g = p.join(&s, "c1", "ws", None, Some("tab"));
        let taken = p.take_pending();
        assert_eq!(taken.len(), 1);
        drop(g);
        let left = p.take_pending();
        assert!(matches!(&left[..], [(_, Change::Leave(m))] if m.label.as_deref() == Some("tab")));
        // A failed write puts back only what nothing newer replaced.
        let _g2 = p.join(&s, "c1", "ws", None, None);
        p.requeue(left);
        assert!(matches!(&p.take_pending()[..], [(_, Change::Join(_))]));
    }

    #[test]
    fn a_watcher_that_falls_behind_is_told_to_sync() {
        let p = Presence::new("n1".into(), false);
        let s = name("s");
        let mut rx = p.watch(&s);
        let guards: Vec<_> = (0..WATCH_CAPACITY + 1)
            .map(|i| p.join(&s, &format!("c{i}"), "sse", None, None))
            .collect();
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        drop(guards);
        assert!(p.take_pending().is_empty(), "SQLite keeps nothing pending");
    }

    #[test]
    fn labels_at_their_limits() {
        assert!(check_label("tab 1").is_ok());
        assert!(check_label(&"é".repeat(128)).is_ok());
        assert!(check_label(&"é".repeat(129)).is_err());
        assert!(check_label("").is_err());
        assert!(check_label("a\nb").is_err());
    }
}
