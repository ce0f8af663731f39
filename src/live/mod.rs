//! Fan-out: the per-process `hub`, shared wire `frame`s, the `subscription` that joins
//! catch-up from the log with the live tail, `compact`, the compacted catch-up (whole messages
//! instead of every token), `notify`, the cross-node wake-ups, and `presence`, who follows
//! each stream (`presence_sync` across nodes).

pub mod compact;
pub mod expiry;
pub mod frame;
pub mod hub;
pub mod leases;
pub mod notify;
pub mod presence;
pub mod presence_sync;
pub mod ring;
pub mod subscription;

pub use compact::Compaction;
pub use frame::Frame;
pub use hub::Hub;
pub use subscription::{Filter, Item, Notice, Opened, Source, Start, Subscription};
