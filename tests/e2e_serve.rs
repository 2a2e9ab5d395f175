//! Push → serve: the happy path through registry, node and guest, with real processes.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// `examples/hello` pushed to a registry is served by a node following it; the node is ready
/// and counts the request in its metrics.
#[test]
fn push_then_serve_hello() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (_node, http, admin) = start_node(&url, &dir.path().join("node"));

    assert_eq!(push_ok(&url, &example("hello")), 1);
    let response = wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{:?}",
        response.headers
    );

    let ready = get(&admin, "admin", "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let health = get(&admin, "admin", "/healthz");
    assert_eq!(health.status, 200);

    let metrics = metrics(&admin);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"atoll_requests_total{function="hello",version="1",status="200"} "#)),
        "no request counter for hello in /metrics:\n{metrics}"
    );
    assert!(
        metrics.contains(r#"atoll_instance_starts_total{function="hello",when="#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"atoll_module_loads_total{kind="compile"}"#),
        "{metrics}"
    );

    let listed = ls(&url);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("hello ") && l.contains("v1") && l.contains("hello.localhost")),
        "{listed}"
    );
}

/// The echo guest sees method, raw and decoded path, the path relative to the matched route
/// prefix, the query, request headers, the manifest's env and the body.
#[test]
fn echo_reflects_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (_node, http, _admin) = start_node(&url, &dir.path().join("node"));
    push_ok(&url, &example("echo"));
    wait_for_body(
        &http,
        "echo.localhost",
        "/",
        |r| r.status == 200 && r.text().contains("REQUEST_METHOD=GET"),
        STARTUP,
    );

    let body = b"line one\nline two=2\n";
    let response = http_request(
        &http,
        "POST",
        "api.localhost",
        "/echo/sub%20dir?x=1&y=two",
        &[("X-Custom", "abc"), ("Content-Type", "text/plain")],
        body,
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-echo"), Some("1"));
    let fields = echo_fields(&response.text());
    let expect = [
        ("REQUEST_METHOD", "POST"),
        ("PATH_INFO", "/echo/sub dir"),
        ("X_RAW_PATH_INFO", "/echo/sub%20dir"),
        ("X_RELATIVE_PATH", "/sub%20dir"),
        ("QUERY_STRING", "x=1&y=two"),
        ("HTTP_X_CUSTOM", "abc"),
        ("X_MATCHED_ROUTE", "api.localhost/echo"),
        ("SERVER_NAME", "api.localhost"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("CONTENT_TYPE", "text/plain"),
        ("CONTENT_LENGTH", "20"),
        ("GREETING", "hi"),
        ("BODY_LENGTH", "20"),
    ];
    for (key, value) in expect {
        assert_eq!(
            fields.get(key).map(String::as_str),
            Some(value),
            "{key} in:\n{}",
            response.text()
        );
    }
    assert_eq!(fields["BODY"].as_bytes(), body);

    // A wildcard host: `*.echo.localhost`.
    let response = get(&http, "a.echo.localhost", "/x");
    assert_eq!(response.status, 200, "{}", response.text());
    let fields = echo_fields(&response.text());
    assert_eq!(fields["SERVER_NAME"], "a.echo.localhost");
    assert_eq!(fields["X_MATCHED_ROUTE"], "*.echo.localhost");
    assert_eq!(fields["PATH_INFO"], "/x");

    // The prefix route does not capture other paths on the same host.
    let response = get(&http, "api.localhost", "/other");
    assert_eq!(response.status, 404, "{}", response.text());

    // HTTP/2 with prior knowledge: the host comes from the :authority.
    let addr: std::net::SocketAddr = http.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .resolve("b.echo.localhost", addr)
            .build()
            .unwrap();
        let response = client
            .get(format!("http://b.echo.localhost:{}/h2?q=1", addr.port()))
            .header("X-Custom", "h2")
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    });
    let fields = echo_fields(&text);
    assert_eq!(fields["SERVER_PROTOCOL"], "HTTP/2.0", "{text}");
    assert_eq!(fields["SERVER_NAME"], "b.echo.localhost", "{text}");
    assert_eq!(fields["QUERY_STRING"], "q=1", "{text}");
    assert_eq!(fields["HTTP_X_CUSTOM"], "h2", "{text}");
}

/// A registry and a node serving `app`, whose v1 is the hello module and v2 (active) the echo
/// module, on the same route `app.localhost`.
struct App {
    _dir: tempfile::TempDir,
    _registry: Process,
    _node: Process,
    url: String,
    http: String,
}

/// Sets up [`App`]; also returns how long v2 took to be served after its push returned.
fn app_with_two_versions() -> (App, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let (registry, url) = start_registry(&dir.path().join("registry"));
    let (node, http, _admin) = start_node(&url, &dir.path().join("node"));
    let v1 = write_manifest(
        &dir.path().join("v1"),
        "app",
        &example_wasm("hello"),
        &["app.localhost"],
        "[env]\nGREETING = \"Hello\"\n",
    );
    let v2 = write_manifest(
        &dir.path().join("v2"),
        "app",
        &example_wasm("echo"),
        &["app.localhost"],
        "[env]\nGREETING = \"v2\"\n",
    );
    assert_eq!(push_ok(&url, &v1), 1);
    wait_for_text(&http, "app.localhost", "/", &hello_body("app.localhost"));

    assert_eq!(push_ok(&url, &v2), 2);
    let pushed = Instant::now();
    wait_for_body(
        &http,
        "app.localhost",
        "/",
        |r| r.status == 200 && r.text().contains("GREETING=v2"),
        STARTUP,
    );
    let elapsed = pushed.elapsed();
    (
        App {
            _dir: dir,
            _registry: registry,
            _node: node,
            url,
            http,
        },
        elapsed,
    )
}

/// A new version is served shortly after its push returns.
#[test]
fn push_v2_is_served_promptly() {
    let (app, elapsed) = app_with_two_versions();
    eprintln!("push v2 → served: {:.1} ms", elapsed.as_secs_f64() * 1000.0);
    assert!(
        elapsed < Duration::from_secs(20),
        "v2 took {elapsed:?} to be served after its push returned"
    );
    // Every request now goes to v2: no straggler answers from v1.
    for _ in 0..5 {
        let response = get(&app.http, "app.localhost", "/");
        assert!(response.text().contains("GREETING=v2"), "{}", response.text());
    }
}

/// `rollback` (default: the previous version) serves v1 again; `--to v2` serves v2; the
/// versions table marks the active one.
#[test]
fn rollback_serves_the_previous_version() {
    let (app, _) = app_with_two_versions();
    let url = &app.url;

    let rows = parse_versions(&versions(url, "app"));
    assert_eq!(
        rows.iter().map(|r| (r.version, r.active)).collect::<Vec<_>>(),
        [(1, false), (2, true)],
        "{rows:?}"
    );

    let out = expect_success("rollback", &atoll(&["rollback", "app", "--registry", url]));
    assert!(out.starts_with("app v1 sha256:"), "{out}");
    assert_eq!(out.trim(), format!("app v1 sha256:{}", rows[0].sha256));
    wait_for_text(&app.http, "app.localhost", "/", &hello_body("app.localhost"));
    let rows = parse_versions(&versions(url, "app"));
    assert_eq!(
        rows.iter().map(|r| (r.version, r.active)).collect::<Vec<_>>(),
        [(1, true), (2, false)],
        "{rows:?}"
    );

    // Nothing before v1: refused, nothing changes.
    let refused = atoll(&["rollback", "app", "--registry", url]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("409"), "{}", stderr(&refused));

    let out = expect_success(
        "rollback --to v2",
        &atoll(&["rollback", "app", "--to", "v2", "--registry", url]),
    );
    assert_eq!(out.trim(), format!("app v2 sha256:{}", rows[1].sha256));
    wait_for_body(
        &app.http,
        "app.localhost",
        "/",
        |r| r.status == 200 && r.text().contains("GREETING=v2"),
        STARTUP,
    );
    let rows = parse_versions(&versions(url, "app"));
    assert_eq!(
        rows.iter().map(|r| (r.version, r.active)).collect::<Vec<_>>(),
        [(1, false), (2, true)],
        "{rows:?}"
    );

    // Unknown version: refused with a reason.
    let refused = atoll(&["rollback", "app", "--to", "v9", "--registry", url]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("v9"), "{}", stderr(&refused));
}

/// A host no function is routed for answers 404 naming the host.
#[test]
fn unknown_host_is_404_naming_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (_node, http, admin) = start_node(&url, &dir.path().join("node"));
    push_ok(&url, &example("hello"));
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));
    wait_ready(&admin);

    let response = get(&http, "x.localhost", "/");
    assert_eq!(response.status, 404, "{}", response.text());
    assert!(
        response
            .text()
            .contains("no function is routed for host `x.localhost`"),
        "{}",
        response.text()
    );
    // With a port in the Host header, the host is still named (without the port).
    let response = get(&http, "nope.example.com:8080", "/path");
    assert_eq!(response.status, 404);
    assert!(
        response.text().contains("`nope.example.com`"),
        "{}",
        response.text()
    );
    let metrics = metrics(&admin);
    assert!(
        metrics.contains(r#"atoll_requests_total{function="-",status="404"}"#),
        "{metrics}"
    );
}
