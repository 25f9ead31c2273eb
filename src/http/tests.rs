//! The fast tier: the router driven with `oneshot`, in process, with the in-process broker.
//! No socket and no child process, so these run in milliseconds; the black-box suites under
//! `tests/it` keep what needs a real process (signals, Redis, real clients).

#![allow(clippy::unwrap_used)]

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

use super::router;
use crate::{Config, Gateway};

async fn app(configure: impl FnOnce(&mut Config)) -> Router {
    let mut config = Config::default_for_tests();
    config.fanout_threads = 1;
    configure(&mut config);
    let gateway = Gateway::build(config).await.unwrap();
    router(gateway.state().clone())
}

async fn call(
    app: &Router,
    request: Request<Body>,
) -> (StatusCode, Vec<(String, String)>, Vec<u8>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("?").to_owned()))
        .collect();
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, headers, body.to_vec())
}

fn post(body: impl Into<Body>) -> Request<Body> {
    Request::post("/api/events")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)))
}

/// An error answer: the status, a JSON content type, and `{"error": code, "message": text}`.
fn assert_error(
    answer: &(StatusCode, Vec<(String, String)>, Vec<u8>),
    status: StatusCode,
    code: &str,
) {
    let (got, headers, body) = answer;
    assert_eq!(*got, status, "{}", String::from_utf8_lossy(body));
    assert!(
        headers
            .iter()
            .any(|(name, value)| name == "content-type" && value.starts_with("application/json")),
        "{headers:?}"
    );
    let body = json(body);
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Each body gets `400 bad_request`, and none of them is counted as an event.
async fn assert_refused_and_not_counted(
    app: &Router,
    cases: impl IntoIterator<Item = (&str, Vec<u8>)>,
) {
    for (what, body) in cases {
        let answer = call(app, post(body)).await;
        assert_eq!(answer.0, StatusCode::BAD_REQUEST, "{what}");
        assert_error(&answer, StatusCode::BAD_REQUEST, "bad_request");
    }
    let (_, _, stats) = call(app, get("/api/events/stats")).await;
    assert_eq!(
        json(&stats)["total_events_broadcast"],
        0,
        "a refused event was counted"
    );
}

#[tokio::test]
async fn a_valid_event_is_accepted_with_its_id() {
    let app = app(|_| {}).await;
    let (status, _, body) = call(&app, post(r#"{"type":"job_updated","data":{"n":1}}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = json(&body)["id"].as_str().unwrap().to_owned();
    assert!(id.parse::<crate::EventId>().is_ok(), "{id}");
}

#[tokio::test]
async fn bad_bodies_get_400_with_a_json_error() {
    let app = app(|_| {}).await;
    let long_type = format!(r#"{{"type":"{}"}}"#, "t".repeat(129));
    let cases: [(&str, &[u8]); 9] = [
        ("not JSON", b"{nope"),
        ("not an object", b"[1,2]"),
        ("no type", br#"{"data":1}"#),
        ("empty type", br#"{"type":"","data":1}"#),
        ("type with a space", br#"{"type":"a b","data":1}"#),
        ("type not a string", br#"{"type":7,"data":1}"#),
        ("type too long", long_type.as_bytes()),
        ("invalid UTF-8", b"{\"type\":\"a\",\"data\":\"\xff\xfe\"}"),
        ("empty body", b""),
    ];
    assert_refused_and_not_counted(&app, cases.map(|(what, body)| (what, body.to_vec()))).await;
}

#[tokio::test]
async fn data_redis_would_refuse_gets_400_in_memory_mode_too() {
    let app = app(|_| {}).await;
    let depth = crate::event::MAX_DATA_DEPTH;
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let refused = [
        (
            "a lone high surrogate",
            r#"{"type":"t","data":"\ud800"}"#.to_owned(),
        ),
        (
            "a lone low surrogate",
            r#"{"type":"t","data":["\udc00"]}"#.to_owned(),
        ),
        (
            "too deep",
            format!(r#"{{"type":"t","data":{}}}"#, nested(depth + 1)),
        ),
        (
            "far too deep",
            format!(r#"{{"type":"t","data":{}}}"#, nested(2000)),
        ),
    ];
    assert_refused_and_not_counted(&app, refused.map(|(what, body)| (what, body.into_bytes())))
        .await;

    let accepted = [
        (
            "a surrogate pair",
            r#"{"type":"t","data":"\ud83d\ude00"}"#.to_owned(),
        ),
        (
            "an escaped backslash",
            r#"{"type":"t","data":"\\ud800"}"#.to_owned(),
        ),
        (
            "as deep as allowed",
            format!(r#"{{"type":"t","data":{}}}"#, nested(depth)),
        ),
        (
            "brackets in a string",
            format!(r#"{{"type":"t","data":"{}"}}"#, "[".repeat(500)),
        ),
    ];
    for (what, body) in accepted {
        let (status, _, text) = call(&app, post(body)).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{what}: {}",
            String::from_utf8_lossy(&text)
        );
    }
}

#[tokio::test]
async fn an_oversized_body_gets_413_and_stores_nothing() {
    let app = app(|config| config.max_event_bytes = 1024).await;
    let data = "x".repeat(2000);
    let answer = call(&app, post(format!(r#"{{"type":"big","data":"{data}"}}"#))).await;
    assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let (_, _, stats) = call(&app, get("/api/events/stats")).await;
    assert_eq!(json(&stats)["total_events_broadcast"], 0);
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_id() {
    let app = app(|_| {}).await;
    let with_key = || {
        Request::post("/api/events")
            .header("idempotency-key", "order-17")
            .body(Body::from(r#"{"type":"paid","data":1}"#))
            .unwrap()
    };
    let (first_status, _, first) = call(&app, with_key()).await;
    let (again_status, _, again) = call(&app, with_key()).await;
    assert_eq!(
        (first_status, again_status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(json(&first)["id"], json(&again)["id"]);
    let (_, _, stats) = call(&app, get("/api/events/stats")).await;
    assert_eq!(json(&stats)["total_events_broadcast"], 1);

    let empty_key = Request::post("/api/events")
        .header("idempotency-key", "")
        .body(Body::from(r#"{"type":"paid","data":1}"#))
        .unwrap();
    assert_error(
        &call(&app, empty_key).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let app = app(|_| {}).await;
    assert_error(
        &call(&app, get("/nope")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    for (method, path) in [
        (Method::GET, "/api/events"),
        (Method::POST, "/api/events/stats"),
        (Method::DELETE, "/healthz"),
        (Method::POST, "/api/events/stream"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let (status, _, _) = call(&app, request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
}

#[tokio::test]
async fn stats_have_the_seed_fields_and_count_by_type() {
    let app = app(|config| config.replica_id = Some("fast-1".into())).await;
    for event_type in ["a", "a", "b"] {
        let (status, _, _) = call(&app, post(format!(r#"{{"type":"{event_type}"}}"#))).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let (status, _, body) = call(&app, get("/api/events/stats")).await;
    assert_eq!(status, StatusCode::OK);
    let stats = json(&body);
    assert_eq!(stats["active_clients"], 0);
    assert_eq!(stats["total_events_broadcast"], 3);
    assert_eq!(stats["events_by_type"]["a"], 2);
    assert_eq!(stats["events_by_type"]["b"], 1);
    assert_eq!(stats["replica_id"], "fast-1");
    assert_eq!(stats["broker"], "memory");
    assert!(stats["uptime_secs"].is_u64());
    assert!(stats.get("degraded").is_none(), "{stats}");
    let replicas = stats["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{stats}");
    assert_eq!(replicas[0]["id"], "fast-1");
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = app(|_| {}).await;
    let (status, _, body) = call(&app, get("/healthz")).await;
    assert_eq!(
        (status, json(&body)["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _, body) = call(&app, get("/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["ready"], true);
    call(&app, post(r#"{"type":"counted"}"#)).await;
    let (status, headers, body) = call(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "content-type" && v.starts_with("application/openmetrics-text"))
    );
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("eventfabric_events_received_total 1"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn cors_on_publish_and_preflights_follow_the_configured_origins() {
    let listed = app(|c| c.cors_origins = Some("https://app.example".to_owned())).await;
    let from = |origin: &str, method: Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/json")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .body(Body::from(r#"{"type":"t"}"#))
            .unwrap()
    };
    let header_of = |headers: &[(String, String)], name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };

    let (status, headers, _) = call(
        &listed,
        from("https://app.example", Method::POST, "/api/events"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        header_of(&headers, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        header_of(&headers, "access-control-allow-credentials").as_deref(),
        Some("true")
    );

    for path in ["/api/events", "/api/events/stream"] {
        let (status, headers, _) =
            call(&listed, from("https://app.example", Method::OPTIONS, path)).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{path}");
        let allowed = header_of(&headers, "access-control-allow-headers").unwrap_or_default();
        assert!(
            allowed.contains("Authorization") && allowed.contains("Content-Type"),
            "{path}: {allowed}"
        );
        assert!(
            header_of(&headers, "access-control-allow-methods").is_some_and(|m| m.contains("POST"))
        );
        let (status, headers, _) =
            call(&listed, from("https://evil.example", Method::OPTIONS, path)).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{path}");
        assert_eq!(
            header_of(&headers, "access-control-allow-origin"),
            None,
            "{path}"
        );
    }
    let (_, headers, _) = call(
        &listed,
        from("https://evil.example", Method::POST, "/api/events"),
    )
    .await;
    assert_eq!(header_of(&headers, "access-control-allow-origin"), None);

    // Not configured: publishing carries no CORS header and a preflight is not answered.
    let unset = app(|_| {}).await;
    let (_, headers, _) = call(
        &unset,
        from("https://app.example", Method::POST, "/api/events"),
    )
    .await;
    assert_eq!(header_of(&headers, "access-control-allow-origin"), None);
    let (status, _, _) = call(
        &unset,
        from("https://app.example", Method::OPTIONS, "/api/events"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
