//! Where Redis is: one server named by a `redis://` or `rediss://` URL, the primary that
//! a set of Sentinels names (`redis+sentinel://host1:26379,host2:26379/<master-name>`), or
//! a Redis Cluster reached through seed nodes (`redis+cluster://host1:6379,host2:6379`).
//!
//! Failure assumptions: with Sentinel, the primary moves. Every new connection asks the
//! Sentinels again and then checks `ROLE` on the node it reached, so a demoted primary
//! (which still answers reads, from a stream that no longer grows) is never used. Pooled
//! connections are dropped when a write is refused as `READONLY`, and the subscription is
//! rebuilt when the canary stops coming back, so both follow a failover within seconds.
//!
//! On a cluster, the slot of the namespace's hash tag moves (a failover, a resharding).
//! redis-rs's cluster connection follows `MOVED` and `ASK` and refreshes its slot map; a
//! pooled connection that cannot reach the namespace's primary any more is replaced when it
//! is next taken. Seeds are only where to start: a seed that is gone does not matter while
//! one answers.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisConnectionInfo,
    RedisError, RedisFuture, Value,
};

use super::Error;

/// How long asking one Sentinel, or checking a node's role, may take.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long connecting to one cluster node may take.
const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How often the cluster connection retries a command (after `MOVED`, `ASK`, `TRYAGAIN` or a
/// lost node) before it gives up; the caller's own deadline bounds the whole.
const CLUSTER_RETRIES: u32 = 4;

/// Where Redis is and how to log in: a parsed URL with the password applied and, for
/// `rediss://`, the TLS settings. `Debug` shows no password (redis-rs redacts it).
#[derive(Debug, Clone)]
pub(crate) struct RedisTarget {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// One server.
    Direct(ConnectionInfo),
    /// The primary named `master` by any of `sentinels`; `redis` is how to log in to it.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
        redis: RedisConnectionInfo,
    },
    /// A Redis Cluster: `seeds` are where to learn its layout (with the login in each).
    Cluster {
        seeds: Vec<ConnectionInfo>,
        tls: Option<ClusterTls>,
    },
}

/// The PEM files of a `rediss+cluster://` target, read at start. `Debug` shows none of it.
#[derive(Clone)]
struct ClusterTls(redis::TlsCertificates);

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls(..)")
    }
}

/// PEM files for TLS: a private CA to trust instead of the system's roots, and a client
/// certificate with its key for mutual TLS.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsFiles {
    /// `--redis-ca-file`.
    pub ca: Option<PathBuf>,
    /// `--redis-client-cert`.
    pub client_cert: Option<PathBuf>,
    /// `--redis-client-key`.
    pub client_key: Option<PathBuf>,
}

impl TlsFiles {
    fn any(&self) -> bool {
        self.ca.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }
}

impl RedisTarget {
    /// The Redis that `config` names, with its password and TLS files; `None` without a
    /// Redis URL.
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Self>, Error> {
        let Some(url) = config.redis_url() else {
            return Ok(None);
        };
        let password = config.redis_password().map_err(Error::Rejected)?;
        let tls = TlsFiles {
            ca: config.redis_ca_file.clone(),
            client_cert: config.redis_client_cert.clone(),
            client_key: config.redis_client_key.clone(),
        };
        Self::new(url, password.as_ref().map(|p| p.expose()), &tls).map(Some)
    }

    /// `url` with `password`, when given, replacing any password in it, and `tls` for a
    /// `rediss://` URL. The errors never repeat the URL, which may hold a password, nor a
    /// key file's content.
    pub fn new(url: &str, password: Option<&str>, tls: &TlsFiles) -> Result<Self, Error> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            if tls.any() {
                return Err(Error::Rejected(
                    "TLS files are not supported with redis+sentinel:// in this build".to_owned(),
                ));
            }
            return parse_sentinel(rest, password);
        }
        for (scheme, secure) in [("redis+cluster://", false), ("rediss+cluster://", true)] {
            if let Some(rest) = url.strip_prefix(scheme) {
                return parse_cluster(rest, secure, password, tls);
            }
        }
        let info = url.into_connection_info().map_err(|e| {
            Error::Rejected(format!(
                "invalid Redis URL ({}): expected redis[s]://[user[:password]@]host:port[/db], \
                 redis+sentinel://[user[:password]@]host:port[,host:port...]/master-name \
                 or redis[s]+cluster://[user[:password]@]host:port[,host:port...]",
                e.detail().unwrap_or("it did not parse")
            ))
        })?;
        let info = with_password(info, password);
        if !tls.any() {
            return Ok(Self::direct(info));
        }
        if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(Error::Rejected(
                "--redis-ca-file, --redis-client-cert and --redis-client-key need a rediss:// URL"
                    .to_owned(),
            ));
        }
        let certificates = read_tls_files(tls)?;
        let client = redis::Client::build_with_tls(info, certificates)
            .map_err(|e| Error::Rejected(format!("unusable TLS files: {e}")))?;
        Ok(Self::direct(client.get_connection_info().clone()))
    }

    fn direct(info: ConnectionInfo) -> Self {
        Self {
            kind: Kind::Direct(info),
        }
    }

    /// Whether the primary is found through Sentinel.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.kind, Kind::Sentinel { .. })
    }

    /// Whether this is a Redis Cluster (sharded pub/sub, keys routed by slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    /// A cluster client, delivering pushes (sharded messages, disconnections) to `pushes`
    /// when given, which also makes it speak RESP3; `None` for a target that is no cluster.
    pub fn cluster_client(
        &self,
        pushes: Option<impl redis::aio::AsyncPushSender>,
    ) -> Option<Result<ClusterClient, Error>> {
        let Kind::Cluster { seeds, tls } = &self.kind else {
            return None;
        };
        let mut builder = ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(CLUSTER_CONNECT_TIMEOUT)
            .retries(CLUSTER_RETRIES);
        if let Some(ClusterTls(certificates)) = tls {
            builder = builder.certs(certificates.clone());
        }
        if let Some(pushes) = pushes {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes);
        }
        Some(
            builder
                .build()
                .map_err(|e| Error::Rejected(format!("invalid Redis Cluster settings: {e}"))),
        )
    }
}

/// The TLS settings `tls` names, read from their files. The errors never hold a key.
fn read_tls_files(tls: &TlsFiles) -> Result<redis::TlsCertificates, Error> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| Error::Rejected(format!("cannot read {what} {}: {e}", path.display())))
    };
    let client_tls = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert, "--redis-client-cert")?,
            client_key: read(key, "--redis-client-key")?,
        }),
        (None, None) => None,
        _ => {
            return Err(Error::Rejected(
                "--redis-client-cert and --redis-client-key go together".to_owned(),
            ));
        }
    };
    let root_cert = tls
        .ca
        .as_deref()
        .map(|ca| read(ca, "--redis-ca-file"))
        .transpose()?;
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

impl RedisTarget {
    /// The server to connect to now: the one server, or the primary the first Sentinel
    /// that answers names.
    pub async fn resolve(&self) -> Result<ConnectionInfo, Error> {
        let (sentinels, master, redis) = match &self.kind {
            Kind::Direct(info) => return Ok(info.clone()),
            Kind::Sentinel {
                sentinels,
                master,
                redis,
            } => (sentinels, master, redis),
            Kind::Cluster { .. } => {
                return Err(Error::Rejected(
                    "a Redis Cluster has no one server to connect to".to_owned(),
                ));
            }
        };
        let mut last_error = String::from("no Sentinel given");
        for sentinel in sentinels {
            match ask_sentinel(sentinel, master).await {
                Ok((host, port)) => {
                    let info = ConnectionAddr::Tcp(host, port)
                        .into_connection_info()
                        .map_err(|e| Error::Unavailable(e.to_string()))?
                        .set_redis_settings(redis.clone());
                    return Ok(info);
                }
                Err(error) => last_error = error,
            }
        }
        Err(Error::Unavailable(format!(
            "no Sentinel named a primary for {master:?}: {last_error}"
        )))
    }

    /// A client for the server to use now. With Sentinel, the node must say it is the
    /// primary (`ROLE`); a demoted one is refused.
    pub async fn client(&self) -> Result<redis::Client, Error> {
        let info = self.resolve().await?;
        let client = redis::Client::open(info).map_err(|e| Error::Unavailable(e.to_string()))?;
        if self.is_sentinel() {
            let mut conn =
                tokio::time::timeout(SENTINEL_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| {
                        Error::Unavailable("the primary did not answer in time".to_owned())
                    })?
                    .map_err(|e| Error::Unavailable(e.to_string()))?;
            check_primary(&mut conn).await?;
        }
        Ok(client)
    }
}

/// `SENTINEL GET-MASTER-ADDR-BY-NAME master` on one Sentinel.
async fn ask_sentinel(sentinel: &ConnectionInfo, master: &str) -> Result<(String, u16), String> {
    let client = redis::Client::open(sentinel.clone()).map_err(|e| e.to_string())?;
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(master)
            .query_async::<Option<(String, u16)>>(&mut conn)
            .await
    };
    match tokio::time::timeout(SENTINEL_TIMEOUT, ask).await {
        Ok(Ok(Some(addr))) => Ok(addr),
        Ok(Ok(None)) => Err(format!("Sentinel knows no primary named {master:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the Sentinel did not answer in time".to_owned()),
    }
}

/// Refuses a node whose `ROLE` is not `master`.
async fn check_primary(conn: &mut MultiplexedConnection) -> Result<(), Error> {
    let role: redis::Value =
        tokio::time::timeout(SENTINEL_TIMEOUT, redis::cmd("ROLE").query_async(conn))
            .await
            .map_err(|_| Error::Unavailable("ROLE did not answer in time".to_owned()))?
            .map_err(|e| Error::Unavailable(e.to_string()))?;
    let first = match &role {
        redis::Value::Array(items) => items.first(),
        _ => None,
    };
    match first {
        Some(redis::Value::BulkString(role)) if role.as_slice() == b"master" => Ok(()),
        _ => Err(Error::Unavailable(
            "the node Sentinel named is not the primary (any more)".to_owned(),
        )),
    }
}

fn with_password(info: ConnectionInfo, password: Option<&str>) -> ConnectionInfo {
    match password {
        Some(password) => {
            let settings = info.redis_settings().clone().set_password(password);
            info.set_redis_settings(settings)
        }
        None => info,
    }
}

/// `[user[:password]@]host:port[,host:port...]/master-name[/db]` after the scheme.
fn parse_sentinel(rest: &str, password: Option<&str>) -> Result<RedisTarget, Error> {
    let bad = |why: &str| {
        Error::Rejected(format!(
            "invalid Sentinel URL ({why}): expected \
             redis+sentinel://[user[:password]@]host:port[,host:port...]/master-name[/db]"
        ))
    };
    let (redis, rest) = login(rest, password);
    let (hosts, path) = rest.split_once('/').ok_or_else(|| bad("no master name"))?;
    let mut path = path.split('/');
    let master = path
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("no master name"))?;
    let db: i64 = match path.next().filter(|d| !d.is_empty()) {
        Some(db) => db
            .parse()
            .map_err(|_| bad("the database is not a number"))?,
        None => 0,
    };
    let sentinels = host_list(hosts, 26379)
        .map_err(bad)?
        .into_iter()
        .map(|(host, port)| ConnectionAddr::Tcp(host, port).into_connection_info())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("a Sentinel address"))?;
    Ok(RedisTarget {
        kind: Kind::Sentinel {
            sentinels,
            master: master.to_owned(),
            redis: redis.set_db(db),
        },
    })
}

/// `[user[:password]@]host:port[,host:port...][/]` after `redis+cluster://` (or, with
/// `secure`, `rediss+cluster://`).
fn parse_cluster(
    rest: &str,
    secure: bool,
    password: Option<&str>,
    tls: &TlsFiles,
) -> Result<RedisTarget, Error> {
    let bad = |why: &str| {
        Error::Rejected(format!(
            "invalid Cluster URL ({why}): expected \
             redis[s]+cluster://[user[:password]@]host:port[,host:port...]"
        ))
    };
    let (redis, rest) = login(rest, password);
    let hosts = match rest.split_once('/') {
        Some((hosts, "")) => hosts,
        Some(_) => return Err(bad("a cluster has no database or master name")),
        None => rest,
    };
    let tls = match (secure, tls.any()) {
        (true, _) => Some(ClusterTls(read_tls_files(tls)?)),
        (false, true) => {
            return Err(Error::Rejected(
                "--redis-ca-file, --redis-client-cert and --redis-client-key need a \
                 rediss+cluster:// URL"
                    .to_owned(),
            ));
        }
        (false, false) => None,
    };
    let seeds = host_list(hosts, 6379)
        .map_err(bad)?
        .into_iter()
        .map(|(host, port)| {
            let addr = if secure {
                ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host, port)
            };
            addr.into_connection_info()
                .map(|info| info.set_redis_settings(redis.clone()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("a seed address"))?;
    Ok(RedisTarget {
        kind: Kind::Cluster { seeds, tls },
    })
}

/// The login in `[user[:password]@]rest` (`password`, when given, replacing the URL's),
/// and what follows it.
fn login<'a>(rest: &'a str, password: Option<&str>) -> (RedisConnectionInfo, &'a str) {
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((credentials, rest)) => (Some(credentials), rest),
        None => (None, rest),
    };
    let mut redis = RedisConnectionInfo::default();
    if let Some(credentials) = credentials {
        let (user, pass) = match credentials.split_once(':') {
            Some((user, pass)) => (user, Some(pass)),
            None => (credentials, None),
        };
        if !user.is_empty() {
            redis = redis.set_username(user);
        }
        if let Some(pass) = pass.filter(|p| !p.is_empty()) {
            redis = redis.set_password(pass);
        }
    }
    if let Some(password) = password {
        redis = redis.set_password(password);
    }
    (redis, rest)
}

/// `host:port[,host:port...]`, a missing port being `default_port`; says what is wrong
/// otherwise.
fn host_list(hosts: &str, default_port: u16) -> Result<Vec<(String, u16)>, &'static str> {
    let mut list = Vec::new();
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (name, port.parse().map_err(|_| "a port is not a number")?),
            None => (host, default_port),
        };
        if name.is_empty() {
            return Err("a host name is empty");
        }
        list.push((name.to_owned(), port));
    }
    if list.is_empty() {
        return Err("no host");
    }
    Ok(list)
}

/// A command connection: to one server, or to a cluster (which routes each command to
/// the node that holds its key).
pub(crate) enum Connection {
    /// One server (direct, or the primary Sentinel named).
    Single(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Connection::Single",
            Self::Cluster(_) => "Connection::Cluster",
        })
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The pool's manager: every new connection goes to the server [`RedisTarget::client`]
/// finds at that moment, or to the cluster.
#[derive(Debug)]
pub(crate) struct Manager {
    target: RedisTarget,
    /// The client for a fixed server (no Sentinel), made once.
    direct: Option<redis::Client>,
    /// The client for a cluster, made once.
    cluster: Option<ClusterClient>,
    /// A key of the namespace: on a cluster, a connection is healthy while the node that
    /// holds this key's slot answers.
    probe_key: String,
}

impl Manager {
    pub fn new(target: RedisTarget, probe_key: String) -> Result<Self, Error> {
        let direct = match &target.kind {
            Kind::Direct(info) => Some(
                redis::Client::open(info.clone())
                    .map_err(|e| Error::Rejected(format!("invalid Redis settings: {e}")))?,
            ),
            Kind::Sentinel { .. } | Kind::Cluster { .. } => None,
        };
        let cluster = target
            .cluster_client(None::<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>)
            .transpose()?;
        Ok(Self {
            target,
            direct,
            cluster,
            probe_key,
        })
    }
}

impl deadpool::managed::Manager for Manager {
    type Type = Connection;
    type Error = RedisError;

    async fn create(&self) -> Result<Connection, RedisError> {
        // Boxed: the Sentinel lookup nests several futures, and without the box every
        // future that takes a pooled connection carries their whole type (deep enough
        // to overflow rustc's query depth in a crate that awaits a publish).
        Box::pin(async {
            if let Some(cluster) = &self.cluster {
                return cluster
                    .get_async_connection()
                    .await
                    .map(Connection::Cluster);
            }
            let client = match &self.direct {
                Some(client) => client.clone(),
                None => self.target.client().await.map_err(to_redis_error)?,
            };
            client
                .get_multiplexed_async_connection()
                .await
                .map(Connection::Single)
        })
        .await
    }

    async fn recycle(
        &self,
        conn: &mut Connection,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<RedisError> {
        match conn {
            Connection::Single(conn) => {
                let _: String = redis::cmd("PING").query_async(conn).await?;
            }
            // A PING would go to any node; this goes to the one that matters.
            Connection::Cluster(conn) => {
                let _: i64 = redis::cmd("EXISTS")
                    .arg(&self.probe_key)
                    .query_async(conn)
                    .await?;
            }
        }
        Ok(())
    }
}

fn to_redis_error(error: Error) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        error.to_string(),
    ))
}

/// The command pool.
pub(crate) type Pool = deadpool::managed::Pool<Manager>;

/// A connection taken from the pool.
pub(crate) type Pooled = deadpool::managed::Object<Manager>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_every_sentinel_the_master_and_the_login() {
        let target = RedisTarget::new(
            "redis+sentinel://gw:pw@10.0.0.1:26379,10.0.0.2:26380,sentinel-3/mymaster/2",
            None,
            &TlsFiles::default(),
        )
        .unwrap();
        let Kind::Sentinel {
            sentinels,
            master,
            redis,
        } = &target.kind
        else {
            panic!("not a Sentinel target");
        };
        let addrs: Vec<String> = sentinels.iter().map(|s| s.addr().to_string()).collect();
        assert_eq!(
            addrs,
            ["10.0.0.1:26379", "10.0.0.2:26380", "sentinel-3:26379"]
        );
        assert_eq!(master, "mymaster");
        assert_eq!(
            (redis.db(), redis.username(), redis.password()),
            (2, Some("gw"), Some("pw"))
        );
        assert!(!format!("{target:?}").contains("pw\""), "{target:?}");
        let overridden = RedisTarget::new(
            "redis+sentinel://h/m",
            Some("from-file"),
            &TlsFiles::default(),
        )
        .unwrap();
        let Kind::Sentinel { redis, .. } = &overridden.kind else {
            panic!()
        };
        assert_eq!(redis.password(), Some("from-file"));
        for bad in [
            "redis+sentinel://h1,h2",
            "redis+sentinel://:1/m",
            "redis+sentinel://h1/",
            "redis+sentinel:///m",
            "redis+sentinel://h:x/m",
        ] {
            assert!(
                RedisTarget::new(bad, None, &TlsFiles::default()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn cluster_urls_name_every_seed_and_the_login_and_never_show_the_password() {
        let none = TlsFiles::default();
        for (url, password, seeds, user, pass) in [
            (
                "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,node-3",
                None,
                &["10.0.0.1:7000", "10.0.0.2:7001", "node-3:6379"][..],
                None,
                None,
            ),
            (
                "redis+cluster://gw:s3cret@h:7000/",
                None,
                &["h:7000"][..],
                Some("gw"),
                Some("s3cret"),
            ),
            (
                "redis+cluster://gw@h:7000",
                Some("from-file"),
                &["h:7000"][..],
                Some("gw"),
                Some("from-file"),
            ),
        ] {
            let target = RedisTarget::new(url, password, &none).unwrap();
            assert!(target.is_cluster() && !target.is_sentinel(), "{url}");
            let Kind::Cluster { seeds: got, tls } = &target.kind else {
                panic!("{url} is not a cluster target");
            };
            let addrs: Vec<String> = got.iter().map(|s| s.addr().to_string()).collect();
            assert_eq!(addrs, seeds, "{url}");
            for seed in got {
                let login = seed.redis_settings();
                assert_eq!((login.username(), login.password()), (user, pass), "{url}");
            }
            assert!(tls.is_none(), "{url}");
            let shown = format!("{target:?}");
            assert!(
                !shown.contains("s3cret") && !shown.contains("from-file"),
                "{shown}"
            );
            assert!(
                target
                    .cluster_client(None::<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>)
                    .is_some_and(|c| c.is_ok()),
                "{url}"
            );
        }
        let secure = RedisTarget::new("rediss+cluster://h:7000", None, &none).unwrap();
        let Kind::Cluster { seeds, tls } = &secure.kind else {
            panic!("not a cluster target");
        };
        assert!(matches!(seeds[0].addr(), ConnectionAddr::TcpTls { .. }));
        assert!(tls.is_some());
        let ca = TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        for (bad, tls) in [
            ("redis+cluster://", &none),
            ("redis+cluster://h:x", &none),
            ("redis+cluster://h:7000/0", &none),
            ("redis+cluster://h:7000/mymaster", &none),
            ("redis+cluster://,:7000", &none),
            ("redis+cluster://h:7000", &ca),
            ("rediss+cluster://h:7000", &ca),
        ] {
            let error = RedisTarget::new(bad, Some("pw"), tls).unwrap_err();
            assert!(!error.to_string().contains("pw"), "{bad}: {error}");
        }
    }
}
