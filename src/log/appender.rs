//! The batched appender (group commit).
//!
//! One task per process owns all writes to the log. It takes every append queued since its
//! last commit (up to a limit), locks the streams involved, assigns seqs, inserts all rows
//! with one statement, commits once, and only then answers each caller and hands the new
//! events to the live hub. Under load many appends share one commit (one WAL flush); when
//! idle, a lone append goes straight through: `recv_many` never waits for company.
//!
//! The task runs on a thread and runtime of its own, with database connections of its own
//! (see [`commit_thread`]): under heavy fan-out the shared runtime's queue holds a thousand
//! subscriber writes, and each of a commit's wake-ups (the queued append, every database
//! answer) used to wait behind all of them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::{FutureExt, Shared};
use futures::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::db::{Db, TxLimits};
use super::health::DbHealth;
use super::model::{wire_time, NewEvent, StoredEvent, StreamName};
use super::store::{self, EventRows};
use crate::error::{is_unavailable, Error};
use crate::metrics as m;

/// One append request: events for one stream, applied all or nothing.
#[derive(Debug, Clone)]
pub struct AppendSpec {
    pub stream: StreamName,
    pub events: Vec<NewEvent>,
    /// Append only if the stream's head is this (0: missing or empty).
    pub expected_seq: Option<i64>,
    /// This append closes the stream (its one event is `stream.closed`); idempotent.
    pub close: bool,
}

/// What the API returns for an append.
#[derive(Debug, Clone, Serialize)]
pub struct AppendResult {
    pub stream: StreamName,
    pub first_seq: i64,
    pub last_seq: i64,
    pub events: Vec<EventAck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventAck {
    pub seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Events of one stream made durable by one commit, in seq order.
#[derive(Debug, Clone)]
pub struct Committed {
    pub stream: StreamName,
    pub head: i64,
    pub closed: bool,
    pub events: Vec<StoredEvent>,
}

/// Receives every commit, after it is durable (the live hub implements this).
pub trait CommitSink: Send + Sync + 'static {
    /// Takes the commit's events (before the callers are answered, so that a caller that
    /// opens a subscription `from=now` after its answer starts past them) and returns the
    /// wake-up of whoever waits for them, which the appender calls after answering.
    fn committed(&self, batch: Vec<Committed>) -> Box<dyn FnOnce() + Send>;
}

struct Job {
    spec: AppendSpec,
    reply: oneshot::Sender<Result<AppendResult, Error>>,
    queued: Instant,
}

/// How the appender works: its batch size and the limits on its transactions.
#[derive(Debug, Clone, Copy)]
pub struct AppenderSettings {
    /// Most appends one group commit may take.
    pub max_batch: usize,
    /// Lock and idle-in-transaction timeouts of its PostgreSQL transactions.
    pub limits: TxLimits,
}

/// The handle producers append through. Cheap to clone.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Job>,
    health: Arc<DbHealth>,
    closing: CancellationToken,
    running: Arc<AtomicBool>,
    restarts: Arc<AtomicU64>,
}

impl Appender {
    /// Starts the appender task, under a supervisor that restarts it if it fails. It ends
    /// once every `Appender` handle is dropped (or [`Appender::close`] is called) and the
    /// queue is drained, so awaiting the returned handle flushes every accepted append.
    pub fn spawn(
        db: Db,
        sink: Arc<dyn CommitSink>,
        node_id: Arc<str>,
        settings: AppenderSettings,
        health: Arc<DbHealth>,
    ) -> (Appender, JoinHandle<()>) {
        let max_batch = settings.max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let closing = CancellationToken::new();
        let running = Arc::new(AtomicBool::new(true));
        let restarts = Arc::new(AtomicU64::new(0));
        let (limits, worker_health, worker_closing) =
            (settings.limits, health.clone(), closing.clone());
        let (worker_running, worker_restarts) = (running.clone(), restarts.clone());
        let task = commit_thread(db, limits, move |db| {
            let worker = Worker {
                db,
                sink,
                node_id,
                max_batch,
                limits,
                health: worker_health,
                closing: worker_closing,
            };
            supervise(
                Arc::new(tokio::sync::Mutex::new(rx)),
                Arc::new(worker),
                worker_running,
                worker_restarts,
            )
        });
        let appender = Appender {
            tx,
            health,
            closing,
            running,
            restarts,
        };
        (appender, task)
    }

    /// False while the appender task is down (between a failure and its restart): the node
    /// is not ready then.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Times the appender task failed and was restarted.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Refuses new appends (503 `shutting_down`) and lets the task commit what is queued and
    /// end, even while handles remain (held by connections still open at shutdown).
    pub fn close(&self) {
        self.closing.cancel();
    }

    pub async fn append(&self, spec: AppendSpec) -> Result<AppendResult, Error> {
        if self.health.is_down() {
            // Fail fast while the database is known to be unreachable; the probe clears this.
            return Err(Error::Unavailable);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            spec,
            reply,
            queued: Instant::now(),
        };
        self.tx.send(job).await.map_err(|_| Error::ShuttingDown)?;
        match answer.await {
            Ok(res) => res,
            // The task dropped the job unanswered: it is shutting down, or it failed while the
            // job's batch was in flight, perhaps mid-COMMIT. The events may be stored; the
            // caller retries with the same ids (idempotent) once the task has restarted.
            Err(_) if self.closing.is_cancelled() => Err(Error::ShuttingDown),
            Err(_) => Err(Error::OutcomeUnknown),
        }
    }
}

/// Most group commits in flight at once on PostgreSQL (SQLite has one writer).
const IN_FLIGHT: usize = 3;

/// Runs `run` on a thread with a single-threaded runtime of its own, and returns a handle
/// (on the caller's runtime) that completes when it has. On PostgreSQL `run` gets a pool of
/// its own, made from the shared pool's settings: a connection is driven by the runtime that
/// opened it, so the shared pool's connections would answer through the busy runtime again.
/// SQLite connections run on threads of their own and are shared as they are.
fn commit_thread<F, Fut>(db: Db, limits: TxLimits, run: F) -> JoinHandle<()>
where
    F: FnOnce(Db) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (done, finished) = oneshot::channel::<()>();
    let body = move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the commit thread's runtime");
        rt.block_on(async move {
            let own = match &db {
                Db::Postgres(pool) => Some(
                    pool.options()
                        .clone()
                        // One more than in flight, for resolving a commit left in doubt.
                        .max_connections(IN_FLIGHT as u32 + 1)
                        .min_connections(0)
                        .connect_lazy_with(
                            // A one-trip commit (see `commit_postgres`) sends no BEGIN to
                            // set its lock timeout in: its session has it.
                            (*pool.connect_options())
                                .clone()
                                .options([("lock_timeout", limits.lock_s * 1000)]),
                        ),
                ),
                Db::Sqlite(_) => None,
            };
            let db = own.clone().map_or(db, Db::Postgres);
            run(db).await;
            if let Some(pool) = own {
                pool.close().await;
            }
        });
        let _ = done.send(());
    };
    std::thread::Builder::new()
        .name("tailcast-commit".into())
        .spawn(body)
        .expect("spawn the commit thread");
    tokio::spawn(async move {
        let _ = finished.await;
    })
}

/// What the appender task needs, shared by each of its incarnations.
struct Worker {
    db: Db,
    sink: Arc<dyn CommitSink>,
    node_id: Arc<str>,
    max_batch: usize,
    limits: TxLimits,
    health: Arc<DbHealth>,
    closing: CancellationToken,
}

/// Runs the appender task and restarts it whenever it fails (a panic: a bug, but one that
/// must not leave the node answering every append with an error while it looks ready). The
/// queue outlives each incarnation, so appends queued meanwhile wait for the next one; those
/// in the failed task's batches are answered `outcome_unknown`. While the task is down,
/// `running` is false and /readyz reports the node not ready.
async fn supervise(
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    worker: Arc<Worker>,
    running: Arc<AtomicBool>,
    restarts: Arc<AtomicU64>,
) {
    const RESTART_FIRST: Duration = Duration::from_millis(50);
    const RESTART_MAX: Duration = Duration::from_secs(5);
    let mut delay = RESTART_FIRST;
    loop {
        let started = Instant::now();
        let task = tokio::spawn(run(rx.clone(), worker.clone()));
        match task.await {
            Ok(()) => return,
            Err(e) => {
                running.store(false, Ordering::Release);
                restarts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::APPENDER_RESTARTS).increment(1);
                let cause = panic_cause(e);
                tracing::error!(%cause, ?delay, "appender task failed; restarting it");
                if started.elapsed() > Duration::from_secs(60) {
                    delay = RESTART_FIRST;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RESTART_MAX);
                running.store(true, Ordering::Release);
                tracing::info!("appender task restarted");
            }
        }
    }
}

fn panic_cause(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(e) => e.to_string(),
    }
}

async fn run(rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>, worker: Arc<Worker>) {
    // One incarnation at a time owns the queue; the guard goes with a failed one.
    let mut rx = rx.lock_owned().await;
    let Worker {
        db,
        sink,
        node_id,
        max_batch,
        limits,
        health,
        closing,
    } = &*worker;
    let max_batch = *max_batch;
    // Batches in flight at once, each on its own connection. With one, a request that
    // arrives while a batch waits for its WAL flush waits for that flush *and* its own, so
    // 64 single-event clients spread over 2-3 small batches per cycle (bench: 8.5k events/s,
    // batches of ~25). With several, the next batch locks, inserts and queues its commit
    // while the previous one flushes, and PostgreSQL flushes them together. Per-stream order
    // still holds: a batch waits on the row lock of any stream an earlier batch holds, and
    // is delivered to the hub after it (the earlier commit completes first; even if it were
    // handed over later, subscribers would see the seq gap and read the log).
    // SQLite has one write connection: batches there go one at a time, and what arrives
    // meanwhile joins the next.
    let in_flight = if db.is_sqlite() { 1 } else { IN_FLIGHT };
    // Batches commit concurrently, but a batch takes the row lock of a stream an earlier
    // batch also writes only after that batch holds it (see `Turn`), and batches are handed
    // to the hub (and answered) in the order they were started: so the events of two batches
    // on one stream reach its subscribers in seq order. In completion order they sometimes
    // did not, and then every subscriber of the stream saw a gap and re-read the log — a
    // thousand reads at a thousand subscribers. Batches with no stream in common do not wait
    // for each other: a one-trip batch holds its turn until it has committed.
    let mut inflight = FuturesOrdered::new();
    let mut turns = Turns::default();
    let mut open = true;
    // A restarted incarnation finds the queue already closed if shutdown began meanwhile.
    let mut closed = false;
    loop {
        tokio::select! {
            jobs = next_jobs(&mut rx, max_batch), if open && inflight.len() < in_flight => {
                match jobs {
                    Some(jobs) => {
                        let turn = turns.take(jobs.iter().map(|j| &j.spec.stream));
                        // Alone, a batch commits in one round trip (see `commit_postgres`).
                        let trip = if inflight.is_empty() { Trip::One } else { Trip::Pipelined };
                        inflight.push_back(commit_jobs(db, &**sink, node_id, *limits, health, jobs, turn, trip));
                    }
                    None => open = false,
                }
            }
            _ = closing.cancelled(), if open && !closed => {
                // Senders now fail; what is already queued is still received and committed.
                rx.close();
                closed = true;
            }
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                if let Some((jobs, plan, started)) = done {
                    deliver(&**sink, jobs, plan, started);
                }
            }
            else => break,
        }
    }
}

/// Everything queued (at least one job, at most `max`), or `None` once every handle is gone
/// (or the queue was closed) and it is drained. Cancel-safe: `recv_many` loses nothing.
async fn next_jobs(rx: &mut mpsc::Receiver<Job>, max: usize) -> Option<Vec<Job>> {
    let mut jobs = Vec::new();
    (rx.recv_many(&mut jobs, max).await > 0).then_some(jobs)
}

/// Commits one batch. A committed batch is returned, for `run` to deliver in order; a failed
/// one is answered here.
#[allow(clippy::too_many_arguments)]
async fn commit_jobs(
    db: &Db,
    sink: &dyn CommitSink,
    node: &str,
    limits: TxLimits,
    health: &DbHealth,
    jobs: Vec<Job>,
    mut turn: Turn,
    trip: Trip,
) -> Option<(Vec<Job>, Plan, Instant)> {
    let started = Instant::now();
    let specs: Vec<&AppendSpec> = jobs.iter().map(|j| &j.spec).collect();
    let result = commit_with_retry(db, node, limits, &specs, health, &mut turn, trip).await;
    // Whatever happened, the next batch may lock now.
    turn.done();
    match &result {
        Ok(_) => health.mark_up(),
        // A pool timeout may only mean every connection is busy: the LISTEN connection's
        // failures to reconnect are what mark an unreachable database as down then.
        Err(Failure::Db(sqlx::Error::PoolTimedOut)) => {}
        Err(Failure::Db(e)) if is_unavailable(e) => health.mark_down(),
        Err(_) => {}
    }
    match result {
        Ok(plan) => {
            metrics::histogram!(m::APPEND_BATCH_SIZE).record(jobs.len() as f64);
            metrics::counter!(m::APPEND_BATCHES).increment(1);
            return Some((jobs, plan, started));
        }
        Err(Failure::Db(e)) if jobs.len() > 1 && !is_unavailable(&e) && !is_lock_timeout(&e) => {
            // One bad append must not fail its neighbours: retry each alone. (Never after an
            // unknown outcome: those appends may be in the log.)
            tracing::warn!(error = %e, jobs = jobs.len(), "batch failed; retrying appends one by one");
            for job in jobs {
                let started = Instant::now();
                let free = &mut Turn::free();
                match commit_with_retry(db, node, limits, &[&job.spec], health, free, trip).await {
                    Ok(plan) => deliver(sink, vec![job], plan, started),
                    Err(e) => {
                        let _ = job.reply.send(Err(e.into_error()));
                    }
                }
            }
        }
        Err(e) => {
            // One error, its cause shared by every append of the batch.
            let error = e.into_error();
            for job in jobs {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
    None
}

/// Fires once a batch holds its row locks (or failed, or ended).
type Locked = Shared<oneshot::Receiver<()>>;

/// Per stream, the turn of the latest batch started that writes it.
#[derive(Default)]
struct Turns {
    latest: HashMap<StreamName, Locked>,
}

impl Turns {
    /// The turn of a batch writing `streams` started now: after the batches before it that
    /// write any of them.
    fn take<'a>(&mut self, streams: impl IntoIterator<Item = &'a StreamName>) -> Turn {
        // Streams whose latest batch has its locks (or ended) need no entry any more: the map
        // holds only the streams of batches still waiting for theirs.
        self.latest
            .retain(|_, locked| locked.clone().now_or_never().is_none());
        let (mine, locked) = oneshot::channel();
        let locked = locked.shared();
        let mut prev: Vec<Locked> = Vec::new();
        for stream in streams {
            if let Some(earlier) = self.latest.insert(stream.clone(), locked.clone()) {
                if !earlier.ptr_eq(&locked) && !prev.iter().any(|p| p.ptr_eq(&earlier)) {
                    prev.push(earlier);
                }
            }
        }
        Turn {
            prev,
            mine: Some(mine),
        }
    }
}

/// A batch's place in the order in which concurrent batches take their row locks: it sends
/// its `append_jobs` only once every batch started before it that writes one of its streams
/// has its locks (or is done), so each stream's seqs are assigned in the order batches are
/// delivered (SQLite commits one at a time).
struct Turn {
    prev: Vec<Locked>,
    mine: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// A batch that waits for no other (the one-by-one retries of a failed batch).
    fn free() -> Turn {
        Turn {
            prev: Vec::new(),
            mine: None,
        }
    }

    /// Waits until the earlier batches on its streams hold their locks, failed or ended.
    async fn wait(&mut self) {
        for prev in std::mem::take(&mut self.prev) {
            let _ = prev.await;
        }
    }

    /// Lets the next batch go on.
    fn done(&mut self) {
        if let Some(mine) = self.mine.take() {
            let _ = mine.send(());
        }
    }
}

/// Why a batch did not commit.
enum Failure {
    /// The database refused it or could not be reached: nothing of it is stored.
    Db(sqlx::Error),
    /// The connection died during COMMIT and the database could not be asked in time whether
    /// the commit happened: its events may or may not be stored.
    Unknown,
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Db(e)
    }
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Unknown => Error::OutcomeUnknown,
            Failure::Db(e) if is_unavailable(&e) => Error::Unavailable,
            // Another session held a stream's lock past `lock_timeout` (a frozen node whose
            // session the server has not ended yet): nothing was stored, retry shortly.
            Failure::Db(e) if is_lock_timeout(&e) || is_idle_timeout(&e) => Error::Unavailable,
            Failure::Db(e) => Error::internal(e),
        }
    }
}

/// A job's result, and for each of its events the seq assigned (None: a duplicate).
type Outcome = Result<(AppendResult, Vec<Option<i64>>), Error>;

struct Plan {
    outcomes: Vec<Outcome>,
    heads: HashMap<StreamName, (i64, bool)>,
    time: chrono::DateTime<Utc>,
}

/// 55P03 lock_not_available: `lock_timeout` expired waiting for a stream's row lock.
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// 25P03 idle_in_transaction_session_timeout: the server ended the session mid-transaction.
fn is_idle_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("25P03"))
}

async fn commit_with_retry(
    db: &Db,
    node: &str,
    limits: TxLimits,
    specs: &[&AppendSpec],
    health: &DbHealth,
    turn: &mut Turn,
    trip: Trip,
) -> Result<Plan, Failure> {
    let mut attempt = 0;
    loop {
        match commit(db, node, limits, specs, health, turn, trip).await {
            // 40P01 deadlock (streams created by two nodes at once), 40001 serialization;
            // 25P03: the server ended the session for sitting idle in the transaction (this
            // process was frozen past --idle-in-transaction-timeout-s). None of them committed.
            Err(Failure::Db(sqlx::Error::Database(db)))
                if attempt < 5
                    && matches!(db.code().as_deref(), Some("40P01" | "40001" | "25P03")) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
            }
            other => return other,
        }
    }
}

struct StreamState {
    id: i64,
    head: i64,
    closed: bool,
    written: bool,
    /// Ids appended earlier in this batch.
    new_ids: HashMap<String, i64>,
}

/// True if a failed COMMIT may nevertheless have committed: the connection broke, or the
/// server went down, before the answer arrived. Any other error is the database's own refusal.
fn commit_in_doubt(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("08") || code.starts_with("57P")
        }
        _ => true,
    }
}

/// The outcome of a batch's COMMIT: a failure that may nevertheless have committed is resolved
/// by the commit `token` the batch wrote (None: it wrote none, so nothing can be lost).
async fn settle(
    db: &Db,
    health: &DbHealth,
    token: Option<uuid::Uuid>,
    committed: Result<(), sqlx::Error>,
) -> Result<(), Failure> {
    match (committed, token) {
        (Ok(()), _) => Ok(()),
        (Err(e), Some(token)) if commit_in_doubt(&e) => {
            health.mark_down();
            resolve_in_doubt(db, token, e).await.map(drop)
        }
        (Err(e), _) => Err(e.into()),
    }
}

/// The connection died during COMMIT, so the transaction may or may not have committed.
/// Asks the database (on another connection) whether the batch's commit token is there, so
/// that callers hear the truth: success only if it is durable, `unavailable` only if nothing
/// was written. Never by transaction id: after a crash PostgreSQL reuses the ids of
/// transactions whose commit never reached disk. Gives up with [`Failure::Unknown`] if the
/// database cannot be asked within the limit. A confirmed commit brings the answer
/// `tailcast.append_jobs` recorded with its token, which a one-trip commit lost with its
/// connection (None for a token recorded without one).
async fn resolve_in_doubt(
    db: &Db,
    token: uuid::Uuid,
    err: sqlx::Error,
) -> Result<Option<store::JobsOutcome>, Failure> {
    const LIMIT: Duration = Duration::from_secs(30);
    const WAIT: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + LIMIT;
    let mut delay = Duration::from_millis(20);
    loop {
        match store::commit_outcome(db, token, WAIT).await {
            Ok(store::CommitOutcome::Committed) => {
                // If the database went away again before the answer was read: ask again.
                if let Ok(recorded) = store::recorded_answer(db, token).await {
                    tracing::info!(%token, "commit confirmed after its connection was lost");
                    return Ok(recorded);
                }
            }
            Ok(store::CommitOutcome::NotCommitted) => {
                tracing::warn!(%token, error = %err, "commit lost with its connection; nothing was stored");
                return Err(Failure::Db(err));
            }
            // Still in progress, or the database is not back yet.
            Ok(store::CommitOutcome::Pending) | Err(_) => {}
        }
        if Instant::now() >= deadline {
            tracing::error!(%token, error = %err, "outcome of a commit is unknown; answering outcome_unknown");
            return Err(Failure::Unknown);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

async fn commit(
    db: &Db,
    node: &str,
    limits: TxLimits,
    specs: &[&AppendSpec],
    health: &DbHealth,
    turn: &mut Turn,
    trip: Trip,
) -> Result<Plan, Failure> {
    if let Db::Postgres(pool) = db {
        return commit_postgres(db, pool, node, limits, specs, health, turn, trip).await;
    }
    let time = wire_time(Utc::now());
    let names: BTreeSet<&str> = specs.iter().map(|s| s.stream.as_str()).collect();
    let names: Vec<&str> = names.into_iter().collect();

    let mut tx = db.begin_write_limited(limits).await?;
    let (rows, created) = store::lock_streams(&mut tx, &names, time).await?;

    let mut id_streams = Vec::new();
    let mut id_values = Vec::new();
    for spec in specs {
        // `lock_streams` returns every stream or fails; a job whose stream is missing
        // anyway is answered with an error below, never a panic.
        let Some(row) = rows.get(spec.stream.as_str()) else {
            continue;
        };
        let sid = row.id;
        for id in spec.events.iter().filter_map(|e| e.id.as_deref()) {
            id_streams.push(sid);
            id_values.push(id);
        }
    }
    let existing = store::existing_ids(&mut tx, &id_streams, &id_values).await?;

    let mut states: HashMap<&str, StreamState> = rows
        .values()
        .map(|r| {
            let st = StreamState {
                id: r.id,
                head: r.head,
                closed: r.closed,
                written: false,
                new_ids: HashMap::new(),
            };
            (r.name.as_str(), st)
        })
        .collect();

    let mut out = EventRows::default();
    let mut outcomes = Vec::with_capacity(specs.len());
    for spec in specs {
        let outcome = match states.get_mut(spec.stream.as_str()) {
            Some(st) => plan_job(spec, st, &existing, &mut out),
            None => Err(Error::internal(format!(
                "stream {} could not be locked for an append",
                spec.stream
            ))),
        };
        outcomes.push(outcome);
    }

    store::insert_events(&mut tx, &out, time).await?;
    let written: Vec<&StreamState> = states.values().filter(|s| s.written).collect();
    if !written.is_empty() {
        let ids: Vec<i64> = written.iter().map(|s| s.id).collect();
        let heads: Vec<i64> = written.iter().map(|s| s.head).collect();
        let closed: Vec<bool> = written.iter().map(|s| s.closed).collect();
        store::update_heads(&mut tx, &ids, &heads, &closed, time).await?;
    }
    let unwritten: Vec<i64> = states
        .values()
        .filter(|s| !s.written && created.contains(&s.id))
        .map(|s| s.id)
        .collect();
    store::drop_created_streams(&mut tx, &unwritten).await?;
    let mut heads = HashMap::new();
    let mut announced = Vec::new();
    for spec in specs {
        let Some(st) = states.get(spec.stream.as_str()) else {
            continue;
        };
        if st.written && !heads.contains_key(&spec.stream) {
            heads.insert(spec.stream.clone(), (st.head, st.closed));
        }
    }
    for (name, (head, _)) in &heads {
        announced.push((name, *head));
    }
    let payloads = store::notify_payloads(node, &announced);
    let token = uuid::Uuid::new_v4();
    let marked = store::notify_and_mark(&mut tx, &payloads, token).await?;
    settle(db, health, marked.then_some(token), tx.commit().await).await?;
    Ok(Plan {
        outcomes,
        heads,
        time,
    })
}

/// How a PostgreSQL batch reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trip {
    /// The `append_jobs` call alone, outside a transaction block: the call is its own
    /// transaction and its answer arrives committed. One round trip, but the batch keeps its
    /// row locks until it has committed, so a batch started meanwhile waits for that.
    One,
    /// BEGIN, the call, COMMIT: three round trips, and the next batch may take its row locks
    /// as soon as this one holds its own (while this one's WAL flush is under way).
    Pipelined,
}

/// [`commit`] on PostgreSQL: the whole batch is one call of `tailcast.append_jobs` (the
/// function applications append through too, so the rules live in one place); see [`Trip`].
#[allow(clippy::too_many_arguments)]
async fn commit_postgres(
    db: &Db,
    pool: &sqlx::PgPool,
    node: &str,
    limits: TxLimits,
    specs: &[&AppendSpec],
    health: &DbHealth,
    turn: &mut Turn,
    trip: Trip,
) -> Result<Plan, Failure> {
    let time = wire_time(Utc::now());
    let mut rows = store::JobRows::default();
    for spec in specs {
        rows.stream.push(spec.stream.as_str());
        rows.count.push(spec.events.len() as i32);
        rows.expected.push(spec.expected_seq);
        rows.close.push(spec.close);
        for ev in &spec.events {
            rows.ty.push(&ev.ty);
            rows.data.push(&ev.data);
            rows.id.push(ev.id.as_deref());
            rows.key.push(ev.key.as_deref());
            rows.body.push(ev.body.as_deref());
            rows.by.push(ev.by.as_deref());
            rows.append.push(ev.append);
        }
    }
    let token = uuid::Uuid::new_v4();
    let mut tx = None;
    let res = match trip {
        Trip::One => {
            // The session has the lock timeout; there is no transaction to sit idle in.
            let mut conn = pool.acquire().await?;
            turn.wait().await;
            let res = store::append_jobs(&mut conn, node, token, time, &rows).await;
            turn.done();
            match res {
                Ok(res) => res,
                // Lost with the connection: committed exactly if the token is in the log,
                // and then the token's row holds the answer.
                Err(e) if commit_in_doubt(&e) => {
                    health.mark_down();
                    // Every token `append_jobs` writes carries its answer.
                    resolve_in_doubt(db, token, e)
                        .await?
                        .ok_or(Failure::Unknown)?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Trip::Pipelined => {
            // Lock and idle-in-transaction timeouts set in the BEGIN round trip (see
            // `TxLimits`).
            let mut open = pool.begin_with(limits.begin_sql()).await?;
            turn.wait().await;
            let res = store::append_jobs(&mut open, node, token, time, &rows).await;
            // Our row locks are held (or we failed): the next batch may take its own.
            turn.done();
            tx = Some(open);
            res?
        }
    };
    let outcomes = job_outcomes(specs, &res)?;
    let mut written: HashMap<&str, (i64, bool)> = HashMap::new();
    for ((name, head), closed) in res
        .written_streams
        .iter()
        .zip(&res.written_heads)
        .zip(&res.written_closed)
    {
        written.insert(name, (*head, *closed));
    }
    let mut heads = HashMap::new();
    for spec in specs {
        if let Some(state) = written.get(spec.stream.as_str()) {
            heads.entry(spec.stream.clone()).or_insert(*state);
        }
    }
    if let Some(tx) = tx {
        // The token is in the transaction exactly when it wrote something.
        let marked = !written.is_empty();
        settle(db, health, marked.then_some(token), tx.commit().await).await?;
    }
    Ok(Plan {
        outcomes,
        heads,
        time,
    })
}

/// Each job's answer from what `tailcast.append_jobs` decided.
fn job_outcomes(specs: &[&AppendSpec], res: &store::JobsOutcome) -> Result<Vec<Outcome>, Failure> {
    let events: usize = specs.iter().map(|s| s.events.len()).sum();
    if res.seqs.len() != events || res.dups.len() != events || res.errors.len() != specs.len() {
        return Err(Failure::Db(sqlx::Error::Protocol(
            "tailcast.append_jobs answered arrays of the wrong length".into(),
        )));
    }
    let mut outcomes = Vec::with_capacity(specs.len());
    let mut at = 0;
    for (j, spec) in specs.iter().enumerate() {
        let range = at..at + spec.events.len();
        at = range.end;
        let head = res.error_heads[j].unwrap_or_default();
        let outcome = match res.errors[j].as_deref() {
            Some("stream_closed") => Err(Error::StreamClosed { head }),
            Some("seq_conflict") => Err(Error::SeqConflict {
                expected: spec.expected_seq.unwrap_or_default(),
                head,
            }),
            Some(other) => Err(Error::internal(format!("append refused: {other}"))),
            None => {
                let mut acks = Vec::with_capacity(spec.events.len());
                let mut assigned = Vec::with_capacity(spec.events.len());
                for (ev, e) in spec.events.iter().zip(range) {
                    let seq = res.seqs[e].unwrap_or_default();
                    let duplicate = res.dups[e].unwrap_or(false);
                    assigned.push((!duplicate).then_some(seq));
                    acks.push(EventAck {
                        seq,
                        // Closing a closed stream answers with its head, not an event of it.
                        id: if spec.close && duplicate {
                            None
                        } else {
                            ev.id.clone()
                        },
                        duplicate,
                    });
                }
                Ok((result(&spec.stream, acks), assigned))
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Decides one job against its stream's state; on success records its rows and moves the
/// state on, on failure leaves both untouched.
fn plan_job<'a>(
    spec: &'a AppendSpec,
    st: &mut StreamState,
    existing: &HashMap<(i64, String), i64>,
    out: &mut EventRows<'a>,
) -> Outcome {
    if spec.close && st.closed {
        let ack = EventAck {
            seq: st.head,
            id: None,
            duplicate: true,
        };
        return Ok((result(&spec.stream, vec![ack]), vec![None]));
    }
    // First pass: which events are duplicates (of the log, of this batch, of this request)?
    let mut dup_of: Vec<Option<i64>> = Vec::with_capacity(spec.events.len());
    let mut in_request: HashMap<&str, usize> = HashMap::new();
    let mut fresh = 0i64;
    for ev in &spec.events {
        let prior = ev.id.as_deref().and_then(|id| {
            existing
                .get(&(st.id, id.to_owned()))
                .or_else(|| st.new_ids.get(id))
                .copied()
                .or_else(|| in_request.get(id).map(|n| st.head + *n as i64))
        });
        if prior.is_none() {
            fresh += 1;
            if let Some(id) = ev.id.as_deref() {
                in_request.insert(id, fresh as usize);
            }
        }
        dup_of.push(prior);
    }
    // A retry of an append that already succeeded is all duplicates: answer it as such even
    // though the head has moved past `expected_seq`, or the stream was closed since.
    if fresh > 0 {
        if st.closed {
            return Err(Error::StreamClosed { head: st.head });
        }
        if let Some(expected) = spec.expected_seq {
            if expected != st.head {
                return Err(Error::SeqConflict {
                    expected,
                    head: st.head,
                });
            }
        }
    }
    let mut acks = Vec::with_capacity(spec.events.len());
    let mut assigned = Vec::with_capacity(spec.events.len());
    for (ev, prior) in spec.events.iter().zip(dup_of) {
        let (seq, duplicate) = match prior {
            Some(seq) => (seq, true),
            None => {
                st.head += 1;
                out.stream_id.push(st.id);
                out.seq.push(st.head);
                out.ty.push(&ev.ty);
                out.data.push(&ev.data);
                out.id.push(ev.id.as_deref());
                out.key.push(ev.key.as_deref());
                out.body.push(ev.body.as_deref());
                out.by.push(ev.by.as_deref());
                out.append.push(ev.append);
                if let Some(id) = &ev.id {
                    st.new_ids.insert(id.clone(), st.head);
                }
                (st.head, false)
            }
        };
        assigned.push((!duplicate).then_some(seq));
        acks.push(EventAck {
            seq,
            id: ev.id.clone(),
            duplicate,
        });
    }
    if fresh > 0 {
        st.written = true;
        st.closed |= spec.close;
    }
    Ok((result(&spec.stream, acks), assigned))
}

fn result(stream: &StreamName, events: Vec<EventAck>) -> AppendResult {
    let first_seq = events.iter().map(|e| e.seq).min().unwrap_or(0);
    let last_seq = events.iter().map(|e| e.seq).max().unwrap_or(0);
    AppendResult {
        stream: stream.clone(),
        first_seq,
        last_seq,
        events,
    }
}

/// Hands the committed events to the hub, then answers every caller.
fn deliver(sink: &dyn CommitSink, jobs: Vec<Job>, plan: Plan, started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    let mut by_stream: HashMap<StreamName, Vec<StoredEvent>> = HashMap::new();
    let mut replies = Vec::with_capacity(jobs.len());
    let mut appended = 0u64;
    for (job, outcome) in jobs.into_iter().zip(plan.outcomes) {
        let Job {
            spec,
            reply,
            queued,
        } = job;
        metrics::histogram!(m::APPEND_LATENCY).record(queued.elapsed().as_secs_f64());
        match outcome {
            Ok((res, assigned)) => {
                let evs = by_stream.entry(spec.stream.clone()).or_default();
                for (ev, seq) in spec.events.into_iter().zip(assigned) {
                    if let Some(seq) = seq {
                        appended += 1;
                        evs.push(StoredEvent {
                            seq,
                            ty: ev.ty,
                            data: ev.data,
                            id: ev.id,
                            key: ev.key,
                            time: plan.time,
                            body: ev.body,
                            by: ev.by,
                            append: ev.append,
                        });
                    }
                }
                replies.push((reply, Ok(res)));
            }
            Err(e) => replies.push((reply, Err(e))),
        }
    }
    metrics::counter!(m::APPENDED_EVENTS).increment(appended);
    metrics::histogram!(m::APPEND_COMMIT_SECONDS).record(elapsed);
    let committed: Vec<Committed> = by_stream
        .into_iter()
        .filter(|(_, evs)| !evs.is_empty())
        .filter_map(|(stream, events)| {
            // Every stream with events written has its head recorded by `commit`.
            let (head, closed) = *plan.heads.get(&stream)?;
            Some(Committed {
                stream,
                head,
                closed,
                events,
            })
        })
        .collect();
    let wake = (!committed.is_empty()).then(|| sink.committed(committed));
    for (reply, res) in replies {
        let _ = reply.send(res);
    }
    if let Some(wake) = wake {
        wake();
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_batch_waits_only_for_earlier_batches_on_its_streams() {
        use super::{StreamName, Turns};
        let name = |s: &str| StreamName::parse(s).unwrap();
        let (a, b, c) = (name("a"), name("b"), name("c"));
        let mut turns = Turns::default();
        let mut first = turns.take([&a, &b]);
        assert!(first.prev.is_empty());
        // Nothing in common: no wait.
        let disjoint = turns.take([&c]);
        assert!(disjoint.prev.is_empty());
        // Two streams of one earlier batch: one wait for it.
        let mut second = turns.take([&b, &a]);
        assert_eq!(second.prev.len(), 1);
        // A stream of each: waits for both.
        let third = turns.take([&a, &c]);
        assert_eq!(third.prev.len(), 2);
        let locked = second.prev[0].clone();
        assert!(
            locked.clone().now_or_never().is_none(),
            "waits while the first has no locks"
        );
        first.done();
        assert!(
            locked.now_or_never().is_some(),
            "goes on once the first has them"
        );
        second.wait().await;
        drop((disjoint, second, third));
        // Once every batch has its locks (or is gone), the next take forgets their streams.
        let _ = turns.take([&name("d")]);
        assert_eq!(turns.latest.len(), 1);
    }

    use super::*;
    use crate::log::health::DbHealth;

    /// A hub that fails (panics) the first time it is handed a commit.
    struct FailsOnce(AtomicBool);

    impl CommitSink for FailsOnce {
        fn committed(&self, _: Vec<Committed>) -> Box<dyn FnOnce() + Send> {
            if !self.0.swap(true, Ordering::SeqCst) {
                panic!("the sink failed on purpose");
            }
            Box::new(|| {})
        }
    }

    fn spec(id: &str) -> AppendSpec {
        AppendSpec {
            stream: StreamName::parse("s").unwrap(),
            events: vec![NewEvent {
                ty: "t".into(),
                data: "1".into(),
                id: Some(id.into()),
                key: None,
                body: None,
                by: None,
                append: false,
            }],
            expected_seq: None,
            close: false,
        }
    }

    #[tokio::test]
    async fn a_failed_appender_task_is_restarted_and_its_batch_answered_outcome_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("log.db").display());
        let db = Db::connect(&url, 2, Duration::from_secs(5)).await.unwrap();
        db.migrate().await.unwrap();
        let settings = AppenderSettings {
            max_batch: 8,
            limits: TxLimits::default(),
        };
        let sink = Arc::new(FailsOnce(AtomicBool::new(false)));
        let (appender, task) = Appender::spawn(db, sink, "n".into(), settings, DbHealth::new());

        // The batch committed, then the task failed before answering: the caller cannot be
        // told it failed (it did not), only that its outcome is unknown.
        let first = appender.append(spec("a")).await;
        assert!(matches!(first, Err(Error::OutcomeUnknown)), "{first:?}");
        // The restarted task serves the retry, which finds the first commit by its id.
        let retry = tokio::time::timeout(Duration::from_secs(10), appender.append(spec("a")))
            .await
            .expect("answered after the restart")
            .expect("appended");
        assert!(retry.events[0].duplicate, "{retry:?}");
        assert_eq!(retry.first_seq, 1);
        let next = appender.append(spec("b")).await.expect("appended");
        assert_eq!(next.first_seq, 2);
        assert_eq!(appender.restarts(), 1);
        assert!(appender.is_running());

        appender.close();
        drop(appender);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the supervisor ends with the last handle")
            .unwrap();
    }
}
