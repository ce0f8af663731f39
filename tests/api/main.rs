//! Integration tests: a real server, real sockets, real PostgreSQL (one database per test).

mod console;
mod helpers;
mod inputs;
mod log;
mod sse;
mod ws;
mod ws_client;
