//! Read replicas: PostgreSQL streaming replicas (hot standbys) that take replay, export and
//! catch-up reads off the primary (`--database-read-url`).
//!
//! A replica is a copy of the primary as it was a moment ago. A read may use it only if that
//! moment is late enough for the read: every read says which seq it `need`s (a head the
//! primary or this node's hub has shown), and the replica serves it only if its own copy of
//! the stream's head has reached that seq — checked in the same statement (one snapshot) as
//! the page is read. Because an append moves the head in the transaction that inserts its
//! events, and a standby applies transactions whole and in commit order, such a page is
//! exactly the page the primary would return. Otherwise the read goes to the primary: a
//! lagging replica costs one index probe, never a gap or a short page passed off as the end.
//!
//! A replica that errors or does not answer within `--database-read-timeout-ms` (connecting
//! included, so a dead host cannot stall readers) is skipped for a backoff (1 s doubling to
//! 30 s); the read meanwhile goes to the primary. Appends, locks, LISTEN, input requests and
//! the stream-row lookups that set what a read needs always use the primary.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::db::Db;
use super::model::StoredEvent;
use super::store;
use crate::metrics as m;

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The configured replicas (possibly none). Shared by every reader of a node.
pub struct Replicas {
    list: Vec<Replica>,
    next: AtomicUsize,
    timeout: Duration,
}

struct Replica {
    /// `host:port`, for logs and `/v1/stats` (never the password).
    server: String,
    pool: PgPool,
    backoff: Mutex<Backoff>,
    pages: AtomicU64,
    lagging: AtomicU64,
    unavailable: AtomicU64,
}

#[derive(Default)]
struct Backoff {
    until: Option<Instant>,
    delay: Duration,
}

/// One replica as `/v1/stats` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStats {
    pub server: String,
    /// False while the replica is skipped after a failure.
    pub available: bool,
    /// Pages read from it.
    pub pages: u64,
    /// Reads it could not serve because it had not replayed far enough (read on the primary).
    pub lagging: u64,
    /// Reads that went to the primary because it failed, timed out or was being skipped.
    pub unavailable: u64,
}

impl Replicas {
    /// No replicas: every read goes to the primary.
    pub fn none() -> Arc<Replicas> {
        Arc::new(Replicas {
            list: Vec::new(),
            next: AtomicUsize::new(0),
            timeout: Duration::from_secs(1),
        })
    }

    /// Pools for `urls`, opened lazily: a replica that is down at start-up is a fallback, not
    /// a failed start. Each new connection is checked to be a replica of `primary` (same
    /// system identifier, same database): a URL naming another server would otherwise serve
    /// another log's events.
    pub async fn open(
        urls: &[String],
        primary: &PgPool,
        max_connections: u32,
        timeout: Duration,
    ) -> anyhow::Result<Arc<Replicas>> {
        let identity = primary_identity(primary).await?;
        let mut list = Vec::with_capacity(urls.len());
        for url in urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
            let opts: PgConnectOptions = url
                .parse()
                .context("invalid --database-read-url / TAILCAST_DATABASE_READ_URL")?;
            let server = format!("{}:{}", opts.get_host(), opts.get_port());
            let opts = opts.application_name("tailcast-read");
            let expected = identity.clone();
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(2))
                .min_connections(0)
                .acquire_timeout(timeout)
                .after_connect(move |conn, _| {
                    let expected = expected.clone();
                    Box::pin(async move {
                        let found = identity_of(&mut *conn).await?;
                        check_identity(&expected, &found)
                    })
                })
                .connect_lazy_with(opts);
            list.push(Replica {
                server,
                pool,
                backoff: Mutex::default(),
                pages: AtomicU64::new(0),
                lagging: AtomicU64::new(0),
                unavailable: AtomicU64::new(0),
            });
        }
        tracing::info!(
            replicas = ?list.iter().map(|r| r.server.as_str()).collect::<Vec<_>>(),
            "read replicas configured"
        );
        Ok(Arc::new(Replicas {
            list,
            next: AtomicUsize::new(0),
            timeout,
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn stats(&self) -> Vec<ReplicaStats> {
        let now = Instant::now();
        self.list
            .iter()
            .map(|r| ReplicaStats {
                server: r.server.clone(),
                available: r.ready(now),
                pages: r.pages.load(Ordering::Relaxed),
                lagging: r.lagging.load(Ordering::Relaxed),
                unavailable: r.unavailable.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The next replica in turn that is not being skipped, if any.
    fn pick(&self) -> Option<&Replica> {
        let n = self.list.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = Instant::now();
        let ready = (0..n)
            .map(|i| &self.list[(start + i) % n])
            .find(|r| r.ready(now));
        if ready.is_none() {
            // Every replica failed recently: the primary, without waiting on any of them.
            self.list[start].fallback("unavailable", &self.list[start].unavailable);
        }
        ready
    }

    /// Closes every replica pool.
    pub async fn close(&self) {
        for r in &self.list {
            r.pool.close().await;
        }
    }
}

impl Replica {
    fn ready(&self, now: Instant) -> bool {
        let b = self.backoff.lock().expect("backoff lock");
        b.until.is_none_or(|until| now >= until)
    }

    fn fallback(&self, reason: &'static str, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::REPLICA_FALLBACKS, "reason" => reason).increment(1);
    }

    /// The replica answered (serving the read or not): it is up.
    fn answered(&self) {
        let mut b = self.backoff.lock().expect("backoff lock");
        if b.delay > Duration::ZERO {
            tracing::info!(replica = %self.server, "read replica answers again");
        }
        *b = Backoff::default();
    }

    fn failed(&self, error: &dyn std::fmt::Display) {
        self.fallback("unavailable", &self.unavailable);
        let mut b = self.backoff.lock().expect("backoff lock");
        b.delay = match b.delay {
            Duration::ZERO => BACKOFF_FIRST,
            d => (d * 2).min(BACKOFF_MAX),
        };
        b.until = Some(Instant::now() + b.delay);
        tracing::warn!(replica = %self.server, %error, retry_in = ?b.delay,
            "read replica unavailable; reading the primary");
    }
}

/// The primary's system identifier (None if this role may not read it) and database name.
type Identity = (Option<String>, String);

async fn primary_identity(primary: &PgPool) -> anyhow::Result<Identity> {
    let mut conn = primary.acquire().await?;
    Ok(identity_of(&mut conn).await?)
}

async fn identity_of(conn: &mut sqlx::PgConnection) -> Result<Identity, sqlx::Error> {
    let db: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&mut *conn)
        .await?;
    // pg_control_system() may be closed to unprivileged roles: then only the name is checked.
    let system = sqlx::query_scalar("select system_identifier::text from pg_control_system()")
        .fetch_one(&mut *conn)
        .await
        .ok();
    Ok((system, db))
}

fn check_identity(expected: &Identity, found: &Identity) -> Result<(), sqlx::Error> {
    let same_system = match (&expected.0, &found.0) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    if same_system && expected.1 == found.1 {
        return Ok(());
    }
    Err(sqlx::Error::Configuration(
        format!(
            "this --database-read-url is not a streaming replica of the primary's database \
             {:?} (system {:?}, database {:?}); it will not be read",
            expected.1, found.0, found.1
        )
        .into(),
    ))
}

/// A page of events and how far the read saw the log.
#[derive(Debug)]
pub struct Page {
    pub events: Vec<StoredEvent>,
    /// Every retained event with `after < seq <= through` is in `events`, unless the page is
    /// full (then it ends at its last event): `upto` when the primary served the read, the
    /// replica's head (at least `need`) when a replica did.
    pub through: i64,
}

/// Reads pages of the log: from a replica that has replayed far enough, else the primary.
/// Cheap to clone.
#[derive(Clone)]
pub struct LogReader {
    db: Db,
    replicas: Arc<Replicas>,
}

impl LogReader {
    pub fn new(db: Db, replicas: Arc<Replicas>) -> Self {
        LogReader { db, replicas }
    }

    /// The primary.
    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    /// Events with `after < seq <= upto`, bounded like [`store::read_events_bounded`], from a
    /// replica whose head has reached `need` (the read's caller knows events up to `need`
    /// exist), else from the primary.
    pub async fn page(
        &self,
        stream_id: i64,
        after: i64,
        upto: i64,
        need: i64,
        limit: i64,
        max_bytes: i64,
    ) -> Result<Page, sqlx::Error> {
        if let Some(replica) = self.replicas.pick() {
            let read = store::read_replica_page(
                &replica.pool,
                stream_id,
                after,
                upto,
                need,
                limit,
                max_bytes,
            );
            match tokio::time::timeout(self.replicas.timeout, read).await {
                Ok(Ok(Some((head, events)))) => {
                    replica.answered();
                    replica.pages.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::REPLICA_PAGES).increment(1);
                    return Ok(Page {
                        events,
                        through: head.min(upto),
                    });
                }
                Ok(Ok(None)) => {
                    replica.answered();
                    replica.fallback("lagging", &replica.lagging);
                }
                Ok(Err(e)) => replica.failed(&e),
                Err(_) => replica.failed(&format_args!(
                    "no answer within {:?}",
                    self.replicas.timeout
                )),
            }
        }
        let events =
            store::read_events_bounded(&self.db, stream_id, after, upto, limit, max_bytes).await?;
        Ok(Page {
            events,
            through: upto,
        })
    }
}
