//! Verifying a token against the configured keys.
//!
//! Each key carries the algorithms it accepts, decided when the key was read (from the
//! flag that named it, the PEM's key type and curve, or the JWKS entry), so the token's
//! `alg` only picks among keys that already accept it; it never decides how a key is used.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::jwks::Jwks;
use super::{Denied, Grant, check_length, grant_of};
use crate::config::Config;

/// Clock skew allowed on `exp` and `nbf`.
pub(crate) const LEEWAY: Duration = Duration::from_secs(30);

/// Algorithms of an HMAC secret.
const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// Algorithms of an RSA key.
pub(super) const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The claims read from a verified token.
#[derive(Debug, Deserialize)]
pub(crate) struct Claims {
    /// Expiry, seconds since the epoch (required).
    pub exp: u64,
    /// Subject.
    #[serde(default)]
    pub sub: Option<String>,
    /// What the token grants; none when absent.
    #[serde(default)]
    pub eventfabric: Grants,
}

/// The `eventfabric` claim.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Grants {
    /// Patterns of types the holder may receive.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Patterns of types the holder may publish.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Whether the holder may read the stats.
    #[serde(default)]
    pub stats: bool,
}

/// A key and the algorithms it accepts.
pub(super) struct Key {
    pub key: DecodingKey,
    pub algorithms: &'static [Algorithm],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The configured keys and the checks every token passes.
#[derive(Debug)]
pub(crate) struct Verifier {
    keys: Vec<Key>,
    jwks: Option<Jwks>,
    validation: Validation,
}

impl Verifier {
    /// The verifier of `config`, or `None` when no key is configured. An unreadable key
    /// is an error naming the flag and file, never showing the key.
    pub async fn from_config(config: &Config) -> Result<Option<Self>, String> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            if secret.expose().len() < 32 {
                tracing::warn!(
                    "--jwt-secret is shorter than 32 bytes: a short HMAC secret can be found \
                     by brute force from any token; use 32 random bytes or more"
                );
            }
            keys.push(Key {
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
                algorithms: HMAC,
            });
        }
        if let Some(path) = &config.jwt_public_key {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read --jwt-public-key {}: {e}", path.display()))?;
            keys.push(
                public_key(&pem)
                    .map_err(|e| format!("--jwt-public-key {}: {e}", path.display()))?,
            );
        }
        let jwks = match &config.jwt_jwks_url {
            Some(url) => Some(Jwks::start(url, config.jwt_issuer.as_deref()).await?),
            None => None,
        };
        if keys.is_empty() && jwks.is_none() {
            return Ok(None);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &config.jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self {
            keys,
            jwks,
            validation,
        }))
    }

    /// The grant of a token that verifies against a configured key.
    pub async fn verify(&self, token: &str) -> Result<Grant, Denied> {
        check_length(token)?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Denied::InvalidToken("the token is not a well-formed JWT"))?;
        let alg = header.alg;
        let mut first_error = None;
        for key in self.keys.iter().filter(|k| k.algorithms.contains(&alg)) {
            match self.check(token, alg, &key.key) {
                Ok(grant) => return Ok(grant),
                Err(denied) => {
                    first_error.get_or_insert(denied);
                }
            }
        }
        if let Some(jwks) = &self.jwks
            && let Some(key) = jwks
                .key_for(claimed_issuer(token).as_deref(), header.kid.as_deref(), alg)
                .await
        {
            return self.check(token, alg, &key);
        }
        Err(first_error.unwrap_or(Denied::InvalidToken(
            "no configured key accepts this token's algorithm and key id",
        )))
    }

    fn check(&self, token: &str, alg: Algorithm, key: &DecodingKey) -> Result<Grant, Denied> {
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            Denied::InvalidToken(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                ErrorKind::InvalidIssuer => "the token's issuer is not the configured one",
                ErrorKind::InvalidAudience => "the token's audience is not the configured one",
                ErrorKind::InvalidSignature => "the token's signature does not verify",
                ErrorKind::MissingRequiredClaim(_) => {
                    "the token lacks a required claim (exp, and iss or aud when configured)"
                }
                ErrorKind::InvalidAlgorithm => "the token's algorithm does not fit the key",
                ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                    "the token's claims are malformed"
                }
                _ => "the token is invalid",
            })
        })?;
        grant_of(data.claims)
    }
}

/// The `iss` a token claims, read before its signature is checked: only to pick the key
/// set it must verify against, never trusted (the signature check follows).
fn claimed_issuer(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Issuer {
        iss: Option<String>,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<Issuer>(token)
        .ok()?
        .iss
}

/// Object identifiers that tell a public key's type, as DER bytes (tag, length, value).
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// Reads a PEM public key and the algorithms its type allows.
pub(super) fn public_key(pem: &[u8]) -> Result<Key, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file".to_owned())?;
    let label = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("-----BEGIN "))
        .and_then(|rest| rest.strip_suffix("-----"))
        .ok_or("not a PEM file")?;
    let invalid = |e: jsonwebtoken::errors::Error| format!("not a usable public key: {e}");
    match label {
        "RSA PUBLIC KEY" => Ok(Key {
            key: DecodingKey::from_rsa_pem(pem).map_err(invalid)?,
            algorithms: RSA,
        }),
        "PUBLIC KEY" => {
            let der = pem_body(text)?;
            let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
            if has(OID_RSA) {
                Ok(Key {
                    key: DecodingKey::from_rsa_pem(pem).map_err(invalid)?,
                    algorithms: RSA,
                })
            } else if has(OID_P256) {
                Ok(Key {
                    key: DecodingKey::from_ec_pem(pem).map_err(invalid)?,
                    algorithms: &[Algorithm::ES256],
                })
            } else if has(OID_P384) {
                Ok(Key {
                    key: DecodingKey::from_ec_pem(pem).map_err(invalid)?,
                    algorithms: &[Algorithm::ES384],
                })
            } else if has(OID_ED25519) {
                Ok(Key {
                    key: DecodingKey::from_ed_pem(pem).map_err(invalid)?,
                    algorithms: &[Algorithm::EdDSA],
                })
            } else {
                Err(
                    "a public key of an unsupported type (use RSA, EC P-256, EC P-384 or Ed25519)"
                        .into(),
                )
            }
        }
        label if label.contains("PRIVATE KEY") => {
            Err("this is a private key; give its public key (`openssl pkey -pubout`)".into())
        }
        "CERTIFICATE" => {
            Err("this is a certificate; give its public key (`openssl x509 -pubkey -noout`)".into())
        }
        _ => Err("not a PEM public key".into()),
    }
}

/// The DER bytes of a PEM file's first block.
fn pem_body(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|line| !line.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END "))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| "the PEM body is not base64".to_owned())
}
