//! The DNS reading the NATS JetStream store directly (`--store nats://…`): functions pushed
//! to the store and heartbeats written to its node bucket, a real `nats-server -js`, and
//! the same failover as through a registry; with NATS gone, the last answers stay.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atoll_control::ControlPlane;
use atoll_control::NatsStore;
use atoll_core::Manifest;
use atoll_dns::{bind, serve};
use atoll_testkit::NatsServer;
use tokio::sync::oneshot;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_source_fails_over_and_survives_nats_going_away() {
    let nats = NatsServer::start();
    let writer = NatsStore::connect(&nats.url).await.unwrap();
    let manifest =
        Manifest::parse("name = \"shop\"\nwasm = \"shop.wasm\"\nroutes = [\"shop.example.com\"]").unwrap();
    writer.push(manifest, module("shop")).await.unwrap();

    let a_alive = Arc::new(AtomicBool::new(true));
    let heartbeats = {
        let writer = writer.clone();
        spawn_heartbeats(Arc::clone(&a_alive), move |node| {
            let writer = writer.clone();
            async move {
                let _ = writer.announce(&node).await;
            }
        })
    };

    let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let server = udp.local_addr().unwrap();
    let (stop_dns, dns_stopped) = oneshot::channel::<()>();
    let dns = tokio::spawn(serve(
        config(),
        ControlPlane::nats(nats.url.clone()),
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

    a_alive.store(false, Ordering::Relaxed);
    let took = until_answer(server, REGION_A_CLIENT, "shop.example.com.", &region_b).await;
    assert!(took < Duration::from_secs(20), "failover took {took:?}");

    // NATS goes away: the members the DNS knew age out of its table, but a snapshot is
    // only taken when the store answers, so the last good answer stays.
    heartbeats.abort();
    drop(writer);
    drop(nats);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let response = ask_udp(
            server,
            REGION_A_CLIENT,
            &question(
                "shop.example.com.",
                hickory_server::proto::rr::RecordType::A,
                None,
            ),
        )
        .await;
        assert_eq!(addresses(&response), region_b);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    stop_dns.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), dns)
        .await
        .expect("the DNS shuts down")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_starts_and_answers_for_its_zone_while_nats_is_down() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let server = udp.local_addr().unwrap();
    let (stop_dns, dns_stopped) = oneshot::channel::<()>();
    let dns = tokio::spawn(serve(
        config(),
        ControlPlane::nats(format!("nats://127.0.0.1:{port}")),
        udp,
        tcp,
        async move {
            let _ = dns_stopped.await;
        },
    ));
    let response = ask_udp(
        server,
        REGION_A_CLIENT,
        &question("example.com.", hickory_server::proto::rr::RecordType::SOA, None),
    )
    .await;
    assert_eq!(
        response.metadata.response_code,
        hickory_server::proto::op::ResponseCode::NoError
    );
    assert_eq!(response.answers.len(), 1, "{response:?}");
    stop_dns.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), dns)
        .await
        .expect("the DNS shuts down")
        .unwrap()
        .unwrap();
}
