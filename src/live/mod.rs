//! Fan-out: the per-process `hub`, shared wire `frame`s, the `subscription` that joins
//! catch-up from the log with the live tail, `compact`, the compacted catch-up (whole messages
//! instead of every token), `notify`, the cross-node wake-ups, and `presence`, who follows
//! each stream (`presence_sync` across nodes).

pub mod budget;
pub mod compact;
pub mod frame;
pub mod hub;
pub mod leases;
pub mod notify;
pub mod presence;
pub mod presence_sync;
pub mod ring;
pub mod subscription;

pub use compact::{Compaction, Surface};
pub use frame::Frame;
pub use hub::Hub;
pub use subscription::{
    EndReason, Filter, Item, Notice, NoticeKind, Opened, Source, Start, Subscription,
};

use std::future::Future;
use std::time::Duration;

use tokio::time::{interval, MissedTickBehavior};

use crate::app::AppState;
use crate::error::Error;

/// Runs one pass of a sweeper (`what`: for the log) every `period` until shutdown. A failed
/// pass is logged and retried at the next tick; every pass is safe on every node at once.
pub async fn sweep_every<F, Fut, T>(app: AppState, period: Duration, what: &str, sweep: F)
where
    F: Fn(AppState) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut ticks = interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = sweep(app.clone()).await {
            tracing::warn!(error = %e, "{what} sweep failed; retrying next pass");
        }
    }
}
