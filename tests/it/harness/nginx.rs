//! `NginxProc`: real nginx (Debian's `/usr/sbin/nginx`, found by `tools::nginx`) in front of
//! gateway replicas, with the SSE proxy settings that ship in
//! `deploy/nginx/eventfabric-locations.conf`.
//!
//! The generated configuration only adds what differs per run: temp paths inside a temp
//! dir, the loopback upstream addresses and the listening port. The `location` blocks are
//! the shipped file itself, included by absolute path, so what is tested is what ships.
//! To show that file's own settings are what keep the stream flowing, the surrounding
//! `http` block turns on gzip (also for `text/event-stream`) and leaves nginx's default
//! proxy buffering on: only the shipped file's `gzip off`/`proxy_buffering off` undo that.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::free_port;

/// How long nginx may take to accept connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// How long nginx may take to exit after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The shared SSE proxy settings shipped with the deployment files.
pub fn locations_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/eventfabric-locations.conf")
}

/// A running nginx master process and its workers.
pub struct NginxProc {
    child: Option<Child>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl NginxProc {
    /// Starts the nginx binary `nginx` (see [`tools::nginx`](super::tools::nginx)) on a free
    /// loopback port, proxying to `upstreams`.
    pub fn start(nginx: &Path, upstreams: &[SocketAddr]) -> Self {
        let locations = locations_file();
        assert!(locations.is_file(), "{} is missing", locations.display());
        let dir = tempfile::Builder::new()
            .prefix("eventfabric-nginx-")
            .tempdir()
            .expect("create temp dir for nginx");
        let mut last_err = String::new();
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let conf = dir.path().join("nginx.conf");
            std::fs::write(&conf, config(dir.path(), addr, upstreams, &locations))
                .expect("write nginx.conf");
            let mut child = Command::new(nginx)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&conf)
                .arg("-g")
                .arg("daemon off;")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", nginx.display()));
            match wait_listening(&mut child, addr) {
                Ok(()) => {
                    return NginxProc {
                        child: Some(child),
                        dir,
                        addr,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log =
                        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                    last_err = format!("{why}\n--- nginx error.log ---\n{log}");
                }
            }
        }
        panic!("could not start nginx: {last_err}");
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// nginx's access log so far (`status upstream_addr request_time request`).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for NginxProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- nginx error.log ---\n{}\n--- end nginx error.log ---",
                self.error_log()
            );
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The whole configuration: boilerplate, the upstream, and the shipped `location` blocks.
fn config(dir: &Path, addr: SocketAddr, upstreams: &[SocketAddr], locations: &Path) -> String {
    let d = dir.display();
    // As root the workers would run as `nobody`, which cannot enter the private temp dir.
    let user = if nix::unistd::geteuid().is_root() {
        "user root;\n"
    } else {
        ""
    };
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    format!(
        "{user}worker_processes 2;
worker_rlimit_nofile 8192;
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    log_format upstream '$status $upstream_addr $upstream_status $request_time \"$request\"';
    access_log {d}/access.log upstream;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    # Hostile defaults the shipped locations must override for the stream.
    gzip on;
    gzip_min_length 1;
    gzip_types text/event-stream application/json;
    proxy_buffering on;

    # As in deploy/nginx/nginx.conf, with loopback replicas instead of compose services.
    upstream eventfabric {{
        zone eventfabric 64k;
{servers}        keepalive 16;
    }}

    server {{
        listen {addr};
        include {locations};
    }}
}}
",
        locations = locations.display()
    )
}

fn wait_listening(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("nginx exited early with {status}"));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "nginx did not listen on {addr} within {STARTUP_DEADLINE:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
