//! Operations: liveness, readiness, Prometheus metrics, and node stats.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::AppState;
use crate::auth::Principal;
use crate::build;
use crate::error::Result;
use crate::log::stats;
use crate::metrics as m;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// Ready when the appender task is running, the database answers and every embedded
/// migration is applied.
async fn readyz(State(app): State<AppState>) -> Response {
    if !app.appender.is_running() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "appender_restarting" })),
        )
            .into_response();
    }
    let latest = app
        .db
        .migrator()
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    let applied = app.db.applied_migration();
    let check = tokio::time::timeout(std::time::Duration::from_secs(2), applied).await;
    match check {
        Ok(Ok(v)) if v >= latest => Json(json!({ "status": "ready" })).into_response(),
        Ok(Ok(v)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "migrating", "applied": v, "expected": latest })),
        )
            .into_response(),
        Ok(Err(e)) => {
            // The driver's text (hosts, table names, SQL) is for the operator's log, not for
            // whoever can reach an unauthenticated probe.
            tracing::warn!(error = %e, "readiness check: the database did not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "database_unavailable", "detail": "query failed" })),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "database_unavailable", "detail": "timed out" })),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    m::refresh_process();
    for (pool, size, idle, max) in app.db.pool_stats() {
        metrics::gauge!(m::DB_POOL_CONNECTIONS, "pool" => pool).set(f64::from(size));
        metrics::gauge!(m::DB_POOL_IDLE, "pool" => pool).set(idle as f64);
        metrics::gauge!(m::DB_POOL_MAX, "pool" => pool).set(f64::from(max));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.prometheus.render(),
    )
        .into_response()
}

async fn stats(State(app): State<AppState>, who: Principal) -> Result<Response> {
    who.check_admin()?;
    let c = &app.connections;
    // Unavailable while the database is down: the rest of the stats still help then.
    let totals = match app.health.is_down() {
        true => None,
        false => stats::totals(&app.db)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "stats: could not count streams"))
            .ok(),
    };
    // Cluster-wide from the database (this node's own from memory); absent while it is down.
    let followers = match app.health.is_down() {
        true => None,
        false => super::presence::total(&app)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "stats: could not count followers"))
            .ok(),
    };
    Ok(Json(json!({
        "node_id": &*app.node_id,
        "version": build::VERSION,
        "commit": build::COMMIT,
        "streams": totals.map(|t| t.streams),
        "events": totals.map(|t| t.events),
        "open_input_requests": totals.map(|t| t.open_input_requests),
        "leased_streams": totals.map(|t| t.leased_streams),
        "webhooks": totals.map(|t| json!({
            "registered": t.webhooks,
            "failing_streams": t.failing_webhook_streams,
        })),
        "uptime_s": app.started.elapsed().as_secs(),
        "connections": {
            "sse": c.sse.load(Ordering::Relaxed),
            "ws": c.ws.load(Ordering::Relaxed),
        },
        "subscriptions": app.hub.subscriptions(),
        "live_streams": app.hub.live_streams(),
        "lag_fallbacks": app.hub.lag_fallbacks(),
        // Presence: followers (subscriptions) on every node, and on this one.
        "presence": {
            "followers": followers,
            "local_followers": app.presence.local_total(),
            "writes": app.presence.writes(),
        },
        "database": if app.health.is_down() { "unavailable" } else { "ok" },
        "backend": app.db.backend(),
        // --database-read-url: what each replica served, and what went to the primary.
        "read_replicas": app.reader.replicas().stats(),
        // The cross-node LISTEN session; none on SQLite (one node).
        "listener": (!app.db.is_sqlite()).then(|| json!({
            "connected": app.listener.connected(),
            "reconnects": app.listener.reconnects(),
        })),
    }))
    .into_response())
}
