//! A subscription: every event after a cursor, exactly once and in order, first from the log
//! and then live, whatever happens meanwhile. SSE and WebSocket are thin framings over it.
//!
//! The hand-over race: an event committed between "read the log up to its end" and "start
//! listening" would be lost. So the subscription registers with the hub *first*, then reads
//! the log; live events it has already read are dropped by seq (`seq <= upto`). Anything the
//! live path cannot vouch for — a lagged channel, a gap in seqs, a bare head announcement —
//! sends it back to the log from the last seq it holds, which is always correct because
//! commit order equals seq order within a stream.
//!
//! A compacted subscription ([`Subscription::open_compacted`]) folds its catch-up — from its
//! cursor to the end of the log as it reads it — run by run (see `compact`), and then follows
//! the live tail event by event: a run is sent when it ends, when it reaches its byte bound,
//! and at the latest when the catch-up reaches the end of the log. Every later catch-up (the
//! live path sent it back to the log: a lagged channel, a gap, a bare head) is folded by the
//! same rules from the last seq it holds. Its `from=snapshot` start sends each key's current
//! message (folded from the key's last event without `append`) instead of its latest event.
//!
//! Catch-up pages may come from a read replica (see `log::replicas`). A replica is a moment
//! behind the primary, so the subscription tracks `known`: the highest seq it knows was
//! committed (the head the primary showed at open, the heads live messages carry). A page
//! is read on a replica only if the replica's head has reached what the page needs; and the
//! subscription only goes live once it has read through `known` — every event committed
//! before it registered with the hub is at or below the head it saw at open, and every event
//! after reaches it live (or as a gap that sends it back to the log).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use crate::log::{Db, LogReader};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;

use super::budget::{Budget, Share};
use super::compact::{self, Compaction, Folder, Surface};
use super::frame::Frame;
use super::hub::{Hub, Known, LiveMsg, LiveReceiver};
use crate::error::Error;
use crate::log::model::TYPE_STREAM_CLOSED;
use crate::log::store::{self, StreamRow};
use crate::log::StreamName;
use crate::metrics as m;

/// First and longest wait before re-reading the log while the database is unreachable.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// Most `data` bytes one catch-up page holds: a subscriber's memory stays small whatever the
/// size of the events it reads.
pub const PAGE_BYTES: i64 = 4 << 20;

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// After this seq (0: from the beginning).
    After(i64),
    /// At the current head: only events appended from now on.
    Now,
    /// The snapshot (latest event per key), then everything after it.
    Snapshot,
    /// From the first event at or after this time.
    Since(DateTime<Utc>),
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    types: Option<HashSet<String>>,
}

impl Filter {
    pub fn types<I: IntoIterator<Item = String>>(types: I) -> Self {
        let set: HashSet<String> = types.into_iter().filter(|t| !t.is_empty()).collect();
        Filter {
            types: (!set.is_empty()).then_some(set),
        }
    }

    fn passes(&self, ty: &str) -> bool {
        self.types.as_ref().is_none_or(|t| t.contains(ty))
    }
}

/// What a notice says (its `notice` field on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeKind {
    /// Retention removed events after the cursor; the subscription continues after them.
    Gap,
    /// The cursor was past the stream's head; the subscription continues from the head.
    Reset,
    /// The stream was deleted; the subscription ends ([`EndReason::Deleted`]).
    Deleted,
}

impl NoticeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Gap => "gap",
            NoticeKind::Reset => "reset",
            NoticeKind::Deleted => "deleted",
        }
    }
}

/// Why a subscription ended on its own: what [`Subscription::end`] says once
/// [`Subscription::next`] has returned `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// It delivered the stream's `stream.closed` (opened with `end_on_close`).
    Closed,
    /// The stream was deleted (after a `deleted` notice).
    Deleted,
    /// The hub shut down: the server is stopping.
    Shutdown,
}

/// A notice: the client's cursor could not be honoured as given, or the stream is gone.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    pub notice: NoticeKind,
    pub stream: StreamName,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<i64>,
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<Frame>),
    Notice(Notice),
    /// The client's cursor moved to this seq without an event (after a snapshot).
    Cursor(i64),
}

/// The database and hub a subscription reads from.
#[derive(Clone)]
pub struct Source {
    /// The primary: stream rows, snapshots, cursors by time.
    pub db: Db,
    /// Catch-up pages: a replica that has replayed far enough, or the primary.
    pub reader: LogReader,
    pub hub: Arc<Hub>,
    pub page: i64,
    /// Most bytes of event data a `from=snapshot` start may load (`--max-snapshot-bytes`).
    pub snapshot_bytes: usize,
}

enum Mode {
    CatchUp,
    Live,
}

pub struct Subscription {
    src: Source,
    stream: StreamName,
    live: LiveReceiver,
    stream_id: Option<i64>,
    mode: Mode,
    /// Highest seq read into `pending` (or skipped); the next log read starts after it.
    upto: i64,
    /// Highest seq handed to the client (or filtered out).
    delivered: i64,
    /// Highest seq known to be committed (see the module comment): catch-up reads through
    /// it before going live.
    known: i64,
    /// The log holds no retained event in `(upto, scanned]` (a replica page read past the
    /// last event it found); the next read starts after `max(upto, scanned)`.
    scanned: i64,
    pending: VecDeque<Item>,
    filter: Filter,
    end_on_close: bool,
    /// Set when the subscription is over; [`Subscription::next`] yields what it still holds,
    /// then `None`.
    ended: Option<EndReason>,
    /// While the database is unreachable: when to try the log again, and the current backoff.
    retry: Option<(tokio::time::Instant, std::time::Duration)>,
    /// A compacted subscription's rule, and where it is served.
    compaction: Option<(Compaction, Surface)>,
    /// Folds the catch-up of a compacted subscription; gone while it is live. Boxed: the run
    /// it holds is hundreds of bytes that most subscriptions never use.
    folder: Option<Box<Folder>>,
    /// The byte budget its catch-up pages come out of, if it shares one with others (a
    /// WebSocket's subscriptions), and its share for the page it holds in `pending`.
    budget: Option<Budget>,
    held: Option<Share>,
}

/// The state of a stream when a subscription opened.
#[derive(Debug, Clone)]
pub struct Opened {
    /// Whether the stream existed (it is created by its first append).
    pub exists: bool,
    pub head: i64,
    pub closed: bool,
    /// The cursor the subscription actually starts from.
    pub cursor: i64,
}

impl Subscription {
    /// Opens a subscription. `end_on_close`: stop after delivering `stream.closed`.
    pub async fn open(
        src: Source,
        stream: StreamName,
        start: Start,
        filter: Filter,
        end_on_close: bool,
    ) -> Result<(Subscription, Opened), Error> {
        Self::open_compacted(src, stream, start, filter, end_on_close, None).await
    }

    /// Opens a subscription that is compacted if `compact` names a rule (and the surface it
    /// is served on, for the metrics): its catch-ups from the log come folded by the rule,
    /// the live tail event by event.
    pub async fn open_compacted(
        src: Source,
        stream: StreamName,
        start: Start,
        filter: Filter,
        end_on_close: bool,
        compact: Option<(Compaction, Surface)>,
    ) -> Result<(Subscription, Opened), Error> {
        // Register for live events before reading anything: see the module comment.
        let (live, registered) = src.hub.subscribe_known(&stream);
        if start == Start::Now {
            if let Some(opened) = open_now_from_hub(registered.known) {
                let head = opened.head;
                let mut sub = Subscription::new(src, stream, live, filter, end_on_close);
                sub.compaction = compact;
                if let Known::Row { id, .. } = registered.known {
                    sub.stream_id = Some(id);
                }
                (sub.upto, sub.delivered, sub.known) = (head, head, head);
                // Nothing to catch up on: every event after `head` reaches it live (or as a
                // gap that sends it to the log). A stream that did not exist is waited for
                // live too, as `read_log` would.
                sub.mode = Mode::Live;
                sub.src.hub.note_opened_from_hub();
                return Ok((sub, opened));
            }
        }
        let row = store::stream(&src.db, stream.as_str()).await?;
        src.hub.remember(
            &stream,
            registered,
            row.as_ref().map(|r| (r.id, r.head, r.closed)),
        );
        let mut sub = Subscription::new(src, stream, live, filter, end_on_close);
        sub.stream_id = row.as_ref().map(|r| r.id);
        sub.compaction = compact;
        let head = row.as_ref().map_or(0, |r| r.head);
        let cursor = sub.position(row.as_ref(), start).await?;
        sub.upto = cursor;
        sub.delivered = cursor;
        // Read on the primary after registering with the hub: every event committed before
        // that is at or below it.
        sub.known = head;
        let opened = Opened {
            exists: row.is_some(),
            head,
            closed: row.as_ref().is_some_and(|r| r.closed),
            cursor,
        };
        if let Some((_, surface)) = compact {
            surface.count_read();
        }
        Ok((sub, opened))
    }

    fn new(
        src: Source,
        stream: StreamName,
        live: LiveReceiver,
        filter: Filter,
        end_on_close: bool,
    ) -> Subscription {
        Subscription {
            src,
            stream,
            live,
            stream_id: None,
            mode: Mode::CatchUp,
            upto: 0,
            delivered: 0,
            known: 0,
            scanned: 0,
            pending: VecDeque::new(),
            filter,
            end_on_close,
            ended: None,
            retry: None,
            compaction: None,
            folder: None,
            budget: None,
            held: None,
        }
    }

    /// Works out the starting cursor, queuing notices and snapshot events as needed.
    async fn position(&mut self, row: Option<&StreamRow>, start: Start) -> Result<i64, Error> {
        let head = row.map_or(0, |r| r.head);
        let trimmed = row.map_or(0, |r| r.trimmed_to);
        Ok(match start {
            Start::Now => head,
            Start::After(c) if c > head => {
                self.notice(
                    NoticeKind::Reset,
                    format!(
                        "cursor {c} is past the stream's head {head}; continuing from the head"
                    ),
                    None,
                    Some(head),
                );
                head
            }
            Start::After(c) if c < trimmed => {
                let oldest = trimmed + 1;
                self.notice(
                    NoticeKind::Gap,
                    format!(
                        "events {}..{} were removed by retention; continuing from {oldest}",
                        c + 1,
                        trimmed
                    ),
                    Some(oldest),
                    None,
                );
                trimmed
            }
            Start::After(c) => c,
            Start::Since(t) => match row {
                Some(r) => store::cursor_at_time(&self.src.db, r, t)
                    .await?
                    .max(trimmed),
                None => 0,
            },
            Start::Snapshot => {
                let Some(r) = row else { return Ok(0) };
                // A closed stream ends with its `stream.closed` (which has no key, so the
                // snapshot is the same either side of it). Starting just before it delivers
                // it: the subscriber learns the stream is over instead of waiting forever.
                let at = if r.closed { r.head - 1 } else { r.head };
                let limit = self.src.snapshot_bytes;
                let mut frames = match self.compaction {
                    Some((Compaction::Messages, surface)) => {
                        let events = store::snapshot_messages(&self.src.db, r.id, at, limit)
                            .await?
                            .ok_or(Error::SnapshotTooLarge { limit })?;
                        let filter = &self.filter;
                        compact::fold_snapshot(&self.stream, events, surface, |ty| {
                            filter.passes(ty)
                        })
                    }
                    _ => store::snapshot(&self.src.db, r.id, at, limit)
                        .await?
                        .ok_or(Error::SnapshotTooLarge { limit })?
                        .iter()
                        .map(|ev| Frame::new(self.stream.as_str(), ev, None))
                        .filter(|f| self.filter.passes(&f.ty))
                        .collect(),
                };
                // In seq order, so a client's cursor only ever moves forward.
                frames.sort_by_key(|f| f.seq);
                self.pending.extend(frames.into_iter().map(Item::Event));
                self.pending.push_back(Item::Cursor(at));
                at
            }
        })
    }

    fn notice(&mut self, kind: NoticeKind, detail: String, oldest: Option<i64>, head: Option<i64>) {
        self.pending.push_back(Item::Notice(Notice {
            notice: kind,
            stream: self.stream.clone(),
            detail,
            oldest,
            head,
        }));
    }

    pub fn stream(&self) -> &StreamName {
        &self.stream
    }

    /// Makes this subscription's catch-up pages come out of `budget`, shared with others: it
    /// waits for its share before it reads a page, and gives it back once the page is handed
    /// on. A page is cut at the share it got; a single event larger than the whole budget is
    /// still read, alone (it must be delivered, and only it is held).
    pub fn share_budget(&mut self, budget: Budget) {
        self.budget = Some(budget);
    }

    /// The seq of the last event this subscription handed out (or filtered out).
    pub fn cursor(&self) -> i64 {
        self.delivered
    }

    /// Why the subscription ended, once [`Subscription::next`] has returned `None`; `None`
    /// while it goes on.
    pub fn end(&self) -> Option<EndReason> {
        self.ended.filter(|_| self.pending.is_empty())
    }

    /// The next item, or `None` when the subscription is over (stream closed with
    /// `end_on_close`, stream deleted, or the hub shut down: [`Subscription::end`] says
    /// which). Cancel-safe: state only changes after each await completes.
    pub async fn next(&mut self) -> Option<Result<Item, Error>> {
        loop {
            if let Some(item) = self.try_next() {
                return Some(Ok(item));
            }
            if self.ended.is_some() {
                return None;
            }
            // The log read and the outage backoff are boxed: inline, their state (a timer, the
            // read's) would sit in the future of every subscriber waiting live, which is most
            // of them (an idle SSE connection's memory), for the rare time they are needed.
            if let Some((at, _)) = self.retry {
                Box::pin(tokio::time::sleep_until(at)).await;
            }
            let step = match self.mode {
                Mode::CatchUp => Box::pin(self.read_log()).await,
                Mode::Live => self.recv_live().await,
            };
            match step {
                Ok(()) => self.retry = None,
                // A database outage does not end the subscription: it stays connected and
                // reads the log again (capped backoff) until the database answers.
                Err(Error::Unavailable) => {
                    let delay = self
                        .retry
                        .map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_MAX));
                    self.retry = Some((tokio::time::Instant::now() + delay, delay));
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next item if the subscription already holds one (read from the log, or received
    /// live), without waiting and without querying: lets a transport put a catch-up page or a
    /// burst into one write instead of one per event.
    pub fn try_next(&mut self) -> Option<Item> {
        let item = self.pending.pop_front()?;
        match &item {
            Item::Event(f) => {
                self.delivered = f.seq;
                if f.ty == TYPE_STREAM_CLOSED && self.end_on_close {
                    self.ended = Some(EndReason::Closed);
                    self.pending.clear();
                }
            }
            Item::Cursor(c) => self.delivered = self.delivered.max(*c),
            Item::Notice(_) => {}
        }
        if self.pending.is_empty() {
            // The page is handed on: its bytes are the transport's now.
            self.held = None;
        }
        Some(item)
    }

    async fn read_log(&mut self) -> Result<(), Error> {
        if self.stream_id.is_none() {
            let (db, name) = (self.src.db.clone(), self.stream.clone());
            match detached(async move { store::stream(&db, name.as_str()).await }).await? {
                Some(row) => {
                    self.stream_id = Some(row.id);
                    self.known = self.known.max(row.head);
                }
                None => {
                    // Not created yet: wait for its first events live.
                    self.mode = Mode::Live;
                    self.folder = None;
                    return Ok(());
                }
            }
        }
        let id = self.stream_id.expect("set above");
        if let (None, Some((rule, surface))) = (&self.folder, self.compaction) {
            // A compacted subscription's catch-up, the first or one the live path sent it
            // back to the log for: folded from the last seq it holds.
            self.folder = Some(Box::new(Folder::new(self.stream.clone(), rule, surface)));
        }
        // `pending` is empty here (`next` reads only then), so nothing is held yet.
        let share = match &self.budget {
            Some(budget) => Some(budget.take(PAGE_BYTES as usize).await),
            None => None,
        };
        let bytes = share.as_ref().map_or(PAGE_BYTES, |s| s.bytes() as i64);
        let page = self.src.page;
        let (reader, after) = (self.src.reader.clone(), self.upto.max(self.scanned));
        // This page needs the events up to `known`, or a page's worth of seqs past `after`
        // (a long catch-up need not wait for a replica to reach the newest head).
        let need = self.known.min(after.saturating_add(page));
        let read =
            detached(async move { reader.page(id, after, i64::MAX, need, page, bytes).await })
                .await?;
        let rows = read.events;
        metrics::counter!(m::CATCHUP_READS).increment(1);
        if let Some(mut share) = share {
            // Keep what the page holds (all of the budget for one oversized event).
            share.shrink_to(rows.iter().map(store::event_bytes).sum());
            self.held = Some(share);
        }
        let page_full = store::page_is_full(&rows, page, bytes);
        // The catch-up is over when a short page reached every event known to be committed.
        let at_end = !page_full && read.through >= self.known;
        if at_end {
            self.mode = Mode::Live;
        } else if !page_full {
            // A replica's page ended at its head, short of `known`: read on from there.
            self.scanned = read.through;
        }
        if let Some(first) = rows.first() {
            if first.seq > self.upto + 1 {
                // A run never spans a hole: what was folded goes before the notice.
                self.flush_folder();
                // The log is gap-free, so a hole means retention removed those events.
                let (from, to) = (self.upto + 1, first.seq - 1);
                self.notice(
                    NoticeKind::Gap,
                    format!(
                        "events {from}..{to} were removed by retention; continuing from {}",
                        first.seq
                    ),
                    Some(first.seq),
                    None,
                );
            }
        }
        if self.folder.is_some() {
            self.fold_rows(rows);
            if at_end {
                // The catch-up is over: send the last run now, and the live tail as it comes.
                self.flush_folder();
                self.folder = None;
            }
            return Ok(());
        }
        for ev in &rows {
            self.upto = ev.seq;
            self.known = self.known.max(ev.seq);
            let frame = Frame::new(self.stream.as_str(), ev, None);
            self.push_event(frame);
        }
        Ok(())
    }

    /// Catch-up rows through the folder. Events the filter drops never reach it: the reader
    /// is never sent them, so they neither count in a run nor end one.
    fn fold_rows(&mut self, rows: Vec<crate::log::StoredEvent>) {
        let mut out = Vec::new();
        for ev in rows {
            self.upto = ev.seq;
            self.known = self.known.max(ev.seq);
            let Some(folder) = self.folder.as_mut() else {
                return;
            };
            let kept =
                self.filter.passes(&ev.ty) || (ev.ty == TYPE_STREAM_CLOSED && self.end_on_close);
            if kept {
                folder.feed(ev, &mut out);
            } else if out.is_empty() && !folder.is_open() && self.pending.is_empty() {
                // Filtered out with nothing held before it: the cursor moves past it.
                self.delivered = ev.seq;
            }
            for frame in out.drain(..) {
                self.pending.push_back(Item::Event(frame));
            }
        }
    }

    fn flush_folder(&mut self) {
        let mut out = Vec::new();
        if let Some(folder) = self.folder.as_mut() {
            folder.flush(&mut out);
        }
        for frame in out {
            self.pending.push_back(Item::Event(frame));
        }
    }

    fn push_event(&mut self, frame: Arc<Frame>) {
        if self.filter.passes(&frame.ty) || (frame.ty == TYPE_STREAM_CLOSED && self.end_on_close) {
            self.pending.push_back(Item::Event(frame));
        } else if self.pending.is_empty() {
            // Filtered out: the cursor still moves past it.
            self.delivered = frame.seq;
        }
    }

    async fn recv_live(&mut self) -> Result<(), Error> {
        match self.live.rx.recv().await {
            Ok(msg) => match &*msg {
                LiveMsg::Events { events, head } => {
                    self.known = self.known.max(*head);
                    if self.stream_id.is_none() {
                        // The stream did not exist when this subscription looked: these may
                        // be the last events of an incarnation deleted just before it opened
                        // (their fan-out can trail the delete). Only the log can tell; read it.
                        self.mode = Mode::CatchUp;
                        return Ok(());
                    }
                    for f in events {
                        if f.seq <= self.upto {
                            continue;
                        }
                        if f.seq > self.upto + 1 {
                            // Committed elsewhere and not fanned out here yet: the log has it.
                            self.mode = Mode::CatchUp;
                            return Ok(());
                        }
                        self.upto = f.seq;
                        self.push_event(f.clone());
                    }
                }
                LiveMsg::Advanced { head } => {
                    self.known = self.known.max(*head);
                    if *head > self.upto {
                        self.mode = Mode::CatchUp;
                    }
                }
                LiveMsg::Deleted => {
                    let detail = "the stream was deleted".into();
                    self.notice(NoticeKind::Deleted, detail, None, None);
                    self.ended = Some(EndReason::Deleted);
                }
            },
            Err(RecvError::Lagged(missed)) => {
                // Never skip: re-read what the channel dropped from the log.
                tracing::debug!(stream = %self.stream, missed, "live buffer overflow; reading the log");
                self.src.hub.note_lag_fallback();
                // The dropped messages carried heads up to what the hub has published.
                if let Some(published) = self.src.hub.published(&self.stream) {
                    self.known = self.known.max(published);
                }
                self.mode = Mode::CatchUp;
            }
            Err(RecvError::Closed) => self.ended = Some(EndReason::Shutdown),
        }
        Ok(())
    }
}

/// A `from=now` open answered from what the hub knew when the subscriber registered — no
/// database read — if it knew the stream's row (or that there was none). Many clients
/// opening on one busy stream at once (a page's viewers arriving together) cost no reads.
fn open_now_from_hub(known: Known) -> Option<Opened> {
    match known {
        Known::Unknown => None,
        Known::Absent => Some(Opened {
            exists: false,
            head: 0,
            closed: false,
            cursor: 0,
        }),
        Known::Row { head, closed, .. } => Some(Opened {
            exists: true,
            head,
            closed,
            cursor: head,
        }),
    }
}

/// Runs a log read in its own task, so that it finishes — and returns its pooled connection —
/// whether or not the subscription is polled meanwhile. A consumer that stops polling (a
/// WebSocket loop busy with a client op, a full send queue) would otherwise hold a connection
/// per paused subscription, and enough of them exhaust the pool for everyone.
async fn detached<T, F>(read: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'static,
{
    match tokio::spawn(read).await {
        Ok(res) => res.map_err(Error::from),
        Err(e) => Err(Error::internal(e)),
    }
}
