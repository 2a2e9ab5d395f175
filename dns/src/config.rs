//! What the DNS server answers for, validated once at start-up.
//!
//! The command line gives strings (`--zone example.com`, `--region-map 10.1.0.0/16=eu`,
//! `--region-fallback eu=us,ap`, `--ns ns1.example.com=192.0.2.1`); each has a parser here
//! that clap calls, so a bad value is refused before anything binds, with an error that
//! clap prefixes with the flag's name. [`DnsConfig`] is the result: plain data that the
//! pure answer function ([`crate::answer`]) and the server's limits read on every query
//! and never change.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use atoll_core::host::is_at_or_below;
use atoll_core::{HostPattern, RoutePattern};
use ipnet::IpNet;

use crate::rrl::RateLimit;

/// TTL of NS records and their glue: they only change when the operator edits flags.
pub const NS_TTL: u32 = 3600;
/// Longest `--ttl`: one day. Answers are meant to be short-lived; this only bounds typos.
pub const MAX_TTL: Duration = Duration::from_secs(86_400);
/// Default `--max-udp-payload`: the DNS flag day 2020 value, which fits an IPv6 packet on
/// any path without fragmentation (fragments are what spoofing attacks on DNS use).
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1232;
/// Smallest UDP payload every DNS client takes (RFC 1035).
pub const MIN_UDP_PAYLOAD: u16 = 512;
/// Largest `--max-udp-payload` accepted (the usual EDNS default of resolvers).
pub const MAX_UDP_PAYLOAD: u16 = 4096;

/// A DNS name this server is authoritative for (or an NS host name): lowercase, without
/// the trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    /// The name, lowercase, without a trailing dot.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` (lowercase, no trailing dot) is this name or below it.
    pub fn contains(&self, name: &str) -> bool {
        is_at_or_below(name, &self.0)
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DomainName {
    type Err = String;

    /// Accepts the host-name syntax of routes (labels of `[a-z0-9-]`, any case, one
    /// optional trailing dot); refuses wildcards, ports and paths.
    fn from_str(input: &str) -> Result<Self, String> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        let route: RoutePattern = trimmed.parse().map_err(|e: atoll_core::RouteError| e.reason)?;
        match (route.host, route.path_prefix) {
            (HostPattern::Exact(name), None) => Ok(DomainName(name.to_ascii_lowercase())),
            (HostPattern::Wildcard { .. }, _) => Err("a wildcard is not a domain name".into()),
            (_, Some(_)) => Err("a domain name has no path".into()),
        }
    }
}

/// A region name as nodes announce it (`atoll node --region`): non-empty, no whitespace,
/// `=` or `,` (the separators of the flags that name regions).
fn region_name(input: &str) -> Result<String, String> {
    if input.is_empty() {
        return Err("the region name is empty".into());
    }
    if input
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '=' || c == ',')
    {
        return Err(format!("{input:?} is not a region name"));
    }
    Ok(input.to_owned())
}

/// `--region-map CIDR=REGION`: clients in `CIDR` belong to `REGION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionRule {
    /// The subnet (host bits cleared).
    pub net: IpNet,
    /// The region its clients are served from.
    pub region: String,
}

impl FromStr for RegionRule {
    type Err = String;

    /// `10.1.0.0/16=eu`; a bare address counts as a /32 (or /128).
    fn from_str(input: &str) -> Result<Self, String> {
        let (cidr, region) = input
            .split_once('=')
            .ok_or_else(|| format!("{input:?} is not CIDR=REGION"))?;
        let net = match cidr.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => match cidr.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(format!(
                        "{cidr:?} is not a CIDR (like 10.1.0.0/16 or 2001:db8::/32)"
                    ));
                }
            },
        };
        Ok(RegionRule {
            net,
            region: region_name(region)?,
        })
    }
}

/// `--region-fallback REGION=R1,R2`: where `REGION`'s clients go, in order, when it has no
/// healthy node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FallbackRule {
    /// The region whose order this is.
    pub region: String,
    /// The regions to try next, in order.
    pub then: Vec<String>,
}

impl FromStr for FallbackRule {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, String> {
        let (region, list) = input
            .split_once('=')
            .ok_or_else(|| format!("{input:?} is not REGION=R1,R2,…"))?;
        let region = region_name(region)?;
        let mut then = Vec::new();
        for next in list.split(',') {
            let next = region_name(next.trim())?;
            if next == region {
                return Err(format!("region {region:?} cannot fall back to itself"));
            }
            if !then.contains(&next) {
                then.push(next);
            }
        }
        Ok(FallbackRule { region, then })
    }
}

/// `--ns NAME[=IP]`: a name server of the zones, with an address to serve as its glue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsFlag {
    /// The name server's host name.
    pub name: DomainName,
    /// Its address, if given.
    pub addr: Option<IpAddr>,
}

impl FromStr for NsFlag {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, String> {
        let (name, addr) = match input.split_once('=') {
            Some((name, addr)) => {
                let addr = addr
                    .parse::<IpAddr>()
                    .map_err(|_| format!("{addr:?} is not an IP address"))?;
                (name, Some(addr))
            }
            None => (input, None),
        };
        let name = name
            .parse::<DomainName>()
            .map_err(|e| format!("{name:?} is not a host name: {e}"))?;
        Ok(NsFlag { name, addr })
    }
}

/// `--zone`: a zone name (clap value parser).
pub fn parse_zone(input: &str) -> Result<DomainName, String> {
    input
        .parse::<DomainName>()
        .map_err(|e| format!("{input:?} is not a zone name: {e}"))
}

/// `--ttl`: humantime, whole seconds, 1 s ..= 1 day (clap value parser).
pub fn parse_ttl(input: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(input).map_err(|e| format!("{input:?}: {e}"))?;
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(format!("{input:?} is not between 1s and 1day"));
    }
    Ok(ttl)
}

/// A name server of a zone and its addresses (glue).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameServer {
    /// Host name.
    pub name: DomainName,
    /// Addresses answered for `name` (and sent as glue with NS answers); may be empty when
    /// the name lives elsewhere.
    pub addrs: Vec<IpAddr>,
}

/// A zone this server is authoritative for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    /// The apex.
    pub name: DomainName,
    /// Its NS set, never empty; the first one is the SOA's MNAME.
    pub ns: Vec<NameServer>,
}

/// Client subnets → regions; the most specific prefix that contains the client wins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionMap {
    /// Most specific first, so the first match is the answer.
    rules: Vec<RegionRule>,
}

impl RegionMap {
    /// The map of these rules. The same subnet given twice keeps the last region.
    pub fn new(rules: impl IntoIterator<Item = RegionRule>) -> RegionMap {
        let mut by_net: BTreeMap<IpNet, String> = BTreeMap::new();
        for rule in rules {
            by_net.insert(rule.net, rule.region);
        }
        let mut rules: Vec<RegionRule> = by_net
            .into_iter()
            .map(|(net, region)| RegionRule { net, region })
            .collect();
        rules.sort_by_key(|rule| std::cmp::Reverse(rule.net.prefix_len()));
        RegionMap { rules }
    }

    /// The region of `client` and the prefix length that decided it, if a rule covers it.
    /// IPv4-mapped IPv6 addresses (a dual-stack socket's view of an IPv4 client) count as
    /// IPv4.
    pub fn lookup(&self, client: IpAddr) -> Option<(&str, u8)> {
        let client = client.to_canonical();
        self.rules
            .iter()
            .find(|rule| rule.net.contains(&client))
            .map(|rule| (rule.region.as_str(), rule.net.prefix_len()))
    }
}

/// Everything the answer function needs besides the cluster's state.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Zones served; a name below none of them is REFUSED. Longest match wins when zones
    /// nest.
    pub zones: Vec<Zone>,
    /// Client subnet → region.
    pub region_map: RegionMap,
    /// Region of clients no rule covers.
    pub default_region: String,
    /// Per-region fallback order (before every other region, by name).
    pub fallback: BTreeMap<String, Vec<String>>,
    /// TTL of A/AAAA answers and of the SOA (also its MINIMUM, the negative-caching TTL).
    pub ttl: u32,
    /// Largest UDP response sent, whatever larger EDNS buffer a client claims; a response
    /// that does not fit is truncated (TC=1) and the client retries over TCP.
    pub max_udp_payload: u16,
    /// Response rate limiting of UDP answers per client prefix (`None`: off).
    pub rate_limit: Option<RateLimit>,
}

impl DnsConfig {
    /// The zone that `name` (lowercase, no trailing dot) belongs to: the longest zone it is
    /// at or below.
    pub fn zone_of(&self, name: &str) -> Option<&Zone> {
        self.zones
            .iter()
            .filter(|zone| zone.name.contains(name))
            .max_by_key(|zone| zone.name.as_str().len())
    }

    /// The region of a client (`None`: unknown, e.g. ECS with source prefix 0).
    pub fn client_region(&self, client: Option<IpAddr>) -> &str {
        client
            .and_then(|ip| self.region_map.lookup(ip))
            .map_or(self.default_region.as_str(), |(region, _)| region)
    }
}

/// Builds the zones' NS sets: the `--ns` flags for every zone (same name twice: its
/// addresses are merged), or `ns1.<zone>` with `default_glue` when none is given.
pub fn name_servers(zones: &[DomainName], ns: &[NsFlag], default_glue: Option<IpAddr>) -> Vec<Zone> {
    let mut explicit: Vec<NameServer> = Vec::new();
    for flag in ns {
        let entry = match explicit.iter_mut().position(|n| n.name == flag.name) {
            Some(i) => &mut explicit[i],
            None => {
                explicit.push(NameServer {
                    name: flag.name.clone(),
                    addrs: Vec::new(),
                });
                explicit.last_mut().expect("just pushed")
            }
        };
        if let Some(addr) = flag.addr.map(|a| a.to_canonical())
            && !entry.addrs.contains(&addr)
        {
            entry.addrs.push(addr);
        }
    }
    let mut out: Vec<Zone> = Vec::new();
    for zone in zones {
        if out.iter().any(|z| z.name == *zone) {
            continue;
        }
        let ns = if explicit.is_empty() {
            vec![NameServer {
                name: DomainName(format!("ns1.{zone}")),
                addrs: default_glue.into_iter().collect(),
            }]
        } else {
            explicit.clone()
        };
        out.push(Zone {
            name: zone.clone(),
            ns,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names() {
        assert_eq!(
            "Example.COM.".parse::<DomainName>().unwrap().as_str(),
            "example.com"
        );
        assert_eq!("localhost".parse::<DomainName>().unwrap().as_str(), "localhost");
        for bad in [
            "",
            ".",
            "*.example.com",
            "example.com/x",
            "ex ample.com",
            "a..b",
            "-a.com",
        ] {
            assert!(bad.parse::<DomainName>().is_err(), "{bad:?} accepted");
        }
        let zone: DomainName = "example.com".parse().unwrap();
        assert!(zone.contains("example.com"));
        assert!(zone.contains("a.b.example.com"));
        assert!(!zone.contains("badexample.com"));
        assert!(!zone.contains("com"));
    }

    #[test]
    fn region_rules() {
        let rule: RegionRule = "10.1.2.3/16=eu".parse().unwrap();
        assert_eq!(rule.net, "10.1.0.0/16".parse::<IpNet>().unwrap());
        assert_eq!(rule.region, "eu");
        let rule: RegionRule = "2001:db8::1=us".parse().unwrap();
        assert_eq!(rule.net, "2001:db8::1/128".parse::<IpNet>().unwrap());
        for bad in [
            "10.0.0.0/16",
            "10.0.0.0/33=eu",
            "nonsense=eu",
            "10.0.0.0/8=",
            "10.0.0.0/8=e u",
        ] {
            assert!(bad.parse::<RegionRule>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn most_specific_prefix_wins_whatever_the_order() {
        let map = RegionMap::new([
            "10.0.0.0/8=wide".parse().unwrap(),
            "10.1.2.0/24=narrow".parse().unwrap(),
            "10.1.0.0/16=middle".parse().unwrap(),
            "2001:db8::/32=six".parse().unwrap(),
        ]);
        let lookup = |ip: &str| map.lookup(ip.parse().unwrap()).map(|(r, _)| r.to_owned());
        assert_eq!(lookup("10.1.2.3").as_deref(), Some("narrow"));
        assert_eq!(lookup("10.1.3.3").as_deref(), Some("middle"));
        assert_eq!(lookup("10.2.0.1").as_deref(), Some("wide"));
        assert_eq!(lookup("::ffff:10.1.2.3").as_deref(), Some("narrow"));
        assert_eq!(lookup("2001:db8::5").as_deref(), Some("six"));
        assert_eq!(lookup("192.0.2.1"), None);
        assert_eq!(map.lookup("10.1.2.3".parse().unwrap()).unwrap().1, 24);
    }

    #[test]
    fn fallback_rules() {
        let rule: FallbackRule = "eu=us, ap,us".parse().unwrap();
        assert_eq!(rule.region, "eu");
        assert_eq!(rule.then, ["us", "ap"]);
        for bad in ["eu", "eu=", "eu=eu", "=us", "eu=us,,ap"] {
            assert!(bad.parse::<FallbackRule>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ns_flags_and_defaults() {
        let zones: Vec<DomainName> = vec!["example.com".parse().unwrap(), "example.org".parse().unwrap()];
        let default = name_servers(&zones, &[], Some("192.0.2.53".parse().unwrap()));
        assert_eq!(default[0].ns[0].name.as_str(), "ns1.example.com");
        assert_eq!(default[1].ns[0].name.as_str(), "ns1.example.org");
        assert_eq!(default[1].ns[0].addrs, ["192.0.2.53".parse::<IpAddr>().unwrap()]);

        let flags: Vec<NsFlag> = [
            "ns1.example.com=192.0.2.1",
            "ns2.example.net",
            "NS1.example.com=2001:db8::1",
        ]
        .iter()
        .map(|f| f.parse().unwrap())
        .collect();
        let zones = name_servers(&zones, &flags, None);
        for zone in &zones {
            assert_eq!(zone.ns.len(), 2);
            assert_eq!(zone.ns[0].addrs.len(), 2);
            assert!(zone.ns[1].addrs.is_empty());
        }
        for bad in ["ns1.example.com=nope", "=192.0.2.1", "*.x=192.0.2.1"] {
            assert!(bad.parse::<NsFlag>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("5s").unwrap(), Duration::from_secs(5));
        for bad in ["0s", "500ms", "2days", "soon"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn nested_zones_longest_wins() {
        let zones: Vec<DomainName> = vec!["example.com".parse().unwrap(), "eu.example.com".parse().unwrap()];
        let config = DnsConfig {
            zones: name_servers(&zones, &[], None),
            region_map: RegionMap::default(),
            default_region: "default".into(),
            fallback: BTreeMap::new(),
            ttl: 5,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            rate_limit: None,
        };
        assert_eq!(
            config.zone_of("a.eu.example.com").unwrap().name.as_str(),
            "eu.example.com"
        );
        assert_eq!(
            config.zone_of("a.us.example.com").unwrap().name.as_str(),
            "example.com"
        );
        assert!(config.zone_of("example.net").is_none());
    }
}
