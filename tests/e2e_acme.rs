//! Automatic certificates end to end, against pebble (Let's Encrypt's test CA) and its
//! `pebble-challtestsrv` DNS: TLS-ALPN-01 for two domains, HTTP-01 with a CA that comes up
//! after the domain is routed, a restart that serves the stored certificate without any CA
//! (and recovers when the CA has forgotten the account), and a domain whose DNS points
//! elsewhere failing alone. Clients are curl and openssl: implementations nobody here wrote.
//!
//! Pebble validates challenges against the node's real listeners: its `httpPort`/`tlsPort`
//! are the node's, and its DNS (challtestsrv) answers 127.0.0.1 for every name. Since pebble
//! needs the node's ports, each test starts the node first (pointed at a port reserved for
//! pebble), then pebble; the node's retries take it from there.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// Deadline for a certificate to be issued (pebble validates at once with
/// `PEBBLE_VA_NOSLEEP`; the rest is a slow shared machine).
const ISSUANCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Pebble and challtestsrv

/// Holds loopback TCP `port` (0: a free one) with a bound socket that does not listen: no
/// other process's `bind(…:0)` is given it while pebble is not running (tests run in
/// parallel, and a port merely released could be taken before pebble binds it), and a
/// client connecting is refused as if nothing were there.
fn hold_tcp(port: u16) -> Option<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_reuseaddr(true).ok()?;
    socket.bind(([127, 0, 0, 1], port).into()).ok()?;
    Some(socket)
}

fn held_port(socket: &tokio::net::TcpSocket) -> u16 {
    socket.local_addr().expect("a bound socket").port()
}

/// Pebble's and challtestsrv's ports, held (see [`hold_tcp`]) while they are not running:
/// the sockets are only kept open, never used.
struct HeldPorts {
    _tcp: Vec<tokio::net::TcpSocket>,
    _udp: Option<UdpSocket>,
}

impl HeldPorts {
    /// Three TCP ports, and one free for both UDP and TCP (DNS listens on both).
    fn pick() -> (HeldPorts, [u16; 4]) {
        let tcp: Vec<_> = (0..3)
            .map(|_| hold_tcp(0).expect("a free loopback port"))
            .collect();
        let (dns_tcp, udp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            if let Some(tcp) = hold_tcp(udp.local_addr().unwrap().port()) {
                break (tcp, udp);
            }
        };
        let ports = [
            held_port(&tcp[0]),
            held_port(&tcp[1]),
            held_port(&dns_tcp),
            held_port(&tcp[2]),
        ];
        let mut tcp = tcp;
        tcp.push(dns_tcp);
        (
            HeldPorts {
                _tcp: tcp,
                _udp: Some(udp),
            },
            ports,
        )
    }

    /// Holds `tcp_ports` and UDP `udp_port` again (best effort: a port still in use by the
    /// process just stopped is simply not held).
    fn hold(tcp_ports: &[u16], udp_port: u16) -> HeldPorts {
        HeldPorts {
            _tcp: tcp_ports.iter().filter_map(|&port| hold_tcp(port)).collect(),
            _udp: UdpSocket::bind(("127.0.0.1", udp_port)).ok(),
        }
    }
}

/// A pebble or challtestsrv process; its output is collected, it is killed when dropped.
struct Daemon {
    label: &'static str,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn spawn(label: &'static str, command: &mut Command) -> Daemon {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {label}: {error} (is the `pebble` package installed?)"));
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Daemon { label, child, output }
    }

    fn logs(&self) -> String {
        format!(
            "--- {} ---\n{}",
            self.label,
            self.output.lock().unwrap().join("\n")
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pebble with its DNS, on ports reserved up front so the node can be told the directory
/// URL before pebble (which needs the node's ports) starts.
struct Pebble {
    dir: tempfile::TempDir,
    port: u16,
    management_port: u16,
    dns_port: u16,
    dns_management_port: u16,
    /// PEM of pebble's own HTTPS certificate (`--acme-ca-cert`).
    tls_cert: PathBuf,
    daemons: Vec<Daemon>,
    /// Its ports while it is not running; released right before it starts.
    held: Option<HeldPorts>,
}

impl Pebble {
    fn prepare() -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let tls_cert = dir.path().join("pebble-tls.pem");
        std::fs::write(&tls_cert, certified.cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("pebble-tls.key"),
            certified.signing_key.serialize_pem(),
        )
        .unwrap();
        let (held, [port, management_port, dns_port, dns_management_port]) = HeldPorts::pick();
        Pebble {
            port,
            management_port,
            dns_port,
            dns_management_port,
            tls_cert,
            dir,
            daemons: Vec::new(),
            held: Some(held),
        }
    }

    fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// Starts challtestsrv and pebble (validating against `http_port` and `tls_port`); returns
    /// when pebble answers its directory.
    fn start(&mut self, http_port: u16, tls_port: u16) {
        assert!(self.daemons.is_empty(), "pebble already running");
        // The ports are pebble's and challtestsrv's from now on.
        self.held = None;
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.port),
                "managementListenAddress": format!("127.0.0.1:{}", self.management_port),
                "certificate": self.tls_cert,
                "privateKey": self.dir.path().join("pebble-tls.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = self.dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        self.daemons.push(Daemon::spawn(
            "pebble-challtestsrv",
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{}", self.dns_port)])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{}", self.dns_management_port)]),
        ));
        self.daemons.push(Daemon::spawn(
            "pebble",
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0"),
        ));
        let deadline = Instant::now() + STARTUP;
        loop {
            let output = Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&self.tls_cert)
                .arg(self.directory_url())
                .output()
                .expect("run curl");
            let dns_ready = std::net::TcpStream::connect(("127.0.0.1", self.dns_management_port)).is_ok();
            if output.stdout == b"200" && dns_ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pebble did not come up\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        self.daemons.clear();
        // Held again until the next start, which needs the same ports.
        let tcp = [
            self.port,
            self.management_port,
            self.dns_port,
            self.dns_management_port,
        ];
        self.held = Some(HeldPorts::hold(&tcp, self.dns_port));
    }

    fn logs(&self) -> String {
        self.daemons
            .iter()
            .map(Daemon::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Pebble's issuing root (a new one each time pebble starts), written to a file. Fetched
    /// without verifying pebble's management certificate: test-only.
    fn root(&self) -> PathBuf {
        let output = Command::new("curl")
            .args(["-sS", "-k", "--fail"])
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management_port))
            .output()
            .expect("run curl");
        assert!(
            output.status.success() && output.stdout.starts_with(b"-----BEGIN CERTIFICATE-----"),
            "fetching pebble's root: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = self
            .dir
            .path()
            .join(format!("root-{}.pem", self.daemons[1].child.id()));
        std::fs::write(&path, &output.stdout).unwrap();
        path
    }

    /// Makes challtestsrv's DNS answer `address` for `host` (instead of 127.0.0.1).
    fn add_a_record(&self, host: &str, address: &str) {
        let body = serde_json::json!({ "host": format!("{host}."), "addresses": [address] });
        let output = Command::new("curl")
            .args(["-sS", "--fail", "-X", "POST", "--data", &body.to_string()])
            .arg(format!("http://127.0.0.1:{}/add-a", self.dns_management_port))
            .output()
            .expect("run curl");
        assert!(
            output.status.success(),
            "challtestsrv add-a: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------
// The node and its clients

struct AcmeNode {
    process: Process,
    http: String,
    https: String,
    admin: String,
}

impl AcmeNode {
    fn port(addr: &str) -> u16 {
        addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn http_port(&self) -> u16 {
        Self::port(&self.http)
    }

    fn tls_port(&self) -> u16 {
        Self::port(&self.https)
    }

    fn acme_dir(data: &Path) -> PathBuf {
        data.join("acme")
    }

    /// Polls the node's log until one line contains every needle; returns it.
    fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.process.stderr_lines();
            if let Some(line) = lines
                .into_iter()
                .find(|line| needles.iter().all(|needle| line.contains(needle)))
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "the node did not log {needles:?} within {timeout:?}\n{}",
                self.process.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `atoll node` with TLS and ACME against `pebble`, on the given ports (0: any free port).
fn start_acme_node(
    registry_url: &str,
    data: &Path,
    pebble: &Pebble,
    (http_port, tls_port): (u16, u16),
    extra: &[&str],
) -> AcmeNode {
    let listen = format!("127.0.0.1:{http_port}");
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let directory = pebble.directory_url();
    let mut args = vec![
        "--listen",
        &listen,
        "--tls-listen",
        &tls_listen,
        "--no-http3",
        "--acme-directory",
        &directory,
        "--acme-ca-cert",
        pebble.tls_cert.to_str().unwrap(),
        "--acme-email",
        "ops@example.test",
    ];
    args.extend_from_slice(extra);
    let node = start_edge_node(registry_url, data, &args);
    let logs = node.process.logs();
    AcmeNode {
        http: node
            .http
            .unwrap_or_else(|| panic!("the node printed no http address\n{logs}")),
        https: node
            .https
            .unwrap_or_else(|| panic!("the node printed no https address\n{logs}")),
        admin: node.admin,
        process: node.process,
    }
}

/// `curl https://HOST:PORT/` against the node, verifying with `root` only.
fn curl(https: &str, host: &str, root: &Path) -> CurlResult {
    curl_https(https, host, "/", root, &[])
}

/// Polls until `https://HOST/` answers 200 with a certificate that verifies against `root`.
fn wait_for_verified_https(node: &AcmeNode, host: &str, root: &Path, pebble: &Pebble) -> CurlResult {
    let deadline = Instant::now() + ISSUANCE;
    loop {
        let result = curl(&node.https, host, root);
        if result.status == 200 {
            return result;
        }
        assert!(
            Instant::now() < deadline,
            "no verified HTTPS for {host} within {ISSUANCE:?}; last curl: {}\n{}\n{}",
            result.stderr,
            node.process.logs(),
            pebble.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The leaf certificate the node serves for `host` (SNI), as PEM, if the handshake succeeds.
fn served_leaf(https: &str, host: &str) -> Option<String> {
    let output = Command::new("openssl")
        .args(["s_client", "-connect", https, "-servername", host, "-alpn", "h2"])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find("-----END CERTIFICATE-----")? + start + "-----END CERTIFICATE-----".len();
    Some(format!("{}\n", &text[start..end]))
}

/// `openssl x509 -noout ARGS` over a PEM certificate.
fn x509(pem: &str, args: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl x509");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(pem.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "openssl x509 {args:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn fingerprint(pem: &str) -> String {
    x509(pem, &["-fingerprint", "-sha256"])
}

fn stored_certificate(node_data: &Path, domain: &str) -> String {
    std::fs::read_to_string(AcmeNode::acme_dir(node_data).join(format!("certs/{domain}.crt"))).unwrap()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Pushes `hello` routed at `routes`.
fn push_hello(registry_url: &str, dir: &Path, routes: &[&str]) {
    let manifest = write_manifest(dir, "hello", &example_wasm("hello"), routes, "");
    push_ok(registry_url, &manifest);
}

// ---------------------------------------------------------------------------------------
// The tests

#[test]
fn tls_alpn_01_certificates_for_two_domains_served_over_http2() {
    let data = tempfile::tempdir().unwrap();
    let node_data = data.path().join("node");
    let mut pebble = Pebble::prepare();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let node = start_acme_node(&registry_url, &node_data, &pebble, (0, 0), &[]);
    pebble.start(node.http_port(), node.tls_port());
    let root = pebble.root();

    let pushed = Instant::now();
    push_hello(
        &registry_url,
        &data.path().join("hello"),
        &["a.test", "b.test", "hello.localhost"],
    );
    for host in ["a.test", "b.test"] {
        let result = wait_for_verified_https(&node, host, &root, &pebble);
        assert_eq!(result.body, hello_body(host));
        assert_eq!(result.http_version, "2", "HTTP/2 by ALPN");
    }
    eprintln!("push to verified HTTPS on both domains: {:?}", pushed.elapsed());

    for domain in ["a.test", "b.test"] {
        let stored = stored_certificate(&node_data, domain);
        let served = served_leaf(&node.https, domain).expect("handshake");
        assert_eq!(
            fingerprint(&served),
            fingerprint(&stored),
            "serves what it stored"
        );
        assert!(x509(&stored, &["-issuer"]).contains("Pebble"), "issued by pebble");
        assert!(x509(&stored, &["-ext", "subjectAltName"]).contains(&format!("DNS:{domain}")));
        assert!(
            x509(&stored, &["-text"]).contains("prime256v1"),
            "an ECDSA P-256 key"
        );
        let key = AcmeNode::acme_dir(&node_data).join(format!("certs/{domain}.key"));
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    assert_eq!(mode(&AcmeNode::acme_dir(&node_data).join("account.json")), 0o600);
    // `hello.localhost` is routed but can have no public certificate: none was ordered.
    node.wait_for_log(&["hello.localhost", "not a public DNS name"], STARTUP);
    assert!(
        !AcmeNode::acme_dir(&node_data)
            .join("certs/hello.localhost.crt")
            .exists()
    );
    wait_for_metric(
        &node.admin,
        "atoll_acme_certificates_total",
        &[("outcome", "issued")],
        |value| value == Some(2.0),
        STARTUP,
    );
}

#[test]
fn http_01_certificate_once_the_ca_comes_up_and_the_account_is_reused_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let node_data = data.path().join("node");
    let mut pebble = Pebble::prepare();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let mut node = start_acme_node(
        &registry_url,
        &node_data,
        &pebble,
        (0, 0),
        &["--acme-challenge", "http-01"],
    );
    // The domain is routed while the CA is still down: the node fails, backs off, retries.
    push_hello(&registry_url, &data.path().join("hello"), &["h.test"]);
    let failure = node.wait_for_log(&["certificate not obtained", "h.test"], ISSUANCE);
    assert!(failure.contains("register account"), "{failure}");
    let started = Instant::now();
    pebble.start(node.http_port(), node.tls_port());
    let root = pebble.root();
    let result = wait_for_verified_https(&node, "h.test", &root, &pebble);
    assert_eq!(result.body, hello_body("h.test"));
    eprintln!(
        "CA up to verified HTTPS (HTTP-01, after backoff): {:?}",
        started.elapsed()
    );
    node.wait_for_log(&["challenge published", "http-01", "h.test"], STARTUP);

    // Restart on the same ports (pebble validates there), then route a second domain: it is
    // issued under the stored account, and the first certificate is not ordered again.
    let account_path = AcmeNode::acme_dir(&node_data).join("account.json");
    let account = std::fs::read(&account_path).unwrap();
    let first = stored_certificate(&node_data, "h.test");
    let ports = (node.http_port(), node.tls_port());
    node.process.terminate();
    assert!(
        node.process.wait_exit(STARTUP).success(),
        "{}",
        node.process.logs()
    );
    let node = start_acme_node(
        &registry_url,
        &node_data,
        &pebble,
        ports,
        &["--acme-challenge", "http-01"],
    );
    push_hello(
        &registry_url,
        &data.path().join("hello"),
        &["h.test", "second.test"],
    );
    let result = wait_for_verified_https(&node, "second.test", &root, &pebble);
    assert_eq!(result.body, hello_body("second.test"));
    node.wait_for_log(&["ACME account restored"], STARTUP);
    assert_eq!(
        std::fs::read(&account_path).unwrap(),
        account,
        "the account is reused"
    );
    assert_eq!(
        stored_certificate(&node_data, "h.test"),
        first,
        "no new order for a fresh certificate"
    );
    assert_eq!(
        fingerprint(&served_leaf(&node.https, "h.test").unwrap()),
        fingerprint(&first)
    );
}

#[test]
fn a_restart_serves_the_stored_certificate_without_the_ca_and_recovers_from_a_reset_ca() {
    let data = tempfile::tempdir().unwrap();
    let node_data = data.path().join("node");
    let mut pebble = Pebble::prepare();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let mut node = start_acme_node(&registry_url, &node_data, &pebble, (0, 0), &[]);
    pebble.start(node.http_port(), node.tls_port());
    let root = pebble.root();
    push_hello(&registry_url, &data.path().join("hello"), &["keep.test"]);
    wait_for_verified_https(&node, "keep.test", &root, &pebble);
    let before = fingerprint(&served_leaf(&node.https, "keep.test").unwrap());

    node.process.terminate();
    assert!(
        node.process.wait_exit(STARTUP).success(),
        "{}",
        node.process.logs()
    );
    pebble.stop();

    // No CA at all: the stored certificate is served at once, on a new port.
    let node = start_acme_node(&registry_url, &node_data, &pebble, (0, 0), &[]);
    let result = wait_for_verified_https(&node, "keep.test", &root, &pebble);
    assert_eq!(result.body, hello_body("keep.test"));
    assert_eq!(
        fingerprint(&served_leaf(&node.https, "keep.test").unwrap()),
        before
    );
    wait_for_metric(
        &node.admin,
        "atoll_acme_certificates_total",
        &[("outcome", "loaded")],
        |value| value == Some(1.0),
        STARTUP,
    );
    let account_path = AcmeNode::acme_dir(&node_data).join("account.json");
    let old_account = std::fs::read(&account_path).unwrap();

    // A new pebble at the same URL knows nothing of the stored account: the node registers a
    // new one and carries on.
    pebble.start(node.http_port(), node.tls_port());
    let new_root = pebble.root();
    push_hello(
        &registry_url,
        &data.path().join("hello"),
        &["keep.test", "late.test"],
    );
    let result = wait_for_verified_https(&node, "late.test", &new_root, &pebble);
    assert_eq!(result.body, hello_body("late.test"));
    node.wait_for_log(&["accountDoesNotExist", "late.test"], STARTUP);
    node.wait_for_log(&["ACME account registered"], STARTUP);
    assert_ne!(std::fs::read(&account_path).unwrap(), old_account);
    assert_eq!(
        fingerprint(&served_leaf(&node.https, "keep.test").unwrap()),
        before,
        "the fresh certificate is kept"
    );
}

#[test]
fn a_domain_that_fails_validation_does_not_block_the_others() {
    let data = tempfile::tempdir().unwrap();
    let node_data = data.path().join("node");
    let mut pebble = Pebble::prepare();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let node = start_acme_node(&registry_url, &node_data, &pebble, (0, 0), &[]);
    pebble.start(node.http_port(), node.tls_port());
    // bad.test's DNS points at an address where no node listens.
    pebble.add_a_record("bad.test", "127.0.0.9");
    let root = pebble.root();

    let pushed = Instant::now();
    push_hello(
        &registry_url,
        &data.path().join("hello"),
        &["bad.test", "good.test"],
    );
    let result = wait_for_verified_https(&node, "good.test", &root, &pebble);
    assert_eq!(result.body, hello_body("good.test"));
    eprintln!(
        "push to verified HTTPS for good.test beside a failing domain: {:?}",
        pushed.elapsed()
    );

    // bad.test fails with the CA's reason, and is retried.
    let failure = node.wait_for_log(
        &["certificate not obtained", "bad.test", "validation", "127.0.0.9"],
        ISSUANCE,
    );
    eprintln!("logged: {failure}");
    node.wait_for_log(&["certificate not obtained", "bad.test", "attempt=2"], ISSUANCE);
    assert!(!AcmeNode::acme_dir(&node_data).join("certs/bad.test.crt").exists());
    assert!(
        served_leaf(&node.https, "bad.test").is_none(),
        "no certificate for bad.test"
    );
}

#[test]
fn a_stored_certificate_in_its_last_third_is_renewed() {
    let data = tempfile::tempdir().unwrap();
    let node_data = data.path().join("node");
    // A self-signed certificate from three years ago to next New Year: still valid, but with
    // far less than a third of its lifetime left.
    let certs = AcmeNode::acme_dir(&node_data).join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let year = 1970 + (seconds / 31_556_952) as i32;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["renew.test".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(year - 3, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 1, 1, 1);
    let old = params.self_signed(&key).unwrap().pem();
    std::fs::write(certs.join("renew.test.key"), key.serialize_pem()).unwrap();
    std::fs::write(certs.join("renew.test.crt"), &old).unwrap();

    let mut pebble = Pebble::prepare();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let node = start_acme_node(&registry_url, &node_data, &pebble, (0, 0), &[]);
    // Stored certificates are installed by the ACME task, which starts beside the TLS
    // listener: poll for the first handshake.
    let deadline = Instant::now() + STARTUP;
    let leaf = loop {
        if let Some(leaf) = served_leaf(&node.https, "renew.test") {
            break leaf;
        }
        assert!(Instant::now() < deadline, "the stored certificate is not served");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(fingerprint(&leaf), fingerprint(&old));
    pebble.start(node.http_port(), node.tls_port());
    let root = pebble.root();
    push_hello(&registry_url, &data.path().join("hello"), &["renew.test"]);
    let result = wait_for_verified_https(&node, "renew.test", &root, &pebble);
    assert_eq!(result.body, hello_body("renew.test"));
    node.wait_for_log(&["renewing certificate", "renew.test"], STARTUP);
    let renewed = stored_certificate(&node_data, "renew.test");
    assert_ne!(fingerprint(&renewed), fingerprint(&old));
    assert!(x509(&renewed, &["-issuer"]).contains("Pebble"));
    assert_eq!(mode(&certs.join("renew.test.key")), 0o600);
}
