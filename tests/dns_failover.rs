//! The DNS end to end on loopback: a real registry in-process (embedded store in a temp
//! dir, the real engine validating a pushed module), nodes announcing themselves through
//! the real client (this test lives in the workspace's root package because the registry
//! checks pushes with atoll-isolate, which the DNS crate does not link), and `atoll_dns::serve` on 127.0.0.1:0 queried over UDP and TCP from
//! different loopback source addresses (127.0.0.21 is region `a`, 127.0.0.33 region `b`).
//! When region a's nodes stop announcing, a region-a client is answered with region b's
//! node; when the registry goes away, the last answers stay.

#[path = "../dns/tests/support/mod.rs"]
mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atoll_control::ControlPlane;
use atoll_control::RegistryClient;
use atoll_dns::{bind, serve};
use atoll_registry::{Registry, RegistryOptions};
use hickory_server::proto::op::{OpCode, ResponseCode};
use hickory_server::proto::rr::RData;
use hickory_server::proto::rr::RecordType;
use hickory_server::proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use tokio::sync::oneshot;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_a_fails_over_to_region_b() {
    let registry = RegistryServer::start().await;
    let client = registry.client();
    // The registry answers once its listener is bound; push retries nothing, so poll it.
    let start = Instant::now();
    loop {
        let manifest = "name = \"shop\"\nwasm = \"shop.wasm\"\nroutes = [\"shop.example.com\", \"*.w.example.com\", \"api.example.com/echo\"]\n";
        match client.push(manifest, module("shop")).await {
            Ok(_) => break,
            Err(_) if start.elapsed() < PATIENCE => tokio::task::yield_now().await,
            Err(e) => panic!("push failed: {e}"),
        }
    }

    // Heartbeats: region a's nodes while `a_alive`, region b's always.
    let a_alive = Arc::new(AtomicBool::new(true));
    let heartbeats = {
        let client = client.clone();
        spawn_heartbeats(Arc::clone(&a_alive), move |node| {
            let client = client.clone();
            async move {
                let _ = client.announce(&node).await;
            }
        })
    };

    let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let server = udp.local_addr().unwrap();
    assert_eq!(tcp.local_addr().unwrap(), server, "UDP and TCP on the same port");
    let (stop_dns, dns_stopped) = oneshot::channel::<()>();
    let dns = tokio::spawn(serve(
        config(),
        ControlPlane::Registry(client.clone()),
        udp,
        tcp,
        async move {
            let _ = dns_stopped.await;
        },
    ));

    let region_a = ips(&["10.0.0.1", "10.0.0.2"]);
    let region_b = ips(&["10.0.1.1"]);
    until_answer(server, REGION_A_CLIENT, "shop.example.com.", &region_a).await;
    until_answer(server, REGION_B_CLIENT, "shop.example.com.", &region_b).await;

    // The answer in detail: authoritative, short TTL, no draining node.
    let response = ask_udp(
        server,
        REGION_A_CLIENT,
        &question("Shop.Example.com.", RecordType::A, None),
    )
    .await;
    assert!(response.metadata.authoritative);
    assert!(response.answers.iter().all(|r| r.ttl == 5));
    assert_eq!(addresses(&response), region_a);

    // TCP, wildcard and path routes.
    let tcp_a = ask_tcp(
        server,
        REGION_A_CLIENT,
        &question("x.y.w.example.com.", RecordType::A, None),
    )
    .await;
    assert_eq!(addresses(&tcp_a), region_a);
    let tcp_b = ask_tcp(
        server,
        REGION_B_CLIENT,
        &question("api.example.com.", RecordType::A, None),
    )
    .await;
    assert_eq!(addresses(&tcp_b), region_b);
    // Region b's IPv6 node announces on its own: wait for it rather than assume it is in.
    until_answer_of(
        server,
        REGION_B_CLIENT,
        "shop.example.com.",
        RecordType::AAAA,
        &ips(&["2001:db8::b1"]),
    )
    .await;

    // SOA, NS with glue, NXDOMAIN, REFUSED.
    let soa = ask_tcp(
        server,
        REGION_A_CLIENT,
        &question("example.com.", RecordType::SOA, None),
    )
    .await;
    assert!(
        matches!(&soa.answers[..], [r] if matches!(&r.data, RData::SOA(s) if s.mname.to_ascii() == "ns1.example.com."))
    );
    let ns = ask_udp(
        server,
        REGION_A_CLIENT,
        &question("example.com.", RecordType::NS, None),
    )
    .await;
    assert_eq!(ns.answers.len(), 1);
    assert_eq!(addresses_of(&ns.additionals), ips(&["127.0.0.53"]));
    let missing = ask_udp(
        server,
        REGION_A_CLIENT,
        &question("nope.example.com.", RecordType::A, None),
    )
    .await;
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert!(matches!(&missing.authorities[..], [r] if matches!(r.data, RData::SOA(_))));
    let refused = ask_udp(
        server,
        REGION_A_CLIENT,
        &question("example.org.", RecordType::A, None),
    )
    .await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);

    // Malformed questions: none at all (FORMERR), an opcode other than QUERY (NOTIMP).
    let mut empty = question("shop.example.com.", RecordType::A, None);
    empty.queries.clear();
    let response = ask_udp(server, REGION_A_CLIENT, &empty).await;
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    let mut status = question("shop.example.com.", RecordType::A, None);
    status.metadata.op_code = OpCode::Status;
    let response = ask_udp(server, REGION_A_CLIENT, &status).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NotImp);

    // EDNS Client Subnet: a resolver in b asking for a client in a gets a's nodes, and the
    // option back with a scope.
    let ecs = ClientSubnet::new("127.0.0.20".parse().unwrap(), 32, 0);
    let response = ask_udp(
        server,
        REGION_B_CLIENT,
        &question("shop.example.com.", RecordType::A, Some(ecs)),
    )
    .await;
    assert_eq!(addresses(&response), region_a);
    let echoed = response
        .edns
        .as_ref()
        .and_then(|edns| edns.option(EdnsCode::Subnet))
        .cloned();
    match echoed {
        Some(EdnsOption::Subnet(subnet)) => {
            assert_eq!(subnet.addr(), "127.0.0.20".parse::<IpAddr>().unwrap());
            assert_eq!(subnet.scope_prefix(), 32);
        }
        other => panic!("no ECS option in the answer: {other:?}"),
    }

    // Region a goes silent: within one member TTL (3 s) plus a poll, a's client gets b.
    a_alive.store(false, Ordering::Relaxed);
    let took = until_answer(server, REGION_A_CLIENT, "shop.example.com.", &region_b).await;
    eprintln!("failover took {took:?}");
    assert!(took < Duration::from_secs(20), "failover took {took:?}");

    // The registry goes away: the DNS keeps answering with what it knew.
    heartbeats.abort();
    registry.shutdown().await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let response = ask_udp(
            server,
            REGION_A_CLIENT,
            &question("shop.example.com.", RecordType::A, None),
        )
        .await;
        assert_eq!(addresses(&response), region_b);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    stop_dns.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), dns)
        .await
        .expect("the DNS shuts down")
        .unwrap()
        .unwrap();
}

const TOKEN: &str = "test-token-0123456789";

struct RegistryServer {
    url: String,
    _data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RegistryServer {
    async fn start() -> RegistryServer {
        let data = tempfile::tempdir().unwrap();
        let engine = atoll_isolate::Engine::new().unwrap();
        let registry = Registry::open(
            data.path(),
            std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
            TOKEN.into(),
            RegistryOptions::default(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(atoll_registry::serve(listener, Arc::new(registry), async move {
            let _ = stopped.await;
        }));
        RegistryServer {
            url,
            _data: data,
            stop: Some(stop),
            task,
        }
    }

    fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url, Some(TOKEN.into())).unwrap()
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("registry shuts down")
            .unwrap()
            .unwrap();
    }
}
