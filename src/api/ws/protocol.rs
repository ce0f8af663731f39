//! The WebSocket protocol's messages: parsing client ops (each malformed message gets its own
//! error code) and encoding server replies.
//!
//! A client message is parsed as a map of raw JSON values first, so that `events`, `data`
//! and `reason` keep the bytes the client sent (invariant 5) and `ref` is echoed exactly.

use std::collections::HashMap;

use axum::extract::ws::{Message, Utf8Bytes};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::api::params::{self, RequestId, Since};
use crate::error::Error;
use crate::live::{Filter, Start};
use crate::log::model::MAX_TYPE_CHARS;
use crate::log::StreamName;

/// One parsed client message.
#[derive(Debug)]
pub struct Request<'a> {
    pub reference: Option<&'a RawValue>,
    pub op: Op<'a>,
}

#[derive(Debug)]
pub enum Op<'a> {
    Subscribe {
        stream: StreamName,
        start: Start,
        filter: Filter,
        /// Send this connection the stream's `join` and `leave` notices.
        presence: bool,
        /// How this follower appears in the stream's presence (else the connection's label).
        label: Option<String>,
        /// Whole messages for the catch-up, then the live tail (see `live::compact`).
        compact: bool,
    },
    Unsubscribe {
        stream: StreamName,
    },
    Publish {
        stream: StreamName,
        events: &'a RawValue,
        expected_seq: Option<i64>,
    },
    Input {
        stream: StreamName,
        request_id: RequestId,
        data: &'a RawValue,
    },
    Stop {
        stream: StreamName,
        reason: Option<&'a RawValue>,
    },
    /// Who follows the stream now.
    Presence {
        stream: StreamName,
        limit: Option<i64>,
    },
    Ping,
}

/// A message that could not be parsed, with the `ref` to echo if one could be read.
#[derive(Debug)]
pub struct Rejected<'a> {
    pub reference: Option<&'a RawValue>,
    pub error: Error,
}

/// The fields of one message, taken one by one; whatever is left over is an unknown field.
struct Fields<'a> {
    map: HashMap<String, &'a RawValue>,
}

impl<'a> Fields<'a> {
    fn raw(&mut self, name: &'static str) -> Option<&'a RawValue> {
        self.map.remove(name)
    }

    fn required_raw(&mut self, name: &'static str) -> Result<&'a RawValue, Error> {
        self.raw(name).ok_or(Error::MissingField(name))
    }

    fn string(&mut self, name: &'static str) -> Result<Option<String>, Error> {
        self.raw(name)
            .map(|raw| {
                serde_json::from_str::<String>(raw.get()).map_err(|e| {
                    too_deep(&e).unwrap_or(Error::InvalidField {
                        field: name,
                        detail: "must be a string".into(),
                    })
                })
            })
            .transpose()
    }

    fn label(&mut self) -> Result<Option<String>, Error> {
        let label = self.string("label")?;
        if let Some(l) = &label {
            crate::live::presence::check_label(l).map_err(|detail| Error::InvalidField {
                field: "label",
                detail,
            })?;
        }
        Ok(label)
    }

    fn required_string(&mut self, name: &'static str) -> Result<String, Error> {
        self.string(name)?.ok_or(Error::MissingField(name))
    }

    fn stream(&mut self) -> Result<StreamName, Error> {
        StreamName::parse(&self.required_string("stream")?)
    }

    /// A non-negative integer that fits an i64 (`1e400`, `-1`, `1.5`, `"3"` are all refused).
    fn seq(&mut self, name: &'static str) -> Result<Option<i64>, Error> {
        self.raw(name)
            .map(|raw| {
                serde_json::from_str::<i64>(raw.get())
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| Error::InvalidField {
                        field: name,
                        detail: format!(
                            "must be a non-negative integer up to {}, not {}",
                            i64::MAX,
                            shorten(raw.get())
                        ),
                    })
            })
            .transpose()
    }

    fn types(&mut self) -> Result<Filter, Error> {
        let Some(raw) = self.raw("types") else {
            return Ok(Filter::default());
        };
        let bad = || Error::InvalidField {
            field: "types",
            detail: format!("must be an array of event types (1-{MAX_TYPE_CHARS} characters)"),
        };
        let types: Vec<String> =
            serde_json::from_str(raw.get()).map_err(|e| too_deep(&e).unwrap_or_else(bad))?;
        if types
            .iter()
            .any(|t| t.is_empty() || t.chars().count() > MAX_TYPE_CHARS)
        {
            return Err(bad());
        }
        Ok(Filter::types(types))
    }

    fn start(&mut self) -> Result<Start, Error> {
        let after = self.seq("after")?;
        let from = self.string("from")?;
        let since = self.string("since")?;
        match (after, from, since) {
            (Some(a), None, None) => Ok(Start::After(a)),
            (None, Some(f), None) => params::parse_from(&f).ok_or_else(|| Error::InvalidField {
                field: "from",
                detail: format!("must be \"now\" or \"snapshot\", not {}", shorten(&f)),
            }),
            (None, None, Some(s)) => match Since::detail(&s) {
                Ok(Since(t)) => Ok(Start::Since(t)),
                Err(detail) => Err(Error::InvalidField {
                    field: "since",
                    detail,
                }),
            },
            (None, None, None) => Ok(Start::After(0)),
            _ => Err(Error::InvalidMessage(
                "give at most one of `after`, `from` and `since`".into(),
            )),
        }
    }

    /// A boolean field, false when absent.
    fn flag(&mut self, name: &'static str) -> Result<bool, Error> {
        self.raw(name)
            .map(|raw| {
                serde_json::from_str::<bool>(raw.get()).map_err(|_| Error::InvalidField {
                    field: name,
                    detail: format!("must be true or false, not {}", shorten(raw.get())),
                })
            })
            .transpose()
            .map(Option::unwrap_or_default)
    }

    fn request_id(&mut self) -> Result<RequestId, Error> {
        RequestId::field(self.required_string("request_id")?)
    }

    fn finish(self) -> Result<(), Error> {
        match self.map.into_keys().min() {
            Some(k) => Err(Error::UnknownField(shorten(&k))),
            None => Ok(()),
        }
    }
}

fn shorten(s: &str) -> String {
    let short: String = s.chars().take(40).collect();
    if short.len() < s.len() {
        format!("{short}…")
    } else {
        short
    }
}

/// Deepest nesting a message may have. serde_json (and many other parsers) refuse to build
/// values nested deeper than 128 levels, so a deeper `data` would reach subscribers as an
/// envelope they cannot parse.
pub const MAX_DEPTH: usize = 128;

/// The deepest nesting of arrays and objects in `text`, stopping early past `MAX_DEPTH`.
/// A byte scan with no recursion, so it is safe on any input.
fn depth_exceeded(text: &str) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Request<'_>, Rejected<'_>> {
    if depth_exceeded(text) {
        return Err(Rejected {
            reference: None,
            error: Error::NestingTooDeep,
        });
    }
    let map: HashMap<String, &RawValue> = serde_json::from_str(text).map_err(|e| Rejected {
        reference: None,
        error: json_error(e),
    })?;
    let mut fields = Fields { map };
    let reference = fields.raw("ref");
    let reject = |error| Rejected { reference, error };
    let op = fields.string("op").map_err(reject)?;
    let op = op.ok_or(Error::MissingField("op")).map_err(reject)?;
    let op = parse_op(&op, &mut fields).map_err(reject)?;
    fields.finish().map_err(reject)?;
    Ok(Request { reference, op })
}

fn parse_op<'a>(op: &str, f: &mut Fields<'a>) -> Result<Op<'a>, Error> {
    Ok(match op {
        "subscribe" => Op::Subscribe {
            stream: f.stream()?,
            start: f.start()?,
            filter: f.types()?,
            presence: f.flag("presence")?,
            label: f.label()?,
            compact: f.flag("compact")?,
        },
        "unsubscribe" => Op::Unsubscribe {
            stream: f.stream()?,
        },
        "publish" => Op::Publish {
            stream: f.stream()?,
            events: f.required_raw("events")?,
            expected_seq: f.seq("expected_seq")?,
        },
        "input" => Op::Input {
            stream: f.stream()?,
            request_id: f.request_id()?,
            data: f.required_raw("data")?,
        },
        "stop" => Op::Stop {
            stream: f.stream()?,
            reason: f.raw("reason"),
        },
        "presence" => Op::Presence {
            stream: f.stream()?,
            limit: f.seq("limit")?,
        },
        "ping" => Op::Ping,
        other => return Err(Error::UnknownOp(shorten(other))),
    })
}

/// serde_json refuses to build values nested deeper than 128 levels (it would risk the
/// stack). Raw values (`events`, `data`, `ref`) are only scanned, so they may nest deeper,
/// exactly as a REST append may.
fn too_deep(e: &serde_json::Error) -> Option<Error> {
    e.to_string()
        .contains("recursion limit")
        .then_some(Error::NestingTooDeep)
}

fn json_error(e: serde_json::Error) -> Error {
    use serde_json::error::Category;
    if let Some(deep) = too_deep(&e) {
        return deep;
    }
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            Error::InvalidJson(format!("the message is not valid JSON: {e}"))
        }
        Category::Data => Error::InvalidMessage("a message must be a JSON object".into()),
    }
}

/// A server message: `op` first, then `ref` when the client gave one, then the body's fields.
#[derive(Serialize)]
struct Reply<'a, T: Serialize> {
    op: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a RawValue>,
    #[serde(flatten)]
    body: T,
}

/// Encodes a reply as a text frame.
pub fn reply(op: &str, reference: Option<&RawValue>, body: impl Serialize) -> Message {
    let text = serde_json::to_string(&Reply {
        op,
        reference,
        body,
    })
    // Serialising plain maps and structs of strings and numbers cannot fail.
    .expect("reply serialisation");
    Message::Text(Utf8Bytes::from(text))
}

/// The `error` op for `error`.
pub fn error_reply(reference: Option<&RawValue>, error: &Error) -> Message {
    error_with(reference, error, None)
}

/// The `error` op, naming the stream it concerns.
pub fn error_with(reference: Option<&RawValue>, error: &Error, stream: Option<&str>) -> Message {
    error.log();
    let mut body = match error.ws_op(None) {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    body.remove("op");
    if let Some(s) = stream {
        body.insert("stream".into(), s.into());
    }
    reply("error", reference, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> &'static str {
        parse(text).unwrap_err().error.code()
    }

    #[test]
    fn each_malformed_message_gets_its_own_code() {
        assert_eq!(code("{"), "invalid_json");
        assert_eq!(code(""), "invalid_json");
        assert_eq!(code("[1]"), "invalid_message");
        assert_eq!(code("42"), "invalid_message");
        let deep = format!(
            r#"{{"op":"ping","ref":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(code(&deep), "nesting_too_deep");
        assert_eq!(code(r#"{"ref":1}"#), "missing_field");
        assert_eq!(code(r#"{"op":7}"#), "invalid_field");
        assert_eq!(code(r#"{"op":"dance"}"#), "unknown_op");
        assert_eq!(code(r#"{"op":"subscribe"}"#), "missing_field");
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"a b"}"#),
            "invalid_stream_name"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","after":1e400}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","after":99999999999999999999999}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","after":-1}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","after":"1"}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","from":"later"}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","types":"a"}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","types":[""]}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","after":1,"from":"now"}"#),
            "invalid_message"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","aftr":1}"#),
            "unknown_field"
        );
        assert_eq!(code(r#"{"op":"publish","stream":"s"}"#), "missing_field");
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","presence":1}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","label":""}"#),
            "invalid_field"
        );
        assert_eq!(code(r#"{"op":"presence"}"#), "missing_field");
        assert_eq!(
            code(r#"{"op":"presence","stream":"s","limit":-1}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","stream":"s","compact":1}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"op":"input","stream":"s","request_id":"","data":1}"#),
            "invalid_field"
        );
    }

    #[test]
    fn ref_is_echoed_exactly_even_when_the_op_is_bad() {
        let r = parse(r#"{"ref":{"b":1e400, "a":[]},"op":"dance"}"#).unwrap_err();
        assert_eq!(r.reference.unwrap().get(), r#"{"b":1e400, "a":[]}"#);
        let Message::Text(t) = error_reply(r.reference, &r.error) else {
            panic!("text")
        };
        assert!(
            t.as_str()
                .starts_with(r#"{"op":"error","ref":{"b":1e400, "a":[]},"#),
            "{t}"
        );
    }

    #[test]
    fn nesting_is_limited_everywhere_but_brackets_in_strings_do_not_count() {
        let nested = |n: usize| {
            format!(
                r#"{{"op":"publish","stream":"s","events":[{{"data":{}1{}}}]}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(parse(&nested(MAX_DEPTH - 3)).is_ok());
        assert_eq!(code(&nested(MAX_DEPTH - 2)), "nesting_too_deep");
        assert_eq!(code(&nested(1_000_000)), "nesting_too_deep");
        let strings = format!(
            r#"{{"op":"publish","stream":"s","events":[{{"data":"\"{}"}}]}}"#,
            "[".repeat(1000)
        );
        assert!(parse(&strings).is_ok());
    }

    #[test]
    fn keeps_raw_values_byte_exact() {
        let req =
            parse(r#"{"op":"publish","stream":"s","events":[{"data":{"z":1,  "a":2}}]}"#).unwrap();
        let Op::Publish { events, .. } = req.op else {
            panic!("publish")
        };
        assert_eq!(events.get(), r#"[{"data":{"z":1,  "a":2}}]"#);
    }
}
