//! Compacted reads: a late joiner gets whole messages instead of every token, and then the
//! exact live tail. A view over the log, never a second store: nothing stored is rewritten.
//!
//! ## Messages and the merge rule
//! An event with a `key` and `"append": true` extends the message its key names; any other
//! event with a key starts a new message (the previous one of that key is finished); an event
//! without a key is a message of its own. Appending `w` to a message whose data is `m`:
//! - both objects: field by field over the top-level fields of `w` — where both values are
//!   strings they concatenate, otherwise `w`'s value replaces `m`'s (nested objects and arrays
//!   are values: they replace, they are not merged); fields of `m` that `w` lacks stay, new
//!   fields come after the existing ones;
//! - both strings: they concatenate;
//! - anything else: `w` replaces `m` (an append to a key with no message yet starts one).
//!
//! ## Folding
//! A compacted read folds each *run* — consecutive events of the read (after its `types`
//! filter) that form one message: an event with a key, followed by appends with the same key
//! and type — into one event: the seq, `id` and `time` of the last event folded in, the key,
//! type and `append` flag of the first, the merged data, and `"folded": n`. A run that starts
//! with an append stays an append (the reader merges it into the message it already holds);
//! a run of one event is that event, byte for byte.
//!
//! Why runs of *consecutive* events only: a reader's cursor is the seq of the last event it
//! was sent, and resuming from it must neither skip nor repeat anything. So every event it
//! was sent must stand for exactly the events after the previous one's seq up to its own: a
//! contiguous range. Folding appends of key A across an event of key B (A1 B1 A2) would send
//! either A (seq of A2) before B1 — a reader resuming from that seq never gets B1 — or B1
//! before A — one resuming from B1's seq gets A1 again. Interleaved messages therefore fold
//! only between their switches; events the read filters out (`types`) are never sent, do not
//! count, and do not break a run.
//!
//! A run of appends folds only while the result is what applying them one by one gives *to
//! any message*: after an append set a field to a non-string, a later string for that field
//! replaces it, yet folded into one append the string would be concatenated to the reader's
//! value. Such an event starts a new run (`fits`). A run that starts the message knows the
//! whole value and folds anything.
//!
//! Memory: one run at a time, its merged data bounded by [`FOLD_MAX_BYTES`] (past it the run
//! is sent and the next append starts a new one); the log is read in byte-bounded pages.
//!
//! The AI SDK view folds differently ([`Compaction::UiDeltas`]): its `ui` events carry one
//! UIMessageChunk each, and consecutive `text-delta` (or `reasoning-delta`) chunks of one
//! part — same `type` and `id`, every other field equal — become one chunk whose `delta` is
//! theirs joined.

use std::collections::HashMap;
use std::sync::Arc;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::frame::Frame;
use crate::log::model::StoredEvent;
use crate::log::store;
use crate::log::{Db, StreamName};

/// Most data bytes one run folds before it is sent and the next starts.
pub const FOLD_MAX_BYTES: usize = 1 << 20;

/// How a compacted read folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compaction {
    /// Runs of appends to one key become one event per message (REST, SSE, WebSocket).
    Messages,
    /// Consecutive text and reasoning deltas of one part become one chunk (the AI SDK view).
    UiDeltas,
}

/// JSON data as the merge rule sees it: only strings and objects' top levels matter.
#[derive(Debug, Clone)]
enum Data {
    Str(String),
    Obj(Object),
    /// Any other value, as its JSON text.
    Other(String),
}

#[derive(Debug, Clone, Default)]
struct Object {
    fields: Vec<(String, Field)>,
    index: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
enum Field {
    Str(String),
    Other(Box<RawValue>),
}

impl Field {
    fn same(&self, other: &Field) -> bool {
        match (self, other) {
            (Field::Str(a), Field::Str(b)) => a == b,
            (Field::Other(a), Field::Other(b)) => a.get() == b.get(),
            _ => false,
        }
    }
}

impl Object {
    fn get(&self, name: &str) -> Option<&Field> {
        self.index.get(name).map(|i| &self.fields[*i].1)
    }

    /// Sets a field, keeping its place if it exists (a duplicate name: the last value wins,
    /// as in `JSON.parse`).
    fn set(&mut self, name: String, value: Field) {
        match self.index.get(&name) {
            Some(i) => self.fields[*i].1 = value,
            None => {
                self.index.insert(name.clone(), self.fields.len());
                self.fields.push((name, value));
            }
        }
    }

    fn str_field(&self, name: &str) -> Option<&str> {
        match self.get(name)? {
            Field::Str(s) => Some(s),
            Field::Other(_) => None,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
                let mut obj = Object::default();
                while let Some((name, raw)) = map.next_entry::<String, Box<RawValue>>()? {
                    let field = match raw.get().as_bytes().first() {
                        Some(b'"') => Field::Str(
                            serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?,
                        ),
                        _ => Field::Other(raw),
                    };
                    obj.set(name, field);
                }
                Ok(obj)
            }
        }
        d.deserialize_map(V)
    }
}

impl Data {
    /// None if the text cannot be read (nested past serde_json's limit): such an event is
    /// never folded, only sent as it is.
    fn parse(text: &str) -> Option<Data> {
        match text.trim_start().as_bytes().first()? {
            b'"' => serde_json::from_str(text).ok().map(Data::Str),
            b'{' => serde_json::from_str(text).ok().map(Data::Obj),
            _ => Some(Data::Other(text.to_owned())),
        }
    }

    /// Applies the merge rule: `self` becomes `self` extended by `w`.
    fn merge(&mut self, w: Data) {
        match (self, w) {
            (Data::Obj(m), Data::Obj(w)) => {
                for (name, value) in w.fields {
                    match (m.index.get(&name).map(|i| &mut m.fields[*i].1), value) {
                        (Some(Field::Str(a)), Field::Str(b)) => a.push_str(&b),
                        (_, value) => m.set(name, value),
                    }
                }
            }
            (Data::Str(a), Data::Str(b)) => a.push_str(&b),
            (m, w) => *m = w,
        }
    }

    /// Whether an append run holding `self` may take `w`: whether, for every message `x`,
    /// `x` extended by `self` then by `w` equals `x` extended by `self` merged with `w`.
    /// It fails only where `w` brings a string (or an object) that would replace a value of
    /// `self` when applied alone, but be merged into `x`'s once folded.
    fn fits(&self, w: &Data) -> bool {
        match (self, w) {
            (_, Data::Other(_)) => true,
            (Data::Str(_), Data::Str(_)) => true,
            (Data::Obj(a), Data::Obj(w)) => w.fields.iter().all(|(name, value)| {
                !matches!((a.get(name), value), (Some(Field::Other(_)), Field::Str(_)))
            }),
            _ => false,
        }
    }

    fn to_json(&self) -> String {
        let string = |s: &str| serde_json::to_string(s).expect("string serialisation");
        match self {
            Data::Str(s) => string(s),
            Data::Other(raw) => raw.clone(),
            Data::Obj(o) => {
                let mut out = String::from("{");
                for (i, (name, value)) in o.fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&string(name));
                    out.push(':');
                    match value {
                        Field::Str(s) => out.push_str(&string(s)),
                        Field::Other(raw) => out.push_str(raw.get()),
                    }
                }
                out.push('}');
                out
            }
        }
    }
}

/// The UIMessageChunk types whose consecutive chunks of one part fold.
const UI_DELTAS: [&str; 2] = ["text-delta", "reasoning-delta"];

/// A run being folded.
struct Run {
    first: StoredEvent,
    /// Seq, id and time of the last event folded in.
    last: (i64, Option<String>, chrono::DateTime<chrono::Utc>),
    acc: Data,
    n: usize,
    bytes: usize,
}

impl Run {
    /// What a run starting with `ev` begins from, if `ev` can start one under `rule`.
    fn opening(rule: Compaction, ev: &StoredEvent) -> Option<Data> {
        if ev.body.is_some() {
            return None;
        }
        match rule {
            Compaction::Messages if ev.key.is_some() => Data::parse(&ev.data),
            Compaction::Messages => None,
            Compaction::UiDeltas => Data::parse(&ev.data).filter(is_ui_delta),
        }
    }

    fn new(ev: StoredEvent, acc: Data) -> Run {
        Run {
            last: (ev.seq, ev.id.clone(), ev.time),
            bytes: ev.data.len(),
            first: ev,
            acc,
            n: 1,
        }
    }

    /// Folds `ev` in if it continues the run; false if it does not.
    fn absorb(&mut self, rule: Compaction, ev: &StoredEvent) -> bool {
        if ev.body.is_some()
            || ev.ty != self.first.ty
            || self.bytes + ev.data.len() > FOLD_MAX_BYTES
        {
            return false;
        }
        let continues = match rule {
            Compaction::Messages => ev.append && ev.key == self.first.key,
            Compaction::UiDeltas => true,
        };
        if !continues {
            return false;
        }
        let Some(w) = Data::parse(&ev.data) else {
            return false;
        };
        let fits = match rule {
            // A run that starts the message holds all of it: anything merges exactly.
            Compaction::Messages => !self.first.append || self.acc.fits(&w),
            Compaction::UiDeltas => same_part(&self.acc, &w),
        };
        if !fits {
            return false;
        }
        match rule {
            Compaction::Messages => self.acc.merge(w),
            Compaction::UiDeltas => join_delta(&mut self.acc, w),
        }
        self.bytes += ev.data.len();
        self.n += 1;
        self.last = (ev.seq, ev.id.clone(), ev.time);
        true
    }

    fn finish(self, stream: &StreamName) -> Arc<Frame> {
        if self.n == 1 {
            return Frame::new(stream.as_str(), &self.first, None);
        }
        let (seq, id, time) = self.last;
        let ev = StoredEvent {
            seq,
            id,
            time,
            data: self.acc.to_json(),
            ..self.first
        };
        Frame::folded(stream.as_str(), &ev, self.n)
    }
}

/// A text or reasoning delta chunk: `type`, `id` and a string `delta`.
fn is_ui_delta(d: &Data) -> bool {
    let Data::Obj(o) = d else { return false };
    o.str_field("type").is_some_and(|t| UI_DELTAS.contains(&t))
        && o.get("id").is_some()
        && o.str_field("delta").is_some()
}

/// Whether chunk `w` is the next delta of the part `acc` folds: the same fields, all equal
/// but a string `delta`.
fn same_part(acc: &Data, w: &Data) -> bool {
    let (Data::Obj(a), Data::Obj(w)) = (acc, w) else {
        return false;
    };
    a.fields.len() == w.fields.len()
        && w.str_field("delta").is_some()
        && w.fields.iter().all(|(name, value)| {
            name == "delta" || a.get(name).is_some_and(|mine| mine.same(value))
        })
}

/// Appends chunk `w`'s `delta` to the part's (the other fields are equal: see `same_part`).
fn join_delta(acc: &mut Data, w: Data) {
    let (Data::Obj(a), Data::Obj(mut w)) = (acc, w) else {
        return;
    };
    let Some(i) = w.index.remove("delta") else {
        return;
    };
    let (_, delta) = w.fields.swap_remove(i);
    if let (Some(Field::Str(mine)), Field::Str(more)) =
        (a.index.get("delta").map(|i| &mut a.fields[*i].1), delta)
    {
        mine.push_str(&more);
    }
}

/// Folds a compacted read's events, one run at a time, in one pass.
pub struct Folder {
    stream: StreamName,
    rule: Compaction,
    run: Option<Run>,
}

impl Folder {
    pub fn new(stream: StreamName, rule: Compaction) -> Self {
        Folder {
            stream,
            rule,
            run: None,
        }
    }

    /// Whether a run is being folded (its events are held, not yet sent).
    pub fn is_open(&self) -> bool {
        self.run.is_some()
    }

    /// Data bytes the open run holds.
    pub fn held_bytes(&self) -> usize {
        self.run.as_ref().map_or(0, |r| r.bytes)
    }

    /// Folds `ev` into the open run if it continues it; false if it does not (or none is open).
    pub fn absorb(&mut self, ev: &StoredEvent) -> bool {
        match &mut self.run {
            Some(run) => run.absorb(self.rule, ev),
            None => false,
        }
    }

    /// Sends the open run and starts the next with `ev` (or sends `ev` as it is, if it
    /// cannot start one).
    pub fn start(&mut self, ev: StoredEvent, out: &mut Vec<Arc<Frame>>) {
        self.flush(out);
        match Run::opening(self.rule, &ev) {
            Some(acc) => self.run = Some(Run::new(ev, acc)),
            None => out.push(Frame::new(self.stream.as_str(), &ev, None)),
        }
    }

    /// Takes the next event of the read.
    pub fn feed(&mut self, ev: StoredEvent, out: &mut Vec<Arc<Frame>>) {
        if !self.absorb(&ev) {
            self.start(ev, out);
        }
    }

    /// Sends the open run, if any.
    pub fn flush(&mut self, out: &mut Vec<Arc<Frame>>) {
        if let Some(run) = self.run.take() {
            out.push(run.finish(&self.stream));
        }
    }
}

/// One page of a compacted REST read.
pub struct Page {
    pub events: Vec<Arc<Frame>>,
    /// The seq to read on from: the last event's (`after` if the page is empty).
    pub next_after: i64,
}

/// How much one compacted page may hold and read.
#[derive(Debug, Clone, Copy)]
pub struct PageLimits {
    /// Most events (folded or not) the page holds.
    pub events: usize,
    /// The page ends once its envelopes (and the run being folded) reach this many bytes.
    pub bytes: usize,
    /// Events per log read, and the log read's byte bound.
    pub read: i64,
    pub read_bytes: i64,
}

/// The events with `after < seq <= upto`, compacted, up to `limits` (at least one event if
/// there is one): one pass over byte-bounded log pages, holding one run at a time.
pub async fn read_page(
    db: &Db,
    stream: &StreamName,
    stream_id: i64,
    after: i64,
    upto: i64,
    limits: PageLimits,
) -> Result<Page, sqlx::Error> {
    let mut folder = Folder::new(stream.clone(), Compaction::Messages);
    let mut out: Vec<Arc<Frame>> = Vec::new();
    let mut out_bytes = 0;
    let mut cursor = after;
    'pages: while cursor < upto {
        let rows =
            store::read_events_bounded(db, stream_id, cursor, upto, limits.read, limits.read_bytes)
                .await?;
        let full = store::page_is_full(&rows, limits.read, limits.read_bytes);
        for ev in rows {
            let seq = ev.seq;
            if folder.absorb(&ev) {
                cursor = seq;
                continue;
            }
            // `ev` needs a place of its own: stop here if the page has none left.
            let held = usize::from(folder.is_open());
            if out.len() + held >= limits.events || out_bytes + folder.held_bytes() >= limits.bytes
            {
                break 'pages;
            }
            let before = out.len();
            folder.start(ev, &mut out);
            out_bytes += out[before..]
                .iter()
                .map(|f| f.envelope.len())
                .sum::<usize>();
            cursor = seq;
        }
        if !full {
            break;
        }
    }
    folder.flush(&mut out);
    let next_after = out.last().map_or(after, |f| f.seq);
    Ok(Page {
        events: out,
        next_after,
    })
}

#[cfg(test)]
mod tests {
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
            append,
        }
    }

    fn fold(rule: Compaction, events: Vec<StoredEvent>) -> Vec<Value> {
        let mut folder = Folder::new(StreamName::parse("s").unwrap(), rule);
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
        let mut folder = Folder::new(StreamName::parse("s").unwrap(), Compaction::Messages);
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
}
