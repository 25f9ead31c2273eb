//! The keys of an identity provider, from its JWKS endpoint.
//!
//! Fetched at start and kept in memory. A token naming a key id the cache does not hold
//! triggers a refetch (a rotation at the provider), at most one per [`REFETCH_INTERVAL`]
//! whatever the traffic, so forged key ids cannot turn the gateway into a flood against
//! the provider; until the first fetch succeeds, every [`RETRY_UNLOADED`].
//!
//! A key set belongs to one issuer (`--jwt-issuer`), so a key is found by issuer *and* key
//! id, never the id alone: a token claiming another issuer finds no key here even if its
//! `kid` matches, and cannot make the set be fetched again. Symmetric (`oct`) entries are ignored (a published key set carries no
//! secrets), and so are keys marked for encryption only.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use super::keys::RSA;

/// Least time between two fetches prompted by unknown key ids.
pub(super) const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// Least time between fetches while no fetch has succeeded yet.
const RETRY_UNLOADED: Duration = Duration::from_secs(5);

/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest key set read.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Cached keys by key id (the set's issuer is the other half of the lookup).
type KeyTable = HashMap<Box<str>, CachedKey>;

/// A cached key and the algorithms it accepts.
struct CachedKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// The key cache of one JWKS endpoint.
pub(super) struct Jwks {
    url: String,
    /// The issuer the keys belong to; `None` when --jwt-issuer is unset (with a warning).
    issuer: Option<Box<str>>,
    client: reqwest::Client,
    keys: RwLock<KeyTable>,
    /// When unknown key ids last prompted a fetch, and whether one has ever succeeded;
    /// held across a fetch so that concurrent misses wait for it instead of fetching again.
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    /// When an unknown key id last made the set be fetched again.
    last_refetch: Option<Instant>,
    loaded: bool,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Fetches the key set once. A provider that cannot be reached now is not fatal (it
    /// may start after the gateway): tokens are refused until a later fetch succeeds.
    pub async fn start(url: &str, issuer: Option<&str>) -> Result<Self, String> {
        let parsed =
            reqwest::Url::parse(url).map_err(|e| format!("--jwt-jwks-url is not a URL: {e}"))?;
        let loopback = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
        match parsed.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => tracing::warn!(
                "--jwt-jwks-url is plain http: anyone on the path can substitute keys; use https"
            ),
            other => return Err(format!("--jwt-jwks-url scheme `{other}` is not http(s)")),
        }
        if issuer.is_none() {
            tracing::warn!(
                "--jwt-jwks-url without --jwt-issuer: tokens of any issuer whose key is in \
                 this set are accepted; set --jwt-issuer"
            );
        }
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        let jwks = Self {
            url: url.to_owned(),
            issuer: issuer.map(Into::into),
            client,
            keys: RwLock::default(),
            fetch: tokio::sync::Mutex::default(),
        };
        {
            let mut state = jwks.fetch.lock().await;
            jwks.load(&mut state).await;
        }
        Ok(jwks)
    }

    /// The key with id `kid` that accepts `alg` for a token claiming issuer `iss`,
    /// refetching the set once if the id is new. Only a token of this set's issuer that
    /// names a key id and an algorithm a published key can have prompts a fetch: HMAC
    /// tokens (no JWKS key accepts them) and tokens without `kid` are answered from the
    /// cache.
    pub async fn key_for(
        &self,
        iss: Option<&str>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Option<DecodingKey> {
        if alg.family() == AlgorithmFamily::Hmac {
            return None;
        }
        if let Some(issuer) = &self.issuer
            && iss != Some(&**issuer)
        {
            return None;
        }
        if let Some(found) = self.lookup(kid.unwrap_or(""), alg) {
            return found;
        }
        let kid = kid?;
        self.refetch().await;
        self.lookup(kid, alg).flatten()
    }

    /// `Some(key)` when cached and accepting `alg`, `Some(None)` when cached but not for
    /// `alg` (no refetch can change that soon), `None` when unknown.
    fn lookup(&self, kid: &str, alg: Algorithm) -> Option<Option<DecodingKey>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let cached = keys.get(kid)?;
        Some(cached.algorithms.contains(&alg).then(|| cached.key.clone()))
    }

    /// Fetches the set again for an unknown key id, unless an unknown key id already did
    /// within [`REFETCH_INTERVAL`] (the fetch at start does not count: a rotation right
    /// after start is still followed).
    async fn refetch(&self) {
        let mut state = self.fetch.lock().await;
        let interval = if state.loaded {
            REFETCH_INTERVAL
        } else {
            RETRY_UNLOADED
        };
        if state.last_refetch.is_some_and(|at| at.elapsed() < interval) {
            return;
        }
        state.last_refetch = Some(Instant::now());
        self.load(&mut state).await;
    }

    async fn load(&self, state: &mut FetchState) {
        match self.download().await {
            Ok(set) => {
                let fresh = Self::index(&set);
                tracing::info!(keys = fresh.len(), url = %self.url, "loaded the JWKS");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                state.loaded = true;
            }
            Err(error) => {
                tracing::warn!(%error, url = %self.url, "cannot fetch the JWKS; keeping the keys held");
            }
        }
    }

    async fn download(&self) -> Result<JwkSet, String> {
        let mut response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .error_for_status()
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the key set is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))
    }

    fn index(set: &JwkSet) -> KeyTable {
        set.keys
            .iter()
            .filter_map(|jwk| {
                let algorithms = algorithms_of(jwk)?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
                let kid = jwk.common.key_id.as_deref().unwrap_or("");
                Some((kid.into(), CachedKey { key, algorithms }))
            })
            .collect()
    }
}

/// The algorithms a JWKS entry may verify: its declared `alg` if that fits its key type,
/// else every algorithm of its type; `None` for entries never used to verify tokens.
fn algorithms_of(jwk: &Jwk) -> Option<Vec<Algorithm>> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA.to_vec(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(by_type),
        Some(declared) => {
            let declared = Algorithm::try_from(declared).ok()?;
            by_type.contains(&declared).then(|| vec![declared])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(json: serde_json::Value) -> Jwk {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn entries_keep_only_algorithms_their_key_type_allows() {
        let rsa = serde_json::json!({"kty": "RSA", "kid": "r", "n": "sXch", "e": "AQAB"});
        assert_eq!(algorithms_of(&jwk(rsa.clone())).unwrap().len(), 6);
        let mut rs256 = rsa.clone();
        rs256["alg"] = "RS256".into();
        assert_eq!(algorithms_of(&jwk(rs256)), Some(vec![Algorithm::RS256]));
        let mut mismatched = rsa.clone();
        mismatched["alg"] = "ES256".into();
        assert_eq!(algorithms_of(&jwk(mismatched)), None);
        let mut encryption = rsa;
        encryption["use"] = "enc".into();
        assert_eq!(algorithms_of(&jwk(encryption)), None);
        let oct = serde_json::json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"});
        assert_eq!(algorithms_of(&jwk(oct)), None, "no secrets from a JWKS");
        let ed = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "e", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(algorithms_of(&jwk(ed)), Some(vec![Algorithm::EdDSA]));
    }
}
