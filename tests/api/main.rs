//! Integration tests: a real server, real sockets, real PostgreSQL (one database per test).

mod cluster;
mod helpers;
mod log;
mod nodes;
mod ops;
mod outage;
mod retention;
mod shutdown;
mod sse;
