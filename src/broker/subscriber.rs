//! The replica's one pub/sub connection, owned by one task, feeding the delivery path.
//!
//! Ids come from the stream alone. The function library stores an event and then rings a
//! doorbell on the channel (the payload is just the new id); on a doorbell the task reads
//! the stream after the newest id it delivered, and delivers what it finds. Anyone who can
//! `PUBLISH` can ring the doorbell, but all that does is cause a read: no message on the
//! channel can claim an id or move this replica's notion of "last delivered". A plain
//! `PUBLISH` of an event object is delivered live as fire-and-forget, without an id (an
//! `id` field in it is ignored).
//!
//! Pub/sub is fire-and-forget too: anything published while the connection is down is gone
//! from the channel. The same read after every (re)subscription fills that gap; the
//! delivery path refuses anything not newer than the last id, so clients see neither a gap
//! nor a duplicate at the seam. Doorbells that have already arrived are answered by one
//! read, so a burst costs a few reads, not one per event; a read goes no further than the
//! newest doorbell taken, so an event stored later cannot overtake a fire-and-forget
//! event that was published before it.
//!
//! On a Redis Cluster the channels are sharded (`SSUBSCRIBE`): they live on the primary that
//! holds the namespace's slot, and so does the subscription. When that slot moves (the
//! server ends the subscription with `SUNSUBSCRIBE`) or any connection of the cluster
//! client is lost, the subscription ends here and is built again from scratch (a fresh
//! view of the cluster, then the same gap-filling read), rather than trusting a silent
//! resubscription that would leave a gap unread. Pushes wait in a bounded queue; one that
//! overflows ends the subscription the same way, so memory stays bounded and nothing is
//! skipped unread.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use rand::Rng;
use redis::{PushInfo, PushKind};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::redis::RedisBroker;
use super::{Error, REPLAY_PAGE};
use crate::event::{self, EventId, unix_ms};
use crate::metrics::Metrics;
use crate::sse::{self, Frame};
use crate::telemetry::RateLimit;

/// Shortest pause before any reconnect, so nothing reconnects more than four times a
/// second; doubled after each quick failure up to [`MAX_BACKOFF`], with jitter.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A subscription that lasted this long earns a reconnect at [`MIN_BACKOFF`] again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Most messages taken while a doorbell waits for its read, so a flood on the channel
/// cannot hold stored events back.
const MAX_WAITING: usize = 1024;
/// How long connecting and subscribing may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// With no canary for this long, the subscription is presumed wedged and rebuilt.
const WEDGED_AFTER: Duration = Duration::from_secs(5);
/// Pushes of a sharded subscription waiting to be taken; more end the subscription.
const MAX_PUSHES: usize = 1024;

/// What a subscription hands over: channel messages until it is lost (the reason).
type Messages = Pin<Box<dyn Stream<Item = Result<redis::Msg, &'static str>> + Send>>;

/// The task that owns the replica's subscription.
#[derive(Debug)]
pub(crate) struct Subscriber {
    /// The broker whose channel it listens to and whose delivery path it feeds.
    pub broker: Arc<RedisBroker>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// This replica's id (names its canary channel).
    pub replica_id: Arc<str>,
}

impl Subscriber {
    /// Runs the subscriber until `shutdown` fires. Every way a subscription can end (a
    /// failed connect, a failed read of the stream, a closed or wedged connection) goes
    /// through the same backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let canary_channel = self.broker.keys().canary(&self.replica_id);
        let mut backoff = MIN_BACKOFF;
        while !shutdown.is_cancelled() {
            let began = tokio::time::Instant::now();
            let ended = self.subscription(&canary_channel, &shutdown).await;
            self.broker.status.set_subscribed(false);
            if shutdown.is_cancelled() {
                break;
            }
            if began.elapsed() >= HEALTHY_AFTER {
                backoff = MIN_BACKOFF;
            }
            let wait = jitter(backoff);
            tracing::warn!(error = %ended, retry_in_ms = wait.as_millis() as u64, "Redis subscription ended");
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.broker.status.set_subscribed(false);
    }

    /// One subscription, from connecting to its end; returns why it ended (a clean
    /// shutdown returns too, and the caller checks the token).
    async fn subscription(&self, canary_channel: &str, shutdown: &CancellationToken) -> Error {
        let mut messages = tokio::select! {
            _ = shutdown.cancelled() => return Error::Unavailable("shutting down".to_owned()),
            session = self.subscribe(canary_channel) => match session {
                Ok(messages) => messages,
                Err(error) => return error,
            },
        };
        if let Err(error) = self.read_new(None).await {
            return error;
        }
        self.broker.status.set_subscribed(true);
        tracing::info!(channel = %self.broker.keys().events, resumed_after = ?self.broker.delivery().last_delivered().map(|id| id.to_string()), "subscribed to Redis");
        let mut watchdog = tokio::time::interval(Duration::from_secs(1));
        let subscribed_at = tokio::time::Instant::now();
        // The newest doorbell not yet answered by a read. Reads wait until nothing more has
        // already arrived, so one read answers a burst; a fire-and-forget event waits for
        // the read of any doorbell rung before it, so the channel's order is kept.
        let mut rung: Option<EventId> = None;
        let mut waiting = 0usize;
        loop {
            let message = if let Some(until) = rung {
                let arrived = if waiting < MAX_WAITING {
                    messages.next().now_or_never()
                } else {
                    None
                };
                waiting += 1;
                match arrived {
                    Some(message) => message,
                    None => {
                        if let Err(error) = self.read_new(Some(until)).await {
                            return error;
                        }
                        rung = None;
                        waiting = 0;
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => return Error::Unavailable("shutting down".to_owned()),
                    message = messages.next() => message,
                    _ = watchdog.tick() => {
                        let wedged = subscribed_at.elapsed() > WEDGED_AFTER
                            && self.broker.status.canary_age_ms() > WEDGED_AFTER.as_millis() as u64;
                        if wedged {
                            return Error::Unavailable("the readiness canary stopped arriving".to_owned());
                        }
                        continue;
                    }
                }
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(lost)) => return Error::Unavailable(lost.to_owned()),
                None => return Error::Unavailable("Redis closed the subscription".to_owned()),
            };
            match self.take(&message, canary_channel) {
                Taken::Nothing => {}
                Taken::Doorbell(id) => rung = rung.max(Some(id)),
                Taken::Event(frame) => {
                    if let Some(until) = rung.take() {
                        if let Err(error) = self.read_new(Some(until)).await {
                            return error;
                        }
                        waiting = 0;
                    }
                    self.broker.delivery().deliver(frame);
                }
            }
        }
    }

    /// Opens the dedicated pub/sub connection and subscribes to the events channel and
    /// this replica's canary channel (sharded channels on a cluster), after making sure
    /// the library is loaded.
    async fn subscribe(&self, canary_channel: &str) -> Result<Messages, Error> {
        let connect = async {
            self.broker.prepare().await?;
            let channels = [self.broker.keys().events.as_str(), canary_channel];
            let unavailable = |e: redis::RedisError| Error::Unavailable(e.to_string());
            let (pushes, overflowed) = BoundedPushes::new();
            if let Some(client) = self.broker.target().cluster_client(Some(pushes.sender)) {
                let mut conn = client?.get_async_connection().await.map_err(unavailable)?;
                conn.ssubscribe(&channels).await.map_err(unavailable)?;
                let messages = futures::stream::unfold(
                    (pushes.receiver, conn, overflowed),
                    |(mut receiver, conn, overflowed)| async move {
                        loop {
                            let push = receiver.recv().await?;
                            let taken = if overflowed.load(Ordering::Relaxed) {
                                Some(Err("more sharded messages came than were taken"))
                            } else {
                                sharded_push(push)
                            };
                            if let Some(taken) = taken {
                                return Some((taken, (receiver, conn, overflowed)));
                            }
                        }
                    },
                );
                return Ok(Box::pin(messages) as Messages);
            }
            let mut pubsub = self
                .broker
                .target()
                .client()
                .await?
                .get_async_pubsub()
                .await
                .map_err(unavailable)?;
            pubsub.subscribe(&channels).await.map_err(unavailable)?;
            Ok(Box::pin(pubsub.into_on_message().map(Ok)) as Messages)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| Error::Unavailable("timed out connecting to Redis".to_owned()))?
    }

    /// Where reading the stream starts for a replica that has delivered nothing yet.
    async fn stream_position(&self) -> Result<EventId, Error> {
        Ok(self.broker.newest_id().await?.unwrap_or(EventId::new(0, 0)))
    }

    /// Reads one channel message.
    fn take(&self, message: &redis::Msg, canary_channel: &str) -> Taken {
        let payload = message.get_payload_bytes();
        if message.get_channel_name() == canary_channel {
            self.broker.status.canary_seen();
            return Taken::Nothing;
        }
        if let Some(id) = doorbell(payload) {
            // Already delivered (an earlier read covered it): no read needed.
            let new = self
                .broker
                .delivery()
                .last_delivered()
                .is_none_or(|last| id > last);
            return if new {
                Taken::Doorbell(id)
            } else {
                Taken::Nothing
            };
        }
        match parse_message(payload, self.broker.max_event_bytes()) {
            Ok(frame) => Taken::Event(frame),
            Err(reason) => {
                self.metrics.bad_messages.inc();
                log_bad_message(reason, payload.len());
                Taken::Nothing
            }
        }
    }

    /// Delivers what the stream holds after the last delivered id (up to `until`, when
    /// given), page by page. On the very first subscription there is nothing to catch up
    /// on: start from the newest stored event (or the start of the stream, when it has
    /// none).
    async fn read_new(&self, until: Option<EventId>) -> Result<(), Error> {
        let delivery = self.broker.delivery();
        let Some(mut after) = delivery.last_delivered() else {
            delivery.start_after(Some(self.stream_position().await?));
            return Ok(());
        };
        let mut first_page = true;
        loop {
            // Whether Redis still knows where this replica is matters after a reconnect
            // (Redis may have lost its data); a live read follows a doorbell from the same
            // connection, so it need not ask.
            let check = first_page && until.is_none();
            let page = self
                .broker
                .read_stream(after, until, REPLAY_PAGE, check)
                .await?;
            if first_page && page.unknown_id {
                // Redis does not know our newest id: it lost data (a restart without
                // persistence, an older snapshot, a failover to a replica that lagged).
                // Clients here already have what they were sent. Go on from the newest
                // event Redis still has at or before ours, so that what the new primary
                // stored since is delivered and nothing newer is refused as old (clients
                // skip what they already have by id).
                let anchor = self.broker.newest_id_up_to(Some(after)).await?;
                tracing::warn!(
                    last_delivered = %after,
                    going_on_after = ?anchor.map(|id| id.to_string()),
                    "Redis no longer has the newest event delivered here; following its stream"
                );
                after = anchor.unwrap_or(EventId::new(0, 0));
                delivery.restart_after(after);
                first_page = false;
                continue;
            }
            if first_page && page.truncated {
                delivery.forget_recent();
                // The outage outlasted the stream's retention: every client here missed
                // events that are gone, so tell them all to reload.
                tracing::warn!(after = %after, "events missed during the outage are no longer kept");
                delivery.notice(sse::history_truncated(after));
            }
            first_page = false;
            for frame in page.frames {
                delivery.deliver(frame);
            }
            match page.next {
                Some(next) => after = next,
                None => return Ok(()),
            }
        }
    }
}

/// What a push of a sharded subscription means: a message, the end of the subscription
/// (the server moved the slot away, or a connection was lost), or nothing (confirmations).
fn sharded_push(push: PushInfo) -> Option<Result<redis::Msg, &'static str>> {
    match push.kind {
        PushKind::SMessage => redis::Msg::from_push_info(push).map(Ok),
        PushKind::SUnsubscribe => {
            Some(Err("Redis ended the sharded subscription (the slot moved)"))
        }
        PushKind::Disconnection => Some(Err("a connection to the Redis Cluster was lost")),
        _ => None,
    }
}

/// Where the cluster client puts the pushes of a sharded subscription: a bounded queue
/// that, when full, drops the push and raises a flag that ends the subscription.
struct BoundedPushes {
    sender: PushSender,
    receiver: tokio::sync::mpsc::Receiver<PushInfo>,
}

struct PushSender {
    queue: tokio::sync::mpsc::Sender<PushInfo>,
    overflowed: Arc<AtomicBool>,
}

impl BoundedPushes {
    fn new() -> (Self, Arc<AtomicBool>) {
        let (queue, receiver) = tokio::sync::mpsc::channel(MAX_PUSHES);
        let overflowed = Arc::new(AtomicBool::new(false));
        let sender = PushSender {
            queue,
            overflowed: overflowed.clone(),
        };
        (Self { sender, receiver }, overflowed)
    }
}

impl redis::aio::AsyncPushSender for PushSender {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        match self.queue.try_send(info) {
            Ok(()) => Ok(()),
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Err(redis::aio::SendError),
        }
    }
}

/// What a channel message asks of the subscriber.
enum Taken {
    /// Nothing (a canary, a stale doorbell, a bad message).
    Nothing,
    /// Read the stream up to this id: something new was stored.
    Doorbell(EventId),
    /// Deliver this fire-and-forget event.
    Event(Arc<Frame>),
}

/// The id in a doorbell: the whole payload is one, as the function library sends it.
fn doorbell(payload: &[u8]) -> Option<EventId> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

/// An event a producer sends with a plain `PUBLISH`: fire-and-forget, with no id. Fields
/// other than these (an `id` among them) are ignored.
#[derive(Debug, Deserialize)]
struct ChannelMessage<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Turns a channel payload into a frame, or says why it is not acceptable.
fn parse_message(payload: &[u8], max_bytes: u64) -> Result<Arc<Frame>, &'static str> {
    // The envelope adds the id and timestamp to what the producer sent.
    if payload.len() as u64 > max_bytes.saturating_add(256) {
        return Err("oversized");
    }
    let message: ChannelMessage<'_> = serde_json::from_slice(payload).map_err(|e| {
        if e.is_data() {
            "not an event object"
        } else {
            "not valid JSON"
        }
    })?;
    event::validate_type(&message.event_type).map_err(|_| "invalid type")?;
    let data = message.data.unwrap_or(RawValue::NULL);
    Ok(Frame::event(&message.event_type, data, None, unix_ms()))
}

/// Logs a bad channel message: anyone who can `PUBLISH` can send them as fast as Redis
/// takes them, so one line a second at most (the metric counts every one).
fn log_bad_message(reason: &'static str, bytes: usize) {
    static LOG: RateLimit = RateLimit::per_second();
    if let Some(suppressed) = LOG.allow() {
        tracing::warn!(
            reason,
            bytes,
            suppressed,
            "dropped a malformed message from the Redis channel"
        );
    }
}

/// A delay between 100 % and 150 % of `base`, so replicas do not reconnect in lockstep
/// and none waits less than `base`.
fn jitter(base: Duration) -> Duration {
    let ms = base.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms..=ms + ms / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_id_in_a_channel_message_is_ignored() {
        let frame = parse_message(
            br#"{"type":"poison","data":1,"id":"99999999999999-0","ts":5}"#,
            1024,
        )
        .unwrap();
        assert_eq!(frame.id, None);
        let text = std::str::from_utf8(&frame.bytes).unwrap();
        assert!(
            text.starts_with("data: {\"type\":\"poison\",\"data\":1"),
            "{text}"
        );
        assert!(!text.contains("99999999999999"), "{text}");
    }

    #[test]
    fn plain_publishes_are_delivered_without_an_id() {
        let frame = parse_message(
            br#"{"type":"cache_updated","data":{"rebuild_complete":true}}"#,
            1024,
        )
        .unwrap();
        assert_eq!(frame.id, None);
        assert!(
            frame
                .bytes
                .starts_with(b"data: {\"type\":\"cache_updated\"")
        );
    }

    #[test]
    fn doorbells_are_bare_ids_and_nothing_else() {
        assert_eq!(
            doorbell(b"1700000000000-3"),
            Some(EventId::new(1_700_000_000_000, 3))
        );
        for not_one in [&b""[..], b"\xff", br#"{"type":"a"}"#, b"-1"] {
            assert_eq!(doorbell(not_one), None, "{not_one:?}");
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert_eq!(parse_message(b"hello", 1024).unwrap_err(), "not valid JSON");
        assert_eq!(
            parse_message(b"\xff\xfe{", 1024).unwrap_err(),
            "not valid JSON"
        );
        assert_eq!(
            parse_message(b"[1]", 1024).unwrap_err(),
            "not an event object"
        );
        assert_eq!(
            parse_message(br#"{"data":1}"#, 1024).unwrap_err(),
            "not an event object"
        );
        assert_eq!(
            parse_message(br#"{"type":"a b"}"#, 1024).unwrap_err(),
            "invalid type"
        );
        let big = format!(r#"{{"type":"a","data":"{}"}}"#, "x".repeat(2000));
        assert_eq!(
            parse_message(big.as_bytes(), 1024).unwrap_err(),
            "oversized"
        );
    }

    #[test]
    fn sharded_pushes_are_messages_or_the_end_of_the_subscription() {
        let push = |kind, data: &[&[u8]]| PushInfo {
            kind,
            data: data
                .iter()
                .map(|d| redis::Value::BulkString(d.to_vec()))
                .collect(),
        };
        let message = sharded_push(push(PushKind::SMessage, &[b"{ns}:events", b"1-0"]))
            .expect("a message")
            .expect("not an end");
        assert_eq!(
            (message.get_channel_name(), message.get_payload_bytes()),
            ("{ns}:events", &b"1-0"[..])
        );
        for ends in [
            push(PushKind::SUnsubscribe, &[b"{ns}:events"]),
            push(PushKind::Disconnection, &[]),
        ] {
            assert!(matches!(sharded_push(ends), Some(Err(_))));
        }
        for nothing in [
            push(PushKind::SSubscribe, &[b"{ns}:events"]),
            push(PushKind::Message, &[b"{ns}:events", b"1-0"]),
            // A sharded message without its payload is no message.
            push(PushKind::SMessage, &[b"{ns}:events"]),
        ] {
            assert!(sharded_push(nothing).is_none());
        }
    }

    #[test]
    fn a_full_push_queue_drops_and_flags_instead_of_growing() {
        use redis::aio::AsyncPushSender;
        let (pushes, overflowed) = BoundedPushes::new();
        let info = || PushInfo {
            kind: PushKind::SMessage,
            data: vec![],
        };
        for _ in 0..MAX_PUSHES {
            pushes.sender.send(info()).unwrap();
        }
        assert!(!overflowed.load(Ordering::Relaxed));
        pushes.sender.send(info()).unwrap();
        assert!(overflowed.load(Ordering::Relaxed));
        assert_eq!(pushes.receiver.len(), MAX_PUSHES);
        drop(pushes.receiver);
        assert!(pushes.sender.send(info()).is_err());
    }

    #[test]
    fn jitter_never_goes_below_its_base() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(400));
            assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(600));
        }
    }
}
