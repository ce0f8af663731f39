//! The database handle: PostgreSQL (the production store, the only one for several nodes) or
//! an embedded SQLite file (one process, no server to run), chosen by the URL's scheme.
//!
//! Both hold the same tables and the same invariants; `store`, `inputs` and `retention` write
//! each statement once where the two dialects agree (the `on_db!` macro runs one body against
//! either pool) and once per dialect where they do not.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`: a commit is on disk (fsynced) before the
//! appender answers, as with PostgreSQL. Every write goes through one connection (the
//! `writer` pool has exactly one) inside `BEGIN IMMEDIATE`, so SQLite's single write lock
//! does what PostgreSQL's row locks do; reads use a separate pool of read-only connections,
//! which WAL never blocks. A lock file beside the database keeps a second process off it: the
//! live fan-out is in-process, so two processes on one file would not see each other's events.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{
    SqliteArgumentValue, SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteSynchronous, SqliteTypeInfo, SqliteValueRef,
};
use sqlx::{Decode, Encode, PgPool, Postgres, Sqlite, Transaction, Type};

/// PostgreSQL's migrations, applied at start-up.
pub static PG_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
/// SQLite's migrations, applied at start-up.
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The event log's database. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqliteDb),
}

/// An open SQLite database: one write connection, a pool of read-only ones, and the lock
/// that keeps other processes off the file.
#[derive(Clone, Debug)]
pub struct SqliteDb {
    inner: Arc<SqliteInner>,
}

#[derive(Debug)]
struct SqliteInner {
    path: PathBuf,
    writer: SqlitePool,
    reader: SqlitePool,
    /// Held (locked) for as long as the database is open; the OS releases it if we die.
    _lock: File,
}

impl SqliteDb {
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The pool of the one connection every write goes through.
    pub fn writer(&self) -> &SqlitePool {
        &self.inner.writer
    }

    /// Read-only connections.
    pub fn reader(&self) -> &SqlitePool {
        &self.inner.reader
    }
}

/// True for the URLs the embedded backend opens.
fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}

impl Db {
    /// Opens the database `url` names: `postgres://…` / `postgresql://…` (the database is
    /// created if missing), or `sqlite://PATH` / `sqlite:PATH` (the file and its directory are
    /// created if missing). Migrations are not applied here: see [`Db::migrate`].
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> anyhow::Result<Db> {
        if is_sqlite_url(url) {
            return open_sqlite(url, max_connections, acquire_timeout)
                .await
                .map(Db::Sqlite);
        }
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            anyhow::bail!(
                "unsupported database URL {:?}: use postgres://… or sqlite://PATH",
                url.split(['@', '?']).next().unwrap_or_default()
            );
        }
        let opts: sqlx::postgres::PgConnectOptions = url
            .parse()
            .context("invalid --database-url / DATABASE_URL")?;
        let server = format!("{}:{}", opts.get_host(), opts.get_port());
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL at {server}: {e}. Is PostgreSQL running and \
                 accepting TCP connections there? Check --database-url / DATABASE_URL (or unset \
                 it to use the embedded SQLite store)"
            )
        };
        match super::store::ensure_database(url).await {
            Ok(()) => {}
            // Nothing answers: waiting for the pool would only hide the cause behind a timeout.
            Err(sqlx::Error::Io(e)) => return Err(unreachable(&e)),
            Err(e) => tracing::warn!(error = %e, "could not check or create the database"),
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await
            .map_err(|e| match e {
                sqlx::Error::PoolTimedOut => {
                    unreachable(&"no connection within the acquire timeout")
                }
                sqlx::Error::Io(e) => unreachable(&e),
                e => anyhow::Error::from(e).context(format!("cannot open PostgreSQL at {server}")),
            })?;
        Ok(Db::Postgres(pool))
    }

    /// Each connection pool's name, open connections, idle connections and limit.
    pub fn pool_stats(&self) -> Vec<(&'static str, u32, usize, u32)> {
        fn stats<DB: sqlx::Database>(
            name: &'static str,
            p: &sqlx::Pool<DB>,
        ) -> (&'static str, u32, usize, u32) {
            (
                name,
                p.size(),
                p.num_idle(),
                p.options().get_max_connections(),
            )
        }
        match self {
            Db::Postgres(pool) => vec![stats("postgres", pool)],
            Db::Sqlite(lite) => vec![
                stats("writer", lite.writer()),
                stats("reader", lite.reader()),
            ],
        }
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self, Db::Sqlite(_))
    }

    /// `postgres` or `sqlite`, for logs and stats.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    pub fn migrator(&self) -> &'static Migrator {
        match self {
            Db::Postgres(_) => &PG_MIGRATOR,
            Db::Sqlite(_) => &SQLITE_MIGRATOR,
        }
    }

    /// The newest migration version applied successfully (0: none), as the readiness probe
    /// compares it with the newest embedded one.
    pub async fn applied_migration(&self) -> Result<i64, sqlx::Error> {
        let sql = "select coalesce(max(version), 0) from _sqlx_migrations where success";
        on_db!(self, read, |ex| sqlx::query_scalar(sql).fetch_one(ex).await)
    }

    /// Applies this backend's migrations that are not applied yet.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Db::Postgres(pool) => PG_MIGRATOR.run(pool).await?,
            Db::Sqlite(lite) => SQLITE_MIGRATOR.run(lite.writer()).await?,
        }
        Ok(())
    }

    /// Starts a write transaction with the default [`TxLimits`]: on PostgreSQL a plain one
    /// (the statements take row locks), on SQLite `BEGIN IMMEDIATE` on the one write
    /// connection (the database's write lock).
    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        self.begin_write_limited(TxLimits::default()).await
    }

    /// Starts a write transaction whose locks cannot be held, or waited for, forever. On
    /// PostgreSQL the limits are set in the same round trip as `BEGIN` (one simple query).
    pub async fn begin_write_limited(&self, limits: TxLimits) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(pool.begin_with(limits.begin_sql()).await?),
            Db::Sqlite(lite) => Tx::Sqlite(lite.writer().begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// Closes every connection (a graceful end; the SQLite lock goes with the last clone).
    pub async fn close(&self) {
        match self {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(lite) => {
                lite.reader().close().await;
                lite.writer().close().await;
            }
        }
    }
}

async fn open_sqlite(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
) -> anyhow::Result<SqliteDb> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    if rest.is_empty() || rest.starts_with(":memory:") || rest.contains("mode=memory") {
        anyhow::bail!("the SQLite database must be a file (sqlite://PATH), not in memory");
    }
    let opts = SqliteConnectOptions::from_str(url)
        .with_context(|| format!("invalid SQLite URL {url:?}"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(acquire_timeout.max(Duration::from_secs(5)));
    let path = opts.get_filename().to_owned();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    let lock = lock_file(&path)?;
    // Incremental auto-vacuum (it takes effect on a new file, before the first table): the
    // pages retention frees can be handed back to the filesystem (`retention::release_space`).
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(acquire_timeout)
        .connect_with(opts.clone().auto_vacuum(SqliteAutoVacuum::Incremental))
        .await
        .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
    // Each connection's worker thread reads rows ahead of the task consuming them, up to its
    // row buffer (sqlx's default: 50 rows). With events of up to a megabyte that is 50 MB a
    // read beyond the page's own byte bound, and a slow reader let it fill: a catch-up of
    // 900 KB events grew the process by 84 MB under load. A few rows keep the worker busy.
    let reader = SqlitePoolOptions::new()
        .max_connections(max_connections.max(2))
        .acquire_timeout(acquire_timeout)
        .connect_with(
            opts.create_if_missing(false)
                .read_only(true)
                .row_buffer_size(READ_AHEAD_ROWS),
        )
        .await
        .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
    tracing::info!(path = %path.display(), "embedded SQLite database open");
    Ok(SqliteDb {
        inner: Arc::new(SqliteInner {
            path,
            writer,
            reader,
            _lock: lock,
        }),
    })
}

/// Rows a SQLite read connection's worker thread may read ahead of its consumer.
const READ_AHEAD_ROWS: usize = 16;

/// Takes the exclusive lock on `PATH.lock`, or explains who holds it. `PATH` is the file's
/// real path (symbolic links and `..` resolved), so two spellings of one file share one lock.
fn lock_file(db: &Path) -> anyhow::Result<File> {
    let dir = match db.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.canonicalize(),
        None => std::env::current_dir(),
    }
    .with_context(|| format!("cannot resolve the directory of {}", db.display()))?;
    let file_name = db.file_name().context("the SQLite path names no file")?;
    let real = dir.join(file_name);
    // The file itself may be a link (when it exists already).
    let real = real.canonicalize().unwrap_or(real);
    let mut name = real.into_os_string();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the SQLite database {} is in use by another tailcast process (it holds the lock \
             {}); the embedded backend serves one process: stop the other one, or use \
             PostgreSQL to run several nodes",
            db.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// How long a PostgreSQL write transaction may wait for a row lock, and how long its session
/// may sit idle inside it, in seconds (0: no limit). A node frozen mid-transaction (SIGSTOP,
/// a stalled VM) holds its streams' row locks; with `idle_in_transaction` the server ends
/// that session and releases them, so other nodes' appends go on. `lock` bounds the wait of
/// a transaction behind such a lock; keep it longer than `idle_in_transaction`, so the
/// waiters normally get the lock rather than an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimits {
    pub lock_s: u64,
    pub idle_in_transaction_s: u64,
}

impl Default for TxLimits {
    fn default() -> Self {
        TxLimits {
            lock_s: 10,
            idle_in_transaction_s: 5,
        }
    }
}

impl TxLimits {
    /// `BEGIN` with the limits set for the transaction (one simple query, one round trip).
    pub fn begin_sql(self) -> String {
        // Integers only, so nothing here needs quoting; `set local` ends with the transaction.
        format!(
            "begin; set local lock_timeout = {}; set local idle_in_transaction_session_timeout = {}",
            self.lock_s * 1000,
            self.idle_in_transaction_s * 1000
        )
    }
}

/// A write transaction on either backend.
pub enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    pub fn is_sqlite(&self) -> bool {
        matches!(self, Tx::Sqlite(_))
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => tx.rollback().await,
            Tx::Sqlite(tx) => tx.rollback().await,
        }
    }
}

/// Runs `$body` with `$ex` bound to the backend's executor: `read` for queries (SQLite's
/// read-only pool), `write` for statements that change something (SQLite's write connection).
/// The body is compiled once per backend, so one statement text serves both where the
/// dialects agree.
macro_rules! on_db {
    ($db:expr, read, |$ex:ident| $body:expr) => {
        match $db {
            $crate::log::db::Db::Postgres(pool) => {
                let $ex = pool;
                $body
            }
            $crate::log::db::Db::Sqlite(lite) => {
                let $ex = lite.reader();
                $body
            }
        }
    };
    ($db:expr, write, |$ex:ident| $body:expr) => {
        match $db {
            $crate::log::db::Db::Postgres(pool) => {
                let $ex = pool;
                $body
            }
            $crate::log::db::Db::Sqlite(lite) => {
                let $ex = lite.writer();
                $body
            }
        }
    };
}
pub(crate) use on_db;

/// Like [`on_db!`], inside a write transaction: `$ex` is the transaction's connection.
macro_rules! on_tx {
    ($tx:expr, |$ex:ident| $body:expr) => {
        match $tx {
            $crate::log::db::Tx::Postgres(tx) => {
                let $ex = &mut **tx;
                $body
            }
            $crate::log::db::Tx::Sqlite(tx) => {
                let $ex = &mut **tx;
                $body
            }
        }
    };
}
pub(crate) use on_tx;

/// Runs one statement that returns no rows on `db`'s write side (`execute!(db, …)`) or in a
/// write transaction (`execute!(tx &mut tx, …)`), binding the values in order; evaluates to
/// the number of rows it changed. A macro because each backend's result type differs.
macro_rules! execute {
    (tx $tx:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        $crate::log::db::on_tx!($tx, |ex| sqlx::query($sql)
            $(.bind($bind))*
            .execute(ex)
            .await
            .map(|d| d.rows_affected()))
    };
    ($db:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        $crate::log::db::on_db!($db, write, |ex| sqlx::query($sql)
            $(.bind($bind))*
            .execute(ex)
            .await
            .map(|d| d.rows_affected()))
    };
}
pub(crate) use execute;

/// A time column: `timestamptz` on PostgreSQL, INTEGER milliseconds since the Unix epoch on
/// SQLite. Binding and reading times through it keeps one statement text for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ts(pub DateTime<Utc>);

impl From<Ts> for DateTime<Utc> {
    fn from(t: Ts) -> Self {
        t.0
    }
}

impl Type<Postgres> for Ts {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Ts {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Ts {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        <DateTime<Utc> as Decode<Postgres>>::decode(value).map(Ts)
    }
}

impl Type<Sqlite> for Ts {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Ts {
    fn encode_by_ref(
        &self,
        args: &mut Vec<SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        args.push(SqliteArgumentValue::Int64(self.0.timestamp_millis()));
        Ok(IsNull::No)
    }
}

impl<'r> Decode<'r, Sqlite> for Ts {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let ms = <i64 as Decode<Sqlite>>::decode(value)?;
        DateTime::from_timestamp_millis(ms)
            .map(Ts)
            .ok_or_else(|| format!("time out of range: {ms} ms").into())
    }
}

/// A list bound as one parameter: an array on PostgreSQL (`= any($1)`, `unnest($1)`), JSON text
/// on SQLite (`in (select value from json_each($1))`). Like [`Ts`], it keeps one bind for both.
#[derive(Debug, Clone, Copy)]
pub struct List<'a, T>(pub &'a [T]);

/// The condition "`column` is one of the [`List`] bound as `$param`", in the dialect of the
/// backend (`sqlite`: whether it is SQLite), so statements differ only by this fragment.
pub fn in_list(sqlite: bool, column: &str, param: u8) -> String {
    match sqlite {
        false => format!("{column} = any(${param})"),
        true => format!("{column} in (select value from json_each(${param}))"),
    }
}

impl<T> Type<Postgres> for List<'_, T>
where
    T: PgHasArrayType,
{
    fn type_info() -> PgTypeInfo {
        T::array_type_info()
    }
}

impl<'a, T> Encode<'_, Postgres> for List<'a, T>
where
    T: PgHasArrayType,
    for<'q> T: Encode<'q, Postgres> + Type<Postgres>,
{
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <&[T] as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<T> Type<Sqlite> for List<'_, T> {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}

impl<'q, T: Serialize> Encode<'q, Sqlite> for List<'_, T> {
    fn encode_by_ref(
        &self,
        args: &mut Vec<SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        <String as Encode<Sqlite>>::encode(serde_json::to_string(self.0)?, args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_open_of_one_sqlite_file_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/nested/t.db", dir.path().display());
        let first = Db::connect(&url, 2, Duration::from_secs(2)).await.unwrap();
        let err = Db::connect(&url, 2, Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use by another tailcast process"), "{err}");
        first.close().await;
        drop(first);
        let again = Db::connect(&url, 2, Duration::from_secs(2)).await.unwrap();
        again.migrate().await.unwrap();
        assert!(again.is_sqlite());
    }

    #[tokio::test]
    async fn another_spelling_of_the_same_file_is_refused_too() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        let first = format!("sqlite://{}/real/t.db", dir.path().display());
        let _db = Db::connect(&first, 2, Duration::from_secs(2))
            .await
            .unwrap();
        // A link to the database file itself would otherwise get a lock file of its own.
        std::os::unix::fs::symlink(dir.path().join("real/t.db"), dir.path().join("alias.db"))
            .unwrap();
        for other in ["alias.db", "real/../alias.db"] {
            let url = format!("sqlite://{}/{other}", dir.path().display());
            let err = Db::connect(&url, 2, Duration::from_secs(2))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("in use by another tailcast process"),
                "{other}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn an_in_memory_sqlite_database_is_refused_it_would_not_be_durable() {
        let err = Db::connect("sqlite::memory:", 2, Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be a file"), "{err}");
    }

    #[tokio::test]
    async fn urls_of_other_schemes_are_refused_by_name() {
        let err = Db::connect("mysql://root@x/db", 2, Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("use postgres://… or sqlite://PATH"), "{err}");
    }
}
