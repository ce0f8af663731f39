//! CPU time and memory of the processes under test, read from /proc: the server (tailcast, or
//! a peer's processes: nginx's master and workers, Sockudo) and, for tailcast, the
//! PostgreSQL backends serving its database, counted separately.

use std::collections::HashMap;

use anyhow::{Context, Result};
use sqlx::Connection;

/// Clock ticks per second (utime/stime in /proc/PID/stat count these).
fn ticks_per_s() -> f64 {
    // SAFETY: sysconf(3) reads a constant of the running system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The fields of /proc/PID/stat after the command (which may contain spaces and parentheses).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU of `pid` (all its threads) in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // After the command: state(0) ppid(1) … utime(11) stime(12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The processes whose parent is `parent` (nginx's workers).
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|pp| pp == parent)
        })
        .collect()
}

/// CPU ticks of a set of processes at one moment.
#[derive(Default, Clone)]
pub struct CpuSnapshot(HashMap<u32, u64>);

impl CpuSnapshot {
    pub fn take(pids: &[u32]) -> Self {
        CpuSnapshot(
            pids.iter()
                .filter_map(|&p| Some((p, cpu_ticks(p)?)))
                .collect(),
        )
    }

    /// Milliseconds of CPU spent between `self` and `later` by the processes of `later`
    /// (one that started in between counts from zero; one that exited is lost).
    pub fn ms_until(&self, later: &CpuSnapshot) -> f64 {
        let ticks: u64 = later
            .0
            .iter()
            .map(|(pid, &t)| t.saturating_sub(self.0.get(pid).copied().unwrap_or(0)))
            .sum();
        ticks as f64 * 1000.0 / ticks_per_s()
    }
}

/// A field (in kB) of /proc/PID/smaps_rollup, e.g. "Pss:".
fn rollup_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Proportional set size of `pids` together, in KiB: memory shared between them (nginx's
/// shared zone, its workers' copy-on-write pages) counted once, not once per process.
pub fn pss_kib(pids: &[u32]) -> Result<u64> {
    pids.iter()
        .map(|&p| rollup_kib(p, "Pss:").with_context(|| format!("no Pss for process {p}")))
        .sum()
}

/// The PostgreSQL backends serving tailcast's database, through a connection of our own
/// (whose backend is left out).
pub struct PgBackends {
    conn: sqlx::PgConnection,
}

impl PgBackends {
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(PgBackends {
            conn: sqlx::PgConnection::connect(url)
                .await
                .context("connecting to the benchmark database")?,
        })
    }

    pub async fn pids(&mut self) -> Result<Vec<u32>> {
        let pids: Vec<i32> = sqlx::query_scalar(
            "select pid from pg_stat_activity \
             where datname = current_database() and pid <> pg_backend_pid()",
        )
        .fetch_all(&mut self.conn)
        .await?;
        Ok(pids.into_iter().map(|p| p as u32).collect())
    }

    pub async fn snapshot(&mut self) -> Result<CpuSnapshot> {
        Ok(CpuSnapshot::take(&self.pids().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_children_and_reads_memory() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let kids = children(me);
        let snap = CpuSnapshot::take(&[me, child.id()]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(kids.contains(&child.id()), "{kids:?}");
        assert_eq!(snap.0.len(), 2);
        assert!(pss_kib(&[me]).unwrap() > 0);
        assert!(pss_kib(&[u32::MAX]).is_err());
    }
}
