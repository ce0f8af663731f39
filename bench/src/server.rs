//! The tailcast process under test: started from a release binary on a free port, with its
//! own database; its RSS read from /proc; stopped with SIGTERM or killed with SIGKILL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    bin: PathBuf,
    db_url: String,
    args: Vec<String>,
    log: PathBuf,
}

impl Server {
    /// Starts `bin` on a free loopback port against `db_url` and waits until it is ready.
    pub async fn start(bin: &Path, db_url: &str, args: &[String], log: &Path) -> Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = spawn(bin, db_url, addr, args, log)?;
        let mut s = Server {
            child,
            addr,
            bin: bin.to_owned(),
            db_url: db_url.to_owned(),
            args: args.to_vec(),
            log: log.to_owned(),
        };
        s.wait_ready().await?;
        Ok(s)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The server's resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid().context("server has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")
    }

    /// SIGKILL: no graceful shutdown, no flush; whatever was acknowledged must survive.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts the same binary again on the same port (clients reconnect to one address).
    pub async fn restart(&mut self) -> Result<()> {
        self.child = spawn(&self.bin, &self.db_url, self.addr, &self.args, &self.log)?;
        self.wait_ready().await
    }

    /// SIGTERM, then SIGKILL if it does not exit within 15 s.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
                .await
                .is_err()
            {
                self.kill().await?;
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "tailcast exited during start-up ({status}); see {}",
                    self.log.display()
                );
            }
            if let Ok(mut http) = crate::http::Http::connect(self.addr, None).await {
                if let Ok(res) = http.get("/readyz", &[]).await {
                    if res.status().is_success() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("tailcast not ready after 60 s; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn spawn(bin: &Path, db_url: &str, addr: SocketAddr, args: &[String], log: &Path) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    Command::new(bin)
        .arg("--listen")
        .arg(addr.to_string())
        .args(args)
        .env("DATABASE_URL", db_url)
        .env(
            "RUST_LOG",
            std::env::var("TAILCAST_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}
