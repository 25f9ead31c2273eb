//! Who a client is, as far as per-address limits go: the peer address, or, when the peer
//! is a proxy listed in `--trusted-proxies`, the address the proxies put in
//! `X-Forwarded-For` (the rightmost one no trusted proxy wrote). And the count of streams
//! per address behind `--max-clients-per-ip`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The proxies whose `X-Forwarded-For` is believed: CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Reads a comma-separated list of CIDR blocks (`10.0.0.0/8, 192.168.1.7, ::1/128`);
    /// an address without `/n` is one host.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        let mut blocks = Vec::new();
        for block in value
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
        {
            let (addr, bits) = match block.split_once('/') {
                Some((addr, bits)) => (addr, Some(bits)),
                None => (block, None),
            };
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("{block:?} is not an address or CIDR block"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                Some(bits) => bits
                    .parse::<u8>()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("{block:?} has a bad prefix length"))?,
                None => max,
            };
            blocks.push((addr, bits));
        }
        Ok(Self(blocks))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .iter()
            .any(|(block, bits)| in_block(ip, *block, *bits))
    }
}

fn in_block(ip: IpAddr, block: IpAddr, bits: u8) -> bool {
    match (ip, block) {
        (IpAddr::V4(ip), IpAddr::V4(block)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(block) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(block)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(block) & mask
        }
        _ => false,
    }
}

/// The client's address: `peer`, unless `peer` is a trusted proxy, in which case the
/// rightmost address in `forwarded_for` that is not itself a trusted proxy (a client can
/// write anything at the left of the header, so only what trusted proxies appended counts).
pub(crate) fn client_address(
    peer: IpAddr,
    forwarded_for: Option<&[u8]>,
    trusted: &TrustedProxies,
) -> IpAddr {
    if !trusted.contains(peer) {
        return peer;
    }
    let Some(header) = forwarded_for.and_then(|h| std::str::from_utf8(h).ok()) else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',').map(str::trim) {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(ip) => client = ip,
            Ok(ip) => return ip,
            Err(_) => return client,
        }
    }
    client
}

/// Streams open per client address, within `--max-clients-per-ip`.
#[derive(Debug)]
pub(crate) struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One stream's place under its address's limit, given back when dropped.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// At most `max` streams per address; 0 means no limit.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more stream from `ip`: `Ok(None)` when there is no limit,
    /// `Err(())` when `ip` has its most streams open.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Option<AddressSlot>, ()> {
        if self.max == 0 {
            return Ok(None);
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return Err(());
        }
        *count += 1;
        Ok(Some(AddressSlot {
            table: Arc::clone(self),
            ip,
        }))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let trusted = TrustedProxies::parse(Some("10.0.0.0/8, ::1")).unwrap();
        let xff = |v: &'static str| Some(v.as_bytes());
        // Not from a trusted proxy: the header is whatever the client wrote.
        assert_eq!(
            client_address(ip("203.0.113.9"), xff("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
        // From the proxy: the rightmost address no trusted proxy wrote.
        assert_eq!(
            client_address(ip("10.1.2.3"), xff("1.2.3.4"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_address(ip("10.1.2.3"), xff("6.6.6.6, 1.2.3.4, 10.9.9.9"), &trusted),
            ip("1.2.3.4"),
            "a forged leftmost entry is ignored"
        );
        assert_eq!(
            client_address(ip("::1"), xff("2001:db8::7"), &trusted),
            ip("2001:db8::7")
        );
        assert_eq!(
            client_address(ip("10.1.2.3"), xff("garbage"), &trusted),
            ip("10.1.2.3")
        );
        assert_eq!(
            client_address(ip("10.1.2.3"), None, &trusted),
            ip("10.1.2.3")
        );
        let nobody = TrustedProxies::parse(None).unwrap();
        assert_eq!(
            client_address(ip("10.1.2.3"), xff("1.2.3.4"), &nobody),
            ip("10.1.2.3")
        );
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.0/x"] {
            assert!(TrustedProxies::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_address_has_its_own_count_and_places_come_back() {
        let table = PerAddress::new(2);
        let a = [
            table.take(ip("1.1.1.1")).unwrap(),
            table.take(ip("1.1.1.1")).unwrap(),
        ];
        assert!(table.take(ip("1.1.1.1")).is_err());
        assert!(table.take(ip("2.2.2.2")).unwrap().is_some());
        drop(a);
        assert!(table.take(ip("1.1.1.1")).unwrap().is_some());
        assert!(
            table.open.lock().unwrap().len() <= 1,
            "empty entries are removed"
        );
        assert!(PerAddress::new(0).take(ip("1.1.1.1")).unwrap().is_none());
    }
}
