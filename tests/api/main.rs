//! Integration tests: a real server, real sockets, real PostgreSQL (one database per test).

mod cluster;
mod helpers;
mod log;
mod replay;
mod nodes;
mod openapi;
mod sse;
mod wire;
