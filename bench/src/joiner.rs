//! Late joiner (issue 24): a reader opens a page in the middle of a long answer — `tokens`
//! appends to one message, the stream still open — and wants the current text. Bytes and time
//! until it holds the text (the event whose seq is the head), with a full replay and with a
//! compacted read, over SSE and over the AI SDK UI message stream view. Each read rebuilds the
//! text and checks it against what was written, so a read that is small but wrong fails.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::http::Http;
use crate::report::Metrics;
use crate::sse::SseParser;
use crate::util::parse_u64;

/// Tokens as a model writes them: words with their leading space (about 5 bytes each).
const WORDS: [&str; 16] = [
    " The", " answer", " is", " that", " a", " stream", " of", " tokens", " grows", " one",
    " event", " at", " a", " time", ",", " and",
];

/// Repetitions of each read; the figures are their medians.
const REPEAT: usize = 3;

fn token(i: u64) -> &'static str {
    WORDS[(i % WORDS.len() as u64) as usize]
}

/// Writes the two answers, then measures each way of joining them.
pub async fn late_joiner(addr: SocketAddr, tokens: u64, run: usize, m: &mut Metrics) -> Result<()> {
    // Names and ids shaped like an application's (a chat id, per-token idempotency ids).
    let chat = format!("chat:5f0c2a8e-3b1d-4e7a-9c6f-1d2e3f4a5b{run:02}");
    let ui = format!("{chat}-ui");
    let text: String = (0..tokens).map(token).collect();
    let mut http = Http::connect(addr, None).await?;
    http.append(
        &chat,
        json!({"type":"msg","key":"answer","id":"m1-0","data":{"role":"assistant","text":""}})
            .to_string(),
    )
    .await?;
    http.append(
        &ui,
        json!([
            {"type":"ui","id":"u-s","data":{"type":"start","messageId":"m1"}},
            {"type":"ui","id":"u-t","data":{"type":"text-start","id":"txt-0"}},
        ])
        .to_string(),
    )
    .await?;
    for start in (0..tokens).step_by(500) {
        let end = (start + 500).min(tokens);
        let msgs: Vec<Value> = (start..end)
            .map(|i| json!({"type":"msg","key":"answer","append":true,"id":format!("m1-{}", i + 1),"data":{"text":token(i)}}))
            .collect();
        http.append(&chat, Value::from(msgs).to_string()).await?;
        let chunks: Vec<Value> = (start..end)
            .map(|i| json!({"type":"ui","id":format!("u-{i}"),"data":{"type":"text-delta","id":"txt-0","delta":token(i)}}))
            .collect();
        http.append(&ui, Value::from(chunks).to_string()).await?;
    }
    let head = tokens + 1;
    let ui_head = tokens + 2;
    m.set("joiner.tokens", tokens as f64);
    m.set("joiner.text_bytes", text.len() as f64);

    for (view, stream, head, path_of) in [
        ("sse", &chat, head, sse_path as fn(&str, bool) -> String),
        ("ui", &ui, ui_head, ui_path),
    ] {
        let mut figures = Vec::new();
        for compact in [false, true] {
            let mut bytes = 0;
            let mut times = Vec::new();
            for _ in 0..REPEAT {
                let (b, took, got) = join(addr, &path_of(stream, compact), head).await?;
                if got != text {
                    bail!(
                        "{view} (compact: {compact}) rebuilt {} bytes of text, not the {} written",
                        got.len(),
                        text.len()
                    );
                }
                bytes = b;
                times.push(took.as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            figures.push((bytes, times[REPEAT / 2]));
        }
        let [(full_bytes, full_ms), (compact_bytes, compact_ms)] = figures[..] else {
            unreachable!("two figures")
        };
        m.set(&format!("joiner.{view}.full_bytes"), full_bytes as f64);
        m.set(
            &format!("joiner.{view}.compact_bytes"),
            compact_bytes as f64,
        );
        m.set(
            &format!("joiner.{view}.bytes_pct"),
            100.0 * compact_bytes as f64 / full_bytes as f64,
        );
        m.set(&format!("joiner.{view}.full_ms"), full_ms);
        m.set(&format!("joiner.{view}.compact_ms"), compact_ms);
    }
    Ok(())
}

fn sse_path(stream: &str, compact: bool) -> String {
    format!(
        "/v1/streams/{stream}/sse?after=0&compact={}",
        u8::from(compact)
    )
}

fn ui_path(stream: &str, compact: bool) -> String {
    format!(
        "/v1/streams/{stream}/ui-message-stream?after=0&compact={}",
        u8::from(compact)
    )
}

/// Reads `path` until the event whose id is `head`: the body bytes that took, the time from
/// the request to that event, and the text rebuilt from what arrived.
async fn join(addr: SocketAddr, path: &str, head: u64) -> Result<(usize, Duration, String)> {
    let started = Instant::now();
    let mut http = Http::connect(addr, None).await?;
    let res = http.get(path, &[]).await?;
    if !res.status().is_success() {
        bail!("GET {path}: {}", res.status());
    }
    let mut body = res.into_body();
    let mut parser = SseParser::default();
    let mut text = Text::default();
    let mut bytes = 0;
    let mut last = 0;
    let mut bad = None;
    let read = async {
        while last < head {
            let Some(frame) = body.frame().await else {
                bail!("GET {path} ended at seq {last}, before {head}");
            };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            bytes += data.len();
            parser.feed(&data, |ev| {
                if let Some(seq) = ev.id.and_then(parse_u64) {
                    last = seq;
                    if let Err(e) = text.add(ev.data) {
                        bad.get_or_insert(e);
                    }
                }
            });
            if let Some(e) = bad.take() {
                return Err(e);
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), read)
        .await
        .with_context(|| format!("GET {path} took over 300 s"))??;
    Ok((bytes, started.elapsed(), text.0))
}

/// The answer's text as a reader rebuilds it: from envelopes (the message's `text`, with
/// appends merged: strings concatenate) or from UIMessageChunks (text deltas joined).
#[derive(Default)]
struct Text(String);

impl Text {
    fn add(&mut self, data: &[u8]) -> Result<()> {
        let v: Value = serde_json::from_slice(data).context("event JSON")?;
        if v.get("stream").is_some() {
            // An envelope: a start replaces the text, an append extends it.
            let piece = v["data"]["text"]
                .as_str()
                .context("envelope without text")?;
            if v["append"] != json!(true) {
                self.0.clear();
            }
            self.0.push_str(piece);
        } else if v["type"] == "text-delta" {
            self.0
                .push_str(v["delta"].as_str().context("text-delta without delta")?);
        }
        Ok(())
    }
}
