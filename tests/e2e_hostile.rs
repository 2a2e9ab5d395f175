//! One tenant's bad deployment and one client's bad manners, end to end: a version no node
//! can load is quarantined while every other function keeps being served, a registry that
//! sends the wrong module gets nothing loaded, and clients that trickle request bodies are
//! cut off instead of holding connections.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// A WCGI module whose init grows memory by `grow_pages` 64 KiB pages (trapping if it
/// cannot) and whose requests answer `body`.
fn init_module(grow_pages: u32, body: &str) -> Vec<u8> {
    let bytes = format!("Status: 200\nContent-Type: text/plain\n\n{body}");
    let length = bytes.len();
    let response: String = bytes.bytes().map(|byte| format!("\\{byte:02x}")).collect();
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "{response}")
          (func (export "atoll_init")
            (if (i32.eq (memory.grow (i32.const {grow_pages})) (i32.const -1)) (then unreachable)))
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 100))
            (i32.store (i32.const 4) (i32.const {length}))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    );
    wat::parse_str(wat).unwrap()
}

fn write_function(dir: &Path, name: &str, wasm: &[u8], extra: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    let module = dir.join(name).join(format!("{name}.wasm"));
    std::fs::write(&module, wasm).unwrap();
    write_manifest(
        &dir.join(name),
        name,
        &module,
        &[&format!("{name}.localhost")],
        extra,
    )
}

#[test]
fn a_version_no_node_can_load_is_quarantined_and_the_rest_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    // The operator caps memory at 64 MiB on this node; the registry allows 256 MiB.
    let node = start_edge_node(
        &url,
        &dir.path().join("node"),
        &["--max-function-memory", "64MiB"],
    );
    let http = node.http.clone().unwrap();
    wait_ready(&node.admin);

    // Init grows to 129 MiB: fine at the registry, impossible on this node.
    let bomb = write_function(
        dir.path(),
        "bomb",
        &init_module(2063, "bomb v1\n"),
        "[limits]\nmemory = \"256MiB\"\n",
    );
    push_ok(&url, &bomb);
    // Pushed after the bomb: a node that stops at the bomb never serves it.
    push_ok(&url, &example("hello"));
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));
    assert_eq!(get(&http, "bomb.localhost", "/").status, 404);

    // 503 also means "still loading": wait for the quarantine itself.
    let sync = wait_for_body(
        &node.admin,
        "admin",
        "/sync",
        |r| r.status == 503 && r.text().contains("\"quarantined\":[{"),
        STARTUP,
    );
    let report: serde_json::Value = serde_json::from_str(&sync.text()).unwrap();
    assert_eq!(report["quarantined"][0]["function"], "bomb", "{report}");
    assert_eq!(report["quarantined"][0]["version"], 1, "{report}");
    let reason = report["quarantined"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("init function") && reason.contains("trapped"),
        "{reason}"
    );
    let ready = get(&node.admin, "admin", "/readyz");
    assert_eq!(ready.status, 200, "the node still serves everything else");
    assert!(
        ready.text().contains("degraded: 1 quarantined"),
        "{}",
        ready.text()
    );
    assert_eq!(
        metric_value(&metrics(&node.admin), "atoll_sync_quarantined", &[]),
        Some(1.0)
    );
    // The operator sees it in `atoll nodes` too (the node's heartbeat carries it).
    wait_until("atoll nodes shows the quarantined version", || {
        let output = atoll(&["nodes", "--registry", &url]);
        stdout(&output)
            .lines()
            .any(|line| line.starts_with("e2e ") && line.contains("q=1"))
    });

    // A version that fits replaces the quarantined one, and the node is in sync again.
    let fixed = write_function(
        dir.path(),
        "bomb",
        &init_module(16, "bomb v2\n"),
        "[limits]\nmemory = \"256MiB\"\n",
    );
    push_ok(&url, &fixed);
    wait_for_text(&http, "bomb.localhost", "/", "bomb v2\n");
    let sync = wait_for_body(&node.admin, "admin", "/sync", |r| r.status == 200, STARTUP);
    let report: serde_json::Value = serde_json::from_str(&sync.text()).unwrap();
    assert_eq!(report["quarantined"], serde_json::json!([]), "{report}");
    assert_eq!(report["lag"], 0, "{report}");
}

#[test]
fn a_looping_start_function_with_reserved_instances_stops_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    // Instantiating this module never returns on its own: its (start) function spins.
    let spinner = wat::parse_str(
        r#"(module
          (memory (export "memory") 1)
          (func $spin (loop $forever (br $forever)))
          (start $spin)
          (func (export "_start")))"#,
    )
    .unwrap();
    let manifest = write_function(
        dir.path(),
        "spinner",
        &spinner,
        "[limits]\ntimeout = \"500ms\"\n[scale]\nmin_instances = 1\n",
    );
    push_ok(&cluster.url, &manifest);
    // Pushed after it: served although the spinner's reserved instance cannot be made.
    push_ok(&cluster.url, &example("hello"));
    wait_for_text(
        &cluster.http,
        "hello.localhost",
        "/",
        &hello_body("hello.localhost"),
    );
    // The spinner's requests end at its timeout, and the node goes on serving.
    let spinner_served = wait_for_body(
        &cluster.http,
        "spinner.localhost",
        "/",
        |r| r.status != 404,
        STARTUP,
    );
    assert_eq!(spinner_served.status, 504, "{}", spinner_served.text());
    let started = Instant::now();
    assert_eq!(get(&cluster.http, "spinner.localhost", "/").status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(get(&cluster.http, "hello.localhost", "/").status, 200);
}

/// A registry in front of the real one that answers `/v1/blobs/{sha}` for `target_sha` with
/// `substitute` (another valid module) and passes everything else through.
fn lying_registry(upstream: String, target_sha: String, substitute: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let upstream = upstream.clone();
            let target = format!("/v1/blobs/{target_sha}");
            let substitute = substitute.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split(' ').nth(1).unwrap_or("").to_string();
                if path == target {
                    let _ = client.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            substitute.len()
                        )
                        .as_bytes(),
                    );
                    let _ = client.write_all(&substitute);
                    return;
                }
                // One request per connection, so every blob request is seen here.
                let head = text.replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
                let Ok(mut server) = TcpStream::connect(url_addr(&upstream)) else {
                    return;
                };
                if server.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let (mut client_reader, mut server_writer) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_reader, &mut server_writer);
                });
                let _ = std::io::copy(&mut server, &mut client);
            });
        }
    });
    format!("http://{address}")
}

#[test]
fn a_registry_that_sends_another_module_gets_nothing_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let echo = std::fs::read(example_wasm("echo")).unwrap();
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    let echo_sha = atoll_core::digest::sha256_hex(&echo);
    let liar = lying_registry(url.clone(), echo_sha.clone(), hello.clone());
    let node = start_edge_node(&liar, &dir.path().join("node"), &[]);
    let http = node.http.clone().unwrap();

    push_ok(&url, &example("echo"));
    push_ok(&url, &example("hello"));
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));
    let sync = wait_for_body(
        &node.admin,
        "admin",
        "/sync",
        |r| r.status == 503 && r.text().contains("does not match its digest"),
        STARTUP,
    );
    assert!(
        sync.text().contains("does not match its digest"),
        "{}",
        sync.text()
    );
    // Not served: neither echo nor hello's bytes under echo's name.
    let response = get(&http, "echo.localhost", "/");
    assert_eq!(response.status, 404, "{}", response.text());
    // Not cached either.
    let cached = dir
        .path()
        .join("node")
        .join("modules")
        .join(format!("{echo_sha}.wasm"));
    assert!(!cached.exists(), "{} was cached", cached.display());
}

/// Opens a connection that announces a 1000-byte body and sends one byte of it.
fn trickling_client(http: &str) -> TcpStream {
    let mut stream = TcpStream::connect(http).unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 1000\r\n\r\nx")
        .unwrap();
    stream
}

#[test]
fn clients_that_stall_their_body_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let node = start_edge_node(
        &url,
        &dir.path().join("node"),
        &["--max-connections", "4", "--body-timeout", "1s"],
    );
    let http = node.http.clone().unwrap();
    push_ok(&url, &example("echo"));
    wait_for_body(&http, "echo.localhost", "/", |r| r.status == 200, STARTUP);

    // Four connections take every slot, each stalled one byte into its body.
    let started = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..4).map(|_| trickling_client(&http)).collect();
    for stream in &mut stalled {
        stream.set_read_timeout(Some(STARTUP)).unwrap();
        let mut answer = Vec::new();
        // The node answers 408 and closes: read to the end (a timeout here is a failure).
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "stalled clients held on for {took:?}"
    );
    // The slots are free again for a client that sends its body.
    let response = http_request(&http, "POST", "echo.localhost", "/", &[], b"a whole body").unwrap();
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_that_stall_their_body_are_answered_408() {
    let data = tempfile::tempdir().unwrap();
    let (registry, node) = tokio::task::spawn_blocking({
        let data = data.path().to_path_buf();
        move || {
            let (registry, registry_url) = start_registry(&data.join("registry"));
            let node = start_edge_node(
                &registry_url,
                &data.join("node"),
                &["--body-timeout", "1s", "--idle-timeout", "3s"],
            );
            push_ok(&registry_url, &example("echo"));
            let http = node.http.clone().unwrap();
            wait_for_body(&http, "echo.localhost", "/", |r| r.status == 200, STARTUP);
            (registry, node)
        }
    })
    .await
    .unwrap();
    let http = node.http.clone().unwrap();
    let tcp = tokio::net::TcpStream::connect(&http).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut responses = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let mut client = client.clone().ready().await.unwrap();
        let request = http::Request::post("http://echo.localhost/")
            .header("content-length", "1000")
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(bytes::Bytes::from_static(b"x"), false).unwrap();
        responses.push(response);
        bodies.push(body);
    }
    for response in responses {
        let response = tokio::time::timeout(STARTUP, response)
            .await
            .expect("a stalled stream got no answer")
            .unwrap();
        assert_eq!(response.status(), 408);
    }
    // With every stream answered, the idle connection is closed by the node.
    drop(client);
    tokio::time::timeout(STARTUP, connection)
        .await
        .expect("the connection outlived its idle timeout")
        .unwrap()
        .ok();
    drop((registry, node, bodies));
}
