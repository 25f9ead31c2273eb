//! Every Redis key and channel name, derived from one namespace. All of them carry the
//! namespace as a hash tag (`{ns}`), so they live in one Redis Cluster slot and the
//! function library may touch them together.

/// Keys `eventfabric_publish` touches besides the stream key, in the order the declared
/// form names them (`PUBLISH_KEYS` in the function library).
pub const PUBLISH_KEYS: &[&str] = &[":config", ":stats", ":idem", ":idem:order"];
/// Keys `eventfabric_heartbeat` and `eventfabric_leave` touch besides the stream key.
pub const REPLICA_KEYS: &[&str] = &[":replicas", ":replicas:expiry"];
/// Keys `eventfabric_stats` touches besides the stream key.
pub const STATS_KEYS: &[&str] = &[":stats", ":replicas", ":replicas:expiry"];
/// Keys `eventfabric_canary` touches besides the stream key.
pub const CANARY_KEYS: &[&str] = &[":config"];
/// `eventfabric_position` touches the stream key alone.
pub const POSITION_KEYS: &[&str] = &[];

/// Names used by one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The capped stream holding every stored event: `{ns}:stream`.
    pub stream: String,
    /// The pub/sub channel every replica listens on: `{ns}:events`.
    pub events: String,
    /// Settings the function library reads (history length, size limit): `{ns}:config`.
    pub config: String,
    /// Shared counters behind cluster-wide stats (`total`, `type:<t>`): `{ns}:stats`.
    pub stats: String,
    /// Each live replica's client count and last heartbeat: `{ns}:replicas`.
    pub replicas: String,
    /// When each replica's entry in `replicas` expires (a sorted set): `{ns}:replicas:expiry`.
    pub replicas_expiry: String,
    /// Idempotency key -> the id its first publish got (a hash): `{ns}:idem`.
    pub idempotency_keys: String,
    /// The same keys ordered by age, so the oldest are forgotten first: `{ns}:idem:order`.
    pub idempotency_order: String,
    prefix: String,
}

impl Keys {
    /// Keys of `namespace`, which [`validate_namespace`] accepted.
    pub fn new(namespace: &str) -> Self {
        let prefix = format!("{{{namespace}}}");
        Self {
            stream: format!("{prefix}:stream"),
            events: format!("{prefix}:events"),
            config: format!("{prefix}:config"),
            stats: format!("{prefix}:stats"),
            replicas: format!("{prefix}:replicas"),
            replicas_expiry: format!("{prefix}:replicas:expiry"),
            idempotency_keys: format!("{prefix}:idem"),
            idempotency_order: format!("{prefix}:idem:order"),
            prefix,
        }
    }

    /// The keys of a library call in the declared form: the stream key, then the key of
    /// each of `suffixes` (one of the lists above), which every Redis accepts and a cluster
    /// requires.
    pub fn declared(&self, suffixes: &[&str]) -> Vec<String> {
        std::iter::once(self.stream.clone())
            .chain(
                suffixes
                    .iter()
                    .map(|suffix| format!("{}{suffix}", self.prefix)),
            )
            .collect()
    }

    /// The channel on which a replica's readiness canary travels.
    pub fn canary(&self, replica_id: &str) -> String {
        format!("{}:canary:{replica_id}", self.prefix)
    }

    /// Every name this namespace uses, each with a placeholder where a name has a variable
    /// part. The function library derives its own from the stream key; a test holds the two
    /// lists equal.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the in-step test's list of names")
    )]
    pub fn all(&self) -> Vec<String> {
        vec![
            self.stream.clone(),
            self.events.clone(),
            self.config.clone(),
            self.stats.clone(),
            self.replicas.clone(),
            self.replicas_expiry.clone(),
            self.idempotency_keys.clone(),
            self.idempotency_order.clone(),
            self.canary("<replica>"),
        ]
    }
}

/// Checks a namespace: 1 to 64 characters from `[A-Za-z0-9_.:-]`.
pub fn validate_namespace(namespace: &str) -> Result<(), String> {
    let ok = !namespace.is_empty()
        && namespace.len() <= 64
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 64 characters from letters, digits, '_', '.', ':' and '-'".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = Keys::new("eventfabric");
        assert_eq!(keys.stream, "{eventfabric}:stream");
        assert_eq!(keys.events, "{eventfabric}:events");
        assert_eq!(keys.canary("gw-1"), "{eventfabric}:canary:gw-1");
        for name in keys.all() {
            assert!(name.starts_with("{eventfabric}:"), "{name}");
        }
    }

    #[test]
    fn declared_keys_are_the_stream_key_then_the_listed_ones_in_order() {
        let keys = Keys::new("ns");
        assert_eq!(keys.declared(POSITION_KEYS), ["{ns}:stream"]);
        assert_eq!(
            keys.declared(PUBLISH_KEYS),
            [
                "{ns}:stream",
                "{ns}:config",
                "{ns}:stats",
                "{ns}:idem",
                "{ns}:idem:order"
            ]
        );
        let all = keys.all();
        for list in [PUBLISH_KEYS, REPLICA_KEYS, STATS_KEYS, CANARY_KEYS] {
            for key in keys.declared(list) {
                assert!(all.contains(&key), "{key} is not a key of the namespace");
            }
        }
    }

    #[test]
    fn namespaces_with_braces_or_spaces_are_refused() {
        assert!(validate_namespace("tenant-1.prod").is_ok());
        for bad in ["", "a{b", "a}b", "a b", &"x".repeat(65)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
    }
}
