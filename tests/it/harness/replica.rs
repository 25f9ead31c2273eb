//! `Replica`: a gateway process that keeps its port across restarts, the way a replica
//! behind a load balancer does during a rolling restart.
//!
//! [`GatewayProc`](super::GatewayProc) always listens on a fresh port (`--listen
//! 127.0.0.1:0`, and clap refuses a second `--listen`), so a proxy configured with fixed
//! upstream addresses could not find it again. A `Replica` starts on a free port the first
//! time and on that same port after every [`Replica::restart`]. Output is drained into a
//! buffer that is printed if the test panics.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::gateway::{STARTUP_DEADLINE, drain_lines, parse_addr_field};

/// How long a restart keeps trying to bind the old port (it can be busy for a moment).
const REBIND_DEADLINE: Duration = Duration::from_secs(5);

/// A gateway child process with a stable address.
pub struct Replica {
    name: String,
    args: Vec<String>,
    addr: Option<SocketAddr>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    starts: u32,
}

impl Replica {
    /// Starts `eventfabric serve` with `args` (anything but `--listen`) on a free port.
    pub fn start(name: &str, args: &[String]) -> Self {
        let mut replica = Replica {
            name: name.to_owned(),
            args: args.to_vec(),
            addr: None,
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            starts: 0,
        };
        replica.spawn();
        replica
    }

    /// The listening address (the same after every restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("replica has started once")
    }

    /// `http://IP:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The replica's name (also its `--replica-id` if the test passed one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything every incarnation of this replica wrote.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// SIGTERM, then waits up to `deadline` for the exit, which must be status 0. Returns
    /// how long the drain took.
    pub fn stop(&mut self, deadline: Duration) -> Duration {
        let start = Instant::now();
        let pid = self.child.as_ref().expect("replica is running").id();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
        let status = self.wait_exit(deadline);
        assert!(
            status.success(),
            "replica {} exited with {status} after SIGTERM (expected 0)\n--- log ---\n{}\n--- end ---",
            self.name,
            self.log()
        );
        start.elapsed()
    }

    /// Starts the replica again on its port, with the same arguments (after [`Self::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a running replica");
        self.spawn();
    }

    fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("replica is running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if start.elapsed() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "replica {} did not exit within {deadline:?} of SIGTERM\n--- log ---\n{}\n--- end ---",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(&mut self) {
        let deadline = Instant::now() + REBIND_DEADLINE;
        loop {
            match self.try_spawn() {
                Ok(()) => return,
                // Only a restart on a fixed port can meet a busy port; retry for a while.
                Err(why) if self.addr.is_some() && Instant::now() < deadline => {
                    self.push_log(format!("[harness] restart failed, retrying: {why}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(why) => panic!(
                    "replica {} did not start: {why}\n--- log ---\n{}\n--- end ---",
                    self.name,
                    self.log()
                ),
            }
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let listen = match self.addr {
            Some(addr) => addr.to_string(),
            None => "127.0.0.1:0".to_owned(),
        };
        self.starts += 1;
        self.push_log(format!("[harness] start #{} on {listen}", self.starts));
        let bin = env!("CARGO_BIN_EXE_eventfabric");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(&listen)
            .args(&self.args);
        cmd.env_remove("REDIS_URL");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EVENTFABRIC_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("RUST_LOG", "eventfabric=info");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {bin}: {e}"))?;

        let (tx, rx) = mpsc::channel::<String>();
        let stderr = child.stderr.take().expect("stderr piped");
        let stdout = child.stdout.take().expect("stdout piped");
        let tag = format!("{}#{}", self.name, self.starts);
        spawn_drain(stderr, format!("[{tag}] "), Arc::clone(&self.log), Some(tx));
        spawn_drain(
            stdout,
            format!("[{tag} stdout] "),
            Arc::clone(&self.log),
            None,
        );

        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("listening")
                        && let Some(addr) = parse_addr_field(&line)
                    {
                        self.addr = Some(addr);
                        self.child = Some(child);
                        return Ok(());
                    }
                }
                Err(e) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "no `listening` line on {listen} ({e:?}; exit status {status:?})"
                    ));
                }
            }
        }
    }

    fn push_log(&self, line: String) {
        if let Ok(mut log) = self.log.lock() {
            log.push(line);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- replica {} log ---\n{}\n--- end replica log ---",
                self.name,
                self.log()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_drain<R: Read + Send + 'static>(
    r: R,
    prefix: String,
    log: Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::Sender<String>>,
) {
    std::thread::Builder::new()
        .name("replica-output".into())
        .spawn(move || drain_lines(r, &prefix, &log, tx))
        .expect("spawn output thread");
}
