//! Every Redis key and channel name, derived from one namespace. All of them carry the
//! namespace as a hash tag (`{ns}`), so they live in one Redis Cluster slot and the
//! function library may touch them together.

/// Names used by one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The capped stream holding every stored event: `{ns}:stream`.
    pub stream: String,
    /// The pub/sub channel every replica listens on: `{ns}:events`.
    pub events: String,
    /// Settings the function library reads (history length, size limit): `{ns}:config`.
    pub config: String,
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
            prefix,
        }
    }

    /// The channel on which a replica's readiness canary travels.
    pub fn canary(&self, replica_id: &str) -> String {
        format!("{}:canary:{replica_id}", self.prefix)
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
    }

    #[test]
    fn namespaces_with_braces_or_spaces_are_refused() {
        assert!(validate_namespace("tenant-1.prod").is_ok());
        for bad in ["", "a{b", "a}b", "a b", &"x".repeat(65)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
    }
}
