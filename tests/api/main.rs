//! Integration tests: a real server, real sockets, real PostgreSQL (one database per test).

mod auth;
mod cluster;
mod conformance;
mod console;
mod embedded;
mod helpers;
mod hostile;
mod inputs;
mod limits;
mod log;
mod log_stress;
mod nodes;
mod openapi;
mod ops;
mod outage;
mod props;
mod replay;
mod retention;
mod shutdown;
mod sse;
mod sse_stress;
mod wire;
mod ws;
mod ws_auth;
mod ws_client;
