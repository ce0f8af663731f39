//! Webhooks: durable consumers of the log. For every registered webhook, each node looks every
//! `webhook_poll_ms` for streams under its prefix holding events it has not delivered, claims
//! the delivery of each (one node per webhook and stream at a time: a lease on the position
//! row, see `log::webhooks`) and starts a [`delivery`] task for it, which POSTs the events in
//! seq order from the stored position and moves the position after each 2xx.
//!
//! Like a subscription's catch-up, a delivery reads the log page by page from a cursor, so a
//! backlog of a million events costs one page of memory; unlike a subscription it holds no
//! live tail: a quiet stream costs nothing until its head moves again. Appends never wait
//! for a webhook: deliveries only read the log, on their own tasks, and a failing endpoint's
//! retries sleep on its own tasks, at most `webhook_concurrency` per webhook and node.

pub mod client;
pub mod delivery;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio::task::JoinSet;
use tokio::time::{interval, MissedTickBehavior};

use crate::app::AppState;
use crate::log::webhooks::{self as store, Webhook};
use crate::metrics as m;

/// What every delivery task of a node shares.
pub struct Ctx {
    pub app: AppState,
    pub client: reqwest::Client,
    /// Per webhook: the streams this node is delivering to right now.
    busy: Mutex<HashMap<String, HashSet<i64>>>,
}

impl Ctx {
    fn busy(&self, webhook: &str) -> Vec<i64> {
        let busy = self.busy.lock().expect("busy map");
        busy.get(webhook)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Marks a stream busy; the returned guard frees it when its delivery task ends.
    fn start(self: &Arc<Self>, webhook: &str, stream_id: i64) -> BusyGuard {
        let mut busy = self.busy.lock().expect("busy map");
        busy.entry(webhook.to_owned())
            .or_default()
            .insert(stream_id);
        metrics::gauge!(m::WEBHOOK_ACTIVE_STREAMS, "webhook" => webhook.to_owned()).increment(1.0);
        BusyGuard {
            ctx: self.clone(),
            webhook: webhook.to_owned(),
            stream_id,
        }
    }
}

/// A stream this node is delivering a webhook to.
pub struct BusyGuard {
    ctx: Arc<Ctx>,
    webhook: String,
    stream_id: i64,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut busy = self.ctx.busy.lock().expect("busy map");
        if let Some(set) = busy.get_mut(&self.webhook) {
            set.remove(&self.stream_id);
            if set.is_empty() {
                busy.remove(&self.webhook);
            }
        }
        metrics::gauge!(m::WEBHOOK_ACTIVE_STREAMS, "webhook" => self.webhook.clone())
            .decrement(1.0);
    }
}

/// The node's webhook dispatcher, delivering with `client` (see [`client::build`]); ends (with its deliveries) when the server shuts down.
pub async fn run(app: AppState, client: reqwest::Client) {
    let ctx = Arc::new(Ctx {
        app: app.clone(),
        client,
        busy: Mutex::default(),
    });
    let mut tasks = JoinSet::new();
    let mut known = HashSet::new();
    let mut ticks = interval(app.config.webhook_poll());
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        while tasks.try_join_next().is_some() {}
        if app.health.is_down() {
            continue;
        }
        if let Err(e) = dispatch(&ctx, &mut tasks, &mut known).await {
            tracing::warn!(error = %e, "webhook dispatch failed; retrying next pass");
        }
    }
    // Deliveries watch the same token: each gives its claim up and ends.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        tracing::warn!(
            "webhook deliveries did not end in time; their claims run out by themselves"
        );
    }
}

/// One pass: for each webhook, claims pending streams up to its concurrency and starts
/// their deliveries.
async fn dispatch(
    ctx: &Arc<Ctx>,
    tasks: &mut JoinSet<()>,
    known: &mut HashSet<String>,
) -> Result<(), sqlx::Error> {
    let app = &ctx.app;
    let concurrency = app.config.webhook_concurrency.max(1);
    for w in store::all(&app.db).await? {
        if known.insert(w.id.clone()) {
            register_series(&w.id);
        }
        let busy = ctx.busy(&w.id);
        let free = concurrency.saturating_sub(busy.len());
        if free == 0 {
            continue;
        }
        let pending = store::pending(&app.db, &w, &app.node_id, &busy, free as i64).await?;
        let w = Arc::new(w);
        for p in pending {
            let until = Utc::now() + lease(app);
            let Some(delivered) =
                store::claim(&app.db, &w, p.stream_id, &app.node_id, until).await?
            else {
                continue;
            };
            let guard = ctx.start(&w.id, p.stream_id);
            let job = delivery::Job {
                webhook: w.clone(),
                stream_id: p.stream_id,
                stream: p.name,
                delivered,
            };
            tasks.spawn(delivery::run(ctx.clone(), job, guard));
        }
    }
    Ok(())
}

fn lease(app: &AppState) -> chrono::Duration {
    chrono::Duration::from_std(app.config.webhook_lease()).unwrap_or(chrono::Duration::MAX)
}

/// Makes a webhook's series appear at 0 on `/metrics` before its first delivery.
fn register_series(id: &str) {
    for outcome in ["delivered", "failed"] {
        metrics::counter!(m::WEBHOOK_DELIVERIES, "webhook" => id.to_owned(), "outcome" => outcome)
            .increment(0);
    }
    metrics::gauge!(m::WEBHOOK_ACTIVE_STREAMS, "webhook" => id.to_owned()).increment(0.0);
}

/// The `types` filter of a webhook, as a set (None: every type).
pub fn type_filter(w: &Webhook) -> Option<HashSet<String>> {
    w.type_list().map(|t| t.into_iter().collect())
}
