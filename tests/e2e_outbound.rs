//! Outbound HTTP through a real node: the WAGI guest crate (`wasi-experimental-http`, in
//! examples/outbound) runs unchanged against a local HTTPS origin whose CA the operator
//! gave with `--outbound-ca`; the allow-list and SSRF guard refuse with a clear error in
//! the function's log; and a guest waiting on the network holds up no other function.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_testkit::origin::{TestCa, TestOrigin};
use support::*;

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The outbound example's query for a call to `url`.
fn call(url: &str, extra: &str) -> String {
    format!("/?url={}{extra}", percent_encode(url))
}

struct Setup {
    _runtime: tokio::runtime::Runtime,
    origin: TestOrigin,
    _registry: Process,
    node: EdgeNode,
    registry_url: String,
}

impl Setup {
    fn http(&self) -> &str {
        self.node.http.as_deref().expect("cleartext listener")
    }
}

/// An HTTPS origin with its own CA, a registry, and a node that trusts that CA.
fn setup(dir: &Path) -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = TestCa::new();
    let origin = runtime.block_on(TestOrigin::https(&ca));
    let ca_file = dir.join("origin-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (registry, registry_url) = start_registry(&dir.join("registry"));
    let node = start_edge_node(
        &registry_url,
        &dir.join("node"),
        &["--outbound-ca", ca_file.to_str().unwrap()],
    );
    Setup {
        _runtime: runtime,
        origin,
        _registry: registry,
        node,
        registry_url,
    }
}

fn push_outbound(setup: &Setup, dir: &Path, name: &str, host: &str, outbound: &str) {
    let manifest = write_manifest(
        &dir.join(name),
        name,
        &example_wasm("outbound"),
        &[host],
        &format!("[outbound]\n{outbound}\n"),
    );
    push_ok(&setup.registry_url, &manifest);
    // Without a url the guest answers 400 and calls nothing: it is served.
    wait_until(&format!("{name} is served"), || {
        http_get(setup.http(), host, "/").is_ok_and(|response| response.status == 400)
    });
}

#[test]
fn a_wagi_module_calls_an_allowed_https_origin_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let origin_host = format!("https://localhost:{}", setup.origin.address.port());
    push_outbound(
        &setup,
        dir.path(),
        "caller",
        "caller.localhost",
        &format!("allowed_hosts = [\"{origin_host}\"]"),
    );

    let response = get(
        setup.http(),
        "caller.localhost",
        &call(&setup.origin.url("/hello"), ""),
    );
    let body = response.text();
    assert_eq!(response.status, 200, "{body}");
    assert!(body.contains("status=200\n"), "{body}");
    assert!(body.contains("content-type=text/plain\n"), "{body}");
    assert!(body.contains("header x-multi: b\n"), "{body}");
    assert!(body.ends_with("body=hello from origin"), "{body}");

    // A POST with a body and a header, and several calls in one request.
    let response = http_request(
        setup.http(),
        "POST",
        "caller.localhost",
        &call(
            &setup.origin.url("/echo"),
            "&method=POST&count=3&header=x-from%3Aatoll",
        ),
        &[],
        b"sent along",
    )
    .unwrap();
    let body = response.text();
    assert_eq!(response.status, 200, "{body}");
    assert!(body.starts_with("calls=3\n"), "{body}");
    // The chain's length goes along (a request from outside is 0; this call is the 1st).
    assert!(
        body.contains("method=POST\nheader atoll-hops=1\nheader x-from=atoll\nbody=sent along"),
        "{body}"
    );
}

#[test]
fn refused_calls_are_errors_in_the_functions_log_and_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let port = setup.origin.address.port();
    // A wildcard: public hosts only.
    push_outbound(
        &setup,
        dir.path(),
        "wild",
        "wild.localhost",
        "allowed_hosts = [\"*://*:*\"]\nmax_requests = 2",
    );
    let response = get(
        setup.http(),
        "wild.localhost",
        &call(&setup.origin.url("/hello"), ""),
    );
    assert_eq!(response.status, 502);
    // The guest crate reports the ABI's code: 7, DESTINATION_NOT_ALLOWED.
    assert!(
        response.text().contains("error=Wasi error 7"),
        "{}",
        response.text()
    );
    let log = "localhost resolves only to internal addresses";
    wait_until("the refusal is in the node's log", || {
        setup.node.process.logs().contains(log)
    });

    // Not listed at all.
    push_outbound(
        &setup,
        dir.path(),
        "narrow",
        "narrow.localhost",
        &format!("allowed_hosts = [\"https://localhost:{port}\"]\nmax_requests = 2"),
    );
    let elsewhere = format!("http://127.0.0.1:{port}/hello");
    let response = get(setup.http(), "narrow.localhost", &call(&elsewhere, ""));
    assert_eq!(response.status, 502);
    assert!(
        response.text().contains("error=Wasi error 7"),
        "{}",
        response.text()
    );
    let log = format!("http://127.0.0.1:{port} is not in [outbound] allowed_hosts");
    wait_until("the refusal is in the node's log", || {
        setup.node.process.logs().contains(&log)
    });

    // Two calls are allowed per request; the third is refused.
    let response = get(
        setup.http(),
        "narrow.localhost",
        &call(&setup.origin.url("/hello"), "&count=2"),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let response = get(
        setup.http(),
        "narrow.localhost",
        &call(&setup.origin.url("/hello"), "&count=3"),
    );
    assert_eq!(response.status, 502);
    assert!(
        response.text().starts_with("calls=2\nerror=Wasi error 13"),
        "{}",
        response.text()
    );
    wait_until("the limit is in the node's log", || {
        setup.node.process.logs().contains("made 2 calls, the limit")
    });
}

#[test]
fn a_guest_waiting_on_the_network_holds_up_no_other_function() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    let origin_host = format!("https://localhost:{}", setup.origin.address.port());
    push_outbound(
        &setup,
        dir.path(),
        "waiter",
        "waiter.localhost",
        &format!("allowed_hosts = [\"{origin_host}\"]"),
    );
    push_ok(&setup.registry_url, &example("hello"));
    wait_for_text(
        setup.http(),
        "hello.localhost",
        "/",
        &hello_body("hello.localhost"),
    );

    // More waiting guests than cores, each on an outbound call that takes 4 s.
    let waits = 2 * std::thread::available_parallelism().map_or(2, |cores| cores.get());
    let started = Instant::now();
    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let waiting: Vec<_> = (0..waits)
        .map(|_| {
            let http = setup.http().to_string();
            let path = call(&setup.origin.url("/delay?ms=4000"), "");
            let finished = Arc::clone(&finished);
            std::thread::spawn(move || {
                let response = get(&http, "waiter.localhost", &path);
                finished.lock().unwrap().push(started.elapsed());
                response
            })
        })
        .collect();
    wait_until("every waiting guest has called out", || {
        setup.origin.requests() >= waits
    });
    // Meanwhile hello answers, over and over, before any wait is over.
    for _ in 0..50 {
        let response = get(setup.http(), "hello.localhost", "/");
        assert_eq!(response.status, 200);
    }
    let hellos_done = started.elapsed();
    assert!(
        finished.lock().unwrap().is_empty(),
        "hello waited for the outbound calls: 50 answers took {hellos_done:?}"
    );
    for waiter in waiting {
        let response = waiter.join().unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(response.text().ends_with("body=delayed"), "{}", response.text());
    }
    assert!(started.elapsed() >= Duration::from_secs(4));
}

#[test]
fn service_bindings_call_functions_in_process_with_a_depth_limit_and_the_callers_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path());
    push_ok(&setup.registry_url, &example("echo"));
    wait_until("echo is served", || {
        http_get(setup.http(), "echo.localhost", "/").is_ok_and(|response| response.status == 200)
    });
    let fault = write_manifest(
        &dir.path().join("fault"),
        "fault",
        &example_wasm("fault"),
        &["fault.localhost"],
        "[limits]\ntimeout = \"60s\"\n[scale]\nmax_concurrency = 1\n",
    );
    push_ok(&setup.registry_url, &fault);
    wait_for_text(setup.http(), "fault.localhost", "/", "ok\n");
    push_outbound(
        &setup,
        dir.path(),
        "caller",
        "caller.localhost",
        "[services]\nECHO = \"echo\"\nSLOW = \"fault\"\n[limits]\ntimeout = \"2s\"",
    );

    // Through the binding's environment variable, with a method, a body and a query.
    let response = http_request(
        setup.http(),
        "POST",
        "caller.localhost",
        "/?service=ECHO&path=%2Fitems%3Fdone%3D1&method=PUT&header=x-from%3Acaller",
        &[],
        b"an item",
    )
    .unwrap();
    let body = response.text();
    assert_eq!(response.status, 200, "{body}");
    for line in [
        "status=200\n",
        "REQUEST_METHOD=PUT\n",
        "PATH_INFO=/items\n",
        "QUERY_STRING=done=1\n",
        "SERVER_NAME=echo.atoll.internal\n",
        "HTTP_X_FROM=caller\n",
        "BODY=an item",
    ] {
        assert!(body.contains(line), "{line:?} missing from {body}");
    }

    // A function it does not bind is refused, and never looked up in DNS.
    let response = get(
        setup.http(),
        "caller.localhost",
        &call("http://hello.atoll.internal/", ""),
    );
    assert_eq!(response.status, 502);
    assert!(
        response.text().contains("error=Wasi error 7"),
        "{}",
        response.text()
    );
    wait_until("the refusal is in the node's log", || {
        setup
            .node
            .process
            .logs()
            .contains("no [services] binding names function \"hello\"")
    });

    // The callee loops; it is stopped by the caller's 2 s deadline, not its own 60 s.
    let started = Instant::now();
    let response = get(setup.http(), "caller.localhost", "/?service=SLOW&path=%2Floop");
    let took = started.elapsed();
    assert_eq!(response.status, 504, "{}", response.text());
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Its one slot is free again: the callee was stopped, not left to run its 60 s.
    let started = Instant::now();
    let response = get(setup.http(), "fault.localhost", "/");
    assert_eq!((response.status, response.text().as_str()), (200, "ok\n"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the callee ran past the caller's deadline: {:?}",
        started.elapsed()
    );

    // A function bound to itself calls itself until the depth limit refuses the next call.
    push_outbound(
        &setup,
        dir.path(),
        "looper",
        "looper.localhost",
        "[services]\nSELF = \"looper\"",
    );
    let response = get(setup.http(), "looper.localhost", "/?service=SELF");
    let body = response.text();
    assert_eq!(response.status, 200, "{body}");
    assert!(body.contains("error=Wasi error 11"), "{body}");
    assert_eq!(body.matches("status=200").count(), 7, "{body}");
    // A request that says it is already 5 calls deep (from a function elsewhere) has 3
    // left; one past the limit is refused outright.
    let deep = http_request(
        setup.http(),
        "GET",
        "looper.localhost",
        "/?service=SELF",
        &[("atoll-hops", "5")],
        b"",
    )
    .unwrap();
    assert_eq!(deep.text().matches("status=200").count(), 2, "{}", deep.text());
    let looped = http_request(
        setup.http(),
        "GET",
        "looper.localhost",
        "/?service=SELF",
        &[("atoll-hops", "9")],
        b"",
    )
    .unwrap();
    assert_eq!(looped.status, 508, "{}", looped.text());
    wait_until("the depth limit is in the node's log", || {
        setup
            .node
            .process
            .logs()
            .contains("the chain of service calls is 8 deep, the limit")
    });
}
