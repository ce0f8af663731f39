//! Ceilings of one PostgreSQL primary (docs/scaling.md uses these): how many NOTIFYs it
//! commits with 1, 4 and 16 tailcast nodes LISTENing, what tailcast's group-committed appends
//! reach meanwhile, and catch-up read throughput served by the primary vs moved to a
//! streaming replica. Each runs on private clusters (`pgpair`), never the shared server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sqlx::Connection;

use crate::append::{self, AppenderCounters};
use crate::pgpair::{self, Cluster};
use crate::report::Metrics;
use crate::server::Server;

/// What every ceiling scenario starts tailcast with.
pub struct Nodes<'a> {
    pub bin: &'a Path,
    pub args: &'a [String],
    pub log: &'a Path,
}

impl Nodes<'_> {
    async fn start(&self, url: &str, extra: &[String]) -> Result<Server> {
        let mut args = self.args.to_vec();
        args.extend_from_slice(extra);
        Server::start(self.bin, url, &args, self.log).await
    }
}

/// `nodes` tailcast nodes LISTEN on one private primary (one of them, the writer, takes the
/// appends). Two figures: bare `pg_notify` commits from `sessions` sessions (the primary's
/// NOTIFY ceiling with that many listeners), and `clients` single-event REST appenders on the
/// writer, whose group commits each send one NOTIFY (commits/s = notifications/s).
pub async fn notify(
    n: &Nodes<'_>,
    nodes: usize,
    sessions: usize,
    clients: usize,
    d: Duration,
    m: &mut Metrics,
) -> Result<()> {
    let pg = Cluster::primary().await?;
    let url = pg.url("tailcast");
    let key = format!("ceiling.notify.{nodes}");
    let mut servers = vec![n.start(&url, &["--node-id=writer".into()]).await?];
    for i in 1..nodes {
        let extra = [
            format!("--node-id=listen-{i}"),
            "--db-max-connections=2".into(),
        ];
        servers.push(n.start(&url, &extra).await?);
    }
    let res = async {
        wait_listening(&url, nodes).await?;
        m.set(
            &format!("{key}.raw_notify_s"),
            raw_notify(&url, sessions, d).await?,
        );
        let writer = servers[0].addr;
        let before = AppenderCounters::read(writer).await;
        let started = Instant::now();
        append::concurrent_rest(
            writer,
            "ceiling",
            clients,
            1,
            d,
            m,
            &format!("{key}.append"),
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        if let Some(commits) = AppenderCounters::commits_since(writer, before).await {
            m.set(&format!("{key}.commits_s"), commits / secs);
        }
        anyhow::Ok(())
    }
    .await;
    for s in servers {
        s.stop().await?;
    }
    res
}

/// Waits until `nodes` tailcast LISTEN sessions are connected to the primary.
async fn wait_listening(url: &str, nodes: usize) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where application_name like 'tailcast-listen:%'",
        )
        .fetch_one(&mut conn)
        .await?;
        if n as usize >= nodes {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} of {nodes} nodes LISTENing after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Commits of one `pg_notify` each on tailcast's channel, from `sessions` sessions for `d`:
/// notifications/s. The payload names a stream no node follows, so the nodes read and drop
/// every one, as they would a busy primary's notifications for streams they do not serve.
async fn raw_notify(url: &str, sessions: usize, d: Duration) -> Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + d;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (url, count) = (url.to_owned(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = sqlx::PgConnection::connect(&url).await?;
            while Instant::now() < deadline {
                sqlx::query("select pg_notify('tailcast_appends', 'bench\nceiling-nobody 1')")
                    .execute(&mut conn)
                    .await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

const REPLICA_STREAM: &str = "ceiling-catchup";

/// Catch-up throughput, served by the primary vs moved to one streaming replica: `readers`
/// clients export a seeded stream of `events` from cursor 0 again and again for `d`, while
/// `appenders` REST clients append single events; once with tailcast on the primary alone,
/// once with `--database-read-url` naming a hot standby of it.
pub async fn replica(
    n: &Nodes<'_>,
    events: u64,
    readers: usize,
    appenders: usize,
    d: Duration,
    m: &mut Metrics,
) -> Result<()> {
    let primary = Cluster::primary().await?;
    let url = primary.url("tailcast");
    // Creates the database and migrates it; then the stream is written straight into the log.
    n.start(&url, &[]).await?.stop().await?;
    crate::baseline::seed_stream(&url, REPLICA_STREAM, events).await?;
    let standby = primary.standby().await?;
    let read_url = standby.url("tailcast");
    pgpair::caught_up(&url, &read_url).await?;
    for (label, extra) in [
        ("primary", vec![]),
        ("replica", vec![format!("--database-read-url={read_url}")]),
    ] {
        let srv = n.start(&url, &extra).await?;
        let res = catch_up_under_appends(srv.addr, events, readers, appenders, d, m, label).await;
        let stats = stats(srv.addr).await;
        srv.stop().await?;
        res?;
        if label == "replica" {
            let pages = stats
                .as_ref()
                .ok()
                .and_then(|s| s["read_replicas"][0]["pages"].as_u64())
                .context("/v1/stats read_replicas")?;
            m.set("ceiling.replica.replica.pages_on_replica", pages as f64);
        }
    }
    Ok(())
}

async fn catch_up_under_appends(
    addr: SocketAddr,
    events: u64,
    readers: usize,
    appenders: usize,
    d: Duration,
    m: &mut Metrics,
    label: &str,
) -> Result<()> {
    let read = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + d;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..readers {
        let read = read.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let got = crate::catchup::read(addr, REPLICA_STREAM, events, "ndjson").await?;
                if got != events {
                    bail!("export delivered {got} events, expected {events}");
                }
                read.fetch_add(got, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let mut am = Metrics::default();
    let key = format!("ceiling.replica.{label}.append");
    if appenders > 0 {
        append::concurrent_rest(
            addr,
            &format!("load-{label}"),
            appenders,
            1,
            d,
            &mut am,
            &key,
        )
        .await?;
    }
    for t in tasks {
        t.await??;
    }
    m.set(
        &format!("ceiling.replica.{label}.catchup_events_s"),
        read.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
    );
    if let Some(v) = am.get(&format!("{key}.events_s")) {
        m.set(&format!("{key}.events_s"), v);
    }
    Ok(())
}

async fn stats(addr: SocketAddr) -> Result<serde_json::Value> {
    let mut http = crate::http::Http::connect(addr, None).await?;
    let res = http.get("/v1/stats", &[]).await?;
    use http_body_util::BodyExt;
    let body = res.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}
