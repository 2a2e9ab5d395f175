//! HTTP/3 end to end: a node with `--tls-listen` also serves QUIC on the same port, and
//! clients nobody here wrote get what curl gets over HTTP/2. The HTTP/3 clients are aioquic
//! (`tests/h3_client.py`, in the venv `scripts/test` creates) and the quinn + h3 load client
//! of `atoll-bench` (`bench/src/h3_load.rs`, included by path). Covered: same status, body
//! and headers as HTTP/2 and the Alt-Svc that announces HTTP/3, request bodies (and the 413
//! over the limit), address validation with Retry, the 421 for a host the connection's
//! certificate does not cover, a HEADERS frame too large to buffer, 2000 requests under concurrency without a failure, and a
//! SIGTERM that lets in-flight requests finish.

mod support;

#[allow(dead_code)]
#[path = "../bench/src/h3_load.rs"]
mod h3_load;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use serde_json::Value;
use support::*;

/// A self-signed certificate for `names`, written as `dir/STEM.crt` + `.key`; returns the
/// certificate's path and DER (the trust anchor for clients).
fn write_certificate(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, CertificateDer<'static>) {
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names).expect("generate a certificate");
    std::fs::write(
        dir.join(format!("{stem}.key")),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let path = dir.join(format!("{stem}.crt"));
    std::fs::write(&path, certified.cert.pem()).unwrap();
    (path, certified.cert.der().clone())
}

/// The venv's Python with aioquic (`scripts/test` creates it).
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test once, it creates the venv with aioquic 1.7.2 \
         (python3 -m venv target/test-venv && target/test-venv/bin/pip install aioquic==1.7.2)",
        python.display()
    );
    python
}

/// `tests/h3_client.py` with `args`, as a command (for tests that run it in the background).
fn h3_client_command(args: &[&str]) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h3_client.py");
    let mut command = Command::new(python());
    command
        .arg(script)
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// What `h3_client.py --json` reported.
#[derive(Debug)]
struct H3Report {
    json: Value,
    stderr: String,
}

impl H3Report {
    fn from_output(output: std::process::Output) -> H3Report {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let json = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|error| panic!("h3_client.py printed no JSON ({error}):\n{stdout}\n{stderr}"));
        H3Report { json, stderr }
    }

    fn status(&self) -> Option<u64> {
        self.json["status"].as_u64()
    }

    fn body(&self) -> &str {
        self.json["body"].as_str().unwrap_or("")
    }

    fn failures(&self) -> u64 {
        self.json["failures"].as_u64().expect("failures")
    }

    fn count(&self, status: u16) -> u64 {
        self.json["statuses"][status.to_string()].as_u64().unwrap_or(0)
    }

    /// The first response's header `name` (lower case).
    fn header(&self, name: &str) -> Option<&str> {
        self.json["headers"]
            .as_array()?
            .iter()
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair[1].as_str())
    }
}

/// The node's HTTP/3 port and the trust anchor for its certificate: what every client needs.
struct Target<'a> {
    port: u16,
    ca: &'a Path,
}

/// aioquic to `https://HOST:PORT/PATH` on 127.0.0.1, SNI `server_name` (default: `host`).
fn aioquic(target: &Target, host: &str, path: &str, server_name: Option<&str>, extra: &[&str]) -> H3Report {
    let url = format!("https://{host}:{}{path}", target.port);
    let mut args = vec![
        url.as_str(),
        "--ca-file",
        target.ca.to_str().unwrap(),
        "--connect-host",
        "127.0.0.1",
    ];
    if let Some(server_name) = server_name {
        args.extend(["--server-name", server_name]);
    }
    args.extend_from_slice(extra);
    let output = h3_client_command(&args).output().expect("run h3_client.py");
    H3Report::from_output(output)
}

/// curl over HTTP/2 to `https://HOST:PORT/PATH` on 127.0.0.1, trusting `ca`.
fn curl_h2(https: &str, host: &str, path: &str, ca: &Path) -> CurlResult {
    curl_https(https, host, path, ca, &["--http2"])
}

/// A registry and a node with TLS (and so HTTP/3) over the certificates in `certs`.
struct H3Setup {
    _registry: Process,
    registry_url: String,
    node: EdgeNode,
    /// The node's HTTP/3 address, `127.0.0.1:PORT`.
    h3: SocketAddr,
    data: tempfile::TempDir,
}

impl H3Setup {
    /// Boots a node with `--tls-listen 127.0.0.1:0 --certs DIR` plus `extra`; `certificates`
    /// are (stem, names) pairs written into DIR first.
    fn boot(
        certificates: &[(&str, &[&str])],
        extra: &[&str],
    ) -> (H3Setup, Vec<(PathBuf, CertificateDer<'static>)>) {
        let data = tempfile::tempdir().unwrap();
        let certs = data.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let written = certificates
            .iter()
            .map(|(stem, names)| write_certificate(&certs, stem, names))
            .collect();
        let (registry, registry_url) = start_registry(&data.path().join("registry"));
        let mut flags = vec!["--tls-listen", "127.0.0.1:0", "--certs", certs.to_str().unwrap()];
        flags.extend_from_slice(extra);
        let node = start_edge_node(&registry_url, &data.path().join("node"), &flags);
        let h3 = node
            .h3
            .as_deref()
            .unwrap_or_else(|| panic!("the node printed no h3:// address\n{}", node.process.logs()))
            .parse()
            .expect("h3 address");
        let setup = H3Setup {
            _registry: registry,
            registry_url,
            node,
            h3,
            data,
        };
        (setup, written)
    }

    fn target<'a>(&self, ca: &'a Path) -> Target<'a> {
        Target {
            port: self.h3.port(),
            ca,
        }
    }

    /// Pushes a function running `example_wasm(module)` on `routes`.
    fn push(&self, name: &str, module: &str, routes: &[&str]) {
        let dir = self.data.path().join("functions").join(name);
        let manifest = write_manifest(&dir, name, &example_wasm(module), routes, "");
        push_ok(&self.registry_url, &manifest);
    }

    /// Polls over HTTP/3 until `host` answers 200.
    fn wait_served(&self, host: &str, ca: &Path) {
        let target = self.target(ca);
        wait_until(&format!("{host} served over HTTP/3"), || {
            aioquic(&target, host, "/", None, &[]).status() == Some(200)
        });
    }
}

fn metric(admin: &str, name: &str) -> f64 {
    metric_value(&metrics(admin), name, &[]).unwrap_or(0.0)
}

#[test]
fn aioquic_over_http3_gets_what_curl_gets_over_http2() {
    let (setup, certs) = H3Setup::boot(
        &[("hello.localhost", &["hello.localhost", "echo.localhost"])],
        &["--max-body-bytes", "4096"],
    );
    let ca = &certs[0].0;
    push_ok(&setup.registry_url, &example("hello"));
    push_ok(&setup.registry_url, &example("echo"));
    setup.wait_served("hello.localhost", ca);
    setup.wait_served("echo.localhost", ca);
    let https = setup.node.https.clone().expect("https address");

    let h2 = curl_h2(&https, "hello.localhost", "/", ca);
    assert_eq!((h2.status, h2.http_version.as_str()), (200, "2"), "{}", h2.stderr);
    assert_eq!(h2.body, hello_body("hello.localhost"));
    let alt_svc = h2
        .headers
        .lines()
        .find(|line| line.to_ascii_lowercase().starts_with("alt-svc:"))
        .unwrap_or_else(|| panic!("no Alt-Svc over HTTP/2:\n{}", h2.headers));
    assert!(
        alt_svc.contains(&format!("h3=\":{}\"", setup.h3.port())),
        "Alt-Svc must name the HTTP/3 port {}: {alt_svc}",
        setup.h3.port()
    );

    let target = setup.target(ca);
    let h3 = aioquic(&target, "hello.localhost", "/", None, &[]);
    assert_eq!(h3.status(), Some(h2.status as u64), "{h3:?}");
    assert_eq!(h3.body(), h2.body, "same body over HTTP/3 as over HTTP/2");
    let h2_content_type = h2
        .headers
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(str::to_string)
        })
        .expect("content-type over HTTP/2");
    assert_eq!(h3.header("content-type"), Some(h2_content_type.trim()));
    assert_eq!(
        h3.header("content-length"),
        Some(h2.body.len().to_string().as_str())
    );

    // A request body streams through to the function, which sees HTTP/3.
    let posted = aioquic(
        &target,
        "echo.localhost",
        "/submit",
        None,
        &["--method", "POST", "--data", "ping over h3"],
    );
    assert_eq!(posted.status(), Some(200), "{posted:?}");
    let fields = echo_fields(posted.body());
    assert_eq!(fields["REQUEST_METHOD"], "POST", "{}", posted.body());
    assert_eq!(fields["SERVER_PROTOCOL"], "HTTP/3.0", "{}", posted.body());
    assert_eq!(fields["BODY"], "ping over h3", "{}", posted.body());

    // Over the body limit: 413, as over TCP.
    let large = "x".repeat(64 * 1024);
    let refused = aioquic(
        &target,
        "echo.localhost",
        "/",
        None,
        &["--method", "POST", "--data", &large],
    );
    assert_eq!(refused.status(), Some(413), "{refused:?}");
}

#[test]
fn with_retry_threshold_zero_every_client_validates_its_address_first() {
    let (setup, certs) = H3Setup::boot(
        &[("hello.localhost", &["hello.localhost"])],
        &["--quic-retry-threshold", "0"],
    );
    let (ca, ca_der) = (&certs[0].0, certs[0].1.clone());
    push_ok(&setup.registry_url, &example("hello"));
    let retries_before = metric(&setup.node.admin, "atoll_quic_retries_total");
    setup.wait_served("hello.localhost", ca);

    let answer = aioquic(&setup.target(ca), "hello.localhost", "/", None, &[]);
    assert_eq!(answer.status(), Some(200), "{answer:?}");
    assert_eq!(answer.body(), hello_body("hello.localhost"));

    // quinn's client answers the Retry too.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime
        .block_on(h3_load::run_requests(
            setup.h3,
            "hello.localhost",
            ca_der,
            "/",
            2,
            2,
            20,
        ))
        .unwrap();
    assert_eq!(
        (report.requests, report.failures),
        (20, 0),
        "{:?}",
        report.first_failure
    );

    let admin = &setup.node.admin;
    let retries = metric(admin, "atoll_quic_retries_total");
    let connections = metric(admin, "atoll_quic_connections_total");
    // At least: the polling connection(s), the aioquic one and the two quinn ones.
    assert!(
        retries >= retries_before + 4.0,
        "every connection must have been retried: {retries_before} → {retries}"
    );
    assert!(connections >= 4.0, "connections counted: {connections}");
}

#[test]
fn a_host_the_connections_certificate_does_not_cover_gets_421() {
    let (setup, certs) = H3Setup::boot(
        &[
            ("hello.localhost", &["hello.localhost"]),
            ("other.localhost", &["other.localhost"]),
        ],
        &[],
    );
    let (hello_ca, other_ca) = (&certs[0].0, &certs[1].0);
    setup.push("hello", "hello", &["hello.localhost", "other.localhost"]);
    setup.wait_served("hello.localhost", hello_ca);
    // Both hosts are routed: on its own connection, other.localhost is served.
    setup.wait_served("other.localhost", other_ca);
    let own = aioquic(&setup.target(other_ca), "other.localhost", "/", None, &[]);
    assert_eq!(own.body(), hello_body("other.localhost"));

    // On a connection whose handshake was for hello.localhost, it is not.
    let misdirected = aioquic(
        &setup.target(hello_ca),
        "other.localhost",
        "/",
        Some("hello.localhost"),
        &[],
    );
    assert_eq!(misdirected.status(), Some(421), "{misdirected:?}");
    assert!(
        misdirected.body().contains("other.localhost"),
        "{}",
        misdirected.body()
    );
}

#[test]
fn a_headers_frame_declaring_a_gigabyte_is_stopped_before_it_is_buffered() {
    let (setup, certs) = H3Setup::boot(&[("hello.localhost", &["hello.localhost"])], &[]);
    let ca = &certs[0].0;
    push_ok(&setup.registry_url, &example("hello"));
    setup.wait_served("hello.localhost", ca);

    // h3 would buffer the frame whole before its 431 check; the frame limit stops the stream
    // (both ways, H3_EXCESSIVE_LOAD) as soon as the length is read, and the connection keeps
    // serving: the request after it, on the same connection, is answered.
    let answer = aioquic(
        &setup.target(ca),
        "hello.localhost",
        "/",
        None,
        &["--oversized-headers", &(1u64 << 30).to_string()],
    );
    const H3_EXCESSIVE_LOAD: u64 = 0x107;
    let oversized = &answer.json["oversized_headers"];
    assert_eq!(oversized["stop_sending"], H3_EXCESSIVE_LOAD, "{answer:?}");
    assert_eq!(oversized["reset"], H3_EXCESSIVE_LOAD, "{answer:?}");
    assert_eq!(answer.status(), Some(200), "{answer:?}");
    assert_eq!(answer.body(), hello_body("hello.localhost"));
}

#[test]
fn two_thousand_requests_over_concurrent_streams_all_succeed() {
    let (setup, certs) = H3Setup::boot(&[("hello.localhost", &["hello.localhost"])], &[]);
    let (ca, ca_der) = (&certs[0].0, certs[0].1.clone());
    push_ok(&setup.registry_url, &example("hello"));
    setup.wait_served("hello.localhost", ca);

    // aioquic: 4 connections × 16 streams in flight.
    let load = aioquic(
        &setup.target(ca),
        "hello.localhost",
        "/",
        None,
        &["-n", "2000", "--connections", "4", "-c", "16", "--timeout", "60"],
    );
    assert_eq!(load.failures(), 0, "aioquic saw failures: {load:?}");
    assert_eq!(load.count(200), 2000, "{load:?}");
    assert_eq!(load.json["distinct_bodies"], 1, "{load:?}");

    // The bench's quinn + h3 client: 4 connections × 16 streams.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime
        .block_on(h3_load::run_requests(
            setup.h3,
            "hello.localhost",
            ca_der,
            "/",
            4,
            16,
            2000,
        ))
        .unwrap();
    assert_eq!(
        (report.requests, report.failures),
        (2000, 0),
        "quinn client: {:?}",
        report.first_failure
    );
    assert!(!load.stderr.contains("Traceback"), "{}", load.stderr);
}

#[test]
fn sigterm_lets_in_flight_http3_requests_finish_then_exits() {
    // A grace period far longer than the requests: the node must exit when they are done,
    // not when the grace period runs out.
    let grace = Duration::from_secs(30);
    let (mut setup, certs) = H3Setup::boot(
        &[("fault.localhost", &["fault.localhost"])],
        &["--shutdown-grace", "30s"],
    );
    let ca = certs[0].0.clone();
    setup.push("fault", "fault", &["fault.localhost"]);
    setup.wait_served("fault.localhost", &ca);

    // Three slow requests on one connection, all in the handler before SIGTERM.
    let url = format!("https://fault.localhost:{}/spin?ms=2000", setup.h3.port());
    let in_flight = h3_client_command(&[
        &url,
        "--ca-file",
        ca.to_str().unwrap(),
        "--connect-host",
        "127.0.0.1",
        "-n",
        "3",
        "-c",
        "3",
    ])
    .spawn()
    .expect("run h3_client.py");
    wait_for_metric(
        &setup.node.admin,
        "atoll_requests_in_flight",
        &[],
        |value| value >= Some(3.0),
        STARTUP,
    );
    let terminated = Instant::now();
    setup.node.process.terminate();

    let finished = H3Report::from_output(in_flight.wait_with_output().unwrap());
    assert_eq!(
        finished.failures(),
        0,
        "in-flight requests must finish: {finished:?}"
    );
    assert_eq!(finished.count(200), 3, "{finished:?}");
    let status = setup.node.process.wait_exit(STARTUP);
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        terminated.elapsed() < grace,
        "the node took the whole grace period: {:?}",
        terminated.elapsed()
    );
    let after = aioquic(
        &setup.target(&ca),
        "fault.localhost",
        "/",
        None,
        &["--timeout", "2"],
    );
    assert_eq!(after.status(), None, "still answering after exit: {after:?}");
}

#[test]
fn a_large_response_streams_over_http3_and_a_broken_one_is_reset() {
    let (setup, certs) = H3Setup::boot(
        &[("stream.localhost", &["big.localhost", "stall.localhost"])],
        &[],
    );
    let ca = &certs[0].0;
    let functions = setup.data.path().join("functions");
    let blocks = 128; // 8 MiB
    for (name, module, extra) in [
        ("big", bulk_writer_module(blocks, ""), ""),
        // 1 MiB, then a spin the 2 s timeout ends.
        (
            "stall",
            bulk_writer_module(16, "(loop $forever (br $forever))"),
            "[limits]\ntimeout = \"2s\"\n",
        ),
    ] {
        let wasm = functions.join(format!("{name}.wasm"));
        std::fs::create_dir_all(&functions).unwrap();
        std::fs::write(&wasm, module).unwrap();
        let manifest = write_manifest(
            &functions.join(name),
            name,
            &wasm,
            &[&format!("{name}.localhost")],
            extra,
        );
        push_ok(&setup.registry_url, &manifest);
    }
    setup.wait_served("big.localhost", ca);
    let target = setup.target(ca);

    let big = aioquic(&target, "big.localhost", "/", None, &[]);
    assert_eq!(
        (big.status(), big.failures()),
        (Some(200), 0),
        "{:?}",
        big.json["errors"]
    );
    assert_eq!(big.body().len(), blocks as usize * 64 * 1024);
    assert!(big.body().bytes().all(|byte| byte == b'x'));
    assert_eq!(
        big.header("content-length"),
        None,
        "a streamed body has no length up front"
    );

    wait_until("stall.localhost is served", || {
        aioquic(&target, "stall.localhost", "/", None, &[]).status() != Some(404)
    });
    let stalled = aioquic(&target, "stall.localhost", "/", None, &[]);
    assert_eq!(
        stalled.failures(),
        1,
        "a cut-off body looked complete: {stalled:?}"
    );
    let errors = stalled.json["errors"].to_string();
    assert!(errors.contains("stream reset"), "{errors}");
}
