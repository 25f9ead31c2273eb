//! `GatewayProc`: the real `eventfabric` binary as a child process.
//!
//! Started with `serve --listen 127.0.0.1:0`; the bound address is read from the start-up
//! log line on stderr (`... listening ... addr=IP:PORT`). stderr (and stdout) keep being
//! drained by background threads into a shared buffer that is printed when a test panics.
//! After [`GatewayProc::stop_within`] a gateway can [`restart`](GatewayProc::restart) with the
//! same arguments on the same address, as a replica behind a load balancer does in a rolling
//! restart; the buffer then holds the output of every run.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::sse::Api;

/// How long the gateway may take to print its `listening` line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// Default deadline for `stop()`: the contract's default `--drain-secs` (10) + 1 s + slack.
pub const DEFAULT_STOP_DEADLINE: Duration = Duration::from_secs(12);

/// How long a restart keeps trying to bind the old address (it can be busy for a moment).
const REBIND_DEADLINE: Duration = Duration::from_secs(5);

/// Builder for [`GatewayProc`]: extra command-line arguments and environment variables.
#[derive(Debug, Default, Clone)]
pub struct GatewayBuilder {
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl GatewayBuilder {
    /// A gateway with no extra arguments (in-process broker).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `--flag value`.
    pub fn opt(mut self, flag: &str, value: impl ToString) -> Self {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    /// Sets an environment variable for the child (overrides the scrubbing of `REDIS_URL`
    /// and `EVENTFABRIC_*`, and the default `RUST_LOG`).
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// `--redis-url URL`.
    pub fn redis_url(self, url: &str) -> Self {
        self.opt("--redis-url", url)
    }

    /// `--namespace NS`.
    pub fn namespace(self, ns: &str) -> Self {
        self.opt("--namespace", ns)
    }

    /// `--replica-id ID`.
    pub fn replica_id(self, id: &str) -> Self {
        self.opt("--replica-id", id)
    }

    /// Spawns the gateway and waits for its `listening` line; panics with the log otherwise.
    pub fn spawn(self) -> GatewayProc {
        GatewayProc::spawn_with(self)
    }
}

/// A running `eventfabric serve` child process.
pub struct GatewayProc {
    child: Option<Child>,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    builder: GatewayBuilder,
}

impl GatewayProc {
    /// Starts a gateway with default options (in-process broker).
    pub fn start() -> Self {
        GatewayBuilder::new().spawn()
    }

    /// Starts a gateway with the given builder on a free port.
    pub fn spawn_with(builder: GatewayBuilder) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        match spawn_child(&builder, "127.0.0.1:0", &log) {
            Ok((child, addr)) => GatewayProc {
                child: Some(child),
                addr,
                log,
                builder,
            },
            Err(why) => {
                let text = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                panic!(
                    "gateway did not start: {why}; args {:?}\n--- gateway log ---\n{text}\n--- end ---",
                    builder.args
                );
            }
        }
    }

    /// Starts the stopped gateway again with the same arguments, on the same address.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a running gateway");
        let listen = self.addr.to_string();
        let deadline = Instant::now() + REBIND_DEADLINE;
        loop {
            self.push_log(format!("[harness] restart on {listen}"));
            match spawn_child(&self.builder, &listen, &self.log) {
                Ok((child, _)) => {
                    self.child = Some(child);
                    return;
                }
                // The old address can stay busy for a moment; retry for a while.
                Err(why) if Instant::now() < deadline => {
                    self.push_log(format!("[harness] restart failed, retrying: {why}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(why) => panic!(
                    "gateway did not restart on {listen}: {why}\n--- gateway log ---\n{}\n--- end ---",
                    self.log()
                ),
            }
        }
    }

    /// `http://IP:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address read from the start-up line.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The running process's id (to read its memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway is running").id()
    }

    /// An HTTP API client for this gateway.
    pub fn api(&self) -> Api {
        Api::new(&self.base_url())
    }

    /// Everything the gateway wrote so far, over all its runs (stderr, stdout lines prefixed
    /// `[stdout]`, and a `[harness]` line before each restart).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Sends SIGINT without waiting.
    pub fn sigint(&self) {
        self.signal(Signal::SIGINT);
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits in pid_t"));
        kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to gateway {pid} failed: {e}"));
    }

    fn push_log(&self, line: String) {
        if let Ok(mut log) = self.log.lock() {
            log.push(line);
        }
    }

    /// Waits up to `deadline` for the process to exit; panics (with the log) if it does not.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("gateway already stopped");
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return status;
                }
                Ok(None) => {}
                Err(e) => panic!("try_wait failed: {e}"),
            }
            if start.elapsed() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "gateway did not exit within {deadline:?}\n--- gateway log ---\n{}\n--- end ---",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait (default deadline), assert exit status 0; returns the time it took.
    pub fn stop(&mut self) -> Duration {
        self.stop_within(DEFAULT_STOP_DEADLINE)
    }

    /// SIGTERM, wait up to `deadline`, assert exit status 0; returns the time it took.
    pub fn stop_within(&mut self, deadline: Duration) -> Duration {
        let start = Instant::now();
        self.sigterm();
        let status = self.wait_exit(deadline);
        let elapsed = start.elapsed();
        assert!(
            status.success(),
            "gateway exited with {status} after SIGTERM (expected 0)\n--- gateway log ---\n{}\n--- end ---",
            self.log()
        );
        elapsed
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- gateway {} log ---\n{}\n--- end gateway log ---",
                self.addr,
                self.log()
            );
        }
        self.kill9();
    }
}

/// Spawns `eventfabric serve --listen <listen>` with the builder's arguments, drains its
/// output into `log`, and waits for its `listening` line; returns the child and the address
/// it printed. On failure the child is killed and reaped.
fn spawn_child(
    builder: &GatewayBuilder,
    listen: &str,
    log: &Arc<Mutex<Vec<String>>>,
) -> Result<(Child, SocketAddr), String> {
    let bin = gateway_binary();
    let mut cmd = Command::new(&bin);
    cmd.arg("serve").arg("--listen").arg(listen);
    cmd.args(&builder.args);
    cmd.env_remove("REDIS_URL");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EVENTFABRIC_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUST_LOG", "eventfabric=debug");
    cmd.env_remove("NO_COLOR");
    for (k, v) in &builder.envs {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("failed to spawn {}: {e}", bin.display()))?;

    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().expect("stderr piped");
    let log_err = Arc::clone(log);
    std::thread::Builder::new()
        .name("gateway-stderr".into())
        .spawn(move || drain_lines(stderr, "", &log_err, Some(tx)))
        .expect("spawn stderr thread");
    let stdout = child.stdout.take().expect("stdout piped");
    let log_out = Arc::clone(log);
    std::thread::Builder::new()
        .name("gateway-stdout".into())
        .spawn(move || drain_lines(stdout, "[stdout] ", &log_out, None))
        .expect("spawn stdout thread");

    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains("listening")
                    && let Some(addr) = parse_addr_field(&line)
                {
                    return Ok((child, addr));
                }
            }
            Err(e) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no `listening ... addr=IP:PORT` line on {listen} within \
                     {STARTUP_DEADLINE:?} ({e:?}; exit status {status:?})"
                ));
            }
        }
    }
}

/// Copies `r` line by line into `log` (each line prefixed) and, when given, to `tx`.
fn drain_lines<R: Read>(
    r: R,
    prefix: &str,
    log: &Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::Sender<String>>,
) {
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                // Log first, then notify, so the buffer already holds the line the
                // start-up wait returns on.
                if let Ok(mut l) = log.lock() {
                    l.push(format!("{prefix}{line}"));
                }
                if let Some(tx) = &tx {
                    let _ = tx.send(line);
                }
            }
        }
    }
}

/// Extracts `addr=IP:PORT` (optionally quoted) from a log line, text or JSON format.
fn parse_addr_field(line: &str) -> Option<SocketAddr> {
    for key in ["addr=", "\"addr\":"] {
        let mut rest = line;
        while let Some(pos) = rest.find(key) {
            let after = &rest[pos + key.len()..];
            let val: String = after
                .trim_start_matches(['"', ' '])
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',' && *c != '}')
                .collect();
            if let Ok(a) = val.parse() {
                return Some(a);
            }
            rest = after;
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_proc_restarts_on_the_same_address_with_the_same_arguments() {
    let mut gw = GatewayBuilder::new().replica_id("restarted").spawn();
    let addr = gw.addr();
    gw.stop();
    gw.restart();
    assert_eq!(gw.addr(), addr);
    let stats = gw.api().stats().await;
    assert_eq!(stats["replica_id"], "restarted", "{stats}");
    assert!(gw.log().contains("[harness] restart on"), "{}", gw.log());
    gw.stop();
}

/// The gateway binary the tests start: the one cargo built for this test run, or the one
/// `EVENTFABRIC_BIN` names (a release build, to measure what a test prints; see the
/// README's benchmark section).
pub fn gateway_binary() -> PathBuf {
    std::env::var_os("EVENTFABRIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_eventfabric")))
}
