//! Publishing events: request parsing and validation shared by `POST /api/events`, and the
//! [`Publisher`] handle for Rust producers, with the seed application's convenience calls.

use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use std::sync::Arc;

use crate::broker::{self, Broker, RedisSettings, RedisTarget, TlsFiles};
use crate::config::{Config, DEFAULT_HISTORY, DEFAULT_MAX_EVENT_BYTES};
use crate::event::{self, EventId, InvalidEventData, InvalidEventType};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Why an event was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The event type is not acceptable.
    #[error(transparent)]
    InvalidType(#[from] InvalidEventType),
    /// The data is JSON that would not be stored: nested too deep, or holding a lone
    /// surrogate escape.
    #[error(transparent)]
    InvalidData(#[from] InvalidEventData),
    /// The encoded event is larger than the configured limit.
    #[error("event exceeds {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The data could not be encoded as JSON.
    #[error("event data is not serialisable as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The broker could not store the event.
    #[error(transparent)]
    Broker(#[from] broker::Error),
}

/// A parsed `POST /api/events` body.
#[derive(Debug, Deserialize)]
pub(crate) struct PublishRequest<'a> {
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: std::borrow::Cow<'a, str>,
    /// The payload, any JSON value; `null` when absent.
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// Parses a publish body, explaining what is wrong in words a producer can act on.
pub(crate) fn parse_request(body: &[u8]) -> Result<PublishRequest<'_>, String> {
    let raw: &RawValue =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    if !raw.get().starts_with('{') {
        return Err("body must be a JSON object with `type` and `data`".to_owned());
    }
    let request: PublishRequest<'_> = serde_json::from_str(raw.get()).map_err(|e| {
        let text = e.to_string();
        if text.contains("missing field `type`") {
            "`type` is required".to_owned()
        } else {
            format!("invalid event: {text}")
        }
    })?;
    event::validate_type(&request.event_type).map_err(|e| e.to_string())?;
    Ok(request)
}

/// Checks type, size and data, then stores the event. `data` of `None` means JSON `null`.
///
/// The one place every producer's event is checked (`POST`, [`Publisher`], the CLI's
/// `publish`): whatever the Redis function would refuse is refused here first, the same
/// way in both broker modes, as the producer's mistake and not a broker failure.
pub(crate) async fn publish_validated(
    broker: &Broker,
    event_type: &str,
    data: Option<&RawValue>,
    max_bytes: u64,
    idempotency_key: Option<&str>,
) -> Result<EventId, PublishError> {
    event::validate_type(event_type)?;
    let null = RawValue::NULL;
    let data = data.unwrap_or(null);
    if (data.get().len() + event_type.len()) as u64 > max_bytes {
        return Err(PublishError::TooLarge { limit: max_bytes });
    }
    event::validate_data(data.get())?;
    Ok(broker.publish(event_type, data, idempotency_key).await?)
}

/// Publishes events from Rust code; cheap to clone.
///
/// ```
/// # tokio_test_block(async {
/// use eventfabric::{Config, Gateway};
///
/// let gateway = Gateway::build(Config::default_for_tests()).await.unwrap();
/// let publisher = gateway.publisher();
/// let id = publisher.cache_updated(true).await.unwrap();
/// let next = publisher.publish("custom_event", &serde_json::json!({"message": "hi"})).await.unwrap();
/// assert!(next > id);
/// # });
/// # fn tokio_test_block<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    broker: Broker,
    max_bytes: u64,
}

impl Publisher {
    /// A publisher writing to `broker`, refusing events over `max_bytes`.
    pub(crate) fn new(broker: Broker, max_bytes: u64) -> Self {
        Self { broker, max_bytes }
    }

    /// A publisher for another process: writes to the namespace's stream in Redis, from
    /// where every replica delivers the event. No connection is made until first use.
    pub fn redis(url: &str, namespace: &str) -> Result<Self, PublishError> {
        Self::on_redis(RedisSettings {
            target: RedisTarget::new(url, None, &TlsFiles::default())?,
            namespace: namespace.to_owned(),
            history: DEFAULT_HISTORY,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            min_replicas: 0,
            replica_timeout: std::time::Duration::ZERO,
        })
    }

    /// A publisher on the Redis and namespace that a gateway with `config` uses: password,
    /// TLS files, size limit and `--publish-min-replicas` included. Fails when `config`
    /// names no Redis.
    pub fn for_config(config: &Config) -> Result<Self, PublishError> {
        let target = RedisTarget::from_config(config)?.ok_or_else(|| {
            broker::Error::Rejected("no Redis configured (--redis-url or REDIS_URL)".to_owned())
        })?;
        Self::on_redis(RedisSettings::from_config(target, config))
    }

    fn on_redis(settings: RedisSettings) -> Result<Self, PublishError> {
        broker::keys::validate_namespace(&settings.namespace)
            .map_err(|why| broker::Error::Rejected(format!("namespace {why}")))?;
        let max_bytes = settings.max_event_bytes;
        // A publisher delivers to nobody in this process: a hub without fan-out threads.
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(1, 0, Arc::clone(&metrics));
        let broker = Broker::redis(settings, hub, metrics, "publisher".into())?;
        Ok(Self::new(broker, max_bytes))
    }

    /// Publishes like [`Publisher::publish`]; a retry with the same `key` within ten
    /// minutes returns the first call's id and stores nothing.
    pub async fn publish_once<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
        key: &str,
    ) -> Result<EventId, PublishError> {
        let data = serde_json::value::to_raw_value(data)?;
        publish_validated(
            &self.broker,
            event_type,
            Some(&data),
            self.max_bytes,
            Some(key),
        )
        .await
    }

    /// Publishes an event of type `event_type` whose `data` is any serialisable value.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        data: &T,
    ) -> Result<EventId, PublishError> {
        let data = serde_json::value::to_raw_value(data)?;
        publish_validated(&self.broker, event_type, Some(&data), self.max_bytes, None).await
    }

    /// `cache_updated`: the cache was rebuilt or invalidated.
    pub async fn cache_updated(&self, rebuild_complete: bool) -> Result<EventId, PublishError> {
        self.publish(
            "cache_updated",
            &json!({ "rebuild_complete": rebuild_complete }),
        )
        .await
    }

    /// `watcher_status`: the file watcher started or stopped.
    pub async fn watcher_status(
        &self,
        running: bool,
        enabled: bool,
    ) -> Result<EventId, PublishError> {
        self.publish(
            "watcher_status",
            &json!({ "running": running, "enabled": enabled }),
        )
        .await
    }

    /// `file_processed`: one file was processed; `details` carries any extra fields.
    pub async fn file_processed(
        &self,
        filename: &str,
        success: bool,
        details: serde_json::Value,
    ) -> Result<EventId, PublishError> {
        let data = json!({ "filename": filename, "success": success, "details": details });
        self.publish("file_processed", &data).await
    }

    /// `job_updated`: progress of a batch job (`processed` of `total` items).
    pub async fn job_updated(
        &self,
        job_id: &str,
        status: &str,
        processed: u64,
        total: u64,
    ) -> Result<EventId, PublishError> {
        let data = json!({
            "job_id": job_id,
            "status": status,
            "processed": processed,
            "total": total,
        });
        self.publish("job_updated", &data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_explains_each_kind_of_bad_body() {
        let err = |body: &str| parse_request(body.as_bytes()).unwrap_err();
        assert!(err("{nope").contains("not valid JSON"));
        assert!(err("[1,2]").contains("JSON object"));
        assert!(err("\"x\"").contains("JSON object"));
        assert!(err(r#"{"data":1}"#).contains("`type` is required"));
        assert!(err(r#"{"type":5}"#).contains("invalid event"));
        assert!(err(r#"{"type":""}"#).contains("must not be empty"));
        assert!(err(r#"{"type":"a b"}"#).contains("may contain only"));
    }

    #[test]
    fn parse_accepts_missing_data_and_escaped_types() {
        let request = parse_request(br#"{"type":"\u0061b"}"#).unwrap();
        assert_eq!(request.event_type, "ab");
        assert!(request.data.is_none());
        let request = parse_request(br#" {"type":"t","data":{"x":[1,2]}} "#).unwrap();
        assert_eq!(request.data.unwrap().get(), r#"{"x":[1,2]}"#);
    }
}
