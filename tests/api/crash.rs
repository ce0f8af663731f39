//! Crashes: the real binary killed with SIGKILL in the middle of a stream of appends loses no
//! acknowledged event once restarted on the same database; and a SQLite file is one process's
//! at a time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::backend::{backend_test, TestDb};
use crate::helpers::{wait_until, WAIT};
use crate::wire::Server;

/// What the producers saw: acknowledged ids with their seqs, and every id ever sent (an
/// append whose answer never came may or may not have been committed).
#[derive(Default)]
struct Sent {
    acked: HashMap<String, i64>,
    tried: HashSet<String>,
}

/// Appends one event per request, each with an id of its own, until a request fails (the
/// server died): a failed request is in doubt and never retried here.
fn start_producers(
    base: &str,
    stream: &str,
    round: usize,
    producers: usize,
    sent: &Arc<Mutex<Sent>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..producers)
        .map(|p| {
            let url = format!("{base}/v1/streams/{stream}/events");
            let sent = sent.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
                for i in 0.. {
                    let id = format!("{round}-{p}-{i}");
                    sent.lock().unwrap().tried.insert(id.clone());
                    let res = client
                        .post(&url)
                        .json(&json!({"data":{"round":round,"p":p,"i":i},"id":id}))
                        .send()
                        .await;
                    let Ok(res) = res else { return };
                    assert_eq!(res.status(), 201, "only the kill may fail an append");
                    // The body may be cut off by the kill too: then the append is in doubt.
                    let Ok(body) = res.json::<Value>().await else {
                        return;
                    };
                    let seq = body["first_seq"].as_i64().unwrap();
                    sent.lock().unwrap().acked.insert(id, seq);
                }
            })
        })
        .collect()
}

/// Every event of `stream`, through the server's paged REST replay.
async fn read_log(client: &reqwest::Client, base: &str, stream: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let url = format!("{base}/v1/streams/{stream}/events?after={after}&limit=1000");
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        after = page["next_after"].as_i64().unwrap();
        out.extend(events);
    }
}

#[backend_test]
async fn a_sigkill_mid_stream_loses_no_acknowledged_append(db: TestDb) {
    let db = db.close().await;
    let sent = Arc::new(Mutex::new(Sent::default()));
    // Twice: the second crash hits a log recovered from the first.
    for round in 1..=2 {
        let server = Server::start(db.url()).await;
        let base = format!("http://{}", server.addr);
        let producers = start_producers(&base, "s", round, 8, &sent);
        wait_until("appends flowing", || async {
            sent.lock().unwrap().acked.len() >= 300 * round
        })
        .await;
        // No graceful shutdown: appends are in flight in the appender, in the database, on
        // the wire.
        server.kill().await;
        for p in producers {
            tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
        }
    }

    // Restarted on the same database (on SQLite the dead process's lock went with it).
    let server = Server::start(db.url()).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let log = read_log(&client, &base, "s").await;
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let head = client
        .get(format!("{base}/v1/streams/s"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["head"]
        .as_i64()
        .unwrap();
    assert_eq!(log.len() as i64, head, "the log is 1..=head");
    let mut stored = HashMap::new();
    for (n, ev) in log.iter().enumerate() {
        let seq = ev["seq"].as_i64().unwrap();
        assert_eq!(seq, n as i64 + 1, "a gap or a duplicate seq");
        let id = ev["id"].as_str().unwrap().to_owned();
        assert!(sent.tried.contains(&id), "{id} was never sent");
        assert!(
            stored.insert(id.clone(), seq).is_none(),
            "{id} stored twice"
        );
    }
    for (id, seq) in &sent.acked {
        assert_eq!(stored.get(id), Some(seq), "acknowledged {id} lost or moved");
    }
    println!(
        "{} acknowledged, {} in doubt of which {} stored",
        sent.acked.len(),
        sent.tried.len() - sent.acked.len(),
        stored.len() - sent.acked.len()
    );

    // The log goes on from its head.
    let res = client
        .post(format!("{base}/v1/streams/s/events"))
        .json(&json!({"data":"after the crash"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.json::<Value>().await.unwrap()["first_seq"], head + 1);
    server.kill().await;
}

/// Only SQLite has a file to lock, so this is a plain test on a directory of its own.
#[tokio::test]
async fn a_second_process_on_a_sqlite_file_in_use_exits_naming_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("log.db").display());
    let first = Server::start(&url).await;

    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_tailcast"))
        .env("DATABASE_URL", &url)
        .env("TAILCAST_LISTEN", "127.0.0.1:0")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, second)
        .await
        .expect("the second process exits by itself")
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{:?}: {said}", out.status);
    assert!(
        said.contains("in use by another tailcast process") && said.contains(".lock"),
        "the error does not name the lock: {said}"
    );

    // The first one is untouched.
    let res = reqwest::Client::new()
        .post(format!("http://{}/v1/streams/s/events", first.addr))
        .json(&json!({"data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    first.kill().await;
}
