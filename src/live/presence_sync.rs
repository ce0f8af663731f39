//! Presence across nodes (PostgreSQL): the writer task that publishes this node's followers
//! for the others, renews its lease and reaps the nodes whose lease lapsed; and the notices
//! other nodes send, handed to this node's watchers.
//!
//! Writes are batched, never one per connection: the writer takes every join and leave
//! queued since its last write (newest per follower; a follower that joined and left in
//! between costs nothing), writes them with one statement each for joins and leaves, and
//! NOTIFYs them on [`PRESENCE_CHANNEL`], all in one transaction that also renews the lease.
//! Whatever arrives during a write waits for the next, so a reconnect storm of thousands of
//! connections becomes a few transactions, and a flush of more than [`MAX_NOTIFIED`] changes
//! announces only which streams changed (watchers elsewhere re-read those).
//!
//! Whenever the node's lease row had to be created (first start, or another node reaped it
//! while this one was frozen or cut off from the database), or a write failed, the next write
//! replaces all of this node's rows with what it holds in memory.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::presence::{Change, Member, Notice, Presence};
use crate::log::presence::{self as store, MemberRows};
use crate::log::StreamName;

pub use crate::log::presence::PRESENCE_CHANNEL;

/// Most changes one write announces one by one; past it, only the streams that changed.
pub const MAX_NOTIFIED: usize = 500;
/// pg_notify payloads must stay under 8000 bytes.
const PAYLOAD_BYTES: usize = 7000;
/// How long the writer lets joins and leaves gather after the first one before it writes: at
/// most one write per window however many followers come and go (other nodes hear of them
/// this much later).
const BATCH_WINDOW: Duration = Duration::from_millis(50);

pub struct SyncConfig {
    pub pool: PgPool,
    pub presence: Arc<Presence>,
    /// How long a node's rows count without a renewal; renewed every quarter of it.
    pub lease: Duration,
    pub shutdown: CancellationToken,
}

/// Starts the writer; it ends at shutdown, after removing this node's rows.
pub fn spawn(cfg: SyncConfig) -> JoinHandle<()> {
    tokio::spawn(run(cfg))
}

async fn run(cfg: SyncConfig) {
    let mut ticks = tokio::time::interval(cfg.lease / 4);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first write replaces whatever an earlier process under this node id left behind.
    let mut rewrite = true;
    loop {
        let tick = tokio::select! {
            _ = cfg.shutdown.cancelled() => break,
            _ = cfg.presence.dirty.notified() => {
                // A batching window, not a synchronisation: whatever else arrives meanwhile
                // shares this write.
                tokio::select! {
                    _ = cfg.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(BATCH_WINDOW) => false,
                }
            }
            _ = ticks.tick() => true,
        };
        match write(&cfg, rewrite).await {
            Ok(()) => rewrite = false,
            Err(e) => {
                tracing::warn!(error = %e, "presence: could not write this node's followers");
                rewrite = true;
            }
        }
        if tick {
            if let Err(e) = reap(&cfg).await {
                tracing::debug!(error = %e, "presence: could not reap lapsed nodes");
            }
            cfg.presence.prune_watchers();
        }
    }
    // Bounded: shutdown waits about a second for background tasks.
    let bye = tokio::time::timeout(Duration::from_secs(1), unregister(&cfg));
    match bye.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "presence: could not unregister"),
        Err(_) => tracing::debug!("presence: unregistering timed out"),
    }
}

/// Renews the lease and writes the changes queued since the last write (or, if `rewrite`,
/// all of this node's followers). Failed changes are queued again.
async fn write(cfg: &SyncConfig, rewrite: bool) -> Result<(), sqlx::Error> {
    let changes = cfg.presence.take_pending();
    let res = write_changes(cfg, &changes, rewrite).await;
    if res.is_err() {
        cfg.presence.requeue(changes);
    }
    res
}

async fn write_changes(
    cfg: &SyncConfig,
    changes: &[(StreamName, Change)],
    rewrite: bool,
) -> Result<(), sqlx::Error> {
    let node = cfg.presence.node();
    let mut tx = cfg.pool.begin().await?;
    let created = store::renew(&mut tx, node, cfg.lease).await?;
    let payloads = if rewrite || created {
        store::clear(&mut tx, node).await?;
        let all = cfg.presence.all_local();
        let mut rows = MemberRows::default();
        for (stream, m) in &all {
            rows.push(stream.as_str(), m);
        }
        store::insert(&mut tx, node, &rows).await?;
        // Other nodes may have seen these followers reaped, or missed changes: every stream
        // concerned is re-read by its watchers there.
        let streams: BTreeSet<&str> = all
            .iter()
            .map(|(s, _)| s.as_str())
            .chain(changes.iter().map(|(s, _)| s.as_str()))
            .collect();
        payloads(node, &[], streams.into_iter())
    } else {
        let mut joins = MemberRows::default();
        let (mut gone_streams, mut gone_connections) = (Vec::new(), Vec::new());
        for (stream, change) in changes {
            match change {
                Change::Join(m) => joins.push(stream.as_str(), m),
                Change::Leave(m) => {
                    gone_streams.push(stream.as_str());
                    gone_connections.push(m.connection_id.as_str());
                }
            }
        }
        store::delete(&mut tx, node, &gone_streams, &gone_connections).await?;
        store::insert(&mut tx, node, &joins).await?;
        announce(node, changes)
    };
    store::notify(&mut tx, &payloads).await?;
    tx.commit().await?;
    cfg.presence.note_write();
    Ok(())
}

/// Removes lapsed nodes and their followers, and tells everyone (here too) they left.
async fn reap(cfg: &SyncConfig) -> Result<(), sqlx::Error> {
    let mut tx = cfg.pool.begin().await?;
    let gone = store::reap(&mut tx).await?;
    if gone.is_empty() {
        return tx.commit().await;
    }
    let changes: Vec<(StreamName, Change)> = gone
        .into_iter()
        .filter_map(|(s, m)| Some((StreamName::parse(&s).ok()?, Change::Leave(Arc::new(m)))))
        .collect();
    tracing::info!(
        followers = changes.len(),
        "presence: removed the followers of nodes whose lease lapsed"
    );
    store::notify(&mut tx, &announce(cfg.presence.node(), &changes)).await?;
    tx.commit().await?;
    for (stream, change) in changes {
        if let Change::Leave(m) = change {
            cfg.presence.tell(&stream, Notice::Leave(m));
        }
    }
    Ok(())
}

/// A clean shutdown: this node's followers leave at once rather than when its lease lapses.
async fn unregister(cfg: &SyncConfig) -> Result<(), sqlx::Error> {
    let node = cfg.presence.node();
    let mut tx = cfg.pool.begin().await?;
    let streams = store::unregister(&mut tx, node).await?;
    store::notify(
        &mut tx,
        &payloads(node, &[], streams.iter().map(String::as_str)),
    )
    .await?;
    tx.commit().await
}

/// The notifications for `changes`: each one, or past [`MAX_NOTIFIED`] only their streams.
fn announce(node: &str, changes: &[(StreamName, Change)]) -> Vec<String> {
    if changes.len() > MAX_NOTIFIED {
        let streams: BTreeSet<&str> = changes.iter().map(|(s, _)| s.as_str()).collect();
        return payloads(node, &[], streams.into_iter());
    }
    payloads(node, changes, std::iter::empty())
}

/// One notification on the presence channel.
#[derive(Serialize, Deserialize, Default)]
struct Payload {
    /// The node that sent it (its own notices it has delivered already).
    from: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    changes: Vec<WireChange>,
    /// Streams whose watchers must re-read the presence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    sync: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct WireChange {
    /// `join` or `leave`.
    op: String,
    stream: String,
    member: Member,
}

/// `changes` and `sync` as payloads of at most [`PAYLOAD_BYTES`] each.
fn payloads<'a>(
    node: &str,
    changes: &[(StreamName, Change)],
    sync: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = Payload {
        from: node.to_owned(),
        ..Payload::default()
    };
    let mut size = node.len() + 32;
    let mut flush = |cur: &mut Payload, size: &mut usize| {
        if !cur.changes.is_empty() || !cur.sync.is_empty() {
            out.push(serde_json::to_string(&*cur).expect("payload serialisation"));
        }
        cur.changes.clear();
        cur.sync.clear();
        *size = node.len() + 32;
    };
    for (stream, change) in changes {
        let (op, m) = match change {
            Change::Join(m) => ("join", m),
            Change::Leave(m) => ("leave", m),
        };
        let item = WireChange {
            op: op.to_owned(),
            stream: stream.to_string(),
            member: (**m).clone(),
        };
        let len = serde_json::to_string(&item).map_or(0, |s| s.len()) + 1;
        if size + len > PAYLOAD_BYTES {
            flush(&mut cur, &mut size);
        }
        size += len;
        cur.changes.push(item);
    }
    for stream in sync {
        let len = stream.len() + 3;
        if size + len > PAYLOAD_BYTES {
            flush(&mut cur, &mut size);
        }
        size += len;
        cur.sync.push(stream.to_owned());
    }
    flush(&mut cur, &mut size);
    out
}

/// Hands a notification from another node to this node's watchers.
pub fn received(presence: &Presence, payload: &str) {
    let Ok(p) = serde_json::from_str::<Payload>(payload) else {
        tracing::debug!("malformed presence notification");
        return;
    };
    if p.from == presence.node() {
        return;
    }
    for c in p.changes {
        let Ok(stream) = StreamName::parse(&c.stream) else {
            continue;
        };
        if !presence.watched(&stream) {
            continue;
        }
        let m = Arc::new(c.member);
        let notice = match c.op.as_str() {
            "join" => Notice::Join(m),
            "leave" => Notice::Leave(m),
            _ => continue,
        };
        presence.tell(&stream, notice);
    }
    for s in p.sync {
        if let Ok(stream) = StreamName::parse(&s) {
            presence.tell(&stream, Notice::Sync);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_small_and_carry_every_change() {
        let p = Presence::new("n1".into(), true);
        let s = StreamName::parse("run:1").unwrap();
        let guards: Vec<_> = (0..300)
            .map(|i| {
                p.join(
                    &s,
                    &format!("connection-{i:04}"),
                    "sse",
                    Some("someone"),
                    None,
                )
            })
            .collect();
        let changes = p.take_pending();
        let out = announce("n1", &changes);
        assert!(out.len() > 1);
        let mut seen = 0;
        for payload in &out {
            assert!(payload.len() < 8000, "{}", payload.len());
            let parsed: Payload = serde_json::from_str(payload).unwrap();
            assert_eq!(parsed.from, "n1");
            seen += parsed.changes.len();
        }
        assert_eq!(seen, 300);
        drop(guards);
        // Past the limit only the streams go out.
        let many: Vec<_> = (0..MAX_NOTIFIED + 1)
            .map(|i| {
                let m = Member {
                    connection_id: format!("c{i}"),
                    transport: "ws".into(),
                    node: "n1".into(),
                    sub: None,
                    label: None,
                    since: chrono::Utc::now(),
                };
                (s.clone(), Change::Leave(Arc::new(m)))
            })
            .collect();
        let out = announce("n1", &many);
        assert_eq!(out.len(), 1);
        let parsed: Payload = serde_json::from_str(&out[0]).unwrap();
        assert!(parsed.changes.is_empty());
        assert_eq!(parsed.sync, vec!["run:1".to_owned()]);
    }

    #[test]
    fn notices_from_other_nodes_reach_watchers_and_our_own_are_skipped() {
        let here = Presence::new("here".into(), true);
        let there = Presence::new("there".into(), true);
        let s = StreamName::parse("s").unwrap();
        let mut rx = here.watch(&s);
        let g = there.join(&s, "c1", "ws", None, Some("tab"));
        let sent = announce("there", &there.take_pending());
        received(&here, &sent[0]);
        assert!(
            matches!(rx.try_recv().unwrap(), Notice::Join(m) if m.label.as_deref() == Some("tab"))
        );
        drop(g);
        let own = announce("here", &there.take_pending());
        received(&here, &own[0]);
        assert!(
            rx.try_recv().is_err(),
            "a node's own notices are not delivered twice"
        );
        received(&here, &payloads("there", &[], ["s"].into_iter())[0]);
        assert!(matches!(rx.try_recv().unwrap(), Notice::Sync));
    }
}
