//! Integration tests: a real server, real sockets, a real database of the test's own. Each
//! `#[backend_test]` runs on both event-log backends, as `name::postgres` (a fresh PostgreSQL
//! database) and `name::sqlite` (a fresh SQLite file): `cargo test sqlite` picks one.

mod auth;
mod authorship;
mod backend;
mod cluster;
mod compact;
mod conformance;
mod console;
mod crash;
mod durability;
mod durable;
mod embedded;
mod frozen;
mod helpers;
mod hostile;
mod inputs;
mod leases;
mod limits;
mod log;
mod log_stress;
mod node_process;
mod nodes;
mod openapi;
mod operator;
mod ops;
mod outage;
mod pgcluster;
mod presence;
mod props;
mod readme;
mod replay;
mod replicas;
mod retention;
mod shutdown;
mod sql_append;
mod sse;
mod sse_stress;
mod stalled;
mod startup;
mod ui_stream;
mod webhooks;
mod wire;
mod ws;
mod ws_auth;
mod ws_client;
