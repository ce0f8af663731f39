//! Integration tests: a real server, real sockets, real PostgreSQL (one database per test).

mod cluster;
mod helpers;
mod inputs;
mod log;
mod log_stress;
mod nodes;
mod openapi;
mod ops;
mod outage;
mod replay;
mod retention;
mod shutdown;
mod sse;
mod sse_stress;
mod wire;
mod ws;
mod ws_client;
