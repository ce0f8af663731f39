//! Property tests for the parsers that see raw client input: the producer batch parser, the
//! SSE cursor and query parsing, and token extraction. Any input gets a value or a 4xx error,
//! never a panic; what is accepted is what was sent.

use axum::http::{HeaderMap, HeaderValue, Uri};
use proptest::prelude::*;
use serde_json::Value;
use tailcast::api::events::{parse_batch, Limits};
use tailcast::api::params::Cursor;
use tailcast::api::sse::{sse_start, SseParams};
use tailcast::auth::{Authenticator, Pattern};
use tailcast::Config;

const LIMITS: Limits = Limits {
    max_event_bytes: 1 << 16,
    max_batch_events: 50,
};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".*".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(".*", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn secured() -> Authenticator {
    let mut c = Config::for_database("postgres://unused");
    c.jwt_secret = Some("property-test-secret-of-enough-length".into());
    c.admin_token = Some("property-admin".into());
    Authenticator::from_config(&c).unwrap()
}

fn is_client_error(e: &tailcast::error::Error) -> bool {
    e.status().is_client_error()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_give_events_or_a_client_error(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = parse_batch(&body, LIMITS) {
            prop_assert!(is_client_error(&e), "{e:?}");
        }
    }

    #[test]
    fn json_ish_text_gives_events_or_a_client_error(body in r#"[\[\]{}":,0-9a-z \\.eE+\-]{0,200}"#) {
        if let Err(e) = parse_batch(body.as_bytes(), LIMITS) {
            prop_assert!(is_client_error(&e), "{e:?}");
        }
    }

    #[test]
    fn event_data_is_kept_byte_for_byte(values in prop::collection::vec(json_value(), 1..5), pretty in any::<bool>()) {
        let encoded: Vec<String> = values
            .iter()
            .map(|v| if pretty { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() })
            .collect();
        let body = format!(
            "[{}]",
            encoded.iter().map(|d| format!(r#"{{"type":"t","data":{d}}}"#)).collect::<Vec<_>>().join(",")
        );
        let events = parse_batch(body.as_bytes(), LIMITS).unwrap();
        let got: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        prop_assert_eq!(got, encoded.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn a_cursor_is_accepted_exactly_when_it_is_a_non_negative_integer(raw in ".{0,24}|[ 0-9+\\-]{0,24}") {
        let expected = raw.trim().parse::<i64>().ok().filter(|c| *c >= 0);
        match Cursor::parse("after", &raw) {
            Ok(Cursor(c)) => prop_assert_eq!(Some(c), expected),
            Err(e) => {
                prop_assert!(expected.is_none());
                prop_assert_eq!(e.code(), "invalid_cursor");
            }
        }
    }

    #[test]
    fn sse_queries_and_last_event_ids_never_panic(
        pairs in prop::collection::vec((prop::sample::select(vec!["after", "from", "since", "types", "named", "token", "x"]), ".{0,40}"), 0..6),
        last_event_id in prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
    ) {
        let url = reqwest::Url::parse_with_params("http://h/v1/streams/s/sse", &pairs).unwrap();
        let uri: Uri = url.as_str().parse().unwrap();
        let mut headers = HeaderMap::new();
        if let Some(v) = last_event_id.and_then(|b| HeaderValue::from_bytes(&b).ok()) {
            headers.insert("last-event-id", v);
        }
        // A query that does not parse (duplicate keys) is the extractor's 400
        // invalid_parameter; only parsed ones reach `sse_start`.
        if let Ok(q) = axum::extract::Query::<SseParams>::try_from_uri(&uri) {
            if let Err(e) = sse_start(&q.0, &headers) {
                prop_assert!(is_client_error(&e), "{e:?}");
            }
        }
    }

    #[test]
    fn no_forged_credential_is_accepted(
        header in prop::option::of(".{0,200}"),
        segments in prop::collection::vec("[A-Za-z0-9_\\-]{0,60}", 3),
        query in ".{0,60}",
    ) {
        let auth = secured();
        let jwt_like = segments.join(".");
        let mut headers = HeaderMap::new();
        for value in [header.unwrap_or_default(), format!("Bearer {jwt_like}")] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert("authorization", v);
            }
            let res = auth.authenticate(&headers, &Uri::from_static("/v1/streams"), None);
            prop_assert_eq!(res.unwrap_err().code(), "unauthorized");
        }
        let url = reqwest::Url::parse_with_params("http://h/v1/streams", &[("token", query)]).unwrap();
        let uri: Uri = url.as_str().parse().unwrap();
        let res = auth.authenticate(&HeaderMap::new(), &uri, None);
        prop_assert_eq!(res.unwrap_err().code(), "unauthorized");
    }

    #[test]
    fn patterns_match_their_prefix_or_exact_name(prefix in "[a-z:]{0,10}", rest in "[a-z:]{0,10}") {
        let name = format!("{prefix}{rest}");
        let pattern = format!("{prefix}*");
        prop_assert!(Pattern::parse(&pattern).matches(&name));
        prop_assert_eq!(Pattern::parse(&prefix).matches(&name), rest.is_empty());
    }
}
