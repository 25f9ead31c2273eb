//! `GatewayProc`: the real `eventfabric` binary as a child process.
//!
//! Started with `serve --listen 127.0.0.1:0`; the bound address is read from the start-up
//! log line on stderr (`... listening ... addr=IP:PORT`). stderr (and stdout) keep being
//! drained by background threads into a shared buffer that is printed when a test panics.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::sse::Api;

/// How long the gateway may take to print its `listening` line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// Default deadline for `stop()`: the contract's default `--drain-secs` (10) + 1 s + slack.
pub const DEFAULT_STOP_DEADLINE: Duration = Duration::from_secs(12);

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

    /// Adds one raw argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
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

    /// Starts a gateway with the given builder.
    pub fn spawn_with(builder: GatewayBuilder) -> Self {
        let bin = env!("CARGO_BIN_EXE_eventfabric");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0");
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
            .unwrap_or_else(|e| panic!("failed to spawn {bin}: {e}"));

        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();

        let stderr = child.stderr.take().expect("stderr piped");
        let log_err = Arc::clone(&log);
        std::thread::Builder::new()
            .name("gateway-stderr".into())
            .spawn(move || drain_lines(stderr, "", &log_err, Some(tx)))
            .expect("spawn stderr thread");
        let stdout = child.stdout.take().expect("stdout piped");
        let log_out = Arc::clone(&log);
        std::thread::Builder::new()
            .name("gateway-stdout".into())
            .spawn(move || drain_lines(stdout, "[stdout] ", &log_out, None))
            .expect("spawn stdout thread");

        let deadline = Instant::now() + STARTUP_DEADLINE;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("listening")
                        && let Some(addr) = parse_addr_field(&line)
                    {
                        break addr;
                    }
                }
                Err(e) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                    panic!(
                        "gateway did not print a `listening ... addr=IP:PORT` line within \
                         {STARTUP_DEADLINE:?} ({e:?}; exit status {status:?}); args {:?}\n\
                         --- gateway log ---\n{text}\n--- end ---",
                        builder.args
                    );
                }
            }
        };

        GatewayProc {
            child: Some(child),
            addr,
            log,
            builder,
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

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway already stopped").id()
    }

    /// An HTTP API client for this gateway.
    pub fn api(&self) -> Api {
        Api::new(&self.base_url())
    }

    /// Everything the gateway wrote so far (stderr, and stdout lines prefixed `[stdout]`).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The builder this gateway was started with (to start another one like it).
    pub fn builder(&self) -> GatewayBuilder {
        self.builder.clone()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends SIGINT without waiting.
    pub fn sigint(&self) {
        self.signal("INT");
    }

    // The crate has `unsafe_code = "forbid"` in [lints.rust], which also applies to this
    // test crate and cannot be overridden, so `libc::kill` is not callable here; the
    // `kill(1)` utility sends the signal instead.
    fn signal(&self, sig: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{sig} {pid} failed: {status}");
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

/// Copies `r` line by line into `log` (each line prefixed) and, when given, to `tx`.
pub fn drain_lines<R: Read>(
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
pub fn parse_addr_field(line: &str) -> Option<SocketAddr> {
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
