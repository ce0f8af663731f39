//! Tests of the fold: the merge rule's cases, runs and their bounds, the AI SDK view's rule,
//! and a property test that compacted reads rebuild a full replay's messages from any cursor.

use super::*;
use chrono::DateTime;
use proptest::prelude::*;
use serde_json::{json, Value};

fn ev(seq: i64, key: Option<&str>, append: bool, data: &str) -> StoredEvent {
    StoredEvent {
        seq,
        ty: "message".into(),
        data: data.into(),
        id: None,
        key: key.map(Into::into),
        time: DateTime::from_timestamp_millis(seq * 1000).unwrap(),
        body: None,
        by: None,
        append,
    }
}

fn fold(rule: Compaction, events: Vec<StoredEvent>) -> Vec<Value> {
    let mut folder = Folder::new(StreamName::parse("s").unwrap(), rule, Surface::Rest);
    let mut out = Vec::new();
    for e in events {
        folder.feed(e, &mut out);
    }
    folder.flush(&mut out);
    out.iter()
        .map(|f| serde_json::from_slice(&f.envelope).unwrap())
        .collect()
}

/// The merge rule on `serde_json::Value`, written apart from `Data` as the tests' oracle.
fn merge(m: &Value, w: &Value) -> Value {
    match (m, w) {
        (Value::Object(m), Value::Object(w)) => {
            let mut out = m.clone();
            for (k, v) in w {
                let merged = match (out.get(k), v) {
                    (Some(Value::String(a)), Value::String(b)) => Value::String(a.clone() + b),
                    _ => v.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::String(a), Value::String(b)) => Value::String(a.clone() + b),
        _ => w.clone(),
    }
}

/// The messages a reader holds after `events` (envelopes), applied one by one to `start`.
fn apply(start: &[(Option<String>, Value)], events: &[Value]) -> Vec<(Option<String>, Value)> {
    let mut msgs = start.to_vec();
    let mut open: HashMap<String, usize> = msgs
        .iter()
        .enumerate()
        .filter_map(|(i, (k, _))| k.clone().map(|k| (k, i)))
        .collect();
    for e in events {
        let key = e["key"].as_str().map(str::to_owned);
        let data = e["data"].clone();
        match (&key, e["append"].as_bool().unwrap_or(false)) {
            (Some(k), true) if open.contains_key(k) => {
                let i = open[k];
                msgs[i].1 = merge(&msgs[i].1, &data);
            }
            _ => {
                if let Some(k) = &key {
                    open.insert(k.clone(), msgs.len());
                }
                msgs.push((key, data));
            }
        }
    }
    msgs
}

fn raw(events: &[StoredEvent]) -> Vec<Value> {
    events
        .iter()
        .map(|e| serde_json::from_slice(&crate::log::model::encode_envelope("s", e)).unwrap())
        .collect()
}

#[test]
fn a_run_of_appends_becomes_one_message() {
    let out = fold(
        Compaction::Messages,
        vec![
            ev(1, Some("m"), false, r#"{"role":"assistant","text":""}"#),
            ev(2, Some("m"), true, r#"{"text":"Hel"}"#),
            ev(3, Some("m"), true, r#"{"text":"lo","done":false}"#),
            ev(4, None, false, "7"),
            ev(5, Some("m"), true, r#"{"text":"!","done":true}"#),
            ev(6, Some("m"), true, r#"{"text":"?"}"#),
        ],
    );
    assert_eq!(out.len(), 3);
    assert_eq!(out[0]["seq"], 3);
    assert_eq!(out[0]["folded"], 3);
    assert_eq!(out[0].get("append"), None);
    assert_eq!(
        out[0]["data"],
        json!({"role":"assistant","text":"Hello","done":false})
    );
    assert_eq!(out[0]["time"], "1970-01-01T00:00:03.000Z");
    // A lone event is itself, byte for byte.
    assert_eq!(out[1].get("folded"), None);
    assert_eq!(out[1]["seq"], 4);
    assert_eq!(out[2]["seq"], 6);
    assert_eq!(out[2]["append"], true);
    assert_eq!(out[2]["data"], json!({"text":"!?","done":true}));
}

#[test]
fn strings_concatenate_and_everything_else_replaces() {
    let out = fold(
        Compaction::Messages,
        vec![
            ev(1, Some("s"), false, r#""ab""#),
            ev(2, Some("s"), true, r#""cd""#),
            ev(3, Some("n"), false, "1"),
            ev(4, Some("n"), true, "[2]"),
            ev(5, Some("n"), true, r#"{"a":"b"}"#),
            ev(6, Some("n"), true, r#"{"a":"c"}"#),
        ],
    );
    assert_eq!(out[0]["data"], "abcd");
    assert_eq!(out[0]["folded"], 2);
    assert_eq!(out[1]["data"], json!({"a":"bc"}));
    assert_eq!(out[1]["folded"], 4);
    assert_eq!(out[1]["seq"], 6);
}

#[test]
fn folded_data_keeps_raw_values_exactly() {
    let mut folder = Folder::new(
        StreamName::parse("s").unwrap(),
        Compaction::Messages,
        Surface::Rest,
    );
    let mut out = Vec::new();
    folder.feed(
        ev(1, Some("k"), false, r#"{"n":1e400, "t":"a\u00e9"}"#),
        &mut out,
    );
    folder.feed(ev(2, Some("k"), true, r#"{"t":"\"b"}"#), &mut out);
    folder.flush(&mut out);
    let env = std::str::from_utf8(&out[0].envelope).unwrap();
    assert!(env.contains(r#""data":{"n":1e400,"t":"aé\"b"}"#), "{env}");
}

#[test]
fn an_append_that_would_fold_differently_starts_a_new_run() {
    // Alone, "x" replaces the null; folded into one append it would be concatenated to
    // the reader's string.
    let events = vec![
        ev(1, Some("k"), true, r#"{"t":null}"#),
        ev(2, Some("k"), true, r#"{"t":"x"}"#),
        ev(3, Some("k"), true, r#"{"t":"y"}"#),
    ];
    let out = fold(Compaction::Messages, events.clone());
    assert_eq!(out.len(), 2);
    assert_eq!(out[1]["data"], json!({"t":"xy"}));
    let start = vec![(Some("k".to_owned()), json!({"t":"before"}))];
    assert_eq!(apply(&start, &out), apply(&start, &raw(&events)));
    // The same run after the message's start knows the whole value: one event.
    let mut with_base = vec![ev(0, Some("k"), false, r#"{"t":"a"}"#)];
    with_base.extend(events);
    assert_eq!(fold(Compaction::Messages, with_base).len(), 1);
}

#[test]
fn interleaved_keys_fold_only_between_switches() {
    let out = fold(
        Compaction::Messages,
        vec![
            ev(1, Some("a"), false, r#""1""#),
            ev(2, Some("a"), true, r#""2""#),
            ev(3, Some("b"), false, r#""x""#),
            ev(4, Some("a"), true, r#""3""#),
            ev(5, Some("a"), true, r#""4""#),
        ],
    );
    let seqs: Vec<i64> = out.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 5]);
    assert_eq!(out[2]["data"], "34");
}

#[test]
fn a_run_stops_at_its_byte_bound() {
    let chunk = "x".repeat(FOLD_MAX_BYTES / 3);
    let data = serde_json::to_string(&chunk).unwrap();
    let events: Vec<_> = (1..=7).map(|s| ev(s, Some("k"), s > 1, &data)).collect();
    let out = fold(Compaction::Messages, events.clone());
    assert!(out.len() >= 3, "{}", out.len());
    assert_eq!(apply(&[], &out), apply(&[], &raw(&events)));
}

#[test]
fn ui_deltas_of_one_part_fold() {
    let ui = |seq, data: Value| StoredEvent {
        ty: "ui".into(),
        ..ev(seq, None, false, &data.to_string())
    };
    let out = fold(
        Compaction::UiDeltas,
        vec![
            ui(1, json!({"type":"text-start","id":"t"})),
            ui(2, json!({"type":"text-delta","id":"t","delta":"Hel"})),
            ui(3, json!({"type":"text-delta","id":"t","delta":"lo"})),
            ui(4, json!({"type":"reasoning-delta","id":"t","delta":"?"})),
            ui(5, json!({"type":"text-delta","id":"u","delta":"a"})),
            ui(
                6,
                json!({"type":"text-delta","id":"u","delta":"b","providerMetadata":{}}),
            ),
            ui(7, json!({"type":"text-end","id":"t"})),
        ],
    );
    let data: Vec<Value> = out.iter().map(|e| e["data"].clone()).collect();
    assert_eq!(
        data,
        vec![
            json!({"type":"text-start","id":"t"}),
            json!({"type":"text-delta","id":"t","delta":"Hello"}),
            json!({"type":"reasoning-delta","id":"t","delta":"?"}),
            json!({"type":"text-delta","id":"u","delta":"a"}),
            json!({"type":"text-delta","id":"u","delta":"b","providerMetadata":{}}),
            json!({"type":"text-end","id":"t"}),
        ]
    );
    assert_eq!(out[1]["seq"], 3);
}

fn event_strategy() -> impl Strategy<Value = (Option<u8>, bool, Value)> {
    let value = prop_oneof![
        3 => "[a-c]{0,3}".prop_map(Value::from),
        1 => Just(Value::Null),
        1 => (0i64..3).prop_map(Value::from),
    ];
    let data = prop_oneof![
        3 => prop::collection::btree_map("[pq]", value.clone(), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        2 => value,
    ];
    (prop::option::weighted(0.8, 0u8..3), any::<bool>(), data)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The messages a reader builds from (full replay up to a cursor, then a compacted
    /// read from it) are those of a full replay; and so from every cursor the compacted
    /// read hands out (resuming exactly).
    #[test]
    fn compacted_reads_rebuild_the_replayed_messages(
        specs in prop::collection::vec(event_strategy(), 0..40),
        cut in any::<prop::sample::Index>(),
    ) {
        let events: Vec<StoredEvent> = specs
            .iter()
            .enumerate()
            .map(|(i, (key, append, data))| {
                let key = key.map(|k| format!("k{k}"));
                let append = *append && key.is_some();
                ev(i as i64 + 1, key.as_deref(), append, &data.to_string())
            })
            .collect();
        let full = apply(&[], &raw(&events));
        let cut = if events.is_empty() { 0 } else { cut.index(events.len() + 1) };
        let before = apply(&[], &raw(&events[..cut]));
        let folded = fold(Compaction::Messages, events[cut..].to_vec());
        prop_assert_eq!(&apply(&before, &folded), &full);
        // Every delivered seq is an exact cursor: what was sent up to it, then a fresh
        // compacted read after it, rebuilds the same.
        let mut prev = cut as i64;
        for (i, f) in folded.iter().enumerate() {
            let seq = f["seq"].as_i64().unwrap();
            prop_assert!(seq > prev);
            prev = seq;
            let held = apply(&before, &folded[..=i]);
            let rest = fold(Compaction::Messages, events[seq as usize..].to_vec());
            prop_assert_eq!(&apply(&held, &rest), &full);
        }
    }
}

#[test]
fn a_run_never_spans_two_authors() {
    let by = |seq, who: &str, append| StoredEvent {
        by: Some(who.into()),
        ..ev(seq, Some("m"), append, "\"x\"")
    };
    let out = fold(
        Compaction::Messages,
        vec![
            by(1, "alice", false),
            by(2, "alice", true),
            by(3, "bob", true),
        ],
    );
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[0]["by"].as_str(), out[0]["folded"].as_u64()),
        (Some("alice"), Some(2))
    );
    assert_eq!(
        (out[1]["by"].as_str(), out[1]["seq"].as_i64()),
        (Some("bob"), Some(3))
    );
}
