//! The running service: shared state, start-up (database, migrations, appender), and serving
//! on an already-bound listener until a shutdown future resolves.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::api::events::Limits;
use crate::auth::{self, Authenticator};
use crate::config::Config;
use crate::live::{Hub, Source};
use crate::log::{store, Appender, MIGRATOR};
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
    /// Turns request credentials into a `Principal`.
    pub auth: Arc<Authenticator>,
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
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(&url)
            .await?;
        App::with_pool(config, pool).await
    }

    /// Starts on an existing pool (tests use a fresh database per test).
    pub async fn with_pool(config: Config, pool: PgPool) -> anyhow::Result<App> {
        MIGRATOR.run(&pool).await?;
        let node_id: Arc<str> = config
            .node_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned())
            .into();
        let auth = Arc::new(Authenticator::from_config(&config)?);
        let hub = Hub::new(config.live_buffer);
        let (appender, appender_task) = Appender::spawn(
            pool.clone(),
            hub.clone(),
            node_id.clone(),
            config.appender_max_batch,
        );
        let state = AppState {
            config: Arc::new(config),
            pool,
            appender,
            hub,
            shutdown: CancellationToken::new(),
            node_id,
            started: Instant::now(),
            prometheus: m::install(),
            connections: Arc::default(),
            auth,
        };
        // Ends when `state.shutdown` is cancelled, dropping its handle to the appender.
        tokio::spawn(crate::live::expiry::run(state.clone()));
        Ok(App {
            state,
            appender_task,
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
        } = self;
        auth::check_listen(&state.config, listener.local_addr()?)?;
        let token = state.shutdown.clone();
        let deadline = state.config.shutdown_timeout();
        let header_timeout = state.config.header_timeout();
        let listener = TimeoutListener::new(listener, state.config.write_timeout())
            .with_client_limit(state.config.max_connections_per_client);
        let router = api::router(state.clone());
        drop(state);
        {
            let token = token.clone();
            tokio::spawn(async move {
                shutdown.await;
                tracing::info!("shutting down");
                token.cancel();
            });
        }
        let server = tokio::spawn(crate::net::serve(
            listener,
            router,
            header_timeout,
            token.clone(),
        ));
        token.cancelled().await;
        if tokio::time::timeout(deadline, server).await.is_err() {
            tracing::warn!(?deadline, "connections still open at the shutdown deadline");
        }
        // Every handle to the appender is gone once the router is: the task drains what is
        // queued, commits it, and ends.
        if tokio::time::timeout(deadline, appender_task).await.is_err() {
            tracing::warn!("appender did not finish before the deadline");
        }
        Ok(())
    }
}
