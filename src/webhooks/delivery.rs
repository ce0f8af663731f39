//! One webhook's delivery to one stream, on the node that claimed it: read the log after the
//! stored position, page by page; POST each event of the webhook's types, retrying with
//! backoff until a 2xx; then move the position past it. It ends when the log has nothing
//! more (giving the claim up), when the claim is lost, or at shutdown.
//!
//! At least once: the position moves only after the 2xx, so a crash between the two sends
//! the event again, with the same `tailcast-delivery` id (`{webhook}.{stream_id}.{seq}`) for
//! the receiver to de-duplicate on. Never out of order and never skipping: one task per
//! webhook and stream, and the position only moves forward, one event at a time.
//!
//! Each request body is the event's envelope, byte for byte what SSE, WebSocket and replay
//! send; `tailcast-signature: sha256=<hex>` is the HMAC-SHA256 of that body under the
//! webhook's secret.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{BusyGuard, Ctx};
use crate::live::subscription::PAGE_BYTES;
use crate::log::model::encode_envelope;
use crate::log::store;
use crate::log::webhooks::{self as positions, Webhook};
use crate::metrics as m;

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "tailcast-signature";
/// The header carrying the delivery's stable id.
pub const DELIVERY_HEADER: &str = "tailcast-delivery";

/// A claimed delivery.
pub struct Job {
    pub webhook: Arc<Webhook>,
    pub stream_id: i64,
    pub stream: String,
    /// The stored position: every event up to it is delivered.
    pub delivered: i64,
}

/// Why a delivery stopped before the log's end.
enum Stop {
    /// Another node holds the claim now (or the webhook or stream is gone).
    Lost,
    ShuttingDown,
    Db(sqlx::Error),
}

impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Db(e)
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any size");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + digest.len() * 2);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The stable id of the delivery of event `seq` of a stream to a webhook.
pub fn delivery_id(webhook: &str, stream_id: i64, seq: i64) -> String {
    format!("{webhook}.{stream_id}.{seq}")
}

struct Delivery {
    ctx: Arc<Ctx>,
    job: Job,
    types: Option<std::collections::HashSet<String>>,
    /// Until when this node's claim holds, as last written.
    claim_until: Instant,
}

pub async fn run(ctx: Arc<Ctx>, job: Job, _busy: BusyGuard) {
    let types = super::type_filter(&job.webhook);
    let lease = ctx.app.config.webhook_lease();
    let mut d = Delivery {
        ctx,
        job,
        types,
        claim_until: Instant::now() + lease,
    };
    let (webhook, stream) = (d.job.webhook.id.clone(), d.job.stream.clone());
    match d.deliver_all().await {
        Ok(()) | Err(Stop::ShuttingDown) => {
            let app = &d.ctx.app;
            if let Err(e) =
                positions::release(&app.db, &webhook, d.job.stream_id, &app.node_id).await
            {
                tracing::debug!(error = %e, "could not give a webhook claim up; it runs out by itself");
            }
        }
        Err(Stop::Lost) => {
            tracing::info!(
                webhook,
                stream,
                "webhook delivery claim lost; another node goes on"
            )
        }
        Err(Stop::Db(e)) => {
            tracing::warn!(webhook, stream, error = %e, "webhook delivery stopped by a database error; the claim runs out and delivery resumes")
        }
    }
}

impl Delivery {
    async fn deliver_all(&mut self) -> Result<(), Stop> {
        let app = self.ctx.app.clone();
        loop {
            if app.shutdown.is_cancelled() {
                return Err(Stop::ShuttingDown);
            }
            let page = store::read_events_bounded(
                &app.db,
                self.job.stream_id,
                self.job.delivered,
                i64::MAX,
                app.config.read_page.max(1),
                PAGE_BYTES,
            )
            .await?;
            if page.is_empty() {
                return Ok(());
            }
            // Events not of the webhook's types are passed over; the position moves past them
            // with the next delivery, or at the page's end.
            let mut skipped = None;
            for ev in &page {
                if self.types.as_ref().is_some_and(|t| !t.contains(&ev.ty)) {
                    skipped = Some(ev.seq);
                    continue;
                }
                let body = encode_envelope(&self.job.stream, ev);
                self.post_until_accepted(ev.seq, body).await?;
                metrics::histogram!(m::WEBHOOK_DELIVERY_LAG, "webhook" => self.job.webhook.id.clone())
                    .record(((Utc::now() - ev.time).num_milliseconds() as f64 / 1000.0).max(0.0));
                self.advance(ev.seq).await?;
                skipped = None;
            }
            if let Some(seq) = skipped {
                self.advance(seq).await?;
            }
        }
    }

    /// Stores the position (and extends the claim).
    async fn advance(&mut self, seq: i64) -> Result<(), Stop> {
        let app = &self.ctx.app;
        let lease = app.config.webhook_lease();
        let until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
        let held = positions::advance(
            &app.db,
            &self.job.webhook.id,
            self.job.stream_id,
            &app.node_id,
            seq,
            until,
        )
        .await?;
        if !held {
            return Err(Stop::Lost);
        }
        self.job.delivered = seq;
        self.claim_until = Instant::now() + lease;
        Ok(())
    }

    /// Extends the claim to `extra` beyond a full lease from now, recording a failure.
    async fn renew(&mut self, extra: Duration, failure: Option<(i32, &str)>) -> Result<(), Stop> {
        let app = &self.ctx.app;
        let span = app.config.webhook_lease() + extra;
        let until = Utc::now() + chrono::Duration::from_std(span).unwrap_or_default();
        let held = positions::renew(
            &app.db,
            &self.job.webhook.id,
            self.job.stream_id,
            &app.node_id,
            until,
            failure,
        )
        .await?;
        if !held {
            return Err(Stop::Lost);
        }
        self.claim_until = Instant::now() + span;
        Ok(())
    }

    /// POSTs one event until the endpoint answers 2xx.
    async fn post_until_accepted(&mut self, seq: i64, body: Bytes) -> Result<(), Stop> {
        let app = self.ctx.app.clone();
        let w = self.job.webhook.clone();
        let id = delivery_id(&w.id, self.job.stream_id, seq);
        let sig = signature(&w.secret, &body);
        let timeout = app.config.webhook_timeout();
        for attempt in 1u32.. {
            // Only the claim's holder may POST, and the claim must outlive the request.
            if self.claim_until < Instant::now() + timeout * 3 / 2 {
                self.renew(Duration::ZERO, None).await?;
            }
            let sent = self
                .ctx
                .client
                .post(&w.url)
                .header("content-type", "application/json")
                .header(SIGNATURE_HEADER, &sig)
                .header(DELIVERY_HEADER, &id)
                .header("tailcast-webhook", &w.id)
                .header("tailcast-stream", &self.job.stream)
                .header("tailcast-seq", seq)
                .header("tailcast-attempt", attempt)
                .body(body.clone())
                .send()
                .await;
            let error = match sent {
                Ok(res) if res.status().is_success() => {
                    metrics::counter!(m::WEBHOOK_DELIVERIES, "webhook" => w.id.clone(), "outcome" => "delivered")
                        .increment(1);
                    return Ok(());
                }
                Ok(res) => format!("HTTP {}", res.status().as_u16()),
                Err(e) if e.is_timeout() => format!("timed out after {timeout:?}"),
                Err(e) => format!("request failed: {}", super::client::chain(&e)),
            };
            metrics::counter!(m::WEBHOOK_DELIVERIES, "webhook" => w.id.clone(), "outcome" => "failed")
                .increment(1);
            let wait = app.config.webhook_retry_delay(attempt);
            tracing::debug!(webhook = %w.id, stream = %self.job.stream, seq, attempt, error, ?wait, "webhook delivery failed; retrying");
            // The claim covers the wait, so no other node takes over a merely failing
            // endpoint; the failure is on record for `GET /v1/webhooks`.
            let attempts = i32::try_from(attempt).unwrap_or(i32::MAX);
            self.renew(wait, Some((attempts, &error))).await?;
            tokio::select! {
                _ = app.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                _ = tokio::time::sleep(wait) => {}
            }
        }
        unreachable!("the attempts never run out")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn delivery_ids_are_stable_per_event() {
        assert_eq!(delivery_id("w", 7, 42), "w.7.42");
    }
}
