//! Where a function may call out to: the allow-list of `[outbound] allowed_hosts` and the
//! server-side request forgery (SSRF) guard, as pure rules the host import applies.
//!
//! The allow-list takes Spin's syntax (`allowed_outbound_hosts`), so a manifest written for
//! Spin reads the same here:
//!
//! ```text
//! https://api.example.com        that host, on https's default port (443)
//! https://*.example.com:8443     any name below example.com (not example.com itself), port 8443
//! http://10.0.0.5:3000           an address, listed explicitly
//! https://api.example.com:*      any port
//! *://api.example.com            http on 80 and https on 443
//! *://*:*                        anything (still subject to the SSRF guard)
//! ```
//!
//! Nothing is allowed by default. Deny-by-default is not enough on its own: a name can
//! resolve to anything, so after resolution [`is_internal`] addresses (loopback, private,
//! link-local, cloud metadata, …) are refused unless the host was listed *explicitly* — by
//! its exact name or address, never through a wildcard ([`AllowedHosts::allows_internal`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::host::is_below;

/// Most entries one manifest may list.
pub const MAX_ALLOWED_HOSTS: usize = 64;
/// Longest entry accepted.
pub const MAX_ENTRY_LEN: usize = 300;

/// A URL scheme a function may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// The port a URL of this scheme means when it names none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn parse(text: &str) -> Option<Scheme> {
        if text.eq_ignore_ascii_case("http") {
            Some(Scheme::Http)
        } else if text.eq_ignore_ascii_case("https") {
            Some(Scheme::Https)
        } else {
            None
        }
    }
}

/// The host part of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    /// `*`: any host.
    Any,
    /// `*.suffix`: any name strictly below `suffix`.
    Below(String),
    /// An exact name (lowercase, no trailing dot) or an IP address.
    Exact(String),
}

/// One `allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// `None`: `*`, http and https.
    scheme: Option<Scheme>,
    host: HostRule,
    /// `None`: `*`, any port; `Some(None)`: the scheme's default port.
    port: Option<Option<u16>>,
    /// As written, for messages.
    text: String,
}

/// Why an entry was refused. Display is one line naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowed host {input:?} is invalid: {reason}")]
pub struct AllowedHostError {
    /// The entry as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for AllowedHost {
    type Err = AllowedHostError;

    fn from_str(input: &str) -> Result<AllowedHost, AllowedHostError> {
        let refuse = |reason: &str| AllowedHostError {
            input: input.chars().take(MAX_ENTRY_LEN).collect(),
            reason: reason.to_string(),
        };
        if input.len() > MAX_ENTRY_LEN {
            return Err(refuse(&format!("longer than {MAX_ENTRY_LEN} bytes")));
        }
        let (scheme, rest) = input
            .split_once("://")
            .ok_or_else(|| refuse("give a scheme, e.g. https://api.example.com"))?;
        let scheme = match scheme {
            "*" => None,
            other => Some(Scheme::parse(other).ok_or_else(|| refuse("the scheme is http, https or *"))?),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(refuse("a host has no path, query, fragment or user"));
        }
        let (host, port) = split_port(authority).map_err(|reason| refuse(&reason))?;
        // No port: the scheme's default (for `*://host`, each scheme on its own).
        let port = match port {
            None => Some(None),
            Some("*") => None,
            Some(digits) => match digits.parse::<u16>() {
                Ok(port) if port > 0 && digits.bytes().all(|byte| byte.is_ascii_digit()) => Some(Some(port)),
                _ => return Err(refuse("the port is a number from 1 to 65535, or *")),
            },
        };
        let host = parse_host(host).map_err(|reason| refuse(&reason))?;
        Ok(AllowedHost {
            scheme,
            host,
            port,
            text: input.to_string(),
        })
    }
}

/// Splits `host[:port]`, with IPv6 literals in brackets.
fn split_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (address, rest) = bracketed.split_once(']').ok_or("an IPv6 address ends with ]")?;
        return match rest {
            "" => Ok((address, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((address, Some(port))),
                None => Err("after ] comes :PORT or nothing".into()),
            },
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn parse_host(host: &str) -> Result<HostRule, String> {
    if host == "*" {
        return Ok(HostRule::Any);
    }
    if let Ok(address) = host.parse::<IpAddr>() {
        return Ok(HostRule::Exact(address.to_string()));
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(name) => (true, name),
        None => (false, host.as_str()),
    };
    if name.is_empty() || name.len() > 253 {
        return Err("the host name is empty or too long".into());
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
        if !valid {
            return Err(format!(
                "{label:?} is not a host name label (a wildcard is `*` or a leading `*.`)"
            ));
        }
    }
    Ok(if wildcard {
        HostRule::Below(name.to_string())
    } else {
        HostRule::Exact(name.to_string())
    })
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl AllowedHost {
    /// Whether a request to `scheme://host:port` is allowed by this entry; `host` is a
    /// name (any case, optional trailing dot) or an IP address, unbracketed.
    pub fn allows(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        let scheme_ok = self.scheme.is_none_or(|allowed| allowed == scheme);
        let port_ok = match self.port {
            None => true,
            Some(None) => port == scheme.default_port(),
            Some(Some(allowed)) => port == allowed,
        };
        scheme_ok && port_ok && self.host_matches(host)
    }

    fn host_matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        match &self.host {
            HostRule::Any => true,
            HostRule::Below(suffix) => host.parse::<IpAddr>().is_err() && is_below(host, suffix),
            HostRule::Exact(name) => match (host.parse::<IpAddr>(), name.parse::<IpAddr>()) {
                (Ok(a), Ok(b)) => a == b,
                (Err(_), Err(_)) => host.eq_ignore_ascii_case(name),
                _ => false,
            },
        }
    }

    /// Whether this entry names `host` exactly (not through a wildcard).
    fn names_exactly(&self, host: &str) -> bool {
        matches!(self.host, HostRule::Exact(_)) && self.host_matches(host)
    }
}

/// A function's whole allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    entries: Vec<AllowedHost>,
}

impl AllowedHosts {
    /// Parses the manifest's list; the first bad entry is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowedHosts, AllowedHostError> {
        if entries.len() > MAX_ALLOWED_HOSTS {
            return Err(AllowedHostError {
                input: format!("{} entries", entries.len()),
                reason: format!("at most {MAX_ALLOWED_HOSTS} entries"),
            });
        }
        let entries = entries
            .iter()
            .map(|entry| entry.as_ref().parse())
            .collect::<Result<Vec<AllowedHost>, _>>()?;
        Ok(AllowedHosts { entries })
    }

    /// Whether nothing is allowed (the default).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry that allows `scheme://host:port`, if any.
    pub fn allowing(&self, scheme: Scheme, host: &str, port: u16) -> Option<&AllowedHost> {
        self.entries.iter().find(|entry| entry.allows(scheme, host, port))
    }

    /// Whether `host` may resolve to an [`is_internal`] address: only when an entry that
    /// allows the request names the host exactly. A wildcard (`*`, `*.example.com`) never
    /// opens the inside of the network: a name anyone can point anywhere is not a listing.
    pub fn allows_internal(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        self.entries
            .iter()
            .any(|entry| entry.allows(scheme, host, port) && entry.names_exactly(host))
    }
}

/// Whether `address` is inside: not a public unicast address a function may reach by a
/// wildcard. Covers unspecified, loopback, private (RFC 1918, unique local), carrier-grade
/// NAT, link-local (where cloud metadata services live, 169.254.169.254 and fd00:ec2::254
/// included), multicast, broadcast, reserved and documentation ranges, and IPv4 carried in
/// IPv6 (mapped, compatible, NAT64), judged by the IPv4 address inside.
pub fn is_internal(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(address: Ipv4Addr) -> bool {
    let [a, b, c, _] = address.octets();
    address.is_unspecified()
        || address.is_loopback()
        || address.is_private()
        || address.is_link_local()
        || address.is_multicast()
        || address.is_broadcast()
        || address.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..=127).contains(&b)) // carrier-grade NAT, RFC 6598
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking, RFC 2544
        || a >= 240 // reserved
        || address == Ipv4Addr::new(168, 63, 129, 16) // Azure's host services
}

/// Addresses no function reaches, even one that lists them by name: link-local addresses,
/// where clouds serve instance metadata and credentials (169.254.169.254, fd00:ec2::254),
/// and the other metadata services (Alibaba's 100.100.100.200, Azure's 168.63.129.16).
pub fn is_never_reachable(address: IpAddr) -> bool {
    // IPv4 carried in IPv6 (mapped, compatible, NAT64, 6to4) is judged by the IPv4 inside.
    let address = match address {
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match address {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                || v4 == Ipv4Addr::new(100, 100, 100, 200)
                || v4 == Ipv4Addr::new(168, 63, 129, 16)
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

/// The IPv4 address an IPv6 one carries: IPv4-mapped, IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`) or 6to4 (`2002:a.b.c.d::/48`).
fn embedded_v4(address: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = address.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = address.segments();
    let low = Ipv4Addr::new(
        (segments[6] >> 8) as u8,
        segments[6] as u8,
        (segments[7] >> 8) as u8,
        segments[7] as u8,
    );
    if (segments[..6] == [0; 6] && !address.is_unspecified() && !address.is_loopback())
        || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        || segments[..3] == [0x64, 0xff9b, 1]
    {
        return Some(low);
    }
    if segments[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (segments[1] >> 8) as u8,
            segments[1] as u8,
            (segments[2] >> 8) as u8,
            segments[2] as u8,
        ));
    }
    None
}

fn is_internal_v6(address: Ipv6Addr) -> bool {
    if let Some(v4) = address.to_ipv4_mapped() {
        return is_internal_v4(v4);
    }
    let segments = address.segments();
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96): the IPv4 inside.
    let embedded = Ipv4Addr::new(
        (segments[6] >> 8) as u8,
        segments[6] as u8,
        (segments[7] >> 8) as u8,
        segments[7] as u8,
    );
    if segments[..6] == [0; 6] && !address.is_unspecified() && !address.is_loopback() {
        return is_internal_v4(embedded);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_internal_v4(embedded);
    }
    // 6to4 (2002:a.b.c.d::/48): the IPv4 in segments 1 and 2.
    if segments[0] == 0x2002 {
        let v4 = Ipv4Addr::new(
            (segments[1] >> 8) as u8,
            segments[1] as u8,
            (segments[2] >> 8) as u8,
            segments[2] as u8,
        );
        if is_internal_v4(v4) {
            return true;
        }
    }
    address.is_unspecified()
        || address.is_loopback()
        || address.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local, fd00:ec2::254 included
        || (segments[0] & 0xffc0) == 0xfe80 // link-local
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        || (segments[0] == 0x0100 && segments[1..4] == [0, 0, 0]) // discard-only, RFC 6666
        || (segments[0] == 0x64 && segments[1] == 0xff9b && segments[2] == 1) // local-use NAT64, RFC 8215
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_addresses_are_never_reachable_in_any_ipv6_dress() {
        for text in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "100.100.100.200",
            "64:ff9b::6464:64c8",
            "fd00:ec2::254",
            "fe80::1",
        ] {
            assert!(is_never_reachable(text.parse().unwrap()), "{text}");
        }
        for text in [
            "8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "10.0.0.5",
            "::1",
        ] {
            assert!(!is_never_reachable(text.parse().unwrap()), "{text}");
        }
    }

    fn hosts(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(entries).unwrap()
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let none = AllowedHosts::default();
        assert!(none.is_empty());
        assert!(none.allowing(Scheme::Https, "api.example.com", 443).is_none());
    }

    #[test]
    fn spins_syntax_means_what_spin_says() {
        let list = hosts(&["https://api.example.com"]);
        assert!(list.allowing(Scheme::Https, "api.example.com", 443).is_some());
        assert!(list.allowing(Scheme::Https, "API.Example.com.", 443).is_some());
        assert!(
            list.allowing(Scheme::Http, "api.example.com", 80).is_none(),
            "another scheme"
        );
        assert!(
            list.allowing(Scheme::Https, "api.example.com", 8443).is_none(),
            "another port"
        );
        assert!(list.allowing(Scheme::Https, "x.api.example.com", 443).is_none());

        let list = hosts(&["https://*.example.com:8443"]);
        assert!(list.allowing(Scheme::Https, "a.example.com", 8443).is_some());
        assert!(list.allowing(Scheme::Https, "a.b.example.com", 8443).is_some());
        assert!(
            list.allowing(Scheme::Https, "example.com", 8443).is_none(),
            "not the apex"
        );
        assert!(list.allowing(Scheme::Https, "a.example.com", 443).is_none());
        assert!(list.allowing(Scheme::Https, "aexample.com", 8443).is_none());

        let list = hosts(&["*://api.example.com"]);
        assert!(list.allowing(Scheme::Http, "api.example.com", 80).is_some());
        assert!(list.allowing(Scheme::Https, "api.example.com", 443).is_some());
        assert!(list.allowing(Scheme::Http, "api.example.com", 443).is_none());

        let list = hosts(&["https://api.example.com:*"]);
        assert!(list.allowing(Scheme::Https, "api.example.com", 1).is_some());

        let list = hosts(&["*://*:*"]);
        assert!(list.allowing(Scheme::Http, "anything.test", 8080).is_some());
        assert!(list.allowing(Scheme::Https, "10.0.0.1", 443).is_some());
    }

    #[test]
    fn addresses_match_as_addresses() {
        let list = hosts(&["http://10.0.0.5:3000", "http://[::1]:8080"]);
        assert!(list.allowing(Scheme::Http, "10.0.0.5", 3000).is_some());
        assert!(list.allowing(Scheme::Http, "::1", 8080).is_some());
        assert!(list.allowing(Scheme::Http, "0:0:0:0:0:0:0:1", 8080).is_some());
        assert!(list.allowing(Scheme::Http, "10.0.0.6", 3000).is_none());
        // A wildcard name never matches an address.
        let list = hosts(&["http://*.0.0.5"]);
        assert!(list.allowing(Scheme::Http, "10.0.0.5", 80).is_none());
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        for (entry, reason) in [
            ("api.example.com", "give a scheme"),
            ("ftp://api.example.com", "http, https or *"),
            ("https://api.example.com/v1", "no path"),
            ("https://user@api.example.com", "no path, query, fragment or user"),
            ("https://api.example.com:0", "1 to 65535"),
            ("https://api.example.com:99999", "1 to 65535"),
            ("https://api.example.com:+80", "1 to 65535"),
            ("https://a.*.example.com", "not a host name label"),
            ("https://exa mple.com", "not a host name label"),
            ("https://", "empty"),
            ("https://[::1", "ends with ]"),
        ] {
            let error = entry.parse::<AllowedHost>().unwrap_err();
            assert!(error.to_string().contains(reason), "{entry}: {error}");
            assert!(error.to_string().contains(&format!("{entry:?}")), "{error}");
        }
        let many: Vec<String> = (0..=MAX_ALLOWED_HOSTS)
            .map(|i| format!("https://h{i}.test"))
            .collect();
        assert!(AllowedHosts::parse(&many).is_err());
        assert!("https://a.test".parse::<AllowedHost>().is_ok());
    }

    #[test]
    fn the_inside_is_open_only_to_hosts_listed_by_name() {
        let list = hosts(&["http://localhost:3000", "https://*.example.com", "*://*:*"]);
        assert!(list.allows_internal(Scheme::Http, "localhost", 3000));
        assert!(
            !list.allows_internal(Scheme::Http, "localhost", 3001),
            "not that port"
        );
        assert!(
            !list.allows_internal(Scheme::Https, "db.example.com", 443),
            "a wildcard"
        );
        assert!(
            !list.allows_internal(Scheme::Http, "169.254.169.254", 80),
            "only `*`"
        );
        let list = hosts(&["http://169.254.169.254"]);
        assert!(list.allows_internal(Scheme::Http, "169.254.169.254", 80));
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for address in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
        ] {
            assert!(is_internal(address.parse().unwrap()), "{address}");
        }
        for address in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!is_internal(address.parse().unwrap()), "{address}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any text is parsed or refused without panicking, and an accepted entry answers
        /// any host without panicking; an entry naming a host allows that host.
        #[test]
        fn parsing_and_matching_never_panic(
            entry in "(\\*|https?|[a-z]{0,5})://[a-zA-Z0-9*.:\\[\\]@/-]{0,40}",
            host in "[a-zA-Z0-9.:-]{0,30}",
            port in proptest::prelude::any::<u16>(),
        ) {
            if let Ok(allowed) = entry.parse::<AllowedHost>() {
                let _ = allowed.allows(Scheme::Https, &host, port);
                let _ = allowed.names_exactly(&host);
            }
        }

        #[test]
        fn a_listed_name_is_allowed(name in "[a-z][a-z0-9]{0,10}(\\.[a-z][a-z0-9]{0,10}){0,3}", port in 1u16..) {
            let list = AllowedHosts::parse(&[format!("https://{name}:{port}")]).unwrap();
            proptest::prop_assert!(list.allowing(Scheme::Https, &name, port).is_some());
            proptest::prop_assert!(list.allows_internal(Scheme::Https, &name, port));
            proptest::prop_assert!(list.allowing(Scheme::Http, &name, port).is_none());
        }
    }

    #[test]
    fn metadata_and_link_local_are_never_reachable() {
        for never in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "168.63.129.16",
        ] {
            let address: IpAddr = never.parse().unwrap();
            assert!(is_never_reachable(address), "{never}");
            assert!(is_internal(address), "{never}");
        }
        for reachable in ["127.0.0.1", "10.0.0.5", "93.184.216.34", "::1"] {
            assert!(!is_never_reachable(reachable.parse().unwrap()), "{reachable}");
        }
        for internal in ["2002:7f00:1::1", "2002:a00:5::", "64:ff9b:1::a00:5"] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        assert!(!is_internal("2002:5db8:d822::1".parse().unwrap()));
    }
}
