//! HTTP/1.1 request smuggling and head limits against the real node: every ambiguous framing
//! is answered with its status (400, 501, 431, 414) and the connection closed, while a client
//! doing keep-alive requests beside it is served throughout; valid HTTP/1.1 (pipelining,
//! chunked bodies with extensions and trailers, `Expect: 100-continue`, HTTP/1.0) and h2c
//! still work; a slowloris is cut off at the header timeout and an idle keep-alive connection
//! at the idle timeout.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, ServerName};
use support::*;

const HELLO: &str = "hello.localhost";
/// How long a refused connection may take to close on a busy machine.
const CLOSE_DEADLINE: Duration = Duration::from_secs(15);

/// A registry and a node started with `flags`, serving `hello` (and `echo` when asked).
struct Edge {
    _data: tempfile::TempDir,
    _registry: Process,
    node: EdgeNode,
    http: String,
}

fn boot_edge(flags: &[&str], with_echo: bool) -> Edge {
    let data = tempfile::tempdir().unwrap();
    let (registry, registry_url) = start_registry(&data.path().join("registry"));
    let node = start_edge_node(&registry_url, &data.path().join("node"), flags);
    let http = node.http.clone().expect("cleartext listener");
    push_ok(&registry_url, &example("hello"));
    wait_for_text(&http, HELLO, "/", &hello_body(HELLO));
    if with_echo {
        push_ok(&registry_url, &example("echo"));
        wait_for_body(&http, "echo.localhost", "/", |r| r.status == 200, STARTUP);
    }
    Edge {
        _data: data,
        _registry: registry,
        node,
        http,
    }
}

/// Sends `request` in one write, then reads until the server closes the connection. Panics
/// (naming the request) if the server does not close it within the deadline, or resets it
/// instead of closing (a reset can destroy the response on its way).
fn exchange(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(CLOSE_DEADLINE)).unwrap();
    stream.write_all(request).unwrap();
    read_until_closed(&mut stream, request)
}

fn read_until_closed(stream: &mut TcpStream, request: &[u8]) -> String {
    let mut answer = Vec::new();
    if let Err(error) = stream.read_to_end(&mut answer) {
        panic!(
            "{:?}: no clean close within {CLOSE_DEADLINE:?} ({error}); read so far: {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&answer)
        );
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status codes of the responses in `answer`, in order.
fn statuses(answer: &str) -> Vec<u16> {
    answer
        .split("HTTP/1.")
        .skip(1)
        .filter_map(|response| response.get(2..5)?.parse().ok())
        .collect()
}

/// A client doing keep-alive GETs to hello until stopped; reports how many it made and
/// every answer that was not hello's 200.
struct BystanderClient {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(usize, Vec<String>)>,
}

impl BystanderClient {
    fn start(addr: &str) -> BystanderClient {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = addr.to_string();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut client = KeepAlive::new(&addr);
                let (mut served, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    // A kept-alive connection the server closed as idle fails unanswered:
                    // retry the GET once on a new connection, as HTTP clients do.
                    match client.get(HELLO, "/").or_else(|_| client.get(HELLO, "/")) {
                        Ok(response) if response.status == 200 && response.text() == hello_body(HELLO) => {
                            served += 1
                        }
                        Ok(response) => failures.push(format!("{} {:?}", response.status, response.text())),
                        Err(error) => failures.push(format!("error: {error}")),
                    }
                }
                (served, failures)
            })
        };
        BystanderClient { stop, thread }
    }

    /// Stops the client and checks it was only ever served hello, on few connections.
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let (served, failures) = self.thread.join().expect("bystander thread");
        assert!(failures.is_empty(), "the bystander client saw: {failures:?}");
        assert!(served > 0, "the bystander client was never served");
        served
    }
}

fn post(fields: &str, body: &str) -> Vec<u8> {
    format!("POST / HTTP/1.1\r\nHost: {HELLO}\r\n{fields}\r\n\r\n{body}").into_bytes()
}

fn chunked(body: &str) -> Vec<u8> {
    post("Transfer-Encoding: chunked", body)
}

/// Every vector with the status it must get.
fn smuggling_vectors() -> Vec<(&'static str, Vec<u8>, u16)> {
    let mut vectors: Vec<(&'static str, Vec<u8>, u16)> = vec![
        (
            "CL.TE with a smuggled request",
            post(
                "Content-Length: 44\r\nTransfer-Encoding: chunked",
                "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: hello.localhost\r\n\r\n",
            ),
            400,
        ),
        (
            "TE.CL with a smuggled request",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 4",
                "2e\r\nGET /smuggled HTTP/1.1\r\nHost: hello.localhost\r\n\r\n\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "TE xchunked",
            post("Transfer-Encoding: xchunked", "0\r\n\r\n"),
            400,
        ),
        (
            "TE chunked twice",
            post("Transfer-Encoding: chunked, chunked", "0\r\n\r\n"),
            400,
        ),
        (
            "TE in two fields, chunked not last",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "TE space before colon",
            post("Transfer-Encoding : chunked", "0\r\n\r\n"),
            400,
        ),
        (
            "TE vertical tab",
            post("Transfer-Encoding: \x0bchunked", "0\r\n\r\n"),
            400,
        ),
        (
            "TE obs-fold",
            post("X-Pad: x\r\n Transfer-Encoding: chunked", "0\r\n\r\n"),
            400,
        ),
        (
            "TE continued by obs-fold",
            post("Transfer-Encoding:\r\n chunked", "0\r\n\r\n"),
            400,
        ),
        (
            "TE Kelvin sign",
            post("Transfer-Encoding: chun\u{212A}ed", "0\r\n\r\n"),
            400,
        ),
        (
            "TE in HTTP/1.0",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "CL twice, equal",
            post("Content-Length: 5\r\nContent-Length: 5", "hello"),
            400,
        ),
        ("CL list", post("Content-Length: 5, 5", "hello"), 400),
        ("CL signed", post("Content-Length: +5", "hello"), 400),
        ("CL negative", post("Content-Length: -1", "hello"), 400),
        ("CL hex", post("Content-Length: 0x5", "hello"), 400),
        (
            "CL overflow",
            post("Content-Length: 18446744073709551616", "hello"),
            400,
        ),
        ("chunk size 0x", chunked("0x5\r\nhello\r\n0\r\n\r\n"), 400),
        (
            "chunk size trailing space",
            chunked("5 \r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size overflow",
            chunked("fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        ("chunk size not hex", chunked("5\r\nhello\r\nxyz\r\n"), 400),
        ("no CRLF after chunk data", chunked("5\r\nhelloXX0\r\n\r\n"), 400),
        ("bare LF in chunk framing", chunked("5\nhello\r\n0\r\n\r\n"), 400),
        (
            "bare LF in the head",
            format!("GET / HTTP/1.1\nHost: {HELLO}\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "bare CR in a header",
            format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\nX: a\rb\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "NUL in a header value",
            format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\nX: a\0b\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "empty header name",
            format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\n: x\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "whitespace in a header name",
            format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\nX Y: z\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "two spaces in the request line",
            format!("GET  / HTTP/1.1\r\nHost: {HELLO}\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "bad version",
            format!("GET / HTTP/1.2\r\nHost: {HELLO}\r\n\r\n").into_bytes(),
            400,
        ),
        ("missing Host", b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400),
        (
            "two Hosts",
            format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\nHost: evil.localhost\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "TE gzip, chunked",
            post("Transfer-Encoding: gzip, chunked", "0\r\n\r\n"),
            501,
        ),
        ("TE identity", post("Transfer-Encoding: identity", ""), 501),
        ("TE compress", post("Transfer-Encoding: compress", ""), 501),
    ];
    let big_header = format!("X-Big: {}", "b".repeat(5000));
    vectors.push(("head over --max-header-bytes", post(&big_header, ""), 431));
    let many_fields: Vec<String> = (0..60).map(|i| format!("X-Field-{i}: v")).collect();
    vectors.push((
        "more fields than --max-headers",
        post(&many_fields.join("\r\n"), ""),
        431,
    ));
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: {HELLO}\r\n\r\n", "u".repeat(2000));
    vectors.push(("target over --max-uri-bytes", long_uri.into_bytes(), 414));
    vectors
}

#[test]
fn smuggling_vectors_are_refused_and_closed_while_others_are_served() {
    let edge = boot_edge(
        &[
            "--max-header-bytes",
            "4096",
            "--max-headers",
            "50",
            "--max-uri-bytes",
            "1024",
        ],
        false,
    );
    let bystander = BystanderClient::start(&edge.http);
    for (name, request, status) in smuggling_vectors() {
        let answer = exchange(&edge.http, &request);
        assert_eq!(statuses(&answer), [status], "{name}: {answer:?}");
        assert!(
            answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{name}: {answer:?}"
        );
        assert!(
            !answer.contains("Hello from Atoll"),
            "{name}: the function answered: {answer:?}"
        );
    }
    // A refused request in a pipeline: the requests before it are answered, none after it.
    let mut pipeline = format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\n\r\n").into_bytes();
    pipeline.extend_from_slice(&post("Content-Length: 1\r\nContent-Length: 1", "x"));
    pipeline.extend_from_slice(format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\n\r\n").as_bytes());
    let answer = exchange(&edge.http, &pipeline);
    assert_eq!(statuses(&answer), [200, 400], "{answer:?}");
    assert!(answer.contains("duplicate Content-Length"), "{answer:?}");

    let served = bystander.finish();
    eprintln!("bystander client: {served} requests served during the vectors");
    let health = get(&edge.node.admin, "admin", "/healthz");
    assert_eq!(health.status, 200);
}

#[test]
fn valid_http1_and_h2c_are_served_unchanged() {
    let edge = boot_edge(&[], true);
    let echo = "echo.localhost";

    // Pipelined requests in one write, answered in order; `Connection: close` on the last.
    let mut pipeline = Vec::new();
    for (i, path) in ["/one", "/two", "/three"].iter().enumerate() {
        let close = if i == 2 { "Connection: close\r\n" } else { "" };
        pipeline.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: {echo}\r\n{close}\r\n").as_bytes());
    }
    let answer = exchange(&edge.http, &pipeline);
    assert_eq!(statuses(&answer), [200, 200, 200], "{answer}");
    let (one, two, three) = (
        answer.find("PATH_INFO=/one\n"),
        answer.find("PATH_INFO=/two\n"),
        answer.find("PATH_INFO=/three\n"),
    );
    assert!(one < two && two < three && one.is_some(), "{answer}");

    // A chunked body with extensions and trailers, cut into many writes, reaches the
    // function whole.
    let body = "5;ext=1\r\nhello\r\n7;q=\"a b\"\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
    let request = format!(
        "POST /chunked HTTP/1.1\r\nHost: {echo}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{body}"
    );
    let mut stream = TcpStream::connect(&edge.http).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(CLOSE_DEADLINE)).unwrap();
    for piece in request.as_bytes().chunks(3) {
        stream.write_all(piece).unwrap();
    }
    let answer = read_until_closed(&mut stream, request.as_bytes());
    assert_eq!(statuses(&answer), [200], "{answer}");
    assert!(answer.contains("BODY=hello, world"), "{answer}");

    // Expect: 100-continue: the interim response comes before the body is sent.
    let mut stream = TcpStream::connect(&edge.http).unwrap();
    stream.set_read_timeout(Some(CLOSE_DEADLINE)).unwrap();
    let head = format!(
        "POST /expect HTTP/1.1\r\nHost: {echo}\r\nExpect: 100-continue\r\n\
         Content-Length: 4\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut interim = String::new();
    reader.read_line(&mut interim).unwrap();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim:?}");
    let mut blank = String::new();
    reader.read_line(&mut blank).unwrap();
    assert_eq!(blank, "\r\n");
    stream.write_all(b"ping").unwrap();
    let mut answer = String::new();
    reader.read_to_string(&mut answer).unwrap();
    assert_eq!(statuses(&answer), [200], "{answer}");
    assert!(answer.contains("BODY=ping"), "{answer}");

    // HTTP/1.0 (Host is optional there; sent so the request routes).
    let answer = exchange(
        &edge.http,
        format!("GET /ten HTTP/1.0\r\nHost: {echo}\r\n\r\n").as_bytes(),
    );
    assert_eq!(statuses(&answer), [200], "{answer}");
    assert!(answer.contains("PATH_INFO=/ten"), "{answer}");

    // h2c with prior knowledge, from a real client.
    let port = edge.http.rsplit(':').next().unwrap();
    let output = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "20",
            "--connect-to",
            &format!("{HELLO}:80:127.0.0.1:{port}"),
            "-w",
            "\n%{http_version} %{http_code}",
            &format!("http://{HELLO}/"),
        ])
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout, format!("{}\n2 200", hello_body(HELLO)));
}

/// Reads one response with a `Content-Length` body off a kept-alive connection.
fn read_one_response(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = statuses(&status_line).first().copied().unwrap_or(0);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads until the peer closes; returns when, and what it sent.
fn wait_for_close(stream: &mut impl Read) -> (Instant, Vec<u8>) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (Instant::now(), received),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) => panic!(
                "connection not closed within the deadline ({error}); received {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
}

#[test]
fn slowloris_is_cut_off_at_the_header_timeout_while_others_are_served() {
    let edge = boot_edge(&["--header-timeout", "2s"], false);
    let bystander = BystanderClient::start(&edge.http);

    let started = Instant::now();
    let mut slow = TcpStream::connect(&edge.http).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = slow.try_clone().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let trickler = {
        let closed = Arc::clone(&closed);
        std::thread::spawn(move || {
            let head = format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\nX-Slow: {}", "z".repeat(1000));
            for byte in head.bytes() {
                if closed.load(Ordering::Relaxed) || slow.write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let (closed_at, received) = wait_for_close(&mut reader);
    closed.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
    let elapsed = closed_at - started;
    eprintln!("slowloris connection closed after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(1500),
        "closed after {elapsed:?}, before the 2 s timeout"
    );
    assert!(elapsed < Duration::from_secs(10), "closed only after {elapsed:?}");
    let received = String::from_utf8_lossy(&received);
    assert!(
        received.is_empty() || statuses(&received) == [408],
        "the slowloris got {received:?}"
    );

    bystander.finish();
}

#[test]
fn idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    // A header timeout far beyond the idle timeout, so the idle timeout is what closes.
    let edge = boot_edge(&["--idle-timeout", "2s", "--header-timeout", "60s"], false);
    let mut stream = TcpStream::connect(&edge.http).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut last_sent = Instant::now();
    for _ in 0..2 {
        last_sent = Instant::now();
        stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\n\r\n").as_bytes())
            .unwrap();
        assert_eq!(read_one_response(&mut reader), (200, hello_body(HELLO)));
    }
    let (closed_at, received) = wait_for_close(&mut reader);
    // From before the last request: the server's idle clock starts after it answered it.
    let idle = closed_at - last_sent;
    eprintln!("idle keep-alive connection closed after {idle:?}");
    assert!(received.is_empty(), "{:?}", String::from_utf8_lossy(&received));
    assert!(
        idle >= Duration::from_millis(1500),
        "closed after {idle:?}, before the 2 s idle timeout"
    );
    assert!(idle < Duration::from_secs(10), "closed only after {idle:?}");
}

/// Sends `request` over TLS (ALPN `http/1.1`, trusting `ca`) and reads until the server
/// closes; the close must be a clean TLS close_notify.
fn tls_exchange(https: &str, ca: &CertificateDer<'static>, request: &[u8]) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("the test CA");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(HELLO).expect("server name");
    let connection = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let tcp = TcpStream::connect(https)?;
    tcp.set_read_timeout(Some(CLOSE_DEADLINE))?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    tls.write_all(request)?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[test]
fn http1_over_tls_is_guarded_too() {
    let data = tempfile::tempdir().unwrap();
    let certs = data.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec![HELLO.to_string()]).expect("a certificate");
    std::fs::write(certs.join("hello.key"), certified.signing_key.serialize_pem()).unwrap();
    std::fs::write(certs.join("hello.crt"), certified.cert.pem()).unwrap();
    let ca = certified.cert.der().clone();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let node = start_edge_node(
        &registry_url,
        &data.path().join("node"),
        &["--tls-listen", "127.0.0.1:0", "--certs", certs.to_str().unwrap()],
    );
    let https = node.https.clone().expect("TLS listener");
    push_ok(&registry_url, &example("hello"));
    let get = format!("GET / HTTP/1.1\r\nHost: {HELLO}\r\nConnection: close\r\n\r\n");
    let deadline = Instant::now() + STARTUP;
    loop {
        match tls_exchange(&https, &ca, get.as_bytes()) {
            Ok(answer) if statuses(&answer) == [200] => {
                assert!(answer.ends_with(&hello_body(HELLO)), "{answer}");
                break;
            }
            other if Instant::now() > deadline => panic!("hello not served over TLS: {other:?}"),
            _ => std::thread::sleep(POLL),
        }
    }
    let cases = [
        (
            post(
                "Content-Length: 44\r\nTransfer-Encoding: chunked",
                "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: hello.localhost\r\n\r\n",
            ),
            400,
        ),
        (chunked("5\r\nhello\r\n0x5\r\nworld\r\n0\r\n\r\n"), 400),
        (post("Transfer-Encoding: gzip, chunked", "0\r\n\r\n"), 501),
    ];
    for (request, status) in cases {
        let answer = tls_exchange(&https, &ca, &request).unwrap_or_else(|error| {
            panic!("{:?}: no clean close: {error}", String::from_utf8_lossy(&request))
        });
        assert_eq!(statuses(&answer), [status], "{answer:?}");
    }
}
