//! A node following NATS JetStream directly ([`ControlPlane::Nats`]), against a real
//! `nats-server -js`: a function pushed to NATS is served, a new version replaces it, the
//! table keeps serving while NATS is down, the node follows again once NATS is back; a node
//! restarted while NATS is down serves from its disk cache alone and connects once it can.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_control::ControlPlane;
use atoll_control::NatsStore;
use atoll_core::Manifest;
use atoll_isolate::{ArtifactCache, CgiRequest, Engine};
use atoll_router::node_cache::NodeCache;
use atoll_router::served::Routing;
use atoll_router::sync::Syncer;
use atoll_testkit::NatsServer;
use tokio::sync::watch;

/// Generous bound for anything the test waits on (compiles on a busy 2-core machine).
const PATIENCE: Duration = Duration::from_secs(90);
const HOST: &str = "hello.example.com";

/// A WCGI guest answering `200 text/plain` with `body`.
fn guest(body: &str) -> Vec<u8> {
    atoll_testkit::guests::writer(&format!("Content-Type: text/plain\n\n{body}"))
}

fn manifest() -> Manifest {
    Manifest::parse(&format!(
        "name = \"hello\"\nwasm = \"hello.wasm\"\nroutes = [\"{HOST}\"]\n"
    ))
    .unwrap()
}

/// The version `routing` serves for [`HOST`] and the body it answers, if it routes it.
async fn served(routing: &Routing) -> Option<(u64, String)> {
    let table = routing.current()?;
    let function = Arc::clone(table.lookup(HOST, "/")?.target);
    let version = function.deployment.version;
    let body = tokio::task::spawn_blocking(move || {
        let request = CgiRequest {
            method: "GET".into(),
            raw_path: "/".into(),
            protocol: "HTTP/1.1".into(),
            scheme: "http".into(),
            server_name: HOST.into(),
            server_port: 80,
            ..CgiRequest::default()
        };
        let invocation = function
            .pool
            .as_ref()
            .expect("a module")
            .function()
            .invoke(&request)
            .expect("the guest answers");
        String::from_utf8(invocation.response.body.to_vec()).unwrap()
    })
    .await
    .unwrap();
    Some((version, body))
}

/// Polls until `routing` serves `version` answering `body`.
async fn wait_for_version(routing: &Routing, version: u64, body: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = served(routing).await;
        if now == Some((version, body.to_string())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still serving {now:?}, not v{version} {body:?}, after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks, for `window`, that `routing` keeps serving `expected`.
async fn assert_serves_throughout(routing: &Routing, expected: (u64, &str), window: Duration) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        assert_eq!(
            served(routing).await,
            Some((expected.0, expected.1.to_string())),
            "the table changed while NATS was down"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A syncer on the node cache in `dir`, publishing to a fresh [`Routing`].
fn syncer(source: ControlPlane, dir: &Path) -> (Syncer, Arc<Routing>) {
    let cache = NodeCache::open(dir).unwrap();
    let artifacts = ArtifactCache::open(cache.artifacts_dir(), Engine::new().unwrap()).unwrap();
    let routing = Routing::new();
    (
        Syncer::new(Arc::new(source), cache, artifacts, Arc::clone(&routing)),
        routing,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_follows_jetstream_and_survives_its_outage() {
    let nats_dir = tempfile::tempdir().unwrap();
    let node_dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start_in(nats_dir.path(), None);
    let pusher = NatsStore::connect(&nats.url).await.unwrap();
    assert_eq!(pusher.push(manifest(), guest("v1")).await.unwrap().version, 1);

    // A node following NATS, no registry anywhere.
    let store = NatsStore::connect(&nats.url).await.unwrap();
    let (mut node, routing) = syncer(ControlPlane::nats_connected(store), node_dir.path());
    assert_eq!(node.restore_from_disk().await.unwrap(), 0);
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(node.run(stopped));
    wait_for_version(&routing, 1, "v1").await;

    // A push is a KV change: the node's watch wakes and loads v2.
    assert_eq!(pusher.push(manifest(), guest("v2")).await.unwrap().version, 2);
    wait_for_version(&routing, 2, "v2").await;

    // NATS goes away. The watch notices within the syncer's silence limit (15 s: an idle
    // probe of NATS starts after 5 s and a request to a lost server times out after 10 s),
    // and the syncer retries with backoff. The table stays as it is all along; the window is
    // longer than that limit, so it spans a failed watch and failed retries.
    let port = nats.port;
    nats.kill();
    let held = hold_port(port);
    drop(pusher);
    assert_serves_throughout(&routing, (2, "v2"), Duration::from_secs(20)).await;

    // NATS comes back with its data on the same address: the node's connection reconnects,
    // its syncer resumes from the revision it applied and follows the next push.
    drop(held);
    let mut nats = NatsServer::start_in(nats_dir.path(), Some(port));
    let pusher = NatsStore::connect(&nats.url).await.unwrap();
    assert_eq!(pusher.push(manifest(), guest("v3")).await.unwrap().version, 3);
    wait_for_version(&routing, 3, "v3").await;
    stop.send(true).unwrap();
    tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the syncer stops on shutdown")
        .unwrap();

    // The node restarts while NATS is down: it serves v3 from its disk cache alone (module
    // and compiled artifact) and keeps trying to connect.
    nats.kill();
    let held = hold_port(port);
    drop(pusher);
    let (mut node, routing) = syncer(ControlPlane::nats(nats.url.clone()), node_dir.path());
    assert_eq!(node.restore_from_disk().await.unwrap(), 1);
    assert!(routing.is_ready());
    assert_eq!(served(&routing).await, Some((3, "v3".to_string())));
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(node.run(stopped));
    assert_serves_throughout(&routing, (3, "v3"), Duration::from_secs(1)).await;

    // Once NATS is back, the node connects for the first time and follows it.
    drop(held);
    let nats = NatsServer::start_in(nats_dir.path(), Some(port));
    let pusher = NatsStore::connect(&nats.url).await.unwrap();
    assert_eq!(pusher.push(manifest(), guest("v4")).await.unwrap().version, 4);
    wait_for_version(&routing, 4, "v4").await;

    stop.send(true).unwrap();
    tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the syncer stops on shutdown")
        .unwrap();
}

#[test]
fn the_source_is_debuggable_without_credentials() {
    let source = ControlPlane::nats("nats://user:secret@127.0.0.1:4222");
    let shown = format!("{source:?}");
    assert!(shown.contains("127.0.0.1:4222"), "{shown}");
    assert!(!shown.contains("secret"), "{shown}");
}

/// Keeps loopback `port` from another process's `bind(…:0)` while NATS is down (tests run
/// in parallel), without listening: the node is still refused, as with no NATS. Best
/// effort: `None` when the port cannot be bound (then nothing changes).
fn hold_port(port: u16) -> Option<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_reuseaddr(true).ok()?;
    socket.bind(([127, 0, 0, 1], port).into()).ok()?;
    Some(socket)
}
