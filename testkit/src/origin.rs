//! A real HTTP(S) server on loopback for outbound-call tests, with its own CA: what a
//! function's outbound call reaches in a test (no test may touch the internet).
//!
//! Paths:
//! - `/hello`: 200, `text/plain`, `x-multi: a` and `x-multi: b`, body `hello from origin`
//! - `/bytes?n=N`: N bytes of `x`
//! - `/echo`: the method, every `x-` and `atoll-` header and the body, as text
//! - `/delay?ms=N`: answers `delayed` after N ms
//! - `/slow`: never answers
//! - `/redirect`: 302 to `/hello`
//! - `/whoami`: the origin's port (which of several answered)
//! - `/close`: 200 `closing`, with `Connection: close`, then the connection ends
//! - `/headers`: every request header, `name: value` per line, sorted
//! - `/ws`: a WebSocket echo (every message sent back as it came)
//! - `/drop`: reads the request, then closes the connection without answering
//! - anything else: 404
//!
//! [`TestOrigin::stop`] closes the listener and every open connection, as a crash would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};

/// A CA that signs the origin's certificate; trust [`TestCa::pem`] to reach it.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "atoll test CA");
        let certified = rcgen::CertifiedIssuer::self_signed(params.clone(), key).expect("a CA certificate");
        let pem = certified.pem();
        let key = rcgen::KeyPair::from_pem(&certified.key().serialize_pem()).expect("the CA key again");
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate chain and key (DER) for `names`, signed by this CA.
    fn leaf(
        &self,
        names: &[&str],
    ) -> (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate().expect("a leaf key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>())
                .expect("leaf parameters");
        let certificate = params.signed_by(&key, &self.issuer).expect("a leaf certificate");
        (
            vec![certificate.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// The origin server; stops when dropped.
pub struct TestOrigin {
    pub address: SocketAddr,
    tls: bool,
    requests: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TestOrigin {
    /// Plain HTTP on 127.0.0.1.
    pub async fn http() -> TestOrigin {
        TestOrigin::start(None).await
    }

    /// HTTPS on 127.0.0.1 with a certificate for `localhost` signed by `ca`.
    pub async fn https(ca: &TestCa) -> TestOrigin {
        let (chain, key) = ca.leaf(&["localhost"]);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the origin's certificate");
        TestOrigin::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> TestOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the origin");
        let address = listener.local_addr().expect("the origin's address");
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepted_count = Arc::clone(&accepted);
        let is_tls = tls.is_some();
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let tracked = Arc::clone(&connections);
        let port = address.port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted_count.fetch_add(1, Ordering::SeqCst);
                let counted = Arc::clone(&counted);
                let tls = tls.clone();
                let connection = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        answer(request, port)
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
                let mut open = tracked.lock().expect("connections");
                open.retain(|handle| !handle.is_finished());
                open.push(connection.abort_handle());
            }
        });
        TestOrigin {
            address,
            tls: is_tls,
            requests,
            accepted,
            task,
            connections,
        }
    }

    /// Stops at once: the listener and every connection, mid-request or not.
    pub fn stop(&self) {
        self.task.abort();
        for connection in self.connections.lock().expect("connections").drain(..) {
            connection.abort();
        }
    }

    /// The URL of `path`: `http://127.0.0.1:PORT/path`, or `https://localhost:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        if self.tls {
            format!("https://localhost:{}{path}", self.address.port())
        } else {
            format!("http://{}{path}", self.address)
        }
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn answer(
    mut request: Request<hyper::body::Incoming>,
    port: u16,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let query = request.uri().query().unwrap_or("").to_string();
    let number = |name: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let text = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(body)))
            .expect("a response")
    };
    let response = match request.uri().path() {
        "/hello" => Response::builder()
            .header("content-type", "text/plain")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(Full::new(Bytes::from_static(b"hello from origin")))
            .expect("a response"),
        "/bytes" => text(200, "x".repeat(number("n") as usize)),
        "/echo" => {
            let mut lines = format!("method={}\n", request.method());
            let mut headers: Vec<String> = request
                .headers()
                .iter()
                .filter(|(name, _)| name.as_str().starts_with("x-") || name.as_str().starts_with("atoll-"))
                .map(|(name, value)| format!("header {name}={}\n", value.to_str().unwrap_or("?")))
                .collect();
            headers.sort();
            lines.extend(headers);
            let body = request
                .into_body()
                .collect()
                .await
                .map(|body| body.to_bytes())
                .unwrap_or_default();
            lines.push_str(&format!("body={}", String::from_utf8_lossy(&body)));
            text(200, lines)
        }
        "/delay" => {
            tokio::time::sleep(Duration::from_millis(number("ms"))).await;
            text(200, "delayed".into())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            text(200, "too late".into())
        }
        "/whoami" => text(200, port.to_string()),
        // Answers, then closes the connection.
        "/close" => Response::builder()
            .header("connection", "close")
            .body(Full::new(Bytes::from_static(b"closing")))
            .expect("a response"),
        "/headers" => {
            let mut lines: Vec<String> = request
                .headers()
                .iter()
                .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            text(200, lines.concat())
        }
        "/ws" => return Ok(websocket_echo(&mut request)),
        "/drop" => {
            let _ = request.into_body().collect().await;
            return Err(std::io::Error::other("dropped on purpose"));
        }
        "/redirect" => Response::builder()
            .status(302)
            .header("location", "/hello")
            .body(Full::new(Bytes::new()))
            .expect("a response"),
        _ => text(404, "not found".into()),
    };
    Ok(response)
}

/// Accepts a WebSocket handshake and echoes every message on the upgraded connection.
fn websocket_echo(request: &mut Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return Response::builder()
            .status(400)
            .body(Full::new(Bytes::from_static(b"not a websocket handshake")))
            .expect("a response");
    };
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
            if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .expect("a response")
}
