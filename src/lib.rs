//! tailcast: durable event streams for AI outputs and workflow progress.
//!
//! - [`log`]: the append-only event log (PostgreSQL, or an embedded SQLite file), the
//!   source of truth; its batched
//!   appender gives every event a gap-free per-stream `seq`.
//! - [`live`]: per-process fan-out; a [`live::Subscription`] catches up from the log from any
//!   cursor and then follows the stream live, falling back to the log whenever it lags.
//! - [`inputs`]: input requests (an agent asks, a person answers), their expiry sweeper,
//!   and stop signals, over the log and the hub.
//! - [`api`]: REST, SSE, the AI SDK UI message stream view and WebSocket surfaces, thin adapters
//!   over the three above.
//! - [`webhooks`]: durable consumers of the log that POST each event to a URL, in order,
//!   at least once, from a position stored in the database.
//! - [`app`]: start-up and serving; [`config`]: flags and environment; [`error`]: the one
//!   error type, rendered as problem+json.

pub mod api;
pub mod app;
pub mod auth;
pub mod build;
pub mod config;
pub mod error;
pub mod inputs;
pub mod live;
pub mod log;
pub mod metrics;
pub mod net;
pub mod startup;
pub mod webhooks;

pub use app::{App, AppState};
pub use config::Config;
pub use log::Db;
