//! The broker seam: where events are stored for resume and how they reach the hub.
//!
//! Two backends sit behind one facade: the in-process broker keeps history in this process
//! (the single-replica mode used when no Redis is configured), and the Redis broker shares
//! one stream among all replicas. Both hand out ids of the form `<ms>-<seq>`, answer "what
//! came after id X", and hand every event to the hub through the same [`Delivery`] path,
//! so clients resume and receive the same way whichever one runs.
//!
//! Data flows one way: producer → backend → `Delivery` (ring of recent events, then the
//! hub) → clients. Nothing downstream writes back into a backend.

mod canary;
mod delivery;
pub(crate) mod history;
pub(crate) mod keys;
#[cfg(test)]
mod lua_in_step;
mod memory;
pub(crate) mod redis;
mod reporter;
mod subscriber;
mod target;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use delivery::Delivery;
pub(crate) use redis::RedisSettings;
pub(crate) use target::{RedisTarget, TlsFiles};

use crate::event::EventId;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::sse::Frame;
use canary::Canary;
use memory::MemoryBroker;
use redis::RedisBroker;
use reporter::StatsReporter;
use subscriber::Subscriber;

/// How much history one replay step reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Page {
    /// Most events.
    pub events: usize,
    /// Most bytes of events, except that a page always holds at least one event.
    pub bytes: usize,
}

impl Page {
    /// A page bounded by its number of events alone.
    #[cfg(test)]
    pub fn events(events: usize) -> Self {
        Self {
            events,
            bytes: usize::MAX,
        }
    }
}

/// One step of a replay: a client that does not read holds at most one such page (the
/// next is read only once its socket took this one), so a resume storm over large events
/// costs `clients x bytes`, not `clients x events x largest event`.
pub(crate) const REPLAY_PAGE: Page = Page {
    events: 500,
    bytes: 1024 * 1024,
};

/// How long an idempotency key is remembered (`IDEMPOTENCY_TTL_MS` in the function
/// library, too).
pub(crate) const IDEMPOTENCY_TTL_MS: u64 = 600_000;

/// Most idempotency keys remembered at once, by either backend; past it the oldest are
/// forgotten first, so a producer with a new key per event cannot grow memory without
/// bound (`MAX_IDEMPOTENCY_KEYS` in the function library, too).
pub(crate) const MAX_IDEMPOTENCY_KEYS: usize = 100_000;

/// Why the broker could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The backend cannot be reached right now; try again later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the request.
    #[error("broker rejected the request: {0}")]
    Rejected(String),
    /// The backend refused the event itself as invalid (the Redis function's
    /// "ERR invalid event: ...");
    /// the producer's mistake, so retrying cannot help. The text says what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The event was stored as `id`, but fewer replicas than required confirmed it in
    /// time: it may survive a failover or not. A retry with the same idempotency key
    /// returns `id` if it did.
    #[error(
        "stored as {id}, but only {confirmed} of {wanted} replicas confirmed it in time; \
         it may still exist: retry with the same Idempotency-Key"
    )]
    NotReplicated {
        /// The id the primary gave it.
        id: EventId,
        /// Replicas that confirmed.
        confirmed: i64,
        /// Replicas required (`--publish-min-replicas`).
        wanted: u32,
    },
}

/// One step of a history replay.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// Retained events after the requested id, oldest first.
    pub frames: Vec<Arc<Frame>>,
    /// Some events after the requested id are no longer retained, or the id is not one
    /// this fabric issued: the client cannot be brought up to date.
    pub truncated: bool,
    /// The id is not one the backend issued (newer than any, or the backend lost its
    /// history): a client sent it, or the backend went back in time.
    pub unknown_id: bool,
    /// Where the next step starts when more events may follow. It is the id of the last
    /// entry read, which need not be the last frame's: an entry that cannot be decoded is
    /// skipped, and the replay goes on past it.
    pub next: Option<EventId>,
}

/// Client and event counts of a whole fabric: every live replica of a namespace with
/// Redis, this one replica without. Serialises as the shared part of
/// `GET /api/events/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStats {
    /// Clients connected, summed over the live replicas.
    pub active_clients: u64,
    /// Events stored since the namespace (or this process) began.
    #[serde(rename = "total_events_broadcast")]
    pub total_events: u64,
    /// The same, by type.
    pub events_by_type: BTreeMap<String, u64>,
    /// The live replicas.
    pub replicas: Vec<ReplicaStats>,
}

/// One live replica in [`ClusterStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplicaStats {
    /// The replica's id.
    pub id: String,
    /// Its connected clients.
    pub active_clients: u64,
    /// When it last reported, in Unix ms (Redis's clock with Redis).
    pub last_seen_ms: u64,
}

/// The backend in use, with the delivery path both backends feed; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
    replica_id: Arc<str>,
}

#[derive(Debug)]
enum Backend {
    /// In-process history, single replica.
    Memory(MemoryBroker),
    /// Shared stream in Redis, any number of replicas.
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// An in-process broker keeping `history` events, delivering into `hub`.
    pub fn memory(history: u64, hub: Hub, metrics: Arc<Metrics>, replica_id: Arc<str>) -> Self {
        let delivery = Arc::new(Delivery::new(ring_capacity(history), hub));
        let backend = Backend::Memory(MemoryBroker::new(Arc::clone(&delivery)));
        Self::with_backend(backend, delivery, metrics, replica_id)
    }

    /// A Redis broker for `settings`, delivering into `hub`. Connects on first use, so a
    /// gateway starts even while Redis is down.
    pub fn redis(
        settings: RedisSettings,
        hub: Hub,
        metrics: Arc<Metrics>,
        replica_id: Arc<str>,
    ) -> Result<Self, Error> {
        let delivery = Arc::new(Delivery::new(ring_capacity(settings.history), hub));
        let redis = RedisBroker::new(settings, Arc::clone(&delivery), Arc::clone(&metrics))?;
        let backend = Backend::Redis(Arc::new(redis));
        Ok(Self::with_backend(backend, delivery, metrics, replica_id))
    }

    fn with_backend(
        backend: Backend,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
        replica_id: Arc<str>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                delivery,
                metrics,
                replica_id,
            }),
        }
    }

    /// Starts the backend's background tasks on `tracker` (with Redis: the subscriber, the
    /// readiness canary and the stats reporter); they stop when `shutdown` fires.
    pub fn start(&self, tracker: &TaskTracker, shutdown: &CancellationToken) {
        let Backend::Redis(redis) = &self.inner.backend else {
            return;
        };
        let replica_id = Arc::clone(&self.inner.replica_id);
        let subscriber = Subscriber {
            broker: Arc::clone(redis),
            metrics: Arc::clone(&self.inner.metrics),
            replica_id: Arc::clone(&replica_id),
        };
        let canary = Canary {
            broker: Arc::clone(redis),
            replica_id: Arc::clone(&replica_id),
        };
        let reporter = StatsReporter {
            broker: Arc::clone(redis),
            hub: self.inner.delivery.hub().clone(),
            replica_id,
        };
        tracker.spawn(subscriber.run(shutdown.clone()));
        tracker.spawn(canary.run(shutdown.clone()));
        tracker.spawn(reporter.run(shutdown.clone()));
    }

    /// Stores an event and delivers it; returns its id. `event_type` must be valid. A
    /// retry carrying the same `idempotency_key` within ten minutes returns the first id
    /// and stores nothing.
    pub async fn publish(
        &self,
        event_type: &str,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<EventId, Error> {
        match &self.inner.backend {
            Backend::Memory(broker) => Ok(broker.publish(event_type, data, idempotency_key)),
            Backend::Redis(broker) => broker.publish(event_type, data, idempotency_key).await,
        }
    }

    /// Retained events after `after`, as many as fit in `page`. `truncated` is asked for
    /// only with `check` (a reader's first page); without it, it may be left false.
    pub async fn replay(&self, after: EventId, page: Page, check: bool) -> Result<Replay, Error> {
        match &self.inner.backend {
            Backend::Memory(broker) => Ok(broker.replay(after, page)),
            Backend::Redis(broker) => broker.replay(after, page, check).await,
        }
    }

    /// Client and event counts of the whole fabric.
    pub async fn cluster_stats(&self) -> Result<ClusterStats, Error> {
        match &self.inner.backend {
            Backend::Memory(_) => Ok(self.local_stats()),
            Backend::Redis(broker) => broker.cluster_stats().await,
        }
    }

    /// This replica's own client and event counts, in the shape of the fabric's.
    pub fn local_stats(&self) -> ClusterStats {
        let clients = self.inner.delivery.hub().client_count() as u64;
        ClusterStats {
            active_clients: clients,
            total_events: self.inner.metrics.events_received.get(),
            events_by_type: self.inner.metrics.events_by_type(),
            replicas: vec![ReplicaStats {
                id: self.inner.replica_id.to_string(),
                active_clients: clients,
                last_seen_ms: crate::event::unix_ms(),
            }],
        }
    }

    /// Whether the backend can take publishes and deliver events right now.
    pub fn is_ready(&self) -> bool {
        match &self.inner.backend {
            Backend::Memory(_) => true,
            Backend::Redis(broker) => broker.status.is_live(),
        }
    }

    /// Short name for logs and stats.
    pub fn kind(&self) -> &'static str {
        match &self.inner.backend {
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
        }
    }
}

/// Events a ring of recent events holds for a history of `history` events.
fn ring_capacity(history: u64) -> usize {
    usize::try_from(history).unwrap_or(usize::MAX)
}
