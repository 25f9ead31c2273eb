//! Command-line flags and their validation into a run [`Config`].

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use crate::publisher::{Destination, Mode};
use crate::url::HttpUrl;

/// Most clients one process may open: the hard open-file limit here is 20,000 and the
/// process needs some descriptors of its own.
pub const MAX_CLIENTS: usize = 19_500;

/// Load generator for SSE gateways (eventfabric, Nchan): N raw-TCP subscribers, one
/// publisher, end-to-end latency and loss.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
pub struct Args {
    /// SSE stream URL(s), repeatable or comma-separated; clients are spread round-robin.
    #[arg(long = "url", required = true, value_delimiter = ',')]
    pub urls: Vec<String>,
    /// Number of SSE clients (at most 19,500 per process).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Local source addresses to bind client sockets to, round-robin (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// New connections per second at most.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Bound on connect plus response head per client, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// Send `Last-Event-ID: <id>` on every stream request.
    #[arg(long)]
    pub last_event_id: Option<String>,
    /// When a client's stream ends, reconnect to the next --url (round-robin, jittered
    /// backoff on failure) sending the last `id:` seen as `Last-Event-ID`.
    #[arg(long)]
    pub reconnect: bool,
    /// Open every initial connection to the first --url (the others are reconnect targets).
    #[arg(long)]
    pub initial_url_only: bool,
    /// Also sample the servers' RSS every this many seconds from the idle sample to the end
    /// (0 = off); the series and its slope go into the report.
    #[arg(long, default_value_t = 0.0)]
    pub rss_sample_secs: f64,
    /// Events to publish (0 = none).
    #[arg(long, default_value_t = 0)]
    pub events: u64,
    /// Publish rate, events per second (0 = as fast as possible).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Approximate size of each published event body, bytes (padded with a "pad" string).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    /// How to publish.
    #[arg(long, value_enum, default_value_t = Mode::Http)]
    pub publish: Mode,
    /// Publish endpoint for `http` (default: http://<first url's host>/api/events) and `nchan` (required).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Redis for `fcall` / `publish` modes.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Key namespace for `fcall` / `publish` modes.
    #[arg(long, default_value = "eventfabric")]
    pub namespace: String,
    /// Most events per publish batch when several are due at once.
    #[arg(long, default_value_t = 64)]
    pub publish_batch: usize,
    /// Wait after all clients connected before publishing, seconds.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Wait for deliveries after the last publish, seconds (ends early once all arrived).
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Memory mode: hold connections this long before the idle sample (use with --events 0).
    #[arg(long, default_value_t = 0.0)]
    pub idle_secs: f64,
    /// Server process to sample from /proc (repeatable; values are summed).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Tokio worker threads for the clients (the publisher has its own thread).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Overall deadline for the whole run, seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout_secs: f64,
}

/// A validated run configuration.
#[derive(Debug)]
pub struct Config {
    /// The raw flags.
    pub args: Args,
    /// Parsed stream URLs.
    pub urls: Vec<HttpUrl>,
    /// Where the publisher sends (when `events > 0`).
    pub dest: Destination,
}

impl Config {
    /// Validates flags and resolves addresses.
    pub fn from_args(args: Args) -> anyhow::Result<Self> {
        if args.clients > MAX_CLIENTS {
            bail!(
                "--clients {} is over {MAX_CLIENTS}: one process is limited to 20,000 open files. \
                 Run several loadgen processes (each with --clients <= {MAX_CLIENTS} and its own \
                 --source-ips) instead.",
                args.clients
            );
        }
        if let Some(limit) = crate::procstat::open_file_limit() {
            let need = args.clients as u64 + 64;
            if need > limit {
                bail!(
                    "--clients {} needs about {need} open files but the soft limit is {limit}: \
                     raise it (ulimit -n) or run several processes",
                    args.clients
                );
            }
        }
        for (name, v) in [
            ("--connect-rate", args.connect_rate),
            ("--connect-timeout-secs", args.connect_timeout_secs),
            ("--timeout-secs", args.timeout_secs),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                bail!("{name} must be > 0");
            }
        }
        for (name, v) in [
            ("--rate", args.rate),
            ("--warmup-secs", args.warmup_secs),
            ("--drain-secs", args.drain_secs),
            ("--idle-secs", args.idle_secs),
            ("--rss-sample-secs", args.rss_sample_secs),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("{name} must be >= 0");
            }
        }
        if args.threads == 0 {
            bail!("--threads must be >= 1");
        }
        if args.rss_sample_secs > 0.0 && args.server_pids.is_empty() {
            bail!("--rss-sample-secs needs --server-pid");
        }
        let urls = args
            .urls
            .iter()
            .map(|u| HttpUrl::parse(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let first = urls.first().context("at least one --url is needed")?;
        let dest = match args.publish {
            Mode::Http => {
                let url = match &args.publish_url {
                    Some(u) => HttpUrl::parse(u)?,
                    None => HttpUrl::parse(&format!("http://{}/api/events", first.authority))?,
                };
                Destination::Http(url)
            }
            Mode::Nchan => match &args.publish_url {
                Some(u) => Destination::Http(HttpUrl::parse(u)?),
                None if args.events == 0 => Destination::Http(first.clone()),
                None => bail!("--publish nchan needs --publish-url (the Nchan publisher location)"),
            },
            Mode::Fcall => Destination::Redis {
                url: args.redis_url.clone(),
                key: format!("{{{}}}:stream", args.namespace),
            },
            Mode::Publish => Destination::Redis {
                url: args.redis_url.clone(),
                key: format!("{{{}}}:events", args.namespace),
            },
        };
        Ok(Self { args, urls, dest })
    }

    /// Connect timeout as a `Duration`.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.args.connect_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &[&str]) -> anyhow::Result<Config> {
        let mut argv = vec![
            "loadgen",
            "--url",
            "http://127.0.0.1:5000/api/events/stream",
        ];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv)?)
    }

    #[test]
    fn refuses_too_many_clients() {
        let err = cfg(&["--clients", "19501"]).unwrap_err().to_string();
        assert!(err.contains("several loadgen processes"), "{err}");
    }

    #[test]
    fn derives_publish_destinations() {
        let c = cfg(&[]).unwrap();
        match c.dest {
            Destination::Http(u) => assert_eq!(u.path, "/api/events"),
            other => panic!("{other:?}"),
        }
        let c = cfg(&["--publish", "fcall", "--namespace", "t1"]).unwrap();
        match c.dest {
            Destination::Redis { key, .. } => assert_eq!(key, "{t1}:stream"),
            other => panic!("{other:?}"),
        }
        assert!(cfg(&["--publish", "nchan", "--events", "5"]).is_err());
    }

    #[test]
    fn splits_comma_separated_lists() {
        let c = cfg(&[
            "--url",
            "http://127.0.0.1:1/a,http://127.0.0.1:2/b",
            "--source-ips",
            "127.0.0.2,127.0.0.3",
        ])
        .unwrap();
        assert_eq!(c.urls.len(), 3);
        assert_eq!(c.args.source_ips.len(), 2);
    }

    #[test]
    fn reconnect_flags() {
        let c = cfg(&[
            "--reconnect",
            "--initial-url-only",
            "--url",
            "http://127.0.0.1:2/",
        ])
        .unwrap();
        assert!(c.args.reconnect && c.args.initial_url_only);
        assert!(cfg(&["--rss-sample-secs", "1"]).is_err());
        assert!(cfg(&["--rss-sample-secs", "1", "--server-pid", "1"]).is_ok());
    }
}
