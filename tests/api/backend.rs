//! The event-log backend a test runs on. `#[backend_test]` runs each test body twice, once with
//! a fresh PostgreSQL database (`sqlx::test`'s, dropped after the test) and once with a fresh
//! SQLite file in a temporary directory; the body gets a [`TestDb`] and is written once.
//!
//! Nothing is migrated here: the server applies its backend's migrations at start-up, as in
//! production. A test that writes SQL before starting a server calls `db.db.migrate()`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tailcast::log::db::Ts;
use tailcast::Db;
use tempfile::TempDir;

pub use tailcast_test_macros::backend_test;

/// The connections a test database opens for the test itself and for the servers the test
/// starts in-process (they share this handle, as a node shares its pool).
const MAX_CONNECTIONS: u32 = 10;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A test's own database, on either backend. Clones share the connections (and, on SQLite,
/// the file's lock and temporary directory, removed when the last clone goes).
#[derive(Clone)]
pub struct TestDb {
    pub db: Db,
    url: String,
    dir: Option<Arc<TempDir>>,
}

impl TestDb {
    /// The test's PostgreSQL database, through `sqlx::test`'s pool.
    pub async fn postgres(pool: PgPool) -> TestDb {
        TestDb {
            url: postgres_url(&pool),
            db: Db::Postgres(pool),
            dir: None,
        }
    }

    /// A PostgreSQL database of a cluster the test runs itself, reached at `url`.
    pub fn postgres_at(pool: PgPool, url: String) -> TestDb {
        TestDb {
            db: Db::Postgres(pool),
            url,
            dir: None,
        }
    }

    /// A new SQLite database in a temporary directory of its own.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::Builder::new()
            .prefix("tailcast-test-")
            .tempdir()
            .expect("a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("log.db").display());
        let db = Db::connect(&url, MAX_CONNECTIONS, ACQUIRE_TIMEOUT)
            .await
            .expect("open the SQLite database");
        TestDb {
            db,
            url,
            dir: Some(Arc::new(dir)),
        }
    }

    /// A URL a separate `tailcast` process can open: the test's own PostgreSQL database, or
    /// `sqlite://PATH`. (A SQLite file is one process's at a time: see [`TestDb::close`].)
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_sqlite(&self) -> bool {
        self.db.is_sqlite()
    }

    /// The PostgreSQL pool, for tests that only run on PostgreSQL.
    pub fn pg(&self) -> &PgPool {
        match &self.db {
            Db::Postgres(pool) => pool,
            Db::Sqlite(_) => panic!("a PostgreSQL-only test ran on SQLite"),
        }
    }

    /// The handle another node on this database would have. On PostgreSQL: a pool of its own
    /// whose sessions are named `tailcast-node:{node}` (so tests can terminate them). On
    /// SQLite, where one process holds the file, every node in this process shares the one
    /// handle.
    pub async fn node(&self, node: &str) -> TestDb {
        let Db::Postgres(pool) = &self.db else {
            return self.clone();
        };
        let opts = (*pool.connect_options())
            .clone()
            .application_name(&format!("tailcast-node:{node}"));
        let own = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(opts)
            .await
            .expect("node pool");
        TestDb {
            db: Db::Postgres(own),
            url: self.url.clone(),
            dir: None,
        }
    }

    /// This database with a connection pool of `max_connections` (on SQLite: that many
    /// readers, beside the one writer) whose waits give up after `acquire_timeout`. Takes
    /// the only handle: SQLite's file is reopened.
    pub async fn reopen_with(self, max_connections: u32, acquire_timeout: Duration) -> TestDb {
        match &self.db {
            Db::Postgres(pool) => {
                let small = PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(acquire_timeout)
                    .connect_with((*pool.connect_options()).clone())
                    .await
                    .expect("a pool of the given size");
                TestDb {
                    db: Db::Postgres(small),
                    ..self
                }
            }
            Db::Sqlite(_) => {
                self.close()
                    .await
                    .open_with(max_connections, acquire_timeout)
                    .await
            }
        }
    }

    /// Closes this process's hold on the database, so that a separate `tailcast` process can
    /// open it: SQLite's connections close and its lock is released. Takes the only handle
    /// (a clone alive elsewhere, say in a running `TestApp`, would keep the lock).
    pub async fn close(self) -> ClosedDb {
        match self.db {
            Db::Postgres(pool) => ClosedDb {
                url: self.url,
                dir: None,
                pool: Some(pool),
            },
            Db::Sqlite(_) => {
                self.db.close().await;
                ClosedDb {
                    url: self.url,
                    dir: self.dir,
                    pool: None,
                }
            }
        }
    }
}

/// A test database this process has no connection to (a SQLite file with its lock free),
/// for a separate `tailcast` process; its temporary directory lives as long as this does.
pub struct ClosedDb {
    url: String,
    dir: Option<Arc<TempDir>>,
    /// PostgreSQL needs no closing: `sqlx::test`'s pool stays for when the test reopens.
    pool: Option<PgPool>,
}

impl ClosedDb {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Opens the database in this process again (after the other process has exited).
    pub async fn open(self) -> TestDb {
        self.open_with(MAX_CONNECTIONS, ACQUIRE_TIMEOUT).await
    }

    async fn open_with(self, max_connections: u32, acquire_timeout: Duration) -> TestDb {
        let db = match self.pool {
            Some(pool) => Db::Postgres(pool),
            None => Db::connect(&self.url, max_connections, acquire_timeout)
                .await
                .expect("reopen the database"),
        };
        TestDb {
            db,
            url: self.url,
            dir: self.dir,
        }
    }
}

/// The URL of `sqlx::test`'s database: `DATABASE_URL` with the test database's name.
fn postgres_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let (base, query) = base
        .split_once('?')
        .map_or((base.as_str(), ""), |(b, q)| (b, q));
    let root = &base[..base.rfind('/').expect("a database path")];
    if query.is_empty() {
        format!("{root}/{db}")
    } else {
        format!("{root}/{db}?{query}")
    }
}

/// Runs `$body` with `$ex` bound to the test database's executor: PostgreSQL's pool, or
/// SQLite's one write connection (the server's own, so a test's statement never meets a busy
/// database). The body is compiled once per backend: one SQL text serves both where the
/// dialects agree (`$1` placeholders work on both).
macro_rules! on_db {
    ($db:expr, |$ex:ident| $body:expr) => {
        match &$db.db {
            ::tailcast::Db::Postgres(pool) => {
                let $ex = pool;
                $body
            }
            ::tailcast::Db::Sqlite(lite) => {
                let $ex = lite.writer();
                $body
            }
        }
    };
}
pub(crate) use on_db;

/// A time `age` ago, bound into SQL as either backend stores times (`timestamptz`, or INTEGER
/// milliseconds since the Unix epoch on SQLite).
pub fn ago(age: Duration) -> Ts {
    Ts(Utc::now() - chrono::TimeDelta::from_std(age).expect("an age in range"))
}
