//! tailcast-bench: the load generator and benchmark harness. It starts tailcast itself (so it
//! can read its RSS and SIGKILL it), on PostgreSQL or on the embedded SQLite store
//! (`--store`), measures raw baselines of that store in the same database (or file), runs
//! every scenario for a fixed, bounded duration, and writes JSON plus Markdown tables.
//!
//! `run` is the full benchmark (bench/run drives it); `smoke` runs every scenario for about
//! two seconds at tiny sizes and only checks that each completes (scripts/test runs it).

mod append;
mod baseline;
mod catchup;
mod ceiling;
mod durability;
mod fanout;
mod http;
mod idle;
mod joiner;
mod lite;
mod peers;
mod pgpair;
mod procs;
mod report;
mod server;
mod sse;
mod store;
mod util;
mod ws;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use sqlx::{Connection, Executor};

use append::AppenderCounters;
use fanout::{Fanout, Transport};
use report::{Machine, Metrics, Report};
use server::Server;
use store::{Store, StoreDb};

#[derive(Parser)]
#[command(
    name = "tailcast-bench",
    about = "Benchmarks tailcast against raw PostgreSQL or raw SQLite"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The full benchmark.
    Run(RunArgs),
    /// Every scenario for ~2 s at tiny sizes; fails if any scenario fails, never on timing.
    Smoke(RunArgs),
    /// Rewrites the results section of a Markdown file from a results JSON file (the
    /// section of the JSON's store: each store has its own markers).
    Report {
        #[arg(long)]
        json: PathBuf,
        #[arg(long)]
        markdown: PathBuf,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The tailcast binary to benchmark (a release build for real numbers).
    #[arg(long, default_value = "target/release/tailcast")]
    server_bin: PathBuf,
    /// The event log tailcast runs on: `postgres` (a fresh database on the server of
    /// --database-url) or `sqlite` (a fresh file, `bench.db`, in a new directory under
    /// --sqlite-dir).
    #[arg(long, value_enum, default_value_t = Store::Postgres)]
    store: Store,
    /// A PostgreSQL URL whose user may create databases; each invocation creates a fresh one.
    /// Only for `--store postgres`.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Where `--store sqlite` creates its fresh directory (default: the system's temporary
    /// directory). Put it on the disk you mean to measure: an fsync on tmpfs costs nothing.
    #[arg(long)]
    sqlite_dir: Option<PathBuf>,
    /// Repetitions of the whole scenario set.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds each timed scenario runs.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Only scenarios whose name starts with one of these (comma-separated). Without it,
    /// every scenario on PostgreSQL; on SQLite those of SQLITE_SCENARIOS.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra arguments for tailcast (e.g. generous connection limits).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Where to write the results JSON.
    #[arg(long, default_value = "bench/results/latest.json")]
    out: PathBuf,
    /// Keep the benchmark database (or the SQLite directory) afterwards.
    #[arg(long)]
    keep_db: bool,
    /// The command line to record in the report (bench/run passes its own).
    #[arg(long)]
    command: Option<String>,
    /// nginx for the Nchan peer scenarios (`nchan.*`); without it (or --nchan-module) they
    /// are skipped.
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// nginx's Nchan module (Debian's libnginx-mod-nchan: ngx_nchan_module.so).
    #[arg(long)]
    nchan_module: Option<PathBuf>,
    /// The Sockudo binary for the Sockudo peer scenarios (`sockudo.*`); without it they are
    /// skipped.
    #[arg(long)]
    sockudo: Option<PathBuf>,
}

impl RunArgs {
    fn peer_bins(&self) -> peers::PeerBins {
        peers::PeerBins {
            nginx: self.nginx.clone(),
            nchan_module: self.nchan_module.clone(),
            sockudo: self.sockudo.clone(),
        }
    }
}

/// Scenario sizes: the full benchmark, or the tiny smoke run.
#[derive(Debug, Clone, Serialize)]
struct Sizes {
    duration_s: u64,
    clients: usize,
    batch_clients: usize,
    batch: usize,
    ws_window: usize,
    rate: u64,
    fanout: Vec<usize>,
    many_streams: usize,
    many_rate: u64,
    catchup_events: u64,
    idle_connections: usize,
    durability_producers: usize,
    durability_subscribers: usize,
    /// Tokens of the answer a late joiner opens (`joiner`).
    joiner_tokens: u64,
    /// Listening nodes in the NOTIFY ceiling scenarios (`ceiling.notify.N`).
    notify_nodes: Vec<usize>,
    /// Sessions committing bare NOTIFYs there.
    notify_sessions: usize,
    /// The stream, readers and concurrent appenders of `ceiling.replica`.
    replica_events: u64,
    replica_readers: usize,
    replica_appenders: usize,
    /// Publishes per second of the peers' publish-cost scenario (`nchan.publish`).
    publish_rate: u64,
}

impl Sizes {
    fn full(duration_s: u64) -> Self {
        Sizes {
            duration_s,
            clients: 64,
            batch_clients: 8,
            batch: 100,
            ws_window: 16,
            rate: 100,
            fanout: vec![100, 1000, 5000],
            many_streams: 10_000,
            many_rate: 1000,
            catchup_events: 1_000_000,
            idle_connections: 10_000,
            durability_producers: 8,
            durability_subscribers: 8,
            joiner_tokens: 10_000,
            notify_nodes: vec![1, 4, 16],
            notify_sessions: 16,
            replica_events: 200_000,
            replica_readers: 4,
            replica_appenders: 16,
            publish_rate: 200,
        }
    }

    fn smoke() -> Self {
        Sizes {
            duration_s: 2,
            clients: 4,
            batch_clients: 2,
            batch: 100,
            ws_window: 4,
            rate: 50,
            fanout: vec![5],
            many_streams: 10,
            many_rate: 50,
            catchup_events: 2000,
            idle_connections: 20,
            durability_producers: 2,
            durability_subscribers: 2,
            joiner_tokens: 500,
            notify_nodes: vec![1, 2],
            notify_sessions: 2,
            replica_events: 2000,
            replica_readers: 2,
            replica_appenders: 2,
            publish_rate: 20,
        }
    }
}

struct Bench {
    args: RunArgs,
    /// A smoke run: the peer scenarios run without `--only` if their programs are present.
    smoke: bool,
    /// Peers whose scenarios were wanted but skipped (their program is missing).
    skipped: std::sync::Mutex<Vec<&'static str>>,
    sizes: Sizes,
    db: StoreDb,
    /// The DATABASE_URL the server gets.
    db_url: String,
    log: PathBuf,
}

const CATCHUP_STREAM: &str = "catchup";

/// What `--store sqlite` runs when no `--only` is given: what differs between the stores
/// (the write path, reads of the log, recovery after SIGKILL). Fan-out, many streams and idle
/// connections exercise the in-process hub, the same code on both; name them in `--only` to
/// run them on SQLite too.
const SQLITE_SCENARIOS: &[&str] = &["baseline", "append", "catchup", "joiner", "durability"];

/// The peers (`nchan.*`, `sockudo.*`): tailcast against another server, PostgreSQL runs only.
/// A full run includes them only when `--only` names them (bench/run installs the peer first);
/// a smoke run includes them when their programs are already present.
const PEERS: &[&str] = &["nchan", "sockudo"];

fn is_peer(name: &str) -> bool {
    PEERS.iter().any(|p| name.starts_with(p))
}

impl Bench {
    fn wants(&self, name: &str) -> bool {
        if self.args.only.is_empty() {
            if is_peer(name) {
                return self.smoke && self.args.store == Store::Postgres;
            }
            return match self.args.store {
                Store::Postgres => true,
                Store::Sqlite => SQLITE_SCENARIOS.iter().any(|p| name.starts_with(p)),
            };
        }
        self.args.only.iter().any(|o| name.starts_with(o.as_str()))
    }

    /// True if any selected scenario lies under `prefix` (e.g. "catchup" for "catchup.sse").
    fn wants_any(&self, prefix: &str) -> bool {
        self.wants(prefix) || self.args.only.iter().any(|o| o.starts_with(prefix))
    }

    fn dur(&self) -> Duration {
        Duration::from_secs(self.sizes.duration_s)
    }

    async fn server(&self) -> Result<Server> {
        Server::start(
            &self.args.server_bin,
            &self.db_url,
            &self.args.server_args,
            &self.log,
        )
        .await
    }

    /// One scenario on a fresh server; its failure is recorded, not fatal to the others.
    async fn scenario<F, Fut>(
        &self,
        run: usize,
        name: &str,
        m: &mut Metrics,
        errors: &mut Vec<String>,
        f: F,
    ) where
        F: FnOnce(Server, Metrics) -> Fut,
        Fut: std::future::Future<Output = (Metrics, Result<()>)>,
    {
        if !self.wants(name) {
            return;
        }
        eprintln!("run {run}: {name}");
        let limit = self.dur() * 6 + Duration::from_secs(300);
        let res = match self.server().await {
            Err(e) => Err(e),
            Ok(server) => match tokio::time::timeout(limit, f(server, std::mem::take(m))).await {
                Ok((back, res)) => {
                    *m = back;
                    res
                }
                Err(_) => Err(anyhow::anyhow!("did not finish within {limit:?}")),
            },
        };
        if let Err(e) = res {
            eprintln!("run {run}: {name} FAILED: {e:#}");
            errors.push(format!("run {run}: {name}: {e:#}"));
        }
    }

    /// A scenario that starts its own PostgreSQL clusters and nodes (the ceilings).
    async fn own_clusters<F, Fut>(
        &self,
        run: usize,
        name: &str,
        m: &mut Metrics,
        errors: &mut Vec<String>,
        f: F,
    ) where
        F: FnOnce(Metrics) -> Fut,
        Fut: std::future::Future<Output = (Metrics, Result<()>)>,
    {
        if !self.wants(name) {
            return;
        }
        eprintln!("run {run}: {name}");
        let limit = self.dur() * 6 + Duration::from_secs(600);
        let res = match tokio::time::timeout(limit, f(std::mem::take(m))).await {
            Ok((back, res)) => {
                *m = back;
                res
            }
            Err(_) => Err(anyhow::anyhow!("did not finish within {limit:?}")),
        };
        if let Err(e) = res {
            eprintln!("run {run}: {name} FAILED: {e:#}");
            errors.push(format!("run {run}: {name}: {e:#}"));
        }
    }

    /// The ceilings of one primary, on private clusters (PostgreSQL runs only).
    async fn ceilings(&self, run: usize, m: &mut Metrics, errors: &mut Vec<String>) {
        let s = self.sizes.clone();
        let d = self.dur();
        let nodes = ceiling::Nodes {
            bin: &self.args.server_bin,
            args: &self.args.server_args,
            log: &self.log,
        };
        let nodes = &nodes;
        for &n in &s.notify_nodes {
            let name = format!("ceiling.notify.{n}");
            let (sessions, clients) = (s.notify_sessions, s.clients);
            self.own_clusters(run, &name, m, errors, |mut m| async move {
                let res = ceiling::notify(nodes, n, sessions, clients, d, &mut m).await;
                (m, res)
            })
            .await;
        }
        self.own_clusters(run, "ceiling.replica", m, errors, |mut m| async move {
            let res = ceiling::replica(
                nodes,
                s.replica_events,
                s.replica_readers,
                s.replica_appenders,
                d,
                &mut m,
            )
            .await;
            (m, res)
        })
        .await;
    }

    async fn run_once(&self, run: usize, errors: &mut Vec<String>) -> Metrics {
        let mut m = Metrics::default();
        let d = self.dur();
        let s = self.sizes.clone();
        let url = self.db_url.clone();

        match &self.db {
            StoreDb::Postgres { .. } => {
                self.scenario(run, "baseline", &mut m, errors, |srv, mut m| async move {
                    let res = async {
                        baseline::prepare(&url).await?;
                        baseline::row_per_tx(&url, 1, d, &mut m, "base.row_tx_1").await?;
                        baseline::row_per_tx(&url, s.clients, d, &mut m, "base.row_tx_64").await?;
                        baseline::multi_row(
                            &url,
                            s.batch_clients,
                            s.batch,
                            d,
                            &mut m,
                            "base.multirow_100",
                        )
                        .await?;
                        baseline::copy_in(&url, 50_000, d, &mut m, "base.copy_in").await?;
                        let rows =
                            baseline::copy_out(&url, CATCHUP_STREAM, &mut m, "base.copy_out")
                                .await?;
                        if rows != s.catchup_events {
                            bail!("COPY read {rows} rows, expected {}", s.catchup_events);
                        }
                        Ok(())
                    }
                    .await;
                    (m, finish(srv, res).await)
                })
                .await;
            }
            StoreDb::Sqlite { path } => {
                let path = path.clone();
                self.scenario(run, "baseline", &mut m, errors, |srv, mut m| async move {
                    // Nothing else writes to the file while the baselines run.
                    let stopped = srv.stop().await;
                    let res = async {
                        lite::prepare(&path).await?;
                        lite::row_per_tx(&path, d, &mut m, "lite.row_tx_1").await?;
                        lite::multi_row(&path, s.batch, 1, d, &mut m, "lite.multirow_100").await?;
                        lite::multi_row(&path, s.clients, s.clients, d, &mut m, "lite.spread_64")
                            .await?;
                        let rows =
                            lite::read_stream(&path, CATCHUP_STREAM, &mut m, "lite.read_seq")
                                .await?;
                        if rows != s.catchup_events {
                            bail!("read {rows} rows, expected {}", s.catchup_events);
                        }
                        Ok(())
                    }
                    .await;
                    (m, res.and(stopped))
                })
                .await;
            }
        }

        let addr_run = format!("r{run}");
        self.scenario(run, "append", &mut m, errors, |srv, mut m| async move {
            let a = srv.addr;
            // Each figure also gets the server's own view of it (append requests per commit,
            // mean commit time), read from /metrics before and after.
            let res = async {
                let c = AppenderCounters::read(a).await;
                append::sequential(a, &format!("seq-{addr_run}"), d, &mut m).await?;
                AppenderCounters::record_since(a, c, &mut m, "append.seq").await;
                let c = AppenderCounters::read(a).await;
                append::concurrent_rest(
                    a,
                    &format!("rest-{addr_run}"),
                    s.clients,
                    1,
                    d,
                    &mut m,
                    "append.rest64",
                )
                .await?;
                AppenderCounters::record_since(a, c, &mut m, "append.rest64").await;
                let c = AppenderCounters::read(a).await;
                append::concurrent_rest(
                    a,
                    &format!("batch-{addr_run}"),
                    s.batch_clients,
                    s.batch,
                    d,
                    &mut m,
                    "append.batch100",
                )
                .await?;
                AppenderCounters::record_since(a, c, &mut m, "append.batch100").await;
                let c = AppenderCounters::read(a).await;
                append::concurrent_ws(
                    a,
                    &format!("ws-{addr_run}"),
                    s.clients,
                    s.ws_window,
                    d,
                    &mut m,
                )
                .await?;
                AppenderCounters::record_since(a, c, &mut m, "append.ws64").await;
                anyhow::Ok(())
            }
            .await;
            (m, finish(srv, res).await)
        })
        .await;

        for transport in [Transport::Sse, Transport::Ws] {
            for &n in &self.sizes.fanout {
                let t = transport.label();
                let f = Fanout {
                    transport,
                    subscribers: n,
                    streams: 1,
                    rate: s.rate,
                    duration: d,
                    prefix: format!("fan-{t}-{n}-r{run}"),
                };
                self.scenario(
                    run,
                    &format!("fanout.{t}.{n}"),
                    &mut m,
                    errors,
                    |srv, mut m| async move {
                        let res = f.run(srv.addr, &mut m, &format!("fanout.{t}.{n}")).await;
                        (m, finish(srv, res).await)
                    },
                )
                .await;
            }
        }

        let f = Fanout {
            transport: Transport::Sse,
            subscribers: s.many_streams,
            streams: s.many_streams,
            rate: s.many_rate,
            duration: d,
            prefix: format!("many-r{run}"),
        };
        self.scenario(run, "streams", &mut m, errors, |srv, mut m| async move {
            let res = f.run(srv.addr, &mut m, "streams.sse").await;
            m.set("streams.sse.streams", s.many_streams as f64);
            (m, finish(srv, res).await)
        })
        .await;

        for via in ["sse", "ws", "ndjson"] {
            self.scenario(
                run,
                &format!("catchup.{via}"),
                &mut m,
                errors,
                |srv, mut m| async move {
                    let res =
                        catchup::catch_up(srv.addr, CATCHUP_STREAM, s.catchup_events, via, &mut m)
                            .await;
                    (m, finish(srv, res).await)
                },
            )
            .await;
        }

        self.scenario(run, "joiner", &mut m, errors, |srv, mut m| async move {
            let res = joiner::late_joiner(srv.addr, s.joiner_tokens, run, &mut m).await;
            (m, finish(srv, res).await)
        })
        .await;

        for via in ["sse", "ws"] {
            let prefix = format!("idle-{via}-r{run}");
            self.scenario(
                run,
                &format!("idle.{via}"),
                &mut m,
                errors,
                |srv, mut m| async move {
                    let res = idle::idle(&srv, via, s.idle_connections, &prefix, &mut m).await;
                    (m, finish(srv, res).await)
                },
            )
            .await;
        }

        let dur_test = durability::Durability {
            producers: s.durability_producers,
            subscribers: s.durability_subscribers,
            duration: d,
            stream: format!("durable-r{run}"),
        };
        let db = self.db.clone();
        self.scenario(
            run,
            "durability",
            &mut m,
            errors,
            |mut srv, mut m| async move {
                let res = dur_test.run(&mut srv, &db, &mut m).await;
                let res = match res {
                    Ok(()) if m.get("durability.ok") != Some(1.0) => {
                        Err(anyhow::anyhow!("durability check failed"))
                    }
                    other => other,
                };
                (m, finish(srv, res).await)
            },
        )
        .await;
        if matches!(self.db, StoreDb::Postgres { .. }) {
            self.ceilings(run, &mut m, errors).await;
            self.peers(run, &mut m, errors).await;
        }
        m
    }

    /// Each peer scenario runs on tailcast, then on the peer (peers.rs); a peer whose program
    /// is missing is skipped, said so, and counted neither as passed nor as failed.
    async fn peers(&self, run: usize, m: &mut Metrics, errors: &mut Vec<String>) {
        let s = self.sizes.clone();
        let d = self.dur();
        let bins = self.args.peer_bins();
        for (label, peer, what) in [
            (
                "nchan",
                bins.nchan(),
                "nginx with the Nchan module (--nginx, --nchan-module)",
            ),
            ("sockudo", bins.sockudo(), "the Sockudo binary (--sockudo)"),
        ] {
            let mut scenarios: Vec<(String, peers::Scenario)> = s
                .fanout
                .iter()
                .map(|&n| {
                    (
                        format!("{label}.fanout.{n}"),
                        peers::Scenario::Fanout {
                            subscribers: n,
                            rate: s.rate,
                            duration: d,
                        },
                    )
                })
                .collect();
            scenarios.push((
                format!("{label}.idle"),
                peers::Scenario::Idle {
                    connections: s.idle_connections,
                },
            ));
            if label == "nchan" {
                scenarios.push((
                    "nchan.publish".into(),
                    peers::Scenario::Publish {
                        rate: s.publish_rate,
                        duration: d,
                    },
                ));
            }
            scenarios.retain(|(name, _)| self.wants(name));
            if scenarios.is_empty() {
                continue;
            }
            let Some(peer) = peer else {
                self.skipped.lock().expect("skipped").push(label);
                eprintln!(
                    "run {run}: {label}: SKIPPED, {what} not found (`bench/run --only {label}` \
                     installs it); its scenarios were not run and count as nothing"
                );
                continue;
            };
            for (name, scenario) in scenarios {
                let (peer, url, key) = (peer.clone(), self.db_url.clone(), name.clone());
                let prefix = format!("{}-r{run}", name.replace('.', "-"));
                self.scenario(run, &name, m, errors, |srv, mut m| async move {
                    let res =
                        peers::compare(&peer, &scenario, srv, &url, &prefix, &mut m, &key).await;
                    (m, res)
                })
                .await;
            }
        }
    }
}

/// Stops the server, keeping the scenario's error (or the stop's) for the report.
async fn finish(srv: Server, res: Result<()>) -> Result<()> {
    let stopped = srv.stop().await;
    res.and(stopped)
}

fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine(postgres: String, sqlite: String, data_dir: String) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        cpu,
        kernel: kernel.trim().to_owned(),
        postgres,
        sqlite,
        data_dir,
    }
}

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg gives them: on a machine shared
/// with other work, the report says how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The type of the filesystem holding `dir` (what an fsync costs depends on it).
fn filesystem(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs(2) on a NUL-terminated path into a zeroed struct it fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    match st.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        other => format!("filesystem 0x{other:x}"),
    }
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").context("DATABASE_URL is not a URL")? + 3;
    let path = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let host = path.map_or(base, |p| &base[..p]);
    Ok(match query {
        Some(q) => format!("{host}/{db}?{q}"),
        None => format!("{host}/{db}"),
    })
}

/// A fresh PostgreSQL database: its URL, the server's version, and the admin connection
/// that drops it afterwards.
async fn fresh_pg_database(url: &str, name: &str) -> Result<(String, String, sqlx::PgConnection)> {
    let mut admin = sqlx::PgConnection::connect(url)
        .await
        .context("connecting to DATABASE_URL")?;
    let version: String = sqlx::query_scalar("select version()")
        .fetch_one(&mut admin)
        .await?;
    let version = version.split(" on ").next().unwrap_or_default().to_owned();
    admin
        .execute(format!("create database \"{name}\"").as_str())
        .await?;
    Ok((with_database(url, name)?, version, admin))
}

async fn bench(args: RunArgs, sizes: Sizes, smoke: bool) -> Result<Report> {
    if !args.server_bin.exists() {
        bail!("{} not found (build it first)", args.server_bin.display());
    }
    let started_utc = utc_now();
    let load_start = load_average();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let name = format!("tailcast_bench_{stamp}_{}", std::process::id());
    let (db, postgres, mut admin, sqlite_dir) = match args.store {
        Store::Postgres => {
            let url = args
                .database_url
                .as_deref()
                .context("--store postgres needs DATABASE_URL (or --database-url)")?;
            let (url, version, admin) = fresh_pg_database(url, &name).await?;
            (StoreDb::Postgres { url }, version, Some(admin), None)
        }
        Store::Sqlite => {
            let parent = args.sqlite_dir.clone().unwrap_or_else(std::env::temp_dir);
            let dir = parent.join(name.replace('_', "-"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let dir = dir.canonicalize()?;
            let path = dir.join("bench.db");
            (StoreDb::Sqlite { path }, String::new(), None, Some(dir))
        }
    };
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = args.out.with_extension("server.log");
    let _ = std::fs::remove_file(&log);
    let b = Bench {
        smoke,
        skipped: Default::default(),
        args: args.clone(),
        sizes: sizes.clone(),
        db_url: db.server_url(),
        db: db.clone(),
        log,
    };

    let outcome = async {
        // Migrate (the server does it at start-up; on SQLite it also creates the file), then
        // seed the stream catch-up reads, with the server stopped.
        b.server().await?.stop().await?;
        let (sqlite, data_dir) = match &db {
            StoreDb::Postgres { .. } => (String::new(), String::new()),
            StoreDb::Sqlite { path } => {
                let dir = path.parent().unwrap_or(Path::new("/"));
                let fs = filesystem(dir);
                if fs == "tmpfs" {
                    eprintln!(
                        "warning: {} is on tmpfs, where fsync costs nothing; use --sqlite-dir",
                        dir.display()
                    );
                }
                (
                    lite::version(path).await?,
                    format!("{} on {fs}", dir.display()),
                )
            }
        };
        if b.wants_any("baseline") || b.wants_any("catchup") {
            eprintln!("seeding {} events for catch-up", sizes.catchup_events);
            db.seed_stream(CATCHUP_STREAM, sizes.catchup_events).await?;
        }
        let mut runs = Vec::new();
        let mut errors = Vec::new();
        for run in 1..=args.runs {
            runs.push(b.run_once(run, &mut errors).await);
        }
        anyhow::Ok((runs, errors, sqlite, data_dir))
    }
    .await;
    if !args.keep_db {
        if let Some(admin) = admin.as_mut() {
            let _ = admin
                .execute(format!("drop database \"{name}\" with (force)").as_str())
                .await;
        }
        if let Some(dir) = &sqlite_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    } else if let Some(dir) = &sqlite_dir {
        eprintln!("kept {}", dir.display());
    }
    let (runs, errors, sqlite, data_dir) = outcome?;
    let skipped = b.skipped.lock().expect("skipped").clone();
    if !skipped.is_empty() {
        eprintln!(
            "SKIPPED (not run, counted neither as passed nor as failed): the {} peer scenarios",
            skipped.join(" and ")
        );
    }
    let command = args
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    Ok(Report {
        command,
        store: args.store,
        started_utc,
        finished_utc: utc_now(),
        load_start,
        load_end: load_average(),
        machine: machine(postgres, sqlite, data_dir),
        sizes: serde_json::to_value(&sizes)?,
        runs,
        errors,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => {
            let sizes = Sizes::full(args.duration);
            let out = args.out.clone();
            let report = bench(args, sizes, false).await?;
            std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
            eprintln!("wrote {}", out.display());
            if !report.errors.is_empty() {
                eprintln!(
                    "{} scenario(s) failed:\n  {}",
                    report.errors.len(),
                    report.errors.join("\n  ")
                );
            }
        }
        Cmd::Smoke(mut args) => {
            args.runs = 1;
            let out = args.out.clone();
            let report = bench(args, Sizes::smoke(), true).await?;
            std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
            if !report.errors.is_empty() {
                bail!(
                    "{} smoke scenario(s) failed:\n  {}",
                    report.errors.len(),
                    report.errors.join("\n  ")
                );
            }
            eprintln!("smoke: every scenario that ran completed");
        }
        Cmd::Report { json, markdown } => {
            let report: Report = serde_json::from_slice(&std::fs::read(&json)?)?;
            let fanout: Vec<usize> = report.sizes["fanout"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|n| n as usize))
                        .collect()
                })
                .unwrap_or_default();
            let mut doc = std::fs::read_to_string(&markdown)?;
            // A run of only the ceilings (`--only ceiling`) leaves the store's tables alone,
            // and a run without them leaves the ceilings' alone.
            if report.has(|k| !k.starts_with("ceiling.") && !is_peer(k)) {
                doc = report::splice(report.store, &doc, &report.markdown(&fanout)).with_context(
                    || {
                        format!(
                            "{} has no {} results markers",
                            markdown.display(),
                            report::markers(report.store).0
                        )
                    },
                )?;
            }
            if report.has(|k| k.starts_with("ceiling.")) {
                let nodes: Vec<usize> = report.sizes["notify_nodes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_u64().map(|n| n as usize))
                            .collect()
                    })
                    .unwrap_or_default();
                doc = report::splice_between(
                    report::CEILING_MARKERS,
                    &doc,
                    &report.markdown_ceiling(&nodes),
                )
                .with_context(|| {
                    format!(
                        "{} has no {} markers",
                        markdown.display(),
                        report::CEILING_MARKERS.0
                    )
                })?;
            }
            for (peer, marks) in report::PEER_MARKERS {
                if report.has(|k| k.starts_with(&format!("{peer}."))) {
                    doc = report::splice_between(marks, &doc, &report.markdown_peer(peer))
                        .with_context(|| {
                            format!("{} has no {} markers", markdown.display(), marks.0)
                        })?;
                }
            }
            std::fs::write(&markdown, doc)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x").unwrap(),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/postgres?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
    }
}
