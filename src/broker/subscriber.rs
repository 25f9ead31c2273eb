//! The replica's one pub/sub connection, owned by one task, feeding the delivery path.
//!
//! Pub/sub is fire-and-forget: anything published while the connection is down is gone
//! from the channel. So after every (re)subscription the task reads the stream from the
//! newest id it delivered before going live again; the delivery path refuses anything not
//! newer than that id, so clients see neither a gap nor a duplicate at the seam.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::redis::RedisBroker;
use super::{Error, REPLAY_PAGE};
use crate::event::{self, EventId, unix_ms};
use crate::metrics::Metrics;
use crate::sse::{self, Frame};

/// First reconnect delay; doubled after each failure up to [`MAX_BACKOFF`], with jitter.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long connecting and subscribing may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// With no canary for this long, the subscription is presumed wedged and rebuilt.
const WEDGED_AFTER: Duration = Duration::from_secs(5);

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
    /// Runs the subscriber until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let canary_channel = self.broker.keys().canary(&self.replica_id);
        let mut backoff = MIN_BACKOFF;
        let mut bad = BadMessageLog::default();
        while !shutdown.is_cancelled() {
            let session = tokio::select! {
                _ = shutdown.cancelled() => break,
                session = self.subscribe(&canary_channel) => session,
            };
            let mut messages = match session {
                Ok(messages) => messages,
                Err(error) => {
                    self.broker.status.set_subscribed(false);
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "Redis subscription failed");
                    let wait = jitter(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            backoff = MIN_BACKOFF;
            if let Err(error) = self.catch_up().await {
                tracing::warn!(%error, "cannot fill the gap from the stream; reconnecting");
                continue;
            }
            self.broker.status.set_subscribed(true);
            tracing::info!(channel = %self.broker.keys().events, resumed_after = ?self.broker.delivery().last_delivered().map(|id| id.to_string()), "subscribed to Redis");
            let mut watchdog = tokio::time::interval(Duration::from_secs(1));
            let subscribed_at = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    message = messages.next() => match message {
                        Some(message) if message.get_channel_name() == canary_channel => {
                            self.broker.status.canary_seen();
                        }
                        Some(message) => self.deliver(message.get_payload_bytes(), &mut bad),
                        None => {
                            tracing::warn!("Redis subscription closed; reconnecting");
                            break;
                        }
                    },
                    _ = watchdog.tick() => {
                        let wedged = subscribed_at.elapsed() > WEDGED_AFTER
                            && self.broker.status.canary_age_ms() > WEDGED_AFTER.as_millis() as u64;
                        if wedged {
                            tracing::warn!("readiness canary stopped arriving; rebuilding the subscription");
                            break;
                        }
                    }
                }
            }
            self.broker.status.set_subscribed(false);
        }
        self.broker.status.set_subscribed(false);
    }

    /// Opens the dedicated pub/sub connection and subscribes to the events channel and
    /// this replica's canary channel.
    async fn subscribe(&self, canary_channel: &str) -> Result<redis::aio::PubSubStream, Error> {
        let connect = async {
            self.broker.prepare().await?;
            let mut pubsub = self
                .broker
                .client()
                .get_async_pubsub()
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            pubsub
                .subscribe(&[self.broker.keys().events.as_str(), canary_channel])
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            Ok(pubsub.into_on_message())
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| Error::Unavailable("timed out connecting to Redis".to_owned()))?
    }

    /// Delivers what was stored after the last delivered id while the subscription was
    /// down. On the very first subscription there is nothing to catch up on: start from
    /// the newest stored event.
    async fn catch_up(&self) -> Result<(), Error> {
        let delivery = self.broker.delivery();
        let Some(mut after) = delivery.last_delivered() else {
            delivery.start_after(self.broker.newest_id().await?);
            return Ok(());
        };
        let mut filled = 0usize;
        let mut first_page = true;
        loop {
            let page = self.broker.replay_from_stream(after, REPLAY_PAGE).await?;
            if first_page && page.truncated {
                delivery.forget_recent();
                // The outage outlasted the stream's retention: every client here missed
                // events that are gone, so tell them all to reload.
                tracing::warn!(after = %after, "events missed during the outage are no longer kept");
                delivery.notice(sse::history_truncated(after));
            }
            first_page = false;
            for frame in page.frames {
                if let Some(id) = frame.id {
                    after = id;
                }
                filled += usize::from(delivery.deliver(frame));
            }
            if !page.more {
                break;
            }
        }
        if filled > 0 {
            tracing::info!(
                events = filled,
                "delivered events stored while the subscription was down"
            );
        }
        Ok(())
    }

    /// Validates one channel message and hands it to the hub.
    fn deliver(&self, payload: &[u8], bad: &mut BadMessageLog) {
        match parse_message(payload, self.broker.max_event_bytes()) {
            Ok(frame) => {
                self.broker.delivery().deliver(frame);
            }
            Err(reason) => {
                self.metrics.bad_messages.inc();
                bad.record(reason, payload.len());
            }
        }
    }
}

/// A message on the events channel: what the function library publishes, or what a
/// producer sends with a plain `PUBLISH` (no id, so it cannot be replayed).
#[derive(Debug, Deserialize)]
struct ChannelMessage<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    ts: Option<u64>,
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
    let id = match message.id.as_deref() {
        Some(raw) => Some(raw.parse::<EventId>().map_err(|_| "invalid id")?),
        None => None,
    };
    let ts = message.ts.or(id.map(|id| id.ms)).unwrap_or_else(unix_ms);
    let data = message.data.unwrap_or(RawValue::NULL);
    Ok(Frame::event(&message.event_type, data, id, ts))
}

/// Logs bad channel messages without letting a flood of them flood the log.
#[derive(Debug, Default)]
struct BadMessageLog {
    count: u64,
}

impl BadMessageLog {
    fn record(&mut self, reason: &'static str, bytes: usize) {
        self.count += 1;
        if self.count <= 10 || self.count.is_power_of_two() {
            tracing::warn!(
                reason,
                bytes,
                dropped_so_far = self.count,
                "dropped a malformed message from the Redis channel"
            );
        }
    }
}

/// A delay between 50 % and 100 % of `base`, so replicas do not reconnect in lockstep.
fn jitter(base: Duration) -> Duration {
    let ms = base.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_messages_keep_their_id_and_payload() {
        let frame = parse_message(
            br#"{"type":"job_updated","data":{"p":1},"id":"5-1","ts":5}"#,
            1024,
        )
        .unwrap();
        assert_eq!(frame.id, Some(EventId::new(5, 1)));
        assert_eq!(
            &frame.bytes[..],
            b"id: 5-1\ndata: {\"type\":\"job_updated\",\"data\":{\"p\":1},\"id\":\"5-1\",\"ts\":5}\n\n"
        );
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
        assert_eq!(
            parse_message(br#"{"type":"a","id":"x"}"#, 1024).unwrap_err(),
            "invalid id"
        );
        let big = format!(r#"{{"type":"a","data":"{}"}}"#, "x".repeat(2000));
        assert_eq!(
            parse_message(big.as_bytes(), 1024).unwrap_err(),
            "oversized"
        );
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(400));
            assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        }
    }
}
