//! The log's vocabulary: stream names, event types, new and stored events, and the one
//! function that turns a stored event into its wire envelope (used live and on replay alike,
//! which is what keeps the two byte-identical).

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::error::Error;

/// Longest stream name, in characters (all of them ASCII).
pub const MAX_STREAM_NAME: usize = 200;
/// Longest event type, in characters.
pub const MAX_TYPE_CHARS: usize = 128;
/// Longest event `id` or `key`, in characters.
pub const MAX_ID_CHARS: usize = 256;

/// Types only the server writes; producers appending them get `reserved_type`. The agent's
/// answers to `control.stop` (`control.stopped`, `control.stop_refused`) are not among them:
/// the producer appends those with its own grant.
pub const RESERVED_TYPES: [&str; 5] = [
    TYPE_STREAM_CLOSED,
    TYPE_INPUT_REQUESTED,
    TYPE_INPUT_ANSWERED,
    TYPE_INPUT_EXPIRED,
    TYPE_CONTROL_STOP,
];
pub const TYPE_STREAM_CLOSED: &str = "stream.closed";
pub const TYPE_INPUT_REQUESTED: &str = "input.requested";
pub const TYPE_INPUT_ANSWERED: &str = "input.answered";
pub const TYPE_INPUT_EXPIRED: &str = "input.expired";
pub const TYPE_CONTROL_STOP: &str = "control.stop";
pub const DEFAULT_TYPE: &str = "message";

/// A validated stream name: 1–200 characters from `A-Z a-z 0-9 _ . : @ -`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let ok_char =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-');
        if raw.is_empty() || raw.len() > MAX_STREAM_NAME || !raw.chars().all(ok_char) {
            return Err(Error::InvalidStreamName(raw.chars().take(64).collect()));
        }
        Ok(Self(raw.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for StreamName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Checks a producer-supplied event type: 1–128 characters, no control characters, not reserved.
pub fn parse_event_type(raw: &str) -> Result<String, Error> {
    let chars = raw.chars().count();
    if chars == 0 || chars > MAX_TYPE_CHARS || raw.chars().any(char::is_control) {
        return Err(Error::InvalidEvent(format!(
            "`type` must be 1-{MAX_TYPE_CHARS} characters without control characters"
        )));
    }
    if RESERVED_TYPES.contains(&raw) {
        return Err(Error::ReservedType(raw.to_owned()));
    }
    Ok(raw.to_owned())
}

/// Checks an event `id` or `key`: 1–256 characters, no control characters.
pub fn parse_label(field: &str, raw: &str) -> Result<String, Error> {
    let chars = raw.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS || raw.chars().any(char::is_control) {
        return Err(Error::InvalidEvent(format!(
            "`{field}` must be 1-{MAX_ID_CHARS} characters without control characters"
        )));
    }
    Ok(raw.to_owned())
}

/// An event as a producer hands it to the appender, already validated.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub ty: String,
    /// The JSON value exactly as received.
    pub data: String,
    pub id: Option<String>,
    pub key: Option<String>,
    /// A byte payload kept exactly as received (Durable Streams byte streams); `data` is then
    /// `null`. None for every JSON event.
    pub body: Option<Vec<u8>>,
    /// Who appended it: the token `sub` of an authenticated caller (`"admin"` for the admin
    /// token); None for anonymous callers. The envelope's `by`.
    pub by: Option<String>,
    /// The event extends the message named by `key` (never set without a key); see
    /// [`crate::live::compact`] for the merge rule.
    pub append: bool,
}

impl NewEvent {
    /// An event the server composes itself (a stop, a close, an input request's events): a
    /// type and JSON `data`, with no id, key or byte payload, and nobody as its author yet.
    pub fn composed(ty: &str, data: String) -> Self {
        NewEvent {
            ty: ty.to_owned(),
            data,
            id: None,
            key: None,
            body: None,
            by: None,
            append: false,
        }
    }

    /// This event, authored by `by` (see [`NewEvent::by`]).
    pub fn by(mut self, by: Option<&str>) -> Self {
        self.by = by.map(str::to_owned);
        self
    }
}

/// An event as stored in the log (read with [`crate::log::store::EVENT_COLUMNS`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    pub seq: i64,
    pub ty: String,
    pub data: String,
    pub id: Option<String>,
    pub key: Option<String>,
    #[sqlx(try_from = "crate::log::db::Ts")]
    pub time: DateTime<Utc>,
    /// See [`NewEvent::body`].
    pub body: Option<Vec<u8>>,
    /// See [`NewEvent::by`].
    pub by: Option<String>,
    /// See [`NewEvent::append`].
    pub append: bool,
}

/// Formats a time the way every tailcast response does: RFC 3339, UTC, milliseconds.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Truncates a time to the wire precision, so what is stored equals what is sent.
pub fn wire_time(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// The first whole millisecond at or after `t`. Stored times are whole milliseconds, so
/// `time >= t` and `time >= ceil_millis(t)` select the same rows (and `time < t`, `time <
/// ceil_millis(t)`): comparing with it is exact on a backend that stores milliseconds.
pub fn ceil_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    let down = wire_time(t);
    if down == t {
        t
    } else {
        down + chrono::Duration::milliseconds(1)
    }
}

fn put_json_str(buf: &mut BytesMut, s: &str) {
    // Writing a &str into a Vec cannot fail.
    serde_json::to_writer(buf.writer(), s).expect("string serialisation");
}

/// The event envelope (openapi.yaml `Envelope`), encoded once:
/// `{"stream","seq","type","data","id"?,"key"?,"by"?,"append"?,"folded"?,"time"}`.
/// An event holding a byte payload carries it as a base64 string in `data`, followed by
/// `"encoding":"base64"`.
pub fn encode_envelope(stream: &str, ev: &StoredEvent) -> Bytes {
    encode_envelope_locating_data(stream, ev, None).0
}

/// `encode_envelope`, and where the event's `data` lies in it (so a framing that sends only
/// the data, like the AI SDK view, can slice it out without a copy). For a byte payload
/// that is its base64 string, quotes included. `folded`: the envelope stands for that many
/// events of the log (a compacted read), said by `"folded":n` before `time`.
pub fn encode_envelope_locating_data(
    stream: &str,
    ev: &StoredEvent,
    folded: Option<usize>,
) -> (Bytes, std::ops::Range<usize>) {
    let body_len = ev.body.as_ref().map_or(0, |b| b.len() * 4 / 3 + 32);
    let mut buf =
        BytesMut::with_capacity(96 + stream.len() + ev.ty.len() + ev.data.len() + body_len);
    buf.put_slice(b"{\"stream\":");
    put_json_str(&mut buf, stream);
    buf.put_slice(b",\"seq\":");
    buf.put_slice(itoa_i64(ev.seq).as_bytes());
    buf.put_slice(b",\"type\":");
    put_json_str(&mut buf, &ev.ty);
    buf.put_slice(b",\"data\":");
    let start = buf.len();
    match &ev.body {
        Some(body) => {
            use base64::Engine as _;
            buf.put_u8(b'"');
            buf.put_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(body)
                    .as_bytes(),
            );
            buf.put_u8(b'"');
        }
        None => buf.put_slice(ev.data.as_bytes()),
    }
    let data = start..buf.len();
    if ev.body.is_some() {
        buf.put_slice(b",\"encoding\":\"base64\"");
    }
    if let Some(id) = &ev.id {
        buf.put_slice(b",\"id\":");
        put_json_str(&mut buf, id);
    }
    if let Some(key) = &ev.key {
        buf.put_slice(b",\"key\":");
        put_json_str(&mut buf, key);
    }
    if let Some(by) = &ev.by {
        buf.put_slice(b",\"by\":");
        put_json_str(&mut buf, by);
    }
    if ev.append {
        buf.put_slice(b",\"append\":true");
    }
    if let Some(n) = folded {
        buf.put_slice(b",\"folded\":");
        buf.put_slice(n.to_string().as_bytes());
    }
    buf.put_slice(b",\"time\":\"");
    buf.put_slice(format_time(&ev.time).as_bytes());
    buf.put_slice(b"\"}");
    (buf.freeze(), data)
}

fn itoa_i64(n: i64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_millis_rounds_up_to_the_next_stored_time() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let whole = t("2026-11-23T10:00:00.123Z");
        assert_eq!(ceil_millis(whole), whole);
        assert_eq!(ceil_millis(t("2026-11-23T10:00:00.122001Z")), whole);
        assert_eq!(ceil_millis(t("2026-11-23T10:00:00.122999999Z")), whole);
    }

    #[test]
    fn stream_names_at_their_limits() {
        assert!(StreamName::parse("run:42").is_ok());
        assert!(StreamName::parse("a-Z_0.9:@x").is_ok());
        assert!(StreamName::parse(&"x".repeat(200)).is_ok());
        assert!(StreamName::parse(&"x".repeat(201)).is_err());
        assert!(StreamName::parse("").is_err());
        assert!(StreamName::parse("a b").is_err());
        assert!(StreamName::parse("a/b").is_err());
        assert!(StreamName::parse("é").is_err());
        assert!(StreamName::parse("a\0").is_err());
    }

    #[test]
    fn event_types_at_their_limits() {
        assert_eq!(parse_event_type("token").unwrap(), "token");
        assert!(parse_event_type(&"é".repeat(128)).is_ok());
        assert!(parse_event_type(&"é".repeat(129)).is_err());
        assert!(parse_event_type("").is_err());
        assert!(parse_event_type("a\nb").is_err());
        for reserved in RESERVED_TYPES {
            assert!(matches!(
                parse_event_type(reserved),
                Err(Error::ReservedType(_))
            ));
        }
        // The agent's answers to a stop are its own events (the stop-acknowledgement
        // convention): only the request, `control.stop`, is the server's.
        for answer in ["control.stopped", "control.stop_refused"] {
            assert_eq!(parse_event_type(answer).unwrap(), answer);
        }
    }

    #[test]
    fn envelope_keeps_data_bytes_and_omits_absent_fields() {
        let ev = StoredEvent {
            seq: 17,
            ty: "token".into(),
            data: "{\"b\":1, \"a\":[1e400]}".into(),
            id: None,
            key: Some("k\"1".into()),
            time: DateTime::from_timestamp_millis(1_795_000_000_123).unwrap(),
            body: None,
            by: None,
            append: false,
        };
        let env = encode_envelope("run:42", &ev);
        assert_eq!(
            std::str::from_utf8(&env).unwrap(),
            r#"{"stream":"run:42","seq":17,"type":"token","data":{"b":1, "a":[1e400]},"key":"k\"1","time":"2026-11-18T11:06:40.123Z"}"#
        );
    }

    #[test]
    fn envelope_says_append_and_folded_before_time() {
        let ev = StoredEvent {
            seq: 9,
            ty: "t".into(),
            data: "\"x\"".into(),
            id: None,
            key: Some("k".into()),
            time: DateTime::from_timestamp_millis(0).unwrap(),
            body: None,
            by: None,
            append: true,
        };
        let (env, _) = encode_envelope_locating_data("s", &ev, Some(3));
        assert_eq!(
            std::str::from_utf8(&env).unwrap(),
            r#"{"stream":"s","seq":9,"type":"t","data":"x","key":"k","append":true,"folded":3,"time":"1970-01-01T00:00:00.000Z"}"#
        );
    }

    #[test]
    fn envelope_locates_its_data() {
        let ev = StoredEvent {
            seq: 3,
            ty: "ui".into(),
            data: "{\"type\":\"text-delta\",\"id\":\"t\",\"delta\":\"\\\"é\"}".into(),
            id: Some("x".into()),
            key: None,
            time: DateTime::from_timestamp_millis(0).unwrap(),
            body: None,
            by: Some("ops@example".into()),
            append: false,
        };
        let (env, at) = encode_envelope_locating_data("s\"é", &ev, None);
        assert_eq!(&env[at], ev.data.as_bytes());
        // A byte payload's data is its base64 string, and the envelope says so after it.
        let bytes = StoredEvent {
            body: Some(vec![0, 255, b'"']),
            data: "null".into(),
            ..ev
        };
        let (env, at) = encode_envelope_locating_data("s", &bytes, None);
        assert_eq!(&env[at.clone()], b"\"AP8i\"");
        assert!(std::str::from_utf8(&env[at.end..])
            .unwrap()
            .starts_with(",\"encoding\":\"base64\",\"id\":\"x\",\"by\":\"ops@example\",\"time\""));
    }
}
