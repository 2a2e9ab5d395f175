//! Fuzz-style property test of the DNS packet path: arbitrary bytes, queries built from
//! arbitrary parts, and byte-level mutations of the seeds in `dns/fuzz-corpus/` go through
//! what hickory-server does with a datagram (parse the header and message into a
//! `Request`, ignore responses) and then through [`DnsHandler`] with hickory's own
//! `ResponseHandle`, whose encoder makes the bytes that go on the wire. Nothing may panic,
//! and every UDP response fits the cap (1232 bytes; 512 without EDNS), parses, carries the
//! query's id, and answers ANY with at most one RRset; a slipped response is empty,
//! truncated and no bigger than its query. The cluster view has 150 IPv4 and 150 IPv6
//! nodes, so A/AAAA answers (about 2.4 KB and 4 KB) must be truncated to fit.
//!
//! 25,000 cases run in about a second, in the normal test command. A failing case is
//! shrunk and printed (the bytes and the source address); keep it as a seed in
//! `dns/fuzz-corpus/` so every later run tries it first.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use atoll_core::membership::{Health, MemberStatus};
use atoll_dns::config::{DnsConfig, DomainName, NsFlag, name_servers};
use atoll_dns::{ClusterSnapshot, ClusterView, DnsHandler, RateLimit};
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::BufDnsStreamHandle;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_server::proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_server::proto::rr::{DNSClass, Name, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandle};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CAP: usize = 1232;

struct Target {
    runtime: tokio::runtime::Runtime,
    /// No rate limit: every query is answered.
    open: DnsHandler,
    /// One response a second per prefix, every second refusal slipped.
    limited: DnsHandler,
    /// Datagrams checked, and how many of them got an answer with records.
    cases: AtomicUsize,
    answered: AtomicUsize,
}

fn target() -> Target {
    let zones: Vec<DomainName> = vec!["example.com".parse().unwrap(), "eu.example.com".parse().unwrap()];
    let ns: Vec<NsFlag> = [
        "ns1.example.com=192.0.2.53",
        "ns1.example.com=2001:db8::53",
        "ns.other.net",
    ]
    .iter()
    .map(|flag| flag.parse().unwrap())
    .collect();
    let config = DnsConfig {
        zones: name_servers(&zones, &ns, None),
        ..support::config()
    };
    let mut members = Vec::new();
    for i in 0..150u32 {
        for (name, addr) in [
            (
                format!("v4-{i}"),
                format!("10.0.{}.{}:8080", i / 200, i % 200 + 1),
            ),
            (format!("v6-{i}"), format!("[2001:db8::{:x}]:8080", i + 1)),
        ] {
            members.push(MemberStatus {
                announcement: support::node(&name, "default", &addr, false),
                age_ms: 0,
                health: Health::Healthy,
            });
        }
    }
    let snapshot = ClusterSnapshot {
        members,
        domains: vec![
            "shop.example.com".into(),
            "*.w.example.com".into(),
            "*.eu.example.com".into(),
        ],
    };
    let view = Arc::new(ArcSwap::from_pointee(ClusterView::new(&snapshot, 1)));
    let limited_config = DnsConfig {
        rate_limit: Some(RateLimit {
            per_second: NonZeroU32::new(1).unwrap(),
            slip: 2,
        }),
        ..config.clone()
    };
    Target {
        runtime: tokio::runtime::Builder::new_current_thread().build().unwrap(),
        open: DnsHandler::new(Arc::new(config), Arc::clone(&view)),
        limited: DnsHandler::new(Arc::new(limited_config), view),
        cases: AtomicUsize::new(0),
        answered: AtomicUsize::new(0),
    }
}

/// What the server sends back for the datagram `bytes` from `src`, as hickory-server's
/// request loop would hand it to `handler`. `None`: nothing sent, or hickory answers it
/// before the handler (FORMERR for what does not parse, a bare header).
fn serve(
    target: &Target,
    handler: &DnsHandler,
    bytes: &[u8],
    src: SocketAddr,
    protocol: Protocol,
) -> Option<Vec<u8>> {
    let request = Request::from_bytes(bytes.to_vec(), src, protocol).ok()?;
    if request.metadata.message_type == MessageType::Response {
        return None;
    }
    let (stream, mut receiver) = BufDnsStreamHandle::new(src);
    let handle = ResponseHandle::new(src, stream, protocol);
    target
        .runtime
        .block_on(handler.handle_request::<_, TokioTime>(&request, handle));
    let sent = receiver.get_mut().get_mut().try_recv().ok()?;
    Some(sent.into_parts().0)
}

/// Checks one datagram against both handlers, over UDP and TCP.
fn check(target: &Target, bytes: &[u8], src: SocketAddr) -> Result<(), TestCaseError> {
    target.cases.fetch_add(1, Ordering::Relaxed);
    let parsed = Request::from_bytes(bytes.to_vec(), src, Protocol::Udp).ok();
    let has_edns = parsed.as_ref().is_some_and(|request| request.edns.is_some());
    let bound = if has_edns { CAP } else { 512 };
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let Some(response) = serve(target, &target.open, bytes, src, protocol) else {
            continue;
        };
        let request = parsed.as_ref().expect("a response only to what parses");
        if protocol == Protocol::Udp {
            prop_assert!(
                response.len() <= bound,
                "{} bytes over UDP (bound {bound}) for {bytes:02x?}",
                response.len()
            );
        }
        let message = Message::from_vec(&response)
            .map_err(|error| TestCaseError::fail(format!("unparsable response: {error}")))?;
        prop_assert_eq!(message.metadata.id, request.metadata.id);
        prop_assert_eq!(message.metadata.message_type, MessageType::Response);
        if !message.answers.is_empty() {
            target.answered.fetch_add(1, Ordering::Relaxed);
        }
        let any = request.queries.queries().len() == 1
            && request.queries.queries()[0].query_type() == RecordType::ANY;
        if any && let Some(first) = message.answers.first() {
            let rtype = first.record_type();
            prop_assert!(
                message.answers.iter().all(|record| record.record_type() == rtype),
                "ANY answered with several RRsets: {:?}",
                message.answers
            );
        }
    }
    if let Some(response) = serve(target, &target.limited, bytes, src, Protocol::Udp) {
        prop_assert!(response.len() <= bound);
        let message = Message::from_vec(&response)
            .map_err(|error| TestCaseError::fail(format!("unparsable response: {error}")))?;
        if message.metadata.truncation && message.answers.is_empty() && message.additionals.is_empty() {
            // Possibly a slip: never bigger than the query.
            prop_assert!(response.len() <= bytes.len().max(512));
        }
    }
    Ok(())
}

fn sources() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        Just("10.1.2.3:5353".parse().unwrap()),
        Just("10.1.2.200:53".parse().unwrap()),
        Just("198.51.100.7:40000".parse().unwrap()),
        Just("[2001:db8:1::5]:53".parse().unwrap()),
        Just("[::ffff:10.1.2.9]:53".parse().unwrap()),
    ]
}

/// A name from labels that mostly exist in the zone, sometimes not, any case.
fn names() -> impl Strategy<Value = String> {
    let label = prop_oneof![
        Just("example".to_owned()),
        Just("com".to_owned()),
        Just("shop".to_owned()),
        Just("w".to_owned()),
        Just("eu".to_owned()),
        Just("ns1".to_owned()),
        Just("EXAMPLE".to_owned()),
        Just("*".to_owned()),
        proptest::collection::vec(proptest::char::range('a', 'z'), 1..64)
            .prop_map(|chars| chars.into_iter().collect()),
    ];
    proptest::collection::vec(label, 0..4).prop_map(|labels| {
        let mut labels = labels;
        labels.extend(["example".to_owned(), "com".to_owned()]);
        labels.join(".") + "."
    })
}

fn record_types() -> impl Strategy<Value = RecordType> {
    prop_oneof![
        3 => Just(RecordType::A),
        3 => Just(RecordType::AAAA),
        3 => Just(RecordType::ANY),
        1 => Just(RecordType::NS),
        1 => Just(RecordType::SOA),
        1 => Just(RecordType::MX),
        2 => any::<u16>().prop_map(RecordType::from),
    ]
}

/// A query built from arbitrary parts: name, type, class, flags, opcode, EDNS with any
/// buffer size and version, ECS with any address and prefix.
fn queries() -> impl Strategy<Value = Vec<u8>> {
    let edns = proptest::option::of((
        any::<u16>(),
        prop_oneof![6 => Just(0u8), 1 => 1u8..3],
        proptest::option::of((any::<[u8; 4]>(), 0u8..=40, 0u8..=40)),
    ));
    (
        any::<u16>(),
        names(),
        record_types(),
        prop_oneof![6 => Just(DNSClass::IN), 1 => Just(DNSClass::ANY), 1 => Just(DNSClass::CH)],
        prop_oneof![8 => Just(OpCode::Query), 1 => Just(OpCode::Status), 1 => Just(OpCode::Update)],
        edns,
    )
        .prop_filter_map(
            "a name hickory can hold",
            |(id, name, qtype, qclass, op_code, edns)| {
                let name = Name::from_ascii(&name).ok()?;
                let mut message = Message::query();
                message.metadata.id = id;
                message.metadata.op_code = op_code;
                let mut query = Query::query(name, qtype);
                query.set_query_class(qclass);
                message.add_query(query);
                if let Some((size, version, ecs)) = edns {
                    let mut edns = Edns::new();
                    edns.set_max_payload(size);
                    edns.set_version(version);
                    if let Some((addr, source, scope)) = ecs {
                        let subnet = ClientSubnet::new(IpAddr::from(addr), source.min(32), scope.min(32));
                        edns.options_mut().insert(EdnsOption::Subnet(subnet));
                    }
                    message.set_edns(edns);
                }
                message.to_vec().ok()
            },
        )
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .map(|path| std::fs::read(path).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "the corpus is in {}", dir.display());
    seeds
}

/// A seed with a few bytes overwritten, inserted or cut.
fn mutations(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| (0u8, at, byte)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| (1u8, at, byte)),
        any::<prop::sample::Index>().prop_map(|at| (2u8, at, 0)),
    ];
    (prop::sample::select(seeds), proptest::collection::vec(edit, 0..6)).prop_map(|(mut bytes, edits)| {
        for (kind, at, byte) in edits {
            match kind {
                0 if !bytes.is_empty() => {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                1 => {
                    let i = at.index(bytes.len() + 1);
                    bytes.insert(i, byte);
                }
                _ => {
                    let i = at.index(bytes.len() + 1);
                    bytes.truncate(i);
                }
            }
        }
        bytes
    })
}

fn run(cases_wanted: u32, strategy: impl Strategy<Value = Vec<u8>>) -> Target {
    let target = target();
    let mut runner = TestRunner::new(Config {
        cases: cases_wanted,
        ..Config::default()
    });
    runner
        .run(&(strategy, sources()), |(bytes, src)| check(&target, &bytes, src))
        .unwrap();
    let (cases, answered) = (
        target.cases.load(Ordering::Relaxed),
        target.answered.load(Ordering::Relaxed),
    );
    eprintln!("{cases} datagrams, {answered} answers with records");
    assert!(cases >= cases_wanted as usize);
    target
}

#[test]
fn the_corpus_itself_is_served_within_bounds() {
    let target = target();
    for seed in corpus() {
        for src in ["10.1.2.3:53", "[2001:db8::1]:53"] {
            check(&target, &seed, src.parse().unwrap()).unwrap();
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic_and_stay_within_bounds() {
    run(10_000, proptest::collection::vec(any::<u8>(), 0..700));
}

#[test]
fn arbitrary_queries_never_panic_and_stay_within_bounds() {
    run(5_000, queries());
}

#[test]
fn mutated_seeds_never_panic_and_stay_within_bounds() {
    let target = run(10_000, mutations(corpus()));
    // The limited handler was over its limit for most cases: both refusals were exercised.
    let limited = target.limited.rate_limited();
    assert!(limited.dropped > 100 && limited.slipped > 100, "{limited:?}");
    assert_eq!(target.open.rate_limited(), Default::default());
}
