//! The running service: shared state, start-up (database, migrations, appender), and serving
//! on an already-bound listener until a shutdown future resolves.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::api::events::Limits;
use crate::config::Config;
use crate::live::notify::{self, ListenerConfig, ListenerStatus};
use crate::live::{Hub, Source};
use crate::log::health::DbHealth;
use crate::log::{retention, store, Appender, MIGRATOR};
use crate::metrics as m;
use crate::net::TimeoutListener;

/// Everything a handler may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
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
            pool: self.pool.clone(),
            hub: self.hub.clone(),
            page: self.config.read_page.max(1),
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
    /// Connects to the configured database (creating it if missing), migrates, and starts.
    pub async fn connect(config: Config) -> anyhow::Result<App> {
        let url = config.database_url().to_owned();
        if let Err(e) = store::ensure_database(&url).await {
            tracing::warn!(error = %e, "could not check or create the database");
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.db_max_connections.max(2))
            .acquire_timeout(config.db_acquire_timeout())
            .connect(&url)
            .await?;
        App::with_pool(config, pool).await
    }

    /// Starts on an existing pool (tests use a fresh database per test).
    pub async fn with_pool(config: Config, pool: PgPool) -> anyhow::Result<App> {
        let listen = match &config.listen_database_url {
            Some(url) => url
                .parse::<PgConnectOptions>()
                .map_err(|e| anyhow::anyhow!("invalid --listen-database-url: {e}"))?,
            None => (*pool.connect_options()).clone(),
        };
        MIGRATOR.run(&pool).await?;
        let node_id: Arc<str> = config
            .node_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned())
            .into();
        let hub = Hub::new(config.live_buffer);
        let health = DbHealth::new();
        let (appender, appender_task) = Appender::spawn(
            pool.clone(),
            hub.clone(),
            node_id.clone(),
            config.appender_max_batch,
            health.clone(),
        );
        let shutdown = CancellationToken::new();
        let listener = Arc::new(ListenerStatus::default());
        let state = AppState {
            config: Arc::new(config),
            pool,
            appender,
            hub,
            shutdown,
            node_id,
            started: Instant::now(),
            prometheus: m::install(),
            connections: Arc::default(),
            health,
            listener,
        };
        let background = start_background(&state, listen);
        tracing::info!(node_id = %state.node_id, "node started");
        // Ends when `state.shutdown` is cancelled, dropping its handle to the appender.
        tokio::spawn(crate::live::expiry::run(state.clone()));
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
        let token = state.shutdown.clone();
        let deadline = state.config.shutdown_timeout();
        let flush_grace = state.config.db_acquire_timeout() + Duration::from_secs(1);
        let listener = TimeoutListener::new(listener, state.config.write_timeout());
        let router = api::router(state.clone());
        let appender = state.appender.clone();
        drop(state);
        let signal = {
            let token = token.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down");
                token.cancel();
            }
        };
        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<crate::net::PeerAddr>(),
        )
        .with_graceful_shutdown(signal);
        let mut server = tokio::spawn(async move { server.await });
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
fn start_background(state: &AppState, listen: PgConnectOptions) -> Vec<JoinHandle<()>> {
    let config = &state.config;
    let listener = notify::spawn(ListenerConfig {
        pool: state.pool.clone(),
        listen,
        hub: state.hub.clone(),
        node_id: state.node_id.clone(),
        page: config.read_page.max(1),
        reconnect_delay: config.reconnect_delay(),
        status: state.listener.clone(),
        health: state.health.clone(),
        shutdown: state.shutdown.clone(),
    });
    let retention = retention::spawn(
        state.pool.clone(),
        state.retention_policy(),
        std::time::Duration::from_millis(config.retention_interval_ms),
        state.shutdown.clone(),
    );
    let probe = state.health.spawn_probe(
        state.pool.clone(),
        config.reconnect_delay(),
        state.shutdown.clone(),
    );
    vec![listener, retention, probe]
}
