//! The `eventfabric` binary: parse settings, set up logging, then serve or run one of the
//! operator commands, mapping errors to an exit code.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use eventfabric::{Cli, Command, Config, Gateway, Publisher};

/// Pending connections the kernel may queue, so a reconnect storm is not refused.
const LISTEN_BACKLOG: u32 = 4096;

/// How long the operator commands wait for an answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    eventfabric::init_logging(cli.config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let config = cli.config;
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config).await,
            Command::Publish {
                event_type,
                data,
                idempotency_key,
            } => publish(&config, &event_type, data, idempotency_key).await,
            Command::Stats => stats(&config).await,
            Command::Healthcheck => healthcheck(&config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "eventfabric failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    eventfabric::cancel_on_signal(shutdown.clone()).context("cannot install signal handlers")?;
    let listener =
        bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    eventfabric::run(config, listener, shutdown).await?;
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn publish(
    config: &Config,
    event_type: &str,
    data: Option<String>,
    idempotency_key: Option<String>,
) -> anyhow::Result<()> {
    if config.redis_url().is_none() {
        bail!("publish needs --redis-url (or REDIS_URL); without Redis, POST to /api/events");
    }
    let data: Box<RawValue> = serde_json::from_str(data.as_deref().unwrap_or("null"))
        .context("DATA_JSON is not valid JSON")?;
    let publisher = Publisher::for_config(config)?;
    let publishing = async {
        match &idempotency_key {
            Some(key) => publisher.publish_once(event_type, &data, key).await,
            None => publisher.publish(event_type, &data).await,
        }
    };
    let id = tokio::time::timeout(COMMAND_TIMEOUT, publishing)
        .await
        .context("Redis did not answer in time")??;
    writeln!(std::io::stdout(), "{id}")?;
    Ok(())
}

async fn stats(config: &Config) -> anyhow::Result<()> {
    let body = match config.redis_url() {
        Some(_) => {
            let gateway = Gateway::build(config.clone()).await?;
            let stats = tokio::time::timeout(COMMAND_TIMEOUT, gateway.cluster_stats())
                .await
                .context("Redis did not answer in time")??;
            serde_json::to_string(&stats)?
        }
        None => {
            let (status, body) = http_get(config.listen, "/api/events/stats").await?;
            if status != 200 {
                bail!("gateway answered {status}");
            }
            body
        }
    };
    writeln!(std::io::stdout(), "{body}")?;
    Ok(())
}

async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let (status, _) = http_get(config.admin_listen.unwrap_or(config.listen), "/healthz").await?;
    if status != 200 {
        bail!("/healthz answered {status}");
    }
    Ok(())
}

/// A minimal `GET` to a local gateway: status code and body.
async fn http_get(mut addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(1 << 20).read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .with_context(|| format!("no answer from {addr}"))?
        .with_context(|| format!("cannot reach {addr}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response from {addr}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
