//! The event log: the source of truth. `model` holds the vocabulary, `store` every SQL
//! statement, `appender` the group-commit writer, `reader` catch-up and export reads.

pub mod appender;
pub mod inputs;
pub mod model;
pub mod store;

pub use appender::{AppendResult, AppendSpec, Appender, CommitSink, Committed};
pub use model::{NewEvent, StoredEvent, StreamName};

/// The embedded migrations, applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
