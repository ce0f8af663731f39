//! The embedded default: the real binary started the way the README's first command starts it,
//! with no `DATABASE_URL`, serves a durable log from `./tailcast-data/`.

use std::path::Path;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{listening_addr, terminate, WAIT};

/// `tailcast` in `dir` with no database configured; returns it and its address.
async fn start_in(dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailcast"))
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("TAILCAST_LISTEN_DATABASE_URL")
        .env("TAILCAST_LISTEN", "127.0.0.1:0")
        .env("TAILCAST_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tailcast");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = listening_addr(&mut lines).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

async fn get_json(client: &reqwest::Client, url: String) -> Value {
    let res = client.get(url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test]
async fn with_no_database_url_the_binary_serves_a_durable_log_from_tailcast_data() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let (mut child, addr) = start_in(dir.path()).await;
    let base = format!("http://{addr}");
    for i in 1..=3 {
        let res = client
            .post(format!("{base}/v1/streams/demo/events"))
            .json(&json!({"type":"token","data":{"i":i},"id":format!("e{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let ack: Value = res.json().await.unwrap();
        assert_eq!(ack["first_seq"], i);
    }
    let stats = get_json(&client, format!("{base}/v1/stats")).await;
    assert_eq!(stats["backend"], "sqlite");
    assert_eq!(stats["listener"], Value::Null);
    assert!(dir.path().join("tailcast-data/tailcast.db").is_file());
    terminate(&mut child).await;

    // A restart in the same directory finds the log, and retries stay idempotent.
    let (mut child, addr) = start_in(dir.path()).await;
    let base = format!("http://{addr}");
    let page = get_json(&client, format!("{base}/v1/streams/demo/events?after=0")).await;
    let seqs: Vec<i64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(page["events"][2]["data"], json!({"i":3}));
    let retry: Value = client
        .post(format!("{base}/v1/streams/demo/events"))
        .json(&json!({"type":"token","data":{"i":2},"id":"e2"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        retry["events"][0],
        json!({"seq":2,"id":"e2","duplicate":true})
    );
    terminate(&mut child).await;
}

#[tokio::test]
async fn a_listen_database_url_with_the_embedded_store_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tailcast"))
        .current_dir(dir.path())
        .env("DATABASE_URL", "sqlite://log.db")
        .env(
            "TAILCAST_LISTEN_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .env("TAILCAST_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("exit in time")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen-database-url") && stderr.contains("use PostgreSQL")
            || stderr.contains("set DATABASE_URL to a postgres:// URL"),
        "{stderr}"
    );
}
