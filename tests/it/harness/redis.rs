//! `RedisProc`: a private `redis-server` on a free loopback port, or the server named by
//! `REDIS_URL` when that is set (then it cannot be killed or restarted by tests).
//!
//! `redis-server` is not optional like the programs in `tools.rs`: without it (and without
//! `REDIS_URL`) every Redis test fails, saying how to install it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long a fresh `redis-server` may take to answer PING.
pub const REDIS_STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// A Redis server for tests.
pub struct RedisProc {
    url: String,
    port: u16,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    external: bool,
    /// The extra arguments it was started with, used again by [`RedisProc::restart`].
    extra: Vec<String>,
}

impl RedisProc {
    /// Uses `REDIS_URL` if set, otherwise starts `redis-server` on a free loopback port.
    pub fn start() -> Self {
        if let Ok(url) = std::env::var("REDIS_URL")
            && !url.trim().is_empty()
        {
            let addr = addr_from_url(&url)
                .unwrap_or_else(|| panic!("cannot parse host:port from REDIS_URL={url}"));
            wait_for_ping(addr, REDIS_STARTUP_DEADLINE)
                .unwrap_or_else(|e| panic!("REDIS_URL={url} does not answer PING: {e}"));
            return RedisProc {
                url,
                port: addr.port(),
                child: None,
                dir: None,
                external: true,
                extra: Vec::new(),
            };
        }
        let dir = tempfile::Builder::new()
            .prefix("eventfabric-redis-")
            .tempdir()
            .expect("create temp dir for redis");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            match spawn_redis(port, dir.path()) {
                Ok(child) => {
                    return RedisProc {
                        url: format!("redis://127.0.0.1:{port}/"),
                        port,
                        child: Some(child),
                        dir: Some(dir),
                        external: false,
                        extra: Vec::new(),
                    };
                }
                Err(e) => last_err = e,
            }
        }
        panic!("could not start redis-server: {last_err}");
    }

    /// Starts an own `redis-server` on `port` (ignores `REDIS_URL`), e.g. for a gateway
    /// that was started while nothing listened there. Panics if it cannot be started.
    pub fn start_on_port(port: u16) -> Self {
        Self::own(port, &[])
    }

    /// Starts an own `redis-server` (ignores `REDIS_URL`) with `extra` arguments, e.g. a TLS
    /// port next to the plain one the harness pings. Panics if it cannot be started.
    pub fn start_with(extra: &[String]) -> Self {
        Self::own(free_port(), extra)
    }

    /// Starts an own `redis-server` on `port` with `extra` arguments (ignores `REDIS_URL`),
    /// e.g. a cluster node whose address a gateway was given before it started.
    pub fn start_on_port_with(port: u16, extra: &[String]) -> Self {
        Self::own(port, extra)
    }

    fn own(port: u16, extra: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("eventfabric-redis-")
            .tempdir()
            .expect("create temp dir for redis");
        let child = spawn_redis_with(port, dir.path(), extra).unwrap_or_else(|e| {
            panic!("could not start redis-server on port {port} with {extra:?}: {e}")
        });
        RedisProc {
            url: format!("redis://127.0.0.1:{port}/"),
            port,
            child: Some(child),
            dir: Some(dir),
            external: false,
            extra: extra.to_vec(),
        }
    }

    /// `redis://127.0.0.1:PORT/` (or the value of `REDIS_URL`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of an own server that is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Ok` if kill/restart work; otherwise why not, for [`tools::require`](super::tools::require).
    pub fn killable(&self) -> Result<(), String> {
        if self.external {
            Err(format!(
                "REDIS_URL={} is an external server; this test must kill/restart Redis",
                self.url
            ))
        } else {
            Ok(())
        }
    }

    /// Stops the server (SIGKILL). Panics for an external server.
    pub fn kill(&mut self) {
        assert!(!self.external, "cannot kill the external REDIS_URL server");
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and with the same arguments (after
    /// [`RedisProc::kill`]); data is empty (a cluster node keeps its `nodes.conf`).
    pub fn restart(&mut self) {
        assert!(
            !self.external,
            "cannot restart the external REDIS_URL server"
        );
        self.kill();
        let dir = self.dir.as_ref().expect("own redis has a dir").path();
        let deadline = Instant::now() + REDIS_STARTUP_DEADLINE;
        loop {
            match spawn_redis_with(self.port, dir, &self.extra) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                // The port can stay busy for a moment after the kill.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("redis restart retry: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("could not restart redis-server on {}: {e}", self.port),
            }
        }
    }

    /// True if the server answers PING now.
    pub fn is_up(&self) -> bool {
        addr_from_url(&self.url)
            .map(|a| ping(a).is_ok())
            .unwrap_or(false)
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_redis(port: u16, dir: &std::path::Path) -> Result<Child, String> {
    spawn_redis_with(port, dir, &[])
}

fn spawn_redis_with(port: u16, dir: &std::path::Path, extra: &[String]) -> Result<Child, String> {
    let mut child = Command::new("redis-server")
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "redis-server is not on PATH: the tests start \
                their own Redis (7 or later); install it (apt-get install redis-server, or \
                .ci/install-test-deps), or set REDIS_URL to a running one"
                .to_owned(),
            _ => format!("spawn redis-server: {e}"),
        })?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + REDIS_STARTUP_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server on port {port} exited early: {status}"
            ));
        }
        if ping(addr).is_ok() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("redis-server on port {port} did not answer PING"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_ping(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match ping(addr) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Inline-command PING over plain TCP; Ok if the reply is `+PONG`.
fn ping(addr: SocketAddr) -> Result<(), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    // `-NOAUTH` also means a live server (one that needs a password from the URL).
    if reply.starts_with("+PONG") || reply.starts_with("-NOAUTH") {
        Ok(())
    } else {
        Err(format!("unexpected PING reply {reply:?}"))
    }
}

/// `redis://[user:pass@]host:port[/db]` → socket address (default port 6379).
fn addr_from_url(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))?;
    let hostport = rest.split('/').next()?;
    let hostport = hostport.rsplit('@').next()?;
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:6379")
    };
    hostport.to_socket_addrs().ok()?.next()
}

#[test]
fn redis_proc_starts_answers_ping_and_restarts_on_the_same_port() {
    let mut r = RedisProc::start();
    assert!(r.is_up(), "redis at {} does not answer PING", r.url());
    if super::tools::require(r.killable()).is_none() {
        return;
    }
    let port = r.port();
    r.kill();
    assert!(!r.is_up(), "redis still answers after kill()");
    r.restart();
    assert_eq!(r.port(), port);
    assert!(r.is_up(), "redis does not answer after restart()");
    assert_eq!(r.url(), format!("redis://127.0.0.1:{port}/"));
}
