//! Requests written by hand on a socket and answers read off it, for tests that must
//! control exactly which bytes go out and when (a fresh connection is served on the raw
//! path, a keep-alive one after a first request by hyper).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for an answer that should come at once.
const T: Duration = Duration::from_secs(5);

/// An HTTP response read off a socket.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Header fields, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (`content-length` bytes).
    pub body: Vec<u8>,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not a JSON body ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the project's error answer: `status`, a JSON content type and
    /// `{"error": code, "message": <text>}`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        let json = self.json();
        assert_eq!(json["error"], code, "{json}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

/// Reads one response (head, then a `content-length` body) within `within`; `None` if the
/// connection ends or resets first.
pub async fn read_answer(tcp: &mut TcpStream, within: Duration) -> Option<Answer> {
    let deadline = tokio::time::Instant::now() + within;
    let head = read_head(tcp, within).await?;
    let length = head
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let body = read_body(tcp, head.body_start, length, left).await?;
    Some(Answer {
        status: head.status,
        headers: head.headers,
        body,
    })
}

/// Completes a body of `length` bytes of which `body` came with the head, within
/// `within`; `None` if the connection ends or resets first.
pub async fn read_body(
    tcp: &mut TcpStream,
    mut body: Vec<u8>,
    length: usize,
    within: Duration,
) -> Option<Vec<u8>> {
    let reading = async {
        let mut chunk = [0u8; 4096];
        while body.len() < length {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        body.truncate(length);
        Some(body)
    };
    tokio::time::timeout(within, reading).await.ok().flatten()
}

/// The first value of header `name` (lower case) among `headers`.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Waits until the server closes the connection (end of file or reset), discarding what
/// it sends; returns how long that took, or `None` if it is still open after `within`.
pub async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let waiting = async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = tcp.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(within, waiting)
        .await
        .ok()
        .map(|()| start.elapsed())
}

/// One request on a new connection that asks to be closed afterwards, so it never stays
/// as an idle keep-alive connection holding a place.
pub async fn once(addr: SocketAddr, request: &str) -> Option<Answer> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(request.as_bytes()).await.ok()?;
    read_answer(&mut tcp, T).await
}

/// Sends `request` on a connection that has already carried one request (`GET /healthz`),
/// so hyper, not the raw stream path, reads it; returns the status line's code and the
/// head, and for an error the whole answer.
pub async fn on_reused_connection(addr: SocketAddr, request: &str) -> Option<(TcpStream, Head)> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .ok()?;
    // Any complete answer (a 404 where probes moved to the admin address) keeps the
    // connection open for the next request.
    read_answer(&mut tcp, T).await?;
    tcp.write_all(request.as_bytes()).await.ok()?;
    let head = read_head(&mut tcp, T).await?;
    Some((tcp, head))
}

/// Sends `request` on a fresh connection (the raw stream path) and reads the head.
pub async fn on_fresh_connection(addr: SocketAddr, request: &str) -> Option<(TcpStream, Head)> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(request.as_bytes()).await.ok()?;
    let head = read_head(&mut tcp, T).await?;
    Some((tcp, head))
}

/// A response head and the body bytes that came with it.
#[derive(Debug)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Header fields, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body bytes read with the head.
    pub body_start: Vec<u8>,
}

impl Head {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Reads a response head within `within`.
pub async fn read_head(tcp: &mut TcpStream, within: Duration) -> Option<Head> {
    let reading = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let mut lines = head.split("\r\n");
                let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                return Some(Head {
                    status,
                    headers,
                    body_start: buf[end + 4..].to_vec(),
                });
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(within, reading).await.ok().flatten()
}

/// Reads whatever follows on `tcp` until it closes or `within` passes, appended to
/// `text` (lossy UTF-8); true if it closed.
pub async fn read_until_closed(tcp: &mut TcpStream, text: &mut String, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => text.push_str(&String::from_utf8_lossy(&chunk[..n])),
        }
    }
}
