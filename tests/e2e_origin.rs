//! Origin routes end to end: a node proxying to two real origin servers — balancing,
//! forwarding headers, hop-by-hop headers dropped, one origin stopped in the middle of a
//! load without a failed request, a WebSocket passed through, a function calling its own
//! origins at `http://origin.atoll.internal`, and the address guard on origins.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use atoll_testkit::origin::TestOrigin;
use support::*;

struct Setup {
    runtime: tokio::runtime::Runtime,
    origins: Vec<TestOrigin>,
    _registry: Process,
    url: String,
    _node: Process,
    addr: String,
    admin: String,
    _dir: tempfile::TempDir,
}

/// Two origins, a registry and a node, and `shop` (origins only) pushed and served.
fn setup(extra: &str) -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let origins = vec![
        runtime.block_on(TestOrigin::http()),
        runtime.block_on(TestOrigin::http()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (registry, url) = start_registry(&dir.path().join("registry"));
    let (node, addr, admin) = start_node(&url, &dir.path().join("node"));
    let list: Vec<String> = origins
        .iter()
        .map(|origin| format!("{:?}", origin.url("")))
        .collect();
    let manifest = dir.path().join("shop/atoll.toml");
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    std::fs::write(
        &manifest,
        format!(
            "name = \"shop\"\nroutes = [\"shop.localhost\"]\norigins = [{}]\n[origin]\nhealth_interval = \"1s\"\n{extra}",
            list.join(", ")
        ),
    )
    .unwrap();
    push_ok(&url, &manifest);
    wait_until("shop is served", || {
        http_get(&addr, "shop.localhost", "/hello").is_ok_and(|response| response.status == 200)
    });
    Setup {
        runtime,
        origins,
        _registry: registry,
        url,
        _node: node,
        addr,
        admin,
        _dir: dir,
    }
}

#[test]
fn an_origin_route_balances_and_sets_the_forwarding_headers() {
    let setup = setup("");
    let ports: BTreeSet<String> = (0..40)
        .map(|_| get(&setup.addr, "shop.localhost", "/whoami").text())
        .collect();
    let expected: BTreeSet<String> = setup
        .origins
        .iter()
        .map(|o| o.address.port().to_string())
        .collect();
    assert_eq!(ports, expected, "both origins answered");

    let hello = get(&setup.addr, "shop.localhost", "/hello");
    assert_eq!(hello.text(), "hello from origin");
    assert_eq!(hello.header("content-type"), Some("text/plain"));

    // What the client says about where it is gets replaced; hop-by-hop headers stop here.
    let headers = http_request(
        &setup.addr,
        "GET",
        "shop.localhost",
        "/headers",
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("x-kept", "1"),
        ],
        b"",
    )
    .unwrap()
    .text();
    for line in [
        "host: shop.localhost\n",
        "x-forwarded-for: 127.0.0.1\n",
        "x-forwarded-proto: http\n",
        "x-forwarded-host: shop.localhost\n",
        "forwarded: for=127.0.0.1;proto=http;host=\"shop.localhost\"\n",
        "x-kept: 1\n",
    ] {
        assert!(headers.contains(line), "{line:?} missing in:\n{headers}");
    }
    assert!(
        !headers.contains("6.6.6.6") && !headers.contains("x-secret"),
        "{headers}"
    );

    // Bodies go through, both ways.
    let echoed = http_request(&setup.addr, "POST", "shop.localhost", "/echo", &[], b"order 42").unwrap();
    assert!(echoed.text().ends_with("body=order 42"), "{}", echoed.text());
    let large = get(&setup.addr, "shop.localhost", "/bytes?n=1000000");
    assert_eq!(large.body.len(), 1_000_000);
}

#[test]
fn what_could_escape_or_loop_is_refused_and_http2_keeps_the_host() {
    let setup = setup("");
    // Dot segments (plain or encoded) would let a path-prefix route reach other paths.
    for path in ["/public/../admin", "/a/%2e%2e/admin", "/a/%2E%2e/b", "/a%2fb"] {
        let refused = get(&setup.addr, "shop.localhost", path);
        assert_eq!(refused.status, 400, "{path}: {}", refused.text());
    }
    // CONNECT would make the node a tunnel to wherever the client names: refused, and the
    // origins never see it.
    let before: usize = setup.origins.iter().map(TestOrigin::requests).sum();
    let connect = http_request(
        &setup.addr,
        "CONNECT",
        "shop.localhost",
        "shop.localhost:443",
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(connect.status, 400, "{}", connect.text());
    assert_eq!(
        setup.origins.iter().map(TestOrigin::requests).sum::<usize>(),
        before
    );
    // A request already deep in a chain of hops is a loop.
    let looped = http_request(
        &setup.addr,
        "GET",
        "shop.localhost",
        "/hello",
        &[("atoll-hops", "9")],
        b"",
    )
    .unwrap();
    assert_eq!(looped.status, 508);
    // The origin learns the chain's length, so a route back to the edge stops.
    let headers = get(&setup.addr, "shop.localhost", "/headers").text();
    assert!(headers.contains("atoll-hops: 1\n"), "{headers}");
    // HTTP/2 carries the host as :authority; the origin still gets it as Host.
    let curl = std::process::Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "-H", "Host: shop.localhost"])
        .arg(format!("http://{}/headers", setup.addr))
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&curl.stdout);
    assert!(text.contains("host: shop.localhost\n"), "{text}");

    // An origin on the node's own port (its edge or admin listener) is refused.
    let dir = setup._dir.path().join("self");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("atoll.toml"),
        format!(
            "name = \"self\"\nroutes = [\"self.localhost\"]\norigins = [\"http://{}\"]\n",
            setup.addr
        ),
    )
    .unwrap();
    push_ok(&setup.url, &dir.join("atoll.toml"));
    wait_until("self is routed, and refused", || {
        http_get(&setup.addr, "self.localhost", "/").is_ok_and(|response| response.status == 502)
    });
}

#[test]
fn an_origin_stopped_under_load_fails_no_idempotent_request() {
    let setup = setup("");
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (addr, stop) = (setup.addr.clone(), Arc::clone(&stop));
            let (served, failed) = (Arc::clone(&served), Arc::clone(&failed));
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match http_get(&addr, "shop.localhost", "/whoami") {
                        Ok(response) if response.status == 200 => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            failures.push(format!("{:?}", other.map(|r| (r.status, r.text()))));
                        }
                    }
                }
                failures
            })
        })
        .collect();
    wait_until("load runs", || served.load(Ordering::Relaxed) > 200);
    setup.origins[0].stop();
    let at_stop = served.load(Ordering::Relaxed);
    wait_until("load goes on after the stop", || {
        served.load(Ordering::Relaxed) > at_stop + 500
    });
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    // The stopped origin was taken out (three failures in a row), not just retried around.
    let metrics = get(&setup.admin, "localhost", "/metrics").text();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("atoll_origin_ejections_total{function=\"shop\"}")),
        "{metrics}"
    );
    // The survivor answers everything now.
    let survivor = setup.origins[1].address.port().to_string();
    for _ in 0..20 {
        assert_eq!(get(&setup.addr, "shop.localhost", "/whoami").text(), survivor);
    }
}

#[test]
fn a_request_the_origin_may_have_received_is_retried_only_when_idempotent() {
    let setup = setup("");
    let count = || setup.origins.iter().map(TestOrigin::requests).sum::<usize>();
    // /drop reads the request and hangs up: the request was received.
    let before = count();
    for _ in 0..5 {
        let answer = http_request(&setup.addr, "POST", "shop.localhost", "/drop", &[], b"pay 10").unwrap();
        assert_eq!(answer.status, 502, "{}", answer.text());
    }
    assert_eq!(
        count() - before,
        5,
        "a POST that reached an origin is never sent again"
    );
    let before = count();
    for _ in 0..5 {
        let answer = http_request(&setup.addr, "PUT", "shop.localhost", "/drop", &[], b"x").unwrap();
        assert_eq!(answer.status, 502, "{}", answer.text());
    }
    assert_eq!(
        count() - before,
        10,
        "an idempotent request is tried once more, elsewhere"
    );
}

#[test]
fn a_websocket_passes_through_to_the_origin() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let setup = setup("");
    setup.runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(&setup.addr).await.unwrap();
        let mut request = format!("ws://{}/ws", setup.addr).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("host", "shop.localhost".parse().unwrap());
        let (mut socket, response) = tokio_tungstenite::client_async(request, stream).await.unwrap();
        assert_eq!(response.status(), 101);
        for text in ["hello", "through the edge", &"x".repeat(100_000)] {
            socket.send(Message::text(text)).await.unwrap();
            let echoed = tokio::time::timeout(Duration::from_secs(10), socket.next())
                .await
                .expect("an echo within 10 s")
                .unwrap()
                .unwrap();
            assert_eq!(echoed.into_text().unwrap().as_str(), text);
        }
        socket.close(None).await.unwrap();
    });
}

#[test]
fn a_function_reaches_its_own_origins_and_others_do_not() {
    let setup = setup("");
    let origin = setup.origins[1].url("");
    let write = |name: &str, origins: &str| {
        write_manifest(
            &setup._dir.path().join(name),
            name,
            &example_wasm("outbound"),
            &[&format!("{name}.localhost")],
            origins,
        )
    };
    push_ok(&setup.url, &write("front", &format!("origins = [{origin:?}]\n")));
    push_ok(&setup.url, &write("plain", ""));
    wait_until("front and plain are served", || {
        http_get(
            &setup.addr,
            "front.localhost",
            "/?url=http://origin.atoll.internal/whoami",
        )
        .is_ok_and(|response| response.status == 200)
            && http_get(&setup.addr, "plain.localhost", "/").is_ok_and(|response| response.status != 404)
    });
    let answer = get(
        &setup.addr,
        "front.localhost",
        "/?url=http://origin.atoll.internal/whoami",
    );
    assert!(
        answer
            .text()
            .ends_with(&format!("body={}", setup.origins[1].address.port())),
        "{}",
        answer.text()
    );
    let refused = get(
        &setup.addr,
        "plain.localhost",
        "/?url=http://origin.atoll.internal/whoami",
    );
    assert_eq!(refused.status, 502, "{}", refused.text());
}

#[test]
fn origins_are_checked_at_push_and_metadata_addresses_are_never_reached() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (_node, addr, _admin) = start_node(&url, &dir.path().join("node"));
    let write = |text: &str| {
        let path = dir.path().join("o/atoll.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    };
    let refused = push(
        &url,
        &write("name = \"o\"\nroutes = [\"o.localhost\"]\norigins = [\"10.0.0.5:3000\"]\n"),
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("must start with http:// or https://"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    push_ok(
        &url,
        &write("name = \"o\"\nroutes = [\"o.localhost\"]\norigins = [\"http://169.254.169.254\"]\n"),
    );
    // Routed (no more 404 or 503 while the node starts), it answers 502 at once: the guard
    // refuses the address before any connection.
    wait_until("o is routed", || {
        http_get(&addr, "o.localhost", "/latest/meta-data/").is_ok_and(|response| response.status == 502)
    });
    let started = std::time::Instant::now();
    let answer = get(&addr, "o.localhost", "/latest/meta-data/");
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no connection was tried"
    );
}

/// An origin that answers every request `200 ok` on a kept-alive connection (no
/// `Connection: close`), then closes a connection that stays idle for 100 ms, the way an
/// origin's keep-alive timeout does. Counts POSTs and closed connections.
struct IdleClosingOrigin {
    address: std::net::SocketAddr,
    posts: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl IdleClosingOrigin {
    fn start() -> IdleClosingOrigin {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let (posts, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (posts_seen, closes) = (Arc::clone(&posts), Arc::clone(&closed));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (posts_seen, closes) = (Arc::clone(&posts_seen), Arc::clone(&closes));
                std::thread::spawn(move || {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // A whole request: its head, then Content-Length bytes of body.
                        let complete = buffer.windows(4).position(|w| w == b"\r\n\r\n").and_then(|end| {
                            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|line| line.strip_prefix("content-length:"))
                                .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                            (buffer.len() >= end + 4 + length).then_some((end + 4 + length, head))
                        });
                        if let Some((used, head)) = complete {
                            if head.starts_with("post ") {
                                posts_seen.fetch_add(1, Ordering::SeqCst);
                            }
                            buffer.drain(..used);
                            if stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .is_err()
                            {
                                break;
                            }
                            continue;
                        }
                        // Idle between requests: 100 ms; within one, a reader's patience.
                        let wait = if buffer.is_empty() { 100 } else { 10_000 };
                        stream
                            .set_read_timeout(Some(Duration::from_millis(wait)))
                            .unwrap();
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    drop(stream);
                    closes.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        IdleClosingOrigin {
            address,
            posts,
            closed,
        }
    }
}

#[test]
fn connections_to_origins_are_kept_alive_and_a_closed_one_is_replaced() {
    let setup = setup("");
    let accepted = || {
        setup
            .origins
            .iter()
            .map(TestOrigin::connections_accepted)
            .sum::<usize>()
    };
    // One client, one request at a time: the same few connections serve them all (two
    // origins, and the health checks' own), small and streamed (1 MB) bodies alike.
    for _ in 0..40 {
        assert_eq!(
            get(&setup.addr, "shop.localhost", "/hello").text(),
            "hello from origin"
        );
    }
    let used = accepted();
    assert!(
        used <= 4,
        "{used} connections for 40 requests: they are not kept alive"
    );
    for _ in 0..5 {
        assert_eq!(
            get(&setup.addr, "shop.localhost", "/bytes?n=1000000").body.len(),
            1_000_000
        );
        for _ in 0..5 {
            assert_eq!(get(&setup.addr, "shop.localhost", "/hello").status, 200);
        }
    }
    let after_streams = accepted();
    assert!(
        after_streams <= used + 2,
        "{} new connections for 30 requests after streamed bodies: they are not put back",
        after_streams - used
    );
    // A client that leaves in the middle of a streamed body: the requests after it are
    // answered whole (a half-read connection put back would answer them with the rest).
    {
        use std::io::{Read, Write};
        let mut client = std::net::TcpStream::connect(&setup.addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client
            .write_all(b"GET /bytes?n=20000000 HTTP/1.1\r\nhost: shop.localhost\r\n\r\n")
            .unwrap();
        let mut some = [0u8; 65536];
        let mut read = 0;
        while read < 200_000 {
            let n = client.read(&mut some).expect("the body streams");
            assert!(n > 0, "the node closed after {read} bytes of a 20 MB body");
            read += n;
        }
    }
    for _ in 0..10 {
        assert_eq!(
            get(&setup.addr, "shop.localhost", "/hello").text(),
            "hello from origin"
        );
    }
    // An origin that ends a connection after its answer (`Connection: close`): every
    // request still gets through, on a new connection.
    for _ in 0..5 {
        assert_eq!(get(&setup.addr, "shop.localhost", "/close").text(), "closing");
        let echoed = http_request(
            &setup.addr,
            "POST",
            "shop.localhost",
            "/echo",
            &[],
            b"after close",
        )
        .unwrap();
        assert!(echoed.text().ends_with("body=after close"), "{}", echoed.text());
    }

    // An origin that closes idle connections itself: a POST after such a close goes out on
    // a new connection (the closed one is noticed before use), and reaches it exactly once.
    let origin = IdleClosingOrigin::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("atoll.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"idle\"\nroutes = [\"idle.localhost\"]\norigins = [\"http://{}\"]\n[origin]\nhealth_interval = \"1h\"\n",
            origin.address
        ),
    )
    .unwrap();
    push_ok(&setup.url, &manifest);
    wait_until("idle is served", || {
        http_get(&setup.addr, "idle.localhost", "/").is_ok_and(|response| response.status == 200)
    });
    for round in 1..=3 {
        let closed_before = origin.closed.load(Ordering::SeqCst);
        wait_until("the origin closes the idle connection", || {
            origin.closed.load(Ordering::SeqCst) > closed_before
        });
        let answer = http_request(&setup.addr, "POST", "idle.localhost", "/pay", &[], b"10").unwrap();
        assert_eq!(answer.status, 200, "round {round}: {}", answer.text());
        assert_eq!(answer.text(), "ok");
        assert_eq!(
            origin.posts.load(Ordering::SeqCst),
            round,
            "each POST reached the origin once"
        );
    }
}
