//! A small SSE parser for the load generator: it sees hundreds of thousands of events per
//! second, so it scans for frame ends with `memchr` and copies only partial frames.

use anyhow::Result;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use memchr::memmem;

/// Reads an SSE response body to its end, handing each data chunk to `on_chunk` with the one
/// parser the body is fed to (the caller feeds it, and does its per-chunk work after).
pub async fn follow(
    mut body: Incoming,
    mut on_chunk: impl FnMut(&mut SseParser, &[u8]),
) -> Result<()> {
    let mut parser = SseParser::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        on_chunk(&mut parser, &data);
    }
    Ok(())
}

/// One parsed event. `data` holds the `data:` lines joined with `\n`.
#[derive(Debug, PartialEq)]
pub struct SseEvent<'a> {
    pub id: Option<&'a [u8]>,
    pub event: Option<&'a [u8]>,
    pub data: &'a [u8],
}

#[derive(Default)]
pub struct SseParser {
    /// An incomplete frame carried over to the next chunk.
    buf: Vec<u8>,
    /// Scratch space for multi-line data.
    joined: Vec<u8>,
}

impl SseParser {
    /// Feeds one chunk of the body; calls `on_event` for every complete event (comments and
    /// `retry:`-only frames produce none).
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        if self.buf.is_empty() {
            let used = parse_frames(chunk, &mut self.joined, &mut on_event);
            self.buf.extend_from_slice(&chunk[used..]);
        } else {
            self.buf.extend_from_slice(chunk);
            let mut buf = std::mem::take(&mut self.buf);
            let used = parse_frames(&buf, &mut self.joined, &mut on_event);
            buf.drain(..used);
            self.buf = buf;
        }
    }
}

/// Parses every complete frame in `input`; returns how many bytes were consumed.
fn parse_frames(
    input: &[u8],
    joined: &mut Vec<u8>,
    on_event: &mut impl FnMut(SseEvent<'_>),
) -> usize {
    let finder = memmem::Finder::new(b"\n\n");
    let mut pos = 0;
    while let Some(end) = finder.find(&input[pos..]) {
        let frame = &input[pos..pos + end + 1];
        pos += end + 2;
        let mut id = None;
        let mut event = None;
        let mut data: Option<&[u8]> = None;
        let mut lines = 0;
        joined.clear();
        for line in frame.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let (field, value) = match memchr::memchr(b':', line) {
                Some(0) => continue, // a comment
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"id" => id = Some(value),
                b"event" => event = Some(value),
                b"data" => {
                    lines += 1;
                    if lines == 2 {
                        joined.extend_from_slice(data.unwrap_or_default());
                    }
                    if lines >= 2 {
                        joined.push(b'\n');
                        joined.extend_from_slice(value);
                    }
                    data = Some(value);
                }
                _ => {}
            }
        }
        if let Some(d) = data {
            let data = if lines > 1 { &joined[..] } else { d };
            on_event(SseEvent { id, event, data });
        }
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(chunks: &[&[u8]]) -> Vec<(Option<String>, Option<String>, String)> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| {
                let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                out.push((e.id.map(s), e.event.map(s), s(e.data)));
            });
        }
        out
    }

    #[test]
    fn parses_events_split_anywhere() {
        let body = b"retry: 2000\n\n: keep-alive\n\nid: 1\ndata: {\"a\":1}\n\nevent: notice\ndata: x\ndata: y\n\nid: 2\ndata:z\n\n";
        let whole = collect(&[body]);
        assert_eq!(
            whole,
            vec![
                (Some("1".into()), None, "{\"a\":1}".into()),
                (None, Some("notice".into()), "x\ny".into()),
                (Some("2".into()), None, "z".into()),
            ]
        );
        for cut in 1..body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(collect(&[a, b]), whole, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(collect(&bytes), whole);
    }
}
