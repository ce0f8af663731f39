//! The lease sweeper: one task per node, a pass every `lease_sweep_ms`. Each pass closes the
//! open streams whose lease lapsed with `stream.closed` {"reason":"abandoned"}.
//!
//! Exactly once, across nodes and restarts, without a claim table: the close is appended with
//! `expected_seq` = the head the pass saw lapse, and closing is idempotent. Two nodes that
//! both see the lapse append the same close; the appender's stream row lock orders them, the
//! second finds the stream closed and gets a duplicate (or `seq_conflict`), never a second
//! event. A producer that appended after the pass looked moved the head, so the close is
//! refused (`seq_conflict`) and the stream lives on. A crash before the commit leaves the
//! lease lapsed and the next pass (any node) closes it; a crash after leaves it closed.

use chrono::Utc;
use serde_json::json;

use crate::app::AppState;
use crate::error::Error;
use crate::log::leases;
use crate::log::model::{format_time, TYPE_STREAM_CLOSED};
use crate::log::{AppendSpec, NewEvent, StreamName};
use crate::metrics as m;

/// Streams looked at per statement.
const BATCH: i64 = 200;

/// The `data.reason` of a close for a lapsed lease.
pub const REASON_ABANDONED: &str = "abandoned";

pub async fn run(app: AppState) {
    let period = app.config.lease_sweep();
    super::sweep_every(app, period, "lease", |app| async move { sweep(&app).await }).await
}

/// One pass; returns how many streams this node closed.
pub async fn sweep(app: &AppState) -> Result<usize, Error> {
    let mut closed = 0;
    // One statement's worth: what is left (or refused meanwhile) waits for the next pass.
    for lapsed in leases::lapsed(&app.db, Utc::now(), BATCH).await? {
        let Ok(stream) = StreamName::parse(&lapsed.name) else {
            continue;
        };
        let data = json!({
            "reason": REASON_ABANDONED,
            "lease_s": lapsed.lease_s,
            "last_activity_at": format_time(&lapsed.last_activity),
        });
        let spec = AppendSpec {
            stream: stream.clone(),
            events: vec![NewEvent {
                ty: TYPE_STREAM_CLOSED.into(),
                data: data.to_string(),
                id: None,
                key: None,
                body: None,
                // The server's own doing: nobody authored it.
                by: None,
                append: false,
            }],
            expected_seq: Some(lapsed.head),
            close: true,
        };
        match app.appender.append(spec).await {
            Ok(res) if res.events.iter().any(|e| e.duplicate) => {}
            Ok(res) => {
                closed += 1;
                metrics::counter!(m::ABANDONED_STREAMS).increment(1);
                tracing::info!(stream = %stream, seq = res.first_seq, lease_s = lapsed.lease_s, "closed a stream whose lease lapsed");
            }
            // Renewed by an append (or closed by someone else) since the pass looked.
            Err(Error::SeqConflict { .. } | Error::StreamClosed { .. }) => {}
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "could not close a stream whose lease lapsed; retrying next pass")
            }
        }
    }
    Ok(closed)
}
