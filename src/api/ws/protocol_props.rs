//! Property tests for the WebSocket message parser (auth branch): any text gives an op or a
//! 4xx `error`, never a panic, and the client's `ref` is echoed whenever it could be read.

use proptest::prelude::*;
use serde_json::Value;

use super::protocol::parse;

/// Text shaped like the protocol, so the search reaches past "not JSON".
fn op_like() -> impl Strategy<Value = String> {
    let op = prop::sample::select(vec![
        "subscribe",
        "unsubscribe",
        "publish",
        "input",
        "stop",
        "ping",
        "bogus",
        "",
    ]);
    let value = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        ".{0,12}".prop_map(|s| Value::from(s).to_string()),
        Just("[{\"data\":1}]".to_owned()),
        Just("{\"a\":[1,{}]}".to_owned()),
        Just("1e999999".to_owned()),
        Just("\"now\"".to_owned()),
        Just("[\"a\",5]".to_owned()),
    ];
    let field = prop::sample::select(vec![
        "stream",
        "after",
        "from",
        "types",
        "events",
        "expected_seq",
        "request_id",
        "data",
        "reason",
        "ref",
        "op",
        "extra",
    ]);
    (op, prop::collection::vec((field, value), 0..6)).prop_map(|(op, fields)| {
        let mut text = format!("{{\"op\":\"{op}\"");
        for (k, v) in fields {
            text.push_str(&format!(",\"{k}\":{v}"));
        }
        text.push('}');
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_text_gives_an_op_or_a_client_error(text in ".{0,300}") {
        if let Err(rejected) = parse(&text) {
            prop_assert!(rejected.error.status().is_client_error(), "{:?}", rejected.error);
        }
    }

    #[test]
    fn op_shaped_text_gives_an_op_or_a_client_error_with_its_ref(text in op_like()) {
        if let Err(rejected) = parse(&text) {
            prop_assert!(rejected.error.status().is_client_error(), "{:?}", rejected.error);
            let sent: Option<Value> = serde_json::from_str::<Value>(&text).ok().and_then(|v| v.get("ref").cloned());
            if let (Some(sent), Some(echoed)) = (sent, rejected.reference) {
                prop_assert_eq!(serde_json::from_str::<Value>(echoed.get()).unwrap(), sent);
            }
        }
    }
}
