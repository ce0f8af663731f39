//! Totals for `/v1/stats`: how many streams and retained events the log holds, and how many
//! input requests are still open, how many open streams hold a lease, and how webhooks stand.

use super::db::{on_db, Db};

#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub streams: i64,
    /// Events still in the log: per stream, seqs above `trimmed_to` up to `head` (seqs have
    /// no gaps and retention removes the oldest first), so no scan of `events` is needed.
    pub events: i64,
    pub open_input_requests: i64,
    /// Open streams holding a lease.
    pub leased_streams: i64,
    pub webhooks: i64,
    /// Webhook positions whose next event has failed at least once.
    pub failing_webhook_streams: i64,
}

pub async fn totals(db: &Db) -> Result<Totals, sqlx::Error> {
    // One statement: the three counts come from one snapshot. `cast`: PostgreSQL's sum of
    // bigints is numeric.
    let sql = "select (select count(*) from streams), \
               (select cast(coalesce(sum(head - trimmed_to), 0) as bigint) from streams), \
               (select count(*) from input_requests where status = 'open'), \
               (select count(*) from streams where lease_s is not null and not closed), \
               (select count(*) from webhooks), \
               (select count(*) from webhook_positions where attempts > 0)";
    type Row = (i64, i64, i64, i64, i64, i64);
    let (streams, events, open_input_requests, leased_streams, webhooks, failing) =
        on_db!(db, read, |ex| {
            sqlx::query_as::<_, Row>(sql).fetch_one(ex).await
        })?;
    Ok(Totals {
        streams,
        events,
        open_input_requests,
        leased_streams,
        webhooks,
        failing_webhook_streams: failing,
    })
}
