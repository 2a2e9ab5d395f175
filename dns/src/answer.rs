//! The answer to one question, as a pure function of the cluster view and the config.
//!
//! No sockets, no clock, no randomness: [`answer`] is given the view, the config, the
//! question (name, type, class, the client's address) and a rotation counter, and returns
//! the response code and the records of each section. The server is a thin shell around
//! it, and every rule below is unit-tested here.
//!
//! ```text
//! name below no zone ..................... REFUSED (not authoritative)
//! zone apex, SOA / NS .................... the SOA / the NS set (+ glue in additional)
//! an --ns host name in a zone, A / AAAA .. its configured addresses
//! routed name, A / AAAA .................. healthy nodes of the first region in
//!                                          [client's region, its --region-fallback list,
//!                                           every other region by name]
//!                                          that has a node of that address family
//! routed name, nobody healthy ............ NOERROR, no answer, SOA (NODATA)
//! ANY ..................................... one RRset, the first there is of SOA, A, AAAA
//!                                          (RFC 8482), over UDP and TCP alike
//! other type for an existing name ........ NODATA (SOA in authority)
//! name that does not exist ............... NXDOMAIN (SOA in authority)
//! before the first cluster snapshot ...... SERVFAIL for anything the snapshot decides
//! ```
//!
//! Choices worth knowing:
//! - *Nobody healthy anywhere* answers NODATA rather than SERVFAIL or NXDOMAIN: NXDOMAIN
//!   would tell resolvers the name does not exist, SERVFAIL makes them hammer every name
//!   server; NODATA is cached for the SOA MINIMUM (the short `--ttl`), so the name comes
//!   back as soon as a node does.
//! - The region is chosen *per address family*: an AAAA question goes to the nearest
//!   region with an IPv6 node, so an IPv6-only client is never stranded while IPv4 nodes
//!   of its region are up (and vice versa).
//! - Names that exist only because something lies below them (`w.example.com` under a
//!   `*.w.example.com` route) are empty non-terminals: NODATA, never NXDOMAIN (RFC 8020).
//! - An NS host name takes precedence over a wildcard route covering it, as an existing
//!   name blocks a wildcard in a zone file.
//! - ANY never gets everything: a full answer (SOA, NS and glue at the apex; every A and
//!   AAAA of a routed name) made this server a ×5 amplifier for spoofed queries. RFC 8482
//!   lets a server answer ANY with one RRset; TCP gets the same minimal answer, so what is
//!   cached does not depend on the transport, and a client that wants a type asks for it.
//! - The SOA serial changes when the answer set changes (see
//!   [`ClusterView::next_serial`]); there are no zone transfers, so it only informs.

use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};

use atoll_core::host::is_below;
use atoll_core::membership;

use crate::cluster::ClusterView;

use crate::config::{DnsConfig, NS_TTL, Zone};

/// SOA REFRESH: how often secondaries would check (none exist; a conventional value).
const SOA_REFRESH: i32 = 3600;
/// SOA RETRY.
const SOA_RETRY: i32 = 600;
/// SOA EXPIRE: one week.
const SOA_EXPIRE: i32 = 7 * 86_400;

/// One question, with who asks.
#[derive(Clone, Debug)]
pub struct Question<'a> {
    /// The name asked for, as sent (any case); answers are owned by this very name.
    pub name: &'a Name,
    /// The type asked for.
    pub qtype: RecordType,
    /// The class asked for (only IN is served).
    pub qclass: DNSClass,
    /// The client's address: the EDNS Client Subnet address when the query carries one,
    /// else the packet's source. `None` when the client asked not to be located (ECS with
    /// source prefix 0): it gets the default region.
    pub client: Option<IpAddr>,
}

/// The response to a [`Question`]: its code and sections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The response code.
    pub code: ResponseCode,
    /// The AA flag: set for every name in a zone.
    pub authoritative: bool,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of negative answers).
    pub authorities: Vec<Record>,
    /// Additional section (glue of NS answers).
    pub additionals: Vec<Record>,
    /// The region whose nodes were named, when nodes were named.
    pub region: Option<String>,
}

impl Answer {
    fn with_code(code: ResponseCode, authoritative: bool) -> Answer {
        Answer {
            code,
            authoritative,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            region: None,
        }
    }
}

/// Answers `question` from `view` under `config`. `rotation` rotates multi-address answers
/// (the server passes a counter, so clients that take the first address spread out).
pub fn answer(view: &ClusterView, config: &DnsConfig, question: &Question<'_>, rotation: usize) -> Answer {
    let name = normalize(question.name);
    let Some(zone) = config.zone_of(&name) else {
        return Answer::with_code(ResponseCode::Refused, false);
    };
    if !matches!(question.qclass, DNSClass::IN | DNSClass::ANY) {
        return Answer::with_code(ResponseCode::Refused, false);
    }
    let mut owner = question.name.clone();
    owner.set_fqdn(true);
    let mut out = Answer::with_code(ResponseCode::NoError, true);

    let apex = name == zone.name.as_str();
    let ns_addrs = ns_host_addrs(config, &name);
    let routed = ns_addrs.is_none() && view.is_routed(&name);
    let qtype = question.qtype;
    let any = qtype == RecordType::ANY;

    // ANY gets the first RRset there is, in this order (RFC 8482): SOA, A, AAAA.
    let wants = |rtype: RecordType, out: &Answer| qtype == rtype || (any && out.answers.is_empty());

    if apex && wants(RecordType::SOA, &out) {
        out.answers.push(soa_record(zone, view, config));
    }
    if apex && qtype == RecordType::NS {
        out.answers.extend(ns_records(zone));
        out.additionals.extend(glue_records(zone));
    }
    if let Some(addrs) = &ns_addrs {
        for (rtype, family) in [(RecordType::A, true), (RecordType::AAAA, false)] {
            if wants(rtype, &out) {
                out.answers.extend(
                    addrs
                        .iter()
                        .filter(|addr| addr.is_ipv4() == family)
                        .map(|addr| Record::from_rdata(owner.clone(), NS_TTL, RData::from(*addr))),
                );
            }
        }
    }
    if routed && wants(RecordType::A, &out) {
        let picked = pick_region(view, config, question.client, |nodes| nodes.v4.as_slice());
        if let Some((region, addrs)) = picked {
            out.answers.extend(
                rotated(addrs, rotation)
                    .map(|ip| Record::from_rdata(owner.clone(), config.ttl, RData::A(A(ip)))),
            );
            out.region = Some(region.to_owned());
        }
    }
    if routed && wants(RecordType::AAAA, &out) {
        let picked = pick_region(view, config, question.client, |nodes| nodes.v6.as_slice());
        if let Some((region, addrs)) = picked {
            out.answers.extend(
                rotated(addrs, rotation)
                    .map(|ip| Record::from_rdata(owner.clone(), config.ttl, RData::AAAA(AAAA(ip)))),
            );
            out.region.get_or_insert_with(|| region.to_owned());
        }
    }
    if !out.answers.is_empty() {
        return out;
    }
    if !view.is_known() {
        // Whether the name is routed is not known yet: say so, and let the resolver try
        // another server or come back, rather than cache a denial.
        return Answer::with_code(ResponseCode::ServFail, false);
    }
    let exists = apex || ns_addrs.is_some() || routed || name_exists_below(view, config, &name);
    if !exists {
        out.code = ResponseCode::NXDomain;
    }
    out.authorities.push(soa_record(zone, view, config));
    out
}

/// The name lowercase, without the trailing dot.
fn normalize(name: &Name) -> String {
    let mut text = name.to_ascii().to_ascii_lowercase();
    if text.ends_with('.') {
        text.pop();
    }
    text
}

/// A validated name (lowercase, no trailing dot) as a fully qualified [`Name`].
fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{name}.")).unwrap_or_else(|_| Name::root())
}

/// The addresses of `name` if it is one of the zones' NS host names.
fn ns_host_addrs(config: &DnsConfig, name: &str) -> Option<Vec<IpAddr>> {
    let mut found = false;
    let mut addrs: Vec<IpAddr> = Vec::new();
    for ns in config.zones.iter().flat_map(|zone| &zone.ns) {
        if ns.name.as_str() == name {
            found = true;
            for addr in &ns.addrs {
                if !addrs.contains(addr) {
                    addrs.push(*addr);
                }
            }
        }
    }
    found.then_some(addrs)
}

/// Whether something we answer for lies strictly below `name`: a route, an NS host name,
/// or a nested zone.
fn name_exists_below(view: &ClusterView, config: &DnsConfig, name: &str) -> bool {
    view.has_names_below(name)
        || config.zones.iter().any(|zone| {
            is_below(zone.name.as_str(), name) || zone.ns.iter().any(|ns| is_below(ns.name.as_str(), name))
        })
}

fn soa_record(zone: &Zone, view: &ClusterView, config: &DnsConfig) -> Record {
    let mname = zone
        .ns
        .first()
        .map_or_else(|| fqdn(zone.name.as_str()), |ns| fqdn(ns.name.as_str()));
    let rname = fqdn(&format!("hostmaster.{}", zone.name));
    let soa = SOA::new(
        mname,
        rname,
        view.serial(),
        SOA_REFRESH,
        SOA_RETRY,
        SOA_EXPIRE,
        config.ttl,
    );
    Record::from_rdata(fqdn(zone.name.as_str()), config.ttl, RData::SOA(soa))
}

fn ns_records(zone: &Zone) -> impl Iterator<Item = Record> + '_ {
    let apex = fqdn(zone.name.as_str());
    zone.ns
        .iter()
        .map(move |ns| Record::from_rdata(apex.clone(), NS_TTL, RData::NS(NS(fqdn(ns.name.as_str())))))
}

fn glue_records(zone: &Zone) -> impl Iterator<Item = Record> + '_ {
    zone.ns.iter().flat_map(|ns| {
        let owner = fqdn(ns.name.as_str());
        ns.addrs
            .iter()
            .map(move |addr| Record::from_rdata(owner.clone(), NS_TTL, RData::from(*addr)))
    })
}

/// The first region, in the client's order, with a node of the family `family` selects.
fn pick_region<'v, T>(
    view: &'v ClusterView,
    config: &'v DnsConfig,
    client: Option<IpAddr>,
    family: impl Fn(&'v crate::cluster::RegionNodes) -> &'v [T],
) -> Option<(&'v str, &'v [T])> {
    region_order(view, config, client).into_iter().find_map(|region| {
        let addrs = family(view.regions().get(region)?);
        (!addrs.is_empty()).then_some((region, addrs))
    })
}

/// The regions a client is served from, nearest first: its own, its `--region-fallback`
/// list, then every other region with healthy nodes, by name.
pub fn region_order<'v>(
    view: &'v ClusterView,
    config: &'v DnsConfig,
    client: Option<IpAddr>,
) -> Vec<&'v str> {
    let home = config.client_region(client);
    let listed = config
        .fallback
        .get(home)
        .into_iter()
        .flatten()
        .map(String::as_str);
    membership::region_order(home, listed, view.regions().keys().map(String::as_str))
}

fn rotated<T: Copy>(items: &[T], rotation: usize) -> impl Iterator<Item = T> + '_ {
    let start = rotation % items.len().max(1);
    items[start..].iter().chain(&items[..start]).copied()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use atoll_core::membership::{Health, MemberStatus};

    use super::*;
    use crate::cluster::ClusterSnapshot;
    use crate::cluster::tests::member;
    use crate::config::{DomainName, NsFlag, RegionMap, RegionRule, name_servers};

    fn config(ns: &[&str], rules: &[&str], fallback: &[(&str, &[&str])]) -> DnsConfig {
        let zones: Vec<DomainName> = vec!["example.com".parse().unwrap()];
        let ns: Vec<NsFlag> = ns.iter().map(|f| f.parse().unwrap()).collect();
        DnsConfig {
            zones: name_servers(&zones, &ns, None),
            region_map: RegionMap::new(rules.iter().map(|r| r.parse::<RegionRule>().unwrap())),
            default_region: "default".into(),
            fallback: fallback
                .iter()
                .map(|(r, then)| (r.to_string(), then.iter().map(|t| t.to_string()).collect()))
                .collect::<BTreeMap<_, _>>(),
            ttl: 5,
            max_udp_payload: crate::config::DEFAULT_MAX_UDP_PAYLOAD,
            rate_limit: None,
        }
    }

    fn standard_config() -> DnsConfig {
        config(
            &[
                "ns1.example.com=192.0.2.53",
                "ns1.example.com=2001:db8::53",
                "ns.other.net",
            ],
            &[
                "10.1.0.0/16=eu",
                "10.1.9.0/24=ap",
                "10.2.0.0/16=us",
                "2001:db8:1::/48=eu",
            ],
            &[("eu", &["us"])],
        )
    }

    fn view(members: Vec<MemberStatus>) -> ClusterView {
        let snapshot = ClusterSnapshot {
            members,
            domains: vec![
                "shop.example.com".into(),
                "*.w.example.com".into(),
                "api.example.com/echo".into(),
                "*.example.com".into(),
                "elsewhere.example.org".into(),
            ],
        };
        ClusterView::new(&snapshot, 42)
    }

    fn cluster() -> Vec<MemberStatus> {
        vec![
            member("eu1", "eu", "10.0.1.1:8080", Health::Healthy),
            member("eu2", "eu", "10.0.1.2:8080", Health::Healthy),
            member("eu3", "eu", "10.0.1.3:8080", Health::Draining),
            member("eu4", "eu", "10.0.1.4:8080", Health::Gone),
            member("eu6", "eu", "[2001:db8:e::1]:8080", Health::Healthy),
            member("us1", "us", "10.0.2.1:8080", Health::Healthy),
            member("us2", "us", "10.0.2.1:9090", Health::Healthy),
            member("ap1", "ap", "10.0.3.1:8080", Health::Healthy),
            member("ap6", "ap", "[2001:db8:a::1]:8080", Health::Healthy),
            member("d1", "default", "10.0.9.1:8080", Health::Healthy),
        ]
    }

    fn ask(view: &ClusterView, config: &DnsConfig, name: &str, qtype: RecordType, client: &str) -> Answer {
        let name = Name::from_ascii(name).unwrap();
        let question = Question {
            name: &name,
            qtype,
            qclass: DNSClass::IN,
            client: Some(client.parse().unwrap()),
        };
        answer(view, config, &question, 0)
    }

    fn ips(answer: &Answer) -> Vec<IpAddr> {
        answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    fn v4(list: &[&str]) -> Vec<IpAddr> {
        list.iter()
            .map(|ip| IpAddr::V4(ip.parse::<Ipv4Addr>().unwrap()))
            .collect()
    }

    fn v6(list: &[&str]) -> Vec<IpAddr> {
        list.iter()
            .map(|ip| IpAddr::V6(ip.parse::<Ipv6Addr>().unwrap()))
            .collect()
    }

    fn soa_of(records: &[Record]) -> &SOA {
        match records {
            [record] => match &record.data {
                RData::SOA(soa) => soa,
                other => panic!("not a SOA: {other:?}"),
            },
            other => panic!("expected one SOA, got {other:?}"),
        }
    }

    #[test]
    fn region_by_client_subnet_healthy_only() {
        let (view, config) = (view(cluster()), standard_config());
        let a = ask(&view, &config, "shop.example.com.", RecordType::A, "10.1.2.3");
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.authoritative);
        assert_eq!(
            ips(&a),
            v4(&["10.0.1.1", "10.0.1.2"]),
            "draining and gone are not named"
        );
        assert_eq!(a.region.as_deref(), Some("eu"));
        assert!(a.answers.iter().all(|r| r.ttl == 5));
        assert_eq!(a.answers[0].name.to_ascii(), "shop.example.com.");
        let us = ask(&view, &config, "shop.example.com", RecordType::A, "10.2.0.9");
        assert_eq!(ips(&us), v4(&["10.0.2.1"]), "deduplicated");
        let nobody = ask(&view, &config, "shop.example.com", RecordType::A, "192.0.2.77");
        assert_eq!(
            ips(&nobody),
            v4(&["10.0.9.1"]),
            "unmapped clients get the default region"
        );
    }

    #[test]
    fn most_specific_prefix_wins() {
        let (view, config) = (view(cluster()), standard_config());
        let ap = ask(&view, &config, "shop.example.com", RecordType::A, "10.1.9.9");
        assert_eq!(ap.region.as_deref(), Some("ap"));
        assert_eq!(ips(&ap), v4(&["10.0.3.1"]));
    }

    #[test]
    fn aaaa_by_family_and_ipv6_clients() {
        let (view, config) = (view(cluster()), standard_config());
        let eu = ask(
            &view,
            &config,
            "shop.example.com",
            RecordType::AAAA,
            "2001:db8:1::5",
        );
        assert_eq!(ips(&eu), v6(&["2001:db8:e::1"]));
        // us has no IPv6 node: after the explicit fallback (us), every other region by name.
        let us = ask(&view, &config, "shop.example.com", RecordType::AAAA, "10.2.0.1");
        assert_eq!(us.region.as_deref(), Some("ap"));
        assert_eq!(ips(&us), v6(&["2001:db8:a::1"]));
    }

    #[test]
    fn falls_back_in_order_when_a_region_is_empty() {
        let config = standard_config();
        let mut members = cluster();
        members.retain(|m| m.announcement.region != "eu");
        let view = view(members);
        let a = ask(&view, &config, "shop.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(a.region.as_deref(), Some("us"), "eu=us is listed");
        // Without an explicit order: every other region with healthy nodes, by name.
        let no_order = config_without_fallback();
        let a = ask(&view, &no_order, "shop.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(a.region.as_deref(), Some("ap"));
        // Explicit order exhausted: the rest, by name.
        let mut members = cluster();
        members.retain(|m| !matches!(m.announcement.region.as_str(), "eu" | "us"));
        let view2 = super::tests::view(members);
        let a = ask(&view2, &config, "shop.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(a.region.as_deref(), Some("ap"));
        // Draining everywhere in eu counts as empty.
        let mut members = cluster();
        for m in &mut members {
            if m.announcement.region == "eu" {
                m.health = Health::Draining;
            }
        }
        let a = ask(
            &super::tests::view(members),
            &config,
            "shop.example.com",
            RecordType::A,
            "10.1.0.1",
        );
        assert_eq!(a.region.as_deref(), Some("us"));
    }

    fn config_without_fallback() -> DnsConfig {
        let mut config = standard_config();
        config.fallback.clear();
        config
    }

    #[test]
    fn region_order_lists_each_region_once() {
        let (view, config) = (view(cluster()), standard_config());
        let order = region_order(&view, &config, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(order, ["eu", "us", "ap", "default"]);
        let order = region_order(&view, &config, None);
        assert_eq!(order, ["default", "ap", "eu", "us"]);
    }

    #[test]
    fn wildcards_match_one_label_or_more_but_not_their_parent() {
        let (view, config) = (view(cluster()), standard_config());
        for name in [
            "x.w.example.com",
            "a.b.w.example.com",
            "anything.example.com",
            "api.example.com",
        ] {
            let a = ask(&view, &config, name, RecordType::A, "10.1.0.1");
            assert_eq!(ips(&a), v4(&["10.0.1.1", "10.0.1.2"]), "{name}");
        }
        // Without the catch-all *.example.com, w.example.com is an empty non-terminal.
        let snapshot = ClusterSnapshot {
            members: cluster(),
            domains: vec!["*.w.example.com".into(), "a.b.example.com".into()],
        };
        let view = ClusterView::new(&snapshot, 7);
        let ent = ask(&view, &config, "w.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(ent.code, ResponseCode::NoError);
        assert!(ent.answers.is_empty());
        assert_eq!(soa_of(&ent.authorities).serial, 7);
        let ent = ask(&view, &config, "b.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(ent.code, ResponseCode::NoError);
        let missing = ask(&view, &config, "nope.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(missing.code, ResponseCode::NXDomain);
        assert!(missing.authoritative);
        assert!(missing.answers.is_empty());
        let soa = soa_of(&missing.authorities);
        assert_eq!(soa.minimum, 5);
        assert_eq!(missing.authorities[0].ttl, 5);
    }

    #[test]
    fn names_are_case_insensitive() {
        let (view, config) = (view(cluster()), standard_config());
        let a = ask(&view, &config, "SHOP.Example.COM.", RecordType::A, "10.1.0.1");
        assert_eq!(ips(&a), v4(&["10.0.1.1", "10.0.1.2"]));
        assert_eq!(
            a.answers[0].name.to_ascii(),
            "SHOP.Example.COM.",
            "owner as asked (0x20)"
        );
    }

    #[test]
    fn outside_every_zone_is_refused() {
        let (view, config) = (view(cluster()), standard_config());
        for name in ["elsewhere.example.org", "com", ".", "badexample.com"] {
            let a = ask(&view, &config, name, RecordType::A, "10.1.0.1");
            assert_eq!(a.code, ResponseCode::Refused, "{name}");
            assert!(!a.authoritative);
            assert!(a.answers.is_empty() && a.authorities.is_empty());
        }
        let name = Name::from_ascii("shop.example.com.").unwrap();
        let chaos = Question {
            name: &name,
            qtype: RecordType::TXT,
            qclass: DNSClass::CH,
            client: None,
        };
        assert_eq!(answer(&view, &config, &chaos, 0).code, ResponseCode::Refused);
    }

    #[test]
    fn apex_soa_and_ns_with_glue() {
        let (view, config) = (view(cluster()), standard_config());
        let soa = ask(&view, &config, "example.com", RecordType::SOA, "10.1.0.1");
        assert_eq!(soa.code, ResponseCode::NoError);
        assert!(soa.authoritative);
        let record = soa_of(&soa.answers);
        assert_eq!(record.mname.to_ascii(), "ns1.example.com.");
        assert_eq!(record.rname.to_ascii(), "hostmaster.example.com.");
        assert_eq!(record.serial, 42);
        assert_eq!(record.minimum, 5);
        assert!(record.refresh > 0 && record.retry > 0 && record.expire > record.refresh);

        let ns = ask(&view, &config, "Example.com.", RecordType::NS, "10.1.0.1");
        let names: Vec<String> = ns
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::NS(ns) => ns.0.to_ascii(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["ns1.example.com.", "ns.other.net."]);
        let glue: Vec<(String, IpAddr)> = ns
            .additionals
            .iter()
            .map(|r| (r.name.to_ascii(), ips_of(r)))
            .collect();
        assert_eq!(
            glue,
            [
                ("ns1.example.com.".to_owned(), "192.0.2.53".parse().unwrap()),
                ("ns1.example.com.".to_owned(), "2001:db8::53".parse().unwrap()),
            ]
        );
        // The apex is not routed (the wildcard needs a label in front): NODATA for A.
        let a = ask(&view, &config, "example.com", RecordType::A, "10.1.0.1");
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        assert_eq!(soa_of(&a.authorities).serial, 42);
    }

    fn ips_of(record: &Record) -> IpAddr {
        match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn default_ns_is_ns1_of_the_zone() {
        let config = config(&[], &[], &[]);
        let ns = ask(
            &view(cluster()),
            &config,
            "example.com",
            RecordType::NS,
            "10.1.0.1",
        );
        assert_eq!(ns.answers.len(), 1);
        assert!(matches!(&ns.answers[0].data, RData::NS(n) if n.0.to_ascii() == "ns1.example.com."));
        assert!(ns.additionals.is_empty());
    }

    #[test]
    fn ns_host_names_answer_their_glue_before_wildcards() {
        let (view, config) = (view(cluster()), standard_config());
        let a = ask(&view, &config, "ns1.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(ips(&a), v4(&["192.0.2.53"]));
        assert_eq!(a.answers[0].ttl, NS_TTL);
        let aaaa = ask(&view, &config, "ns1.example.com", RecordType::AAAA, "10.1.0.1");
        assert_eq!(ips(&aaaa), v6(&["2001:db8::53"]));
        let mx = ask(&view, &config, "ns1.example.com", RecordType::MX, "10.1.0.1");
        assert_eq!(mx.code, ResponseCode::NoError);
        assert!(mx.answers.is_empty());
        assert_eq!(mx.authorities.len(), 1);
    }

    #[test]
    fn routed_name_other_types_are_nodata() {
        let (view, config) = (view(cluster()), standard_config());
        for qtype in [
            RecordType::MX,
            RecordType::TXT,
            RecordType::NS,
            RecordType::SOA,
            RecordType::CNAME,
        ] {
            let a = ask(&view, &config, "shop.example.com", qtype, "10.1.0.1");
            assert_eq!(a.code, ResponseCode::NoError, "{qtype}");
            assert!(a.answers.is_empty(), "{qtype}");
            soa_of(&a.authorities);
        }
    }

    #[test]
    fn nobody_healthy_anywhere_is_nodata() {
        let config = standard_config();
        let mut members = cluster();
        for m in &mut members {
            m.health = if m.announcement.name.starts_with("eu") {
                Health::Draining
            } else {
                Health::Gone
            };
        }
        let a = ask(
            &view(members),
            &config,
            "shop.example.com",
            RecordType::A,
            "10.1.0.1",
        );
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.authoritative);
        assert!(a.answers.is_empty());
        assert_eq!(a.region, None);
        soa_of(&a.authorities);
    }

    #[test]
    fn any_gets_one_rrset_never_everything() {
        let (view, config) = (view(cluster()), standard_config());
        // A routed name with IPv4 and IPv6 nodes: the A set only.
        let a = ask(&view, &config, "shop.example.com", RecordType::ANY, "10.1.0.1");
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(ips(&a), v4(&["10.0.1.1", "10.0.1.2"]));
        assert!(a.authorities.is_empty() && a.additionals.is_empty());
        // No IPv4 node anywhere: the AAAA set.
        let mut members = cluster();
        members.retain(|m| m.announcement.http.is_some_and(|http| http.is_ipv6()));
        let v6_only = ask(
            &super::tests::view(members),
            &config,
            "shop.example.com",
            RecordType::ANY,
            "10.1.0.1",
        );
        assert_eq!(ips(&v6_only), v6(&["2001:db8:e::1"]));
        // The apex: the SOA alone, no NS, no glue.
        let apex = ask(&view, &config, "example.com", RecordType::ANY, "10.1.0.1");
        soa_of(&apex.answers);
        assert!(apex.additionals.is_empty());
        // An NS host with both families: its A set.
        let ns = ask(&view, &config, "ns1.example.com", RecordType::ANY, "10.1.0.1");
        assert_eq!(ips(&ns), v4(&["192.0.2.53"]));
        // A name that exists with nothing to give (NODATA), and one that does not.
        let snapshot = ClusterSnapshot {
            members: cluster(),
            domains: vec!["*.w.example.com".into()],
        };
        let view = ClusterView::new(&snapshot, 7);
        let ent = ask(&view, &config, "w.example.com", RecordType::ANY, "10.1.0.1");
        assert_eq!(ent.code, ResponseCode::NoError);
        assert!(ent.answers.is_empty());
        soa_of(&ent.authorities);
        let missing = ask(&view, &config, "nope.example.com", RecordType::ANY, "10.1.0.1");
        assert_eq!(missing.code, ResponseCode::NXDomain);
    }

    #[test]
    fn rotation_rotates() {
        let (view, config) = (view(cluster()), standard_config());
        let name = Name::from_ascii("shop.example.com.").unwrap();
        let question = Question {
            name: &name,
            qtype: RecordType::A,
            qclass: DNSClass::IN,
            client: Some("10.1.0.1".parse().unwrap()),
        };
        assert_eq!(
            ips(&answer(&view, &config, &question, 1)),
            v4(&["10.0.1.2", "10.0.1.1"])
        );
        assert_eq!(
            ips(&answer(&view, &config, &question, 2)),
            v4(&["10.0.1.1", "10.0.1.2"])
        );
    }

    #[test]
    fn unlocated_clients_get_the_default_region() {
        let (view, config) = (view(cluster()), standard_config());
        let name = Name::from_ascii("shop.example.com.").unwrap();
        let question = Question {
            name: &name,
            qtype: RecordType::A,
            qclass: DNSClass::IN,
            client: None,
        };
        assert_eq!(
            answer(&view, &config, &question, 0).region.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn before_the_first_snapshot_only_static_data_is_answered() {
        let view = ClusterView::unknown(1);
        let config = standard_config();
        let a = ask(&view, &config, "shop.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(a.code, ResponseCode::ServFail);
        let missing = ask(&view, &config, "nope.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(
            missing.code,
            ResponseCode::ServFail,
            "cannot deny what it does not know"
        );
        let soa = ask(&view, &config, "example.com", RecordType::SOA, "10.1.0.1");
        assert_eq!(soa.code, ResponseCode::NoError);
        assert_eq!(soa.answers.len(), 1);
        let ns = ask(&view, &config, "ns1.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(ips(&ns), v4(&["192.0.2.53"]));
        let refused = ask(&view, &config, "example.org", RecordType::A, "10.1.0.1");
        assert_eq!(refused.code, ResponseCode::Refused);
    }

    #[test]
    fn nested_zones_answer_from_the_longest() {
        let zones: Vec<DomainName> = vec!["example.com".parse().unwrap(), "eu.example.com".parse().unwrap()];
        let config = DnsConfig {
            zones: name_servers(&zones, &[], None),
            ..standard_config()
        };
        let snapshot = ClusterSnapshot {
            members: cluster(),
            domains: vec!["x.eu.example.com".into()],
        };
        let view = ClusterView::new(&snapshot, 3);
        let soa = ask(&view, &config, "y.eu.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(soa.code, ResponseCode::NXDomain);
        assert_eq!(soa.authorities[0].name.to_ascii(), "eu.example.com.");
        let ent = ask(&view, &config, "eu.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(ent.code, ResponseCode::NoError);
        let x = ask(&view, &config, "x.eu.example.com", RecordType::A, "10.1.0.1");
        assert_eq!(ips(&x), v4(&["10.0.1.1", "10.0.1.2"]));
    }
}
