//! The README's walk-throughs, replayed against a live server exactly as a new user would type
//! them: every `curl` command of "A walk-through with curl" and "WebSocket and input requests"
//! runs through `sh` (real curl), and the WebSocket transcript is sent frame by frame. Each
//! reply is compared with the one the README shows (`# → [status] body` under a command,
//! `←` lines in the transcript); `"…"` in the README stands for a value that legitimately
//! differs per run (times, generated ids) and matches anything.

use std::process::Stdio;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{TestApp, WAIT};

const README: &str = include_str!("../../README.md");

/// One step of the walk-through, in README order.
#[derive(Debug)]
enum Step {
    /// A shell command and the reply the README shows for it, if any.
    Curl {
        command: String,
        expect: Option<String>,
    },
    /// A WebSocket transcript: `(true, frame)` is sent, `(false, frame)` received.
    Ws(Vec<(bool, String)>),
}

/// The README section under `heading`, up to the next `## `.
fn section(heading: &str) -> &'static str {
    let start = README
        .find(heading)
        .unwrap_or_else(|| panic!("README lacks {heading}"));
    let body = &README[start + heading.len()..];
    &body[..body.find("\n## ").unwrap_or(body.len())]
}

/// The fenced blocks of "A walk-through with curl" and "WebSocket and input requests", in order.
fn steps() -> Vec<Step> {
    let mut steps = Vec::new();
    for heading in [
        "## A walk-through with curl",
        "## WebSocket and input requests",
    ] {
        for block in section(heading).split("```").skip(1).step_by(2) {
            let (lang, body) = block.split_once('\n').unwrap();
            match lang {
                "sh" => steps.extend(curl_steps(body)),
                "text" => steps.push(Step::Ws(ws_steps(body))),
                other => panic!("unexpected block {other:?}"),
            }
        }
    }
    steps
}

fn curl_steps(body: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut lines = body.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(exp) = line.strip_prefix("# → ") {
            let Some(Step::Curl { expect, .. }) = out.last_mut() else {
                panic!("a reply with no command: {line}");
            };
            let mut text = exp.to_owned();
            // Continuation lines of a long reply.
            while let Some(more) = lines.peek().and_then(|l| l.strip_prefix("#   ")) {
                text.push_str(more.trim_start());
                lines.next();
            }
            *expect = Some(text);
            continue;
        }
        if !line.starts_with("curl ") {
            assert!(
                line.is_empty() || line.starts_with('#'),
                "not a command: {line}"
            );
            continue;
        }
        let mut command = line.to_owned();
        while command.ends_with('\\') {
            command.pop();
            command.push_str(lines.next().unwrap());
        }
        out.push(Step::Curl {
            command,
            expect: None,
        });
    }
    out
}

fn ws_steps(body: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for line in body.lines() {
        // `→ {…}   ← {…}` on one line: a request and its reply.
        for part in line.split("   ") {
            let part = part.trim();
            if let Some(f) = part.strip_prefix("→ ") {
                out.push((true, f.to_owned()));
            } else if let Some(f) = part.strip_prefix("← ") {
                out.push((false, f.to_owned()));
            } else {
                assert!(part.is_empty(), "not a transcript line: {line}");
            }
        }
    }
    out
}

/// Whether `actual` is what the README shows: same keys, same values, `"…"` matching any.
fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(e), _) if e == "…" => true,
        (Value::Object(e), Value::Object(a)) => {
            e.len() == a.len()
                && e.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|av| matches(v, av)))
        }
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(e, a)| matches(e, a))
        }
        (e, a) => e == a,
    }
}

fn json(text: &str, what: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text}"))
}

/// Runs a command that returns (not `curl -N`); returns its HTTP status and body.
async fn run_curl(command: &str) -> (u16, String) {
    let command = command.replacen("curl ", "curl -w '\\n%{http_code}' ", 1);
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("sh")
            .args(["-c", &command])
            .output(),
    )
    .await
    .expect("curl in time")
    .unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

/// Follows an SSE response (`curl -N`) until it has delivered the ids the README lists
/// (`id: N`), then ends it.
async fn follow_sse(command: &str, expect: &str) {
    let ids: Vec<String> = expect
        .split("id: ")
        .skip(1)
        .map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        !ids.is_empty(),
        "the README shows which events arrive: {expect}"
    );
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &format!("exec {command}")])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut retry = false;
    tokio::time::timeout(WAIT, async {
        while seen.len() < ids.len() {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the response goes on");
            retry |= line.starts_with("retry: ");
            if let Some(id) = line.strip_prefix("id: ") {
                seen.push(id.to_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{command}: only ids {seen:?} arrived"));
    assert_eq!(seen, ids, "{command}");
    assert_eq!(retry, expect.contains("retry:"), "{command}");
    child.kill().await.unwrap();
}

async fn replay_ws(app: &TestApp, frames: &[(bool, String)]) {
    let url = format!("ws://{}/v1/ws", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut i = 0;
    while i < frames.len() {
        if frames[i].0 {
            ws.send(Message::text(frames[i].1.clone())).await.unwrap();
            i += 1;
            continue;
        }
        // The replies up to the next request may arrive in any order (an ack and the live
        // event of what was just published race); each must match one the README shows.
        let mut expected: Vec<Value> = Vec::new();
        while i < frames.len() && !frames[i].0 {
            expected.push(json(&frames[i].1, "a transcript reply"));
            i += 1;
        }
        let shown = expected.clone();
        while !expected.is_empty() {
            let msg = tokio::time::timeout(WAIT, ws.next())
                .await
                .unwrap_or_else(|_| panic!("no reply in time; still expecting {expected:?}"))
                .expect("the socket stays open")
                .unwrap();
            let Message::Text(text) = msg else {
                continue;
            };
            let actual = json(&text, "a server frame");
            let Some(at) = expected.iter().position(|e| matches(e, &actual)) else {
                panic!(
                    "the server sent {actual}, which the README does not show; it shows {}",
                    Value::Array(shown)
                );
            };
            expected.remove(at);
        }
    }
}

#[backend_test]
async fn the_readme_walk_through_and_websocket_transcript_give_the_replies_shown(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let steps = steps();
    assert!(
        steps
            .iter()
            .filter(|s| matches!(s, Step::Curl { .. }))
            .count()
            > 15
    );
    assert!(steps.iter().any(|s| matches!(s, Step::Ws(_))));
    for step in &steps {
        match step {
            Step::Curl { command, expect } => {
                let command = command.replace("localhost:8080", &app.addr.to_string());
                if command.contains(" -sN ") {
                    follow_sse(&command, expect.as_deref().unwrap_or_default()).await;
                    continue;
                }
                let (status, body) = run_curl(&command).await;
                let Some(expect) = expect else {
                    assert!((200..300).contains(&status), "{command}: {status} {body}");
                    continue;
                };
                let (want_status, want_body) = match expect.split_once(' ') {
                    Some((s, rest)) if s.len() == 3 && s.parse::<u16>().is_ok() => {
                        (Some(s.parse::<u16>().unwrap()), rest)
                    }
                    _ => (None, expect.as_str()),
                };
                if let Some(s) = want_status {
                    assert_eq!(status, s, "{command}: {body}");
                } else {
                    assert!((200..300).contains(&status), "{command}: {status} {body}");
                }
                if want_body == "(no body)" {
                    assert!(body.is_empty(), "{command}: {body}");
                    continue;
                }
                let want = json(want_body, "the README's reply");
                let got = json(&body, "the reply");
                assert!(
                    matches(&want, &got),
                    "{command}\nREADME shows: {want}\nserver says:  {got}"
                );
            }
            Step::Ws(frames) => replay_ws(&app, frames).await,
        }
    }
    app.shutdown().await;
}

/// The README's token recipe, run as printed: its token reads `run:*` and answers on `run:43`,
/// and nothing more.
#[backend_test]
async fn the_readme_jwt_recipe_mints_a_token_the_server_accepts(db: TestDb) {
    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
    let app = TestApp::spawn_with(db, |c| {
        c.jwt_secret = Some(SECRET.into());
        c.admin_token = Some("admin".into());
    })
    .await;
    let auth = &README[README.find("## Auth and limits").unwrap()..];
    let script = auth
        .split_once("<<'EOF'\n")
        .and_then(|(_, rest)| rest.split_once("\nEOF\n"))
        .expect("the README's token recipe")
        .0;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, SECRET])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let admin = app
        .client
        .post(app.url("/v1/streams/run:43/events"))
        .bearer_auth("admin")
        .json(&serde_json::json!({"type":"token","data":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 201);
    let status = |path: &str, post: Option<serde_json::Value>, token: Option<&str>| {
        let mut req = match post {
            Some(body) => app.client.post(app.url(path)).json(&body),
            None => app.client.get(app.url(path)),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let read = "/v1/streams/run:43/events?after=0";
    assert_eq!(status(read, None, Some(&token)).await, 200);
    assert_eq!(status(read, None, None).await, 401);
    let other = "/v1/streams/job:1/events?after=0";
    assert_eq!(status(other, None, Some(&token)).await, 403);
    let event = serde_json::json!({"data":1});
    let append = "/v1/streams/run:43/events";
    assert_eq!(status(append, Some(event), Some(&token)).await, 403);
    let stop = serde_json::json!({"reason":"enough"});
    assert_eq!(
        status("/v1/streams/run:43/stop", Some(stop), Some(&token)).await,
        201
    );
    app.shutdown().await;
}
