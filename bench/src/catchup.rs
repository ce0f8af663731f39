//! Catch-up: a reconnecting client reads a long stream from cursor 0 over SSE, WebSocket and
//! NDJSON export; events/s from request to last event.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;

use crate::http::Http;
use crate::report::Metrics;
use crate::sse::SseParser;
use crate::util::{parse_u64, u64_after};

/// Every event from cursor 0 to `head` over `via`; checks each seq arrives once, in order.
pub async fn catch_up(
    addr: SocketAddr,
    stream: &str,
    head: u64,
    via: &str,
    m: &mut Metrics,
) -> Result<()> {
    let started = Instant::now();
    let limit = Duration::from_secs(600);
    let got = tokio::time::timeout(limit, read(addr, stream, head, via))
        .await
        .with_context(|| format!("catch-up over {via} took over {limit:?}"))??;
    if got != head {
        bail!("catch-up over {via} delivered {got} events, expected {head}");
    }
    m.set(
        &format!("catchup.{via}.events_s"),
        head as f64 / started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Reads the stream from cursor 0 until `head` over `via`, checking order; returns the last seq.
pub async fn read(addr: SocketAddr, stream: &str, head: u64, via: &str) -> Result<u64> {
    let mut order = Order { last: 0, via };
    match via {
        "sse" => {
            let mut http = Http::connect(addr, None).await?;
            let res = http
                .get(&format!("/v1/streams/{stream}/sse?after=0"), &[])
                .await?;
            let mut body = res.into_body();
            let mut parser = SseParser::default();
            let mut bad = None;
            while order.last < head {
                let Some(frame) = body.frame().await else {
                    break;
                };
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                parser.feed(&data, |ev| {
                    if let Some(seq) = ev.id.and_then(parse_u64) {
                        if let Err(e) = order.check(seq) {
                            bad.get_or_insert(e);
                        }
                    }
                });
                if let Some(e) = bad.take() {
                    return Err(e);
                }
            }
        }
        "ws" => {
            let mut ws = crate::ws::connect(addr, None).await?;
            crate::ws::subscribe(&mut ws, stream, 0).await?;
            while order.last < head {
                let Some(msg) = ws.next().await else { break };
                let Message::Text(t) = msg? else { continue };
                if t.as_bytes().starts_with(b"{\"op\":\"event\"") {
                    order.check(
                        u64_after(t.as_bytes(), b"\"seq\":").context("event without seq")?,
                    )?;
                }
            }
        }
        "ndjson" => {
            let mut http = Http::connect(addr, None).await?;
            let res = http
                .get(
                    &format!("/v1/streams/{stream}/events?after=0"),
                    &[("accept", "application/x-ndjson")],
                )
                .await?;
            if !res.status().is_success() {
                bail!("export: {}", res.status());
            }
            let mut body = res.into_body();
            let mut partial = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                let mut rest = &data[..];
                while let Some(nl) = memchr::memchr(b'\n', rest) {
                    let line = if partial.is_empty() {
                        &rest[..nl]
                    } else {
                        partial.extend_from_slice(&rest[..nl]);
                        &partial[..]
                    };
                    let seq = u64_after(line, b"\"seq\":").context("line without seq")?;
                    order.check(seq)?;
                    partial.clear();
                    rest = &rest[nl + 1..];
                }
                partial.extend_from_slice(rest);
            }
        }
        other => bail!("unknown transport {other}"),
    }
    Ok(order.last)
}

struct Order<'a> {
    last: u64,
    via: &'a str,
}

impl Order<'_> {
    fn check(&mut self, seq: u64) -> Result<()> {
        if seq != self.last + 1 {
            bail!("catch-up over {}: seq {seq} after {}", self.via, self.last);
        }
        self.last = seq;
        Ok(())
    }
}
