//! What the binary does before serving: bind `--listen` (with errors that name the address
//! and say what to do) and set up logging that can never stall or crash the server.

use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

/// Binds `listen` (`HOST:PORT`, where HOST is an IP address or a host name). A name that
/// resolves to several addresses binds the first that works, IPv4 first.
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let hint = "expected HOST:PORT, e.g. 127.0.0.1:8080, localhost:8080, 0.0.0.0:8080 \
                (every interface) or [::]:8080; port 0 picks a free port";
    let Some((host, port)) = listen.rsplit_once(':') else {
        anyhow::bail!("invalid --listen / TAILCAST_LISTEN {listen:?}: no port; {hint}");
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        anyhow::bail!("invalid --listen / TAILCAST_LISTEN {listen:?}: {hint}");
    }
    let mut addrs: Vec<SocketAddr> = match tokio::net::lookup_host(listen).await {
        Ok(addrs) => addrs.collect(),
        Err(e) => anyhow::bail!(
            "invalid --listen / TAILCAST_LISTEN {listen:?}: cannot resolve the host {host:?} \
             ({e}); use an IP address or a name this machine resolves"
        ),
    };
    addrs.sort_by_key(|a| a.is_ipv6());
    let mut last = None;
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(bind_error(addr, &e)),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("--listen {listen:?} resolves to no address")))
}

/// Why binding `addr` failed, and what to do about it.
fn bind_error(addr: SocketAddr, e: &io::Error) -> anyhow::Error {
    let what = match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            "the address is already in use: another tailcast, or another program, listens \
             there. Stop it, or choose another port with --listen / TAILCAST_LISTEN (e.g. \
             --listen {}:{})",
            host_of(addr),
            addr.port().wrapping_add(1).max(1024)
        ),
        io::ErrorKind::PermissionDenied => "permission denied: ports below 1024 need root or \
             CAP_NET_BIND_SERVICE; choose a port from 1024 up with --listen"
            .to_owned(),
        io::ErrorKind::AddrNotAvailable => "no network interface of this machine has that \
             address; use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
            .to_owned(),
        _ => e.to_string(),
    };
    anyhow::anyhow!("cannot listen on {addr}: {what} ({e})")
}

fn host_of(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    }
}

/// Lines the log writer dropped because its output did not keep up (a stalled pipe).
static DROPPED_LOG_LINES: AtomicU64 = AtomicU64::new(0);

/// How many log lines have been dropped so far (exported as a metric).
pub fn dropped_log_lines() -> u64 {
    DROPPED_LOG_LINES.load(Ordering::Relaxed)
}

/// Lines queued for the log thread before new ones are dropped.
const LOG_QUEUE: usize = 8192;

/// Sets up `tracing` to write to stdout from a thread of its own, through a bounded queue.
/// A log pipe that nobody reads (or that was closed) must not stop the server: a blocking
/// write from a runtime thread would stall every task on it, SIGTERM handling included, and
/// tracing's fallback of reporting a failed write on stderr panics when stderr is closed too.
/// So lines that do not fit the queue are dropped and counted, write errors are swallowed,
/// and colour is used only when stdout is a terminal. Flush the guard at exit.
pub fn init_logging(json: bool) -> LogGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(LOG_QUEUE);
    std::thread::Builder::new()
        .name("tailcast-log".into())
        .spawn(move || write_lines(rx))
        .expect("spawn the log thread");
    let make = move || QueuedLine {
        tx: tx.clone(),
        buf: Vec::new(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stdout().is_terminal())
        .with_writer(make);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    LogGuard(())
}

/// Writes queued lines to stdout until every sender is gone. After the first failed write
/// (the reader went away) the rest are discarded: there is nowhere to report it.
fn write_lines(rx: Receiver<Vec<u8>>) {
    let mut out = io::stdout();
    let mut broken = false;
    for line in rx {
        if !broken && out.write_all(&line).and_then(|()| out.flush()).is_err() {
            broken = true;
        }
        QUEUED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Returned by [`init_logging`]: flush it before the process exits.
pub struct LogGuard(());

impl LogGuard {
    /// Waits for queued lines to be written, at most `within` (the output may be stalled).
    pub fn flush(self, within: Duration) {
        let deadline = Instant::now() + within;
        while QUEUED.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Lines sent to the log thread and not yet written.
static QUEUED: AtomicU64 = AtomicU64::new(0);

/// One log event, sent to the log thread as one line when the formatter is done with it.
struct QueuedLine {
    tx: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for QueuedLine {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        QUEUED.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(std::mem::take(&mut self.buf)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                QUEUED.fetch_sub(1, Ordering::AcqRel);
                DROPPED_LOG_LINES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
