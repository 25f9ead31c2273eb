//! `rediss://`: a gateway talking to a real `redis-server` over TLS, with a private CA made
//! for the run, with mutual TLS, and refusing a server its CA did not sign. Certificates
//! come from the `openssl` command; the server listens on TLS and (for the harness's
//! readiness ping only) on a plain port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{
    ConnectOpts, GatewayBuilder, RedisProc, SseClient, free_port, tools, unique_namespace,
};

const T: Duration = Duration::from_secs(15);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name` and, signed by it, a certificate for 127.0.0.1 (`<prefix>.crt`,
/// `<prefix>.key`), all in `dir`.
fn ca_and_cert(dir: &Path, name: &str, prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = format!("{name}-ca.key");
    let ca_crt = format!("{name}-ca.crt");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
        ],
    );
    issue(
        dir,
        &ca_crt,
        &ca_key,
        prefix,
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
    );
    (
        dir.join(&ca_crt),
        dir.join(format!("{prefix}.crt")),
        dir.join(format!("{prefix}.key")),
    )
}

/// A certificate `<prefix>.crt` / `<prefix>.key` signed by the given CA.
fn issue(dir: &Path, ca_crt: &str, ca_key: &str, prefix: &str, extension: &str) {
    let key = format!("{prefix}.key");
    let csr = format!("{prefix}.csr");
    let crt = format!("{prefix}.crt");
    let ext = format!("{prefix}.ext");
    std::fs::write(dir.join(&ext), format!("{extension}\n")).expect("write extension file");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={prefix}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca_crt,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
}

/// A `redis-server` with a TLS port serving `cert`/`key`; clients must present a
/// certificate signed by `client_ca` when it is given.
fn tls_redis(cert: &Path, key: &Path, client_ca: Option<&Path>) -> (RedisProc, u16) {
    let tls_port = free_port();
    let mut args = vec![
        "--tls-port".to_owned(),
        tls_port.to_string(),
        "--tls-cert-file".to_owned(),
        cert.display().to_string(),
        "--tls-key-file".to_owned(),
        key.display().to_string(),
    ];
    match client_ca {
        Some(ca) => args.extend([
            "--tls-ca-cert-file".to_owned(),
            ca.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "yes".to_owned(),
        ]),
        None => args.extend(["--tls-auth-clients".to_owned(), "no".to_owned()]),
    }
    (RedisProc::start_with(&args), tls_port)
}

fn gateway(tls_port: u16, ns: &str, files: &[(&str, &Path)]) -> GatewayBuilder {
    let mut builder = GatewayBuilder::new()
        .redis_url(&format!("rediss://127.0.0.1:{tls_port}/"))
        .namespace(ns);
    for (flag, path) in files {
        builder = builder.opt(flag, path.display());
    }
    builder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_rediss_with_a_private_ca_delivers_and_refuses_a_server_it_cannot_verify() {
    if tools::require(tools::openssl()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = ca_and_cert(dir.path(), "good", "server");
    let (other_ca, _, _) = ca_and_cert(dir.path(), "other", "unused");
    let (_redis, tls_port) = tls_redis(&cert, &key, None);
    let ns = unique_namespace("tls");

    let gw = gateway(tls_port, &ns, &[("--redis-ca-file", &ca)]).spawn();
    let api = gw.api();
    api.wait_ready(T).await;
    let mut c = SseClient::connect(api.base(), ConnectOpts::default()).await;
    let id = api.publish("over_tls", json!({"seq": 1})).await;
    let got = c.expect_event(T).await;
    assert_eq!(
        (got.seq(), got.id.as_str()),
        (Some(1), id.as_str()),
        "{}",
        c.summary()
    );

    // A CA that did not sign the server's certificate: never ready, never plaintext, and
    // the log says why.
    let wrong = gateway(tls_port, &ns, &[("--redis-ca-file", &other_ca)]).spawn();
    let wrong_api = wrong.api();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = wrong_api.get("/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "ready with an unverifiable server"
    );
    let (status, body) = wrong_api
        .post_raw(
            json!({"type": "t", "data": 1}).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let log = wrong.log();
    assert!(
        log.to_lowercase().contains("certificate"),
        "the log does not say the certificate failed:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    if tools::require(tools::openssl()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = ca_and_cert(dir.path(), "mtls", "server");
    let ca_name = ca
        .file_name()
        .and_then(|n| n.to_str())
        .expect("CA file name")
        .to_owned();
    let ca_key = ca_name.replace(".crt", ".key");
    issue(
        dir.path(),
        &ca_name,
        &ca_key,
        "client",
        "extendedKeyUsage=clientAuth",
    );
    let (client_cert, client_key) = (dir.path().join("client.crt"), dir.path().join("client.key"));
    let (_redis, tls_port) = tls_redis(&cert, &key, Some(&ca));
    let ns = unique_namespace("mtls");

    let with_cert = gateway(
        tls_port,
        &ns,
        &[
            ("--redis-ca-file", &ca),
            ("--redis-client-cert", &client_cert),
            ("--redis-client-key", &client_key),
        ],
    )
    .spawn();
    with_cert.api().wait_ready(T).await;
    let id = with_cert.api().publish("mtls", json!({"seq": 1})).await;
    assert!(!id.is_empty());

    let without = gateway(tls_port, &ns, &[("--redis-ca-file", &ca)]).spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = without.api().get("/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "ready without a client certificate"
    );
    let log = with_cert.log() + &without.log();
    assert!(
        !log.contains("PRIVATE KEY"),
        "key material in a log:\n{log}"
    );
}
