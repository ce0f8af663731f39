//! One event's wire encodings, computed at most once and shared by every subscriber.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::log::model::{encode_envelope_locating_data, StoredEvent};

/// An event ready to send: its envelope and, lazily, its SSE, WebSocket and AI SDK frames.
#[derive(Debug)]
pub struct Frame {
    pub seq: i64,
    pub ty: String,
    /// The event envelope (openapi.yaml `Envelope`); byte-identical live and on replay.
    pub envelope: Bytes,
    /// When the event was committed, if it came through this node's live path (for the
    /// commit-to-send latency metric).
    pub committed_at: Option<Instant>,
    /// Where the event's `data` lies in `envelope`.
    data: std::ops::Range<usize>,
    sse: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
    ui: OnceLock<Bytes>,
}

impl Frame {
    pub fn new(stream: &str, ev: &StoredEvent, committed_at: Option<Instant>) -> Arc<Self> {
        Self::build(stream, ev, committed_at, None)
    }

    /// The frame of a compacted read's event standing for `n` events of the log (`ev` carries
    /// the last one's seq and the merged data): its envelope says `"folded":n`.
    pub fn folded(stream: &str, ev: &StoredEvent, n: usize) -> Arc<Self> {
        Self::build(stream, ev, None, Some(n))
    }

    fn build(
        stream: &str,
        ev: &StoredEvent,
        committed_at: Option<Instant>,
        folded: Option<usize>,
    ) -> Arc<Self> {
        let (envelope, data) = encode_envelope_locating_data(stream, ev, folded);
        Arc::new(Frame {
            seq: ev.seq,
            ty: ev.ty.clone(),
            envelope,
            committed_at,
            data,
            sse: OnceLock::new(),
            ws: OnceLock::new(),
            ui: OnceLock::new(),
        })
    }

    /// The AI SDK UI message stream frame: `id: <seq>` and the event's `data` alone (one
    /// UIMessageChunk) as `data:` lines, ending with the blank line.
    pub fn ui(&self) -> &Bytes {
        self.ui.get_or_init(|| {
            let data = &self.envelope[self.data.clone()];
            let mut buf = BytesMut::with_capacity(data.len() + 32);
            buf.put_slice(b"id: ");
            buf.put_slice(self.seq.to_string().as_bytes());
            buf.put_u8(b'\n');
            put_sse_data(&mut buf, data);
            buf.put_u8(b'\n');
            buf.freeze()
        })
    }

    /// What holding this frame costs, about: its envelope and the two encodings of it that
    /// transports build lazily (counted up front, so a buffer's bound holds once they are).
    pub fn weight(&self) -> usize {
        3 * self.envelope.len() + self.ty.len() + 128
    }

    /// `id: <seq>` and the envelope as `data:` lines, ending with the blank line.
    pub fn sse(&self) -> &Bytes {
        self.sse.get_or_init(|| {
            let mut buf = BytesMut::with_capacity(self.envelope.len() + 32);
            buf.put_slice(b"id: ");
            buf.put_slice(self.seq.to_string().as_bytes());
            buf.put_u8(b'\n');
            put_sse_data(&mut buf, &self.envelope);
            buf.put_u8(b'\n');
            buf.freeze()
        })
    }

    /// The WebSocket `event` op: `{"op":"event",` followed by the envelope's fields.
    pub fn ws(&self) -> &Bytes {
        self.ws.get_or_init(|| {
            let mut buf = BytesMut::with_capacity(self.envelope.len() + 14);
            buf.put_slice(b"{\"op\":\"event\",");
            buf.put_slice(&self.envelope[1..]);
            buf.freeze()
        })
    }
}

/// Writes `payload` as SSE `data:` lines. JSON only has line breaks in insignificant
/// whitespace; each becomes a new `data:` line, which EventSource joins back with `\n`.
pub fn put_sse_data(buf: &mut BytesMut, payload: &[u8]) {
    let mut rest = payload;
    loop {
        buf.put_slice(b"data: ");
        match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            Some(i) => {
                buf.put_slice(&rest[..i]);
                buf.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                buf.put_slice(rest);
                buf.put_u8(b'\n');
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_data_splits_every_kind_of_line_break() {
        let mut buf = BytesMut::new();
        put_sse_data(&mut buf, b"{\"a\":\n1,\r\n\"b\":\r2}");
        assert_eq!(
            &buf[..],
            b"data: {\"a\":\ndata: 1,\ndata: \"b\":\ndata: 2}\n"
        );
    }
}
