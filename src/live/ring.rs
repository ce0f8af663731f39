//! A broadcast channel whose buffer grows only as far as its slowest receiver lags.
//!
//! `tokio::sync::broadcast` allocates its whole capacity up front: at 1024 slots that is about
//! 40 KiB per stream with a subscriber, which dominated the memory of an idle connection (one
//! quiet stream each). Here a message is kept only until every receiver that was subscribed
//! when it was sent has taken it, and never more than `capacity` messages: an idle stream
//! holds no buffer at all, a busy one whose receivers keep up holds a few messages, and a
//! receiver that falls `capacity` messages behind gets `Lagged` (and reads the log), exactly
//! as with tokio's channel.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::Notify;

struct Slot<T> {
    value: T,
    /// Receivers that have not taken this message yet.
    unread: usize,
}

struct State<T> {
    slots: VecDeque<Slot<T>>,
    /// Position of `slots[0]`; positions count every message ever sent.
    first: u64,
    receivers: usize,
    senders: usize,
}

impl<T> State<T> {
    fn end(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    /// Drops messages from the front that every receiver has taken.
    fn trim(&mut self) {
        while self.slots.front().is_some_and(|s| s.unread == 0) {
            self.slots.pop_front();
            self.first += 1;
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
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            slots: VecDeque::new(),
            first: 0,
            receivers: 0,
            senders: 1,
        }),
        capacity: capacity.max(1),
        notify: Notify::new(),
    });
    let tx = Sender { shared };
    let rx = tx.subscribe();
    (tx, rx)
}

impl<T: Clone> Sender<T> {
    /// Sends to every current receiver; `Err(value)` if there is none.
    pub fn send(&self, value: T) -> Result<(), T> {
        let mut st = self.shared.state.lock().expect("ring lock");
        if st.receivers == 0 {
            return Err(value);
        }
        if st.slots.len() >= self.shared.capacity {
            // The slowest receiver is `capacity` behind: it will see `Lagged`.
            st.slots.pop_front();
            st.first += 1;
        }
        let unread = st.receivers;
        st.slots.push_back(Slot { value, unread });
        drop(st);
        self.shared.notify.notify_waiters();
        Ok(())
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    #[test]
    fn sending_without_receivers_fails() {
        let (tx, rx) = channel::<u32>(4);
        drop(rx);
        assert_eq!(tx.send(1), Err(1));
    }
}
