//! Minimal `http://host[:port]/path?query` parsing. The generator speaks plain HTTP/1.1 only
//! and resolves every address once, before any load is generated.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, anyhow, bail};

/// A resolved plain-HTTP URL.
#[derive(Debug, Clone)]
pub struct HttpUrl {
    /// The authority exactly as given (`host[:port]`), sent as the `Host` header.
    pub authority: String,
    /// The resolved socket address (IPv4 preferred when a name resolves to both families).
    pub addr: SocketAddr,
    /// Path plus query, always starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses and resolves `http://host[:port][/path][?query]`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("only http:// URLs are supported, got {url:?}"))?;
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        if authority.is_empty() {
            bail!("URL {url:?} has no host");
        }
        let path = match tail.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{tail}"),
            Some(_) => tail.to_string(),
        };
        let (host, port) =
            split_host_port(authority).with_context(|| format!("bad host/port in URL {url:?}"))?;
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {host:?}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| anyhow!("{host:?} resolved to no address"))?;
        Ok(Self {
            authority: authority.to_string(),
            addr,
            path,
        })
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults to 80.
fn split_host_port(authority: &str) -> anyhow::Result<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| anyhow!("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse()?,
            None if after.is_empty() => 80,
            None => bail!("junk after ']'"),
        };
        return Ok((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host, port.parse()?)),
        None => Ok((authority, 80)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_path_and_query() {
        let u = HttpUrl::parse("http://127.0.0.1:5000/api/events/stream?types=a").unwrap();
        assert_eq!(u.authority, "127.0.0.1:5000");
        assert_eq!(u.addr, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(u.path, "/api/events/stream?types=a");

        let u = HttpUrl::parse("http://127.0.0.2").unwrap();
        assert_eq!(u.addr.port(), 80);
        assert_eq!(u.path, "/");

        let u = HttpUrl::parse("http://[::1]:81?x=1").unwrap();
        assert_eq!(u.addr, "[::1]:81".parse().unwrap());
        assert_eq!(u.path, "/?x=1");
    }

    #[test]
    fn rejects_https_and_garbage() {
        assert!(HttpUrl::parse("https://127.0.0.1/").is_err());
        assert!(HttpUrl::parse("http:///x").is_err());
        assert!(HttpUrl::parse("http://127.0.0.1:notaport/").is_err());
    }
}
