//! The event log: the source of truth. `model` holds the vocabulary, `db` the database
//! (PostgreSQL or embedded SQLite), `store` the log's SQL statements (each other module here
//! holds those of its own table), `appender` the group-commit writer, `replicas` where replay,
//! export and catch-up pages are read (`LogReader`: a streaming replica that has replayed far
//! enough, or the primary).

pub mod appender;
pub mod db;
pub mod durable;
pub mod health;
pub mod inputs;
pub mod leases;
pub mod model;
pub mod presence;
pub mod replicas;
pub mod retention;
pub mod stats;
pub mod store;
pub mod webhooks;

pub use appender::{AppendResult, AppendSpec, Appender, AppenderSettings, CommitSink, Committed};
pub use db::{Db, SqliteDb};
pub use model::{NewEvent, StoredEvent, StreamName};
pub use replicas::{LogReader, Replicas};
