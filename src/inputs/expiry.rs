//! The input-request sweeper: one task per node, a pass at start-up and then every
//! `input_sweep_ms`.
//!
//! Each pass (1) claims due open requests (`for update skip locked`, so several nodes sweep
//! side by side without claiming the same row) and appends their `input.expired`; (2)
//! re-appends resolution events a crash may have lost between "resolved" and "appended";
//! (3) repairs or removes requests whose creation was interrupted. Every append carries the
//! request's idempotency id, so a repeated one is a duplicate, never a second event: that is
//! what makes "exactly once" hold across nodes and restarts.

use super::announce;
use crate::app::AppState;
use crate::error::Error;
use crate::log::inputs as store;

/// Requests claimed per statement.
const CLAIM: i64 = 200;
/// Seconds a resolution may stay unannounced before the sweeper announces it (whoever
/// resolved it is normally doing so right now).
const ANNOUNCE_GRACE_S: f64 = 10.0;
/// Seconds after which a request that never got its `input.requested` event is abandoned.
const CREATE_GRACE_S: f64 = 60.0;

pub async fn run(app: AppState) {
    let period = app.config.input_sweep();
    crate::live::sweep_every(app, period, "input request", |app| async move {
        sweep(&app).await
    })
    .await
}

/// One pass; returns how many requests it expired.
pub async fn sweep(app: &AppState) -> Result<usize, Error> {
    let mut expired = 0;
    loop {
        let due = store::claim_due(&app.db, CLAIM).await?;
        for row in &due {
            announce_logged(app, row).await;
        }
        expired += due.len();
        if (due.len() as i64) < CLAIM {
            break;
        }
    }
    for row in store::unannounced(&app.db, ANNOUNCE_GRACE_S, CLAIM).await? {
        tracing::info!(stream = %row.stream, request_id = %row.request_id, "announcing a resolution a crash interrupted");
        announce_logged(app, &row).await;
    }
    let abandoned = store::repair_unsequenced(&app.db, CREATE_GRACE_S).await?;
    if abandoned > 0 {
        tracing::info!(
            abandoned,
            "removed input requests whose creation never finished"
        );
    }
    Ok(expired)
}

async fn announce_logged(app: &AppState, row: &store::InputRow) {
    match announce(app, row).await {
        Ok(_) | Err(Error::StreamClosed { .. }) => {}
        // Left unannounced: the next pass tries again.
        Err(e) => {
            tracing::warn!(stream = %row.stream, request_id = %row.request_id, error = %e, "could not announce an input request's resolution")
        }
    }
}
