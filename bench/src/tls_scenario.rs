//! `atoll-bench tls`: what encryption costs at the edge, each figure beside its baseline.
//!
//! 1. New TLS 1.3 handshakes per second (ECDSA P-256, no resumption) against the node's TLS
//!    listener and against a bare tokio-rustls server with the same certificate; resumed
//!    handshakes (session tickets) on the node too.
//! 2. HTTPS keep-alive requests per second against cleartext, both through the same node and
//!    the same `wrk` command (HTTP/1.1, a fresh instance per request).
//! 3. HTTP/3 requests per second against HTTP/2 over TLS, with the same in-process client
//!    shape: N connections × M concurrent streams, each stream one request after another.
//!
//! Client and server share the machine, so absolute figures depend on it; the ratios are
//! the result. Issue targets: HTTPS ≥ 0.8× cleartext, HTTP/3 ≥ 0.5× HTTP/2.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use crate::http_scenario::{NodeSetup, start_node};
use crate::latency::Summary;
use crate::wrk::{self, Load};

#[derive(clap::Args)]
pub struct TlsArgs {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Concurrent handshaking clients.
    #[arg(long, default_value_t = 8)]
    handshake_clients: usize,
    /// Keep-alive connections for wrk (HTTPS vs cleartext).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// HTTP/2 and HTTP/3 connections.
    #[arg(long, default_value_t = 4)]
    multiplexed_connections: usize,
    /// Concurrent streams per HTTP/2 or HTTP/3 connection.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// The hello module (default: the example built by `cargo build`).
    #[arg(long)]
    hello_wasm: Option<std::path::PathBuf>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// The certificate everything here is served with.
struct TestCertificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    dir: tempfile::TempDir,
}

const SERVER_NAME: &str = "hello.localhost";

fn test_certificate() -> Result<TestCertificate> {
    let key = rcgen::KeyPair::generate()?;
    let certificate = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?.self_signed(&key)?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("hello.key"), key.serialize_pem())?;
    std::fs::write(dir.path().join("hello.crt"), certificate.pem())?;
    Ok(TestCertificate {
        chain: vec![certificate.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der()).map_err(anyhow::Error::msg)?,
        dir,
    })
}

/// One row of the report.
struct Row {
    group: &'static str,
    scenario: &'static str,
    per_second: f64,
    latency: Option<Summary>,
    failures: u64,
}

pub fn run(args: TlsArgs) -> Result<()> {
    let module = crate::http_scenario::read_hello(args.hello_wasm.clone())?;
    let certificate = test_certificate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let node = runtime.block_on(start_node(
        module,
        NodeSetup {
            certs_dir: Some(certificate.dir.path().to_path_buf()),
            with_image: false,
        },
    ))?;
    let https = node.https.context("node has no TLS listener")?;
    let h3 = node.h3.context("node has no HTTP/3 socket")?;
    let baseline = runtime.block_on(start_rustls_hello(&certificate))?;
    let duration = Duration::from_secs(args.duration);
    let roots = Arc::new(root_store(&certificate)?);
    let mut rows = Vec::new();

    // 1. Handshakes.
    let full = client_config(&roots, false);
    let resumed = client_config(&roots, true);
    runtime.block_on(handshakes(
        baseline,
        &full,
        args.handshake_clients,
        Duration::from_secs(1),
    ));
    for (scenario, address, config) in [
        ("rustls-full", baseline, &full),
        ("atoll-full", https, &full),
        ("atoll-resumed", https, &resumed),
    ] {
        let (per_second, failures) =
            runtime.block_on(handshakes(address, config, args.handshake_clients, duration));
        rows.push(Row {
            group: "handshakes",
            scenario,
            per_second,
            latency: None,
            failures,
        });
    }

    // 2. HTTPS keep-alive vs cleartext, same node, same wrk.
    let load = Load {
        threads: 1,
        connections: args.connections,
        duration,
    };
    let warmup = Load {
        duration: Duration::from_secs(1),
        ..load.clone()
    };
    let cleartext_url = format!("http://{}/", node.http);
    let https_url = format!("https://{https}/");
    wrk::run(&cleartext_url, SERVER_NAME, &warmup)?;
    wrk::run(&https_url, SERVER_NAME, &warmup)?;
    for (scenario, url) in [("cleartext", &cleartext_url), ("https", &https_url)] {
        let report = wrk::run(url, SERVER_NAME, &load)?;
        rows.push(Row {
            group: "keep-alive",
            scenario,
            per_second: report.requests_per_second,
            latency: Some(Summary {
                p50_us: report.p50.as_secs_f64() * 1e6,
                p99_us: report.p99.as_secs_f64() * 1e6,
            }),
            failures: report.errors,
        });
    }

    // 3. HTTP/2 vs HTTP/3, same client shape.
    let ca = certificate.chain[0].clone();
    let h2_config = Arc::new(alpn_config(&roots, b"h2"));
    runtime.block_on(h2_load(
        https,
        &h2_config,
        args.multiplexed_connections,
        args.streams,
        Duration::from_secs(1),
    ))?;
    let h2 = runtime.block_on(h2_load(
        https,
        &h2_config,
        args.multiplexed_connections,
        args.streams,
        duration,
    ))?;
    runtime.block_on(crate::h3_load::run(
        h3,
        SERVER_NAME,
        ca.clone(),
        "/",
        args.multiplexed_connections,
        args.streams,
        Duration::from_secs(1),
    ))?;
    let h3_report = runtime.block_on(crate::h3_load::run(
        h3,
        SERVER_NAME,
        ca,
        "/",
        args.multiplexed_connections,
        args.streams,
        duration,
    ))?;
    rows.push(Row {
        group: "multiplexed",
        scenario: "http2",
        per_second: h2.0,
        latency: Some(h2.1),
        failures: h2.2,
    });
    if let Some(failure) = &h3_report.first_failure {
        eprintln!("http3: first failure: {failure}");
    }
    let h3_latencies = h3_report
        .latencies_us
        .iter()
        .map(|&micros| Duration::from_micros(u64::from(micros)))
        .collect::<Vec<_>>();
    rows.push(Row {
        group: "multiplexed",
        scenario: "http3",
        per_second: h3_report.requests_per_second(),
        latency: (!h3_latencies.is_empty()).then(|| Summary::of(h3_latencies)),
        failures: h3_report.failures,
    });
    report(&rows, &args);
    drop(node);
    drop(runtime);
    Ok(())
}

fn rate(rows: &[Row], scenario: &str) -> f64 {
    rows.iter()
        .find(|row| row.scenario == scenario)
        .map_or(f64::NAN, |row| row.per_second)
}

fn report(rows: &[Row], args: &TlsArgs) {
    let ratios = [
        (
            "atoll/rustls full handshakes",
            rate(rows, "atoll-full") / rate(rows, "rustls-full"),
        ),
        (
            "https/cleartext keep-alive req/s",
            rate(rows, "https") / rate(rows, "cleartext"),
        ),
        ("http3/http2 req/s", rate(rows, "http3") / rate(rows, "http2")),
    ];
    if args.json {
        for row in rows {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "tls",
                    "group": row.group,
                    "scenario": row.scenario,
                    "per_second": row.per_second.round(),
                    "p50_us": row.latency.map(|latency| latency.p50_us.round()),
                    "p99_us": row.latency.map(|latency| latency.p99_us.round()),
                    "failures": row.failures,
                })
            );
        }
        for (name, ratio) in ratios {
            println!(
                "{}",
                serde_json::json!({"bench": "tls", "ratio": name, "value": (ratio * 1000.0).round() / 1000.0})
            );
        }
        return;
    }
    println!(
        "tls: {} s each; handshakes: {} clients, TLS 1.3 ECDSA P-256; keep-alive: wrk -t1 -c{}; \
         multiplexed: {} connections x {} streams",
        args.duration, args.handshake_clients, args.connections, args.multiplexed_connections, args.streams
    );
    println!(
        "{:<12} {:<14} {:>12} {:>10} {:>10} {:>9}",
        "group", "scenario", "per second", "p50", "p99", "failures"
    );
    for row in rows {
        let (p50, p99) = match row.latency {
            Some(latency) => (
                format!("{:.0}µs", latency.p50_us),
                format!("{:.0}µs", latency.p99_us),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<12} {:<14} {:>12.0} {:>10} {:>10} {:>9}",
            row.group, row.scenario, row.per_second, p50, p99, row.failures
        );
    }
    for (name, ratio) in ratios {
        println!("ratio {name}: {ratio:.3}");
    }
}

fn root_store(certificate: &TestCertificate) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate.chain[0].clone())?;
    Ok(roots)
}

/// A TLS 1.3 client; `resume` keeps session tickets between connections.
fn client_config(roots: &Arc<rustls::RootCertStore>, resume: bool) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(Arc::clone(roots))
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

fn alpn_config(roots: &Arc<rustls::RootCertStore>, alpn: &[u8]) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(Arc::clone(roots))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// Completed handshakes per second (and failures) from `clients` loops of connect +
/// handshake + close.
async fn handshakes(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    clients: usize,
    duration: Duration,
) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            tokio::spawn(async move {
                let name = ServerName::try_from(SERVER_NAME).expect("valid name");
                while Instant::now() < deadline {
                    let outcome = async {
                        let stream = TcpStream::connect(address).await?;
                        stream.set_nodelay(true)?;
                        let mut tls = connector.connect(name.clone(), stream).await?;
                        tokio::io::AsyncWriteExt::shutdown(&mut tls).await?;
                        std::io::Result::Ok(())
                    }
                    .await;
                    match outcome {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        done.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed),
    )
}

/// HTTP/2 over TLS: `connections` × `streams` loops of GET /. Returns req/s, latency and
/// failures.
async fn h2_load(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    connections: usize,
    streams: usize,
    duration: Duration,
) -> Result<(f64, Summary, u64)> {
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let tls = connector
            .connect(ServerName::try_from(SERVER_NAME)?, stream)
            .await?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        for _ in 0..streams {
            let mut sender = sender.clone();
            let failures = Arc::clone(&failures);
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let request = http::Request::get(format!("https://{SERVER_NAME}/"))
                        .body(Empty::<Bytes>::new())
                        .expect("valid request");
                    let sent = Instant::now();
                    let ok = match sender.send_request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            response.into_body().collect().await.is_ok() && status.is_success()
                        }
                        Err(_) => false,
                    };
                    if ok {
                        latencies.push(sent.elapsed());
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if sender.ready().await.is_err() {
                            break;
                        }
                    }
                }
                latencies
            }));
        }
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests = latencies.len() as f64;
    anyhow::ensure!(!latencies.is_empty(), "no HTTP/2 request succeeded");
    Ok((
        requests / elapsed,
        Summary::of(latencies),
        failures.load(Ordering::Relaxed),
    ))
}

/// The handshake baseline: tokio-rustls with rustls' defaults and the same certificate,
/// answering a hyper hello on whatever it accepts.
async fn start_rustls_hello(certificate: &TestCertificate) -> Result<SocketAddr> {
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certificate.chain.clone(), certificate.key.clone_key())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"Hello from rustls!\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(address)
}
