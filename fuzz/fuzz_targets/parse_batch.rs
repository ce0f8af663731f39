//! Producer batches: any bytes give events or a 4xx error, and accepted data is a slice of
//! the input (kept byte for byte).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailcast::api::events::{parse_batch, Limits};

const LIMITS: Limits = Limits {
    max_event_bytes: 1 << 16,
    max_batch_events: 100,
};

fuzz_target!(|body: &[u8]| {
    match parse_batch(body, LIMITS) {
        Ok(events) => {
            let text = std::str::from_utf8(body).expect("accepted bodies are UTF-8");
            for ev in events {
                assert!(ev.data == "null" || text.contains(ev.data.as_str()));
            }
        }
        Err(e) => assert!(e.status().is_client_error(), "{e:?}"),
    }
});
