//! The broker seam: where events are stored for resume and how they reach the hub.
//!
//! Two backends sit behind one facade: [`MemoryBroker`] keeps history in this process (the
//! single-replica mode used when no Redis is configured), and the Redis broker shares one
//! stream among all replicas. Both hand out ids of the form `<ms>-<seq>` and answer
//! "what came after id X", so clients resume the same way whichever one runs.

pub mod history;
pub mod keys;
mod memory;
pub mod redis;
pub mod subscriber;

use std::sync::Arc;

use serde_json::value::RawValue;

pub use memory::MemoryBroker;
pub use redis::{ClusterStats, RedisBroker, RedisSettings};

use crate::event::EventId;
use crate::hub::Frame;

/// Largest number of events fetched from history in one step of a replay.
pub const REPLAY_PAGE: usize = 500;

/// Failures a caller can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The backend cannot be reached right now; try again later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the request.
    #[error("broker rejected the request: {0}")]
    Rejected(String),
}

/// One step of a history replay.
#[derive(Debug, Default)]
pub struct Replay {
    /// Retained events after the requested id, oldest first.
    pub frames: Vec<Arc<Frame>>,
    /// Some events after the requested id are no longer retained.
    pub truncated: bool,
    /// More events may follow the last one returned; ask again from its id.
    pub more: bool,
}

/// The backend in use; cheap to clone.
#[derive(Debug, Clone)]
pub enum Broker {
    /// In-process history, single replica.
    Memory(Arc<MemoryBroker>),
    /// Shared stream in Redis, any number of replicas.
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// Stores an event and fans it out; returns its id. `event_type` must be valid. A
    /// retry carrying the same `idempotency_key` within ten minutes returns the first id
    /// and stores nothing.
    pub async fn publish(
        &self,
        event_type: &str,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<EventId, Error> {
        match self {
            Self::Memory(broker) => Ok(broker.publish(event_type, data, idempotency_key)),
            Self::Redis(broker) => broker.publish(event_type, data, idempotency_key).await,
        }
    }

    /// Retained events after `after`, at most `limit` of them.
    pub async fn replay(&self, after: EventId, limit: usize) -> Result<Replay, Error> {
        match self {
            Self::Memory(broker) => Ok(broker.replay(after, limit)),
            Self::Redis(broker) => broker.replay(after, limit).await,
        }
    }

    /// Whether the backend can take publishes and deliver events right now.
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(broker) => broker.status.is_live(),
        }
    }

    /// Short name for logs and stats.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}
