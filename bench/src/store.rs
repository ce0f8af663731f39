//! The event-log backend the server under test runs on, and the direct access to it the
//! harness needs besides HTTP: seeding a long stream, and reading the log back after the
//! durability run.

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Which store a benchmark invocation runs tailcast on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    /// A fresh database on the PostgreSQL of DATABASE_URL.
    #[default]
    Postgres,
    /// The embedded store: a fresh SQLite file in a new temporary directory.
    Sqlite,
}

/// The benchmark's own database: a fresh PostgreSQL database, or a fresh SQLite file.
#[derive(Clone, Debug)]
pub enum StoreDb {
    Postgres { url: String },
    Sqlite { path: PathBuf },
}

impl StoreDb {
    /// The DATABASE_URL tailcast gets (`sqlite:///abs/path.db` for an absolute path).
    pub fn server_url(&self) -> String {
        match self {
            StoreDb::Postgres { url } => url.clone(),
            StoreDb::Sqlite { path } => format!("sqlite://{}", path.display()),
        }
    }

    /// Writes `n` events as stream `name` straight into the log (the server must be stopped
    /// on SQLite, and must have migrated the database once).
    pub async fn seed_stream(&self, name: &str, n: u64) -> Result<()> {
        match self {
            StoreDb::Postgres { url } => crate::baseline::seed_stream(url, name, n).await,
            StoreDb::Sqlite { path } => crate::lite::seed_stream(path, name, n).await,
        }
    }

    /// (seq, event id) of every event of `stream`, in seq order, from the database itself.
    pub async fn read_log(&self, stream: &str) -> Result<Vec<(u64, Option<String>)>> {
        match self {
            StoreDb::Postgres { url } => crate::durability::read_pg_log(url, stream).await,
            StoreDb::Sqlite { path } => crate::lite::read_log(path, stream).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absolute_sqlite_path_makes_a_three_slash_url() {
        let db = StoreDb::Sqlite {
            path: "/tmp/x/bench.db".into(),
        };
        assert_eq!(db.server_url(), "sqlite:///tmp/x/bench.db");
    }
}
