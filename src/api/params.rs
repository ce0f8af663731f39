//! Request parameters, parsed in one place: every surface (REST, SSE, the AI SDK view,
//! WebSocket ops, input requests) turns client text into these newtypes, so a parameter is
//! refused with the same code and message wherever it is given.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::live::{Filter, Start};

/// A client's first `n` characters, for an error message.
fn shown(raw: &str, n: usize) -> String {
    raw.chars().take(n).collect()
}

/// A position in a stream: the seq of the last event the client has (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(pub i64);

impl Cursor {
    /// A non-negative integer seq; `what` names the parameter in the error.
    pub fn parse(what: &str, raw: &str) -> Result<Cursor> {
        raw.trim()
            .parse::<i64>()
            .ok()
            .filter(|c| *c >= 0)
            .map(Cursor)
            .ok_or_else(|| {
                Error::InvalidCursor(format!(
                    "{what} must be a non-negative integer seq, not {:?}",
                    shown(raw, 32)
                ))
            })
    }

    /// The cursor a reconnecting client gives: `Last-Event-ID` (an empty one is no cursor),
    /// else `?after=`; `None` when it gives neither.
    pub fn resume(after: Option<&str>, headers: &HeaderMap) -> Result<Option<Cursor>> {
        if let Some(v) = headers.get("last-event-id") {
            let raw = v
                .to_str()
                .map_err(|_| Error::InvalidCursor("Last-Event-ID must be ASCII digits".into()))?;
            if !raw.trim().is_empty() {
                return Ok(Some(Cursor::parse("Last-Event-ID", raw)?));
            }
        }
        after.map(|a| Cursor::parse("after", a)).transpose()
    }
}

/// `since=`: an RFC 3339 time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since(pub DateTime<Utc>);

impl Since {
    pub fn parse(raw: &str) -> Result<Since> {
        Since::detail(raw).map_err(Error::InvalidParameter)
    }

    /// As [`Since::parse`], with the reason as text (for a WebSocket op's `invalid_field`).
    pub fn detail(raw: &str) -> Result<Since, String> {
        DateTime::parse_from_rfc3339(raw)
            .map(|t| Since(t.with_timezone(&Utc)))
            .map_err(|e| format!("since must be an RFC 3339 time: {e}"))
    }
}

/// `from=`: a named starting point (`now`, `snapshot`, or `beginning`/`start`); `None` for
/// anything else (each surface words its own error, as its protocol does).
pub fn parse_from(raw: &str) -> Option<Start> {
    match raw {
        "now" => Some(Start::Now),
        "snapshot" => Some(Start::Snapshot),
        "beginning" | "start" => Some(Start::After(0)),
        _ => None,
    }
}

/// `limit=` on a listing: 1 to [`PageLimit::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit(pub i64);

impl PageLimit {
    pub const MAX: i64 = 1000;

    /// `default` when absent.
    pub fn parse(limit: Option<i64>, default: i64) -> Result<PageLimit> {
        match limit {
            None => Ok(PageLimit(default)),
            Some(l) if (1..=Self::MAX).contains(&l) => Ok(PageLimit(l)),
            Some(l) => Err(Error::InvalidParameter(format!(
                "limit must be between 1 and {}, not {l}",
                Self::MAX
            ))),
        }
    }
}

/// An input request's id: 1-128 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// Longest id, in characters.
    pub const MAX_CHARS: usize = 128;

    /// The error is the reason as text; each surface says which field it was.
    pub fn parse(id: String) -> Result<RequestId, String> {
        let n = id.chars().count();
        if n == 0 || n > Self::MAX_CHARS || id.chars().any(char::is_control) {
            return Err(format!(
                "must be 1-{} characters without control characters",
                Self::MAX_CHARS
            ));
        }
        Ok(RequestId(id))
    }

    /// In a JSON body or WebSocket op: `invalid_field` naming `request_id`.
    pub fn field(id: String) -> Result<RequestId> {
        RequestId::parse(id).map_err(|detail| Error::InvalidField {
            field: "request_id",
            detail,
        })
    }
}

/// The `{request_id}` path segment.
impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        #[derive(Deserialize)]
        struct P {
            request_id: String,
        }
        let axum::extract::Path(p) = axum::extract::Path::<P>::from_request_parts(parts, state)
            .await
            .map_err(|e| Error::InvalidParameter(e.body_text()))?;
        RequestId::parse(p.request_id)
            .map_err(|d| Error::InvalidParameter(format!("request_id {d}")))
    }
}

/// A `1`/`0` query flag (`true`/`false` too; present and empty means set).
pub fn flag(name: &str, raw: Option<&str>) -> Result<bool> {
    match raw {
        None | Some("0") | Some("false") => Ok(false),
        Some("") | Some("1") | Some("true") => Ok(true),
        Some(other) => Err(Error::InvalidParameter(format!(
            "{name} must be 1 or 0, not {:?}",
            shown(other, 16)
        ))),
    }
}

/// `types=a,b` as a filter.
pub fn types(raw: Option<&str>) -> Filter {
    Filter::types(
        raw.unwrap_or_default()
            .split(',')
            .map(|t| t.trim().to_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_non_negative_seqs() {
        assert_eq!(Cursor::parse("after", " 7 ").unwrap(), Cursor(7));
        assert_eq!(Cursor::parse("after", "0").unwrap(), Cursor(0));
        let max = i64::MAX.to_string();
        assert_eq!(Cursor::parse("after", &max).unwrap(), Cursor(i64::MAX));
        for bad in ["-1", "1.5", "", "x", "9223372036854775808"] {
            let e = Cursor::parse("after", bad).unwrap_err();
            assert_eq!(e.code(), "invalid_cursor", "{bad}");
            assert!(e.to_string().starts_with("after must be"), "{e}");
        }
    }

    #[test]
    fn last_event_id_wins_over_after_and_empty_is_none() {
        let mut h = HeaderMap::new();
        assert_eq!(Cursor::resume(Some("3"), &h).unwrap(), Some(Cursor(3)));
        h.insert("last-event-id", " ".parse().unwrap());
        assert_eq!(Cursor::resume(Some("3"), &h).unwrap(), Some(Cursor(3)));
        h.insert("last-event-id", "9".parse().unwrap());
        assert_eq!(Cursor::resume(Some("3"), &h).unwrap(), Some(Cursor(9)));
        h.insert("last-event-id", "x".parse().unwrap());
        let e = Cursor::resume(None, &h).unwrap_err();
        assert!(e.to_string().starts_with("Last-Event-ID must be"), "{e}");
    }

    #[test]
    fn page_limits_are_one_to_a_thousand() {
        assert_eq!(PageLimit::parse(None, 100).unwrap(), PageLimit(100));
        assert_eq!(PageLimit::parse(Some(1), 100).unwrap(), PageLimit(1));
        assert_eq!(PageLimit::parse(Some(1000), 100).unwrap(), PageLimit(1000));
        for bad in [0, -1, 1001] {
            let e = PageLimit::parse(Some(bad), 100).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("limit must be between 1 and 1000, not {bad}")
            );
        }
    }

    #[test]
    fn request_ids_at_their_limits() {
        assert!(RequestId::parse("a".repeat(128)).is_ok());
        assert!(RequestId::parse("é".repeat(128)).is_ok());
        assert!(RequestId::parse("a".repeat(129)).is_err());
        assert!(RequestId::parse(String::new()).is_err());
        assert!(RequestId::parse("a\nb".into()).is_err());
        let e = RequestId::field(String::new()).unwrap_err();
        assert_eq!(e.code(), "invalid_field");
    }

    #[test]
    fn since_and_from() {
        assert!(Since::parse("2026-11-28T10:00:00Z").is_ok());
        let e = Since::parse("yesterday").unwrap_err();
        assert_eq!(e.code(), "invalid_parameter");
        assert!(e.to_string().starts_with("since must be an RFC 3339 time"));
        assert_eq!(parse_from("now"), Some(Start::Now));
        assert_eq!(parse_from("start"), Some(Start::After(0)));
        assert_eq!(parse_from("later"), None);
    }

    #[test]
    fn flags() {
        assert!(!flag("named", None).unwrap());
        assert!(flag("named", Some("")).unwrap());
        assert!(flag("named", Some("true")).unwrap());
        assert!(flag("named", Some("yes")).is_err());
    }
}
