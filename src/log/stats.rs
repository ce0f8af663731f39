//! Totals for `/v1/stats`: how many streams and retained events the log holds, and how many
//! input requests are still open.

use super::db::{on_db, Db};

#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub streams: i64,
    /// Events still in the log: per stream, seqs above `trimmed_to` up to `head` (seqs have
    /// no gaps and retention removes the oldest first), so no scan of `events` is needed.
    pub events: i64,
    pub open_input_requests: i64,
}

pub async fn totals(db: &Db) -> Result<Totals, sqlx::Error> {
    // One statement: the three counts come from one snapshot. `cast`: PostgreSQL's sum of
    // bigints is numeric.
    let sql = "select (select count(*) from streams), \
               (select cast(coalesce(sum(head - trimmed_to), 0) as bigint) from streams), \
               (select count(*) from input_requests where status = 'open')";
    let (streams, events, open_input_requests) = on_db!(db, read, |ex| {
        sqlx::query_as::<_, (i64, i64, i64)>(sql)
            .fetch_one(ex)
            .await
    })?;
    Ok(Totals {
        streams,
        events,
        open_input_requests,
    })
}
