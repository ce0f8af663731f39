//! The event log: the source of truth. `model` holds the vocabulary, `db` the database
//! (PostgreSQL or embedded SQLite), `store` every SQL statement, `appender` the group-commit writer, `reader` catch-up and export reads.

pub mod appender;
pub mod db;
pub mod durable;
pub mod health;
pub mod inputs;
pub mod leases;
pub mod model;
pub mod presence;
pub mod retention;
pub mod stats;
pub mod store;
pub mod webhooks;

pub use appender::{AppendResult, AppendSpec, Appender, AppenderSettings, CommitSink, Committed};
pub use db::{Db, SqliteDb};
pub use model::{NewEvent, StoredEvent, StreamName};
