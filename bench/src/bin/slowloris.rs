//! `slowloris`: holds many connections that send a request head one byte per interval and
//! never finish it, and reports the server's CPU while they wait.
//!
//! Each connection writes the start of a stream request a byte at a time; when the server
//! closes it (its head timeout), it reconnects, so the count stays up for the whole run.
//! Run `loadgen` beside it to see whether streaming clients keep their latency (see the
//! "Slow request heads" section of bench/README.md). One JSON line goes to stdout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../procstat.rs"]
#[allow(dead_code)]
mod procstat;

/// Command-line options.
#[derive(Debug, Parser)]
struct Args {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:5000")]
    addr: SocketAddr,
    /// Connections to hold.
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Seconds between two bytes on one connection.
    #[arg(long, default_value_t = 1.0)]
    byte_every_secs: f64,
    /// Seconds to spend opening the connections.
    #[arg(long, default_value_t = 5.0)]
    ramp_secs: f64,
    /// Seconds over which the server's CPU is measured, once every connection is open.
    #[arg(long, default_value_t = 20.0)]
    measure_secs: f64,
    /// The server's process id, for its CPU time.
    #[arg(long)]
    server_pid: u32,
}

/// What never completes: the start of a stream request, then header bytes forever.
const HEAD: &[u8] = b"GET /api/events/stream HTTP/1.1\r\nHost: bench\r\nX-Slow: ";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let open = Arc::new(AtomicUsize::new(0));
    let reconnects = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let every = Duration::from_secs_f64(args.byte_every_secs);
    let stagger = Duration::from_secs_f64(args.ramp_secs / args.connections.max(1) as f64);
    for n in 0..args.connections {
        let (open, reconnects, bytes) = (open.clone(), reconnects.clone(), bytes.clone());
        let addr = args.addr;
        tokio::spawn(async move {
            tokio::time::sleep(stagger * n as u32).await;
            loop {
                dribble(addr, every, &open, &bytes).await;
                reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(args.ramp_secs + 2.0)).await;
    let pid = args.server_pid.to_string();
    let (before, open_start, reconnects_start, bytes_start, start) = (
        procstat::sample(&pid)?,
        open.load(Ordering::Relaxed),
        reconnects.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
        Instant::now(),
    );
    let mut open_min = open_start;
    while start.elapsed().as_secs_f64() < args.measure_secs {
        tokio::time::sleep(Duration::from_millis(250)).await;
        open_min = open_min.min(open.load(Ordering::Relaxed));
    }
    let after = procstat::sample(&pid)?;
    let wall = start.elapsed().as_secs_f64();
    let cpu_percent = 100.0 * (after.cpu_s - before.cpu_s) / wall;
    let reconnects = reconnects.load(Ordering::Relaxed) - reconnects_start;
    let sent = bytes.load(Ordering::Relaxed) - bytes_start;
    eprintln!(
        "slowloris: {} connections asked, {open_start} open at the start of the window \
         (min {open_min}); {sent} bytes and {reconnects} reconnects in {wall:.1} s; server \
         CPU {cpu_percent:.2} % of one core, RSS {} KiB",
        args.connections, after.rss_kb
    );
    use std::io::Write as _;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::json!({
            "connections": args.connections,
            "open_at_start": open_start,
            "open_min": open_min,
            "bytes_sent": sent,
            "reconnects": reconnects,
            "window_secs": wall,
            "server_cpu_percent": cpu_percent,
            "server_rss_kb": after.rss_kb,
        })
    )?;
    Ok(())
}

/// Holds one connection, writing a byte every `every`, until the server closes it.
async fn dribble(addr: SocketAddr, every: Duration, open: &AtomicUsize, bytes: &AtomicU64) {
    let Ok(Ok(mut tcp)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
    else {
        return;
    };
    open.fetch_add(1, Ordering::Relaxed);
    let mut at = 0usize;
    let mut scratch = [0u8; 512];
    loop {
        let byte = if at < HEAD.len() { HEAD[at] } else { b'a' };
        at += 1;
        if tcp.write_all(&[byte]).await.is_err() {
            break;
        }
        bytes.fetch_add(1, Ordering::Relaxed);
        // Wait for the next byte's time, or for the server to answer or close.
        match tokio::time::timeout(every, tcp.read(&mut scratch)).await {
            Err(_) => continue,
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => break,
        }
    }
    open.fetch_sub(1, Ordering::Relaxed);
}
