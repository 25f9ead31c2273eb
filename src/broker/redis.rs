//! Redis broker: the shared, capped event stream and counters of a namespace, reached
//! through a pool of connections (see `target.rs` for where they go) and the `eventfabric`
//! Function library.
//!
//! Failure assumptions: Redis may vanish or restart empty at any time. Commands then fail
//! fast with [`Error::Unavailable`] (never a success for an event that was not stored);
//! when Redis comes back without the library, it is loaded again on first use.
//!
//! On a cluster, the namespace's slot may move to a primary that never had the library (a
//! node added and resharded to). Every (re)subscription loads it on the slot's primary and
//! on every other primary that lacks it (that part may fail: a shard elsewhere in trouble
//! must not make this namespace unready), the readiness canary is sent through the library
//! (so `/readyz` is 200 only while the slot's primary has it), and a call that finds it
//! missing loads it and retries.
//! Every call names all the keys it touches (the declared form), so a slot in migration
//! answers with `ASK`, which redis-rs follows, instead of a non-local-key error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::cluster_routing::{
    AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo,
    SingleNodeRoutingInfo, SlotAddr,
};
use redis::{ErrorKind, RedisError, ServerErrorKind};
use serde_json::value::RawValue;

use super::delivery::Delivery;
use super::keys::{self, Keys};
use super::target::{Connection, Manager, Pool, Pooled, RedisTarget};
use super::{ClusterStats, Error, Page, Replay, ReplicaStats};
use crate::event::{self, EventId, unix_ms};
use crate::metrics::Metrics;
use crate::sse::Frame;
use crate::telemetry::RateLimit;

/// The Function library, loaded into Redis by every replica.
pub(crate) const FUNCTION_LIBRARY: &str = include_str!("functions.lua");

/// Version the library above declares (`VERSION` in it); an older loaded library is
/// replaced.
pub(crate) const LIBRARY_VERSION: i64 = 3;

/// How long a command may wait for a pooled connection or a new one.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long loading the library on every primary of a cluster may take, after the
/// namespace's own primary has it.
const EVERY_PRIMARY_TIMEOUT: Duration = Duration::from_secs(1);

/// How long one Redis command may take before the caller is told Redis is unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Client replays read from Redis at once. The pool has 16 connections: replays never take
/// more than these, so a resume storm leaves the rest to publishes and the subscriber, and
/// at most this many pages are being decoded at any moment. Further resumes wait their turn.
const REDIS_REPLAYS: usize = 4;

/// How long a replica counts as alive after its last heartbeat.
pub const REPLICA_TTL: Duration = Duration::from_secs(10);

/// A readiness canary older than this means the subscription is not delivering.
pub const CANARY_STALE: Duration = Duration::from_secs(3);

/// Connection settings of a Redis broker.
#[derive(Debug, Clone)]
pub(crate) struct RedisSettings {
    /// Where Redis is and how to log in.
    pub target: RedisTarget,
    /// Key namespace.
    pub namespace: String,
    /// Events kept in the stream (approximately: Redis trims whole nodes).
    pub history: u64,
    /// Largest accepted event.
    pub max_event_bytes: u64,
    /// Replicas that must confirm a publish (`WAIT`) before it is acknowledged; 0: none.
    pub min_replicas: u32,
    /// How long a publish waits for them.
    pub replica_timeout: Duration,
}

impl RedisSettings {
    /// The settings a gateway with `config` uses on `target`.
    pub fn from_config(target: RedisTarget, config: &crate::config::Config) -> Self {
        Self {
            target,
            namespace: config.namespace.clone(),
            history: config.history,
            max_event_bytes: config.max_event_bytes,
            min_replicas: config.publish_min_replicas,
            replica_timeout: Duration::from_millis(config.publish_replica_timeout_ms),
        }
    }
}

/// Shared state of the subscription, read by `/readyz`.
#[derive(Debug, Default)]
pub(crate) struct SubscriptionStatus {
    subscribed: AtomicBool,
    last_canary_ms: AtomicU64,
}

impl SubscriptionStatus {
    /// Records whether the pub/sub connection is subscribed. A subscription that ended
    /// forgets its canary: only one that came back through the next subscription counts.
    pub fn set_subscribed(&self, subscribed: bool) {
        if !subscribed {
            self.last_canary_ms.store(0, Ordering::Relaxed);
        }
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

/// `eventfabric_stats` reply: Redis time, counter fields, replica fields.
type StatsReply = (i64, Vec<(String, u64)>, Vec<(String, String)>);

/// Handle to a namespace in Redis.
#[derive(Debug)]
pub(crate) struct RedisBroker {
    target: RedisTarget,
    pool: Pool,
    keys: Keys,
    settings: RedisSettings,
    /// Health of this replica's subscription.
    pub status: Arc<SubscriptionStatus>,
    /// Where the subscription delivers. Its ring holds what was delivered, gap-free:
    /// resumes that fall inside it (the usual case, even for a storm of clients moving
    /// from a dead replica) are answered from memory instead of Redis.
    delivery: Arc<Delivery>,
    /// The budget of client replays served from Redis.
    replays: tokio::sync::Semaphore,
    /// Stream entries that cannot be turned into events are skipped and counted.
    bad_entries: BadEntries,
}

impl RedisBroker {
    /// Prepares a broker that delivers into `delivery`; no connection is made until it is
    /// used, so a gateway starts even while Redis is down.
    pub fn new(
        settings: RedisSettings,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let keys = Keys::new(&settings.namespace);
        let pool = Pool::builder(Manager::new(settings.target.clone(), keys.stream.clone())?)
            .max_size(16)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Rejected(format!("cannot create the Redis pool: {e}")))?;
        Ok(Self {
            target: settings.target.clone(),
            pool,
            keys,
            delivery,
            settings,
            status: Arc::new(SubscriptionStatus::default()),
            replays: tokio::sync::Semaphore::new(REDIS_REPLAYS),
            bad_entries: BadEntries {
                metrics,
                newest_seen: Mutex::new(None),
            },
        })
    }

    /// Key and channel names of this namespace.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Where Redis is.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    async fn connection(&self) -> Result<Pooled, Error> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Unavailable(format!("no Redis connection: {e}")))
    }

    /// Loads the Function library unless an equal or newer version is there (see
    /// [`ensure_library`]), and records this replica's history and size settings, and how
    /// the gateways listen, for it.
    pub async fn prepare(&self) -> Result<(), Error> {
        let mut conn = self.connection().await?;
        ensure_library(&mut conn, &self.keys.stream, false).await?;
        let _: () = bounded(
            redis::cmd("HSET")
                .arg(&self.keys.config)
                .arg("history")
                .arg(self.settings.history)
                .arg("max_event_bytes")
                .arg(self.settings.max_event_bytes)
                .arg("pubsub")
                .arg(if self.is_sharded() {
                    "sharded"
                } else {
                    "classic"
                })
                .query_async(&mut *conn),
        )
        .await?;
        Ok(())
    }

    /// Whether pub/sub is sharded (`SSUBSCRIBE`, `SPUBLISH`): on a cluster.
    pub fn is_sharded(&self) -> bool {
        self.target.is_cluster()
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
        let mut call = self.library_call("FCALL", "eventfabric_publish", keys::PUBLISH_KEYS);
        call.arg(event_type)
            .arg(data.get())
            .arg(idempotency_key.unwrap_or(""));
        let mut conn = self.connection().await?;
        let stored = self.call_on::<String>(&mut conn, &call).await;
        let id: EventId = match stored {
            Ok(id) => id
                .parse()
                .map_err(|_| Error::Rejected(format!("Redis returned an unexpected id {id:?}")))?,
            Err(error) => {
                self.forget_if_demoted(&error, conn);
                return Err(error);
            }
        };
        let wanted = self.settings.min_replicas;
        if wanted == 0 {
            return Ok(id);
        }
        // WAIT covers every write made on this connection so far, the event among them (on
        // a cluster: on the connection to the namespace's primary, which the cluster
        // connection shares among its clones).
        let timeout_ms = self.settings.replica_timeout.as_millis() as u64;
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted).arg(timeout_ms);
        let confirmed: i64 = match &mut *conn {
            Connection::Single(single) => bounded(wait.query_async(single)).await,
            Connection::Cluster(cluster) => {
                let primary = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(&self.keys.stream, SlotAddr::Master),
                ));
                bounded(cluster.route_command(wait, primary))
                    .await
                    .and_then(|v| {
                        redis::from_redis_value(v).map_err(|e| Error::Rejected(e.to_string()))
                    })
            }
        }
        .unwrap_or(0);
        if confirmed < i64::from(wanted) {
            return Err(Error::NotReplicated {
                id,
                confirmed,
                wanted,
            });
        }
        Ok(id)
    }

    /// Largest event this replica accepts.
    pub fn max_event_bytes(&self) -> u64 {
        self.settings.max_event_bytes
    }

    /// Where events received from Redis go.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Stored events after `after`, as many as fit in `page`, encoded as frames: from
    /// this replica's memory when it holds everything after `after`, else from the stream
    /// within the replay budget. Whether the reader can be brought up to date at all is
    /// asked only with `check` (a reader's first page; later pages follow on from it).
    pub async fn replay(&self, after: EventId, page: Page, check: bool) -> Result<Replay, Error> {
        let recent = self.delivery.with_recent(|recent| {
            recent.covers(after).then(|| {
                let slice = recent.after(after, page);
                Replay {
                    next: slice
                        .more
                        .then(|| slice.frames.last().and_then(|f| f.id))
                        .flatten(),
                    frames: slice.frames,
                    truncated: false,
                    unknown_id: false,
                }
            })
        });
        if let Some(replay) = recent {
            return Ok(replay);
        }
        let _turn = self
            .replays
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("the broker is shutting down".to_owned()))?;
        self.read_stream(after, None, page, check).await
    }

    /// Stored events after `after` (up to `until`, when given), read from the stream in
    /// Redis (no budget: the subscriber's own reads must not wait behind clients' replays).
    /// A page holds at most `page.bytes / max_event_bytes` entries, so it never holds more
    /// than `page.bytes` of events whatever their size.
    pub async fn read_stream(
        &self,
        after: EventId,
        until: Option<EventId>,
        page: Page,
        check: bool,
    ) -> Result<Replay, Error> {
        let fit = usize::try_from(self.settings.max_event_bytes.max(1))
            .map_or(1, |largest| page.bytes / largest);
        let count = fit.clamp(1, page.events.max(1));
        let mut range = redis::cmd("XRANGE");
        range
            .arg(&self.keys.stream)
            .arg(format!("({after}"))
            .arg(until.map_or_else(|| "+".to_owned(), |id| id.to_string()))
            .arg("COUNT")
            .arg(count);
        let entries: Vec<(String, Vec<Vec<u8>>)> = {
            let mut conn = self.connection().await?;
            bounded(range.query_async(&mut *conn)).await?
        };
        // Asked after the read: trimming only moves forward, so a position that is still
        // known now was known when the entries were read.
        let position = if check {
            let mut call =
                self.library_call("FCALL_RO", "eventfabric_position", keys::POSITION_KEYS);
            call.arg(after.to_string());
            self.call_with_library::<i64>(&call).await?
        } else {
            0
        };
        let more = entries.len() >= count;
        let mut next = None;
        let mut frames = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let Ok(id) = id.parse::<EventId>() else {
                self.bad_entries
                    .record(None, "an id that is not <ms>-<seq>");
                continue;
            };
            next = Some(id);
            match stored_frame(id, &fields) {
                Ok(frame) => frames.push(frame),
                Err(reason) => self.bad_entries.record(Some(id), reason),
            }
        }
        Ok(Replay {
            frames,
            truncated: position != 0,
            unknown_id: position == 2,
            next: if more { next } else { None },
        })
    }

    /// The id of the newest stored event, if any.
    pub async fn newest_id(&self) -> Result<Option<EventId>, Error> {
        self.newest_id_up_to(None).await
    }

    /// The id of the newest stored event at or before `bound` (any, without one).
    pub async fn newest_id_up_to(&self, bound: Option<EventId>) -> Result<Option<EventId>, Error> {
        let mut conn = self.connection().await?;
        // Fields as bytes: an entry that is not UTF-8 must not fail this.
        let newest: Vec<(String, Vec<Vec<u8>>)> = bounded(
            redis::cmd("XREVRANGE")
                .arg(&self.keys.stream)
                .arg(bound.map_or_else(|| "+".to_owned(), |id| id.to_string()))
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut *conn),
        )
        .await?;
        Ok(newest.first().and_then(|(id, _)| id.parse().ok()))
    }

    /// Sends this replica's readiness canary, through the library (see the module notes).
    pub async fn send_canary(&self, replica_id: &str) -> Result<(), Error> {
        let mut call = self.library_call("FCALL", "eventfabric_canary", keys::CANARY_KEYS);
        call.arg(replica_id).arg(unix_ms());
        let _: i64 = self.call_with_library(&call).await?;
        Ok(())
    }

    /// Records that `replica_id` is alive with `clients` clients.
    pub async fn heartbeat(&self, replica_id: &str, clients: usize) -> Result<(), Error> {
        let mut call = self.library_call("FCALL", "eventfabric_heartbeat", keys::REPLICA_KEYS);
        call.arg(replica_id)
            .arg(clients)
            .arg(REPLICA_TTL.as_millis() as u64);
        let _: i64 = self.call_with_library(&call).await?;
        Ok(())
    }

    /// Removes `replica_id` from the cluster stats at once (graceful shutdown).
    pub async fn leave(&self, replica_id: &str) -> Result<(), Error> {
        let mut call = self.library_call("FCALL", "eventfabric_leave", keys::REPLICA_KEYS);
        call.arg(replica_id);
        let _: i64 = self.call_with_library(&call).await?;
        Ok(())
    }

    /// Counters and live replicas of the namespace.
    pub async fn cluster_stats(&self) -> Result<ClusterStats, Error> {
        let call = self.library_call("FCALL", "eventfabric_stats", keys::STATS_KEYS);
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
            stats.replicas.push(ReplicaStats {
                id,
                active_clients: clients.parse().unwrap_or(0),
                last_seen_ms: seen.parse().unwrap_or(0),
            });
        }
        stats.active_clients = stats.replicas.iter().map(|r| r.active_clients).sum();
        Ok(stats)
    }

    /// `<command> <function> <n> {ns}:stream {ns}:...`: a call into the library on this
    /// namespace in the declared form (the stream key, then the keys in `touched`), to
    /// which the caller appends the function's arguments.
    fn library_call(&self, command: &str, function: &str, touched: &[&str]) -> redis::Cmd {
        let declared = self.keys.declared(touched);
        let mut call = redis::cmd(command);
        call.arg(function).arg(declared.len()).arg(declared);
        call
    }

    /// Runs a library call, loading the library first if Redis lost it (a restart
    /// without persistence does that).
    async fn call_with_library<T: redis::FromRedisValue>(
        &self,
        call: &redis::Cmd,
    ) -> Result<T, Error> {
        let mut conn = self.connection().await?;
        let result = self.call_on(&mut conn, call).await;
        if let Err(error) = &result {
            self.forget_if_demoted(error, conn);
        }
        result
    }

    /// Runs a library call on `conn`, loading the library first if Redis lost it.
    async fn call_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut Pooled,
        call: &redis::Cmd,
    ) -> Result<T, Error> {
        match bounded(call.query_async(&mut **conn)).await {
            Err(Error::Rejected(detail)) if detail.contains("Function not found") => {
                tracing::info!("function library missing in Redis; loading it");
                ensure_library(conn, &self.keys.stream, true).await?;
                bounded(call.query_async(&mut **conn)).await
            }
            other => other,
        }
    }

    /// After `error` on `conn`: if the node was the primary and is a replica now (a
    /// failover), none of the pooled connections is any use; new ones go where Sentinel
    /// says.
    fn forget_if_demoted(&self, error: &Error, conn: Pooled) {
        if let Error::Unavailable(why) = error
            && why.starts_with(DEMOTED)
        {
            drop(Pooled::take(conn));
            self.pool.retain(|_, _| false);
        }
    }
}

/// How the error of a write refused by a replica begins.
const DEMOTED: &str = "the node is a replica now";

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

/// Loads the library unless an equal or newer version is there (`missing`: it is known
/// not to be). On a cluster, first on the primary of this namespace's slot, which is all
/// this namespace needs, and then on every other primary, so that producers of every
/// namespace find it there; that second step waits at most [`EVERY_PRIMARY_TIMEOUT`] and
/// may fail (a failover under way on another shard must not make this one unready).
async fn ensure_library(conn: &mut Connection, stream: &str, missing: bool) -> Result<(), Error> {
    let mut version = redis::cmd("FCALL_RO");
    version.arg("eventfabric_version").arg(0);
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(FUNCTION_LIBRARY);
    let current = |loaded: &Result<i64, Error>| matches!(loaded, Ok(v) if *v >= LIBRARY_VERSION);
    let cluster = match conn {
        Connection::Single(single) => {
            if !missing {
                match bounded(version.query_async::<i64>(single)).await {
                    Err(Error::Unavailable(why)) => return Err(Error::Unavailable(why)),
                    loaded if current(&loaded) => return Ok(()),
                    _ => {}
                }
            }
            let _: String = bounded(load.query_async(single)).await?;
            return Ok(());
        }
        Connection::Cluster(cluster) => cluster,
    };
    let namespace_primary = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
        Route::with_key(stream, SlotAddr::Master),
    ));
    let here = if missing {
        Ok(0)
    } else {
        bounded(cluster.route_command(version.clone(), namespace_primary.clone()))
            .await
            .and_then(|v| redis::from_redis_value(v).map_err(|e| Error::Rejected(e.to_string())))
    };
    if let Err(Error::Unavailable(why)) = here {
        return Err(Error::Unavailable(why));
    }
    if !current(&here) {
        let _: redis::Value =
            bounded(cluster.route_command(load.clone(), namespace_primary)).await?;
    }
    // Every primary: the lowest version any has, and a load on all when one lacks it.
    let lowest = RoutingInfo::MultiNode((
        MultipleNodeRoutingInfo::AllMasters,
        Some(ResponsePolicy::Aggregate(AggregateOp::Min)),
    ));
    let all = RoutingInfo::MultiNode((
        MultipleNodeRoutingInfo::AllMasters,
        Some(ResponsePolicy::AllSucceeded),
    ));
    let everywhere = async {
        let loaded = cluster
            .route_command(version, lowest)
            .await
            .and_then(|v| Ok(redis::from_redis_value::<i64>(v)?));
        if matches!(loaded, Ok(v) if v >= LIBRARY_VERSION) {
            return Ok(());
        }
        cluster.route_command(load, all).await.map(drop)
    };
    match tokio::time::timeout(EVERY_PRIMARY_TIMEOUT, everywhere).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "the function library is not on every primary yet");
        }
        Err(_) => tracing::warn!("not every primary answered while loading the function library"),
    }
    Ok(())
}

/// Builds the frame of a stored stream entry (`type` and `data` fields), or says why the
/// entry is not an event. Entries come from anyone who can `XADD`: nothing is trusted.
fn stored_frame(id: EventId, fields: &[Vec<u8>]) -> Result<Arc<Frame>, &'static str> {
    let mut event_type = None;
    let mut data = None;
    for pair in fields.chunks_exact(2) {
        match pair[0].as_slice() {
            b"type" => event_type = Some(pair[1].as_slice()),
            b"data" => data = Some(pair[1].as_slice()),
            _ => {}
        }
    }
    let event_type = std::str::from_utf8(event_type.ok_or("no type field")?)
        .map_err(|_| "a type that is not UTF-8")?;
    event::validate_type(event_type).map_err(|_| "an invalid type")?;
    let data =
        std::str::from_utf8(data.unwrap_or(b"null")).map_err(|_| "data that is not UTF-8")?;
    let data = RawValue::from_string(data.to_owned()).map_err(|_| "data that is not JSON")?;
    Ok(Frame::event(event_type, &data, Some(id), id.ms))
}

/// Counts stream entries that are not events, each once (replays and gap fills read
/// entries in id order, so remembering the newest one reported is enough), and logs them at
/// most once a second: anyone who can `XADD` can add them as fast as Redis takes them.
#[derive(Debug)]
struct BadEntries {
    metrics: Arc<Metrics>,
    newest_seen: Mutex<Option<EventId>>,
}

impl BadEntries {
    fn record(&self, id: Option<EventId>, reason: &'static str) {
        {
            let mut newest = self.newest_seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(id) = id {
                if newest.is_some_and(|seen| id <= seen) {
                    return;
                }
                *newest = Some(id);
            }
        }
        self.metrics.bad_messages.inc();
        static LOG: RateLimit = RateLimit::per_second();
        if let Some(suppressed) = LOG.allow() {
            tracing::warn!(
                id = ?id.map(|id| id.to_string()),
                reason,
                suppressed,
                "skipped a stored entry that is not an event"
            );
        }
    }
}

/// How the function library's validation errors begin, after the `ERR` code: "ERR invalid
/// event: type must not be empty". The code stays the generic `ERR` that producers in other
/// languages already match on.
pub(crate) const INVALID_EVENT: &str = "invalid event: ";

/// Server replies to a bad request are rejections, and the function library's "invalid
/// event" replies say the event itself is invalid (the producer's mistake, not a failure);
/// everything else means Redis is not reachable as it should be.
pub(crate) fn classify(error: RedisError) -> Error {
    match error.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError) => {
            let detail = error.detail().unwrap_or("rejected by Redis");
            match detail.strip_prefix(INVALID_EVENT) {
                Some(why) => Error::Invalid(why.to_owned()),
                None => Error::Rejected(detail.to_owned()),
            }
        }
        ErrorKind::Server(ServerErrorKind::ReadOnly) => {
            Error::Unavailable(format!("{DEMOTED} (READONLY): {error}"))
        }
        _ => Error::Unavailable(error.to_string()),
    }
}
