//! SSE query strings and `Last-Event-ID`: a start position or a 4xx error, never a panic.
#![no_main]

use axum::http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use tailcast::api::sse::{sse_start, SseParams};

fuzz_target!(|input: (&[u8], &[u8])| {
    let (query, last_event_id) = input;
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let Ok(uri) = format!("/v1/streams/s/sse?{query}").parse::<Uri>() else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(last_event_id) {
        headers.insert("last-event-id", v);
    }
    if let Ok(q) = axum::extract::Query::<SseParams>::try_from_uri(&uri) {
        if let Err(e) = sse_start(&q.0, &headers) {
            assert!(e.status().is_client_error(), "{e:?}");
        }
    }
});
