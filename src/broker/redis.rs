//! Redis broker: the shared, capped event stream and counters of a namespace, reached
//! through a `deadpool-redis` pool and the `eventfabric` Function library.
//!
//! Failure assumptions: Redis may vanish or restart empty at any time. Commands then fail
//! fast with [`Error::Unavailable`] (never a success for an event that was not stored);
//! when Redis comes back without the library, it is loaded again on first use.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};
use serde_json::value::RawValue;

use super::history::HistoryRing;
use super::keys::Keys;
use super::{Error, Replay};
use crate::event::{self, EventId, unix_ms};
use crate::hub::Frame;
use crate::sse;

/// The Function library, loaded into Redis by every replica.
pub const FUNCTION_LIBRARY: &str = include_str!("functions.lua");

/// Version the library above declares; an older loaded library is replaced.
const LIBRARY_VERSION: i64 = 1;

/// How long a command may wait for a pooled connection or a new one.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one Redis command may take before the caller is told Redis is unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a replica counts as alive after its last heartbeat.
pub const REPLICA_TTL: Duration = Duration::from_secs(10);

/// A readiness canary older than this means the subscription is not delivering.
pub const CANARY_STALE: Duration = Duration::from_secs(3);

/// Connection settings of a Redis broker.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// Key namespace.
    pub namespace: String,
    /// Events kept in the stream (approximately: Redis trims whole nodes).
    pub history: u64,
    /// Largest accepted event.
    pub max_event_bytes: u64,
}

/// Shared state of the subscription, read by `/readyz`.
#[derive(Debug, Default)]
pub struct SubscriptionStatus {
    subscribed: AtomicBool,
    last_canary_ms: AtomicU64,
}

impl SubscriptionStatus {
    /// Records whether the pub/sub connection is subscribed.
    pub fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Relaxed);
    }

    /// Records that this replica's canary came back through its subscription.
    pub fn canary_seen(&self) {
        self.last_canary_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the canary was last seen.
    pub fn canary_age_ms(&self) -> u64 {
        unix_ms().saturating_sub(self.last_canary_ms.load(Ordering::Relaxed))
    }

    /// Subscribed, and the canary came back recently.
    pub fn is_live(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
            && self.canary_age_ms() < CANARY_STALE.as_millis() as u64
    }
}

/// Figures for `GET /api/events/stats`, summed over the live replicas of a namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Events stored since the namespace began.
    pub total_events: u64,
    /// The same, by type.
    pub events_by_type: BTreeMap<String, u64>,
    /// Live replicas: id, clients, last heartbeat (Redis clock, ms).
    pub replicas: Vec<(String, u64, u64)>,
}

/// `eventfabric_stats` reply: Redis time, counter fields, replica fields.
type StatsReply = (i64, Vec<(String, u64)>, Vec<(String, String)>);

/// Handle to a namespace in Redis.
#[derive(Debug)]
pub struct RedisBroker {
    client: redis::Client,
    pool: deadpool_redis::Pool,
    keys: Keys,
    settings: RedisSettings,
    /// Health of this replica's subscription.
    pub status: Arc<SubscriptionStatus>,
    /// Events this replica's subscription delivered, gap-free: resumes that fall inside it
    /// (the usual case, even for a storm of clients moving from a dead replica) are
    /// answered from memory instead of Redis.
    recent: Mutex<HistoryRing>,
}

impl RedisBroker {
    /// Prepares a broker; no connection is made until it is used, so a gateway starts
    /// even while Redis is down.
    pub fn new(settings: RedisSettings) -> Result<Self, Error> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| Error::Rejected(format!("invalid Redis URL: {e}")))?;
        let mut config = deadpool_redis::Config::from_url(settings.url.clone());
        let mut pool_config = deadpool_redis::PoolConfig::new(16);
        pool_config.timeouts = deadpool_redis::Timeouts {
            wait: Some(POOL_TIMEOUT),
            create: Some(POOL_TIMEOUT),
            recycle: Some(POOL_TIMEOUT),
        };
        config.pool = Some(pool_config);
        let pool = config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| Error::Rejected(format!("cannot create the Redis pool: {e}")))?;
        Ok(Self {
            client,
            pool,
            keys: Keys::new(&settings.namespace),
            recent: Mutex::new(HistoryRing::new(
                usize::try_from(settings.history).unwrap_or(usize::MAX),
            )),
            settings,
            status: Arc::new(SubscriptionStatus::default()),
        })
    }

    /// Key and channel names of this namespace.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The client used for the dedicated pub/sub connection.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, Error> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Unavailable(format!("no Redis connection: {e}")))
    }

    /// Loads the Function library unless an equal or newer version is there, and records
    /// this replica's history and size settings for it.
    pub async fn prepare(&self) -> Result<(), Error> {
        let mut conn = self.connection().await?;
        let loaded: Result<i64, Error> = bounded(
            redis::cmd("FCALL_RO")
                .arg("eventfabric_version")
                .arg(0)
                .query_async(&mut *conn),
        )
        .await;
        if let Err(Error::Unavailable(why)) = loaded {
            return Err(Error::Unavailable(why));
        }
        if !matches!(loaded, Ok(v) if v >= LIBRARY_VERSION) {
            load_library(&mut conn).await?;
        }
        let _: () = bounded(
            redis::cmd("HSET")
                .arg(&self.keys.config)
                .arg("history")
                .arg(self.settings.history)
                .arg("max_event_bytes")
                .arg(self.settings.max_event_bytes)
                .query_async(&mut *conn),
        )
        .await?;
        Ok(())
    }

    /// Stores, counts and publishes an event in one atomic call; returns its id. A retry
    /// with the same `idempotency_key` within ten minutes returns the first id instead of
    /// storing the event again.
    pub async fn publish(
        &self,
        event_type: &str,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<EventId, Error> {
        let mut call = self.library_call("FCALL", "eventfabric_publish");
        call.arg(event_type)
            .arg(data.get())
            .arg(idempotency_key.unwrap_or(""));
        let id: String = self.call_with_library(&call).await?;
        id.parse()
            .map_err(|_| Error::Rejected(format!("Redis returned an unexpected id {id:?}")))
    }

    /// Records an event the subscription delivered, in id order.
    pub fn remember(&self, frame: &Arc<Frame>) {
        self.recent().push(frame);
    }

    /// Forgets the delivered events: there is a gap after them that cannot be filled.
    pub fn forget_recent(&self) {
        self.recent().clear();
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, HistoryRing> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stored events after `after`, at most `limit`, encoded as frames: from this
    /// replica's memory when it holds everything after `after`, else from the stream.
    pub async fn replay(&self, after: EventId, limit: usize) -> Result<Replay, Error> {
        {
            let recent = self.recent();
            if recent.covers(after) {
                let slice = recent.after(after, limit);
                return Ok(Replay {
                    frames: slice.frames,
                    truncated: false,
                    more: slice.more,
                });
            }
        }
        self.replay_from_stream(after, limit).await
    }

    /// Stored events after `after`, read from the stream in Redis.
    pub async fn replay_from_stream(&self, after: EventId, limit: usize) -> Result<Replay, Error> {
        let mut call = self.library_call("FCALL_RO", "eventfabric_replay");
        call.arg(after.to_string()).arg(limit);
        let (truncated, entries): (i64, Vec<(String, Vec<String>)>) =
            self.call_with_library(&call).await?;
        let more = entries.len() >= limit;
        let frames = entries
            .into_iter()
            .filter_map(|(id, fields)| stored_frame(&id, &fields))
            .collect();
        Ok(Replay {
            frames,
            truncated: truncated == 1,
            more,
        })
    }

    /// The id of the newest stored event, if any.
    pub async fn newest_id(&self) -> Result<Option<EventId>, Error> {
        let mut conn = self.connection().await?;
        let newest: Vec<(String, Vec<String>)> = bounded(
            redis::cmd("XREVRANGE")
                .arg(&self.keys.stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut *conn),
        )
        .await?;
        Ok(newest.first().and_then(|(id, _)| id.parse().ok()))
    }

    /// Publishes this replica's readiness canary.
    pub async fn send_canary(&self, channel: &str) -> Result<(), Error> {
        let mut conn = self.connection().await?;
        let _: i64 = bounded(
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(unix_ms())
                .query_async(&mut *conn),
        )
        .await?;
        Ok(())
    }

    /// Records that `replica_id` is alive with `clients` clients.
    pub async fn heartbeat(&self, replica_id: &str, clients: usize) -> Result<(), Error> {
        let mut call = self.library_call("FCALL", "eventfabric_heartbeat");
        call.arg(replica_id)
            .arg(clients)
            .arg(REPLICA_TTL.as_millis() as u64);
        let _: i64 = self.call_with_library(&call).await?;
        Ok(())
    }

    /// Removes `replica_id` from the cluster stats at once (graceful shutdown).
    pub async fn leave(&self, replica_id: &str) -> Result<(), Error> {
        let mut call = self.library_call("FCALL", "eventfabric_leave");
        call.arg(replica_id);
        let _: i64 = self.call_with_library(&call).await?;
        Ok(())
    }

    /// Counters and live replicas of the namespace.
    pub async fn cluster_stats(&self) -> Result<ClusterStats, Error> {
        let call = self.library_call("FCALL", "eventfabric_stats");
        let reply: StatsReply = self.call_with_library(&call).await?;
        let (_now, counters, replicas) = reply;
        let mut stats = ClusterStats::default();
        for (field, count) in counters {
            if field == "total" {
                stats.total_events = count;
            } else if let Some(event_type) = field.strip_prefix("type:") {
                stats.events_by_type.insert(event_type.to_owned(), count);
            }
        }
        for (id, value) in replicas {
            let (clients, seen) = value.split_once(':').unwrap_or((&value, "0"));
            stats
                .replicas
                .push((id, clients.parse().unwrap_or(0), seen.parse().unwrap_or(0)));
        }
        Ok(stats)
    }

    /// `<command> <function> 1 {ns}:stream`: a call into the library on this namespace,
    /// to which the caller appends the function's arguments.
    fn library_call(&self, command: &str, function: &str) -> redis::Cmd {
        let mut call = redis::cmd(command);
        call.arg(function).arg(1).arg(&self.keys.stream);
        call
    }

    /// Runs a library call, loading the library first if Redis lost it (a restart
    /// without persistence does that).
    async fn call_with_library<T: redis::FromRedisValue>(
        &self,
        call: &redis::Cmd,
    ) -> Result<T, Error> {
        let mut conn = self.connection().await?;
        let conn = &mut conn;
        match bounded(call.query_async(&mut **conn)).await {
            Err(Error::Rejected(detail)) if detail.contains("Function not found") => {
                tracing::info!("function library missing in Redis; loading it");
                load_library(conn).await?;
                bounded(call.query_async(&mut **conn)).await
            }
            other => other,
        }
    }
}

/// Runs one Redis command with a deadline. A command that times out may still have run
/// (the caller learns `Unavailable` and may retry, safely with an idempotency key).
async fn bounded<T>(
    command: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, Error> {
    match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
        Ok(result) => result.map_err(classify),
        Err(_) => Err(Error::Unavailable(
            "Redis did not answer in time".to_owned(),
        )),
    }
}

async fn load_library(conn: &mut deadpool_redis::Connection) -> Result<(), Error> {
    let _: String = bounded(
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(FUNCTION_LIBRARY)
            .query_async(&mut **conn),
    )
    .await?;
    Ok(())
}

/// Builds the frame of a stored stream entry (`type` and `data` fields).
fn stored_frame(id: &str, fields: &[String]) -> Option<Arc<Frame>> {
    let id: EventId = id.parse().ok()?;
    let mut event_type = None;
    let mut data = None;
    for pair in fields.chunks_exact(2) {
        match pair[0].as_str() {
            "type" => event_type = Some(pair[1].as_str()),
            "data" => data = Some(pair[1].as_str()),
            _ => {}
        }
    }
    let event_type = event_type?;
    let data = RawValue::from_string(data.unwrap_or("null").to_owned()).ok()?;
    event::validate_type(event_type).ok()?;
    let json = event::envelope_json(event_type, &data, Some(id), id.ms);
    Some(Frame::event(
        Some(id),
        event_type,
        sse::message(Some(id), &json),
    ))
}

/// Server replies to a bad request are rejections; everything else means Redis is not
/// reachable as it should be.
fn classify(error: RedisError) -> Error {
    match error.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError) => {
            Error::Rejected(error.detail().unwrap_or("rejected by Redis").to_owned())
        }
        _ => Error::Unavailable(error.to_string()),
    }
}
