//! Which web origins may read the stream and publish, as `--cors-origins` says: one pure
//! policy that both stream writers and the HTTP routes ask, so they cannot disagree.
//!
//! - Not set: the stream answers `Access-Control-Allow-Origin: *` (what the seed did, and
//!   what browsers on any origin need for a credential-less `EventSource`); `POST` has no
//!   CORS headers.
//! - `*`: every origin may read the stream and publish, never with credentials.
//! - A list: a listed origin gets itself back with `Access-Control-Allow-Credentials:
//!   true` (cookies travel); any other origin gets no CORS header. Either way the answer
//!   varies by `Origin`, and says so.

/// Longest `Origin` header looked at; longer ones match nothing.
const MAX_ORIGIN_LEN: usize = 256;

/// Methods and request headers a preflight allows.
const ALLOW_METHODS: &str = "GET, POST";
const ALLOW_HEADERS: &str = "Authorization, Content-Type, Last-Event-ID, Idempotency-Key";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE_SECS: &str = "600";

/// The policy `--cors-origins` configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CorsPolicy {
    /// Not configured: `*` on the stream only.
    StreamOnly,
    /// `*`: any origin, no credentials.
    AnyOrigin,
    /// These origins (`scheme://host[:port]`), with credentials.
    Listed(Vec<Box<str>>),
}

/// The routes CORS applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /api/events/stream`.
    Stream,
    /// `POST /api/events`.
    Publish,
}

/// Response headers, names in lower case.
pub(crate) type Headers = Vec<(&'static str, String)>;

impl CorsPolicy {
    /// Reads `--cors-origins`: unset or empty, `*`, or a comma-separated list of origins
    /// such as `https://app.example.com`.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Self::StreamOnly);
        };
        if value == "*" {
            return Ok(Self::AnyOrigin);
        }
        let mut origins = Vec::new();
        for origin in value.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            // Visible ASCII only: a listed origin is written back verbatim into response
            // heads, where a control character (CR, LF, NUL) would end or add a header on
            // the raw-socket path and be dropped by hyper on the other. Browsers send
            // internationalised hosts in punycode, so nothing real is lost.
            let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                && origin.len() <= MAX_ORIGIN_LEN
                && origin.bytes().all(|b| b.is_ascii_graphic())
                && !origin.ends_with('/')
                && origin.split_once("://").is_some_and(|(_, host)| {
                    !host.is_empty() && !host.contains(['/', '*', ' ', '?', '#'])
                });
            if !valid {
                return Err(format!(
                    "{origin:?} is not an origin like https://app.example.com (scheme, host, \
                     optional port; no path, no trailing slash; `*` alone means any origin)"
                ));
            }
            origins.push(origin.to_ascii_lowercase().into_boxed_str());
        }
        Ok(Self::Listed(origins))
    }

    /// The CORS headers of a response on `route` to a request from `origin`.
    pub fn headers(&self, origin: Option<&[u8]>, route: Route) -> Headers {
        match self {
            Self::StreamOnly if route == Route::Stream => {
                vec![("access-control-allow-origin", "*".to_owned())]
            }
            Self::StreamOnly => Vec::new(),
            Self::AnyOrigin => vec![("access-control-allow-origin", "*".to_owned())],
            Self::Listed(_) => match self.allowed(origin) {
                Some(origin) => vec![
                    ("access-control-allow-origin", origin.to_owned()),
                    ("access-control-allow-credentials", "true".to_owned()),
                    ("vary", "Origin".to_owned()),
                ],
                None => vec![("vary", "Origin".to_owned())],
            },
        }
    }

    /// The answer to a preflight (`OPTIONS` on a CORS route) from `origin`: `None` when
    /// CORS is not configured (the route answers as before), else the headers of a `204`
    /// (no CORS headers for an origin that is not allowed, so the browser refuses).
    pub fn preflight(&self, origin: Option<&[u8]>) -> Option<Headers> {
        let mut headers = match self {
            Self::StreamOnly => return None,
            Self::AnyOrigin => self.headers(origin, Route::Publish),
            Self::Listed(_) => {
                let headers = self.headers(origin, Route::Publish);
                if self.allowed(origin).is_none() {
                    return Some(headers);
                }
                headers
            }
        };
        headers.extend([
            ("access-control-allow-methods", ALLOW_METHODS.to_owned()),
            ("access-control-allow-headers", ALLOW_HEADERS.to_owned()),
            ("access-control-max-age", MAX_AGE_SECS.to_owned()),
        ]);
        Some(headers)
    }

    /// The listed origin `origin` names, compared without regard to case.
    fn allowed(&self, origin: Option<&[u8]>) -> Option<&str> {
        let Self::Listed(origins) = self else {
            return None;
        };
        let origin = origin.filter(|o| o.len() <= MAX_ORIGIN_LEN)?;
        let origin = std::str::from_utf8(origin).ok()?;
        origins
            .iter()
            .find(|listed| listed.eq_ignore_ascii_case(origin))
            .map(|listed| &**listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy, a request's origin, a route and the headers expected.
    type Case<'a> = (
        &'a CorsPolicy,
        Option<&'a [u8]>,
        Route,
        &'a [(&'a str, &'a str)],
    );

    fn names(headers: &Headers) -> Vec<(&str, &str)> {
        headers.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }

    #[test]
    fn each_policy_answers_each_route_and_origin() {
        let listed =
            CorsPolicy::parse(Some("https://app.example.com, http://localhost:3000")).unwrap();
        let any = CorsPolicy::parse(Some("*")).unwrap();
        let unset = CorsPolicy::parse(None).unwrap();
        let app = Some(&b"https://app.example.com"[..]);
        let evil = Some(&b"https://evil.example"[..]);
        let star = [("access-control-allow-origin", "*")];
        let credentialed = [
            ("access-control-allow-origin", "https://app.example.com"),
            ("access-control-allow-credentials", "true"),
            ("vary", "Origin"),
        ];
        let cases: [Case<'_>; 9] = [
            (&unset, app, Route::Stream, &star),
            (&unset, app, Route::Publish, &[]),
            (&unset, None, Route::Stream, &star),
            (&any, evil, Route::Publish, &star),
            (&any, None, Route::Stream, &star),
            (&listed, app, Route::Stream, &credentialed),
            (&listed, app, Route::Publish, &credentialed),
            (&listed, evil, Route::Stream, &[("vary", "Origin")]),
            (&listed, None, Route::Publish, &[("vary", "Origin")]),
        ];
        for (policy, origin, route, want) in cases {
            assert_eq!(
                names(&policy.headers(origin, route)),
                want,
                "{policy:?} {origin:?} {route:?}"
            );
        }
        let upper = Some(&b"HTTPS://APP.EXAMPLE.COM"[..]);
        assert_eq!(
            names(&listed.headers(upper, Route::Stream))[0].1,
            "https://app.example.com"
        );
    }

    #[test]
    fn preflights_allow_the_methods_and_headers_only_to_allowed_origins() {
        let listed = CorsPolicy::parse(Some("https://app.example.com")).unwrap();
        let ok = listed.preflight(Some(b"https://app.example.com")).unwrap();
        let ok = names(&ok);
        assert!(ok.contains(&("access-control-allow-credentials", "true")));
        assert!(
            ok.iter()
                .any(|(n, v)| *n == "access-control-allow-headers" && v.contains("Authorization"))
        );
        assert!(ok.contains(&("access-control-allow-methods", "GET, POST")));
        let refused = listed.preflight(Some(b"https://evil.example")).unwrap();
        assert_eq!(names(&refused), [("vary", "Origin")]);
        assert!(
            CorsPolicy::parse(None)
                .unwrap()
                .preflight(Some(b"https://x.example"))
                .is_none()
        );
        let any = CorsPolicy::parse(Some("*"))
            .unwrap()
            .preflight(None)
            .unwrap();
        assert!(
            !names(&any)
                .iter()
                .any(|(n, _)| *n == "access-control-allow-credentials")
        );
    }

    #[test]
    fn bad_origins_are_refused_at_start() {
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://*.example.com",
            "ftp://x",
            "https://",
        ] {
            assert!(CorsPolicy::parse(Some(bad)).is_err(), "{bad}");
        }
        // Found by the cors_headers fuzz target: a control character inside an origin was
        // accepted and then written into the raw stream's response head.
        for bad in [
            "https://apxa\0pm",
            "https://a.example\r\nset-cookie: x=1",
            "https://a.example\nx:y",
            "https://a\x7f.example",
            "https://a\tb.example",
            "https://bücher.example",
        ] {
            assert!(CorsPolicy::parse(Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(
            CorsPolicy::parse(Some(" ")).unwrap(),
            CorsPolicy::StreamOnly
        );
    }
}
