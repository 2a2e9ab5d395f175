//! `atoll dns` is no amplifier, on the wire: `atoll_dns::serve` on 127.0.0.1:0, asked over
//! real UDP and TCP by our own client (to count the bytes) and by `dig` (a client nobody
//! here wrote). The zone has 40 name servers with IPv4 and IPv6 glue, so its NS answer
//! (about 2.5 KB) is bigger than the 1232-byte UDP cap. No cluster source is reachable:
//! SOA and NS are answered from the flags alone.

mod support;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use atoll_control::ControlPlane;
use atoll_control::RegistryClient;
use atoll_dns::config::{DnsConfig, DomainName, NsFlag, name_servers};
use atoll_dns::{RateLimit, bind, serve};
use hickory_server::proto::op::{Edns, Message, Query};
use hickory_server::proto::rr::{Name, RData, RecordType};
use tokio::sync::oneshot;

use support::{PATIENCE, tcp_answer_bytes, udp_answer_bytes};

const NAME_SERVERS: usize = 40;

struct Dns {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Dns {
    async fn start(rate_limit: Option<RateLimit>) -> Dns {
        let zones: Vec<DomainName> = vec!["example.com".parse().unwrap()];
        let ns: Vec<NsFlag> = (0..NAME_SERVERS)
            .flat_map(|i| {
                [
                    format!("ns{i:02}.example.com=127.0.1.{i}"),
                    format!("ns{i:02}.example.com=2001:db8::{i}"),
                ]
            })
            .map(|flag| flag.parse().unwrap())
            .collect();
        let config = DnsConfig {
            zones: name_servers(&zones, &ns, None),
            rate_limit,
            ..support::config()
        };
        // Nothing listens on port 1: the view stays unknown, static data is answered.
        let source = ControlPlane::Registry(RegistryClient::new("http://127.0.0.1:1", None).unwrap());
        let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = udp.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, source, udp, tcp, async move {
            let _ = stopped.await;
        }));
        Dns {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the DNS shuts down")
            .unwrap()
            .unwrap();
    }
}

fn query(name: &str, qtype: RecordType, udp_size: Option<u16>) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = udp_size {
        let mut edns = Edns::new();
        edns.set_max_payload(size);
        message.set_edns(edns);
    }
    message
}

async fn tcp_connect(server: SocketAddr, from: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    socket.connect(server).await.unwrap()
}

/// `dig @server -p PORT ARGS…` from `from`; its output.
async fn dig(server: SocketAddr, from: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "-b", from])
        .args(args)
        .output()
        .await
        .expect("dig is installed (dnsutils)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The number after `;; MSG SIZE  rcvd:` in dig's output.
fn dig_size(output: &str) -> usize {
    let line = output
        .lines()
        .find(|line| line.starts_with(";; MSG SIZE"))
        .unwrap_or_else(|| panic!("no MSG SIZE in {output}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The flags of dig's `;; flags: qr aa tc; QUERY: …` header line.
fn dig_flags(output: &str) -> Vec<String> {
    let line = output
        .lines()
        .find(|line| line.starts_with(";; flags:"))
        .unwrap_or_else(|| panic!("no flags in {output}"));
    let flags = line[";; flags:".len()..].split(';').next().unwrap();
    flags.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_answers_never_exceed_the_cap_whatever_the_client_claims() {
    let dns = Dns::start(None).await;
    let client = "127.0.0.61";

    // TCP: the whole NS set with its glue, well over the UDP cap.
    let mut stream = tcp_connect(dns.addr, client).await;
    let full = tcp_answer_bytes(&mut stream, &query("example.com.", RecordType::NS, Some(4096))).await;
    let message = Message::from_vec(&full).unwrap();
    assert!(!message.metadata.truncation);
    assert_eq!(message.answers.len(), NAME_SERVERS);
    assert_eq!(message.additionals.len(), 2 * NAME_SERVERS);
    assert!(full.len() > 2000, "the full answer is {} bytes", full.len());

    // UDP: at most min(the client's EDNS size, 1232), at least 512; truncated, so the
    // client retries over TCP.
    for (claimed, bound) in [
        (Some(4096), 1232),
        (Some(65_535), 1232),
        (Some(1400), 1232),
        (Some(800), 800),
        (Some(100), 512),
        (None, 512),
    ] {
        let bytes = udp_answer_bytes(dns.addr, client, &query("example.com.", RecordType::NS, claimed)).await;
        assert!(
            bytes.len() <= bound,
            "EDNS size {claimed:?}: {} bytes over UDP, more than {bound}",
            bytes.len()
        );
        assert!(bytes.len() > bound - 100, "{claimed:?}: {} bytes", bytes.len());
        let message = Message::from_vec(&bytes).unwrap();
        assert!(message.metadata.truncation, "{claimed:?}: TC=1");
        let records = message.answers.len() + message.additionals.len();
        assert!(records < 3 * NAME_SERVERS, "{claimed:?}: {records} records");
    }

    // dig, a client nobody here wrote, with a 4096-byte buffer: TC and at most 1232 bytes
    // over UDP (+ignore: do not retry over TCP)…
    let udp = dig(
        dns.addr,
        client,
        &[
            "example.com",
            "NS",
            "+bufsize=4096",
            "+notcp",
            "+ignore",
            "+tries=1",
        ],
    )
    .await;
    assert!(dig_flags(&udp).contains(&"tc".to_owned()), "{udp}");
    assert!(dig_size(&udp) <= 1232, "{udp}");
    // …and by default it retries over TCP and gets everything.
    let retried = dig(
        dns.addr,
        client,
        &["example.com", "NS", "+bufsize=4096", "+tries=1"],
    )
    .await;
    assert!(retried.contains(&format!("ANSWER: {NAME_SERVERS},")), "{retried}");
    assert!(dig_size(&retried) > 2000, "{retried}");
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_is_answered_with_one_rrset_over_udp_and_tcp() {
    let dns = Dns::start(None).await;
    let client = "127.0.0.62";
    for transport in ["+notcp", "+tcp"] {
        let apex = dig(
            dns.addr,
            client,
            &["example.com", "ANY", "+bufsize=4096", transport, "+tries=1"],
        )
        .await;
        assert!(apex.contains("ANSWER: 1,"), "{transport}: {apex}");
        assert!(apex.contains("IN\tSOA\tns00.example.com."), "{transport}: {apex}");
        assert!(!dig_flags(&apex).contains(&"tc".to_owned()), "{apex}");
        assert!(dig_size(&apex) < 200, "{transport}: {apex}");
        let host = dig(
            dns.addr,
            client,
            &["ns07.example.com", "ANY", "+bufsize=4096", transport, "+tries=1"],
        )
        .await;
        assert!(host.contains("ANSWER: 1,"), "{transport}: {host}");
        assert!(host.contains("IN\tA\t127.0.1.7"), "{transport}: {host}");
    }
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_is_rate_limited_per_prefix_and_tcp_is_not() {
    let dns = Dns::start(Some(RateLimit {
        per_second: NonZeroU32::new(5).unwrap(),
        slip: 2,
    }))
    .await;
    // 40 queries at once from one source, as a spoofed flood would come.
    let socket = tokio::net::UdpSocket::bind("127.0.0.63:0").await.unwrap();
    let soa = query("example.com.", RecordType::SOA, None);
    let sent = 40;
    let started = Instant::now();
    for id in 0..sent {
        let mut soa = soa.clone();
        soa.metadata.id = id;
        socket.send_to(&soa.to_vec().unwrap(), dns.addr).await.unwrap();
    }
    // Collect until nothing more comes for 2 s (dropped answers never come).
    let (mut full, mut slipped) = (0, 0);
    let mut last_answer = started;
    let mut buffer = vec![0u8; 4096];
    while let Ok(received) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buffer)).await
    {
        let (len, _) = received.unwrap();
        last_answer = Instant::now();
        let message = Message::from_vec(&buffer[..len]).unwrap();
        if message.metadata.truncation {
            assert!(message.answers.is_empty(), "a slip is empty");
            assert!(
                len <= soa.to_vec().unwrap().len(),
                "a slip is no bigger than the query"
            );
            slipped += 1;
        } else {
            assert!(matches!(&message.answers[..], [r] if matches!(r.data, RData::SOA(_))));
            full += 1;
        }
    }
    // The burst (5), plus 5 a second while the server was answering the flood (it may read
    // the datagrams well after they were sent).
    let answering = last_answer - started;
    let allowed = 5 + 5 * (answering.as_secs_f64().ceil() as usize);
    assert!(
        (5..=allowed).contains(&full),
        "{full} full answers of {sent} answered over {answering:?}"
    );
    assert!(slipped >= 10, "{slipped} slipped of {sent}");
    assert!(
        full + slipped < sent as usize,
        "some are dropped: {full} + {slipped}"
    );

    // The same prefix over TCP: never limited.
    let mut stream = tcp_connect(dns.addr, "127.0.0.64").await;
    for id in 0..20 {
        let mut soa = soa.clone();
        soa.metadata.id = id;
        let message = Message::from_vec(&tcp_answer_bytes(&mut stream, &soa).await).unwrap();
        assert_eq!(message.metadata.id, id);
        assert_eq!(message.answers.len(), 1, "TCP query {id}");
    }
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_a_flooded_prefix_is_answered_over_tcp_after_a_slip() {
    // One answer a second per prefix, every refused one slipped.
    let dns = Dns::start(Some(RateLimit {
        per_second: NonZeroU32::new(1).unwrap(),
        slip: 1,
    }))
    .await;
    let flood = tokio::net::UdpSocket::bind("127.0.0.65:0").await.unwrap();
    let soa = query("example.com.", RecordType::SOA, None).to_vec().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        // The spoofed flood keeps the prefix over its limit…
        for _ in 0..5 {
            flood.send_to(&soa, dns.addr).await.unwrap();
        }
        // …and a real client in the same /24 asks: told TC over UDP, it retries over TCP.
        let output = dig(
            dns.addr,
            "127.0.0.66",
            &["example.com", "SOA", "+tries=1", "+time=2"],
        )
        .await;
        if output.contains("Truncated, retrying in TCP mode") {
            assert!(output.contains("ANSWER: 1,"), "{output}");
            assert!(output.contains("IN\tSOA\tns00.example.com."), "{output}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dig was never truncated then answered: {output}"
        );
    }
    dns.shutdown().await;
}
