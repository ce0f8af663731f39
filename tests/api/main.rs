//! Integration tests: a real server, real sockets, real PostgreSQL (one database per test).

mod auth;
mod helpers;
mod hostile;
mod inputs;
mod limits;
mod log;
mod props;
mod sse;
mod ws;
mod ws_auth;
mod ws_client;
