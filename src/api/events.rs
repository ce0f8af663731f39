//! Parsing events as producers send them (REST body or WebSocket `events`), keeping each
//! `data` value exactly as received.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::Error;
use crate::log::model::{parse_event_type, parse_label, DEFAULT_TYPE};
use crate::log::NewEvent;

/// Size limits for appended events.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_batch_events: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn<'a> {
    #[serde(rename = "type", default)]
    ty: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    key: Option<String>,
    /// Extends the message named by `key` (see `live::compact`); only with a key.
    #[serde(default)]
    append: Option<bool>,
}

/// Maps a serde_json error to `invalid_json` (not JSON at all) or `invalid_event` (JSON of
/// the wrong shape).
pub fn json_error(what: &str, e: serde_json::Error) -> Error {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            Error::InvalidJson(format!("{what} is not valid JSON: {e}"))
        }
        Category::Data => Error::InvalidEvent(format!("{what}: {e}")),
    }
}

/// `events`, each authored by `by` (the caller's token `sub`; see [`NewEvent::by`]).
pub fn authored(events: Vec<NewEvent>, by: Option<&str>) -> Vec<NewEvent> {
    events.into_iter().map(|e| e.by(by)).collect()
}

/// Parses one event object or an array of them.
pub fn parse_batch(body: &[u8], limits: Limits) -> Result<Vec<NewEvent>, Error> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let events: Vec<EventIn<'_>> = match first {
        Some(b'[') => serde_json::from_slice(body).map_err(|e| json_error("the batch", e))?,
        Some(b'{') => vec![serde_json::from_slice(body).map_err(|e| json_error("the event", e))?],
        Some(_) => {
            // Distinguish "not JSON" from "JSON, but not an object or array".
            serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .map_err(|e| json_error("the body", e))?;
            return Err(Error::InvalidEvent(
                "expected an event object or an array of event objects".into(),
            ));
        }
        None => return Err(Error::InvalidJson("the body is empty".into())),
    };
    if events.is_empty() {
        return Err(Error::EmptyBatch);
    }
    if events.len() > limits.max_batch_events {
        return Err(Error::BatchTooLarge {
            count: events.len(),
            limit: limits.max_batch_events,
        });
    }
    events
        .into_iter()
        .enumerate()
        .map(|(i, ev)| {
            to_new_event(ev, limits).map_err(|e| match e {
                Error::InvalidEvent(msg) if events_is_batch(first) => {
                    Error::InvalidEvent(format!("event {i}: {msg}"))
                }
                other => other,
            })
        })
        .collect()
}

fn events_is_batch(first: Option<&u8>) -> bool {
    first == Some(&b'[')
}

fn to_new_event(ev: EventIn<'_>, limits: Limits) -> Result<NewEvent, Error> {
    let ty = match ev.ty {
        Some(t) => parse_event_type(&t)?,
        None => DEFAULT_TYPE.to_owned(),
    };
    let data = ev.data.map_or("null", RawValue::get);
    if data.len() > limits.max_event_bytes {
        return Err(Error::EventTooLarge {
            size: data.len(),
            limit: limits.max_event_bytes,
        });
    }
    let key = ev
        .key
        .as_deref()
        .map(|s| parse_label("key", s))
        .transpose()?;
    let append = ev.append.unwrap_or(false);
    if append && key.is_none() {
        return Err(Error::InvalidEvent(
            "`append` needs a `key`: it names the message the event extends".into(),
        ));
    }
    Ok(NewEvent {
        ty,
        data: data.to_owned(),
        id: ev.id.as_deref().map(|s| parse_label("id", s)).transpose()?,
        key,
        body: None,
        by: None,
        append,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_event_bytes: 64,
        max_batch_events: 3,
    };

    #[test]
    fn keeps_data_exactly_and_defaults_the_type() {
        let evs = parse_batch(br#" {"data": {"z":1,  "a":"\u00e9 x"} } "#, LIMITS).unwrap();
        assert_eq!(evs[0].data, r#"{"z":1,  "a":"\u00e9 x"}"#);
        assert_eq!(evs[0].ty, "message");
        let evs = parse_batch(br#"[{"type":"t"}]"#, LIMITS).unwrap();
        assert_eq!(evs[0].data, "null");
        assert!(!evs[0].append);
        let evs = parse_batch(br#"{"key":"k","append":true,"data":"x"}"#, LIMITS).unwrap();
        assert!(evs[0].append);
        let evs = parse_batch(br#"{"append":false}"#, LIMITS).unwrap();
        assert!(!evs[0].append);
    }

    #[test]
    fn rejects_each_bad_shape_with_its_code() {
        let code = |b: &[u8]| parse_batch(b, LIMITS).unwrap_err().code();
        assert_eq!(code(b"{"), "invalid_json");
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(b"nope"), "invalid_json");
        assert_eq!(code(b"42"), "invalid_event");
        assert_eq!(code(b"[]"), "empty_batch");
        assert_eq!(code(b"[{},{},{},{}]"), "batch_too_large");
        assert_eq!(code(br#"{"type":"stream.closed"}"#), "reserved_type");
        assert_eq!(code(br#"{"type":""}"#), "invalid_event");
        assert_eq!(code(br#"{"type":5}"#), "invalid_event");
        assert_eq!(code(br#"{"dta":1}"#), "invalid_event");
        assert_eq!(code(br#"{"id":""}"#), "invalid_event");
        assert_eq!(code(br#"{"append":true}"#), "invalid_event");
        assert_eq!(code(br#"{"key":"k","append":1}"#), "invalid_event");
        let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(64));
        assert_eq!(code(big.as_bytes()), "event_too_large");
    }
}
