//! Integration tests: a real server, real sockets, real PostgreSQL (one database per test).

mod helpers;
mod log;
mod log_stress;
mod replay;
mod sse;
mod sse_stress;
mod wire;
