//! Whether the database is reachable, as this process last saw it.
//!
//! Once an append fails because PostgreSQL cannot be reached, every further append fails at
//! once with 503 `unavailable` instead of each waiting out a connection timeout; a probe task
//! retries the database with capped backoff and clears the flag by itself when it answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::db::Db;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::store;

/// Longest wait between two probes of an unreachable database.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct DbHealth {
    down: AtomicBool,
    changed: Notify,
}

impl DbHealth {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Records that the database could not be reached; wakes the probe.
    pub fn mark_down(&self) {
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!("database unreachable: appends fail fast until it answers again");
            self.changed.notify_one();
        }
    }

    /// Records that the database answered.
    pub fn mark_up(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("database reachable again");
        }
    }

    /// Probes the database while it is marked down, until `shutdown`.
    pub fn spawn_probe(
        self: &Arc<Self>,
        db: Db,
        first_delay: Duration,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                // `notify_one` stores a permit, so a `mark_down` between the check and the
                // wait is not missed.
                while !health.is_down() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = health.changed.notified() => {}
                    }
                }
                let mut delay = first_delay;
                while health.is_down() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    match store::ping(&db).await {
                        Ok(()) => health.mark_up(),
                        Err(e) => {
                            tracing::debug!(error = %e, "database probe failed");
                            delay = (delay * 2).min(MAX_RETRY_DELAY);
                        }
                    }
                }
            }
        })
    }
}
