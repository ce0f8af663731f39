//! Private PostgreSQL clusters for the ceiling scenarios: a primary of the benchmark's own
//! (so sixteen extra nodes' connections, and a streaming replica, never touch the shared
//! server), and a hot standby of it made with `pg_basebackup -R`. Each lives in a temporary
//! directory, runs as the `postgres` OS user when the bench runs as root, and is stopped
//! (immediately) and removed on drop. Durability settings are PostgreSQL's defaults (fsync
//! and synchronous_commit on), as on the shared server.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::Command;

pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The newest installed PostgreSQL's server binaries.
fn bin_dir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: install postgresql (the ceiling scenarios run private clusters)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "pg_ctl", "pg_basebackup"]
                .iter()
                .all(|t| bin.join(t).exists())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .context("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    /// A fresh cluster (initdb), started on a free port.
    pub async fn primary() -> Result<Cluster> {
        let mut c = Cluster::empty("primary")?;
        let data = c.data();
        c.run("initdb", |cmd| {
            cmd.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
        })
        .await?;
        c.start().await?;
        Ok(c)
    }

    /// A hot standby streaming from this cluster, started on a port of its own.
    pub async fn standby(&self) -> Result<Cluster> {
        let mut s = Cluster::empty("standby")?;
        let data = s.data();
        let port = self.port.to_string();
        s.run("pg_basebackup", |cmd| {
            cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D"])
                .arg(&data)
                .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
        })
        .await?;
        s.start().await?;
        Ok(s)
    }

    fn empty(name: &str) -> Result<Cluster> {
        let bin = bin_dir()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tailcast-bench-pg-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        // SAFETY: geteuid(2) has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            // PostgreSQL refuses to run as root: the cluster is the postgres user's.
            let ok = std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(&dir)
                .status()?
                .success();
            if !ok {
                bail!("chown postgres {}", dir.display());
            }
        }
        Ok(Cluster {
            bin,
            dir,
            port: 0,
            as_postgres,
        })
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A URL for database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, tool: &str, args: impl FnOnce(&mut Command)) -> Result<()> {
        let mut c = self.command(tool);
        args(&mut c);
        let out = c
            .output()
            .await
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    async fn start(&mut self) -> Result<()> {
        for attempt in 0.. {
            self.port = free_port()?;
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
                 -c shared_buffers=128MB",
                self.port,
                self.dir.display()
            );
            let mut c = self.command("pg_ctl");
            c.arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "120", "-o", &opts, "start"]);
            if c.status().await?.success() {
                return Ok(());
            }
            if attempt >= 3 {
                bail!(
                    "could not start a private PostgreSQL cluster; see {}",
                    self.log_path().display()
                );
            }
        }
        unreachable!()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            std::process::Command::new(self.bin.join("pg_ctl"))
        };
        let _ = c
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (up to two minutes) until `standby` has replayed all WAL `primary` has written.
pub async fn caught_up(primary: &str, standby: &str) -> Result<()> {
    use sqlx::Connection;
    let mut p = sqlx::PgConnection::connect(primary).await?;
    let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&mut p)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut s) = sqlx::PgConnection::connect(standby).await {
            let done: bool = sqlx::query_scalar("select pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&lsn)
                .fetch_one(&mut s)
                .await
                .unwrap_or(false);
            if done {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the standby did not replay the primary's WAL within two minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
