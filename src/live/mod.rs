//! Fan-out: the per-process `hub`, shared wire `frame`s, the `subscription` that joins
//! catch-up from the log with the live tail, `compact`, the compacted catch-up (whole messages
//! instead of every token), and `notify`, the cross-node wake-ups.

pub mod compact;
pub mod expiry;
pub mod frame;
pub mod hub;
pub mod notify;
pub mod ring;
pub mod subscription;

pub use compact::Compaction;
pub use frame::Frame;
pub use hub::Hub;
pub use subscription::{Filter, Item, Notice, Opened, Source, Start, Subscription};
