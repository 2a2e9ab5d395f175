//! `atoll-bench soak`: minutes of mixed load against one node while its deployments churn
//! and misbehaving guests are hit beside it, checking the promises a multi-tenant node makes.
//!
//! The registry and the node run as `atoll registry` and `atoll node` processes (the binary
//! beside this one, or `--atoll`), so that the node's memory, descriptors and threads are
//! its own and can be read from `/proc`. Beside it, from this process:
//!
//! - well-behaved load, closed loop: `hello` (GET) and `echo` (POST with a body it must
//!   return) over HTTP/1.1 (cleartext), HTTP/2 over TLS and HTTP/3 (self-signed certificate),
//!   connections renewed every few hundred requests. Any error, non-2xx or wrong body is a
//!   failure, counted with its reason;
//! - churn: every few seconds a new version of `hello` or `echo` is pushed, or rolled back,
//!   and the time until the node serves it is measured (a refused push, one with no answer,
//!   or one never served is counted, not fatal);
//! - misbehaving guests, pushed once before the load: the `fault` example's `/loop`, `/spin`,
//!   `/grow`, `/leak`, `/trap` with a short timeout, and hand-written hostile modules
//!   ([`crate::soak_guests`]), each hit about once a second with a client timeout.
//!
//! Reported: requests sent and failed per protocol and function; the node's RSS, open fds and
//! threads every few seconds (a curve, with first/last/max); the CPU its threads use in the
//! seconds after the load stops (a thread left spinning shows there); whether guest stderr
//! forged lines in the node's log; and a verdict per promise. The bench exits non-zero when
//! a verdict fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::latency::Summary;
use crate::soak_guests::{self, Expected, FORGED_LOG_PREFIX, HostileTarget};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the load runs, e.g. `10m` or `90s`.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How often the node's RSS, fds and threads are sampled.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    sample_every: Duration,
    /// How often a version is pushed or rolled back (alternating hello and echo).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    churn_every: Duration,
    /// Pause between two requests to the same misbehaving guest.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    hostile_every: Duration,
    /// HTTP/1.1 connections per well-behaved function.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Concurrent streams on the HTTP/2 and on the HTTP/3 connection, per function.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Size of each echo request body, in bytes.
    #[arg(long, default_value_t = 4096)]
    body_bytes: usize,
    /// Client timeout of a well-behaved request (past it, the request failed).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Client timeout of a request to a misbehaving guest.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    hostile_timeout: Duration,
    /// How long a push or rollback may take to answer, and then to be served.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    push_timeout: Duration,
    /// Misbehaving guests to leave out (neither pushed nor hit), e.g. `random-fill,start-loop`:
    /// fault, start-loop, start-loop-init, init-grow, random-fill, log-forge.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// The `atoll` binary (default: the one beside this binary; `cargo build --release`).
    #[arg(long)]
    atoll: Option<PathBuf>,
    /// Where the registry and node keep their state and logs (default: a temporary
    /// directory, removed at the end).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print one JSON object per line instead of tables.
    #[arg(long)]
    json: bool,
}

/// RSS is flat when the lower of the last quarter's median sample and the RSS after the load
/// is at most this much above the second quarter's median (the first is warm-up): the larger
/// of an absolute and a relative margin.
const RSS_TOLERANCE_MIB: f64 = 32.0;
const RSS_TOLERANCE_RATIO: f64 = 0.20;
/// Open fds are flat when, once the load is over, the node holds at most this many more
/// than before it began.
const FD_TOLERANCE: i64 = 8;
/// When, after the load stops, the node's fds are counted again: past tokio's 10 s
/// keep-alive of idle blocking threads, so that threads (and what they hold) that served the
/// load have gone.
const FD_SETTLE: Duration = Duration::from_secs(12);
/// Time given to in-flight work after the load stops, before the idle window.
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// The window over which the node's CPU is measured after the load.
const IDLE_WINDOW: Duration = Duration::from_secs(5);
/// "No thread left spinning": the node's threads together use at most this share of one
/// core over the idle window.
const IDLE_CPU_LIMIT: f64 = 0.05;
/// `/proc/*/stat` counts CPU time in USER_HZ ticks, 100 per second on every Linux ABI.
pub(crate) const USER_HZ: f64 = 100.0;
/// A connection is replaced after this many requests, so connections open and close all
/// through the run.
const REQUESTS_PER_CONNECTION: usize = 400;
/// A misbehaving target the client has timed out on this often is not hit again: on a node
/// that does not stop its guest, every timed-out request may leave a thread spinning.
const HOSTILE_GIVE_UP_AFTER: u64 = 3;
const TOKEN: &str = "soak-token";

pub fn run(args: SoakArgs) -> Result<()> {
    let atoll = match &args.atoll {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("atoll"),
    };
    anyhow::ensure!(
        atoll.is_file(),
        "no atoll binary at {} (build it with `cargo build --release`, or pass --atoll)",
        atoll.display()
    );
    let hello = soak_guests::example_wasm("hello")?;
    let echo = soak_guests::example_wasm("echo")?;
    let mut hostile = soak_guests::hostile_guests()?;
    for name in &args.skip {
        anyhow::ensure!(
            hostile.iter().any(|guest| guest.name == name),
            "--skip {name}: no such guest (known: {})",
            hostile
                .iter()
                .map(|guest| guest.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    hostile.retain(|guest| !args.skip.iter().any(|name| name == guest.name));
    let temporary = match &args.data {
        Some(_) => None,
        None => Some(tempfile::tempdir()?),
    };
    let data = match (&args.data, &temporary) {
        (Some(data), _) => data.clone(),
        (None, Some(temporary)) => temporary.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory when --data is absent"),
    };
    std::fs::create_dir_all(&data)?;
    let certificate = write_certificate(&data.join("certs"))?;
    // Each hostile guest as a folder `atoll push` takes, to replay one by hand.
    for guest in &hostile {
        let dir = data.join("guests").join(guest.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("atoll.toml"), &guest.manifest)?;
        std::fs::write(dir.join(format!("{}.wasm", guest.name)), &guest.module)?;
    }

    let registry = Server::start(
        "registry",
        &atoll,
        &[
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--data",
            &data.join("registry").to_string_lossy(),
        ],
        &data.join("registry.log"),
    )?;
    let registry_url = registry.address("registry listening on http://")?;
    let registry_url = format!("http://{registry_url}");
    let node = Server::start(
        "node",
        &atoll,
        &[
            "node",
            "--registry",
            &registry_url,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--certs",
            &data.join("certs").to_string_lossy(),
            "--data",
            &data.join("node").to_string_lossy(),
            "--name",
            "soak",
            "--region",
            "soak",
        ],
        &data.join("node.log"),
    )?;
    let addresses = Addresses {
        http: node.address("node listening on http://")?,
        https: node.address("node listening on https://")?,
        h3: node.address("node listening on h3://")?,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let client = atoll_control::RegistryClient::new(&registry_url, Some(TOKEN.to_string()))?;
    let mut churn = Churn::new(hello, echo);
    let (hostile_pushes, quiet_before) = runtime.block_on(async {
        for function in ["hello", "echo"] {
            churn
                .push(&client, function, args.push_timeout)
                .await
                .with_context(|| format!("pushing {function} before the load"))?;
        }
        for function in ["hello", "echo"] {
            let greeting = churn.greeting(function, churn.active(function));
            wait_served(addresses.http, function, &greeting, args.push_timeout)
                .await
                .with_context(|| format!("{function} before the load"))?;
        }
        let mut pushes = Vec::new();
        for guest in &hostile {
            let outcome = push_outcome(
                tokio::time::timeout(
                    args.push_timeout,
                    client.push(&guest.manifest, guest.module.clone()),
                )
                .await,
                args.push_timeout,
            );
            if !args.json {
                eprintln!("soak: pushed {}: {}", guest.name, outcome.text());
            }
            pushes.push((guest.name, guest.expected_push, outcome));
        }
        // Give the node a moment to take (or refuse) the hostile deployments.
        tokio::time::sleep(Duration::from_secs(2)).await;
        anyhow::Ok((pushes, sample(node.pid)))
    })?;
    let kinds_before = fd_kinds(node.pid);
    let quiet_before = quiet_before.context("the node exited before the load")?;

    let config = Arc::new(LoadConfig::new(&args, addresses, &certificate)?);
    let started = Instant::now();
    if !args.json {
        eprintln!(
            "soak: load for {} against node pid {} (logs in {})",
            humantime::format_duration(args.duration),
            node.pid,
            data.display()
        );
    }
    let outcome = runtime.block_on(soak(
        &args,
        Arc::clone(&config),
        client,
        churn,
        node.pid,
        registry.pid,
        started,
    ))?;

    // The load is over: in-flight work gets a moment, then the node's threads are watched.
    let load_ended = Instant::now();
    std::thread::sleep(IDLE_GRACE);
    let registry_idle = idle_cpu(registry.pid, Duration::ZERO);
    let node_idle = idle_cpu(node.pid, IDLE_WINDOW).finish();
    let registry_idle = registry_idle.finish();
    std::thread::sleep(FD_SETTLE.saturating_sub(load_ended.elapsed()));
    let quiet_after = sample(node.pid);
    let kinds_after = fd_kinds(node.pid);
    let node_exit = node.exited();
    let registry_exit = registry.exited();
    drop(runtime);
    drop(node);
    drop(registry);
    let forged = count_forged_lines(&data.join("node.log"));
    let node_exit = node_exit.map(|exit| match first_panic(&data.join("node.log")) {
        Some(panic) => format!("{exit}: {panic}"),
        None => exit,
    });

    let result = SoakResult {
        duration: args.duration,
        elapsed: outcome.elapsed,
        rows: outcome.rows,
        probes: outcome.probes,
        churn: outcome.churn,
        hostile_pushes,
        hostile_hits: outcome.hostile,
        samples: outcome.samples,
        quiet_before,
        quiet_after,
        kinds_before,
        kinds_after,
        node_idle,
        registry_idle,
        forged,
        node_exit,
        registry_exit,
    };
    let failed = report(&result, &args);
    drop(temporary);
    if !failed.is_empty() {
        // A broken promise is the result, not an error of the bench: say it, no backtrace.
        eprintln!("soak: promises broken: {}", failed.join(", "));
        std::process::exit(1);
    }
    Ok(())
}

/// The node's client-facing addresses.
#[derive(Clone, Copy)]
struct Addresses {
    http: SocketAddr,
    https: SocketAddr,
    h3: SocketAddr,
}

/// A child process (`atoll registry` or `atoll node`), killed when dropped.
struct Server {
    child: Child,
    pid: u32,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Mutex<Vec<String>>,
    log: PathBuf,
    name: &'static str,
}

impl Server {
    fn start(name: &'static str, atoll: &Path, args: &[&str], log: &Path) -> Result<Server> {
        let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(atoll)
            .args(args)
            .env("ATOLL_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} {}", atoll.display(), args[0]))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Server {
            pid: child.id(),
            child,
            lines,
            seen: Mutex::new(Vec::new()),
            log: log.to_path_buf(),
            name,
        })
    }

    /// The address printed on the stdout line that starts with `prefix`.
    fn address(&self, prefix: &str) -> Result<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = self.seen.lock().unwrap_or_else(|error| error.into_inner());
        loop {
            if let Some(rest) = seen.iter().find_map(|line| line.strip_prefix(prefix)) {
                return rest
                    .trim_end_matches('/')
                    .parse()
                    .with_context(|| format!("{}: parsing {rest:?}", self.name));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => bail!(
                    "{} printed no `{prefix}…` line within 30 s (log: {})",
                    self.name,
                    self.log.display()
                ),
            }
        }
    }

    /// Whether the process ended (it stays a zombie until the bench reaps it).
    fn exited(&self) -> Option<String> {
        (!alive(self.pid)).then(|| format!("{} exited", self.name))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for the churned functions' names, written as a PEM pair for
/// `--certs`; returns it in DER for the clients.
fn write_certificate(dir: &Path) -> Result<CertificateDer<'static>> {
    std::fs::create_dir_all(dir)?;
    let key = rcgen::KeyPair::generate()?;
    let names = ["hello.localhost", "echo.localhost"].map(String::from).to_vec();
    let certificate = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
    std::fs::write(dir.join("soak.key"), key.serialize_pem())?;
    std::fs::write(dir.join("soak.crt"), certificate.pem())?;
    Ok(certificate.der().clone())
}

// ---------------------------------------------------------------------------------------
// Well-behaved load.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Protocol {
    Http1,
    Http2,
    Http3,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2 (tls)",
            Protocol::Http3 => "h3",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Function {
    Hello,
    Echo,
}

impl Function {
    fn name(self) -> &'static str {
        match self {
            Function::Hello => "hello",
            Function::Echo => "echo",
        }
    }

    fn host(self) -> &'static str {
        match self {
            Function::Hello => "hello.localhost",
            Function::Echo => "echo.localhost",
        }
    }
}

/// What the load tasks share.
struct LoadConfig {
    addresses: Addresses,
    tls: Arc<rustls::ClientConfig>,
    quic: quinn::ClientConfig,
    payload: Bytes,
    request_timeout: Duration,
    stop: AtomicBool,
}

impl LoadConfig {
    fn new(args: &SoakArgs, addresses: Addresses, ca: &CertificateDer<'static>) -> Result<LoadConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone())?;
        let mut tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let payload: Vec<u8> = (0..args.body_bytes)
            .map(|index| b'a' + (index % 26) as u8)
            .collect();
        Ok(LoadConfig {
            addresses,
            tls: Arc::new(tls),
            quic: crate::h3_load::client_config(ca.clone())?,
            payload: Bytes::from(payload),
            request_timeout: args.request_timeout,
            stop: AtomicBool::new(false),
        })
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

/// Requests sent and failed, with each failure's reason.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    failed: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn fail(&self, reason: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let reason = clip(&reason, 160);
        *self
            .reasons
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    fn reasons(&self) -> BTreeMap<String, u64> {
        self.reasons
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .clone()
    }
}

/// One open connection of any protocol.
enum Connection {
    Http1(Option<http1::SendRequest<Full<Bytes>>>),
    Http2(http2::SendRequest<Full<Bytes>>),
    Http3(crate::h3_load::Connection),
}

/// A handle that sends requests one after another on a [`Connection`].
enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
    Http3(h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>),
}

async fn connect(protocol: Protocol, function: Function, config: &LoadConfig) -> Result<Connection> {
    match protocol {
        Protocol::Http1 => {
            let stream = TcpStream::connect(config.addresses.http).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            Ok(Connection::Http1(Some(sender)))
        }
        Protocol::Http2 => {
            let stream = TcpStream::connect(config.addresses.https).await?;
            stream.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config.tls))
                .connect(ServerName::try_from(function.host())?.to_owned(), stream)
                .await
                .context("tls handshake")?;
            let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
            tokio::spawn(connection);
            Ok(Connection::Http2(sender))
        }
        Protocol::Http3 => Ok(Connection::Http3(
            crate::h3_load::connect(config.addresses.h3, function.host(), config.quic.clone()).await?,
        )),
    }
}

impl Connection {
    fn sender(&mut self) -> Option<Sender> {
        match self {
            Connection::Http1(sender) => sender.take().map(Sender::Http1),
            Connection::Http2(sender) => Some(Sender::Http2(sender.clone())),
            Connection::Http3(connection) => Some(Sender::Http3(connection.sender())),
        }
    }

    fn close(self) {
        if let Connection::Http3(connection) = self {
            connection.close();
        }
    }
}

impl Sender {
    /// Sends one request for `function` (GET for hello, POST `payload` for echo); returns
    /// the status and the whole body.
    async fn send(&mut self, function: Function, payload: &Bytes) -> Result<(StatusCode, Bytes)> {
        let (method, body) = match function {
            Function::Hello => (Method::GET, None),
            Function::Echo => (Method::POST, Some(payload.clone())),
        };
        let build = |uri: String| {
            http::Request::builder()
                .method(method.clone())
                .uri(uri)
                .header(http::header::HOST, function.host())
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(body.clone().unwrap_or_default()))
        };
        match self {
            Sender::Http1(sender) => {
                sender.ready().await?;
                let response = sender.send_request(build("/".into())?).await?;
                let status = response.status();
                Ok((status, response.into_body().collect().await?.to_bytes()))
            }
            Sender::Http2(sender) => {
                sender.ready().await?;
                let mut request = build(format!("https://{}/", function.host()))?;
                request.headers_mut().remove(http::header::HOST);
                let response = sender.send_request(request).await?;
                let status = response.status();
                Ok((status, response.into_body().collect().await?.to_bytes()))
            }
            Sender::Http3(sender) => {
                let uri: http::Uri = format!("https://{}/", function.host()).parse()?;
                let (status, body) = crate::h3_load::request(sender, method, &uri, body).await?;
                Ok((status, Bytes::from(body)))
            }
        }
    }
}

/// Why a well-behaved answer is wrong, if it is.
fn check(function: Function, status: StatusCode, body: &[u8], payload: &[u8]) -> Option<String> {
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(80)])
            .trim()
            .to_string();
        return Some(format!("status {}: {text}", status.as_u16()));
    }
    match function {
        Function::Hello if !contains(body, b" from Atoll on hello.localhost") => {
            Some("hello answered an unexpected body".into())
        }
        Function::Echo
            if !body.ends_with(payload)
                || !contains(body, format!("BODY_LENGTH={}\n", payload.len()).as_bytes()) =>
        {
            Some("echo did not return the request body".into())
        }
        _ => None,
    }
}

/// `text` cut to at most `limit` bytes, on a character boundary.
fn clip(text: &str, limit: usize) -> String {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// One protocol × function: `connections` loops, each opening a connection, running
/// `streams` concurrent request loops on it for up to [`REQUESTS_PER_CONNECTION`] requests,
/// and opening the next. Returns the latencies of the successful requests, in µs.
async fn load(
    protocol: Protocol,
    function: Function,
    streams: usize,
    config: Arc<LoadConfig>,
    tally: Arc<Tally>,
) -> Vec<u32> {
    let mut latencies = Vec::new();
    while config.running() {
        let mut connection =
            match tokio::time::timeout(config.request_timeout, connect(protocol, function, &config)).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => {
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    tally.fail(format!("connect: {error:#}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => {
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    tally.fail("connect: timed out".into());
                    continue;
                }
            };
        let mut workers = JoinSet::new();
        for _ in 0..streams {
            let Some(mut sender) = connection.sender() else {
                break;
            };
            let (config, tally) = (Arc::clone(&config), Arc::clone(&tally));
            workers.spawn(async move {
                let mut latencies = Vec::new();
                for _ in 0..REQUESTS_PER_CONNECTION / streams.max(1) {
                    if !config.running() {
                        break;
                    }
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    let outcome =
                        tokio::time::timeout(config.request_timeout, sender.send(function, &config.payload))
                            .await;
                    let problem = match outcome {
                        Ok(Ok((status, body))) => check(function, status, &body, &config.payload),
                        Ok(Err(error)) => Some(format!("{error:#}")),
                        Err(_) => Some(format!(
                            "no answer within {}",
                            humantime::format_duration(config.request_timeout)
                        )),
                    };
                    match problem {
                        None => {
                            latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX))
                        }
                        Some(reason) => {
                            tally.fail(reason);
                            // The connection may be broken: the worker stops, the next
                            // connection starts fresh.
                            break;
                        }
                    }
                }
                latencies
            });
        }
        while let Some(joined) = workers.join_next().await {
            latencies.extend(joined.unwrap_or_default());
        }
        connection.close();
    }
    latencies
}

// ---------------------------------------------------------------------------------------
// Churn: pushes and rollbacks.

/// Versions of the churned functions and the greeting each serves.
struct Churn {
    modules: BTreeMap<&'static str, Vec<u8>>,
    versions: BTreeMap<&'static str, BTreeMap<u64, String>>,
    active: BTreeMap<&'static str, u64>,
    pushed: u64,
}

impl Churn {
    fn new(hello: Vec<u8>, echo: Vec<u8>) -> Churn {
        Churn {
            modules: BTreeMap::from([("hello", hello), ("echo", echo)]),
            versions: BTreeMap::new(),
            active: BTreeMap::new(),
            pushed: 0,
        }
    }

    fn active(&self, function: &str) -> u64 {
        self.active.get(function).copied().unwrap_or(0)
    }

    fn greeting(&self, function: &str, version: u64) -> String {
        self.versions
            .get(function)
            .and_then(|versions| versions.get(&version))
            .cloned()
            .unwrap_or_default()
    }

    /// Pushes a new version of `function` with a new greeting; returns the greeting.
    async fn push(
        &mut self,
        client: &atoll_control::RegistryClient,
        function: &'static str,
        timeout: Duration,
    ) -> Result<String> {
        self.pushed += 1;
        let greeting = format!("soak-{}", self.pushed);
        let manifest = soak_guests::churned_manifest(function, &greeting);
        let module = self.modules[function].clone();
        let pushed = tokio::time::timeout(timeout, client.push(&manifest, module))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(timeout)))??;
        self.versions
            .entry(function)
            .or_default()
            .insert(pushed.version, greeting.clone());
        self.active.insert(function, pushed.version);
        Ok(greeting)
    }

    /// Rolls `function` back to the version before the active one; returns its greeting.
    async fn rollback(
        &mut self,
        client: &atoll_control::RegistryClient,
        function: &'static str,
        timeout: Duration,
    ) -> Result<String> {
        let rolled = tokio::time::timeout(timeout, client.rollback(function, None))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(timeout)))??;
        self.active.insert(function, rolled.active);
        Ok(self.greeting(function, rolled.active))
    }
}

/// What the churn did.
#[derive(Default)]
struct ChurnReport {
    pushes: u64,
    rollbacks: u64,
    /// Pushes or rollbacks the registry refused or did not answer, by reason.
    refused: BTreeMap<String, u64>,
    /// Time from the registry's answer to the node serving the new active version.
    served_after: Vec<Duration>,
    /// Accepted changes the node did not serve within the push timeout.
    never_served: u64,
}

async fn churn_loop(
    mut churn: Churn,
    client: atoll_control::RegistryClient,
    config: Arc<LoadConfig>,
    every: Duration,
    push_timeout: Duration,
    probes: Arc<Tally>,
) -> ChurnReport {
    let mut report = ChurnReport::default();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut step = 0u64;
    while config.running() {
        ticks.tick().await;
        if !config.running() {
            break;
        }
        let function = if step.is_multiple_of(2) { "hello" } else { "echo" };
        let rollback = (step / 2) % 2 == 1;
        step += 1;
        let changed = if rollback {
            report.rollbacks += 1;
            churn.rollback(&client, function, push_timeout).await
        } else {
            report.pushes += 1;
            churn.push(&client, function, push_timeout).await
        };
        let greeting = match changed {
            Ok(greeting) => greeting,
            Err(error) => {
                let what = if rollback { "rollback" } else { "push" };
                *report
                    .refused
                    .entry(format!("{what} {function}: {error:#}"))
                    .or_default() += 1;
                continue;
            }
        };
        let answered = Instant::now();
        match wait_served_counting(
            config.addresses.http,
            function,
            &greeting,
            push_timeout,
            &probes,
            &config,
        )
        .await
        {
            Some(()) => report.served_after.push(answered.elapsed()),
            None => report.never_served += 1,
        }
    }
    report
}

/// Polls `function` over HTTP/1.1 until it answers with `greeting`; every probe is a
/// well-behaved request and counted in `probes`. `None` if not served within `timeout` (or
/// the load stopped first).
async fn wait_served_counting(
    address: SocketAddr,
    function: &str,
    greeting: &str,
    timeout: Duration,
    probes: &Tally,
    config: &LoadConfig,
) -> Option<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        probes.sent.fetch_add(1, Ordering::Relaxed);
        match probe(address, function).await {
            Ok((status, body)) if status.is_success() => {
                if served_marker(function, greeting, &body) {
                    return Some(());
                }
            }
            Ok((status, body)) => probes.fail(format!(
                "status {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body[..body.len().min(80)]).trim()
            )),
            Err(error) => probes.fail(format!("{error:#}")),
        }
        if !config.running() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Like [`wait_served_counting`], for setup: an error if not served in time.
async fn wait_served(address: SocketAddr, function: &str, greeting: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((status, body)) = probe(address, function).await
            && status.is_success()
            && served_marker(function, greeting, &body)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the node did not serve {function} ({greeting}) within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn served_marker(function: &str, greeting: &str, body: &[u8]) -> bool {
    let marker = match function {
        "echo" => format!("GREETING={greeting}\n"),
        _ => format!("{greeting} from Atoll"),
    };
    contains(body, marker.as_bytes())
}

/// One GET on a fresh HTTP/1.1 connection.
async fn probe(address: SocketAddr, function: &str) -> Result<(StatusCode, Bytes)> {
    get(
        address,
        &format!("{function}.localhost"),
        "/",
        Duration::from_secs(10),
    )
    .await
}

/// GET `path` on `host` over a fresh HTTP/1.1 connection to `address`, within `timeout`.
async fn get(address: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<(StatusCode, Bytes)> {
    tokio::time::timeout(timeout, async {
        let stream = TcpStream::connect(address).await?;
        let (mut sender, connection) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Full::default())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        anyhow::Ok((status, response.into_body().collect().await?.to_bytes()))
    })
    .await
    .map_err(|_| anyhow::anyhow!("client timeout"))?
}

// ---------------------------------------------------------------------------------------
// Misbehaving guests.

/// A hostile push's outcome.
enum PushOutcome {
    Accepted(u64),
    Refused(String),
    NoAnswer(Duration),
}

impl PushOutcome {
    fn text(&self) -> String {
        match self {
            PushOutcome::Accepted(version) => format!("accepted v{version}"),
            PushOutcome::Refused(reason) => format!("refused: {reason}"),
            PushOutcome::NoAnswer(after) => {
                format!("no answer within {}", humantime::format_duration(*after))
            }
        }
    }
}

fn push_outcome(
    answered: Result<
        Result<atoll_core::api_types::PushResponse, atoll_control::ClientError>,
        tokio::time::error::Elapsed,
    >,
    timeout: Duration,
) -> PushOutcome {
    match answered {
        Ok(Ok(pushed)) => PushOutcome::Accepted(pushed.version),
        Ok(Err(error)) => PushOutcome::Refused(clip(&error.to_string(), 160)),
        Err(_) => PushOutcome::NoAnswer(timeout),
    }
}

/// What hitting one misbehaving target produced.
struct HostileReport {
    label: String,
    expected: Expected,
    sent: u64,
    /// Outcome ("504", "client timeout", "error") → count.
    outcomes: BTreeMap<String, u64>,
    as_expected: u64,
    slowest: Duration,
    gave_up: bool,
}

async fn hit(
    target: HostileTarget,
    address: SocketAddr,
    every: Duration,
    timeout: Duration,
    config: Arc<LoadConfig>,
) -> HostileReport {
    let mut report = HostileReport {
        label: format!("{}{}", target.host.trim_end_matches(".localhost"), target.path),
        expected: target.expected,
        sent: 0,
        outcomes: BTreeMap::new(),
        as_expected: 0,
        slowest: Duration::ZERO,
        gave_up: false,
    };
    let mut timeouts = 0;
    while config.running() {
        report.sent += 1;
        let started = Instant::now();
        let outcome = match get(address, target.host, target.path, timeout).await {
            Ok((status, body)) => {
                if target.expected.matches(status.as_u16(), &body) {
                    report.as_expected += 1;
                }
                match target.expected {
                    Expected::Body(_) if status == StatusCode::OK => {
                        let text = String::from_utf8_lossy(&body[..body.len().min(16)])
                            .trim()
                            .to_string();
                        format!("200 {text}")
                    }
                    _ => status.as_u16().to_string(),
                }
            }
            Err(error) if error.to_string() == "client timeout" => {
                timeouts += 1;
                "client timeout".into()
            }
            Err(_) => "connection error".into(),
        };
        report.slowest = report.slowest.max(started.elapsed());
        *report.outcomes.entry(outcome).or_default() += 1;
        if timeouts >= HOSTILE_GIVE_UP_AFTER {
            report.gave_up = true;
            break;
        }
        tokio::time::sleep(every).await;
    }
    report
}

// ---------------------------------------------------------------------------------------
// /proc sampling.

/// Whether `pid` runs: it exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// One reading of a process.
#[derive(Clone, Copy, Debug)]
struct ProcSample {
    rss_kib: u64,
    fds: u64,
    threads: u64,
    /// utime + stime of the whole process so far, in USER_HZ ticks.
    cpu_ticks: u64,
}

fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<u64>().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let cpu_ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_task_stat(&stat))
        .map_or(0, |(_, ticks)| ticks);
    Some(ProcSample {
        rss_kib: field("VmRSS:")?,
        fds,
        threads: field("Threads:").unwrap_or(0),
        cpu_ticks,
    })
}

/// The open fds of `pid` by kind (see [`fd_kind`]).
fn fd_kinds(pid: u32) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    for entry in entries.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            *kinds.entry(fd_kind(&target.to_string_lossy())).or_default() += 1;
        }
    }
    kinds
}

/// What an fd's `/proc/PID/fd` link names, without what tells two of a kind apart:
/// `socket`, `pipe`, `anon_inode:[eventfd]`, `memfd:NAME`, `/proc/N/…`, or a file's
/// directory.
fn fd_kind(target: &str) -> String {
    if target.starts_with("anon_inode:") {
        return target.to_string();
    }
    if let Some(name) = target.strip_prefix("/memfd:") {
        return format!("memfd:{}", name.trim_end_matches(" (deleted)"));
    }
    if let Some((kind, _)) = target.split_once(":[") {
        return kind.to_string();
    }
    if target.starts_with("/proc/") {
        // Which file of which process: `/proc/N/task/N/stat`.
        return target
            .split('/')
            .map(|part| {
                if !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit()) {
                    "N"
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join("/");
    }
    match Path::new(target).parent() {
        Some(parent) => format!("{}/", parent.display()),
        None => target.to_string(),
    }
}

/// A point of the curve.
struct CurvePoint {
    at: Duration,
    node: Option<ProcSample>,
    /// The node's CPU since the previous sample, in cores (1.0 = one core busy).
    node_cpu: Option<f64>,
    registry: Option<ProcSample>,
    sent: u64,
    failed: u64,
}

/// CPU ticks of each thread (tid → (name, utime + stime)).
fn thread_ticks(pid: u32) -> BTreeMap<u32, (String, u64)> {
    let mut threads = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some(parsed) = parse_task_stat(&stat) {
            threads.insert(tid, parsed);
        }
    }
    threads
}

/// Name and utime + stime from a `/proc/PID/task/TID/stat` line. The name (field 2) is in
/// parentheses and may hold spaces or parentheses itself, so fields are counted from the
/// last `)`: state is field 3, utime 14, stime 15.
pub(crate) fn parse_task_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// A CPU measurement in progress: ticks at the start.
struct IdleCpu {
    pid: u32,
    start: Instant,
    before: BTreeMap<u32, (String, u64)>,
}

/// What a process's threads used over a window.
#[derive(Clone, Debug, Default)]
struct IdleReport {
    /// CPU seconds per second, all threads together (1.0 = one core).
    total: f64,
    window: Duration,
    /// The busiest threads: name, tid, share of one core.
    busiest: Vec<(String, u32, f64)>,
    /// The process was gone at the end of the window: nothing was measured.
    gone: bool,
}

/// Starts measuring `pid`'s threads; blocks for `window` (zero: measure until `finish`).
fn idle_cpu(pid: u32, window: Duration) -> IdleCpu {
    let measurement = IdleCpu {
        pid,
        start: Instant::now(),
        before: thread_ticks(pid),
    };
    std::thread::sleep(window);
    measurement
}

impl IdleCpu {
    fn finish(self) -> IdleReport {
        let after = thread_ticks(self.pid);
        let window = self.start.elapsed();
        let seconds = window.as_secs_f64().max(f64::EPSILON);
        let mut busiest: Vec<(String, u32, f64)> = after
            .iter()
            .map(|(tid, (name, ticks))| {
                let before = self.before.get(tid).map_or(0, |(_, ticks)| *ticks);
                let used = ticks.saturating_sub(before) as f64 / USER_HZ / seconds;
                (name.clone(), *tid, used)
            })
            .filter(|(_, _, used)| *used > 0.0)
            .collect();
        busiest.sort_by(|a, b| b.2.total_cmp(&a.2));
        // `+ 0.0`: an empty float sum is -0.0.
        let total = busiest.iter().map(|(_, _, used)| used).sum::<f64>() + 0.0;
        busiest.truncate(3);
        IdleReport {
            total,
            window,
            busiest,
            gone: !alive(self.pid),
        }
    }
}

/// The first panic in a log: its location line and message, on one line.
fn first_panic(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text);
    let mut lines = text.lines();
    let at = lines.find(|line| line.starts_with("thread '") && line.contains("panicked at"))?;
    let message = lines.next().unwrap_or_default();
    Some(clip(&format!("{at} {message}"), 300))
}

/// Lines of the node's log that a guest forged (they start with [`FORGED_LOG_PREFIX`]).
fn count_forged_lines(log: &Path) -> u64 {
    let Ok(text) = std::fs::read(log) else {
        return 0;
    };
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|line| {
            // The guest puts an erase-line sequence before its second line; a log that
            // escapes control characters shows it as text.
            line.trim_start_matches("\u{1b}[2K")
                .trim_start_matches("\\x1b[2K")
                .starts_with(FORGED_LOG_PREFIX)
        })
        .count() as u64
}

// ---------------------------------------------------------------------------------------
// The run.

/// One row of the well-behaved table.
struct Row {
    protocol: Protocol,
    function: Function,
    tally: Arc<Tally>,
    latencies: Vec<u32>,
}

struct SoakOutcome {
    elapsed: Duration,
    rows: Vec<Row>,
    probes: Arc<Tally>,
    churn: ChurnReport,
    hostile: Vec<HostileReport>,
    samples: Vec<CurvePoint>,
}

async fn soak(
    args: &SoakArgs,
    config: Arc<LoadConfig>,
    client: atoll_control::RegistryClient,
    churn: Churn,
    node_pid: u32,
    registry_pid: u32,
    started: Instant,
) -> Result<SoakOutcome> {
    let mut loads = Vec::new();
    for protocol in [Protocol::Http1, Protocol::Http2, Protocol::Http3] {
        for function in [Function::Hello, Function::Echo] {
            let tally = Arc::new(Tally::default());
            let (loops, streams) = match protocol {
                Protocol::Http1 => (args.connections.max(1), 1),
                Protocol::Http2 | Protocol::Http3 => (1, args.streams.max(1)),
            };
            let mut tasks = Vec::new();
            for _ in 0..loops {
                tasks.push(tokio::spawn(load(
                    protocol,
                    function,
                    streams,
                    Arc::clone(&config),
                    Arc::clone(&tally),
                )));
            }
            loads.push((protocol, function, tally, tasks));
        }
    }
    // The requests the churn sends to see which version is served.
    let probes = Arc::new(Tally::default());
    let churn_task = tokio::spawn(churn_loop(
        churn,
        client,
        Arc::clone(&config),
        args.churn_every,
        args.push_timeout,
        Arc::clone(&probes),
    ));
    let hostile_tasks: Vec<_> = soak_guests::hostile_targets()
        .into_iter()
        .filter(|target| {
            let guest = target.host.trim_end_matches(".localhost");
            !args.skip.iter().any(|name| name == guest)
        })
        .map(|target| {
            tokio::spawn(hit(
                target,
                config.addresses.http,
                args.hostile_every,
                args.hostile_timeout,
                Arc::clone(&config),
            ))
        })
        .collect();

    // Sample until the time is up.
    let mut samples = Vec::new();
    let tallies: Vec<Arc<Tally>> = loads.iter().map(|(_, _, tally, _)| Arc::clone(tally)).collect();
    let totals = || {
        tallies.iter().fold((0, 0), |(sent, failed), tally| {
            (
                sent + tally.sent.load(Ordering::Relaxed),
                failed + tally.failed.load(Ordering::Relaxed),
            )
        })
    };
    let end = started + args.duration;
    let mut ticks = tokio::time::interval(args.sample_every);
    let mut previous: Option<(Instant, u64)> = None;
    loop {
        ticks.tick().await;
        let (sent, failed) = totals();
        let node = sample(node_pid);
        let now = Instant::now();
        let node_cpu = match (previous, node) {
            (Some((then, ticks_then)), Some(node)) => Some(
                node.cpu_ticks.saturating_sub(ticks_then) as f64
                    / USER_HZ
                    / (now - then).as_secs_f64().max(f64::EPSILON),
            ),
            _ => None,
        };
        previous = node.map(|node| (now, node.cpu_ticks));
        let point = CurvePoint {
            at: started.elapsed(),
            node,
            node_cpu,
            registry: sample(registry_pid),
            sent,
            failed,
        };
        if !args.json {
            eprintln!("soak: {}", curve_line(&point));
        }
        let node_gone = point.node.is_none();
        samples.push(point);
        if node_gone || Instant::now() >= end {
            break;
        }
    }
    config.stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();

    let mut rows = Vec::new();
    for (protocol, function, tally, tasks) in loads {
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await?);
        }
        rows.push(Row {
            protocol,
            function,
            tally,
            latencies,
        });
    }
    let churn = churn_task.await?;
    let mut hostile = Vec::new();
    for task in hostile_tasks {
        hostile.push(task.await?);
    }
    Ok(SoakOutcome {
        elapsed,
        rows,
        probes,
        churn,
        hostile,
        samples,
    })
}

// ---------------------------------------------------------------------------------------
// Report.

struct SoakResult {
    duration: Duration,
    elapsed: Duration,
    rows: Vec<Row>,
    probes: Arc<Tally>,
    churn: ChurnReport,
    hostile_pushes: Vec<(&'static str, &'static str, PushOutcome)>,
    hostile_hits: Vec<HostileReport>,
    samples: Vec<CurvePoint>,
    quiet_before: ProcSample,
    quiet_after: Option<ProcSample>,
    /// The node's open fds by kind before and after the load.
    kinds_before: BTreeMap<String, u64>,
    kinds_after: BTreeMap<String, u64>,
    node_idle: IdleReport,
    registry_idle: IdleReport,
    forged: u64,
    node_exit: Option<String>,
    registry_exit: Option<String>,
}

/// A promise and whether it held.
struct Verdict {
    promise: &'static str,
    held: bool,
    detail: String,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn curve_line(point: &CurvePoint) -> String {
    let node = point.node.map_or_else(
        || "node gone".to_string(),
        |node| {
            format!(
                "rss {:>7.1} MiB  fds {:>4}  threads {:>3}  cpu {:>4}",
                mib(node.rss_kib),
                node.fds,
                node.threads,
                point
                    .node_cpu
                    .map_or("-".into(), |cpu| format!("{:.0}%", cpu * 100.0))
            )
        },
    );
    let registry = point.registry.map_or_else(
        || "gone".to_string(),
        |registry| format!("{:.1} MiB", mib(registry.rss_kib)),
    );
    format!(
        "{:>6.0}s  {node}  registry rss {registry}  requests {} failed {}",
        point.at.as_secs_f64(),
        point.sent,
        point.failed
    )
}

/// The median node RSS of the samples taken in a part of the run (`from`..=`to`, as
/// fractions of it; with no sample there, the nearest one). Medians, because a guest in flight when a sample is taken (one that
/// fills 64 MiB, say) lifts that sample alone.
fn median_rss_in(samples: &[CurvePoint], elapsed: Duration, from: f64, to: f64) -> Option<u64> {
    let total = elapsed.as_secs_f64().max(f64::EPSILON);
    let live: Vec<(f64, u64)> = samples
        .iter()
        .filter_map(|point| Some((point.at.as_secs_f64() / total, point.node?.rss_kib)))
        .collect();
    let mut in_range: Vec<u64> = live
        .iter()
        .filter(|(at, _)| *at >= from && *at <= to)
        .map(|(_, rss)| *rss)
        .collect();
    if in_range.is_empty() {
        // A run shorter than four samples: the sample nearest the middle of the part.
        let middle = (from + to) / 2.0;
        return live
            .iter()
            .min_by(|a, b| (a.0 - middle).abs().total_cmp(&(b.0 - middle).abs()))
            .map(|(_, rss)| *rss);
    }
    in_range.sort_unstable();
    in_range.get(in_range.len().saturating_sub(1) / 2).copied()
}

fn verdicts(result: &SoakResult) -> Vec<Verdict> {
    let sent: u64 = result
        .rows
        .iter()
        .map(|row| row.tally.sent.load(Ordering::Relaxed))
        .sum::<u64>()
        + result.probes.sent.load(Ordering::Relaxed);
    let failed: u64 = result
        .rows
        .iter()
        .map(|row| row.tally.failed.load(Ordering::Relaxed))
        .sum::<u64>()
        + result.probes.failed.load(Ordering::Relaxed);
    let mut verdicts = vec![Verdict {
        promise: "zero failures",
        held: failed == 0 && sent > 0 && result.node_exit.is_none(),
        detail: format!(
            "{sent} well-behaved requests, {failed} failed{}",
            result
                .node_exit
                .as_ref()
                .map_or_else(String::new, |exit| format!("; {exit}"))
        ),
    }];

    // The first quarter is warm-up (pools, caches, allocator arenas fill): the second is
    // the reference.
    let first = median_rss_in(&result.samples, result.elapsed, 0.25, 0.5);
    let last = median_rss_in(&result.samples, result.elapsed, 0.75, 1.0);
    let after = result.quiet_after.map(|after| after.rss_kib);
    // A leak stays after the load; a guest in flight lifts a sample only while it runs. So
    // the end is the lower of the last quarter's median and the RSS once the load is over.
    let end = match (last, after) {
        (Some(last), Some(after)) => Some(last.min(after)),
        (last, after) => last.or(after),
    };
    verdicts.push(match (first, end) {
        (Some(first), Some(end)) => {
            let margin = (mib(first) * RSS_TOLERANCE_RATIO).max(RSS_TOLERANCE_MIB);
            Verdict {
                promise: "rss flat",
                held: mib(end) <= mib(first) + margin && result.node_exit.is_none(),
                detail: format!(
                    "median of the second quarter {:.1} MiB; median of the last quarter {}, after the \
                     load {}; tolerance +{margin:.1} MiB (max of {RSS_TOLERANCE_MIB} MiB and {:.0}%)",
                    mib(first),
                    last.map_or("-".into(), |kib| format!("{:.1} MiB", mib(kib))),
                    after.map_or("-".into(), |kib| format!("{:.1} MiB", mib(kib))),
                    RSS_TOLERANCE_RATIO * 100.0
                ),
            }
        }
        _ => Verdict {
            promise: "rss flat",
            held: false,
            detail: "not enough samples of a live node".into(),
        },
    });

    verdicts.push(match result.quiet_after {
        Some(after) => {
            let grown = after.fds as i64 - result.quiet_before.fds as i64;
            Verdict {
                promise: "fds flat",
                held: grown <= FD_TOLERANCE,
                detail: format!(
                    "{} open before the load, {} {} s after it ({grown:+}); tolerance +{FD_TOLERANCE}",
                    result.quiet_before.fds,
                    after.fds,
                    FD_SETTLE.as_secs()
                ),
            }
        }
        None => Verdict {
            promise: "fds flat",
            held: false,
            detail: "the node was gone after the load".into(),
        },
    });

    verdicts.push(idle_verdict("no spinning thread (node)", &result.node_idle));
    verdicts.push(idle_verdict(
        "no spinning thread (registry)",
        &result.registry_idle,
    ));
    verdicts
}

fn idle_verdict(promise: &'static str, idle: &IdleReport) -> Verdict {
    let busiest = idle
        .busiest
        .iter()
        .map(|(name, tid, used)| format!("{name}[{tid}] {:.1}%", used * 100.0))
        .collect::<Vec<_>>()
        .join(", ");
    if idle.gone {
        return Verdict {
            promise,
            held: false,
            detail: "the process was gone after the load".into(),
        };
    }
    Verdict {
        promise,
        held: idle.total <= IDLE_CPU_LIMIT,
        detail: format!(
            "{:.1}% of one core over {:.1} s after the load (limit {:.0}%){}",
            idle.total * 100.0,
            idle.window.as_secs_f64(),
            IDLE_CPU_LIMIT * 100.0,
            if busiest.is_empty() {
                String::new()
            } else {
                format!("; busiest: {busiest}")
            }
        ),
    }
}

fn latency(latencies: &[u32]) -> Option<Summary> {
    (!latencies.is_empty()).then(|| {
        Summary::of(
            latencies
                .iter()
                .map(|&micros| Duration::from_micros(u64::from(micros)))
                .collect(),
        )
    })
}

/// Prints the report; returns the promises that did not hold.
fn report(result: &SoakResult, args: &SoakArgs) -> Vec<&'static str> {
    let verdicts = verdicts(result);
    if args.json {
        report_json(result, &verdicts);
    } else {
        report_text(result, args, &verdicts);
    }
    verdicts
        .iter()
        .filter(|verdict| !verdict.held)
        .map(|verdict| verdict.promise)
        .collect()
}

fn report_json(result: &SoakResult, verdicts: &[Verdict]) {
    let line = |value: serde_json::Value| println!("{value}");
    for row in &result.rows {
        let summary = latency(&row.latencies);
        line(serde_json::json!({
            "bench": "soak", "kind": "load",
            "protocol": row.protocol.label(), "function": row.function.name(),
            "sent": row.tally.sent.load(Ordering::Relaxed),
            "failed": row.tally.failed.load(Ordering::Relaxed),
            "p50_us": summary.map(|summary| summary.p50_us.round()),
            "p99_us": summary.map(|summary| summary.p99_us.round()),
            "failures": row.tally.reasons(),
        }));
    }
    line(serde_json::json!({
        "bench": "soak", "kind": "probes",
        "sent": result.probes.sent.load(Ordering::Relaxed),
        "failed": result.probes.failed.load(Ordering::Relaxed),
        "failures": result.probes.reasons(),
    }));
    let served = &result.churn.served_after;
    line(serde_json::json!({
        "bench": "soak", "kind": "churn",
        "pushes": result.churn.pushes, "rollbacks": result.churn.rollbacks,
        "refused": result.churn.refused, "never_served": result.churn.never_served,
        "served_p50_ms": latency_ms(served, 50.0), "served_max_ms": latency_ms(served, 100.0),
    }));
    for (name, expected, outcome) in &result.hostile_pushes {
        line(serde_json::json!({
            "bench": "soak", "kind": "hostile_push", "function": name,
            "outcome": outcome.text(), "expected": expected,
        }));
    }
    for hit in &result.hostile_hits {
        line(serde_json::json!({
            "bench": "soak", "kind": "hostile_hits", "target": hit.label,
            "sent": hit.sent, "outcomes": hit.outcomes, "expected": hit.expected.describe(),
            "as_expected": hit.as_expected, "slowest_ms": hit.slowest.as_millis(), "gave_up": hit.gave_up,
        }));
    }
    let proc_json = |sample: Option<ProcSample>| {
        sample.map(|sample| {
            serde_json::json!({
                "rss_mib": (mib(sample.rss_kib) * 10.0).round() / 10.0,
                "fds": sample.fds, "threads": sample.threads,
            })
        })
    };
    line(
        serde_json::json!({"bench": "soak", "kind": "sample", "at": "before", "node": proc_json(Some(result.quiet_before))}),
    );
    for point in &result.samples {
        line(serde_json::json!({
            "bench": "soak", "kind": "sample", "at_s": point.at.as_secs(),
            "node": proc_json(point.node), "registry": proc_json(point.registry),
            "node_cpu_cores": point.node_cpu.map(|cpu| (cpu * 1000.0).round() / 1000.0),
            "requests": point.sent, "failed": point.failed,
        }));
    }
    line(
        serde_json::json!({"bench": "soak", "kind": "sample", "at": "after", "node": proc_json(result.quiet_after)}),
    );
    line(serde_json::json!({
        "bench": "soak", "kind": "fd_kinds", "before": result.kinds_before, "after": result.kinds_after,
    }));
    for (process, idle) in [("node", &result.node_idle), ("registry", &result.registry_idle)] {
        line(serde_json::json!({
            "bench": "soak", "kind": "idle_cpu", "process": process,
            "cores": (idle.total * 1000.0).round() / 1000.0, "window_s": idle.window.as_secs_f64(),
            "busiest": idle.busiest.iter().map(|(name, tid, used)| serde_json::json!({"thread": name, "tid": tid, "cores": (used * 1000.0).round() / 1000.0})).collect::<Vec<_>>(),
        }));
    }
    line(serde_json::json!({"bench": "soak", "kind": "forged_log_lines", "count": result.forged}));
    for verdict in verdicts {
        line(serde_json::json!({
            "bench": "soak", "kind": "verdict", "promise": verdict.promise,
            "held": verdict.held, "detail": verdict.detail,
        }));
    }
}

fn latency_ms(samples: &[Duration], percentile: f64) -> Option<u128> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    (!sorted.is_empty()).then(|| crate::latency::percentile(&sorted, percentile).as_millis())
}

fn report_text(result: &SoakResult, args: &SoakArgs, verdicts: &[Verdict]) {
    println!(
        "soak: {:.0} s of load (asked {}): hello GET + echo POST {} B over HTTP/1.1 ({} conns each), \
         HTTP/2 over TLS and HTTP/3 (1 conn x {} streams each); a push or rollback every {}; \
         {} misbehaving targets hit every {}",
        result.elapsed.as_secs_f64(),
        humantime::format_duration(result.duration),
        args.body_bytes,
        args.connections,
        args.streams,
        humantime::format_duration(args.churn_every),
        result.hostile_hits.len(),
        humantime::format_duration(args.hostile_every),
    );
    println!();
    println!(
        "{:<10} {:<8} {:>10} {:>8} {:>10} {:>10}",
        "protocol", "function", "sent", "failed", "p50", "p99"
    );
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for row in &result.rows {
        let summary = latency(&row.latencies);
        let (p50, p99) = summary.map_or(("-".into(), "-".into()), |summary| {
            (
                format!("{:.0}µs", summary.p50_us),
                format!("{:.0}µs", summary.p99_us),
            )
        });
        println!(
            "{:<10} {:<8} {:>10} {:>8} {:>10} {:>10}",
            row.protocol.label(),
            row.function.name(),
            row.tally.sent.load(Ordering::Relaxed),
            row.tally.failed.load(Ordering::Relaxed),
            p50,
            p99
        );
        for (reason, count) in row.tally.reasons() {
            *reasons
                .entry(format!(
                    "{} {}: {reason}",
                    row.protocol.label(),
                    row.function.name()
                ))
                .or_default() += count;
        }
    }
    println!(
        "{:<10} {:<8} {:>10} {:>8}",
        "http/1.1",
        "probes",
        result.probes.sent.load(Ordering::Relaxed),
        result.probes.failed.load(Ordering::Relaxed)
    );
    for (reason, count) in result.probes.reasons() {
        *reasons.entry(format!("probe: {reason}")).or_default() += count;
    }
    for (reason, count) in &reasons {
        println!("  failure x{count}: {reason}");
    }

    let churn = &result.churn;
    println!();
    println!(
        "churn: {} pushes, {} rollbacks; served after p50 {} ms, max {} ms; not served within {}: {}",
        churn.pushes,
        churn.rollbacks,
        latency_ms(&churn.served_after, 50.0).map_or("-".into(), |ms| ms.to_string()),
        latency_ms(&churn.served_after, 100.0).map_or("-".into(), |ms| ms.to_string()),
        humantime::format_duration(args.push_timeout),
        churn.never_served
    );
    for (reason, count) in &churn.refused {
        println!("  refused x{count}: {reason}");
    }

    println!();
    println!("{:<16} {:<44} expected", "hostile push", "outcome");
    for (name, expected, outcome) in &result.hostile_pushes {
        println!("{name:<16} {:<44} {expected}", outcome.text());
    }
    println!();
    println!(
        "{:<22} {:>5} {:>9} {:>9}  {:<12} outcomes",
        "hostile target", "sent", "expected", "as exp.", "slowest"
    );
    for hit in &result.hostile_hits {
        let outcomes = hit
            .outcomes
            .iter()
            .map(|(outcome, count)| format!("{outcome} x{count}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:<22} {:>5} {:>9} {:>9}  {:<12} {outcomes}{}",
            hit.label,
            hit.sent,
            hit.expected.describe(),
            hit.as_expected,
            format!("{:.2} s", hit.slowest.as_secs_f64()),
            if hit.gave_up {
                format!(" (stopped after {HOSTILE_GIVE_UP_AFTER} client timeouts)")
            } else {
                String::new()
            }
        );
    }

    println!();
    println!(
        "node curve (every {}):",
        humantime::format_duration(args.sample_every)
    );
    println!(
        "{:>8} {:>9} {:>6} {:>8} {:>6} {:>13} {:>10} {:>7}",
        "time", "rss MiB", "fds", "threads", "cpu", "registry MiB", "requests", "failed"
    );
    let dash = || "-".to_string();
    let row = |label: String, node: Option<ProcSample>, cpu: Option<f64>, rest: [String; 3]| {
        let (rss, fds, threads) = node.map_or((dash(), dash(), dash()), |node| {
            (
                format!("{:.1}", mib(node.rss_kib)),
                node.fds.to_string(),
                node.threads.to_string(),
            )
        });
        let cpu = cpu.map_or(dash(), |cpu| format!("{:.0}%", cpu * 100.0));
        let [registry, sent, failed] = rest;
        println!("{label:>8} {rss:>9} {fds:>6} {threads:>8} {cpu:>6} {registry:>13} {sent:>10} {failed:>7}");
    };
    row(
        "before".into(),
        Some(result.quiet_before),
        None,
        [dash(), dash(), dash()],
    );
    for point in &result.samples {
        row(
            format!("{:.0}s", point.at.as_secs_f64()),
            point.node,
            point.node_cpu,
            [
                point
                    .registry
                    .map_or(dash(), |registry| format!("{:.1}", mib(registry.rss_kib))),
                point.sent.to_string(),
                point.failed.to_string(),
            ],
        );
    }
    row("after".into(), result.quiet_after, None, [dash(), dash(), dash()]);
    let live: Vec<ProcSample> = result.samples.iter().filter_map(|point| point.node).collect();
    if let (Some(first), Some(last)) = (live.first(), live.last()) {
        let max_rss = live.iter().map(|sample| sample.rss_kib).max().unwrap_or(0);
        let max_fds = live.iter().map(|sample| sample.fds).max().unwrap_or(0);
        println!(
            "rss MiB first {:.1} last {:.1} max {:.1}; fds first {} last {} max {}",
            mib(first.rss_kib),
            mib(last.rss_kib),
            mib(max_rss),
            first.fds,
            last.fds,
            max_fds
        );
    }
    let changed: Vec<String> = result
        .kinds_before
        .keys()
        .chain(result.kinds_after.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|kind| {
            let before = result.kinds_before.get(kind).copied().unwrap_or(0);
            let after = result.kinds_after.get(kind).copied().unwrap_or(0);
            (before != after).then(|| format!("{kind} {before} -> {after}"))
        })
        .collect();
    if !changed.is_empty() {
        println!(
            "fds that changed, before -> after the load: {}",
            changed.join(", ")
        );
    }
    if let Some(exit) = &result.registry_exit {
        println!("{exit} during the run");
    }
    println!(
        "guest stderr: {} forged lines in the node's log (lines starting with a log header a guest wrote)",
        result.forged
    );

    println!();
    for verdict in verdicts {
        println!(
            "verdict {:<30} {:<4} {}",
            verdict.promise,
            if verdict.held { "PASS" } else { "FAIL" },
            verdict.detail
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_thread_stat_with_spaces_and_parentheses_in_the_name() {
        let stat = "4242 (tokio-rt (x) 1) R 1 2 3 0 -1 4194368 10 0 0 0 250 17 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_task_stat(stat), Some(("tokio-rt (x) 1".into(), 267)));
        assert_eq!(parse_task_stat("garbage"), None);
    }

    #[test]
    fn samples_this_process() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
        let me = sample(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.fds > 0 && me.threads > 0, "{me:?}");
        assert!(!thread_ticks(std::process::id()).is_empty());
    }

    #[test]
    fn idle_cpu_sees_a_spinning_thread() {
        let stop = Arc::new(AtomicBool::new(false));
        let spinner = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut counter = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            })
        };
        let busy = idle_cpu(std::process::id(), Duration::from_secs(2)).finish();
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        // Its fair share of two busy cores can be small, but is still above the idle limit.
        assert!(!busy.gone && busy.total > 2.0 * IDLE_CPU_LIMIT, "{busy:?}");
        assert!(!idle_verdict("spin", &busy).held);
    }

    #[test]
    fn checks_well_behaved_answers() {
        let payload = b"abc";
        assert_eq!(
            check(
                Function::Hello,
                StatusCode::OK,
                b"soak-1 from Atoll on hello.localhost!\n",
                payload
            ),
            None
        );
        assert!(
            check(Function::Hello, StatusCode::BAD_GATEWAY, b"boom", payload)
                .unwrap()
                .starts_with("status 502")
        );
        assert_eq!(
            check(
                Function::Echo,
                StatusCode::OK,
                b"BODY_LENGTH=3\nBODY=abc",
                payload
            ),
            None
        );
        assert!(
            check(
                Function::Echo,
                StatusCode::OK,
                b"BODY_LENGTH=3\nBODY=abd",
                payload
            )
            .is_some()
        );
    }

    #[test]
    fn fd_kinds_drop_what_tells_two_apart() {
        assert_eq!(fd_kind("socket:[12345]"), "socket");
        assert_eq!(fd_kind("pipe:[7]"), "pipe");
        assert_eq!(fd_kind("anon_inode:[eventfd]"), "anon_inode:[eventfd]");
        assert_eq!(fd_kind("/memfd:image-hello (deleted)"), "memfd:image-hello");
        assert_eq!(fd_kind("/tmp/x/node/cache/abc.bin"), "/tmp/x/node/cache/");
        assert_eq!(fd_kind("/proc/4242/task/4250/stat"), "/proc/N/task/N/stat");
    }

    #[test]
    fn clips_on_a_character_boundary() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("hello", 10), "hello");
    }

    #[test]
    fn rss_medians_of_a_part_of_the_run() {
        let point = |at, rss_kib| CurvePoint {
            at: Duration::from_secs(at),
            node: Some(ProcSample {
                rss_kib,
                fds: 1,
                threads: 1,
                cpu_ticks: 0,
            }),
            node_cpu: None,
            registry: None,
            sent: 0,
            failed: 0,
        };
        let samples = [
            point(5, 900),
            point(30, 100),
            point(40, 300),
            point(45, 200),
            point(80, 400),
            point(100, 500),
        ];
        let elapsed = Duration::from_secs(100);
        assert_eq!(median_rss_in(&samples, elapsed, 0.25, 0.5), Some(200));
        assert_eq!(median_rss_in(&samples, elapsed, 0.75, 1.0), Some(400));
        // No sample in 50..=60%: the one nearest 55%.
        assert_eq!(median_rss_in(&samples, elapsed, 0.5, 0.6), Some(200));
        assert_eq!(median_rss_in(&[], elapsed, 0.5, 0.6), None);
    }
}
