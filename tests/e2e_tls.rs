//! HTTPS end to end: certificates chosen by SNI from `--certs DIR`, HTTP/2 by ALPN, hot
//! reload, 421 for a host the connection's certificate does not cover, TLS defaults
//! (versions, resumption), testssl.sh's vulnerability scan, h2load under load, and a graceful
//! SIGTERM. The clients are curl, openssl s_client, testssl.sh and h2load: implementations
//! nobody here wrote.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

/// A self-signed ECDSA P-256 certificate for `names`, written as `dir/STEM.crt` + `.key`
/// (the key first, so the directory watcher never sees a certificate without its key).
fn write_certificate(dir: &Path, stem: &str, names: &[&str]) -> PathBuf {
    let scratch = tempfile::tempdir().unwrap();
    let (key, cert) = (scratch.path().join("k.pem"), scratch.path().join("c.pem"));
    let san = names
        .iter()
        .map(|name| format!("DNS:{name}"))
        .collect::<Vec<_>>()
        .join(",");
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "30", "-subj", &format!("/CN={}", names[0])])
        .args(["-addext", &format!("subjectAltName={san}")])
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Renames are atomic: a reload sees the old pair or the new one.
    std::fs::rename(&key, dir.join(format!("{stem}.key"))).unwrap();
    let cert_path = dir.join(format!("{stem}.crt"));
    std::fs::rename(&cert, &cert_path).unwrap();
    cert_path
}

/// A registry, a node with `--tls-listen` over `certs`, and `hello` routed at `routes`.
struct TlsSetup {
    _registry: Process,
    node: EdgeNode,
    https: String,
    certs: PathBuf,
    _data: tempfile::TempDir,
}

fn boot_tls(routes: &[&str], certificates: &[(&str, &[&str])], extra: &[&str]) -> TlsSetup {
    let data = tempfile::tempdir().unwrap();
    let certs = data.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    for (stem, names) in certificates {
        write_certificate(&certs, stem, names);
    }
    let (registry, registry_url) = start_registry(&data.path().join("registry"));
    let mut flags = vec!["--tls-listen", "127.0.0.1:0", "--certs", certs.to_str().unwrap()];
    flags.extend_from_slice(extra);
    let node = start_edge_node(&registry_url, &data.path().join("node"), &flags);
    let https = node.https.clone().expect("node printed its https address");
    let manifest = write_manifest(data.path(), "hello", &example_wasm("hello"), routes, "");
    push_ok(&registry_url, &manifest);
    let setup = TlsSetup {
        _registry: registry,
        node,
        https,
        certs,
        _data: data,
    };
    let ca = setup.certs.join(format!("{}.crt", certificates[0].0));
    wait_until(&format!("{} served over TLS", routes[0]), || {
        curl_https(&setup.https, routes[0], "/", &ca, &[]).status == 200
    });
    setup
}

#[test]
fn two_domains_each_get_their_own_certificate_over_http2() {
    let setup = boot_tls(
        &["a.test", "b.test", "x.w.test"],
        &[("a", &["a.test"]), ("b", &["b.test"]), ("wild", &["*.w.test"])],
        &[],
    );
    for (host, stem) in [("a.test", "a"), ("b.test", "b"), ("x.w.test", "wild")] {
        // Trusting only this domain's own self-signed certificate proves which one was served.
        let result = curl_https(
            &setup.https,
            host,
            "/",
            &setup.certs.join(format!("{stem}.crt")),
            &[],
        );
        assert_eq!(result.status, 200, "{host}: {}", result.stderr);
        assert_eq!(result.http_version, "2", "{host}: HTTP/2 by ALPN");
        assert_eq!(result.body, hello_body(host));
        let alt_svc = result
            .headers
            .lines()
            .find(|line| line.to_ascii_lowercase().starts_with("alt-svc:"))
            .unwrap_or_else(|| panic!("no Alt-Svc in {}", result.headers));
        let h3_port = setup.node.h3.as_deref().unwrap().rsplit(':').next().unwrap();
        assert!(alt_svc.contains(&format!("h3=\":{h3_port}\"")), "{alt_svc}");
        // The other domain's certificate does not verify this one.
        let other = if stem == "a" { "b" } else { "a" };
        let wrong = curl_https(
            &setup.https,
            host,
            "/",
            &setup.certs.join(format!("{other}.crt")),
            &[],
        );
        assert_eq!(wrong.status, 0, "{host} verified with {other}'s certificate");
    }
    let http1 = curl_https(
        &setup.https,
        "a.test",
        "/",
        &setup.certs.join("a.crt"),
        &["--http1.1"],
    );
    assert_eq!((http1.status, http1.http_version.as_str()), (200, "1.1"));
    // An SNI no certificate covers fails the handshake instead of showing a wrong certificate.
    let unknown = curl_https(
        &setup.https,
        "nothing.test",
        "/",
        &setup.certs.join("a.crt"),
        &["-k"],
    );
    assert_eq!(unknown.status, 0, "handshake for an unknown name must fail");
}

#[test]
fn a_host_the_connections_certificate_does_not_cover_gets_421() {
    let setup = boot_tls(
        &["a.test", "b.test"],
        &[("a", &["a.test"]), ("b", &["b.test"])],
        &[],
    );
    for version in ["--http1.1", "--http2"] {
        let result = curl_https(
            &setup.https,
            "a.test",
            "/",
            &setup.certs.join("a.crt"),
            &[version, "-H", "Host: b.test"],
        );
        assert_eq!(result.status, 421, "{version}: {}", result.body);
        assert!(result.body.contains("b.test"), "{}", result.body);
    }
}

#[test]
fn the_certificate_directory_is_reloaded_and_a_broken_pair_keeps_the_old_one() {
    let setup = boot_tls(&["a.test", "c.test"], &[("a", &["a.test"])], &[]);
    let first = setup.certs.join("a.crt");
    let first_copy = setup.certs.parent().unwrap().join("a-first.crt");
    std::fs::copy(&first, &first_copy).unwrap();

    // A new certificate for a.test replaces the old one without a restart.
    write_certificate(&setup.certs, "a", &["a.test"]);
    let second = setup.certs.join("a.crt");
    wait_until("the new a.test certificate is served", || {
        curl_https(&setup.https, "a.test", "/", &second, &[]).status == 200
    });
    assert_eq!(
        curl_https(&setup.https, "a.test", "/", &first_copy, &[]).status,
        0
    );

    // A new pair adds a domain.
    write_certificate(&setup.certs, "c", &["c.test"]);
    let c = setup.certs.join("c.crt");
    wait_until("c.test is served", || {
        curl_https(&setup.https, "c.test", "/", &c, &[]).status == 200
    });

    // A broken pair is refused with a log line naming it; the last good one keeps serving.
    let second_copy = setup.certs.parent().unwrap().join("a-second.crt");
    std::fs::copy(&second, &second_copy).unwrap();
    std::fs::write(
        setup.certs.join("a.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    setup.node.process.wait_for_stderr("a.crt", STARTUP);
    let served = curl_https(&setup.https, "a.test", "/", &second_copy, &[]);
    assert_eq!(
        served.status, 200,
        "the last good certificate must keep serving: {}",
        served.stderr
    );
    assert_eq!(curl_https(&setup.https, "c.test", "/", &c, &[]).status, 200);
}

#[test]
fn only_tls_1_2_and_1_3_and_sessions_resume() {
    let setup = boot_tls(&["a.test"], &[("a", &["a.test"])], &[]);
    let connect = setup.https.clone();
    // Each run sends one request and reads until the server closes, so TLS 1.3 tickets
    // (sent after the handshake) have arrived before s_client saves the session.
    let s_client = |args: &[&str]| {
        use std::io::Write;
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-ign_eof",
                "-connect",
                &connect,
                "-servername",
                "a.test",
            ])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run openssl s_client");
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        drop(stdin);
        let output = child.wait_with_output().expect("wait for openssl s_client");
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
    };
    for old in ["-tls1", "-tls1_1"] {
        let output = s_client(&[old]);
        assert!(
            !output.contains("Cipher is ") || output.contains("Cipher is (NONE)"),
            "{old} must be refused:\n{output}"
        );
    }
    for (version, expected) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let output = s_client(&[version]);
        assert!(output.contains(expected), "{version} must work:\n{output}");
    }
    // Resumption: TLS 1.2 sessions (cache) and TLS 1.3 tickets.
    for version in ["-tls1_2", "-tls1_3"] {
        let scratch = tempfile::tempdir().unwrap();
        let session = scratch.path().join("session.pem");
        let session = session.to_str().unwrap();
        s_client(&[version, "-sess_out", session]);
        let resumed = s_client(&[version, "-sess_in", session]);
        assert!(
            resumed.contains("Reused,"),
            "{version} session not resumed:\n{resumed}"
        );
    }
}

#[test]
fn testssl_finds_nothing_vulnerable() {
    let setup = boot_tls(&["a.test"], &[("a", &["a.test"])], &[]);
    let scratch = tempfile::tempdir().unwrap();
    let json = scratch.path().join("testssl.json");
    let output = Command::new("testssl")
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--sneaky",
            "-p",
            "-U",
        ])
        .arg("--jsonfile")
        .arg(&json)
        .arg(&setup.https)
        .output()
        .expect("run testssl.sh (apt-get install testssl.sh)");
    let report = std::fs::read_to_string(&json).unwrap_or_else(|_| {
        panic!(
            "testssl.sh wrote no report:\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let findings: Vec<serde_json::Value> = serde_json::from_str(&report).expect("testssl JSON");
    assert!(findings.len() > 10, "testssl.sh ran too few checks: {report}");
    let bad: Vec<String> = findings
        .iter()
        .filter(|finding| {
            let severity = finding["severity"].as_str().unwrap_or("");
            let text = finding["finding"].as_str().unwrap_or("").to_ascii_lowercase();
            matches!(severity, "MEDIUM" | "HIGH" | "CRITICAL")
                || (text.contains("vulnerable") && !text.contains("not vulnerable"))
        })
        .map(|finding| finding.to_string())
        .collect();
    assert!(bad.is_empty(), "testssl.sh findings:\n{}", bad.join("\n"));
    for id in [
        "heartbleed",
        "CCS",
        "ROBOT",
        "secure_renego",
        "POODLE_SSL",
        "BEAST",
        "LUCKY13",
    ] {
        assert!(
            findings.iter().any(|finding| finding["id"] == id),
            "testssl.sh did not run {id}"
        );
    }
}

#[test]
fn h2load_over_tls_has_no_failed_requests() {
    let setup = boot_tls(&["a.test"], &[("a", &["a.test"])], &[]);
    let port = setup.https.rsplit(':').next().unwrap();
    let output = Command::new("h2load")
        .args(["-n", "4000", "-c", "16", "-m", "8", "--connect-to"])
        .arg(&setup.https)
        .arg(format!("https://a.test:{port}/"))
        .output()
        .expect("run h2load (apt-get install nghttp2-client)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "h2load failed:\n{stdout}");
    assert!(stdout.contains("Application protocol: h2"), "{stdout}");
    assert!(
        stdout.contains("4000 succeeded, 0 failed, 0 errored"),
        "h2load saw failures:\n{stdout}"
    );
    assert!(stdout.contains("status codes: 4000 2xx"), "{stdout}");
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let data = tempfile::tempdir().unwrap();
    let certs = data.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = write_certificate(&certs, "f", &["f.test"]);
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let mut node = start_edge_node(
        &registry_url,
        &data.path().join("node"),
        &["--tls-listen", "127.0.0.1:0", "--certs", certs.to_str().unwrap()],
    );
    let https = node.https.clone().unwrap();
    let manifest = write_manifest(data.path(), "fault", &example_wasm("fault"), &["f.test"], "");
    push_ok(&registry_url, &manifest);
    wait_until("fault served", || {
        curl_https(&https, "f.test", "/", &ca, &[]).status == 200
    });

    let in_flight = {
        let https = https.clone();
        let ca = ca.clone();
        std::thread::spawn(move || curl_https(&https, "f.test", "/spin?ms=2000", &ca, &[]))
    };
    wait_for_metric(
        &node.admin,
        "atoll_requests_in_flight",
        &[],
        |value| value >= Some(1.0),
        STARTUP,
    );
    node.process.terminate();
    let finished = in_flight.join().unwrap();
    assert_eq!(finished.status, 200, "in-flight request: {}", finished.stderr);
    let status = node.process.wait_exit(STARTUP);
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert_eq!(
        curl_https(&https, "f.test", "/", &ca, &[]).status,
        0,
        "still accepting after exit"
    );
}
