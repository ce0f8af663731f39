//! The running service: shared state, start-up (database, migrations, appender), and serving
//! on an already-bound listener until a shutdown future resolves.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::api::events::Limits;
use crate::auth::{self, Authenticator};
use crate::config::Config;
use crate::live::notify::{self, ListenerConfig, ListenerStatus};
use crate::live::presence::Presence;
use crate::live::presence_sync::{self, SyncConfig};
use crate::live::{Hub, Source};
use crate::log::health::DbHealth;
use crate::log::{retention, Appender, AppenderSettings, Db, LogReader, Replicas};
use crate::metrics as m;
use crate::net::TimeoutListener;

/// Everything a handler may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    /// Where replay, export and catch-up pages are read: a read replica that has replayed
    /// far enough, or `db`.
    pub reader: LogReader,
    pub appender: Appender,
    pub hub: Arc<Hub>,
    /// Cancelled when the server begins shutting down; every SSE and WebSocket stream
    /// watches it.
    pub shutdown: CancellationToken,
    pub node_id: Arc<str>,
    pub started: Instant,
    pub prometheus: PrometheusHandle,
    pub connections: Arc<Connections>,
    /// Whether the database was reachable at the last attempt (appends fail fast if not).
    pub health: Arc<DbHealth>,
    /// The cross-node LISTEN connection's state.
    pub listener: Arc<ListenerStatus>,
    /// Turns request credentials into a `Principal`.
    pub auth: Arc<Authenticator>,
    /// Who follows which stream (this node's followers; the other nodes' through the database).
    pub presence: Arc<Presence>,
}

#[derive(Default)]
pub struct Connections {
    pub sse: AtomicUsize,
    pub ws: AtomicUsize,
}

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Sse,
    Ws,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

/// Counts one open SSE response or WebSocket for as long as it lives.
pub struct ConnectionGuard {
    connections: Arc<Connections>,
    transport: Transport,
}

impl ConnectionGuard {
    pub fn new(app: &AppState, transport: Transport) -> Self {
        app.connections
            .counter(transport)
            .fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::CONNECTIONS, "transport" => transport.label()).increment(1.0);
        ConnectionGuard {
            connections: app.connections.clone(),
            transport,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.connections
            .counter(self.transport)
            .fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::CONNECTIONS, "transport" => self.transport.label()).decrement(1.0);
    }
}

impl Connections {
    pub fn counter(&self, t: Transport) -> &AtomicUsize {
        match t {
            Transport::Sse => &self.sse,
            Transport::Ws => &self.ws,
        }
    }
}

impl AppState {
    pub fn retention_policy(&self) -> retention::Policy {
        retention::Policy {
            max_age_s: self.config.retention_max_age_s.max(0),
            max_events: self.config.retention_max_events.max(0),
            batch: self.config.retention_batch.max(1),
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.config.max_event_bytes,
            max_batch_events: self.config.max_batch_events,
        }
    }

    /// What subscriptions read from.
    pub fn source(&self) -> Source {
        Source {
            db: self.db.clone(),
            reader: self.reader.clone(),
            hub: self.hub.clone(),
            page: self.config.read_page.max(1),
            snapshot_bytes: self.config.max_snapshot_bytes,
        }
    }
}

/// A started service: state plus the background tasks to wind down at shutdown.
pub struct App {
    pub state: AppState,
    appender_task: JoinHandle<()>,
    /// Listener, retention and health probe: they end when `state.shutdown` is cancelled.
    background: Vec<JoinHandle<()>>,
}

impl App {
    /// Opens the configured database (creating it if missing), migrates, and starts.
    pub async fn connect(config: Config) -> anyhow::Result<App> {
        // Before opening the database: a refused configuration fails fast.
        auth::check_credentials(&config)?;
        crate::webhooks::client::build(&config)?;
        let db = Db::connect(
            config.database_url(),
            config.db_max_connections,
            config.db_acquire_timeout(),
        )
        .await?;
        App::with_db(config, db).await
    }

    /// Starts on an existing PostgreSQL pool.
    pub async fn with_pool(config: Config, pool: PgPool) -> anyhow::Result<App> {
        App::with_db(config, Db::Postgres(pool)).await
    }

    /// Starts on an open database (tests use a fresh one per test).
    pub async fn with_db(config: Config, db: Db) -> anyhow::Result<App> {
        let webhook_client = crate::webhooks::client::build(&config)?;
        let listen = match (&db, &config.listen_database_url) {
            (Db::Sqlite(_), Some(_)) => anyhow::bail!(
                "--listen-database-url (TAILCAST_LISTEN_DATABASE_URL) is for several nodes \
                 sharing PostgreSQL; the embedded SQLite backend serves one process: unset it, \
                 or set DATABASE_URL to a postgres:// URL"
            ),
            (Db::Sqlite(_), None) => None,
            (Db::Postgres(_), Some(url)) => Some(
                url.parse::<PgConnectOptions>()
                    .map_err(|e| anyhow::anyhow!("invalid --listen-database-url: {e}"))?,
            ),
            (Db::Postgres(pool), None) => Some((*pool.connect_options()).clone()),
        };
        let replicas = match (&db, config.database_read_url.is_empty()) {
            (_, true) => Replicas::none(),
            (Db::Sqlite(_), false) => anyhow::bail!(
                "--database-read-url (TAILCAST_DATABASE_READ_URL) names PostgreSQL streaming \
                 replicas of the primary; the embedded SQLite backend has none: unset it, or \
                 set DATABASE_URL to a postgres:// URL"
            ),
            (Db::Postgres(pool), false) => {
                Replicas::open(
                    &config.database_read_url,
                    pool,
                    config.db_max_connections,
                    config.database_read_timeout(),
                )
                .await?
            }
        };
        db.migrate().await?;
        let node_id: Arc<str> = config
            .node_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned())
            .into();
        let auth = Arc::new(Authenticator::from_config(&config)?);
        let hub = Hub::new(config.live_buffer, config.live_buffer_bytes);
        let health = DbHealth::new();
        let presence = Presence::new(node_id.clone(), !db.is_sqlite());
        let (appender, appender_task) = Appender::spawn(
            db.clone(),
            hub.clone(),
            node_id.clone(),
            AppenderSettings {
                max_batch: config.appender_max_batch,
                limits: config.tx_limits(),
            },
            health.clone(),
        );
        let shutdown = CancellationToken::new();
        let listener = Arc::new(ListenerStatus::default());
        let state = AppState {
            config: Arc::new(config),
            reader: LogReader::new(db.clone(), replicas),
            db,
            appender,
            hub,
            shutdown,
            node_id,
            started: Instant::now(),
            prometheus: m::install(),
            connections: Arc::default(),
            health,
            listener,
            auth,
            presence,
        };
        let background = start_background(&state, listen);
        tracing::info!(node_id = %state.node_id, backend = state.db.backend(), "node started");
        // These end when `state.shutdown` is cancelled, dropping their handles to the appender.
        tokio::spawn(crate::inputs::expiry::run(state.clone()));
        tokio::spawn(crate::live::leases::run(state.clone()));
        tokio::spawn(crate::webhooks::run(state.clone(), webhook_client));
        Ok(App {
            state,
            appender_task,
            background,
        })
    }

    /// Serves until `shutdown` resolves, then stops accepting, ends every SSE response and
    /// WebSocket, waits (bounded) for connections to finish, and flushes the appender.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> anyhow::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let App {
            state,
            appender_task,
            background,
        } = self;
        auth::check_listen(&state.config, listener.local_addr()?)?;
        let token = state.shutdown.clone();
        let deadline = state.config.shutdown_timeout();
        let header_timeout = state.config.header_timeout();
        let flush_grace = state.config.db_acquire_timeout() + Duration::from_secs(1);
        let listener = TimeoutListener::new(listener, state.config.write_timeout())
            .with_client_limit(state.config.max_connections_per_client)
            .with_head_limits(state.config.max_url_bytes, state.config.max_header_bytes);
        let router = api::router(state.clone());
        let appender = state.appender.clone();
        drop(state);
        {
            let token = token.clone();
            tokio::spawn(async move {
                shutdown.await;
                tracing::info!("shutting down");
                token.cancel();
            });
        }
        let mut server = tokio::spawn(crate::net::serve(
            listener,
            router,
            header_timeout,
            token.clone(),
        ));
        token.cancelled().await;
        let end = tokio::time::Instant::now() + deadline;
        if tokio::time::timeout_at(end, &mut server).await.is_err() {
            // Connections still open end with the process; their clients resume by cursor
            // or retry by event id. They may still hold appender handles, hence `close`.
            tracing::warn!(?deadline, "connections still open at the shutdown deadline");
            server.abort();
        }
        // The task commits what is queued and ends (requests still running past the
        // deadline get 503 `shutting_down`). That final commit may wait for a connection.
        appender.close();
        drop(appender);
        let flush_end = end.max(tokio::time::Instant::now() + flush_grace);
        if tokio::time::timeout_at(flush_end, appender_task)
            .await
            .is_err()
        {
            tracing::warn!("appender did not finish before the deadline");
        }
        // They watch the token, so they are already winding down.
        let rest = futures::future::join_all(background);
        if tokio::time::timeout(Duration::from_secs(1), rest)
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not finish in time");
        }
        Ok(())
    }
}

/// The tasks that run beside the server: cross-node LISTEN, retention, database probe. None
/// holds an `Appender`, so the appender still ends once the server is gone.
/// `listen` is None on SQLite: one process, nothing to hear from other nodes.
fn start_background(state: &AppState, listen: Option<PgConnectOptions>) -> Vec<JoinHandle<()>> {
    let config = &state.config;
    let mut tasks = Vec::new();
    if let (Db::Postgres(pool), Some(listen)) = (&state.db, listen) {
        tasks.push(notify::spawn(ListenerConfig {
            pool: pool.clone(),
            listen,
            hub: state.hub.clone(),
            presence: state.presence.clone(),
            node_id: state.node_id.clone(),
            page: config.read_page.max(1),
            reconnect_delay: config.reconnect_delay(),
            status: state.listener.clone(),
            health: state.health.clone(),
            shutdown: state.shutdown.clone(),
        }));
        tasks.push(presence_sync::spawn(SyncConfig {
            pool: pool.clone(),
            presence: state.presence.clone(),
            lease: config.presence_lease(),
            shutdown: state.shutdown.clone(),
        }));
    }
    let retention = retention::spawn(
        state.db.clone(),
        state.retention_policy(),
        std::time::Duration::from_millis(config.retention_interval_ms),
        state.shutdown.clone(),
    );
    let probe = state.health.spawn_probe(
        state.db.clone(),
        config.reconnect_delay(),
        state.shutdown.clone(),
    );
    tasks.extend([retention, probe]);
    tasks
}
