//! The real binary's first minute, as a new operator meets it: `--help` and `--version`,
//! start-up errors that name the address or the cause and say what to do, host names in
//! `--listen`, logs without colour codes in a file, and a prompt SIGTERM even when nobody
//! reads (or can read) the log.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{listening_addr, WAIT};

fn tailcast() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tailcast"));
    cmd.env_remove("DATABASE_URL")
        .env_remove("TAILCAST_LISTEN_DATABASE_URL")
        .env_remove("TAILCAST_JWT_SECRET")
        .env_remove("TAILCAST_ADMIN_TOKEN")
        .env_remove("TAILCAST_WEBHOOK_CA_FILE")
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    cmd
}

/// Runs the binary to its exit (bounded by WAIT) and returns its output.
async fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("tailcast exits in time")
        .unwrap()
}

/// A start-up that must fail: exit code 1 and the error on stderr.
async fn refused(cmd: &mut Command) -> String {
    let out = run(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("Error: "), "{stderr}");
    assert!(!stderr.contains("Stack backtrace"), "{stderr}");
    stderr
}

/// A TCP port on 127.0.0.1 where nothing listens (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}/t.db", dir.path().display())
}

#[tokio::test]
async fn help_is_grouped_and_version_names_commit_and_build_date() {
    let out = run(tailcast().arg("--help")).await;
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let headings: Vec<&str> = help
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(':'))
        .collect();
    for h in [
        "Server:",
        "Storage:",
        "Auth:",
        "Limits:",
        "Streaming:",
        "Input requests:",
        "Retention:",
    ] {
        assert!(
            headings.contains(&h),
            "--help lacks the {h} group: {headings:?}"
        );
    }
    // Every flag is in a group: the generic "Options:" holds only --help and --version.
    let options = help
        .split("Options:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    assert_eq!(options.matches("--").count(), 2, "{options}");
    assert!(!help.contains("API.md"), "{help}");

    let out = run(tailcast().arg("--version")).await;
    let version = String::from_utf8(out.stdout).unwrap();
    let expected_start = format!("tailcast {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(version.starts_with(&expected_start), "{version}");
    let (commit, date) = version[expected_start.len()..]
        .trim_end()
        .trim_end_matches(')')
        .split_once(", built ")
        .expect("commit and build date");
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{version}"
    );
    let d: Vec<&str> = date.split('-').collect();
    assert!(
        d.len() == 3 && d[0].len() == 4 && d.iter().all(|p| p.parse::<u32>().is_ok()),
        "{version}"
    );
}

#[tokio::test]
async fn a_port_in_use_names_the_address_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = refused(
        tailcast()
            .args(["--listen", &addr.to_string()])
            .args(["--database-url", &sqlite_url(&dir)]),
    )
    .await;
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(
        err.contains("already in use") && err.contains("--listen"),
        "{err}"
    );
    // Refused before the database was touched.
    assert!(!dir.path().join("t.db").exists());
}

#[tokio::test]
async fn a_bad_listen_address_says_what_is_expected() {
    for bad in ["8080", "127.0.0.1:http", "no-such-host.invalid:8080"] {
        let err = refused(tailcast().args(["--listen", bad])).await;
        assert!(
            err.contains(&format!("invalid --listen / TAILCAST_LISTEN {bad:?}")),
            "{err}"
        );
    }
    let err = refused(tailcast().args(["--listen", "8080"])).await;
    assert!(
        err.contains("HOST:PORT") && err.contains("localhost:8080"),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_postgresql_connection_names_the_server_at_once() {
    let port = closed_port();
    let started = Instant::now();
    let err = refused(
        tailcast()
            .args(["--listen", "127.0.0.1:0"])
            // A long acquire timeout: the error must not wait for it.
            .args(["--db-acquire-timeout-ms", "60000"])
            .env(
                "DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:{port}/x"),
            ),
    )
    .await;
    assert!(
        err.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        err.contains("refused") && err.contains("DATABASE_URL"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
}

#[tokio::test]
async fn an_empty_jwt_secret_is_refused_before_the_database_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(
        tailcast()
            .args(["--listen", "127.0.0.1:0"])
            .args(["--database-url", &sqlite_url(&dir)])
            .env("TAILCAST_JWT_SECRET", ""),
    )
    .await;
    assert!(
        err.contains("TAILCAST_JWT_SECRET is set but empty"),
        "{err}"
    );
    assert!(!dir.path().join("t.db").exists(), "the database was opened");
}

#[tokio::test]
async fn an_unusable_webhook_ca_file_is_refused_with_its_path_before_the_database_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "this is no certificate\n").unwrap();
    // A PEM block whose content is not an X.509 certificate.
    let bad_der = dir.path().join("bad-der.pem");
    std::fs::write(
        &bad_der,
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for (file, why) in [
        (&missing, "No such file"),
        (&not_pem, "no PEM certificate"),
        (&bad_der, "not usable as trusted roots"),
    ] {
        let err = refused(
            tailcast()
                .args(["--listen", "127.0.0.1:0"])
                .args(["--database-url", &sqlite_url(&dir)])
                .env("TAILCAST_WEBHOOK_CA_FILE", file),
        )
        .await;
        assert!(err.contains("--webhook-ca-file"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(!dir.path().join("t.db").exists(), "the database was opened");
    }
}

/// Starts the binary with its log on a pipe this test reads; returns it and its address.
async fn start(dir: &tempfile::TempDir, listen: &str, json: bool) -> (Child, String, Vec<String>) {
    let mut child = tailcast()
        .args(["--listen", listen, "--database-url", &sqlite_url(dir)])
        .env("TAILCAST_LOG_FORMAT", if json { "json" } else { "text" })
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    if json {
        let addr = listening_addr(&mut lines).await;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        return (child, addr, Vec::new());
    }
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let console = line.contains("web console: http://");
            seen.push(line);
            if console {
                break;
            }
        }
    })
    .await
    .expect("the console URL logged in time");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = seen.last().unwrap().split("web console: ").nth(1).unwrap();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/console/");
    (child, addr.to_owned(), seen)
}

#[tokio::test]
async fn listen_takes_a_host_name_and_logs_to_a_pipe_without_colour() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, log) = start(&dir, "localhost:0", false).await;
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let all = log.join("\n");
    assert!(
        !all.contains('\u{1b}'),
        "ANSI escape codes in a piped log:\n{all}"
    );
    assert!(all.contains("listening"), "{all}");
    let console = reqwest::get(format!("http://{addr}/console/"))
        .await
        .unwrap();
    assert_eq!(console.status(), 200);
    crate::helpers::terminate(&mut child).await;
}

/// Sends SIGTERM and returns how long the process took to exit (bounded by WAIT).
async fn sigterm(child: &mut Child) -> (Duration, std::process::ExitStatus) {
    let pid = child.id().unwrap().to_string();
    let started = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    (started.elapsed(), status)
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + WAIT;
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "tailcast did not come up");
        // A polling interval: the loop ends on the condition.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_is_prompt_when_the_log_pipe_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    // stdout and stderr both on a pipe whose reading end is already closed: every write fails.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let port = closed_port();
    let mut child = tailcast()
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--database-url",
            &sqlite_url(&dir),
            "--shutdown-timeout-s",
            "3",
        ])
        .env("RUST_LOG", "debug")
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    wait_healthy(&client, &base).await;
    for _ in 0..20 {
        assert_eq!(
            client
                .get(format!("{base}/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let (took, status) = sigterm(&mut child).await;
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn sigterm_is_prompt_when_nobody_reads_the_log() {
    let dir = tempfile::tempdir().unwrap();
    // A pipe that is never read: once its buffer is full, a blocking log write would stall
    // the runtime, SIGTERM handling included.
    let (_reader, writer) = std::io::pipe().unwrap();
    let port = closed_port();
    let mut child = tailcast()
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--database-url",
            &sqlite_url(&dir),
            "--shutdown-timeout-s",
            "3",
        ])
        .env("RUST_LOG", "debug")
        .stdout(writer)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    wait_healthy(&client, &base).await;
    // Far more log than a pipe buffer (64 KiB) holds, until lines are being dropped.
    let deadline = Instant::now() + WAIT;
    loop {
        for _ in 0..50 {
            let res = client
                .get(format!("{base}/v1/streams/x"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 404);
        }
        let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
        let text = metrics.text().await.unwrap();
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix("tailcast_log_lines_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap();
        if dropped > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no log line was ever dropped");
    }
    let (took, status) = sigterm(&mut child).await;
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}
