#![allow(dead_code)] // a helper library: not every test uses every helper
//! The real `tailcast` binary as a process of its own, with settings from the environment:
//! for tests that freeze a node (SIGSTOP) or measure the server's memory apart from the
//! test's own.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::listening_addr;

pub struct NodeProcess {
    pub addr: SocketAddr,
    pub base: String,
    pub pid: u32,
    child: tokio::process::Child,
}

impl NodeProcess {
    /// Starts the binary on `database_url` with extra `TAILCAST_*` settings; waits until it
    /// listens.
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> NodeProcess {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailcast"));
        cmd.env("DATABASE_URL", database_url)
            .env("TAILCAST_LISTEN", "127.0.0.1:0")
            .env("TAILCAST_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start tailcast");
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr: SocketAddr = listening_addr(&mut lines).await.parse().unwrap();
        // Keep draining its log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        NodeProcess {
            addr,
            base: format!("http://{addr}"),
            pid,
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {}", self.pid);
    }

    /// Freezes the process (SIGSTOP): its sockets stay open and nothing of it runs.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Kills the process with SIGKILL (nothing of it runs after this) and waits until it is
    /// gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill -9");
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // A stopped process still dies of SIGKILL (kill_on_drop); thaw it anyway so nothing
        // of it lingers stopped if the kill were delayed.
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
