//! A broadcast channel whose buffer grows only as far as its slowest receiver lags, and
//! never past a bound in messages and in bytes.
//!
//! `tokio::sync::broadcast` allocates its whole capacity up front: at 1024 slots that is about
//! 40 KiB per stream with a subscriber, which dominated the memory of an idle connection (one
//! quiet stream each). Here a message is kept only until every receiver that was subscribed
//! when it was sent has taken it, and never more than `capacity` messages or `max_bytes`
//! bytes (as the sender weighs them; the newest message is always kept, whatever its size):
//! an idle stream holds no buffer at all, a busy one whose receivers keep up holds a few
//! messages, and a receiver that falls behind the bound gets `Lagged` (and reads the log),
//! exactly as with tokio's channel. A stalled receiver therefore pins at most the bound,
//! however much is sent after it stopped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::Notify;

struct Slot<T> {
    value: T,
    /// Receivers that have not taken this message yet.
    unread: usize,
    /// The message's weight, as given to `send_sized`.
    bytes: usize,
}

struct State<T> {
    slots: VecDeque<Slot<T>>,
    /// Position of `slots[0]`; positions count every message ever sent.
    first: u64,
    /// Sum of the held messages' weights.
    bytes: usize,
    receivers: usize,
    senders: usize,
}

impl<T> State<T> {
    fn pop_front(&mut self) {
        if let Some(slot) = self.slots.pop_front() {
            self.first += 1;
            self.bytes -= slot.bytes;
        }
    }

    fn end(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    /// Drops messages from the front that every receiver has taken.
    fn trim(&mut self) {
        while self.slots.front().is_some_and(|s| s.unread == 0) {
            self.pop_front();
        }
        if self.slots.is_empty() && self.slots.capacity() > 64 {
            // A burst is over: give its buffer back.
            self.slots = VecDeque::new();
        }
    }
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    max_bytes: usize,
    notify: Notify,
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Position of the next message this receiver takes.
    next: u64,
}

/// A channel keeping at most `capacity` (≥ 1) messages for lagging receivers.
pub fn channel<T: Clone>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    bounded(capacity, usize::MAX)
}

/// A channel keeping at most `capacity` (≥ 1) messages and `max_bytes` bytes of them (as
/// weighed by [`Sender::send_sized`]; the newest is kept even if it alone weighs more).
pub fn bounded<T: Clone>(capacity: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            slots: VecDeque::new(),
            first: 0,
            bytes: 0,
            receivers: 0,
            senders: 1,
        }),
        capacity: capacity.max(1),
        max_bytes,
        notify: Notify::new(),
    });
    let tx = Sender { shared };
    let rx = tx.subscribe();
    (tx, rx)
}

impl<T: Clone> Sender<T> {
    /// Sends to every current receiver; `Err(value)` if there is none.
    pub fn send(&self, value: T) -> Result<(), T> {
        self.send_sized(value, 0)
    }

    /// Sends a message that weighs `bytes` toward the channel's byte bound.
    pub fn send_sized(&self, value: T, bytes: usize) -> Result<(), T> {
        self.send_deferred(value, bytes).map(Wake::wake)
    }

    /// Queues a message like [`Sender::send_sized`] but wakes the waiting receivers only when
    /// the returned [`Wake`] is used (or dropped): the appender answers its callers between
    /// the two, so waking a thousand subscribers does not delay the answers. A receiver that
    /// looks meanwhile already finds the message.
    pub fn send_deferred(&self, value: T, bytes: usize) -> Result<Wake<T>, T> {
        let mut st = self.shared.state.lock().expect("ring lock");
        if st.receivers == 0 {
            return Err(value);
        }
        let unread = st.receivers;
        st.slots.push_back(Slot {
            value,
            unread,
            bytes,
        });
        st.bytes += bytes;
        // The slowest receivers are past the bound: they will see `Lagged`.
        while st.slots.len() > 1
            && (st.slots.len() > self.shared.capacity || st.bytes > self.shared.max_bytes)
        {
            st.pop_front();
        }
        drop(st);
        Ok(Wake {
            shared: Some(self.shared.clone()),
        })
    }

    /// A receiver that gets every message sent from now on.
    pub fn subscribe(&self) -> Receiver<T> {
        let mut st = self.shared.state.lock().expect("ring lock");
        st.receivers += 1;
        Receiver {
            shared: self.shared.clone(),
            next: st.end(),
        }
    }

    pub fn receiver_count(&self) -> usize {
        self.shared.state.lock().expect("ring lock").receivers
    }

    /// Messages held for receivers that have not taken them yet.
    pub fn len(&self) -> usize {
        self.shared.state.lock().expect("ring lock").slots.len()
    }

    /// Bytes (as weighed by the sender) held for receivers that have not taken them yet.
    pub fn bytes(&self) -> usize {
        self.shared.state.lock().expect("ring lock").bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The wake-up of a message sent with [`Sender::send_deferred`]; given when dropped.
#[must_use = "dropping it wakes the receivers at once"]
pub struct Wake<T> {
    shared: Option<Arc<Shared<T>>>,
}

impl<T> Wake<T> {
    /// Wakes the receivers waiting for the message.
    pub fn wake(mut self) {
        if let Some(shared) = self.shared.take() {
            shared.notify.notify_waiters();
        }
    }
}

impl<T> Drop for Wake<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.notify.notify_waiters();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.state.lock().expect("ring lock").senders -= 1;
        self.shared.notify.notify_waiters();
    }
}

impl<T: Clone> Receiver<T> {
    /// The next message without waiting.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut st = self.shared.state.lock().expect("ring lock");
        if self.next < st.first {
            let missed = st.first - self.next;
            self.next = st.first;
            return Err(TryRecvError::Lagged(missed));
        }
        let i = (self.next - st.first) as usize;
        if i < st.slots.len() {
            let slot = &mut st.slots[i];
            slot.unread -= 1;
            let value = slot.value.clone();
            self.next += 1;
            st.trim();
            Ok(value)
        } else if st.senders == 0 {
            Err(TryRecvError::Closed)
        } else {
            Err(TryRecvError::Empty)
        }
    }

    /// The next message, waiting for one; `Lagged(n)` if `n` were dropped before this
    /// receiver took them (the next call returns the oldest one still held).
    pub async fn recv(&mut self) -> Result<T, RecvError> {
        loop {
            // Registered before looking, so a send between the look and the wait still wakes us.
            let shared = self.shared.clone();
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_recv() {
                Ok(v) => return Ok(v),
                Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => return Err(RecvError::Closed),
                Err(TryRecvError::Empty) => notified.await,
            }
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().expect("ring lock");
        st.receivers -= 1;
        let from = self.next.saturating_sub(st.first) as usize;
        for slot in st.slots.iter_mut().skip(from) {
            slot.unread -= 1;
        }
        st.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_receiver_gets_every_message_in_order() {
        let (tx, mut a) = channel::<u32>(8);
        let mut b = tx.subscribe();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        for i in 0..5 {
            assert_eq!(a.recv().await.unwrap(), i);
        }
        assert_eq!(tx.len(), 5, "b has not taken them yet");
        for i in 0..5 {
            assert_eq!(b.recv().await.unwrap(), i);
        }
        assert_eq!(tx.len(), 0, "taken by everyone: freed");
        assert!(matches!(a.try_recv(), Err(TryRecvError::Empty)));
    }

    #[tokio::test]
    async fn a_late_receiver_starts_at_the_tail_and_a_dropped_one_frees_its_messages() {
        let (tx, a) = channel::<u32>(8);
        tx.send(1).unwrap();
        let mut late = tx.subscribe();
        tx.send(2).unwrap();
        assert_eq!(late.recv().await.unwrap(), 2);
        assert_eq!(tx.len(), 2);
        drop(a);
        assert_eq!(tx.len(), 0);
        assert_eq!(tx.receiver_count(), 1);
    }

    #[tokio::test]
    async fn a_receiver_capacity_behind_is_told_how_many_it_missed() {
        let (tx, mut rx) = channel::<u32>(4);
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        assert_eq!(tx.len(), 4);
        assert!(matches!(rx.recv().await, Err(RecvError::Lagged(6))));
        for i in 6..10 {
            assert_eq!(rx.recv().await.unwrap(), i);
        }
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_send_and_on_close() {
        let (tx, mut rx) = channel::<u32>(4);
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
        drop(tx);
        let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(first.unwrap(), 7);
        assert!(matches!(second, Err(RecvError::Closed)));
    }

    #[tokio::test]
    async fn a_stalled_receiver_pins_at_most_the_byte_bound_and_then_lags() {
        let (tx, mut stalled) = bounded::<u32>(1024, 100);
        let mut reader = tx.subscribe();
        for i in 0..50 {
            tx.send_sized(i, 30).unwrap();
            assert_eq!(
                reader.recv().await.unwrap(),
                i,
                "a reader that keeps up gets all"
            );
            assert!(tx.bytes() <= 100, "held {} bytes", tx.bytes());
        }
        assert_eq!(tx.len(), 3, "three 30-byte messages fit in 100 bytes");
        assert!(matches!(stalled.recv().await, Err(RecvError::Lagged(47))));
        for i in 47..50 {
            assert_eq!(stalled.recv().await.unwrap(), i);
        }
        assert_eq!(tx.bytes(), 0, "taken by everyone: freed");
    }

    #[tokio::test]
    async fn a_message_over_the_byte_bound_is_still_delivered() {
        let (tx, mut rx) = bounded::<u32>(16, 10);
        tx.send_sized(1, 5).unwrap();
        tx.send_sized(2, 50).unwrap();
        assert_eq!(tx.len(), 1, "only the newest is kept");
        assert!(matches!(rx.recv().await, Err(RecvError::Lagged(1))));
        assert_eq!(rx.recv().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_deferred_send_is_there_at_once_and_wakes_a_waiter_when_told() {
        let (tx, mut rx) = channel::<u32>(4);
        let mut waiting = tx.subscribe();
        let waiter = tokio::spawn(async move { waiting.recv().await });
        tokio::task::yield_now().await;
        let wake = tx.send_deferred(1, 0).unwrap();
        assert_eq!(rx.try_recv().unwrap(), 1, "queued before the wake-up");
        wake.wake();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got.unwrap(), 1);
    }

    #[test]
    fn sending_without_receivers_fails() {
        let (tx, rx) = channel::<u32>(4);
        drop(rx);
        assert_eq!(tx.send(1), Err(1));
    }
}
