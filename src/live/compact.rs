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
use crate::log::{LogReader, StreamName};
use crate::metrics as m;

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

/// Where a compacted read is served: the `surface` label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `GET …/events?compact=1`, JSON pages and the NDJSON export.
    Rest,
    Sse,
    Ws,
    /// The AI SDK UI message stream view.
    Ui,
}

impl Surface {
    pub const ALL: [Surface; 4] = [Surface::Rest, Surface::Sse, Surface::Ws, Surface::Ui];

    pub fn label(self) -> &'static str {
        match self {
            Surface::Rest => "rest",
            Surface::Sse => "sse",
            Surface::Ws => "ws",
            Surface::Ui => "ui",
        }
    }

    /// Counts one compacted read (a REST page or export, a subscription) served here.
    pub fn count_read(self) {
        metrics::counter!(m::COMPACT_READS, "surface" => self.label()).increment(1);
    }
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
        // A folded event names one author (the first's `by`): a run never spans two.
        if ev.body.is_some()
            || ev.ty != self.first.ty
            || ev.by != self.first.by
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
    surface: Surface,
    run: Option<Run>,
}

impl Folder {
    pub fn new(stream: StreamName, rule: Compaction, surface: Surface) -> Self {
        Folder {
            stream,
            rule,
            surface,
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
            if run.n > 1 {
                // The events this one stands for that were not sent on their own.
                metrics::counter!(m::COMPACT_FOLDED, "surface" => self.surface.label())
                    .increment(run.n as u64 - 1);
            }
            out.push(run.finish(&self.stream));
        }
    }
}

/// A compacted snapshot: `events` — each key's events from its current message's start,
/// ordered by key, then seq (see `store::snapshot_messages`) — folded into one event per
/// message (more where a run ends early: another type or author, the byte bound), in the same
/// key order. Events whose type `keep` refuses are dropped before folding, as in a read.
pub fn fold_snapshot(
    stream: &StreamName,
    events: Vec<StoredEvent>,
    surface: Surface,
    keep: impl Fn(&str) -> bool,
) -> Vec<Arc<Frame>> {
    let mut out = Vec::new();
    let mut folder = Folder::new(stream.clone(), Compaction::Messages, surface);
    let mut key: Option<String> = None;
    for ev in events {
        if !keep(&ev.ty) {
            continue;
        }
        if ev.key != key {
            // Another key's message: the previous one is complete.
            folder.flush(&mut out);
            key.clone_from(&ev.key);
        }
        folder.feed(ev, &mut out);
    }
    folder.flush(&mut out);
    out
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

/// The events of a stream (`row`, as the primary has it) with `after < seq <= row.head`,
/// compacted, up to `limits` (at least one event if there is one): one pass over
/// byte-bounded log pages, holding one run at a time. Pages come through `reader` like any
/// replay's: from a read replica that has replayed far enough, else from the primary.
pub async fn read_page(
    reader: &LogReader,
    stream: &StreamName,
    row: &store::StreamRow,
    after: i64,
    limits: PageLimits,
) -> Result<Page, sqlx::Error> {
    let upto = row.head;
    let mut folder = Folder::new(stream.clone(), Compaction::Messages, Surface::Rest);
    let mut out: Vec<Arc<Frame>> = Vec::new();
    let mut out_bytes = 0;
    let mut cursor = after;
    'pages: while cursor < upto {
        // What a replica must have replayed for this log page (as `rest::page_need`): the
        // head, or a page's worth of seqs past the cursor if that comes first.
        let need = upto.min(
            cursor
                .max(row.trimmed_to)
                .saturating_add(limits.read.max(1)),
        );
        let read = reader
            .page(row.id, cursor, upto, need, limits.read, limits.read_bytes)
            .await?;
        let full = store::page_is_full(&read.events, limits.read, limits.read_bytes);
        for ev in read.events {
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
            if read.through >= upto {
                break;
            }
            // A replica's page ended at its head (at least `need`), short of ours: every
            // event up to it has been read; read on from there.
            cursor = cursor.max(read.through);
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
#[path = "compact_tests.rs"]
mod tests;
