#![allow(dead_code)] // a helper library: not every test uses every helper
//! A PostgreSQL cluster of the test's own, for tests that crash, restart or reconfigure the
//! server (never the shared one on 5432, which other tests use): `initdb` into a temporary
//! directory, `pg_ctl start` on a free port with its socket in that directory, as the
//! `postgres` OS user when the test runs as root. Stopped (immediately) and removed on drop.
//! [`PrivateCluster::standby`] makes a streaming replica of one (`pg_basebackup -R`, a hot
//! standby on a port of its own), for the read-replica tests.
//!
//! Needs Debian's PostgreSQL server binaries (/usr/lib/postgresql/*/bin); scripts/test
//! installs them. Without them a test is skipped *loudly* — and fails instead when
//! `TAILCAST_REQUIRE_PG_BINARIES` is set (scripts/test sets it), so a skip is never counted
//! as a pass there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use tempfile::TempDir;

use crate::backend::TestDb;

pub struct PrivateCluster {
    bin: PathBuf,
    dir: TempDir,
    pub port: u16,
    as_postgres: bool,
}

/// The newest installed PostgreSQL's server binaries.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PrivateCluster {
    /// Starts a fresh cluster, or returns None (after saying so on stderr) if this machine
    /// has no PostgreSQL server binaries.
    pub async fn start(test: &str) -> Option<PrivateCluster> {
        let mut cluster = Self::empty(test)?;
        let data = cluster.data();
        cluster
            .run("initdb", |c| {
                c.arg("-D").arg(&data).args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]);
            })
            .await;
        cluster.start_on_a_free_port().await;
        Some(cluster)
    }

    /// A hot standby of this cluster: a base backup (`pg_basebackup -R`: it follows this
    /// cluster by streaming replication) started on a port of its own, accepting read-only
    /// connections. initdb's `pg_hba.conf` already trusts replication connections from
    /// 127.0.0.1, and the defaults (`wal_level = replica`, WAL senders) allow streaming.
    pub async fn standby(&self) -> PrivateCluster {
        let mut standby = Self::empty("standby").expect("the primary's binaries");
        let data = standby.data();
        let port = self.port.to_string();
        standby
            .run("pg_basebackup", |c| {
                c.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D"])
                    .arg(&data)
                    .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
            })
            .await;
        standby.start_on_a_free_port().await;
        standby
    }

    /// A cluster directory (not yet initialised) and the binaries, or None (loudly) if this
    /// machine has no PostgreSQL server binaries.
    fn empty(test: &str) -> Option<PrivateCluster> {
        let Some(bin) = bin_dir() else {
            let msg = format!(
                "{test}: SKIPPED — no PostgreSQL server binaries under /usr/lib/postgresql/*/bin \
                 (scripts/test installs them; apt-get install postgresql)"
            );
            if std::env::var_os("TAILCAST_REQUIRE_PG_BINARIES").is_some() {
                panic!("{msg}, and TAILCAST_REQUIRE_PG_BINARIES is set");
            }
            eprintln!("\n!!! {msg}\n");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("tailcast-pg-")
            .tempdir()
            .expect("a temporary directory");
        let as_postgres = is_root();
        if as_postgres {
            // PostgreSQL refuses to run as root: the cluster is the postgres user's.
            let ok = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown the cluster directory to postgres");
        }
        Some(PrivateCluster {
            bin,
            dir,
            port: 0,
            as_postgres,
        })
    }

    async fn start_on_a_free_port(&mut self) {
        // A port found free may be taken before the server binds it: try a few.
        for attempt in 0.. {
            self.port = free_port();
            if self.pg_ctl_ok("start").await {
                break;
            }
            assert!(
                attempt < 3,
                "could not start the private PostgreSQL cluster: {}",
                self.log()
            );
        }
    }

    /// `pg_ctl stop -m immediate`: the server is gone (connections refused) until [`Self::restart`].
    pub async fn stop(&self) {
        assert!(
            self.pg_ctl_ok("stop").await,
            "pg_ctl stop failed: {}",
            self.log()
        );
    }

    /// Starts a stopped cluster again, on the same port.
    pub async fn restart(&self) {
        assert!(
            self.pg_ctl_ok("start").await,
            "pg_ctl start failed: {}",
            self.log()
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, tool: &str) -> tokio::process::Command {
        let path = self.bin.join(tool);
        let mut c = if self.as_postgres {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            tokio::process::Command::new(path)
        };
        c.current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, tool: &str, args: impl FnOnce(&mut tokio::process::Command)) {
        let mut c = self.command(tool);
        args(&mut c);
        let out = c.output().await.expect(tool);
        assert!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl <action>` with this cluster's options; true on success.
    async fn pg_ctl_ok(&self, action: &str) -> bool {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=80 \
             -c shared_buffers=32MB -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-m", "immediate", "-o", &opts, action]);
        c.status().await.is_ok_and(|s| s.success())
    }

    /// `pg_ctl restart -m immediate`: every backend is killed at once, like a crash (no
    /// checkpoint, WAL not yet written is lost), and the server recovers from its WAL.
    pub async fn crash_restart(&self) {
        assert!(
            self.pg_ctl_ok("restart").await,
            "pg_ctl restart -m immediate failed: {}",
            self.log()
        );
    }

    /// A [`TestDb`] on this cluster's `postgres` database.
    pub async fn test_db(&self) -> TestDb {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&self.url())
            .await
            .expect("connect to the private cluster");
        TestDb::postgres_at(pool, self.url())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateCluster {
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
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
