//! A byte budget shared by several subscriptions: what one client connection may hold in
//! catch-up pages read from the log and not yet sent, however many subscriptions it has.
//!
//! A subscription takes a share before it reads a page (waiting while others hold it all),
//! keeps what the page really holds, and gives that back once the page is handed on. Waiting
//! rather than failing keeps "every event, in order": a subscription that cannot read yet
//! simply reads later, while the others' pages drain.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// A pool of bytes; clones share it.
#[derive(Clone, Debug)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Share {
    bytes: Arc<Semaphore>,
    n: usize,
}

impl Budget {
    /// A pool of `total` bytes (at least 1; at most what a semaphore counts).
    pub fn new(total: usize) -> Budget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Budget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes nobody holds now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Takes `n` bytes (at most the whole budget), waiting until they are free. Cancel-safe:
    /// a cancelled wait takes nothing.
    pub async fn take(&self, n: usize) -> Share {
        let n = n.clamp(1, self.total);
        let permits = self
            .bytes
            .acquire_many(n as u32)
            .await
            .expect("a budget's semaphore is never closed");
        permits.forget();
        Share {
            bytes: self.bytes.clone(),
            n,
        }
    }
}

impl Share {
    /// Gives back all but `keep` bytes (never more than it holds).
    pub fn shrink_to(&mut self, keep: usize) {
        let keep = keep.min(self.n);
        self.bytes.add_permits(self.n - keep);
        self.n = keep;
    }

    pub fn bytes(&self) -> usize {
        self.n
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.bytes.add_permits(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shares_come_back_when_dropped_or_shrunk() {
        let budget = Budget::new(100);
        let mut a = budget.take(60).await;
        assert_eq!(budget.available(), 40);
        a.shrink_to(10);
        assert_eq!((a.bytes(), budget.available()), (10, 90));
        a.shrink_to(50);
        assert_eq!(a.bytes(), 10, "shrinking never grows a share");
        drop(a);
        assert_eq!(budget.available(), 100);
    }

    #[tokio::test]
    async fn a_share_larger_than_the_budget_takes_all_of_it() {
        let budget = Budget::new(100);
        let all = budget.take(1 << 30).await;
        assert_eq!((all.bytes(), budget.available()), (100, 0));
    }

    #[tokio::test]
    async fn a_take_waits_for_bytes_to_come_back() {
        let budget = Budget::new(100);
        let held = budget.take(80).await;
        let waiting = budget.take(50);
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(held);
        let got = waiting.await;
        assert_eq!((got.bytes(), budget.available()), (50, 50));
    }
}
