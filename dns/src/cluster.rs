//! The cluster as the DNS sees it: which names are routed and which nodes can take them.
//!
//! A [`ClusterSnapshot`] is what a source returns (members with their health, and the host
//! part of every active route); a [`ClusterView`] is the same data indexed for answering —
//! only healthy members, their addresses by region and family, sorted and deduplicated, and
//! the routes parsed — plus the SOA serial. The poller builds a view per snapshot and swaps
//! it in whole, so a query reads one consistent view without a lock.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use atoll_core::membership::{Health, MemberStatus};
use atoll_core::{HostPattern, RoutePattern};

use atoll_core::host::{is_at_or_below, is_below};

/// What a source knows about the cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// Every member heard from, whatever its health.
    pub members: Vec<MemberStatus>,
    /// The host part of every active route: `shop.example.com`, `*.w.example.com`.
    pub domains: Vec<String>,
}

/// The host part of a canonical route string (`api.example.com/echo` → `api.example.com`).
pub fn route_host(route: &str) -> &str {
    route.split_once('/').map_or(route, |(host, _)| host)
}

/// Healthy nodes' addresses of one region, by family, sorted and deduplicated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionNodes {
    /// IPv4 addresses (A).
    pub v4: Vec<Ipv4Addr>,
    /// IPv6 addresses (AAAA).
    pub v6: Vec<Ipv6Addr>,
}

/// A snapshot indexed for answering queries.
#[derive(Clone, Debug)]
pub struct ClusterView {
    /// False until the first snapshot arrived: the server cannot tell a routed name from an
    /// unknown one yet, and says so (SERVFAIL) rather than deny the name.
    known: bool,
    serial: u32,
    routes: Vec<HostPattern>,
    regions: BTreeMap<String, RegionNodes>,
}

impl ClusterView {
    /// The view before any snapshot arrived.
    pub fn unknown(serial: u32) -> ClusterView {
        ClusterView {
            known: false,
            serial,
            routes: Vec::new(),
            regions: BTreeMap::new(),
        }
    }

    /// Indexes `snapshot`: healthy members only (not draining, not gone), each by the IP of
    /// its HTTP address (or HTTPS, when it has no cleartext one); routes that do not parse
    /// are skipped.
    pub fn new(snapshot: &ClusterSnapshot, serial: u32) -> ClusterView {
        let mut regions: BTreeMap<String, RegionNodes> = BTreeMap::new();
        for member in &snapshot.members {
            if member.health != Health::Healthy {
                continue;
            }
            let announcement = &member.announcement;
            let Some(addr) = announcement.http.or(announcement.https) else {
                continue;
            };
            let ip = addr.ip().to_canonical();
            if ip.is_unspecified() {
                continue;
            }
            let nodes = regions.entry(announcement.region.clone()).or_default();
            match ip {
                IpAddr::V4(v4) => nodes.v4.push(v4),
                IpAddr::V6(v6) => nodes.v6.push(v6),
            }
        }
        for nodes in regions.values_mut() {
            nodes.v4.sort_unstable();
            nodes.v4.dedup();
            nodes.v6.sort_unstable();
            nodes.v6.dedup();
        }
        let mut routes: Vec<HostPattern> = snapshot
            .domains
            .iter()
            .filter_map(|domain| domain.parse::<RoutePattern>().ok())
            .map(|route| route.host)
            .collect();
        routes.sort_unstable();
        routes.dedup();
        ClusterView {
            known: true,
            serial,
            routes,
            regions,
        }
    }

    /// Whether a snapshot has been seen.
    pub fn is_known(&self) -> bool {
        self.known
    }

    /// The SOA serial of this view.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Whether `other` gives every query the same answer as `self` (ignoring the serial
    /// and the order of rotation): used to move the serial only when something changed.
    pub fn same_answers(&self, other: &ClusterView) -> bool {
        self.known == other.known && self.routes == other.routes && self.regions == other.regions
    }

    /// The serial for a view that differs from one with serial `previous`, at `now_unix`
    /// seconds: the time of the change, strictly above the previous serial (so two changes
    /// in the same second still differ).
    pub fn next_serial(previous: u32, now_unix: u64) -> u32 {
        let now = u32::try_from(now_unix).unwrap_or(u32::MAX);
        now.max(previous.wrapping_add(1))
    }

    /// Healthy nodes by region.
    pub fn regions(&self) -> &BTreeMap<String, RegionNodes> {
        &self.regions
    }

    /// Whether `name` (lowercase, no trailing dot) is routed: an exact route, or below a
    /// wildcard's suffix by one label or more (as the router matches hosts).
    pub fn is_routed(&self, name: &str) -> bool {
        self.routes.iter().any(|route| route.matches(name))
    }

    /// Whether a route's owner name lies strictly below `name`, which then exists as an
    /// empty non-terminal (NODATA, not NXDOMAIN). A wildcard `*.w.example.com` owns
    /// `*.w.example.com`, so `w.example.com` and `example.com` are above it.
    pub fn has_names_below(&self, name: &str) -> bool {
        self.routes.iter().any(|route| match route {
            HostPattern::Exact(host) => is_below(host, name),
            HostPattern::Wildcard { suffix } => is_at_or_below(suffix, name),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;

    use atoll_core::membership::NodeAnnouncement;

    use super::*;

    pub(crate) fn member(name: &str, region: &str, addr: &str, health: Health) -> MemberStatus {
        MemberStatus {
            announcement: NodeAnnouncement {
                name: name.into(),
                region: region.into(),
                http: Some(addr.parse::<SocketAddr>().unwrap()),
                https: None,
                in_flight: 0,
                free_capacity: 10,
                draining: health == Health::Draining,
                sync_lag: 0,
                quarantined: 0,
            },
            age_ms: 100,
            health,
        }
    }

    #[test]
    fn only_healthy_members_deduplicated_by_family() {
        let mut https_only = member("e", "eu", "10.0.0.9:1", Health::Healthy);
        https_only.announcement.http = None;
        https_only.announcement.https = Some("10.0.0.5:443".parse().unwrap());
        let snapshot = ClusterSnapshot {
            members: vec![
                member("a", "eu", "10.0.0.2:8080", Health::Healthy),
                member("b", "eu", "10.0.0.1:8080", Health::Healthy),
                member("b2", "eu", "10.0.0.1:8081", Health::Healthy),
                member("c", "eu", "10.0.0.3:8080", Health::Draining),
                member("d", "eu", "10.0.0.4:8080", Health::Gone),
                member("v6", "eu", "[2001:db8::1]:8080", Health::Healthy),
                member("mapped", "us", "[::ffff:10.1.0.1]:8080", Health::Healthy),
                member("zero", "us", "0.0.0.0:8080", Health::Healthy),
                https_only,
            ],
            domains: vec![],
        };
        let view = ClusterView::new(&snapshot, 1);
        let eu = &view.regions()["eu"];
        let ips = |s: &[&str]| s.iter().map(|ip| ip.parse().unwrap()).collect::<Vec<Ipv4Addr>>();
        assert_eq!(eu.v4, ips(&["10.0.0.1", "10.0.0.2", "10.0.0.5"]));
        assert_eq!(eu.v6, ["2001:db8::1".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(view.regions()["us"].v4, ips(&["10.1.0.1"]));
        assert!(view.regions()["us"].v6.is_empty());
    }

    #[test]
    fn routes_exact_wildcard_and_empty_non_terminals() {
        let snapshot = ClusterSnapshot {
            members: vec![],
            domains: vec![
                "shop.example.com".into(),
                "*.w.example.com".into(),
                "api.example.com/echo".into(),
                "not a route".into(),
            ],
        };
        let view = ClusterView::new(&snapshot, 1);
        assert!(view.is_routed("shop.example.com"));
        assert!(view.is_routed("api.example.com"));
        assert!(view.is_routed("a.w.example.com"));
        assert!(view.is_routed("a.b.w.example.com"));
        assert!(!view.is_routed("w.example.com"));
        assert!(!view.is_routed("example.com"));
        assert!(view.has_names_below("w.example.com"));
        assert!(view.has_names_below("example.com"));
        assert!(!view.has_names_below("shop.example.com"));
        assert!(!view.has_names_below("other.example.com"));
    }

    #[test]
    fn serial_moves_forward_only() {
        assert_eq!(ClusterView::next_serial(5, 1_700_000_000), 1_700_000_000);
        assert_eq!(
            ClusterView::next_serial(1_700_000_000, 1_700_000_000),
            1_700_000_001
        );
        assert_eq!(
            ClusterView::next_serial(1_700_000_005, 1_700_000_000),
            1_700_000_006
        );
    }

    #[test]
    fn same_answers_ignores_serial_and_order() {
        let a = ClusterSnapshot {
            members: vec![
                member("a", "eu", "10.0.0.1:80", Health::Healthy),
                member("b", "eu", "10.0.0.2:80", Health::Healthy),
            ],
            domains: vec!["x.example.com".into(), "y.example.com".into()],
        };
        let mut b = a.clone();
        b.members.reverse();
        b.domains.reverse();
        assert!(ClusterView::new(&a, 1).same_answers(&ClusterView::new(&b, 2)));
        b.members[0].health = Health::Draining;
        assert!(!ClusterView::new(&a, 1).same_answers(&ClusterView::new(&b, 2)));
        assert!(!ClusterView::unknown(1).same_answers(&ClusterView::new(&ClusterSnapshot::default(), 1)));
    }
}
