//! Who may subscribe to which event types, publish which, and read the stats.
//!
//! With no token key configured (`--jwt-secret`, `--jwt-public-key`, `--jwt-jwks-url`)
//! the gateway is open, as it always was: anyone may publish and read the stats, and a
//! stream without a token gets `--anonymous-types` (default `*`). With a key, a request
//! carries a JWT whose `eventfabric` claim grants what it may do:
//!
//! ```json
//! {"sub": "user-42", "exp": 1767225600,
//!  "eventfabric": {"subscribe": ["user:42:*", "news"], "publish": ["user:42:*"], "stats": false}}
//! ```
//!
//! Decisions made here, and why:
//! - The algorithm comes from the configured key, never from the token: an HMAC secret
//!   accepts only HS*, an RSA key RS*/PS*, an EC key the ES* of its curve, an Ed25519 key
//!   EdDSA (`keys.rs`). `alg: none` and key confusion (an HS256 token "signed" with a public
//!   key) find no key that accepts them.
//! - A broken token is refused (`401`) even where anonymous access would have served the
//!   request: it is a bug in the sender worth surfacing, not a reason to serve less.
//! - A cookie is read for streams and stats, never for a publish: a browser sends cookies
//!   with cross-site requests, so a cookie-authorized `POST` would be forgeable (CSRF).
//! - A stream's grant is fixed when it opens; at the token's `exp` the stream ends with a
//!   `retry:` hint, so the browser comes back with a fresh cookie and resumes by id.

mod jwks;
mod keys;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};

use crate::config::Config;
use crate::event::{MAX_PATTERNS, TypeFilter, validate_pattern};

pub(crate) use keys::{LEEWAY, Verifier};

/// Longest token read; a longer one is refused without being decoded.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Where a request's token may come from, as sent; chosen from by [`Auth::token`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    /// The `Authorization` header.
    pub authorization: Option<Box<[u8]>>,
    /// The `Cookie` header.
    pub cookie: Option<Box<[u8]>>,
    /// `?access_token=` from the query.
    pub query: Option<Box<str>>,
}

impl Credentials {
    /// The credentials of a request that hyper parsed.
    pub fn from_headers(headers: &HeaderMap, query: Option<&str>) -> Self {
        let header = |name| headers.get(name).map(|v| Box::from(v.as_bytes()));
        Self {
            authorization: header(axum::http::header::AUTHORIZATION),
            cookie: header(axum::http::header::COOKIE),
            query: query.and_then(query_token),
        }
    }
}

/// `access_token` from a query string.
pub(crate) fn query_token(query: &str) -> Option<Box<str>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "access_token")
        .map(|(_, value)| value.into())
}

/// Why a request is refused; the message is safe to send (it never quotes the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No token, where one is needed.
    MissingToken,
    /// A token that does not verify, has expired, or is malformed.
    InvalidToken(&'static str),
    /// A valid token that does not grant this.
    Forbidden(&'static str),
}

impl Denied {
    /// Status, error code and message of the answer.
    pub fn status_code_message(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a token is required: send `Authorization: Bearer <jwt>`",
            ),
            Self::InvalidToken(why) => (StatusCode::UNAUTHORIZED, "unauthorized", why),
            Self::Forbidden(why) => (StatusCode::FORBIDDEN, "forbidden", why),
        }
    }

    /// The `WWW-Authenticate` header of a `401` (RFC 6750: no error code when no token
    /// was sent).
    pub fn www_authenticate(self) -> Option<&'static str> {
        match self {
            Self::MissingToken => Some(r#"Bearer realm="eventfabric""#),
            Self::InvalidToken(_) => Some(r#"Bearer realm="eventfabric", error="invalid_token""#),
            Self::Forbidden(_) => None,
        }
    }
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    /// Types the holder may receive.
    pub subscribe: TypeFilter,
    /// Types the holder may publish.
    pub publish: TypeFilter,
    /// Whether the holder may read the stats.
    pub stats: bool,
    /// The token's `sub`, for per-subject rate limits.
    pub subject: Option<Box<str>>,
    /// When the token expires.
    pub expires: SystemTime,
}

/// What a stream may receive, once admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamGrant {
    /// The filter the stream is served with: what it asked for, inside what it may have.
    pub types: TypeFilter,
    /// When the stream must end (its token's `exp`).
    pub expires: Option<SystemTime>,
}

/// The access policy of a gateway.
#[derive(Debug)]
pub(crate) struct Auth {
    verifier: Option<Verifier>,
    anonymous: TypeFilter,
    cookie: Box<str>,
    allow_query_token: bool,
    public_stats: bool,
}

impl Auth {
    /// The policy `config` describes; fails on an unreadable key (named, never shown).
    pub async fn from_config(config: &Config) -> Result<Self, String> {
        let verifier = Verifier::from_config(config).await?;
        let anonymous = match &config.anonymous_types {
            Some(list) => parse_patterns(list)?,
            None if verifier.is_some() => TypeFilter::nothing(),
            None => TypeFilter::default(),
        };
        Ok(Self {
            verifier,
            anonymous,
            cookie: config.jwt_cookie.as_str().into(),
            allow_query_token: config.allow_query_token,
            public_stats: config.public_stats,
        })
    }

    /// An open policy: no key, every type for everyone.
    #[cfg(test)]
    pub fn open() -> Self {
        Self {
            verifier: None,
            anonymous: TypeFilter::default(),
            cookie: "eventfabric_token".into(),
            allow_query_token: false,
            public_stats: true,
        }
    }

    /// Whether a token key is configured.
    pub fn is_enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// The token a request carries: the `Authorization: Bearer` header, else (where
    /// `cookie_ok`) the configured cookie, else `?access_token=` when allowed. A header
    /// that is present but not a Bearer token is an invalid token, not an absent one.
    fn token<'a>(
        &self,
        credentials: &'a Credentials,
        cookie_ok: bool,
    ) -> Result<Option<&'a str>, Denied> {
        if let Some(header) = &credentials.authorization {
            return bearer(header).map(Some);
        }
        if cookie_ok
            && let Some(cookie) = credentials
                .cookie
                .as_deref()
                .and_then(|c| cookie_value(c, &self.cookie))
        {
            return Ok(Some(cookie));
        }
        if self.allow_query_token
            && let Some(token) = credentials.query.as_deref()
        {
            return Ok(Some(token));
        }
        Ok(None)
    }

    /// The grant of `token`.
    async fn verify(&self, token: &str) -> Result<Grant, Denied> {
        match &self.verifier {
            Some(verifier) => verifier.verify(token).await,
            None => Err(Denied::InvalidToken(
                "this gateway has no token key configured",
            )),
        }
    }

    /// What a stream that asked for `requested` may receive.
    pub async fn subscriber(
        &self,
        credentials: &Credentials,
        requested: &TypeFilter,
    ) -> Result<StreamGrant, Denied> {
        // Without a key there is nothing to check a token with: whatever the request
        // carries is ignored, as it always was, rather than refused.
        let token = if self.is_enabled() {
            self.token(credentials, true)?
        } else {
            None
        };
        let (allowed, expires) = match token {
            Some(token) => {
                let grant = self.verify(token).await?;
                (grant.subscribe, Some(grant.expires))
            }
            None if self.anonymous.is_nothing() => return Err(Denied::MissingToken),
            None => (self.anonymous.clone(), None),
        };
        let types = if requested.is_everything() {
            allowed
        } else if allowed.covers_all(requested) {
            requested.clone()
        } else {
            return Err(Denied::Forbidden(
                "`types` asks for event types this client may not receive",
            ));
        };
        if types.is_nothing() {
            return Err(Denied::Forbidden("this token grants no event types"));
        }
        Ok(StreamGrant { types, expires })
    }

    /// The grant of a publisher, or `None` when no key is configured (anyone may publish).
    /// Only the `Authorization` header counts (a browser attaches cookies on another
    /// site's behalf); the handler passes no query.
    pub async fn publisher(&self, credentials: &Credentials) -> Result<Option<Grant>, Denied> {
        if !self.is_enabled() {
            return Ok(None);
        }
        match self.token(credentials, false)? {
            Some(token) => self.verify(token).await.map(Some),
            None => Err(Denied::MissingToken),
        }
    }

    /// Whether the stats may be read.
    pub async fn stats_reader(&self, credentials: &Credentials) -> Result<(), Denied> {
        if !self.is_enabled() || self.public_stats {
            return Ok(());
        }
        let Some(token) = self.token(credentials, true)? else {
            return Err(Denied::MissingToken);
        };
        if self.verify(token).await?.stats {
            Ok(())
        } else {
            Err(Denied::Forbidden("this token does not grant the stats"))
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(header: &[u8]) -> Result<&str, Denied> {
    let invalid = Denied::InvalidToken("the Authorization header must be `Bearer <jwt>`");
    let text = std::str::from_utf8(header).map_err(|_| invalid)?.trim();
    let (scheme, token) = text.split_once(' ').ok_or(invalid)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(invalid);
    }
    Ok(token)
}

/// The value of cookie `name` in a `Cookie` header, if present and not empty.
fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(header).ok()?;
    text.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        let value = value.trim().trim_matches('"');
        (key.trim() == name && !value.is_empty()).then_some(value)
    })
}

/// Parses a comma-separated list of type patterns (`--anonymous-types`); an empty list
/// allows nothing.
pub(crate) fn parse_patterns(list: &str) -> Result<TypeFilter, String> {
    let patterns = list
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            validate_pattern(p)
                .map(|()| Box::from(p))
                .map_err(|e| format!("`{p}` is not a type or a prefix ending in `*`: {e}"))
        })
        .collect::<Result<Vec<Box<str>>, String>>()?;
    grant_filter(patterns).map_err(str::to_owned)
}

/// The filter of a grant's patterns; none is a grant of nothing.
fn grant_filter(patterns: Vec<Box<str>>) -> Result<TypeFilter, &'static str> {
    if patterns.len() > MAX_PATTERNS {
        return Err("a grant may hold at most 64 patterns");
    }
    if patterns.is_empty() {
        return Ok(TypeFilter::nothing());
    }
    Ok(TypeFilter::only(patterns))
}

/// The grants of a verified token's claims.
pub(crate) fn grant_of(claims: keys::Claims) -> Result<Grant, Denied> {
    let patterns = |list: Vec<String>| {
        let list: Vec<Box<str>> = list.into_iter().map(Into::into).collect();
        if list.iter().any(|p| validate_pattern(p).is_err()) {
            return Err(Denied::InvalidToken(
                "the token grants a pattern that is not a type or a prefix ending in `*`",
            ));
        }
        grant_filter(list).map_err(Denied::InvalidToken)
    };
    let grants = claims.eventfabric;
    let expires = UNIX_EPOCH + Duration::from_secs(claims.exp);
    Ok(Grant {
        subscribe: patterns(grants.subscribe)?,
        publish: patterns(grants.publish)?,
        stats: grants.stats,
        subject: claims.sub.map(Into::into),
        expires,
    })
}

/// Whether a token is short enough to be looked at.
fn check_length(token: &str) -> Result<(), Denied> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Denied::InvalidToken("the token is longer than 8 KiB"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_header_then_the_cookie_then_the_query() {
        let auth = Auth {
            allow_query_token: true,
            ..Auth::open()
        };
        let creds =
            |auth_header: Option<&str>, cookie: Option<&str>, query: Option<&str>| Credentials {
                authorization: auth_header.map(|h| Box::from(h.as_bytes())),
                cookie: cookie.map(|c| Box::from(c.as_bytes())),
                query: query.map(Into::into),
            };
        let all = creds(
            Some("Bearer aaa"),
            Some("x=1; eventfabric_token=ccc"),
            Some("qqq"),
        );
        assert_eq!(auth.token(&all, true), Ok(Some("aaa")));
        let no_header = creds(None, Some("x=1; eventfabric_token=ccc"), Some("qqq"));
        assert_eq!(auth.token(&no_header, true), Ok(Some("ccc")));
        assert_eq!(auth.token(&no_header, false), Ok(Some("qqq")));
        let query_only = creds(None, Some("other=1"), Some("qqq"));
        assert_eq!(auth.token(&query_only, true), Ok(Some("qqq")));
        let strict = Auth::open();
        assert_eq!(strict.token(&query_only, true), Ok(None));
        for bad in ["Basic abc", "Bearer", "Bearer  ", "bearer", "Token x"] {
            let c = creds(Some(bad), None, None);
            assert!(
                matches!(auth.token(&c, true), Err(Denied::InvalidToken(_))),
                "{bad}"
            );
        }
        assert_eq!(
            auth.token(&creds(Some("bEaReR   tok "), None, None), true),
            Ok(Some("tok"))
        );
    }

    #[test]
    fn cookies_are_matched_by_exact_name() {
        assert_eq!(cookie_value(b"a=1; tok=xyz", "tok"), Some("xyz"));
        assert_eq!(cookie_value(b"mytok=1; tok=\"q\"", "tok"), Some("q"));
        assert_eq!(cookie_value(b"mytok=1", "tok"), None);
        assert_eq!(cookie_value(b"tok=", "tok"), None);
        assert_eq!(cookie_value(b"\xff\xfe", "tok"), None);
    }

    #[test]
    fn anonymous_patterns_are_checked() {
        assert!(parse_patterns("").unwrap().is_nothing());
        assert!(parse_patterns("*").unwrap().is_everything());
        assert!(parse_patterns("news, user:*").unwrap().wants("user:1"));
        assert!(parse_patterns("a b").is_err());
        assert!(parse_patterns("a*b").is_err());
        let many = vec!["t"; 65].join(",");
        assert!(parse_patterns(&many).is_err());
    }

    #[tokio::test]
    async fn an_open_gateway_serves_what_is_asked_and_ignores_tokens() {
        let auth = Auth::open();
        let asked = TypeFilter::only(vec!["a".into()]);
        let token = Credentials {
            authorization: Some(Box::from(&b"Bearer whatever"[..])),
            ..Credentials::default()
        };
        let grant = auth.subscriber(&token, &asked).await.unwrap();
        assert_eq!(grant.types, asked);
        assert_eq!(grant.expires, None);
        assert_eq!(auth.publisher(&token).await, Ok(None));
        assert_eq!(auth.stats_reader(&token).await, Ok(()));
    }

    #[tokio::test]
    async fn anonymous_streams_get_only_the_anonymous_types() {
        let auth = Auth {
            anonymous: parse_patterns("public:*").unwrap(),
            ..Auth::open()
        };
        let none = Credentials::default();
        let grant = auth
            .subscriber(&none, &TypeFilter::default())
            .await
            .unwrap();
        assert!(grant.types.wants("public:x") && !grant.types.wants("private"));
        let inside = TypeFilter::only(vec!["public:a".into()]);
        assert_eq!(auth.subscriber(&none, &inside).await.unwrap().types, inside);
        let outside = TypeFilter::only(vec!["public:a".into(), "private".into()]);
        assert!(matches!(
            auth.subscriber(&none, &outside).await,
            Err(Denied::Forbidden(_))
        ));
        let closed = Auth {
            anonymous: TypeFilter::nothing(),
            ..Auth::open()
        };
        assert_eq!(
            closed.subscriber(&none, &TypeFilter::default()).await,
            Err(Denied::MissingToken)
        );
    }

    #[test]
    fn refusals_carry_the_bearer_challenge() {
        let (status, code, _) = Denied::MissingToken.status_code_message();
        assert_eq!((status, code), (StatusCode::UNAUTHORIZED, "unauthorized"));
        assert!(
            !Denied::MissingToken
                .www_authenticate()
                .unwrap()
                .contains("error=")
        );
        assert!(
            Denied::InvalidToken("x")
                .www_authenticate()
                .unwrap()
                .contains(r#"error="invalid_token""#)
        );
        let (status, code, _) = Denied::Forbidden("x").status_code_message();
        assert_eq!((status, code), (StatusCode::FORBIDDEN, "forbidden"));
        assert_eq!(Denied::Forbidden("x").www_authenticate(), None);
    }
}
