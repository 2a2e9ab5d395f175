//! Helpers shared by the DNS integration tests (also `tests/dns_failover.rs` at the
//! workspace root, which adds a registry in-process): a tiny valid module, node announcements, and a DNS client over UDP and TCP from a chosen loopback
//! source address.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atoll_core::membership::NodeAnnouncement;
use atoll_dns::config::{DnsConfig, DomainName, NsFlag, RegionMap, RegionRule, name_servers};
use hickory_server::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_server::proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const REGION_A_CLIENT: &str = "127.0.0.21";
pub const REGION_B_CLIENT: &str = "127.0.0.33";
/// Generous bound for anything that should happen within a second or a TTL.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn leb128(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// `(module (memory (export "memory") 1) (func (export "_start")))` plus a custom section.
pub fn module(tag: &str) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]);
    m.extend_from_slice(&[0x03, 0x02, 0x01, 0x00]);
    m.extend_from_slice(&[0x05, 0x03, 0x01, 0x00, 0x01]);
    m.extend_from_slice(&[0x07, 0x13, 0x02]);
    m.extend_from_slice(b"\x06_start\x00\x00");
    m.extend_from_slice(b"\x06memory\x02\x00");
    m.extend_from_slice(&[0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b]);
    let mut payload = Vec::new();
    leb128(tag.len(), &mut payload);
    payload.extend_from_slice(tag.as_bytes());
    m.push(0x00);
    leb128(payload.len(), &mut m);
    m.extend_from_slice(&payload);
    m
}

pub fn node(name: &str, region: &str, http: &str, draining: bool) -> NodeAnnouncement {
    NodeAnnouncement {
        name: name.into(),
        region: region.into(),
        http: Some(http.parse().unwrap()),
        https: None,
        in_flight: 0,
        free_capacity: 8,
        draining,
        sync_lag: 0,
        quarantined: 0,
    }
}

pub fn question(name: &str, qtype: RecordType, ecs: Option<ClientSubnet>) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(subnet) = ecs {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns.options_mut().insert(EdnsOption::Subnet(subnet));
        message.set_edns(edns);
    }
    message
}

/// The raw bytes of the UDP answer to `query`, sent from `from`.
pub async fn udp_answer_bytes(server: SocketAddr, from: &str, query: &Message) -> Vec<u8> {
    let from: IpAddr = from.parse().unwrap();
    let socket = tokio::net::UdpSocket::bind((from, 0)).await.unwrap();
    socket.send_to(&query.to_vec().unwrap(), server).await.unwrap();
    let mut buffer = vec![0u8; 65_535];
    let (len, peer) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
        .await
        .expect("a UDP answer within 5 s")
        .unwrap();
    assert_eq!(peer, server);
    buffer.truncate(len);
    buffer
}

/// The raw bytes of the answer to `query` over the TCP connection `stream`.
pub async fn tcp_answer_bytes(stream: &mut tokio::net::TcpStream, query: &Message) -> Vec<u8> {
    let bytes = query.to_vec().unwrap();
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&bytes).await.unwrap();
    let read = async {
        let len = stream.read_u16().await.unwrap();
        let mut buffer = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buffer).await.unwrap();
        buffer
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a TCP answer within 5 s")
}

pub async fn ask_udp(server: SocketAddr, from: &str, query: &Message) -> Message {
    let response = Message::from_vec(&udp_answer_bytes(server, from, query).await).unwrap();
    assert_eq!(response.metadata.id, query.metadata.id);
    response
}

pub async fn ask_tcp(server: SocketAddr, from: &str, query: &Message) -> Message {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    let response = Message::from_vec(&tcp_answer_bytes(&mut stream, query).await).unwrap();
    assert_eq!(response.metadata.id, query.metadata.id);
    response
}

pub fn addresses(response: &Message) -> BTreeSet<IpAddr> {
    addresses_of(&response.answers)
}

pub fn addresses_of(records: &[Record]) -> BTreeSet<IpAddr> {
    records
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

pub fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

/// Asks until the answer's addresses are `want`; returns how long that took.
pub async fn until_answer(server: SocketAddr, from: &str, name: &str, want: &BTreeSet<IpAddr>) -> Duration {
    until_answer_of(server, from, name, RecordType::A, want).await
}

/// Polls `name`'s `record_type` records until they are exactly `want`: each node
/// announces on its own, so one record type being complete says nothing of another.
pub async fn until_answer_of(
    server: SocketAddr,
    from: &str,
    name: &str,
    record_type: RecordType,
    want: &BTreeSet<IpAddr>,
) -> Duration {
    let start = Instant::now();
    loop {
        let response = ask_udp(server, from, &question(name, record_type, None)).await;
        if response.metadata.response_code == ResponseCode::NoError && addresses(&response) == *want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{name} from {from}: still {:?} {:?}, want {want:?}",
            response.metadata.response_code,
            addresses(&response)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn config() -> DnsConfig {
    let zones: Vec<DomainName> = vec!["example.com".parse().unwrap()];
    let ns: Vec<NsFlag> = vec!["ns1.example.com=127.0.0.53".parse().unwrap()];
    DnsConfig {
        zones: name_servers(&zones, &ns, None),
        region_map: RegionMap::new(
            ["127.0.0.16/28=a", "127.0.0.32/28=b"]
                .iter()
                .map(|rule| rule.parse::<RegionRule>().unwrap()),
        ),
        default_region: "default".into(),
        fallback: Default::default(),
        ttl: 5,
        max_udp_payload: atoll_dns::config::DEFAULT_MAX_UDP_PAYLOAD,
        // Every test client is in 127.0.0.0/24, one prefix: the polling of the failover
        // tests would be limited. tests/limits.rs tests the limit.
        rate_limit: None,
    }
}

/// Region a: two healthy nodes and a draining one (never named).
pub fn region_a_nodes() -> Vec<NodeAnnouncement> {
    vec![
        node("a1", "a", "10.0.0.1:8080", false),
        node("a2", "a", "10.0.0.2:8080", false),
        node("a3", "a", "10.0.0.3:8080", true),
    ]
}

/// Region b: one IPv4 and one IPv6 node.
pub fn region_b_nodes() -> Vec<NodeAnnouncement> {
    vec![
        node("b1", "b", "10.0.1.1:8080", false),
        node("b6", "b", "[2001:db8::b1]:8080", false),
    ]
}

/// Announces region a's nodes every 300 ms while `a_alive`, region b's always, through
/// `announce`.
pub fn spawn_heartbeats<F, Fut>(a_alive: Arc<AtomicBool>, announce: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(NodeAnnouncement) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            if a_alive.load(Ordering::Relaxed) {
                for node in region_a_nodes() {
                    announce(node).await;
                }
            }
            for node in region_b_nodes() {
                announce(node).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}
