//! Black-box integration tests for the `eventfabric` binary.
//!
//! One test binary (`cargo test --test it`) with a module per area plus `harness/`, which
//! starts real processes: the gateway (`GatewayProc`) and, for the Redis tests, a
//! `redis-server` (`RedisProc`). Tests rely only on `docs/contract.md`.

#![allow(clippy::unwrap_used)]
#![allow(missing_docs)]

mod auth;
mod cluster;
mod deploy;
mod fabric;
mod harness;
mod hostile;
mod limits;
mod proxy;
mod sentinel;
mod single_replica;
mod tls;
mod whatwg;
