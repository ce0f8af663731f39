//! The one configuration struct: command-line flags, each also readable from a `TAILCAST_*`
//! environment variable (and `DATABASE_URL`). Secrets are never printed by `Debug`.

use std::fmt;
use std::time::Duration;

use clap::Parser;

/// The database used when `DATABASE_URL` is not set: the embedded backend, in a directory
/// of the working directory (created if missing).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://tailcast-data/tailcast.db";

#[derive(Parser, Clone)]
#[command(
    name = "tailcast",
    version = crate::build::LONG_VERSION,
    about = "Durable event streams over SSE and WebSocket",
    after_help = "Every flag can also be set by the environment variable shown beside it. \
                  Documentation: README.md, openapi.yaml and docs/websocket.md in the source."
)]
pub struct Config {
    /// Address to listen on, HOST:PORT: an IP address (`0.0.0.0:8080`, `[::]:8080`) or a host
    /// name (`localhost:8080`); port 0 picks a free port.
    #[arg(
        long,
        env = "TAILCAST_LISTEN",
        default_value = "127.0.0.1:8080",
        help_heading = "Server"
    )]
    pub listen: String,

    /// The event log's database: postgres://… (the production store; created if missing; the
    /// only one for several nodes) or sqlite://PATH (embedded, one process). Without it,
    /// sqlite://tailcast-data/tailcast.db in the working directory.
    #[arg(long, env = "DATABASE_URL", help_heading = "Storage")]
    pub database_url: Option<String>,

    /// Largest pool of database connections (on PostgreSQL the appender has up to 4 more of
    /// its own).
    #[arg(
        long,
        env = "TAILCAST_DB_MAX_CONNECTIONS",
        default_value_t = 16,
        help_heading = "Storage"
    )]
    pub db_max_connections: u32,

    /// Largest `data` of one event, in bytes.
    #[arg(long, env = "TAILCAST_MAX_EVENT_BYTES", default_value_t = 1 << 20, help_heading = "Limits")]
    pub max_event_bytes: usize,

    /// Most events in one append.
    #[arg(
        long,
        env = "TAILCAST_MAX_BATCH_EVENTS",
        default_value_t = 1000,
        help_heading = "Limits"
    )]
    pub max_batch_events: usize,

    /// Largest append request body, in bytes.
    #[arg(long, env = "TAILCAST_MAX_BATCH_BYTES", default_value_t = 8 << 20, help_heading = "Limits")]
    pub max_batch_bytes: usize,

    /// Most appends one group commit may take.
    #[arg(
        long,
        env = "TAILCAST_APPENDER_MAX_BATCH",
        default_value_t = 2000,
        help_heading = "Storage"
    )]
    pub appender_max_batch: usize,

    /// Events read from the log per page during catch-up and export.
    #[arg(
        long,
        env = "TAILCAST_READ_PAGE",
        default_value_t = 1000,
        help_heading = "Streaming"
    )]
    pub read_page: i64,

    /// Live batches buffered per stream before a slow subscriber falls back to the log.
    #[arg(
        long,
        env = "TAILCAST_LIVE_BUFFER",
        default_value_t = 1024,
        help_heading = "Streaming"
    )]
    pub live_buffer: usize,

    /// Bytes of live events buffered per stream (on this node) for subscribers that have not
    /// taken them yet; one that falls further behind re-reads the log. The newest batch is
    /// always kept, whatever its size.
    #[arg(
        long,
        env = "TAILCAST_LIVE_BUFFER_BYTES",
        default_value_t = 4 << 20,
        help_heading = "Streaming"
    )]
    pub live_buffer_bytes: usize,

    /// Seconds between SSE keep-alive comments.
    #[arg(
        long,
        env = "TAILCAST_SSE_KEEPALIVE_S",
        default_value_t = 15,
        help_heading = "Streaming"
    )]
    pub sse_keepalive_s: u64,

    /// Reconnection delay suggested to EventSource clients (`retry:`), in milliseconds.
    #[arg(
        long,
        env = "TAILCAST_SSE_RETRY_MS",
        default_value_t = 2000,
        help_heading = "Streaming"
    )]
    pub sse_retry_ms: u64,

    /// A client that accepts no bytes for this many seconds is disconnected (it resumes by cursor).
    #[arg(
        long,
        env = "TAILCAST_WRITE_TIMEOUT_S",
        default_value_t = 30,
        help_heading = "Streaming"
    )]
    pub write_timeout_s: u64,

    /// Seconds the server waits for connections to finish at shutdown.
    #[arg(
        long,
        env = "TAILCAST_SHUTDOWN_TIMEOUT_S",
        default_value_t = 10,
        help_heading = "Server"
    )]
    pub shutdown_timeout_s: u64,

    /// Log format: `text` or `json`.
    #[arg(
        long,
        env = "TAILCAST_LOG_FORMAT",
        default_value = "text",
        help_heading = "Server"
    )]
    pub log_format: String,

    /// Milliseconds between the WebSocket Ping frames the server sends; a connection silent
    /// for three times this is closed.
    #[arg(
        long,
        env = "TAILCAST_WS_HEARTBEAT_MS",
        default_value_t = 30_000,
        help_heading = "Streaming"
    )]
    pub ws_heartbeat_ms: u64,

    /// Largest WebSocket message a client may send, in bytes (0: the batch limit plus 64 KiB,
    /// so any batch REST accepts also fits in a `publish`). Larger ones close with 1009.
    #[arg(
        long,
        env = "TAILCAST_WS_MAX_MESSAGE_BYTES",
        default_value_t = 0,
        help_heading = "Streaming"
    )]
    pub ws_max_message_bytes: usize,

    /// Messages queued for one WebSocket before its subscriptions stop being read (they
    /// resume from the log once the client catches up).
    #[arg(
        long,
        env = "TAILCAST_WS_SEND_QUEUE",
        default_value_t = 256,
        help_heading = "Streaming"
    )]
    pub ws_send_queue: usize,

    /// Bytes of messages queued for one WebSocket (and not yet written to its socket) before
    /// its subscriptions stop being read; at least one message is always let through.
    #[arg(
        long,
        env = "TAILCAST_WS_SEND_QUEUE_BYTES",
        default_value_t = 1 << 20,
        help_heading = "Streaming"
    )]
    pub ws_send_queue_bytes: usize,

    /// Most subscriptions one WebSocket may hold at once.
    #[arg(
        long,
        env = "TAILCAST_WS_MAX_SUBSCRIPTIONS",
        default_value_t = 1000,
        help_heading = "Streaming"
    )]
    pub ws_max_subscriptions: usize,

    /// Bytes of event data one WebSocket's subscriptions may hold read from the log and not
    /// yet sent (their catch-up pages), together; a subscription waits for its share. One
    /// event larger than this is still read, alone.
    #[arg(
        long,
        env = "TAILCAST_WS_CATCHUP_BYTES",
        default_value_t = 32 << 20,
        help_heading = "Streaming"
    )]
    pub ws_catchup_bytes: usize,

    /// How long an input request stays open when it gives no `timeout_ms`.
    #[arg(
        long,
        env = "TAILCAST_INPUT_TIMEOUT_MS",
        default_value_t = 600_000,
        help_heading = "Input requests"
    )]
    pub input_timeout_ms: u64,

    /// Milliseconds between passes that expire due input requests (and repair announcements
    /// a crash interrupted).
    #[arg(
        long,
        env = "TAILCAST_INPUT_SWEEP_MS",
        default_value_t = 1000,
        help_heading = "Input requests"
    )]
    pub input_sweep_ms: u64,

    /// Milliseconds between passes that close streams whose lease lapsed (with
    /// `stream.closed` {"reason":"abandoned"}).
    #[arg(
        long,
        env = "TAILCAST_LEASE_SWEEP_MS",
        default_value_t = 1000,
        help_heading = "Leases"
    )]
    pub lease_sweep_ms: u64,

    /// Milliseconds between a node's looks for webhook deliveries to start (how long a new
    /// event may wait before its delivery begins).
    #[arg(
        long,
        env = "TAILCAST_WEBHOOK_POLL_MS",
        default_value_t = 500,
        help_heading = "Webhooks"
    )]
    pub webhook_poll_ms: u64,

    /// Milliseconds one webhook POST may take (connecting included) before it counts as failed.
    #[arg(
        long,
        env = "TAILCAST_WEBHOOK_TIMEOUT_MS",
        default_value_t = 10_000,
        help_heading = "Webhooks"
    )]
    pub webhook_timeout_ms: u64,

    /// Milliseconds a node's claim on delivering one webhook on one stream lasts unless
    /// renewed: after a node dies, another takes its deliveries over this long after its last
    /// renewal. At least twice the timeout (raised to that if set lower).
    #[arg(
        long,
        env = "TAILCAST_WEBHOOK_LEASE_MS",
        default_value_t = 30_000,
        help_heading = "Webhooks"
    )]
    pub webhook_lease_ms: u64,

    /// Delay before the first retry of a failed webhook POST; each further retry waits twice
    /// as long, up to --webhook-retry-max-ms.
    #[arg(
        long,
        env = "TAILCAST_WEBHOOK_RETRY_MS",
        default_value_t = 500,
        help_heading = "Webhooks"
    )]
    pub webhook_retry_ms: u64,

    /// Longest delay between retries of a failing webhook POST.
    #[arg(
        long,
        env = "TAILCAST_WEBHOOK_RETRY_MAX_MS",
        default_value_t = 60_000,
        help_heading = "Webhooks"
    )]
    pub webhook_retry_max_ms: u64,

    /// Streams one node delivers a webhook to at the same time (each stream in seq order).
    #[arg(
        long,
        env = "TAILCAST_WEBHOOK_CONCURRENCY",
        default_value_t = 8,
        help_heading = "Webhooks"
    )]
    pub webhook_concurrency: usize,

    /// A PEM file of CA certificates trusted for `https://` webhook endpoints besides the
    /// system's (for endpoints behind a private CA). Read at start-up: a missing or invalid
    /// file stops it.
    #[arg(
        long,
        env = "TAILCAST_WEBHOOK_CA_FILE",
        value_name = "PEM",
        help_heading = "Webhooks"
    )]
    pub webhook_ca_file: Option<std::path::PathBuf>,

    /// How long a Durable Streams long-poll read (`/v1/stream/{name}?live=long-poll`) waits
    /// for new data before answering 204.
    #[arg(
        long,
        env = "TAILCAST_DS_LONG_POLL_MS",
        default_value_t = 20_000,
        help_heading = "Streaming"
    )]
    pub ds_long_poll_ms: u64,

    /// This node's name in stats and logs (default: a random id).
    #[arg(long, env = "TAILCAST_NODE_ID", help_heading = "Server")]
    pub node_id: Option<String>,

    /// Milliseconds a node's presence (who follows which stream through it) outlives its last
    /// renewal: a node that dies takes its followers with it within this time. Renewed every
    /// quarter of it; 1000-15000.
    #[arg(
        long,
        env = "TAILCAST_PRESENCE_LEASE_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1000..=15_000),
        help_heading = "Server"
    )]
    pub presence_lease_ms: u64,

    /// PostgreSQL URL for this node's LISTEN session, when `DATABASE_URL` goes through a
    /// transaction-mode pooler (which drops LISTEN); default: the same as `DATABASE_URL`.
    #[arg(
        long,
        env = "TAILCAST_LISTEN_DATABASE_URL",
        hide_env_values = true,
        help_heading = "Storage"
    )]
    pub listen_database_url: Option<String>,

    /// A PostgreSQL streaming replica (hot standby) of the primary, for replay, NDJSON export
    /// and subscription catch-up; repeat the flag or separate URLs with commas. A read goes
    /// to a replica only if it has replayed every event the read needs; otherwise, or if the
    /// replica does not answer, it reads the primary. Appends, locks, LISTEN and input
    /// requests always use the primary.
    #[arg(
        long,
        env = "TAILCAST_DATABASE_READ_URL",
        value_delimiter = ',',
        hide_env_values = true,
        help_heading = "Storage"
    )]
    pub database_read_url: Vec<String>,

    /// Milliseconds a read may spend on a replica (connecting included) before it reads the
    /// primary instead; a replica that failed is left alone for a while (backoff to 30 s).
    #[arg(
        long,
        env = "TAILCAST_DATABASE_READ_TIMEOUT_MS",
        default_value_t = 1000,
        help_heading = "Storage"
    )]
    pub database_read_timeout_ms: u64,

    /// Milliseconds an operation waits for a database connection before failing with 503
    /// `unavailable`.
    #[arg(
        long,
        env = "TAILCAST_DB_ACQUIRE_TIMEOUT_MS",
        default_value_t = 2000,
        help_heading = "Storage"
    )]
    pub db_acquire_timeout_ms: u64,

    /// First delay, in milliseconds, before re-establishing a lost LISTEN connection (or
    /// re-probing an unreachable database); doubled per failure up to 5 s.
    #[arg(
        long,
        env = "TAILCAST_RECONNECT_DELAY_MS",
        default_value_t = 100,
        help_heading = "Storage"
    )]
    pub reconnect_delay_ms: u64,

    /// Seconds an append may wait for a stream's row lock held by another transaction
    /// (PostgreSQL `lock_timeout`; 0: forever). Past it the append fails with 503
    /// `unavailable` and nothing is stored.
    #[arg(
        long,
        env = "TAILCAST_LOCK_TIMEOUT_S",
        default_value_t = 10,
        help_heading = "Storage"
    )]
    pub lock_timeout_s: u64,

    /// Seconds a write transaction's session may sit idle inside it before PostgreSQL ends
    /// the session and releases its locks (`idle_in_transaction_session_timeout`; 0: never):
    /// a frozen node cannot hold its streams' locks longer than this.
    #[arg(
        long,
        env = "TAILCAST_IDLE_IN_TRANSACTION_TIMEOUT_S",
        default_value_t = 5,
        help_heading = "Storage"
    )]
    pub idle_in_transaction_timeout_s: u64,

    /// Default retention: events older than this many seconds are removed (0: keep forever).
    /// Streams may override it (`PUT /v1/streams/{stream}/retention`).
    #[arg(
        long,
        env = "TAILCAST_RETENTION_MAX_AGE_S",
        default_value_t = 0,
        help_heading = "Retention"
    )]
    pub retention_max_age_s: i64,

    /// Default retention: only the newest this many events of a stream are kept (0: all).
    #[arg(
        long,
        env = "TAILCAST_RETENTION_MAX_EVENTS",
        default_value_t = 0,
        help_heading = "Retention"
    )]
    pub retention_max_events: i64,

    /// Milliseconds between retention passes.
    #[arg(
        long,
        env = "TAILCAST_RETENTION_INTERVAL_MS",
        default_value_t = 60_000,
        help_heading = "Retention"
    )]
    pub retention_interval_ms: u64,

    /// Most events one retention statement deletes (keeps each transaction short).
    #[arg(
        long,
        env = "TAILCAST_RETENTION_BATCH",
        default_value_t = 10_000,
        help_heading = "Retention"
    )]
    pub retention_batch: i64,
    /// Secret for HS256 JWTs (README "Auth and limits"). With it or an admin token, every
    /// `/v1` request needs a token.
    #[arg(
        long,
        env = "TAILCAST_JWT_SECRET",
        hide_env_values = true,
        help_heading = "Auth"
    )]
    pub jwt_secret: Option<String>,

    /// A static bearer token with every grant, for operators.
    #[arg(
        long,
        env = "TAILCAST_ADMIN_TOKEN",
        hide_env_values = true,
        help_heading = "Auth"
    )]
    pub admin_token: Option<String>,

    /// Serve without credentials on a non-loopback address (everyone may do everything).
    #[arg(long, env = "TAILCAST_ALLOW_ANONYMOUS", help_heading = "Auth")]
    pub allow_anonymous: bool,

    /// Browser origins allowed by CORS and for WebSocket connections, comma-separated
    /// (`*` = any). Without it only same-origin browser WebSockets are accepted.
    #[arg(
        long,
        env = "TAILCAST_CORS_ORIGINS",
        value_delimiter = ',',
        help_heading = "Auth"
    )]
    pub cors_origins: Vec<String>,

    /// Most open connections from one client IP address (0 = no limit).
    #[arg(
        long,
        env = "TAILCAST_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 1024,
        help_heading = "Limits"
    )]
    pub max_connections_per_client: usize,

    /// Publishes (appends, closes, input requests) per second per token subject, or per
    /// client address when anonymous (0 = no limit).
    #[arg(
        long,
        env = "TAILCAST_PUBLISH_RATE",
        default_value_t = 0.0,
        help_heading = "Limits"
    )]
    pub publish_rate: f64,

    /// Publishes a caller may make in a burst above the rate.
    #[arg(
        long,
        env = "TAILCAST_PUBLISH_BURST",
        default_value_t = 100,
        help_heading = "Limits"
    )]
    pub publish_burst: u32,

    /// Longest request target (path and query), in bytes: longer gets 414.
    #[arg(long, env = "TAILCAST_MAX_URL_BYTES", default_value_t = 8 << 10, help_heading = "Limits")]
    pub max_url_bytes: usize,

    /// Largest total of request header names and values, in bytes: larger gets 431.
    #[arg(long, env = "TAILCAST_MAX_HEADER_BYTES", default_value_t = 16 << 10, help_heading = "Limits")]
    pub max_header_bytes: usize,

    /// Largest snapshot (the newest event of every key) built for one request or subscriber,
    /// in bytes of event data: larger gets 413 `snapshot_too_large` (read the log instead).
    #[arg(long, env = "TAILCAST_MAX_SNAPSHOT_BYTES", default_value_t = 64 << 20, help_heading = "Limits")]
    pub max_snapshot_bytes: usize,

    /// Seconds a client has to send a request's headers; slower connections are closed.
    /// It also bounds how long an idle keep-alive connection stays open.
    #[arg(
        long,
        env = "TAILCAST_HEADER_TIMEOUT_S",
        default_value_t = 30,
        help_heading = "Limits"
    )]
    pub header_timeout_s: u64,

    /// Seconds a client has to send a whole request body: slower gets 408.
    #[arg(
        long,
        env = "TAILCAST_BODY_TIMEOUT_S",
        default_value_t = 30,
        help_heading = "Limits"
    )]
    pub body_timeout_s: u64,
}

impl Config {
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL)
    }

    pub fn sse_keepalive(&self) -> Duration {
        Duration::from_secs(self.sse_keepalive_s.max(1))
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_s.max(1))
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_s.max(1))
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_s.max(1))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_s)
    }

    pub fn db_acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms.max(1))
    }

    pub fn database_read_timeout(&self) -> Duration {
        Duration::from_millis(self.database_read_timeout_ms.max(1))
    }

    pub fn reconnect_delay(&self) -> Duration {
        Duration::from_millis(self.reconnect_delay_ms.max(1))
    }

    pub fn ws_heartbeat(&self) -> Duration {
        Duration::from_millis(self.ws_heartbeat_ms.max(10))
    }

    pub fn ws_max_message(&self) -> usize {
        match self.ws_max_message_bytes {
            0 => self.max_batch_bytes + (64 << 10),
            n => n,
        }
    }

    /// The limits on the appender's PostgreSQL transactions.
    pub fn tx_limits(&self) -> crate::log::db::TxLimits {
        crate::log::db::TxLimits {
            lock_s: self.lock_timeout_s,
            idle_in_transaction_s: self.idle_in_transaction_timeout_s,
        }
    }

    pub fn presence_lease(&self) -> Duration {
        Duration::from_millis(self.presence_lease_ms.clamp(1000, 15_000))
    }

    pub fn input_sweep(&self) -> Duration {
        Duration::from_millis(self.input_sweep_ms.max(10))
    }

    pub fn lease_sweep(&self) -> Duration {
        Duration::from_millis(self.lease_sweep_ms.max(10))
    }

    pub fn webhook_poll(&self) -> Duration {
        Duration::from_millis(self.webhook_poll_ms.max(10))
    }

    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_millis(self.webhook_timeout_ms.max(10))
    }

    /// The delivery claim: never shorter than two POST timeouts, so a claim renewed before a
    /// POST outlives it.
    pub fn webhook_lease(&self) -> Duration {
        Duration::from_millis(self.webhook_lease_ms).max(self.webhook_timeout() * 2)
    }

    /// The delay before retry `attempt` (1: the first retry).
    pub fn webhook_retry_delay(&self, attempt: u32) -> Duration {
        let first = self.webhook_retry_ms.max(1);
        let ms = first.saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        Duration::from_millis(ms.min(self.webhook_retry_max_ms.max(first)))
    }

    /// A configuration with every default, for tests and embedding.
    pub fn for_database(url: &str) -> Self {
        let mut c = Config::parse_from(["tailcast"]);
        c.database_url = Some(url.to_owned());
        c.listen = "127.0.0.1:0".to_owned();
        c
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The database URL may carry a password: show only scheme and host.
        let db = self
            .database_url()
            .split('@')
            .next_back()
            .unwrap_or_default();
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database", &db)
            .field("read_replicas", &self.database_read_url.len())
            .field("max_event_bytes", &self.max_event_bytes)
            .field("max_batch_events", &self.max_batch_events)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "<set>"))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("allow_anonymous", &self.allow_anonymous)
            .field("cors_origins", &self.cors_origins)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The values between backticks in a README table cell.
    fn backticked(cell: &str) -> Vec<&str> {
        cell.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn every_flag_the_readme_documents_exists_with_its_env_var() {
        let readme = include_str!("../README.md");
        let cmd = Config::command();
        let mut rows = 0;
        for line in readme.lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let envs = backticked(cells[2]);
            for (i, flag) in backticked(cells[1]).into_iter().enumerate() {
                let long = flag.trim_start_matches("--");
                let arg = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .unwrap_or_else(|| panic!("README documents {flag}, which tailcast lacks"));
                // `…_BURST` abbreviates the row's first variable.
                if let Some(env) = envs.get(i).filter(|e| !e.starts_with('…')) {
                    assert_eq!(
                        arg.get_env().and_then(|e| e.to_str()),
                        Some(*env),
                        "README's env var for {flag}"
                    );
                }
                rows += 1;
            }
        }
        assert!(
            rows > 20,
            "README's flag tables were not found ({rows} flags)"
        );
        assert!(
            readme.contains(&format!("`{DEFAULT_DATABASE_URL}`")),
            "README names the default database"
        );
    }
}
