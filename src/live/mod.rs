//! Fan-out: the per-process `hub`, shared wire `frame`s, the `subscription` that joins
//! catch-up from the log with the live tail, and `notify`, the cross-node wake-ups.

pub mod expiry;
pub mod frame;
pub mod hub;
pub mod leases;
pub mod notify;
pub mod ring;
pub mod subscription;

pub use frame::Frame;
pub use hub::Hub;
pub use subscription::{Filter, Item, Notice, Opened, Source, Start, Subscription};
