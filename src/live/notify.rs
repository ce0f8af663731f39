//! Cross-node wake-ups: LISTEN for the appenders' commit notifications and fan out, on this
//! node, what other nodes committed.
//!
//! Every appender commit sends one `pg_notify` on [`NOTIFY_CHANNEL`] with payload
//! `node_id\nstream head\n…` (head -1: the stream was deleted). Two tasks share the work:
//! - the *receiver* owns a dedicated session connection (its own one-connection pool, never a
//!   pooled or transaction-mode connection, which would drop the LISTEN) and folds each
//!   notification into a pending map of "highest head per stream";
//! - the *fan-out* task wakes, takes the whole map at once and, for each stream with local
//!   subscribers that moved past what the hub already published, reads the new rows once and
//!   publishes them. Under load many notifications collapse into one read per stream.
//!
//! Notifications are lost while the connection is down, so after every (re)connection — and
//! only once LISTEN is active again — every live stream is re-checked against the log heads.
//! Anything committed before that check is found by it; anything after is notified.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::frame::Frame;
use super::hub::Hub;
use super::presence::Presence;
use super::presence_sync::{self, PRESENCE_CHANNEL};
use crate::error::is_unavailable;
use crate::log::health::{DbHealth, MAX_RETRY_DELAY};
use crate::log::store::{self, NOTIFY_CHANNEL};
use crate::log::{StoredEvent, StreamName};
use crate::metrics as m;

/// How often an idle LISTEN connection is checked (a silently dropped TCP connection would
/// otherwise never report an error).
const IDLE_PING: Duration = Duration::from_secs(10);

/// The `application_name` of a node's LISTEN connection (operators can spot it in
/// `pg_stat_activity`; tests terminate it).
pub fn application_name(node_id: &str) -> String {
    format!("tailcast-listen:{node_id}")
}

/// The listener's state, for `/v1/stats` and tests.
#[derive(Default)]
pub struct ListenerStatus {
    connected: AtomicBool,
    reconnects: AtomicU64,
}

impl ListenerStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Times the LISTEN connection was re-established after being lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

pub struct ListenerConfig {
    /// Where the fan-out task reads new rows.
    pub pool: PgPool,
    /// Connection options of the LISTEN session (the same database as `pool`).
    pub listen: PgConnectOptions,
    pub hub: Arc<Hub>,
    /// Joins and leaves of other nodes arrive on the same session ([`PRESENCE_CHANNEL`]).
    pub presence: Arc<Presence>,
    pub node_id: Arc<str>,
    /// Most rows read per stream per wake-up; further behind, subscribers read the log.
    pub page: i64,
    pub reconnect_delay: Duration,
    pub status: Arc<ListenerStatus>,
    /// The listener's own connection attempts tell whether the database is reachable.
    pub health: Arc<DbHealth>,
    pub shutdown: CancellationToken,
}

/// Notifications received and not yet fanned out.
#[derive(Default)]
struct Pending {
    heads: HashMap<StreamName, i64>,
    deleted: HashSet<StreamName>,
    recheck: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Shared {
    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().expect("pending lock"))
    }

    fn request_recheck(&self) {
        self.pending.lock().expect("pending lock").recheck = true;
        self.wake.notify_one();
    }

    /// Folds one notification in. Our own commits were published by our appender already.
    fn add(&self, payload: &str, own_node: &str) {
        let mut lines = payload.lines();
        if lines.next() == Some(own_node) {
            return;
        }
        let mut pending = self.pending.lock().expect("pending lock");
        for line in lines {
            let Some((name, head)) = line.rsplit_once(' ') else {
                continue;
            };
            let (Ok(name), Ok(head)) = (StreamName::parse(name), head.parse::<i64>()) else {
                tracing::debug!(line, "malformed notification line");
                continue;
            };
            if head < 0 {
                pending.heads.remove(&name);
                pending.deleted.insert(name);
            } else {
                let h = pending.heads.entry(name).or_insert(head);
                *h = (*h).max(head);
            }
        }
        drop(pending);
        self.wake.notify_one();
    }
}

/// Starts the receiver and fan-out tasks; both end at shutdown.
pub fn spawn(cfg: ListenerConfig) -> JoinHandle<()> {
    let shared = Arc::new(Shared::default());
    let cfg = Arc::new(cfg);
    let receiver = tokio::spawn(receive(cfg.clone(), shared.clone()));
    let fan_out = tokio::spawn(fan_out(cfg, shared));
    tokio::spawn(async move {
        let _ = receiver.await;
        let _ = fan_out.await;
    })
}

async fn connect(cfg: &ListenerConfig) -> Result<PgListener, sqlx::Error> {
    // A fresh one-connection pool per attempt: a lost session is never handed back.
    let opts = cfg
        .listen
        .clone()
        .application_name(&application_name(&cfg.node_id));
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(MAX_RETRY_DELAY)
        .connect_lazy_with(opts);
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    // Report a lost connection at once (`Ok(None)`), so that we re-check after reconnecting.
    listener.eager_reconnect(false);
    listener
        .listen_all([NOTIFY_CHANNEL, PRESENCE_CHANNEL])
        .await?;
    Ok(listener)
}

async fn receive(cfg: Arc<ListenerConfig>, shared: Arc<Shared>) {
    let mut delay = cfg.reconnect_delay;
    let mut ever_connected = false;
    loop {
        let attempt = tokio::select! {
            _ = cfg.shutdown.cancelled() => return,
            r = connect(&cfg) => r,
        };
        match attempt {
            Ok(mut listener) => {
                cfg.health.mark_up();
                delay = cfg.reconnect_delay;
                cfg.status.connected.store(true, Ordering::Release);
                if ever_connected {
                    cfg.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::LISTEN_RECONNECTS).increment(1);
                    tracing::info!("LISTEN connection re-established; re-checking live streams");
                }
                ever_connected = true;
                // LISTEN is active: from here on nothing is missed, so re-check what may
                // have been committed while we were not listening.
                shared.request_recheck();
                // Presence notices sent meanwhile are lost too: watchers re-read.
                cfg.presence.sync_all();
                let lost = listen(&cfg, &shared, &mut listener).await;
                cfg.status.connected.store(false, Ordering::Release);
                match lost {
                    None => return,
                    Some(reason) => tracing::warn!(%reason, "LISTEN connection lost"),
                }
            }
            Err(e) => {
                if is_unavailable(&e) {
                    cfg.health.mark_down();
                }
                tracing::warn!(error = %e, retry_in = ?delay, "cannot open the LISTEN connection");
            }
        }
        tokio::select! {
            _ = cfg.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Receives until the connection is lost (returns why) or shutdown (returns `None`).
async fn listen(
    cfg: &ListenerConfig,
    shared: &Shared,
    listener: &mut PgListener,
) -> Option<String> {
    let mut idle = tokio::time::interval_at(tokio::time::Instant::now() + IDLE_PING, IDLE_PING);
    loop {
        tokio::select! {
            _ = cfg.shutdown.cancelled() => return None,
            r = listener.try_recv() => match r {
                Ok(Some(n)) if n.channel() == PRESENCE_CHANNEL => {
                    presence_sync::received(&cfg.presence, n.payload())
                }
                Ok(Some(n)) => shared.add(n.payload(), &cfg.node_id),
                Ok(None) => return Some("connection closed".into()),
                Err(e) => return Some(e.to_string()),
            },
            _ = idle.tick() => {
                // Notifications arriving meanwhile are buffered and returned by `try_recv`.
                match tokio::time::timeout(MAX_RETRY_DELAY, listener.execute("select 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Some(e.to_string()),
                    Err(_) => return Some("ping timed out".into()),
                }
            }
        }
    }
}

async fn fan_out(cfg: Arc<ListenerConfig>, shared: Arc<Shared>) {
    let mut retry: Option<Duration> = None;
    loop {
        match retry {
            // A failed re-check is retried on its own schedule, not on the next notification.
            Some(delay) => tokio::select! {
                _ = cfg.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            },
            None => tokio::select! {
                _ = cfg.shutdown.cancelled() => return,
                _ = shared.wake.notified() => {}
            },
        }
        let pending = shared.take();
        metrics::counter!(m::NOTIFY_WAKEUPS).increment(1);
        retry = match wake_up(&cfg, pending).await {
            Ok(()) => None,
            Err(e) => {
                let delay = retry.map_or(cfg.reconnect_delay, |d| (d * 2).min(MAX_RETRY_DELAY));
                tracing::warn!(error = %e, retry_in = ?delay, "re-checking live streams failed");
                shared.pending.lock().expect("pending lock").recheck = true;
                Some(delay)
            }
        };
    }
}

/// One coalesced wake-up. Fails only if a requested re-check could not read the heads.
async fn wake_up(cfg: &ListenerConfig, pending: Pending) -> Result<(), sqlx::Error> {
    let hub = &cfg.hub;
    for stream in &pending.deleted {
        hub.deleted(stream);
    }
    let mut heads = pending.heads;
    if pending.recheck {
        let live = hub.stream_names();
        let names: Vec<&str> = live.iter().map(StreamName::as_str).collect();
        let found = store::stream_heads(&cfg.pool, &names).await?;
        for stream in live {
            // Whatever the hub knew of the row may have changed while we were deaf.
            hub.forget(&stream);
            match found.get(stream.as_str()) {
                Some(head) => {
                    let h = heads.entry(stream).or_insert(*head);
                    *h = (*h).max(*head);
                }
                // It had events here and is gone now: it was deleted while we were deaf.
                None if hub.published(&stream).is_some_and(|p| p > 0) => hub.deleted(&stream),
                None => {}
            }
        }
    }
    for (stream, head) in heads {
        publish_new(cfg, &stream, head).await;
    }
    Ok(())
}

/// Publishes the events of `stream` up to `head` that the hub has not published yet.
async fn publish_new(cfg: &ListenerConfig, stream: &StreamName, head: i64) {
    let hub = &cfg.hub;
    let Some(published) = hub.published(stream) else {
        return; // no subscriber here
    };
    if head <= published {
        return;
    }
    // A channel that has published nothing yet does not know where its subscribers are,
    // and one far behind would flood them: tell them the head and let each read the log.
    if published == 0 || head - published > cfg.page {
        hub.advance(stream, head);
        return;
    }
    match store::read_events_by_name(&cfg.pool, stream.as_str(), published, head, cfg.page).await {
        Ok(events) if !events.is_empty() => {
            let now = (Instant::now(), Utc::now());
            let frames = events
                .iter()
                .map(|ev| Frame::new(stream.as_str(), ev, Some(committed_at(ev, now))))
                .collect();
            hub.publish(stream, frames, head);
        }
        Ok(_) => hub.advance(stream, head),
        Err(e) => {
            // Subscribers retry the log themselves.
            tracing::debug!(%stream, error = %e, "reading notified events failed");
            hub.advance(stream, head);
        }
    }
}

/// When an event committed on another node, on this node's monotonic clock (for the
/// commit-to-send latency metric; both nodes' wall clocks are assumed close).
fn committed_at(ev: &StoredEvent, (now, wall): (Instant, chrono::DateTime<Utc>)) -> Instant {
    let age = (wall - ev.time).to_std().unwrap_or_default();
    now.checked_sub(age).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_coalesce_to_the_highest_head_and_skip_our_own() {
        let shared = Shared::default();
        shared.add("me\na 5", "me");
        shared.add("other\na 3\nb 7", "me");
        shared.add("other2\na 9\nb 2\nbad name! 4\nc x", "me");
        shared.add("other\nd 4\nd -1", "me");
        let p = shared.take();
        let a = StreamName::parse("a").unwrap();
        let b = StreamName::parse("b").unwrap();
        let d = StreamName::parse("d").unwrap();
        assert_eq!(p.heads.len(), 2);
        assert_eq!(p.heads[&a], 9);
        assert_eq!(p.heads[&b], 7);
        assert!(p.deleted.contains(&d));
        assert!(!p.recheck);
        assert!(shared.take().heads.is_empty());
    }
}
