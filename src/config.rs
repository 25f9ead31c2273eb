//! Command line and environment: every operator setting, its flag, its variable and its
//! default, validated once at start-up.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default of `--max-other-connections`.
pub(crate) const DEFAULT_MAX_OTHER_CONNECTIONS: u64 = 256;

/// Connections beyond `--max-other-connections` kept for `/healthz`, `/readyz` and
/// `/metrics` (and for stream requests, which leave it once admitted), so probes and
/// scrapes still answer when the other connections are all taken.
pub(crate) const HEALTH_RESERVE: usize = 16;

/// Open files that are neither streams nor client connections: the listener, the Redis
/// subscriber, command pool (16) and canary, standard streams, the runtime's own files,
/// and connections accepted only to be closed at the cap. With the defaults the open-file
/// limit keeps 256 + 16 + 228 = 500 files back from `--max-clients 0`.
const FD_MARGIN: u64 = 228;

/// Default of `--history` (also the function library's default).
pub(crate) const DEFAULT_HISTORY: u64 = 10_000;

/// Default of `--max-event-bytes` (also the function library's default).
pub(crate) const DEFAULT_MAX_EVENT_BYTES: u64 = 65_536;

/// A secret setting: `Debug` never shows it, so no log or error can.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A Redis URL as given; `Debug` shows it with any password replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL, password included.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RedisUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", redact_url(&self.0))
    }
}

/// `scheme://user:password@host...` with the password replaced by `<redacted>`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// eventfabric: a Server-Sent Events gateway. Producers publish events; every connected
/// browser receives them, and can resume after a reconnect without losing any.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = "Logging: RUST_LOG sets the filter (default: eventfabric=info).\n\
                  Every option can also be set by the environment variable shown with it."
)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Gateway settings (also read by the other commands where they apply).
    #[command(flatten)]
    pub config: Config,
}

/// The commands of the binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Publish one event through Redis (needs --redis-url) and print its id.
    Publish {
        /// Event type, e.g. `cache_updated`.
        #[arg(value_name = "TYPE")]
        event_type: String,
        /// Event data as JSON; `null` when omitted.
        #[arg(value_name = "DATA_JSON")]
        data: Option<String>,
        /// Makes a retry with the same key within ten minutes return the first id.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Print cluster stats as JSON: from Redis when --redis-url is set, otherwise from the
    /// gateway listening on --listen.
    Stats,
    /// Exit 0 if the gateway on --listen answers `/healthz` (for container health checks).
    Healthcheck,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Every setting of a gateway. Library code receives this; only `main` reads the
/// environment (through clap).
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        env = "EVENTFABRIC_LISTEN",
        default_value = "127.0.0.1:5000",
        global = true
    )]
    pub listen: SocketAddr,

    /// Seconds between heartbeat comments on every stream (keeps proxies from timing out).
    #[arg(long, env = "EVENTFABRIC_HEARTBEAT_SECS", default_value_t = 15, global = true,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,

    /// Reconnect delay, in milliseconds, that clients are told with `retry:`.
    #[arg(long, env = "EVENTFABRIC_RETRY_MS", default_value_t = 5000, global = true,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub retry_ms: u64,

    /// Events a client may fall behind while its connection is full before it is
    /// disconnected (it then reconnects and resumes from history).
    #[arg(long, env = "EVENTFABRIC_CLIENT_QUEUE", default_value_t = 100, global = true,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub client_queue: u64,

    /// Events kept for resume after a reconnect (in memory: at most 64 MiB of them).
    #[arg(long, env = "EVENTFABRIC_HISTORY", default_value_t = DEFAULT_HISTORY, global = true,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub history: u64,

    /// Redis replicas that must confirm a publish (`WAIT`) before `POST` answers 202; if
    /// fewer do within --publish-replica-timeout-ms, `POST` answers 503 and says the event
    /// may still exist. 0: acknowledged means stored on the primary.
    #[arg(
        long,
        env = "EVENTFABRIC_PUBLISH_MIN_REPLICAS",
        default_value_t = 0,
        global = true
    )]
    pub publish_min_replicas: u32,

    /// How long a publish waits for --publish-min-replicas, in milliseconds.
    #[arg(long, env = "EVENTFABRIC_PUBLISH_REPLICA_TIMEOUT_MS", default_value_t = 500, global = true,
          value_parser = clap::value_parser!(u64).range(1..=2_000))]
    pub publish_replica_timeout_ms: u64,

    /// Web origins allowed to read the stream and publish from a browser: a comma-separated
    /// list (`https://app.example.com,http://localhost:3000`; cookies allowed), or `*` (any
    /// origin, without credentials). Unset: any origin may read the stream, none may publish.
    #[arg(long, env = "EVENTFABRIC_CORS_ORIGINS", global = true, value_parser = parse_cors)]
    pub cors_origins: Option<String>,

    /// Most streams one client address may hold open (`429` beyond); 0: no limit. Many
    /// users can share one address behind a NAT, so pick it generously.
    #[arg(
        long,
        env = "EVENTFABRIC_MAX_CLIENTS_PER_IP",
        default_value_t = 0,
        global = true
    )]
    pub max_clients_per_ip: u32,

    /// Proxies (comma-separated addresses or CIDR blocks) whose `X-Forwarded-For` names
    /// the client for --max-clients-per-ip; from anyone else the header is ignored.
    #[arg(long, env = "EVENTFABRIC_TRUSTED_PROXIES", global = true, value_parser = parse_trusted_proxies)]
    pub trusted_proxies: Option<String>,

    /// HMAC secret that signs tokens (HS256, HS384 or HS512). With any --jwt-* key set,
    /// publishing and stats need a token, and streams without one get only
    /// --anonymous-types. Prefer the variable: a flag's value shows in process lists.
    #[arg(
        long,
        env = "EVENTFABRIC_JWT_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub jwt_secret: Option<Secret>,

    /// PEM file of a public key that signs tokens: RSA (RS256/384/512, PS256/384/512), EC
    /// P-256 (ES256), EC P-384 (ES384) or Ed25519 (EdDSA).
    #[arg(long, env = "EVENTFABRIC_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,

    /// JWKS URL of an identity provider: fetched at start and cached; a token naming an
    /// unknown `kid` refetches it at most once per 30 s. Keys are bound to --jwt-issuer.
    #[arg(long, env = "EVENTFABRIC_JWT_JWKS_URL", global = true)]
    pub jwt_jwks_url: Option<String>,

    /// Required `iss` of every token, when set.
    #[arg(long, env = "EVENTFABRIC_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,

    /// Required `aud` of every token, when set.
    #[arg(long, env = "EVENTFABRIC_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,

    /// Cookie a browser's token is read from (set it HttpOnly, Secure, SameSite from your
    /// backend). A cookie never authorizes a publish.
    #[arg(
        long,
        env = "EVENTFABRIC_JWT_COOKIE",
        default_value = "eventfabric_token",
        global = true
    )]
    pub jwt_cookie: String,

    /// Also read a stream's token from `?access_token=` (it then shows in access logs,
    /// browser history and Referer headers: prefer the cookie).
    #[arg(long, env = "EVENTFABRIC_ALLOW_QUERY_TOKEN", global = true)]
    pub allow_query_token: bool,

    /// Event types a stream without a token may receive: comma-separated types or prefixes
    /// ending in `*`; empty for none. Default: `*` with no token key configured, none with one.
    #[arg(long, env = "EVENTFABRIC_ANONYMOUS_TYPES", global = true, value_parser = parse_patterns)]
    pub anonymous_types: Option<String>,

    /// Serve `/api/events/stats` without a token even when a token key is configured.
    #[arg(long, env = "EVENTFABRIC_PUBLIC_STATS", global = true)]
    pub public_stats: bool,

    /// Most events per second one token subject (or, without a token, one client address)
    /// may publish, with bursts of twice that; beyond it `429`. 0: no limit.
    #[arg(long, env = "EVENTFABRIC_PUBLISH_RATE", default_value_t = 0, global = true,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub publish_rate: u32,

    /// A second address serving only `/healthz`, `/readyz` and `/metrics` (for probes and
    /// scrapes; keep it off the ingress). When set, the main address no longer serves them.
    #[arg(long, env = "EVENTFABRIC_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<SocketAddr>,

    /// Largest accepted publish body, in bytes.
    #[arg(long, env = "EVENTFABRIC_MAX_EVENT_BYTES", default_value_t = DEFAULT_MAX_EVENT_BYTES, global = true,
          value_parser = clap::value_parser!(u64).range(64..=16_777_216))]
    pub max_event_bytes: u64,

    /// Most SSE clients this replica serves at once; 0 means the open-file limit minus
    /// what the other connections may use (500 with the defaults). Clients beyond it get
    /// `503` and retry elsewhere.
    #[arg(
        long,
        env = "EVENTFABRIC_MAX_CLIENTS",
        default_value_t = 0,
        global = true
    )]
    pub max_clients: u64,

    /// Most connections open at once that are not event streams: requests, idle
    /// keep-alive connections and (when the room streams have left is taken) connections
    /// still sending their request head. Beyond it
    /// (and a reserve of 16 for `/healthz`, `/readyz` and `/metrics`) requests get `503`.
    #[arg(long, env = "EVENTFABRIC_MAX_OTHER_CONNECTIONS", default_value_t = DEFAULT_MAX_OTHER_CONNECTIONS,
          global = true, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_other_connections: u64,

    /// Seconds a client may take to send a request head or a request body, and may leave a
    /// keep-alive connection idle between requests, before it is answered `408` or closed.
    #[arg(long, env = "EVENTFABRIC_REQUEST_TIMEOUT_SECS", default_value_t = 10, global = true,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub request_timeout_secs: u64,

    /// Threads that write events to clients; 0 means one per CPU.
    #[arg(long, env = "EVENTFABRIC_FANOUT_THREADS", default_value_t = 0, global = true,
          value_parser = clap::value_parser!(u64).range(0..=64))]
    pub fanout_threads: u64,

    /// Seconds a shutdown may take: streams are closed with a spread-out `retry:` hint
    /// and in-flight requests finish within this window.
    #[arg(long, env = "EVENTFABRIC_DRAIN_SECS", default_value_t = 10, global = true,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub drain_secs: u64,

    /// Name of this replica in stats and logs; hostname and process id when unset.
    #[arg(long, env = "EVENTFABRIC_REPLICA_ID", global = true)]
    pub replica_id: Option<String>,

    /// Redis URL (`redis://[user[:pass]@]host:port[/db]`, `rediss://` for TLS,
    /// `redis+sentinel://host:port[,host:port...]/master-name`, or a Redis Cluster's seed
    /// nodes `redis+cluster://host:port[,host:port...]`, `rediss+cluster://` for TLS).
    /// Unset: a single replica with an in-process broker. Set: one replica of a cluster
    /// sharing this Redis. Give an ACL user's password with --redis-password-file or
    /// REDIS_PASSWORD rather than in the URL.
    #[arg(long, env = "REDIS_URL", global = true, hide_env_values = true)]
    pub redis_url: Option<RedisUrl>,

    /// Password for Redis (the user named in the URL, or the default user). Prefer the
    /// variable or --redis-password-file: a flag's value shows in process lists.
    #[arg(long, env = "REDIS_PASSWORD", global = true, hide_env_values = true)]
    pub redis_password: Option<Secret>,

    /// File holding the Redis password (a mounted secret), read at start; a trailing
    /// newline is ignored.
    #[arg(
        long,
        env = "EVENTFABRIC_REDIS_PASSWORD_FILE",
        global = true,
        conflicts_with = "redis_password"
    )]
    pub redis_password_file: Option<PathBuf>,

    /// PEM file of the CA that signed Redis's certificate, trusted instead of the system's
    /// roots (needs a rediss:// URL).
    #[arg(long, env = "EVENTFABRIC_REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM client certificate for Redis servers that require mutual TLS (with
    /// --redis-client-key).
    #[arg(
        long,
        env = "EVENTFABRIC_REDIS_CLIENT_CERT",
        global = true,
        requires = "redis_client_key"
    )]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM private key of --redis-client-cert.
    #[arg(
        long,
        env = "EVENTFABRIC_REDIS_CLIENT_KEY",
        global = true,
        requires = "redis_client_cert"
    )]
    pub redis_client_key: Option<PathBuf>,

    /// Prefix of every Redis key and channel; replicas sharing it form one cluster.
    #[arg(long, env = "EVENTFABRIC_NAMESPACE", default_value = "eventfabric", global = true,
          value_parser = parse_namespace)]
    pub namespace: String,

    /// Log format.
    #[arg(long, env = "EVENTFABRIC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

impl Config {
    /// Settings as `eventfabric` with no flags and no environment would have them.
    pub fn default_for_tests() -> Self {
        let mut config = Cli::parse_from(["eventfabric"]).config;
        config.redis_url = None;
        config
    }

    /// The Redis URL, if one is configured (an empty value counts as none).
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url
            .as_ref()
            .map(|url| url.0.trim())
            .filter(|url| !url.is_empty())
    }

    /// The Redis password from `--redis-password-file` or `REDIS_PASSWORD`, if any. The
    /// error names the file, never its content.
    pub fn redis_password(&self) -> Result<Option<Secret>, String> {
        if let Some(path) = &self.redis_password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("cannot read --redis-password-file {}: {e}", path.display())
            })?;
            let password = text.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(format!("--redis-password-file {} is empty", path.display()));
            }
            return Ok(Some(Secret(password.to_owned())));
        }
        Ok(self.redis_password.clone().filter(|p| !p.0.is_empty()))
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    /// Shutdown window.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }

    /// The replica id to use: the configured one or `<hostname>-<pid>`.
    pub fn resolved_replica_id(&self) -> String {
        match &self.replica_id {
            Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "eventfabric".to_owned());
                format!("{host}-{}", std::process::id())
            }
        }
    }

    /// Fan-out threads to start: the configured number, or one per CPU.
    pub fn fanout_threads(&self) -> usize {
        match self.fanout_threads {
            0 => std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            n => n as usize,
        }
    }

    /// Time allowed for a request head or body, and for idling between requests.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The client cap to enforce: the configured one, or what the open-file limit leaves
    /// once the other connections, their reserve and the margin are set aside.
    pub fn resolved_max_clients(&self) -> usize {
        if self.max_clients > 0 {
            return self.max_clients as usize;
        }
        let limit = open_file_limit().unwrap_or(1024);
        limit.saturating_sub(self.files_besides_streams()).max(1) as usize
    }

    /// Open files the gateway may need besides its streams.
    fn files_besides_streams(&self) -> u64 {
        self.max_other_connections + HEALTH_RESERVE as u64 + FD_MARGIN
    }

    /// A warning when the configured caps can take more files than the process may open
    /// (then `accept` fails and health checks time out before any cap is reached).
    pub fn file_limit_warning(&self) -> Option<String> {
        let limit = open_file_limit()?;
        let needed = self.resolved_max_clients() as u64 + self.files_besides_streams();
        (needed > limit).then(|| {
            format!(
                "--max-clients + --max-other-connections + {} reserved files = {needed} \
                 exceeds the open-file limit {limit}; lower them or raise the limit",
                HEALTH_RESERVE as u64 + FD_MARGIN
            )
        })
    }
}

fn parse_trusted_proxies(value: &str) -> Result<String, String> {
    crate::address::TrustedProxies::parse(Some(value)).map(|_| value.to_owned())
}

fn parse_patterns(value: &str) -> Result<String, String> {
    crate::auth::parse_patterns(value).map(|_| value.to_owned())
}

fn parse_cors(value: &str) -> Result<String, String> {
    crate::cors::CorsPolicy::parse(Some(value)).map(|_| value.to_owned())
}

fn parse_namespace(value: &str) -> Result<String, String> {
    crate::broker::keys::validate_namespace(value).map(|()| value.to_owned())
}

/// The soft open-file limit of this process, read from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_debug_output() {
        for (url, shown) in [
            (
                "redis://gw:s3cret@h:6379/0",
                "redis://gw:<redacted>@h:6379/0",
            ),
            ("rediss://:s3cret@h", "rediss://:<redacted>@h"),
            ("redis://h:6379", "redis://h:6379"),
            ("redis://user@h/1?x=a:b@c", "redis://user@h/1?x=a:b@c"),
            ("redis://u:p@ss:w@rd@h:1", "redis://u:<redacted>@h:1"),
            (
                "redis+cluster://gw:s3cret@h1:7000,h2:7001",
                "redis+cluster://gw:<redacted>@h1:7000,h2:7001",
            ),
            (
                "rediss+cluster://gw:s3cret@h1:7000/",
                "rediss+cluster://gw:<redacted>@h1:7000/",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let cli = Cli::parse_from([
            "eventfabric",
            "--redis-url",
            "redis://gw:s3cret@h:6379",
            "--redis-password",
            "hunter2",
            "--jwt-secret",
            "jwt-key-material",
        ]);
        let debug = format!("{:?}", cli.config);
        assert!(
            !debug.contains("s3cret")
                && !debug.contains("hunter2")
                && !debug.contains("jwt-key-material"),
            "{debug}"
        );
        assert_eq!(
            cli.config.redis_password().unwrap().unwrap().expose(),
            "hunter2"
        );
    }

    #[test]
    fn the_password_file_is_read_without_its_newline_and_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis-password");
        std::fs::write(&file, "from-file\n").unwrap();
        let path = file.to_str().unwrap();
        let cli = Cli::parse_from(["eventfabric", "--redis-password-file", path]);
        assert_eq!(
            cli.config.redis_password().unwrap().unwrap().expose(),
            "from-file"
        );
        std::fs::write(&file, "\n").unwrap();
        let error = cli.config.redis_password().unwrap_err();
        assert!(error.contains(path) && error.contains("empty"), "{error}");
        let missing = Cli::parse_from(["eventfabric", "--redis-password-file", "/nonexistent/pw"]);
        assert!(
            missing
                .config
                .redis_password()
                .unwrap_err()
                .contains("/nonexistent/pw")
        );
        let both = Cli::try_parse_from([
            "eventfabric",
            "--redis-password-file",
            path,
            "--redis-password",
            "x",
        ]);
        assert!(both.is_err(), "a password from two places must be refused");
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::default_for_tests();
        assert_eq!(c.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(c.heartbeat_secs, 15);
        assert_eq!(c.retry_ms, 5000);
        assert_eq!(c.client_queue, 100);
        assert_eq!(c.history, 10_000);
        assert_eq!(c.max_event_bytes, 65_536);
        assert_eq!(c.max_other_connections, 256);
        assert_eq!(c.request_timeout_secs, 10);
    }

    #[test]
    fn flags_work_before_and_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["eventfabric", "--retry-ms", "10", "serve", "--history", "5"])
                .unwrap();
        assert!(matches!(cli.command, Some(Command::Serve)));
        assert_eq!(cli.config.retry_ms, 10);
        assert_eq!(cli.config.history, 5);
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_flag() {
        let err = Cli::try_parse_from(["eventfabric", "--client-queue", "0"]).unwrap_err();
        assert!(err.to_string().contains("--client-queue"), "{err}");
    }

    #[test]
    fn max_clients_defaults_to_the_file_limit_less_a_reserve() {
        let c = Config::default_for_tests();
        assert!(c.resolved_max_clients() >= 1);
        let c = Config {
            max_clients: 7,
            ..c
        };
        assert_eq!(c.resolved_max_clients(), 7);
    }

    #[test]
    fn streams_and_other_connections_fit_the_file_limit_by_default() {
        let c = Config::default_for_tests();
        // The documented reserve of `--max-clients 0` is unchanged by the split.
        assert_eq!(c.files_besides_streams(), 500);
        assert!(c.file_limit_warning().is_none());
        if let Some(limit) = open_file_limit().filter(|&l| l > 500) {
            assert_eq!(c.resolved_max_clients() as u64, limit - 500);
        }
        let c = Config {
            max_other_connections: 1000,
            ..c
        };
        if let Some(limit) = open_file_limit().filter(|&l| l > 1244) {
            assert_eq!(c.resolved_max_clients() as u64, limit - 1244);
        }
        let c = Config {
            max_clients: 1 << 40,
            ..c
        };
        assert!(c.file_limit_warning().is_some());
    }
}
