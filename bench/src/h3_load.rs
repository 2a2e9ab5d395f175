//! HTTP/3 load from a quinn + h3 client, to set beside h2load's HTTP/2 figures.
//!
//! Closed loop, like wrk and h2load: `connections` QUIC connections, each with
//! `streams_per_connection` workers that send a GET, read the whole response, and send the
//! next one, until the time (or request) budget is spent. Each connection has its own UDP
//! socket and quinn endpoint, so its driver task can run on any core instead of all
//! connections sharing one socket's task.
//!
//! The module depends only on its crates (no `crate::` paths): `tests/e2e_http3.rs` includes
//! it by path to drive the node with the same client the bench measures with.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Buf, Bytes};
use rustls_pki_types::CertificateDer;

/// What a load run did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests answered with a 2xx status and a complete body.
    pub requests: u64,
    /// Requests that failed: other statuses, stream or connection errors.
    pub failures: u64,
    /// Latency of each successful request, in microseconds, in completion order.
    pub latencies_us: Vec<u32>,
    /// Wall time from the first connection attempt to the last response.
    pub elapsed: Duration,
    /// The first failure, for diagnostics.
    pub first_failure: Option<String>,
}

impl LoadReport {
    /// Successful requests per second.
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy)]
enum Budget {
    Time(Instant),
    #[allow(dead_code)] // Built by `run_requests` only.
    Requests(u64),
}

/// Runs GET `path` on `server_name` (the SNI and `:authority`) at `addr` for `duration`,
/// trusting only `ca_der`.
pub async fn run(
    addr: SocketAddr,
    server_name: &str,
    ca_der: CertificateDer<'static>,
    path: &str,
    connections: usize,
    streams_per_connection: usize,
    duration: Duration,
) -> anyhow::Result<LoadReport> {
    let budget = Budget::Time(Instant::now() + duration);
    load(
        addr,
        server_name,
        ca_der,
        path,
        connections,
        streams_per_connection,
        budget,
    )
    .await
}

/// Like [`run`], but sends exactly `requests` requests (spread over all streams) instead of
/// running for a time. The e2e tests use it; the bench runs for a time.
#[allow(dead_code)]
pub async fn run_requests(
    addr: SocketAddr,
    server_name: &str,
    ca_der: CertificateDer<'static>,
    path: &str,
    connections: usize,
    streams_per_connection: usize,
    requests: u64,
) -> anyhow::Result<LoadReport> {
    let budget = Budget::Requests(requests);
    load(
        addr,
        server_name,
        ca_der,
        path,
        connections,
        streams_per_connection,
        budget,
    )
    .await
}

/// Counters the workers of every connection share.
#[derive(Default)]
struct Tally {
    /// Requests started so far (the request budget draws on it).
    started: AtomicU64,
    failures: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Tally {
    /// Claims the next request, unless the budget is spent.
    fn claim(&self, budget: Budget) -> bool {
        match budget {
            Budget::Time(deadline) => Instant::now() < deadline,
            Budget::Requests(total) => self.started.fetch_add(1, Ordering::Relaxed) < total,
        }
    }

    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_failure
            .lock()
            .unwrap_or_else(|error| error.into_inner());
        first.get_or_insert(what);
    }
}

async fn load(
    addr: SocketAddr,
    server_name: &str,
    ca_der: CertificateDer<'static>,
    path: &str,
    connections: usize,
    streams_per_connection: usize,
    budget: Budget,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(
        connections > 0 && streams_per_connection > 0,
        "no connections or streams"
    );
    let client_config = client_config(ca_der)?;
    let uri: http::Uri = format!("https://{server_name}{path}")
        .parse()
        .with_context(|| format!("request URI for {server_name} and {path}"))?;
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let client_config = client_config.clone();
        let server_name = server_name.to_string();
        let uri = uri.clone();
        let tally = Arc::clone(&tally);
        tasks.spawn(async move {
            match connect(addr, &server_name, client_config).await {
                Ok(connection) => connection.drive(uri, streams_per_connection, budget, tally).await,
                Err(error) => {
                    tally.fail(format!("connect: {error:#}"));
                    Vec::new()
                }
            }
        });
    }
    let mut latencies_us = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        latencies_us.extend(joined.context("load task panicked")?);
    }
    let first_failure = tally
        .first_failure
        .lock()
        .unwrap_or_else(|error| error.into_inner())
        .take();
    Ok(LoadReport {
        requests: latencies_us.len() as u64,
        failures: tally.failures.load(Ordering::Relaxed),
        latencies_us,
        elapsed: started.elapsed(),
        first_failure,
    })
}

/// TLS 1.3 with ALPN `h3`, trusting `ca_der` alone.
pub fn client_config(ca_der: CertificateDer<'static>) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).context("the CA certificate")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// One HTTP/3 connection: its endpoint (own socket) and the h3 request handle.
pub struct Connection {
    _endpoint: quinn::Endpoint,
    quic: quinn::Connection,
    send_request: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

/// Opens an HTTP/3 connection to `addr` for `server_name` from a socket of its own.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    config: quinn::ClientConfig,
) -> anyhow::Result<Connection> {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    let quic = endpoint.connect(addr, server_name)?.await?;
    let (mut driver, send_request) = h3::client::new(h3_quinn::Connection::new(quic.clone())).await?;
    let driver = tokio::spawn(async move {
        let _ = std::future::poll_fn(|context| driver.poll_close(context)).await;
    });
    Ok(Connection {
        _endpoint: endpoint,
        quic,
        send_request,
        driver,
    })
}

impl Connection {
    /// A handle to send requests on this connection (one per concurrent stream).
    pub fn sender(&self) -> h3::client::SendRequest<h3_quinn::OpenStreams, Bytes> {
        self.send_request.clone()
    }

    /// Closes the connection and stops its driver.
    pub fn close(self) {
        drop(self.send_request);
        self.quic.close(0u32.into(), b"done");
        self.driver.abort();
    }

    /// Runs `streams` workers on this connection until the budget is spent; returns the
    /// latencies of the successful requests.
    async fn drive(self, uri: http::Uri, streams: usize, budget: Budget, tally: Arc<Tally>) -> Vec<u32> {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let mut send_request = self.sender();
            let uri = uri.clone();
            let tally = Arc::clone(&tally);
            workers.spawn(async move {
                let mut latencies = Vec::new();
                while tally.claim(budget) {
                    let started = Instant::now();
                    match get(&mut send_request, &uri).await {
                        Ok(()) => {
                            latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX))
                        }
                        Err(error) => tally.fail(format!("{error:#}")),
                    }
                }
                latencies
            });
        }
        let mut latencies = Vec::new();
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(worker) => latencies.extend(worker),
                Err(error) => tally.fail(format!("worker: {error}")),
            }
        }
        self.close();
        latencies
    }
}

/// One GET, its response read to the end; a non-2xx status is an error.
async fn get(
    send_request: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    uri: &http::Uri,
) -> anyhow::Result<()> {
    let (status, _) = request(send_request, http::Method::GET, uri, None).await?;
    anyhow::ensure!(status.is_success(), "status {status}");
    Ok(())
}

/// One request with an optional body; returns the status and the whole response body.
pub async fn request(
    send_request: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    method: http::Method,
    uri: &http::Uri,
    body: Option<Bytes>,
) -> anyhow::Result<(http::StatusCode, Vec<u8>)> {
    let mut builder = http::Request::builder().method(method).uri(uri.clone());
    if let Some(body) = &body {
        builder = builder.header(http::header::CONTENT_LENGTH, body.len());
    }
    let mut stream = send_request
        .send_request(builder.body(())?)
        .await
        .context("send request")?;
    if let Some(body) = body {
        stream.send_data(body).await.context("send body")?;
    }
    stream.finish().await.context("finish request")?;
    let response = stream.recv_response().await.context("receive response")?;
    let mut received = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.context("receive body")? {
        while chunk.has_remaining() {
            let part = chunk.chunk();
            received.extend_from_slice(part);
            let read = part.len();
            chunk.advance(read);
        }
    }
    Ok((response.status(), received))
}
