//! Every metric name in one place. Names start with `tailcast_`; units are in the name.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const APPENDED_EVENTS: &str = "tailcast_appended_events_total";
pub const APPEND_BATCHES: &str = "tailcast_append_batches_total";
/// Times the appender task failed and was restarted by its supervisor.
pub const APPENDER_RESTARTS: &str = "tailcast_appender_restarts_total";
pub const APPEND_BATCH_SIZE: &str = "tailcast_append_batch_size";
pub const APPEND_LATENCY: &str = "tailcast_append_latency_seconds";
pub const APPEND_COMMIT_SECONDS: &str = "tailcast_append_commit_seconds";
pub const HTTP_REQUESTS: &str = "tailcast_http_requests_total";
pub const HTTP_LATENCY: &str = "tailcast_http_request_duration_seconds";
pub const CONNECTIONS: &str = "tailcast_connections";
pub const SUBSCRIPTIONS: &str = "tailcast_subscriptions";
pub const LIVE_STREAMS: &str = "tailcast_live_streams";
pub const DELIVERED_EVENTS: &str = "tailcast_delivered_events_total";
pub const DELIVERY_LATENCY: &str = "tailcast_delivery_latency_seconds";
pub const CATCHUP_READS: &str = "tailcast_catchup_reads_total";
pub const LAG_FALLBACKS: &str = "tailcast_lag_fallbacks_total";
pub const SLOW_CONSUMER_DISCONNECTS: &str = "tailcast_slow_consumer_disconnects_total";
pub const INPUT_REQUESTS: &str = "tailcast_input_requests_total";
pub const NOTIFY_WAKEUPS: &str = "tailcast_notify_wakeups_total";
pub const LISTEN_RECONNECTS: &str = "tailcast_listen_reconnects_total";
pub const RETENTION_DELETED: &str = "tailcast_retention_deleted_events_total";
pub const ACCEPT_ERRORS: &str = "tailcast_accept_errors_total";
pub const REFUSED_CONNECTIONS: &str = "tailcast_refused_connections_total";

/// Installs the global recorder (once per process) and returns its handle for `/metrics`.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let sizes = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(APPEND_BATCH_SIZE.into()), &sizes)
                })
                .expect("static buckets are valid")
                .install_recorder()
                .expect("one recorder per process");
            let upkeep = handle.clone();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
            handle
        })
        .clone()
}
