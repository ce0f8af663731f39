//! Every metric name in one place, each registered at start-up with its help text and unit,
//! so a fresh `/metrics` already lists every series at 0 (dashboards and alerts need not
//! wait for the first event). Names start with `tailcast_` and end in their unit; the
//! `process_*` ones follow the Prometheus client libraries' names, so stock dashboards work.

use std::time::Duration;

use metrics::Unit;
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
/// Compacted reads served, by surface (see `live::compact`).
pub const COMPACT_READS: &str = "tailcast_compact_reads_total";
/// Log events compacted reads did not send on their own, by surface.
pub const COMPACT_FOLDED: &str = "tailcast_compact_folded_events_total";
/// Log pages (replay, export, catch-up) a read replica served.
pub const REPLICA_PAGES: &str = "tailcast_replica_pages_total";
/// Log pages read from the primary although read replicas are configured, by reason.
pub const REPLICA_FALLBACKS: &str = "tailcast_replica_fallbacks_total";
pub const SLOW_CONSUMER_DISCONNECTS: &str = "tailcast_slow_consumer_disconnects_total";
pub const INPUT_REQUESTS: &str = "tailcast_input_requests_total";
pub const NOTIFY_WAKEUPS: &str = "tailcast_notify_wakeups_total";
pub const LISTEN_RECONNECTS: &str = "tailcast_listen_reconnects_total";
pub const RETENTION_DELETED: &str = "tailcast_retention_deleted_events_total";
pub const ABANDONED_STREAMS: &str = "tailcast_abandoned_streams_total";
pub const WEBHOOK_DELIVERIES: &str = "tailcast_webhook_deliveries_total";
pub const WEBHOOK_DELIVERY_LAG: &str = "tailcast_webhook_delivery_lag_seconds";
pub const WEBHOOK_ACTIVE_STREAMS: &str = "tailcast_webhook_active_streams";
pub const ACCEPT_ERRORS: &str = "tailcast_accept_errors_total";
pub const REFUSED_CONNECTIONS: &str = "tailcast_refused_connections_total";
pub const LOG_LINES_DROPPED: &str = "tailcast_log_lines_dropped_total";
pub const DB_POOL_CONNECTIONS: &str = "tailcast_db_pool_connections";
pub const DB_POOL_IDLE: &str = "tailcast_db_pool_idle_connections";
pub const DB_POOL_MAX: &str = "tailcast_db_pool_max_connections";
pub const BUILD_INFO: &str = "tailcast_build_info";
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_VSZ: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_THREADS: &str = "process_threads";
pub const PROCESS_START: &str = "process_start_time_seconds";

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: its kind, unit, help text, and the label sets registered at start-up (none
/// for metrics whose labels are only known later, like a request's route).
struct Spec {
    name: &'static str,
    kind: Kind,
    unit: Unit,
    help: &'static str,
    series: &'static [&'static [(&'static str, &'static str)]],
}

const ONE: &[&[(&str, &str)]] = &[&[]];
const TRANSPORTS: &[&[(&str, &str)]] = &[&[("transport", "sse")], &[("transport", "ws")]];
/// Where events are delivered: SSE, WebSocket, and the AI SDK UI message stream view.
const DELIVERY: &[&[(&str, &str)]] = &[
    &[("transport", "sse")],
    &[("transport", "ws")],
    &[("transport", "ui")],
];

/// Where compacted reads are served (`live::compact::Surface`).
const COMPACT_SURFACES: &[&[(&str, &str)]] = &[
    &[("surface", "rest")],
    &[("surface", "sse")],
    &[("surface", "ws")],
    &[("surface", "ui")],
];

/// Every metric tailcast exports. `build_info` and the pool and process gauges are set when
/// `/metrics` is read (see [`refresh`]).
const SPECS: &[Spec] = &[
    Spec { name: APPENDED_EVENTS, kind: Kind::Counter, unit: Unit::Count, help: "Events committed to the log (duplicates of an event id not counted).", series: ONE },
    Spec { name: APPEND_BATCHES, kind: Kind::Counter, unit: Unit::Count, help: "Group commits made by the appender.", series: ONE },
    Spec { name: APPEND_BATCH_SIZE, kind: Kind::Histogram, unit: Unit::Count, help: "Appends (requests) taken by one group commit.", series: ONE },
    Spec { name: APPEND_LATENCY, kind: Kind::Histogram, unit: Unit::Seconds, help: "Seconds from an append being queued to its caller being answered.", series: ONE },
    Spec { name: APPEND_COMMIT_SECONDS, kind: Kind::Histogram, unit: Unit::Seconds, help: "Seconds one group commit's database transaction took.", series: ONE },
    Spec { name: HTTP_REQUESTS, kind: Kind::Counter, unit: Unit::Count, help: "HTTP requests answered, by route template, method and status (a series appears with its first request).", series: &[] },
    Spec { name: HTTP_LATENCY, kind: Kind::Histogram, unit: Unit::Seconds, help: "Seconds to answer an HTTP request (to the response head for SSE), by route template.", series: &[] },
    Spec { name: CONNECTIONS, kind: Kind::Gauge, unit: Unit::Count, help: "Open SSE responses (AI SDK views included) and WebSocket connections.", series: TRANSPORTS },
    Spec { name: SUBSCRIPTIONS, kind: Kind::Gauge, unit: Unit::Count, help: "Live subscriptions on this node (SSE and WebSocket).", series: ONE },
    Spec { name: LIVE_STREAMS, kind: Kind::Gauge, unit: Unit::Count, help: "Streams with at least one live subscriber on this node.", series: ONE },
    Spec { name: DELIVERED_EVENTS, kind: Kind::Counter, unit: Unit::Count, help: "Events sent to subscribers (ui: the AI SDK view).", series: DELIVERY },
    Spec { name: DELIVERY_LATENCY, kind: Kind::Histogram, unit: Unit::Seconds, help: "Seconds from an event's commit to its sending to a live subscriber (also across nodes).", series: DELIVERY },
    Spec { name: CATCHUP_READS, kind: Kind::Counter, unit: Unit::Count, help: "Pages read from the log by subscribers catching up.", series: ONE },
    Spec { name: REPLICA_PAGES, kind: Kind::Counter, unit: Unit::Count, help: "Log pages (replay, NDJSON export, subscription catch-up) read from a read replica (--database-read-url).", series: ONE },
    Spec { name: REPLICA_FALLBACKS, kind: Kind::Counter, unit: Unit::Count, help: "Log pages read from the primary although read replicas are configured: the replica had not replayed far enough (lagging), or failed, timed out or was being skipped after a failure (unavailable).", series: &[&[("reason", "lagging")], &[("reason", "unavailable")]] },
    Spec { name: COMPACT_READS, kind: Kind::Counter, unit: Unit::Count, help: "Compacted reads served, by surface (rest: a JSON page or NDJSON export with compact=1; sse, ws: a compacted subscription; ui: the AI SDK view with compact=1).", series: COMPACT_SURFACES },
    Spec { name: COMPACT_FOLDED, kind: Kind::Counter, unit: Unit::Count, help: "Log events compacted reads did not send on their own, by surface: a folded event standing for n events counts n - 1.", series: COMPACT_SURFACES },
    Spec { name: LAG_FALLBACKS, kind: Kind::Counter, unit: Unit::Count, help: "Subscribers that overflowed their stream's live buffer and re-read the log.", series: ONE },
    Spec { name: SLOW_CONSUMER_DISCONNECTS, kind: Kind::Counter, unit: Unit::Count, help: "Clients disconnected for accepting no bytes for the write timeout (http: any HTTP response, e.g. SSE; ws: WebSocket).", series: &[&[("transport", "http")], &[("transport", "ws")]] },
    Spec { name: INPUT_REQUESTS, kind: Kind::Counter, unit: Unit::Count, help: "Input requests created (requested) and resolved (answered, expired).", series: &[&[("outcome", "requested")], &[("outcome", "answered")], &[("outcome", "expired")]] },
    Spec { name: NOTIFY_WAKEUPS, kind: Kind::Counter, unit: Unit::Count, help: "Cross-node notifications (PostgreSQL NOTIFY) this node acted on.", series: ONE },
    Spec { name: LISTEN_RECONNECTS, kind: Kind::Counter, unit: Unit::Count, help: "Times the cross-node LISTEN connection was re-established.", series: ONE },
    Spec { name: RETENTION_DELETED, kind: Kind::Counter, unit: Unit::Count, help: "Events removed by retention.", series: ONE },
    Spec { name: ABANDONED_STREAMS, kind: Kind::Counter, unit: Unit::Count, help: "Streams this node closed as abandoned because their lease lapsed.", series: ONE },
    Spec { name: WEBHOOK_DELIVERIES, kind: Kind::Counter, unit: Unit::Count, help: "Webhook POSTs by webhook id and outcome (delivered: a 2xx; failed: anything else, retried); a webhook's series appear when a node first sees it.", series: &[] },
    Spec { name: WEBHOOK_DELIVERY_LAG, kind: Kind::Histogram, unit: Unit::Seconds, help: "Seconds from an event's commit to its webhook's 2xx, by webhook id.", series: &[] },
    Spec { name: WEBHOOK_ACTIVE_STREAMS, kind: Kind::Gauge, unit: Unit::Count, help: "Streams this node is delivering each webhook to right now, by webhook id.", series: &[] },
    Spec { name: ACCEPT_ERRORS, kind: Kind::Counter, unit: Unit::Count, help: "Failed accept() calls on the listening socket (e.g. out of file descriptors).", series: ONE },
    Spec { name: REFUSED_CONNECTIONS, kind: Kind::Counter, unit: Unit::Count, help: "Connections refused because their client address was over --max-connections-per-client.", series: ONE },
    Spec { name: LOG_LINES_DROPPED, kind: Kind::Counter, unit: Unit::Count, help: "Log lines dropped because the log output did not keep up (a stalled or closed pipe).", series: ONE },
    Spec { name: DB_POOL_CONNECTIONS, kind: Kind::Gauge, unit: Unit::Count, help: "Open database connections, by pool (postgres; sqlite: writer, reader).", series: &[] },
    Spec { name: DB_POOL_IDLE, kind: Kind::Gauge, unit: Unit::Count, help: "Idle database connections, by pool.", series: &[] },
    Spec { name: DB_POOL_MAX, kind: Kind::Gauge, unit: Unit::Count, help: "Largest number of connections each pool may open.", series: &[] },
    Spec { name: BUILD_INFO, kind: Kind::Gauge, unit: Unit::Count, help: "Always 1; the labels name this binary's version and commit.", series: &[] },
    Spec { name: PROCESS_CPU, kind: Kind::Gauge, unit: Unit::Seconds, help: "Total user and system CPU time spent, in seconds.", series: &[] },
    Spec { name: PROCESS_RSS, kind: Kind::Gauge, unit: Unit::Bytes, help: "Resident memory size, in bytes.", series: &[] },
    Spec { name: PROCESS_VSZ, kind: Kind::Gauge, unit: Unit::Bytes, help: "Virtual memory size, in bytes.", series: &[] },
    Spec { name: PROCESS_OPEN_FDS, kind: Kind::Gauge, unit: Unit::Count, help: "Open file descriptors (sockets included).", series: &[] },
    Spec { name: PROCESS_MAX_FDS, kind: Kind::Gauge, unit: Unit::Count, help: "The limit on open file descriptors (soft RLIMIT_NOFILE).", series: &[] },
    Spec { name: PROCESS_THREADS, kind: Kind::Gauge, unit: Unit::Count, help: "OS threads of the process.", series: &[] },
    Spec { name: PROCESS_START, kind: Kind::Gauge, unit: Unit::Seconds, help: "Start time of the process since the Unix epoch, in seconds.", series: &[] },
];

/// The names of every metric tailcast exports (for tests and the deploy/ checks).
pub fn names() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|s| s.name)
}

/// One transport's delivery metrics (`DELIVERED_EVENTS`, `DELIVERY_LATENCY`), looked up once
/// per connection and recorded once per written chunk: a labelled lookup, a histogram record
/// and a clock read per delivered event were ~4.6% of a 1000-subscriber fan-out's CPU. The
/// counts stay exact: every event is counted, and every live event's latency is recorded
/// (events committed together share one value, recorded with `record_many`). Cloning clones
/// the two handles.
#[derive(Clone)]
pub struct Deliveries {
    events: metrics::Counter,
    latency: metrics::Histogram,
}

impl Deliveries {
    pub fn new(transport: &'static str) -> Self {
        Deliveries {
            events: metrics::counter!(DELIVERED_EVENTS, "transport" => transport),
            latency: metrics::histogram!(DELIVERY_LATENCY, "transport" => transport),
        }
    }

    /// Starts tallying one chunk written at `now`.
    pub fn batch(&self, now: std::time::Instant) -> DeliveryBatch<'_> {
        DeliveryBatch {
            latency: &self.latency,
            now,
            events: 0,
            run: None,
        }
    }

    /// Records a chunk's tally.
    pub fn record(&self, mut batch: DeliveryBatch<'_>) {
        batch.flush_run();
        if batch.events > 0 {
            self.events.increment(batch.events);
        }
    }
}

/// The deliveries of one chunk, recorded by [`Deliveries::record`].
pub struct DeliveryBatch<'a> {
    latency: &'a metrics::Histogram,
    now: std::time::Instant,
    events: u64,
    /// Consecutive live events committed at the same instant (one commit's batch).
    run: Option<(std::time::Instant, usize)>,
}

impl DeliveryBatch<'_> {
    /// Counts one delivered event.
    pub fn add(&mut self, frame: &crate::live::frame::Frame) {
        self.events += 1;
        let Some(at) = frame.committed_at else {
            return;
        };
        match &mut self.run {
            Some((t, n)) if *t == at => *n += 1,
            _ => {
                self.flush_run();
                self.run = Some((at, 1));
            }
        }
    }

    fn flush_run(&mut self) {
        if let Some((at, n)) = self.run.take() {
            let secs = self.now.saturating_duration_since(at).as_secs_f64();
            self.latency.record_many(secs, n);
        }
    }
}

/// Installs the global recorder (once per process), describes and registers every metric,
/// and returns the handle for `/metrics`.
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
            register_all();
            let upkeep = handle.clone();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
            handle
        })
        .clone()
}

fn register_all() {
    for spec in SPECS {
        let (name, unit, help) = (spec.name, spec.unit, spec.help);
        match spec.kind {
            Kind::Counter => metrics::describe_counter!(name, unit, help),
            Kind::Gauge => metrics::describe_gauge!(name, unit, help),
            Kind::Histogram => metrics::describe_histogram!(name, unit, help),
        }
        for labels in spec.series {
            let labels: Vec<metrics::Label> = labels
                .iter()
                .map(|(k, v)| metrics::Label::new(*k, *v))
                .collect();
            match spec.kind {
                Kind::Counter => metrics::counter!(name, labels).increment(0),
                Kind::Gauge => metrics::gauge!(name, labels).increment(0.0),
                // Registering is enough: an empty histogram renders zero buckets.
                Kind::Histogram => drop(metrics::histogram!(name, labels)),
            }
        }
    }
    metrics::gauge!(
        BUILD_INFO,
        "version" => crate::build::VERSION,
        "commit" => crate::build::COMMIT
    )
    .set(1.0);
    refresh_process();
}

/// Sets the gauges that are read rather than counted: the process's own resources and the
/// log-writer's drops. Called for every scrape; the database pools are set by the caller.
pub fn refresh_process() {
    metrics::counter!(LOG_LINES_DROPPED).absolute(crate::startup::dropped_log_lines());
    #[cfg(target_os = "linux")]
    if let Some(p) = process::read() {
        // A gauge, not a counter: counters hold whole numbers, CPU time wants fractions.
        metrics::gauge!(PROCESS_CPU).set(p.cpu_seconds);
        metrics::gauge!(PROCESS_RSS).set(p.rss_bytes as f64);
        metrics::gauge!(PROCESS_VSZ).set(p.vsize_bytes as f64);
        metrics::gauge!(PROCESS_OPEN_FDS).set(p.open_fds as f64);
        metrics::gauge!(PROCESS_MAX_FDS).set(p.max_fds as f64);
        metrics::gauge!(PROCESS_THREADS).set(p.threads as f64);
        metrics::gauge!(PROCESS_START).set(p.start_time_s);
    }
}

/// Reads the process's resources from /proc (Linux).
#[cfg(target_os = "linux")]
mod process {
    pub struct Process {
        pub cpu_seconds: f64,
        pub rss_bytes: u64,
        pub vsize_bytes: u64,
        pub open_fds: u64,
        pub max_fds: u64,
        pub threads: u64,
        pub start_time_s: f64,
    }

    pub fn read() -> Option<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: split after it.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): field n is f[n - 3].
        let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            0
        };
        Some(Process {
            cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
            threads: num(20)?,
            start_time_s: boot as f64 + num(22)? as f64 / ticks,
            vsize_bytes: num(23)?,
            rss_bytes: num(24)? * page,
            open_fds,
            max_fds,
        })
    }
}
