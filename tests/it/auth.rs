//! Access control (issue 10): tokens minted by PyJWT with keys made per run, checked on
//! both stream paths (a fresh connection served on the raw socket, a reused keep-alive one
//! served by hyper), grants that keep private types private across replicas and in replay,
//! expiry ending a stream that then resumes with nothing lost, publish and stats rules,
//! and a JWKS served by a small local server, with a key rotation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::tokens::{Keys, at, grants};
use crate::harness::wire::{
    Head, on_fresh_connection, on_reused_connection, read_body, read_until_closed,
};
use crate::harness::{GatewayBuilder, GatewayProc, RedisProc, unique_namespace};

/// Longest wait for anything that should happen at once.
const T: Duration = Duration::from_secs(5);

/// A stream request carrying `extra` header lines (each ending in `\r\n`).
fn stream_request(query: &str, extra: &str) -> String {
    format!("GET /api/events/stream{query} HTTP/1.1\r\nhost: t\r\n{extra}\r\n")
}

fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}\r\n")
}

/// The stream request's answer on a fresh and on a reused connection, with the body bytes
/// that came with the head (a refusal's JSON, or a stream's first bytes).
async fn on_both_paths(addr: SocketAddr, request: &str) -> [(Head, String); 2] {
    let mut answers = Vec::new();
    for reused in [false, true] {
        let (mut tcp, head) = if reused {
            on_reused_connection(addr, request).await
        } else {
            on_fresh_connection(addr, request).await
        }
        .unwrap_or_else(|| panic!("an answer (reused: {reused}) to {request:.300}"));
        let mut body = head.body_start.clone();
        if head.status != 200 {
            let length = head
                .header("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            body = read_body(&mut tcp, body, length, T)
                .await
                .unwrap_or_else(|| panic!("a complete body (reused: {reused}): {head:?}"));
        }
        answers.push((head, String::from_utf8_lossy(&body).into_owned()));
    }
    answers.try_into().expect("two answers")
}

/// Asserts a refusal with `status`, the JSON error `code` and, for a 401, the Bearer
/// challenge (with `error="invalid_token"` when `invalid`).
fn assert_refused(head: &Head, body: &str, status: u16, code: &str, invalid: bool, what: &str) {
    assert_eq!(head.status, status, "{what}: {head:?} {body}");
    assert_eq!(
        head.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    let json: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {body}"));
    assert_eq!(json["error"], code, "{what}: {json}");
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    if status == 401 {
        let challenge = head.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
        assert_eq!(
            challenge.contains(r#"error="invalid_token""#),
            invalid,
            "{what}: {challenge}"
        );
    }
}

/// A token with `alg: none` and no signature, written by hand (no library makes one).
fn alg_none(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

/// The token with one character of its payload changed (signature kept).
fn tampered(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let payload = &mut parts[1];
    let last = payload.pop().expect("a payload");
    payload.push(if last == 'A' { 'B' } else { 'A' });
    parts.join(".")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_or_broken_token_gets_401_on_both_stream_paths() {
    let Some(keys) = Keys::generate() else { return };
    // Anonymous types exist, so a 401 here is the broken token's, not a missing one's.
    let gw = GatewayBuilder::new()
        .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
        .opt("--jwt-public-key", keys.rsa.public.display())
        .opt("--jwt-issuer", "https://idp.test")
        .opt("--jwt-audience", "eventfabric")
        .opt("--anonymous-types", "public:*")
        .spawn();
    let good = || {
        let mut claims = grants(&["*"], &[], false);
        claims["iss"] = "https://idp.test".into();
        claims["aud"] = "eventfabric".into();
        claims
    };
    let with = |key: &str, value: Value| {
        let mut claims = good();
        claims[key] = value;
        claims
    };
    let without = |key: &str| {
        let mut claims = good();
        claims.as_object_mut().unwrap().remove(key);
        claims
    };
    let rsa = keys.rsa.private.display().to_string();
    let other = keys.rsa_other.private.display().to_string();
    let hs = |claims: Value| json!({"alg": "HS256", "secret": keys.secret, "claims": claims});
    let minted = keys.mint(&[
        // Accepted:
        hs(good()),
        json!({"alg": "HS512", "secret": keys.secret, "claims": good()}),
        json!({"alg": "RS256", "key_file": rsa, "claims": good()}),
        json!({"alg": "PS384", "key_file": rsa, "claims": good()}),
        hs(with("exp", at(-10).into())),
        // Refused:
        hs(with("exp", at(-120).into())),
        hs(with("nbf", at(300).into())),
        hs(with("iss", "https://evil.test".into())),
        hs(without("iss")),
        hs(with("aud", "someone-else".into())),
        hs(without("aud")),
        hs(without("exp")),
        json!({"alg": "HS256", "secret": "not-the-secret-not-the-secret-not-the", "claims": good()}),
        json!({"alg": "RS256", "key_file": other, "claims": good()}),
        json!({"forge": "hmac_with_file", "alg": "HS256",
               "key_file": keys.rsa.public.display().to_string(), "claims": good()}),
        hs(with("eventfabric", json!({"subscribe": ["a*b"]}))),
        hs(with("eventfabric", json!({"subscribe": "everything"}))),
    ]);
    let token = |i: usize| minted[i].as_str().unwrap().to_owned();
    let addr = gw.addr();
    for (i, what) in [
        (0, "HS256"),
        (1, "HS512"),
        (2, "RS256"),
        (3, "PS384"),
        (4, "expired 10 s ago, within the skew"),
    ] {
        for (head, body) in on_both_paths(addr, &stream_request("", &bearer(&token(i)))).await {
            assert_eq!(head.status, 200, "{what}: {head:?} {body}");
            assert!(body.contains("retry:") || body.is_empty(), "{what}: {body}");
        }
    }
    let refused: Vec<(String, &str)> = vec![
        (token(5), "expired two minutes ago"),
        (token(6), "not valid before five minutes from now"),
        (token(7), "another issuer"),
        (token(8), "no issuer"),
        (token(9), "another audience"),
        (token(10), "no audience"),
        (token(11), "no exp"),
        (token(12), "HS256 with another secret"),
        (token(13), "RS256 with a key nobody trusts"),
        (
            token(14),
            "HS256 keyed with the RSA public key (key confusion)",
        ),
        (token(15), "a grant pattern that is not one"),
        (token(16), "a grant that is not a list"),
        (tampered(&token(0)), "tampered HS256 payload"),
        (tampered(&token(2)), "tampered RS256 payload"),
        (alg_none(&good()), "alg none"),
        ("not-a-jwt".to_owned(), "garbage"),
        ("a.b.c".to_owned(), "three garbage parts"),
        (format!("{}x", "e".repeat(9000)), "longer than 8 KiB"),
    ];
    for (token, what) in &refused {
        for (head, body) in on_both_paths(addr, &stream_request("", &bearer(token))).await {
            assert_refused(&head, &body, 401, "unauthorized", true, what);
            assert!(
                !body.contains(token.as_str()),
                "{what}: the body quotes the token"
            );
        }
    }
    // A header that is not a Bearer token is broken too; a missing one is anonymous.
    for (head, body) in
        on_both_paths(addr, &stream_request("", "authorization: Basic dTpw\r\n")).await
    {
        assert_refused(&head, &body, 401, "unauthorized", true, "Basic credentials");
    }
    for (head, body) in on_both_paths(addr, &stream_request("?types=private", "")).await {
        assert_refused(
            &head,
            &body,
            403,
            "forbidden",
            false,
            "anonymous asks for more",
        );
    }
    for (head, body) in on_both_paths(addr, &stream_request("?types=public:news", "")).await {
        assert_eq!(head.status, 200, "anonymous within its types: {body}");
    }
    let log = gw.log();
    for (token, _) in &refused {
        if token.len() > 20 {
            assert!(!log.contains(token.as_str()), "a token reached the log");
        }
    }
    assert!(!log.contains(&keys.secret), "the secret reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_and_ed25519_keys_accept_only_their_own_algorithm() {
    let Some(keys) = Keys::generate() else { return };
    let ec = GatewayBuilder::new()
        .opt("--jwt-public-key", keys.ec.public.display())
        .spawn();
    let ed = GatewayBuilder::new()
        .opt("--jwt-public-key", keys.ed.public.display())
        .spawn();
    let claims = grants(&["*"], &[], false);
    let minted = keys.mint(&[
        json!({"alg": "ES256", "key_file": keys.ec.private.display().to_string(), "claims": claims}),
        json!({"alg": "EdDSA", "key_file": keys.ed.private.display().to_string(), "claims": claims}),
        json!({"forge": "hmac_with_file", "alg": "HS256",
               "key_file": keys.ec.public.display().to_string(), "claims": claims}),
    ]);
    let token = |i: usize| minted[i].as_str().unwrap().to_owned();
    for (gw, accepted, refused) in [(&ec, 0, [1, 2]), (&ed, 1, [0, 2])] {
        for (head, body) in
            on_both_paths(gw.addr(), &stream_request("", &bearer(&token(accepted)))).await
        {
            assert_eq!(head.status, 200, "{body}");
        }
        for i in refused {
            for (head, body) in
                on_both_paths(gw.addr(), &stream_request("", &bearer(&token(i)))).await
            {
                assert_refused(
                    &head,
                    &body,
                    401,
                    "unauthorized",
                    true,
                    "another key's token",
                );
            }
        }
        // With a key configured and no --anonymous-types, a stream needs a token.
        for (head, body) in on_both_paths(gw.addr(), &stream_request("", "")).await {
            assert_refused(&head, &body, 401, "unauthorized", false, "no token");
        }
    }
}

/// Publishes through `gw` with `token`; returns the status and body.
async fn publish(
    gw: &GatewayProc,
    token: Option<&str>,
    cookie: Option<&str>,
    ty: &str,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/events", gw.base_url()))
        .json(&json!({"type": ty, "data": {"ty": ty}}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(cookie) = cookie {
        request = request.header("cookie", format!("eventfabric_token={cookie}"));
    }
    let response = request.send().await.expect("POST /api/events");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Reads a stream with `token` (as a cookie) after `last_event_id`, until `count` events or
/// `within`; returns the event types in order.
async fn event_types(
    base: &str,
    token: &str,
    query: &str,
    last_event_id: Option<&str>,
    count: usize,
    within: Duration,
) -> Vec<String> {
    let mut request = reqwest::Client::new()
        .get(format!("{base}/api/events/stream{query}"))
        .header("cookie", format!("other=1; eventfabric_token={token}"));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.expect("GET the stream");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + within;
    use futures::StreamExt as _;
    loop {
        let types: Vec<String> = crate::harness::sse::event_blocks(&text)
            .iter()
            .map(|b| {
                crate::harness::sse::parse_block(b).json()["type"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        if types.len() >= count {
            return types;
        }
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => return types,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_types_stay_private_across_replicas_and_in_replay() {
    let Some(keys) = Keys::generate() else { return };
    let redis = RedisProc::start();
    let ns = unique_namespace("auth");
    let replica = |id: &str| {
        GatewayBuilder::new()
            .redis_url(redis.url())
            .namespace(&ns)
            .replica_id(id)
            .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
            .spawn()
    };
    let gws = [replica("a"), replica("b"), replica("c")];
    let memory = GatewayBuilder::new()
        .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
        .spawn();
    for gw in &gws {
        gw.api().wait_ready(Duration::from_secs(15)).await;
    }
    let alice = keys.hs256(grants(&["user:1:*", "news"], &[], false));
    let bob = keys.hs256(grants(&["user:2:*"], &[], false));
    let producer = keys.hs256(grants(&[], &["*"], false));
    let sequence = [
        "news",
        "user:1:login",
        "user:2:login",
        "secret",
        "user:1:logout",
        "user:2:x",
    ];
    for (fabric, publish_via, readers) in [
        ("redis", &gws[0], [&gws[1], &gws[2]]),
        ("memory", &memory, [&memory, &memory]),
    ] {
        let first = publish(publish_via, Some(&producer), None, "start").await;
        assert_eq!(first.0, 202, "{fabric}: {:?}", first.1);
        let start_id = first.1["id"].as_str().unwrap().to_owned();
        let (alice_base, bob_base) = (readers[0].base_url(), readers[1].base_url());
        let live_alice = event_types(&alice_base, &alice, "", None, 3, Duration::from_secs(10));
        let live_bob = event_types(&bob_base, &bob, "", None, 2, Duration::from_secs(10));
        let publishing = async {
            // Both streams are open before the events go out.
            tokio::time::sleep(Duration::from_millis(500)).await;
            for ty in sequence {
                let (status, body) = publish(publish_via, Some(&producer), None, ty).await;
                assert_eq!(status, 202, "{fabric} {ty}: {body}");
            }
        };
        let (alice_live, bob_live, ()) = tokio::join!(live_alice, live_bob, publishing);
        assert_eq!(
            alice_live,
            ["news", "user:1:login", "user:1:logout"],
            "{fabric} live"
        );
        assert_eq!(bob_live, ["user:2:login", "user:2:x"], "{fabric} live");
        // Replay from the start: the same, and nothing else, even given time to leak.
        let alice_replay = event_types(
            &readers[1].base_url(),
            &alice,
            "",
            Some(&start_id),
            4,
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(
            alice_replay,
            ["news", "user:1:login", "user:1:logout"],
            "{fabric} replay"
        );
        let narrowed = event_types(
            &readers[0].base_url(),
            &alice,
            "?types=user:1:*",
            Some(&start_id),
            3,
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(
            narrowed,
            ["user:1:login", "user:1:logout"],
            "{fabric} narrowed"
        );
    }
    // Asking for more than the grant is refused on both paths.
    let cookie = format!("cookie: eventfabric_token={alice}\r\n");
    for (head, body) in
        on_both_paths(gws[0].addr(), &stream_request("?types=user:*", &cookie)).await
    {
        assert_refused(
            &head,
            &body,
            403,
            "forbidden",
            false,
            "types beyond the grant",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_and_stats_need_the_right_grant_and_a_refused_event_goes_nowhere() {
    let Some(keys) = Keys::generate() else { return };
    let gw = GatewayBuilder::new()
        .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
        .spawn();
    let producer = keys.hs256(grants(&["*"], &["orders:*"], false));
    let reader = keys.hs256(grants(&["*"], &[], true));
    let expired = keys.hs256(json!({"exp": at(-600), "eventfabric": {"publish": ["*"]}}));
    // Without a token, with a cookie only (CSRF), with a broken or expired one: 401.
    for (token, cookie, what) in [
        (None, None, "no token"),
        (None, Some(producer.as_str()), "cookie only"),
        (Some("garbage"), None, "garbage"),
        (Some(expired.as_str()), None, "expired"),
    ] {
        let (status, body) = publish(&gw, token, cookie, "orders:new").await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "unauthorized", "{what}");
    }
    // A type outside the grant: 403, and nothing stored (a reader sees only the allowed one).
    let (status, body) = publish(&gw, Some(&producer), None, "orders:first").await;
    assert_eq!(status, 202, "{body}");
    let first = body["id"].as_str().unwrap().to_owned();
    let (status, body) = publish(&gw, Some(&producer), None, "payments:new").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (status, body) = publish(&gw, Some(&producer), None, "orders:new").await;
    assert_eq!(status, 202, "{body}");
    let seen = event_types(
        &gw.base_url(),
        &reader,
        "",
        Some(&first),
        2,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(seen, ["orders:new"]);
    // Stats: a token with `"stats": true`, as a header or the cookie.
    let stats = |auth: Option<(&str, String)>| {
        let mut request = reqwest::Client::new().get(format!("{}/api/events/stats", gw.base_url()));
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.headers().get("www-authenticate").is_some(),
            )
        }
    };
    assert_eq!(stats(None).await, (401, true));
    assert_eq!(
        stats(Some(("authorization", format!("Bearer {producer}")))).await,
        (403, false)
    );
    assert_eq!(
        stats(Some(("authorization", format!("Bearer {reader}"))))
            .await
            .0,
        200
    );
    assert_eq!(
        stats(Some(("cookie", format!("eventfabric_token={reader}"))))
            .await
            .0,
        200
    );
    // Probes stay open.
    assert_eq!(gw.api().get("/healthz").await.0, 200);
    assert_eq!(gw.api().get("/metrics").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_stats_admin_address_and_query_tokens_follow_their_flags() {
    let Some(keys) = Keys::generate() else { return };
    let admin = crate::harness::free_port();
    let gw = GatewayBuilder::new()
        .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
        .env("EVENTFABRIC_PUBLIC_STATS", "true")
        .env("EVENTFABRIC_ALLOW_QUERY_TOKEN", "true")
        .opt("--admin-listen", format!("127.0.0.1:{admin}"))
        .spawn();
    assert_eq!(gw.api().get("/api/events/stats").await.0, 200);
    // Probes and metrics moved to the admin address.
    assert_eq!(gw.api().get("/metrics").await.0, 404);
    assert_eq!(gw.api().get("/readyz").await.0, 404);
    let admin_api = crate::harness::Api::new(&format!("http://127.0.0.1:{admin}"));
    assert_eq!(admin_api.get("/healthz").await.0, 200);
    assert_eq!(admin_api.get("/readyz").await.0, 200);
    assert!(
        admin_api
            .get("/metrics")
            .await
            .1
            .contains("eventfabric_auth_refusals")
    );
    assert_eq!(admin_api.get("/api/events/stats").await.0, 404);
    // `?access_token=` is read when allowed.
    let token = keys.hs256(grants(&["*"], &[], false));
    for (head, body) in on_both_paths(
        gw.addr(),
        &stream_request(&format!("?access_token={token}"), ""),
    )
    .await
    {
        assert_eq!(head.status, 200, "{body}");
    }
    for (head, body) in on_both_paths(gw.addr(), &stream_request("?access_token=forged", "")).await
    {
        assert_refused(
            &head,
            &body,
            401,
            "unauthorized",
            true,
            "a forged query token",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_expiry_the_stream_ends_and_resuming_with_a_fresh_token_loses_nothing() {
    let Some(keys) = Keys::generate() else { return };
    let gw = GatewayBuilder::new()
        .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
        .opt("--retry-ms", 3000)
        .spawn();
    let producer = keys.hs256(grants(&[], &["*"], false));
    let expiring = |seconds: i64| {
        keys.hs256(json!({"exp": at(seconds), "eventfabric": {"subscribe": ["tick"]}}))
    };
    let short = expiring(3);
    let addr = gw.addr();
    // Both paths: the stream ends at `exp` with a short `retry:` as its last bytes.
    let mut streams = Vec::new();
    for reused in [false, true] {
        let request = stream_request("", &bearer(&short));
        let (tcp, head) = if reused {
            on_reused_connection(addr, &request).await
        } else {
            on_fresh_connection(addr, &request).await
        }
        .expect("a stream");
        assert_eq!(head.status, 200);
        streams.push((tcp, String::from_utf8_lossy(&head.body_start).to_string()));
    }
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = publish(&gw, Some(&producer), None, "tick").await;
        assert_eq!(status, 202);
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    for (tcp, text) in &mut streams {
        assert!(
            read_until_closed(tcp, text, Duration::from_secs(8)).await,
            "ended: {text}"
        );
        // The last SSE field is the short retry (the reused connection's body is chunked).
        let farewell = text
            .rfind("retry: 1000")
            .unwrap_or_else(|| panic!("{text}"));
        assert!(!text[farewell..].contains("id:"), "{text}");
        for id in &ids {
            assert!(text.contains(&format!("id: {id}")), "{id} in {text}");
        }
    }
    let ended = started.elapsed();
    assert!(
        ended < Duration::from_secs(7),
        "ended {ended:?} after start"
    );
    // Published while no stream was open:
    let mut missed = Vec::new();
    for _ in 0..2 {
        let (_, body) = publish(&gw, Some(&producer), None, "tick").await;
        missed.push(body["id"].as_str().unwrap().to_owned());
    }
    let fresh = expiring(600);
    let request = stream_request(
        "",
        &format!("{}last-event-id: {}\r\n", bearer(&fresh), ids[2]),
    );
    let (mut tcp, head) = on_fresh_connection(addr, &request).await.unwrap();
    assert_eq!(head.status, 200);
    let mut text = String::from_utf8_lossy(&head.body_start).to_string();
    let _ = read_until_closed(&mut tcp, &mut text, Duration::from_secs(1)).await;
    for id in &missed {
        assert!(
            text.contains(&format!("id: {id}")),
            "{id} missing after resume: {text}"
        );
    }
    assert!(
        !text.contains(&format!("id: {}\n", ids[2])),
        "a duplicate: {text}"
    );
}

/// A JWKS server on loopback: serves the current key set and counts the requests.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<std::sync::Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(std::sync::Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (Arc::clone(&body), Arc::clone(&hits));
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let current = served.lock().unwrap().clone();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::time::timeout(T, tcp.read(&mut buf)).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{current}",
                        current.len()
                    );
                    let _ = tcp.write_all(answer.as_bytes()).await;
                });
            }
        });
        Self { addr, body, hits }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_is_fetched_bound_to_its_issuer_and_refetched_once_for_a_rotation() {
    let Some(keys) = Keys::generate() else { return };
    let jwk = |file: &std::path::Path, kid: &str, alg: &str| json!({"jwk": file.display().to_string(), "kid": kid, "alg": alg});
    let jwks = keys.mint(&[
        jwk(&keys.rsa.public, "k1", "RS256"),
        jwk(&keys.ec.public, "k2", "ES256"),
    ]);
    let server = JwksServer::start(json!({"keys": [jwks[0]]}).to_string()).await;
    let gw = GatewayBuilder::new()
        .opt(
            "--jwt-jwks-url",
            format!("http://{}/jwks.json", server.addr),
        )
        .opt("--jwt-issuer", "https://idp.test")
        .spawn();
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        1,
        "fetched once at start"
    );
    let claims = |iss: &str| {
        let mut c = grants(&["*"], &[], false);
        c["iss"] = iss.into();
        c
    };
    let rsa = keys.rsa.private.display().to_string();
    let ec = keys.ec.private.display().to_string();
    let minted = keys.mint(&[
        json!({"alg": "RS256", "key_file": rsa, "kid": "k1", "claims": claims("https://idp.test")}),
        json!({"alg": "RS256", "key_file": rsa, "kid": "k1", "claims": claims("https://other.test")}),
        json!({"alg": "ES256", "key_file": ec, "kid": "k2", "claims": claims("https://idp.test")}),
        json!({"alg": "RS256", "key_file": rsa, "kid": "unknown", "claims": claims("https://idp.test")}),
        json!({"forge": "hmac_with_file", "alg": "HS256", "key_file": keys.rsa.public.display().to_string(), "claims": claims("https://idp.test")}),
    ]);
    let token = |i: usize| minted[i].as_str().unwrap().to_owned();
    let addr = gw.addr();
    for (head, body) in on_both_paths(addr, &stream_request("", &bearer(&token(0)))).await {
        assert_eq!(head.status, 200, "k1 from the JWKS: {body}");
    }
    for i in [1, 4] {
        for (head, body) in on_both_paths(addr, &stream_request("", &bearer(&token(i)))).await {
            assert_refused(
                &head,
                &body,
                401,
                "unauthorized",
                true,
                "other issuer or HMAC",
            );
        }
    }
    // The provider rotates to k2. The first token naming k2 makes the gateway fetch again.
    let before = server.hits.load(Ordering::SeqCst);
    *server.body.lock().unwrap() = json!({"keys": [jwks[1]]}).to_string();
    let (mut tcp, head) = on_fresh_connection(addr, &stream_request("", &bearer(&token(2))))
        .await
        .unwrap();
    assert_eq!(head.status, 200, "k2 after the rotation");
    drop(tcp.shutdown().await);
    assert_eq!(server.hits.load(Ordering::SeqCst), before + 1);
    // A flood of unknown key ids within 30 s fetches nothing more.
    for _ in 0..20 {
        let (head, body) = &on_both_paths(addr, &stream_request("", &bearer(&token(3)))).await[0];
        assert_refused(head, body, 401, "unauthorized", true, "unknown kid");
    }
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        before + 1,
        "at most one refetch per 30 s"
    );
    // k1 left the set with the rotation.
    let (head, body) = &on_both_paths(addr, &stream_request("", &bearer(&token(0)))).await[0];
    assert_refused(head, body, 401, "unauthorized", true, "a rotated-out key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_and_streams_answer_listed_origins_only_on_both_paths() {
    let Some(keys) = Keys::generate() else { return };
    let gw = GatewayBuilder::new()
        .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
        .opt("--cors-origins", "https://app.test,http://localhost:3000")
        .spawn();
    let addr = gw.addr();
    let preflight = |origin: &str, path: &str| {
        format!(
            "OPTIONS {path} HTTP/1.1\r\nhost: t\r\norigin: {origin}\r\n\
             access-control-request-method: POST\r\n\
             access-control-request-headers: authorization, content-type\r\n\
             connection: close\r\n\r\n"
        )
    };
    for path in ["/api/events", "/api/events/stream"] {
        let allowed = crate::harness::wire::once(addr, &preflight("https://app.test", path))
            .await
            .expect("a preflight answer");
        assert_eq!(allowed.status, 204, "{path}: {allowed:?}");
        assert_eq!(
            allowed.header("access-control-allow-origin"),
            Some("https://app.test")
        );
        assert_eq!(
            allowed.header("access-control-allow-credentials"),
            Some("true")
        );
        let methods = allowed
            .header("access-control-allow-methods")
            .unwrap_or_default()
            .to_ascii_uppercase();
        assert!(
            methods.contains("GET") && methods.contains("POST"),
            "{methods}"
        );
        let headers = allowed
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            headers.contains("authorization") && headers.contains("content-type"),
            "{headers}"
        );
        let refused = crate::harness::wire::once(addr, &preflight("https://evil.test", path))
            .await
            .expect("an answer to a refused preflight");
        assert!(
            refused.header("access-control-allow-origin").is_none(),
            "{path}: {refused:?}"
        );
    }
    // The stream, with a token in the cookie, from a listed and an unlisted origin.
    let token = keys.hs256(grants(&["*"], &[], false));
    for (origin, listed) in [
        ("http://localhost:3000", true),
        ("https://evil.test", false),
    ] {
        let extra = format!("origin: {origin}\r\ncookie: eventfabric_token={token}\r\n");
        for (head, body) in on_both_paths(addr, &stream_request("", &extra)).await {
            assert_eq!(head.status, 200, "{body}");
            assert_eq!(
                head.header("access-control-allow-origin"),
                listed.then_some(origin),
                "{origin}"
            );
            assert_eq!(
                head.header("access-control-allow-credentials"),
                listed.then_some("true")
            );
            if listed {
                assert!(head.header("vary").is_some_and(|v| v.contains("Origin")));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_limits_each_subject_with_a_burst_of_twice_the_rate() {
    let Some(keys) = Keys::generate() else { return };
    let gw = GatewayBuilder::new()
        .env("EVENTFABRIC_JWT_SECRET", keys.secret.as_str())
        .opt("--publish-rate", 2)
        .spawn();
    let mut alice = grants(&[], &["*"], false);
    alice["sub"] = "alice".into();
    let mut bob = alice.clone();
    bob["sub"] = "bob".into();
    let (alice, bob) = (keys.hs256(alice), keys.hs256(bob));
    let mut accepted = 0;
    let mut limited = None;
    for _ in 0..8 {
        let response = reqwest::Client::new()
            .post(format!("{}/api/events", gw.base_url()))
            .bearer_auth(&alice)
            .json(&json!({"type": "t", "data": 1}))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            202 => accepted += 1,
            429 => {
                let retry: u64 = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .expect("Retry-After on a 429");
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"], "rate_limited");
                limited = Some(retry);
            }
            other => panic!("unexpected {other}"),
        }
    }
    // A burst of 4 (twice the rate); a little refill while the loop runs is allowed.
    assert!((4..=5).contains(&accepted), "accepted {accepted}");
    assert!(limited.is_some_and(|s| (1..=2).contains(&s)), "{limited:?}");
    // Another subject has its own bucket.
    assert_eq!(publish(&gw, Some(&bob), None, "t").await.0, 202);
}
