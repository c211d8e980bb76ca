//! The client's address behind reverse proxies (`--trusted-proxy`).
//!
//! A request's address is its TCP peer's, unless the peer is a trusted proxy: then the
//! forwarding header is walked from the right (the end a proxy appends to), trusted hops are
//! skipped, and the first untrusted address is the client's. Anything a client could have written
//! itself lies left of that point and is never read, so a client outside the trusted set cannot
//! choose its address. When the walk meets something it cannot read (garbage, `unknown`, an
//! obfuscated id, too many hops), the request keeps its peer's address: a client that cannot be
//! told apart is counted as its proxy.
//!
//! `X-Forwarded-For` is read when the request has one; RFC 7239 `Forwarded` only when it has
//! none. The work per request is linear in the header's bytes (which hyper bounds) and at most
//! [`MAX_HOPS`] addresses are parsed.

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use http::HeaderMap;

/// Most hops read from the right of a forwarding header; a longer chain of trusted proxies is
/// not a deployment, and giving up keeps the peer's address.
pub const MAX_HOPS: usize = 16;
/// Longest address entry read (a bracketed IPv6 address with a port and quotes fits).
const MAX_ENTRY: usize = 64;

/// An IPv4 or IPv6 network, or one address (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            || format!("`{s}` is not an IP address or a CIDR network (e.g. 10.0.0.0/8, 2001:db8::/32, 127.0.0.1)");
        let (address, prefix) = match s.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (s.trim(), None),
        };
        let network = IpAddr::from_str(address).map_err(|_| usage())?.to_canonical();
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= width => p,
                _ => return Err(format!("`{s}`: the prefix length must be 0 to {width}")),
            },
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The proxies whose forwarding headers are believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    networks: Vec<Cidr>,
}

impl TrustedProxies {
    pub fn new(networks: Vec<Cidr>) -> Self {
        Self { networks }
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The address of the client behind `peer`, read from `headers` if `peer` is trusted.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let hops = if headers.contains_key("x-forwarded-for") { x_forwarded_for(headers) } else { forwarded(headers) };
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) if self.trusts(ip) => continue,
                Some(ip) => return ip,
                None => return peer,
            }
        }
        peer
    }
}

/// The right-most [`MAX_HOPS`] entries of every `X-Forwarded-For` line, left to right; `None`
/// for one that is not an address.
fn x_forwarded_for(headers: &HeaderMap) -> VecDeque<Option<IpAddr>> {
    let mut hops = VecDeque::new();
    'lines: for line in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(line) = line.to_str() else {
            hops.push_front(None);
            break;
        };
        for entry in line.rsplit(',') {
            if hops.len() == MAX_HOPS {
                // Past what is read: unusable if the walk gets this far.
                hops.push_front(None);
                break 'lines;
            }
            hops.push_front(address(entry.trim()));
        }
    }
    hops
}

/// The `for=` of the right-most [`MAX_HOPS`] elements of every `Forwarded` line, left to right;
/// `None` for one without a readable address (`unknown`, an obfuscated id, garbage).
fn forwarded(headers: &HeaderMap) -> VecDeque<Option<IpAddr>> {
    let mut hops = VecDeque::new();
    let mut dropped = false;
    for line in headers.get_all(http::header::FORWARDED).iter() {
        let Ok(line) = line.to_str() else {
            // Whatever came before this line is left of garbage: never read.
            hops.clear();
            hops.push_back(None);
            continue;
        };
        for element in split_unquoted(line, ',') {
            if hops.len() == MAX_HOPS {
                hops.pop_front();
                dropped = true;
            }
            hops.push_back(forwarded_for(element));
        }
    }
    if dropped {
        hops.push_front(None);
    }
    hops
}

/// The address of a `Forwarded` element's `for=` parameter.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let mut found = None;
    for pair in split_unquoted(element, ';') {
        let (name, value) = pair.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("for") {
            if found.is_some() {
                return None;
            }
            let value = value.trim();
            let value = match value.strip_prefix('"') {
                Some(quoted) => quoted.strip_suffix('"')?,
                None => value,
            };
            found = Some(address(value)?);
        }
    }
    found
}

/// `s` split at every `separator` outside a quoted string; one pass over its bytes.
fn split_unquoted(s: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut escaped = false;
    s.split(move |c: char| {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == separator && !quoted {
            return true;
        }
        false
    })
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:443`.
fn address(entry: &str) -> Option<IpAddr> {
    if entry.is_empty() || entry.len() > MAX_ENTRY {
        return None;
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (ip, port) = rest.split_once(']')?;
        if !(port.is_empty() || port.strip_prefix(':').is_some_and(valid_port)) {
            return None;
        }
        return ip.parse::<std::net::Ipv6Addr>().ok().map(|ip| IpAddr::V6(ip).to_canonical());
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (ip, port) = entry.split_once(':')?;
    if !valid_port(port) {
        return None;
    }
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A port number, or an RFC 7239 obfuscated port (`_abc`).
fn valid_port(port: &str) -> bool {
    port.parse::<u16>().is_ok()
        || port.strip_prefix('_').is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "an IPv4-mapped peer is its IPv4 address");
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains(ip("2001:db8::1")));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "example.com", "10.0.0.0/", "10.0.0.0/-1", "1.2.3.4/8/8"] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn an_untrusted_peer_is_its_own_address_whatever_it_sends() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(trusted.client(ip("192.0.2.9"), &h), ip("192.0.2.9"));
        assert_eq!(TrustedProxies::default().client(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn x_forwarded_for_is_walked_from_the_right_past_trusted_hops() {
        let trusted = proxies(&["10.0.0.0/8", "2001:db8::/32"]);
        let peer = ip("10.0.0.1");
        let walk = |value: &str| trusted.client(peer, &headers(&[("x-forwarded-for", value)]));
        assert_eq!(walk("1.2.3.4"), ip("1.2.3.4"));
        assert_eq!(walk("6.6.6.6, 1.2.3.4, 10.0.0.2"), ip("1.2.3.4"), "a client's own entry is left of its proxy's");
        assert_eq!(walk("10.0.0.3,10.0.0.2"), peer, "every hop trusted");
        assert_eq!(walk("1.2.3.4:5555"), ip("1.2.3.4"));
        assert_eq!(walk("[2001:db9::7]:443"), ip("2001:db9::7"));
        assert_eq!(walk("2001:db9::7, 2001:db8::1"), ip("2001:db9::7"));
        assert_eq!(walk("1.2.3.4, garbage"), peer, "unusable right of the client");
        assert_eq!(walk("garbage, 1.2.3.4"), ip("1.2.3.4"), "left of the client is never read");
        assert_eq!(walk(""), peer);
        assert_eq!(walk(" , "), peer);
        assert_eq!(walk("::ffff:1.2.3.4"), ip("1.2.3.4"));
        // Several lines are one list, in order.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4"), ("x-forwarded-for", "10.0.0.9")]);
        assert_eq!(trusted.client(peer, &h), ip("1.2.3.4"));
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        let walk = |value: &str| trusted.client(peer, &headers(&[("forwarded", value)]));
        assert_eq!(walk("for=1.2.3.4"), ip("1.2.3.4"));
        assert_eq!(walk("For=\"1.2.3.4:80\";proto=https;by=10.0.0.1"), ip("1.2.3.4"));
        assert_eq!(walk("for=\"[2001:db8:cafe::17]:4711\""), ip("2001:db8:cafe::17"));
        assert_eq!(walk("for=\"[2001:db8:cafe::17]\", for=10.0.0.5"), ip("2001:db8:cafe::17"));
        assert_eq!(walk("for=6.6.6.6, for=unknown"), peer, "an unknown hop ends the walk");
        assert_eq!(walk("for=6.6.6.6, for=_hidden"), peer, "so does an obfuscated one");
        assert_eq!(walk("for=\"1.2.3.4:_p1\""), ip("1.2.3.4"), "an obfuscated port is fine");
        assert_eq!(walk("proto=https"), peer, "no for= is no address");
        assert_eq!(walk("for=1.2.3.4;for=5.6.7.8"), peer, "two for= in one element");
        assert_eq!(walk("for=\"1.2.3.4, for=5.6.7.8\""), peer, "a comma inside quotes splits nothing");
        assert_eq!(walk("for=\"unterminated"), peer);
        // X-Forwarded-For wins when both are there.
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(trusted.client(peer, &h), ip("1.2.3.4"));
    }

    #[test]
    fn hostile_headers_cost_bounded_work_and_fall_back_to_the_peer() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        // A long list of trusted hops: the walk gives up after MAX_HOPS.
        let long = vec!["10.1.1.1"; 100_000].join(",");
        assert_eq!(trusted.client(peer, &headers(&[("x-forwarded-for", &long)])), peer);
        // A long list with the client on the right is read at once.
        let spoofed = format!("{}, 1.2.3.4", vec!["6.6.6.6"; 100_000].join(","));
        assert_eq!(trusted.client(peer, &headers(&[("x-forwarded-for", &spoofed)])), ip("1.2.3.4"));
        let elements = vec!["for=10.2.2.2;proto=http"; 50_000].join(", ");
        assert_eq!(trusted.client(peer, &headers(&[("forwarded", &elements)])), peer);
        let elements = format!("for=1.2.3.4, {}", vec!["for=10.2.2.2"; 20].join(","));
        assert_eq!(trusted.client(peer, &headers(&[("forwarded", &elements)])), peer, "past MAX_HOPS");
        let quotes = "\"".repeat(200_000);
        assert_eq!(trusted.client(peer, &headers(&[("forwarded", &quotes)])), peer);
        let one_entry = "1".repeat(200_000);
        assert_eq!(trusted.client(peer, &headers(&[("x-forwarded-for", &one_entry)])), peer);
        let many_lines: Vec<(&str, &str)> = (0..1000).map(|_| ("x-forwarded-for", "10.3.3.3")).collect();
        assert_eq!(trusted.client(peer, &headers(&many_lines)), peer);
        let mut garbage = headers(&[]);
        garbage.append("x-forwarded-for", http::HeaderValue::from_bytes(b"1.2.3.4\xff").unwrap());
        assert_eq!(trusted.client(peer, &garbage), peer);
    }
}
