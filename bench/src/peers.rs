//! Peers: the same scenarios against tailcast and against another server with the same load
//! generator, one after the other within one run, so that each figure has a tailcast/peer
//! ratio. The peers are
//! - Nchan (nginx's pub/sub module, Debian's `libnginx-mod-nchan`): a private nginx (own
//!   prefix and configuration in a temporary directory, loopback port, memory store, 2
//!   workers, `reuseport`) with an EventSource subscriber location and an HTTP publisher
//!   location; against tailcast's SSE.
//! - Sockudo (a Pusher-protocol WebSocket server in Rust, crates.io), local adapter and memory
//!   app manager, per-app limits raised, rate limiter off, loopback only; subscribers send
//!   `pusher:subscribe`, the publisher uses its HTTP events API with the Pusher signature
//!   (md5 of the body, HMAC-SHA256 of the request); against tailcast's WebSocket.
//!
//! tailcast always publishes with single-event REST appends. Server CPU is read from /proc
//! (user + system time of the server's processes: tailcast; nginx's master and workers;
//! Sockudo) around the measured window; for tailcast, the CPU of the PostgreSQL backends
//! serving its database is counted separately. Memory is the processes' proportional set
//! size (Pss, so nginx's shared zone counts once, not once per worker).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::http::{source_ip, tcp, Http};
use crate::idle::{masked_text_frame, open_sse, open_ws, read_until};
use crate::procs::{pss_kib, CpuSnapshot, PgBackends};
use crate::report::Metrics;
use crate::server::Server;
use crate::util::{event_json, now_us, payload, percentiles_ms, u64_after, Latencies};

/// Where the peers' programs are (bench/run finds or installs them).
#[derive(Clone, Debug, Default)]
pub struct PeerBins {
    pub nginx: Option<PathBuf>,
    pub nchan_module: Option<PathBuf>,
    pub sockudo: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub enum Peer {
    Nchan { nginx: PathBuf, module: PathBuf },
    Sockudo { bin: PathBuf },
}

impl Peer {
    pub fn label(&self) -> &'static str {
        match self {
            Peer::Nchan { .. } => "nchan",
            Peer::Sockudo { .. } => "sockudo",
        }
    }

    /// tailcast's transport in this peer's scenarios.
    fn websocket(&self) -> bool {
        matches!(self, Peer::Sockudo { .. })
    }
}

impl PeerBins {
    pub fn nchan(&self) -> Option<Peer> {
        Some(Peer::Nchan {
            nginx: self.nginx.clone().filter(|p| p.exists())?,
            module: self.nchan_module.clone().filter(|p| p.exists())?,
        })
    }

    pub fn sockudo(&self) -> Option<Peer> {
        Some(Peer::Sockudo {
            bin: self.sockudo.clone().filter(|p| p.exists())?,
        })
    }
}

/// The Sockudo app the benchmark configures (loopback only; these are not secrets).
const APP_ID: &str = "bench";
const APP_KEY: &str = "bench-key";
const APP_SECRET: &str = "bench-secret";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Tailcast,
    Nchan,
    Sockudo,
}

/// One side of a comparison: who serves, where, and which processes to measure.
struct Side {
    target: Target,
    /// tailcast over WebSocket (else SSE); the peers have one transport each.
    ws: bool,
    addr: SocketAddr,
    pids: Vec<u32>,
}

/// A running peer: its process (nginx's master, or Sockudo), its port and its directory.
struct PeerProc {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    target: Target,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn private_dir(label: &str) -> Result<PathBuf> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tailcast-bench-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// nginx with Nchan: 2 workers, reuseport, memory store; `/sub/ID` is an EventSource
/// subscriber, `/pub/ID` the HTTP publisher of channel ID.
pub fn nginx_conf(dir: &Path, module: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"load_module {module};
worker_processes 2;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{
  worker_connections 30000;
}}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  nchan_shared_memory_size 256m;
  server {{
    listen 127.0.0.1:{port} reuseport;
    location ~ ^/sub/([\w-]+)$ {{
      nchan_subscriber eventsource;
      nchan_channel_id $1;
    }}
    location ~ ^/pub/([\w-]+)$ {{
      nchan_publisher http;
      nchan_channel_id $1;
      nchan_message_buffer_length 1000;
      nchan_message_timeout 5m;
    }}
  }}
}}
"#,
        module = module.display()
    )
}

/// Sockudo: loopback, local adapter, memory app manager and cache, no queue, no metrics
/// listener, rate limiter off, and one app whose connection and event limits are raised.
pub fn sockudo_conf(port: u16) -> String {
    serde_json::json!({
        "host": "127.0.0.1",
        "port": port,
        "debug": false,
        "adapter": { "driver": "local" },
        "app_manager": {
            "driver": "memory",
            "array": { "apps": [{
                "id": APP_ID,
                "key": APP_KEY,
                "secret": APP_SECRET,
                "enabled": true,
                "max_connections": 1_000_000,
                "enable_client_messages": false,
                "max_backend_events_per_second": 1_000_000,
                "max_client_events_per_second": 1_000_000,
                "max_read_requests_per_second": 1_000_000,
                "max_event_payload_in_kb": 100
            }] }
        },
        "cache": { "driver": "memory" },
        "queue": { "driver": "none" },
        "rate_limiter": { "enabled": false },
        "metrics": { "enabled": false, "host": "127.0.0.1" }
    })
    .to_string()
}

impl PeerProc {
    async fn start(peer: &Peer) -> Result<PeerProc> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = private_dir(peer.label())?;
        let log = std::fs::File::create(dir.join("stdout.log"))?;
        let (mut cmd, target) = match peer {
            Peer::Nchan { nginx, module } => {
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&dir, module, port))?;
                let mut cmd = Command::new(nginx);
                cmd.arg("-p")
                    .arg(&dir)
                    .arg("-c")
                    .arg(&conf)
                    .arg("-e")
                    .arg(dir.join("error.log"));
                (cmd, Target::Nchan)
            }
            Peer::Sockudo { bin } => {
                let conf = dir.join("sockudo.json");
                std::fs::write(&conf, sockudo_conf(port))?;
                let mut cmd = Command::new(bin);
                // Its settings come from the file alone: no inherited environment overrides.
                cmd.arg("--config")
                    .arg(&conf)
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default());
                (cmd, Target::Sockudo)
            }
        };
        let child = cmd
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", peer.label()))?;
        let mut p = PeerProc {
            child,
            addr,
            dir,
            target,
        };
        if let Err(e) = p.wait_ready().await {
            let _ = p.stop().await;
            return Err(e);
        }
        Ok(p)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Sockudo's /up is 200 once its app manager is up; any answer of Nchan's publisher
        // location (404: no such channel yet) means nginx serves.
        let probe = match self.target {
            Target::Sockudo => "/up",
            _ => "/pub/ready-probe",
        };
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{:?} exited during start-up ({status}); see {}",
                    self.target,
                    self.dir.display()
                );
            }
            if let Ok(mut http) = Http::connect(self.addr, None).await {
                let res = if self.target == Target::Nchan {
                    http.get(probe, &[]).await.is_ok()
                } else {
                    matches!(http.get(probe, &[]).await, Ok(r) if r.status().is_success())
                };
                if res {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{:?} not ready after 60 s; see {}",
                    self.target,
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The processes to measure: the one started, and its children (nginx's workers).
    fn pids(&self) -> Vec<u32> {
        let Some(pid) = self.child.id() else {
            return Vec::new();
        };
        let mut v = vec![pid];
        v.extend(crate::procs::children(pid));
        v
    }

    fn side(&self, ws: bool) -> Side {
        Side {
            target: self.target,
            ws,
            addr: self.addr,
            pids: self.pids(),
        }
    }

    /// SIGTERM (nginx: fast shutdown), SIGKILL after 15 s; the directory is removed.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
                .await
                .is_err()
            {
                self.child.start_kill()?;
                self.child.wait().await?;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

/// What one peer scenario does on each side.
#[derive(Clone, Debug)]
pub enum Scenario {
    /// `subscribers` on one channel, `rate` publishes/s for `duration`.
    Fanout {
        subscribers: usize,
        rate: u64,
        duration: Duration,
    },
    /// `connections` idle subscriptions, each on a channel of its own.
    Idle { connections: usize },
    /// Publishes at `rate` for `duration` with nobody subscribed: CPU per publish.
    Publish { rate: u64, duration: Duration },
}

/// Runs `scenario` on tailcast (`srv`, stopped afterwards), then on `peer`, recording
/// `{key}.tailcast.*` and `{key}.{peer}.*`.
pub async fn compare(
    peer: &Peer,
    scenario: &Scenario,
    srv: Server,
    db_url: &str,
    prefix: &str,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    let ws = peer.websocket();
    let res = async {
        let mut pg = PgBackends::connect(db_url).await?;
        let side = Side {
            target: Target::Tailcast,
            ws,
            addr: srv.addr,
            pids: srv.pid().into_iter().collect(),
        };
        run_side(
            &side,
            Some(&mut pg),
            scenario,
            prefix,
            m,
            &format!("{key}.tailcast"),
        )
        .await
    }
    .await;
    let stopped = srv.stop().await;
    res.context("tailcast side")?;
    stopped?;
    let proc = PeerProc::start(peer).await?;
    let res = run_side(
        &proc.side(ws),
        None,
        scenario,
        prefix,
        m,
        &format!("{key}.{}", peer.label()),
    )
    .await;
    let stopped = proc.stop().await;
    res.with_context(|| format!("{} side", peer.label()))?;
    stopped
}

async fn run_side(
    side: &Side,
    pg: Option<&mut PgBackends>,
    scenario: &Scenario,
    prefix: &str,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    match *scenario {
        Scenario::Fanout {
            subscribers,
            rate,
            duration,
        } => fanout(side, pg, subscribers, rate, duration, prefix, m, key).await,
        Scenario::Idle { connections } => idle(side, connections, prefix, m, key).await,
        Scenario::Publish { rate, duration } => {
            publish_cost(side, pg, rate, duration, prefix, m, key).await
        }
    }
}

/// CPU of the server (and of PostgreSQL's backends, if given) over a window.
struct CpuWindow {
    server: CpuSnapshot,
    pg: Option<CpuSnapshot>,
}

impl CpuWindow {
    async fn open(side: &Side, pg: &mut Option<&mut PgBackends>) -> Result<Self> {
        let pg = match pg {
            Some(pg) => Some(pg.snapshot().await?),
            None => None,
        };
        Ok(CpuWindow {
            server: CpuSnapshot::take(&side.pids),
            pg,
        })
    }

    /// (server ms, PostgreSQL ms) since `open`.
    async fn close(self, side: &Side, pg: &mut Option<&mut PgBackends>) -> Result<(f64, f64)> {
        let server = self.server.ms_until(&CpuSnapshot::take(&side.pids));
        let pg_ms = match (self.pg, pg) {
            (Some(before), Some(pg)) => before.ms_until(&pg.snapshot().await?),
            _ => 0.0,
        };
        Ok((server, pg_ms))
    }
}

#[derive(Default)]
struct Tally {
    ready: AtomicUsize,
    delivered: AtomicU64,
    failed: AtomicUsize,
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    side: &Side,
    mut pg: Option<&mut PgBackends>,
    subscribers: usize,
    rate: u64,
    duration: Duration,
    prefix: &str,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    let channel = format!("{prefix}-fan");
    let tally = Arc::new(Tally::default());
    let lat = Arc::new(Latencies::new());
    let connecting = Arc::new(Semaphore::new(64));
    let mut subs = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let (tally, lat, connecting, channel) = (
            tally.clone(),
            lat.clone(),
            connecting.clone(),
            channel.clone(),
        );
        let (target, ws, addr) = (side.target, side.ws, side.addr);
        subs.push(tokio::spawn(async move {
            let res = subscriber(target, ws, addr, i, &channel, &tally, &lat, &connecting).await;
            if let Err(e) = &res {
                if tally.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("  subscriber {i} failed: {e:#}");
                }
            }
        }));
    }
    let ready_by = Instant::now() + Duration::from_secs(180);
    while tally.ready.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed) < subscribers {
        if Instant::now() > ready_by {
            bail!(
                "only {} of {subscribers} subscribers connected",
                tally.ready.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = tally.failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} subscribers failed to connect");
    }
    let publat = Latencies::new();
    let window = CpuWindow::open(side, &mut pg).await?;
    let started = Instant::now();
    let published = publish_paced(side, &channel, rate, duration, &publat).await?;
    let publish_secs = started.elapsed().as_secs_f64();
    let expected = published * subscribers as u64;
    let grace = Instant::now() + Duration::from_secs(10);
    while tally.delivered.load(Ordering::Relaxed) < expected && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_secs = started.elapsed().as_secs_f64();
    let (cpu, pg_cpu) = window.close(side, &mut pg).await?;
    let mem_kib = pss_kib(&side.pids)?;
    for s in &subs {
        s.abort();
    }
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let per_1k = (delivered as f64 / 1000.0).max(f64::MIN_POSITIVE);
    let (p50, p99, max) = percentiles_ms(&lat.merged());
    let (pub50, pub99, _) = percentiles_ms(&publat.merged());
    m.set(
        &format!("{key}.published_s"),
        published as f64 / publish_secs,
    );
    m.set(&format!("{key}.delivered_s"), delivered as f64 / all_secs);
    m.set(
        &format!("{key}.complete"),
        delivered as f64 / expected.max(1) as f64,
    );
    m.set(&format!("{key}.p50_ms"), p50);
    m.set(&format!("{key}.p99_ms"), p99);
    m.set(&format!("{key}.max_ms"), max);
    m.set(&format!("{key}.publish_p50_ms"), pub50);
    m.set(&format!("{key}.publish_p99_ms"), pub99);
    m.set(&format!("{key}.cpu_ms_per_1k"), cpu / per_1k);
    m.set(
        &format!("{key}.total_cpu_ms_per_1k"),
        (cpu + pg_cpu) / per_1k,
    );
    if side.target == Target::Tailcast {
        m.set(&format!("{key}.pg_cpu_ms_per_1k"), pg_cpu / per_1k);
    }
    m.set(&format!("{key}.mem_mib"), mem_kib as f64 / 1024.0);
    Ok(())
}

/// The `"ts":` of a payload, also when it arrives as an escaped JSON string (Pusher's
/// `data` is a string).
fn payload_ts(b: &[u8]) -> Option<u64> {
    u64_after(b, b"\"ts\":").or_else(|| u64_after(b, b"ts\\\":"))
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    target: Target,
    ws: bool,
    addr: SocketAddr,
    i: usize,
    channel: &str,
    tally: &Tally,
    lat: &Latencies,
    connecting: &Semaphore,
) -> Result<()> {
    let seen = |b: &[u8]| {
        if let Some(ts) = payload_ts(b) {
            lat.record(i, now_us().saturating_sub(ts));
        }
    };
    let permit = connecting.acquire().await?;
    match (target, ws) {
        (Target::Tailcast | Target::Nchan, false) => {
            let (path, what) = if target == Target::Nchan {
                (format!("/sub/{channel}"), "Nchan")
            } else {
                (format!("/v1/streams/{channel}/sse?after=0"), "tailcast")
            };
            let mut http = Http::connect(addr, source_ip(i)).await?;
            let res = http.get(&path, &[("accept", "text/event-stream")]).await?;
            if !res.status().is_success() {
                bail!("{what} SSE {channel}: {}", res.status());
            }
            drop(permit);
            tally.ready.fetch_add(1, Ordering::Relaxed);
            crate::sse::follow(res.into_body(), |parser, data| {
                let mut n = 0;
                parser.feed(data, |ev| {
                    if payload_ts(ev.data).is_some() {
                        seen(ev.data);
                        n += 1;
                    }
                });
                tally.delivered.fetch_add(n, Ordering::Relaxed);
            })
            .await?;
        }
        (Target::Tailcast, true) => {
            let mut ws = crate::ws::connect(addr, source_ip(i)).await?;
            crate::ws::subscribe(&mut ws, channel, 0).await?;
            drop(permit);
            tally.ready.fetch_add(1, Ordering::Relaxed);
            while let Some(msg) = ws.next().await {
                let Message::Text(t) = msg? else { continue };
                let b = t.as_bytes();
                if b.starts_with(b"{\"op\":\"event\"") {
                    seen(b);
                    tally.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (Target::Sockudo, _) => {
            let sock = tcp(addr, source_ip(i)).await?;
            let url =
                format!("ws://{addr}/app/{APP_KEY}?protocol=7&client=tailcast-bench&version=1");
            let (mut ws, _) = tokio_tungstenite::client_async(url, sock)
                .await
                .context("Sockudo WebSocket handshake")?;
            let sub = format!(
                "{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":\"{channel}\"}}}}"
            );
            ws.send(Message::text(sub)).await?;
            // Held until subscribed, like the other transports' connects.
            let mut permit = Some(permit);
            while let Some(msg) = ws.next().await {
                let Message::Text(t) = msg? else { continue };
                let b = t.as_bytes();
                if b.windows(7).any(|w| w == b"\"token\"") {
                    seen(b);
                    tally.delivered.fetch_add(1, Ordering::Relaxed);
                } else if permit.is_some() && t.contains("subscription_succeeded") {
                    permit = None;
                    tally.ready.fetch_add(1, Ordering::Relaxed);
                } else if t.contains("pusher:ping") {
                    ws.send(Message::text("{\"event\":\"pusher:pong\",\"data\":{}}"))
                        .await?;
                } else if t.contains("pusher:error") {
                    bail!("Sockudo: {t}");
                }
            }
        }
        (Target::Nchan, true) => bail!("Nchan is measured over SSE only"),
    }
    Ok(())
}

/// The signed path of a Pusher HTTP API `POST /apps/ID/events` carrying `body`.
pub fn pusher_events_path(body: &[u8], timestamp: u64) -> String {
    let md5 = hex::encode(Md5::digest(body));
    let query =
        format!("auth_key={APP_KEY}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={md5}");
    let path = format!("/apps/{APP_ID}/events");
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(APP_SECRET.as_bytes()).expect("any key length");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("{path}?{query}&auth_signature={sig}")
}

/// One publish of event `n` to `channel`; fails unless the server accepted it.
async fn publish_one(http: &mut Http, target: Target, channel: &str, n: u64) -> Result<()> {
    match target {
        Target::Tailcast => {
            http.append(channel, event_json(now_us(), n, None)).await?;
        }
        Target::Nchan => {
            let (status, body) = http
                .post_json(&format!("/pub/{channel}"), payload(now_us(), n).into())
                .await?;
            if !status.is_success() {
                bail!(
                    "Nchan publish: {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        Target::Sockudo => {
            let data = serde_json::to_string(&payload(now_us(), n))?;
            let body =
                format!("{{\"name\":\"token\",\"channels\":[\"{channel}\"],\"data\":{data}}}");
            let ts = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let path = pusher_events_path(body.as_bytes(), ts);
            let (status, res) = http.post_json(&path, body.into()).await?;
            if !status.is_success() {
                bail!(
                    "Sockudo publish: {status}: {}",
                    String::from_utf8_lossy(&res)
                );
            }
        }
    }
    Ok(())
}

/// Publishes at `rate` per second for `dur` to `channel` from 8 connections (so that one slow
/// answer does not hold back the schedule), recording each request's round trip in `lat`.
async fn publish_paced(
    side: &Side,
    channel: &str,
    rate: u64,
    dur: Duration,
    lat: &Latencies,
) -> Result<u64> {
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(100_000);
    let rx = Arc::new(Mutex::new(rx));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let lat_local = Arc::new(Latencies::new());
    for w in 0..8 {
        let mut http = Http::connect(side.addr, None).await?;
        let (rx, done, lat) = (rx.clone(), done.clone(), lat_local.clone());
        let (target, channel, addr) = (side.target, channel.to_owned(), side.addr);
        workers.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(n) = next else { break };
                let t0 = now_us();
                if target == Target::Sockudo {
                    // Sockudo answers every HTTP API request with `connection: close`: each
                    // publish opens its own connection (inside the measured round trip).
                    http = Http::connect(addr, None).await?;
                }
                publish_one(&mut http, target, &channel, n).await?;
                lat.record(w, now_us().saturating_sub(t0));
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let start = tokio::time::Instant::now();
    let total = (rate as f64 * dur.as_secs_f64()) as u64;
    for n in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate as f64)).await;
        if tx.send(n).await.is_err() {
            // Every worker stopped: their errors say why.
            break;
        }
    }
    drop(tx);
    for w in workers {
        w.await?.context("publisher")?;
    }
    lat.add(&lat_local.merged());
    Ok(done.load(Ordering::Relaxed))
}

/// Server CPU per publish with nobody subscribed (PostgreSQL's separately for tailcast).
async fn publish_cost(
    side: &Side,
    mut pg: Option<&mut PgBackends>,
    rate: u64,
    duration: Duration,
    prefix: &str,
    m: &mut Metrics,
    key: &str,
) -> Result<()> {
    let channel = format!("{prefix}-pub");
    let lat = Latencies::new();
    let window = CpuWindow::open(side, &mut pg).await?;
    let started = Instant::now();
    let published = publish_paced(side, &channel, rate, duration, &lat).await?;
    let secs = started.elapsed().as_secs_f64();
    let (cpu, pg_cpu) = window.close(side, &mut pg).await?;
    let n = (published as f64).max(1.0);
    let (p50, p99, _) = percentiles_ms(&lat.merged());
    m.set(&format!("{key}.published_s"), published as f64 / secs);
    m.set(&format!("{key}.cpu_ms"), cpu / n);
    m.set(&format!("{key}.total_cpu_ms"), (cpu + pg_cpu) / n);
    if side.target == Target::Tailcast {
        m.set(&format!("{key}.pg_cpu_ms"), pg_cpu / n);
    }
    m.set(&format!("{key}.p50_ms"), p50);
    m.set(&format!("{key}.p99_ms"), p99);
    Ok(())
}

/// Opens one idle subscription on a peer with raw sockets (nothing buffered client-side).
async fn open_peer(
    target: Target,
    addr: SocketAddr,
    i: usize,
    channel: &str,
) -> Result<tokio::net::TcpStream> {
    let mut sock = tcp(addr, source_ip(i)).await?;
    match target {
        Target::Nchan => {
            let req = format!(
                "GET /sub/{channel} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n"
            );
            sock.write_all(req.as_bytes()).await?;
            read_until(&mut sock, b"\r\n\r\n").await?;
        }
        Target::Sockudo => {
            let req = format!(
                "GET /app/{APP_KEY}?protocol=7&client=tailcast-bench&version=1 HTTP/1.1\r\nhost: {addr}\r\n\
                 upgrade: websocket\r\nconnection: Upgrade\r\n\
                 sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
            );
            sock.write_all(req.as_bytes()).await?;
            read_until(&mut sock, b"connection_established").await?;
            let sub = format!(
                "{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":\"{channel}\"}}}}"
            );
            sock.write_all(&masked_text_frame(sub.as_bytes())).await?;
            read_until(&mut sock, b"subscription_succeeded").await?;
        }
        Target::Tailcast => bail!("tailcast opens through idle::open_sse/open_ws"),
    }
    Ok(sock)
}

/// Memory per idle subscription (Pss growth of the server's processes / connections) and
/// subscriptions opened per second.
async fn idle(side: &Side, n: usize, prefix: &str, m: &mut Metrics, key: &str) -> Result<()> {
    // Let start-up allocations settle before the first reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = pss_kib(&side.pids)?;
    let limit = Arc::new(Semaphore::new(128));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let limit = limit.clone();
        let channel = format!("{prefix}-idle-{i}");
        let (target, ws, addr) = (side.target, side.ws, side.addr);
        tasks.push(tokio::spawn(async move {
            let _p = limit.acquire().await?;
            match (target, ws) {
                (Target::Tailcast, false) => open_sse(addr, i, &channel).await,
                (Target::Tailcast, true) => open_ws(addr, i, &channel).await,
                _ => open_peer(target, addr, i, &channel).await,
            }
        }));
    }
    let mut socks = Vec::with_capacity(n);
    for t in tasks {
        socks.push(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = pss_kib(&side.pids)?;
    m.set(
        &format!("{key}.kib_per_conn"),
        after.saturating_sub(before) as f64 / n as f64,
    );
    m.set(&format!("{key}.opens_s"), n as f64 / secs);
    m.set(&format!("{key}.mem_mib"), after as f64 / 1024.0);
    drop(socks);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_pusher_requests() {
        // The string to sign is "POST\n/apps/bench/events\n" + the sorted query without the
        // signature; body_md5 is the hex MD5 of the body.
        let p = pusher_events_path(b"{}", 1_700_000_000);
        assert!(p.starts_with(
            "/apps/bench/events?auth_key=bench-key&auth_timestamp=1700000000&auth_version=1.0&body_md5=99914b932bd37a50b983c5e7c90ae93b&auth_signature="
        ), "{p}");
        let sig = p.rsplit('=').next().unwrap();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"bench-secret").unwrap();
        mac.update(b"POST\n/apps/bench/events\nauth_key=bench-key&auth_timestamp=1700000000&auth_version=1.0&body_md5=99914b932bd37a50b983c5e7c90ae93b");
        assert_eq!(sig, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig.len(), 64);
    }

    #[test]
    fn finds_the_timestamp_in_plain_and_escaped_payloads() {
        assert_eq!(payload_ts(br#"{"ts":12,"n":1}"#), Some(12));
        let escaped = serde_json::to_string(&payload(34, 1)).unwrap();
        let frame = format!("{{\"event\":\"token\",\"channel\":\"c\",\"data\":{escaped}}}");
        assert_eq!(payload_ts(frame.as_bytes()), Some(34));
        assert_eq!(payload_ts(b"{\"event\":\"pusher:ping\"}"), None);
    }

    #[test]
    fn peer_configs_stay_on_loopback() {
        let conf = nginx_conf(Path::new("/tmp/x"), Path::new("/m.so"), 4321);
        assert!(conf.contains("listen 127.0.0.1:4321 reuseport;"), "{conf}");
        assert!(conf.contains("worker_processes 2;"));
        let s: serde_json::Value = serde_json::from_str(&sockudo_conf(4321)).unwrap();
        assert_eq!(s["host"], "127.0.0.1");
        assert_eq!(s["port"], 4321);
        assert_eq!(s["rate_limiter"]["enabled"], false);
        assert_eq!(s["adapter"]["driver"], "local");
    }
}
