//! The SSE stream: what a client asked for, the per-client session that turns the hub's
//! frames and the broker's history into batches of bytes, the response contract, and the
//! two writers that put those bytes on a socket.
//!
//! Most streams are served on the raw socket once the request head is read (see
//! `server.rs` and `raw.rs`): no HTTP library buffers stay allocated for the connection's
//! life, which keeps an idle client near 1–2 KB. A stream request that arrives on a
//! keep-alive connection already owned by hyper is served through axum instead
//! (`via_hyper.rs`). Both admit, answer and say goodbye through `contract.rs` and run the
//! same [`Session`], so they cannot drift apart.

mod contract;
mod params;
mod raw;
mod session;
#[cfg(test)]
mod tests;
mod via_hyper;

pub(crate) use contract::raw_preamble;
pub(crate) use params::StreamParams;
pub(crate) use raw::serve_raw;
pub(crate) use session::Session;
pub(crate) use via_hyper::{ConnectionKill, stream_events};
