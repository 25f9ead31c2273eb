//! The SSE stream: what a client asked for, the per-client session that turns the hub's
//! frames and the broker's history into batches of bytes, and the two ways those bytes
//! reach a socket.
//!
//! Most streams are served on the raw socket once the request head is read (see
//! `server.rs`): no HTTP library buffers stay allocated for the connection's life, which
//! keeps an idle client near 1–2 KB. A stream request that arrives on a keep-alive
//! connection already owned by hyper is served through axum instead (`http/events.rs`),
//! with the same session logic.

mod params;
mod raw;
mod session;

pub use crate::hub::End;
pub use params::StreamParams;
pub use raw::{serve_raw, spread_retry, stream_preamble};
pub use session::Session;
