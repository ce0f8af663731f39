//! Cheap subscription opens: `from=now` on a stream this node already follows is answered
//! from what the hub knows of it, without a database read, and hands over to the live tail
//! exactly as a database-read open does — also for a stream that does not exist, was closed
//! or was deleted (and re-created).

use std::sync::Arc;

use tailcast::live::{Filter, Hub, Item, Opened, Source, Start, Subscription};
use tailcast::log::db::TxLimits;
use tailcast::log::health::DbHealth;
use tailcast::log::model::TYPE_STREAM_CLOSED;
use tailcast::log::{
    store, AppendSpec, Appender, AppenderSettings, LogReader, NewEvent, Replicas, StreamName,
};

use crate::backend::{backend_test, TestDb};
use crate::helpers::WAIT;

struct Node {
    db: TestDb,
    hub: Arc<Hub>,
    appender: Appender,
    name: StreamName,
}

impl Node {
    async fn new(db: TestDb) -> Node {
        db.db.migrate().await.expect("migrated");
        let hub = Hub::new(16, usize::MAX);
        let settings = AppenderSettings {
            max_batch: 16,
            limits: TxLimits::default(),
        };
        let (appender, _task) = Appender::spawn(
            db.db.clone(),
            hub.clone(),
            "opens".into(),
            settings,
            DbHealth::new(),
        );
        Node {
            db,
            hub,
            appender,
            name: StreamName::parse("s").unwrap(),
        }
    }

    async fn open(&self, start: Start) -> (Subscription, Opened) {
        let source = Source {
            db: self.db.db.clone(),
            reader: LogReader::new(self.db.db.clone(), Replicas::none()),
            hub: self.hub.clone(),
            page: 100,
            snapshot_bytes: usize::MAX,
        };
        Subscription::open(source, self.name.clone(), start, Filter::default(), true)
            .await
            .expect("opened")
    }

    /// Opens `from=now` and says whether the hub answered it (no database read).
    async fn open_now(&self) -> (Subscription, Opened, bool) {
        let before = self.hub.opened_from_hub();
        let (sub, opened) = self.open(Start::Now).await;
        (sub, opened, self.hub.opened_from_hub() == before + 1)
    }

    async fn append(&self, ty: &str, close: bool) -> i64 {
        let spec = AppendSpec {
            stream: self.name.clone(),
            events: vec![NewEvent {
                ty: ty.into(),
                data: "1".into(),
                id: None,
                key: None,
                body: None,
                by: None,
                append: false,
            }],
            expected_seq: None,
            close,
        };
        self.appender.append(spec).await.expect("appended").last_seq
    }
}

/// The seq of the subscription's next event.
async fn next_seq(sub: &mut Subscription) -> i64 {
    loop {
        let item = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("an item in time")
            .expect("the subscription goes on")
            .expect("no error");
        if let Item::Event(f) = item {
            return f.seq;
        }
    }
}

/// What the subscription yields until it ends (bounded by `WAIT`).
async fn rest(sub: &mut Subscription) -> Vec<String> {
    let mut seen = Vec::new();
    while let Some(item) = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("the subscription ends in time")
    {
        match item.expect("no error") {
            Item::Event(f) => seen.push(format!("{} {}", f.seq, f.ty)),
            Item::Notice(n) => seen.push(n.notice.as_str().to_owned()),
            Item::Cursor(c) => seen.push(format!("cursor {c}")),
        }
    }
    seen
}

#[backend_test]
async fn from_now_on_a_followed_stream_is_answered_from_the_hub(db: TestDb) {
    let node = Node::new(db).await;

    // The first subscriber reads the database (the stream does not exist yet); the hub
    // remembers that, and the next `from=now` is answered from it.
    let (mut first, opened) = node.open(Start::After(0)).await;
    assert!(!opened.exists);
    let (mut missing, opened, fast) = node.open_now().await;
    assert!(fast, "answered from the hub");
    assert_eq!((opened.exists, opened.head, opened.cursor), (false, 0, 0));

    // Created: both get it from seq 1.
    assert_eq!(node.append("a", false).await, 1);
    assert_eq!(next_seq(&mut first).await, 1);
    assert_eq!(next_seq(&mut missing).await, 1);

    // The hub saw the stream created but not its row: the next open reads it ...
    let (mut read, opened, fast) = node.open_now().await;
    assert!(!fast, "the row was unknown: read");
    assert_eq!((opened.exists, opened.head), (true, 1));
    // ... and remembers it: from here on every `from=now` is answered from the hub, with
    // the head as its own commits moved it.
    let (mut at_one, opened, fast) = node.open_now().await;
    assert!(fast);
    assert_eq!((opened.exists, opened.head, opened.cursor), (true, 1, 1));
    assert_eq!(node.append("a", false).await, 2);
    let (mut at_two, opened, fast) = node.open_now().await;
    assert!(fast);
    assert_eq!((opened.head, opened.cursor), (2, 2));
    assert_eq!(node.append("a", false).await, 3);
    // Exactly the events after each one's head, once and in order.
    for (sub, from) in [
        (&mut first, 2),
        (&mut missing, 2),
        (&mut read, 2),
        (&mut at_one, 2),
        (&mut at_two, 3),
    ] {
        for seq in from..=3 {
            assert_eq!(next_seq(sub).await, seq);
        }
    }

    // Closed: the hub saw the closing event and says so (SSE answers 204 on it).
    assert_eq!(node.append(TYPE_STREAM_CLOSED, true).await, 4);
    let (_closed, opened, fast) = node.open_now().await;
    assert!(fast);
    assert_eq!((opened.exists, opened.head, opened.closed), (true, 4, true));
    for sub in [
        &mut first,
        &mut missing,
        &mut read,
        &mut at_one,
        &mut at_two,
    ] {
        assert_eq!(rest(sub).await, vec![format!("4 {TYPE_STREAM_CLOSED}")]);
    }

    // Deleted (still followed here by `_closed`): the hub forgets the row, so the next open
    // reads the database and learns the stream is gone; the one after is answered so.
    assert!(store::delete_stream(&node.db.db, "s", "opens")
        .await
        .unwrap());
    node.hub.deleted(&node.name);
    let (mut after_delete, opened, fast) = node.open_now().await;
    assert!(!fast, "a deletion makes the hub read again");
    assert!(!opened.exists && !opened.closed);
    let (mut gone, opened, fast) = node.open_now().await;
    assert!(fast);
    assert_eq!(
        (opened.exists, opened.head, opened.closed),
        (false, 0, false)
    );

    // Re-created: the new incarnation's events, from seq 1, reach both.
    assert_eq!(node.append("b", false).await, 1);
    assert_eq!(next_seq(&mut after_delete).await, 1);
    assert_eq!(next_seq(&mut gone).await, 1);
}

/// A row read from the database is not remembered if the stream moved between the reader's
/// registration and its read: what it read may be older than what the hub has seen.
#[backend_test]
async fn a_row_read_while_the_stream_moved_is_not_remembered(db: TestDb) {
    let node = Node::new(db).await;
    assert_eq!(node.append("a", false).await, 1);
    let (_follower, _) = node.open(Start::After(0)).await;
    node.hub.forget(&node.name);
    // An open registers, and an append moves the stream before its read is remembered.
    let (live, registered) = node.hub.subscribe_known(&node.name);
    assert_eq!(node.append("a", false).await, 2);
    node.hub
        .remember(&node.name, registered, Some((1, 1, false)));
    drop(live);
    let (_sub, opened, fast) = node.open_now().await;
    assert!(!fast, "the stale row was not used");
    assert_eq!(opened.head, 2);
    let (_sub, opened, fast) = node.open_now().await;
    assert!(fast);
    assert_eq!(opened.head, 2);
}
