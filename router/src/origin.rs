//! Origin routes: the node as a reverse proxy in front of a function's `origins`, the way
//! nginx forwards to an upstream, and the origins a function reaches at
//! `http://origin.atoll.internal`.
//!
//! ```text
//! request ─▶ pick (power of two choices among the available origins, by requests in flight)
//!              │  available: the health check passes and not ejected after failures
//!              ▼
//!           origin A ──connect error / timeout──▶ retry on another origin (idempotent
//!              │                                   methods; any method if never sent)
//!              ▼
//!           response streamed back; 101 → the two connections joined (WebSocket)
//! ```
//!
//! * **Keep-alive connections per origin** ([`crate::origin_conn`]: hyper's HTTP/1.1
//!   client connections, driven by the request that uses them), the node's trust roots
//!   (`OutboundClient::tls_roots`) and the same address guard as outbound calls
//!   ([`GuardedDns`] over `guarded_lookup`: cloud metadata and link-local are never reached;
//!   internal addresses only under the node's `--outbound-internal listed`, origins being
//!   listed by their manifest). hyper directly rather than reqwest: no URL parsing, no
//!   boxing, and the origin's body relayed as hyper hands it over.
//! * **Health**: an active check per origin (`GET health_path` every `health_interval`,
//!   healthy below 500; two failures mark it down, one success up), and passive ejection:
//!   three failures in a row (connect errors, timeouts, 502–504) take an origin out for
//!   [`EJECTION`]. With every origin down, all are tried anyway (a wrong health check must
//!   not take a site off the air).
//! * **Headers**: hop-by-hop headers go (both ways); `X-Forwarded-For`, `-Proto`, `-Host`
//!   and `Forwarded` are set from what the node saw, replacing any the client sent (a
//!   client is not trusted to say where it is); `Host` is the client's.
//! * **The request body is read whole** (within the node's body limit), so a retry can
//!   send it again; the response streams.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atoll_core::manifest::Manifest;
use atoll_ingress::workers::PerWorker;
use atoll_isolate::outbound::{OutboundClient, Reach, guarded_lookup};
use bytes::Bytes;
use crossbeam_utils::CachePadded;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The resolver of origins' connections: the outbound address guard, so the addresses
/// checked are the addresses connected to.
#[derive(Clone, Copy)]
pub struct GuardedDns(Reach);

impl tower_service::Service<Name> for GuardedDns {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = atoll_isolate::outbound::Refusal;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let (host, reach) = (name.as_str().to_string(), self.0);
        Box::pin(async move { guarded_lookup(&host, 0, reach).await.map(Vec::into_iter) })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<GuardedDns>>;
type OriginClient = Client<Connector, Full<Bytes>>;

fn origin_connector(outbound: &OutboundClient, reach: Reach, connect_timeout: Duration) -> Connector {
    let mut http = HttpConnector::new_with_resolver(GuardedDns(reach));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let tls =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("rustls has default protocol versions")
            .with_root_certificates(outbound.tls_roots())
            .with_no_client_auth();
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The health checks' client: hyper-util's pooled one (a request every few seconds needs
/// nothing faster), over the same connector as proxied requests.
fn health_client(connector: Connector) -> OriginClient {
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(4)
        .build(connector)
}

use crate::body::ResponseBody;
use crate::origin_conn::{
    Driven, ExchangeError, IdleConnections, IdleLimits, LentConnection, OriginConnection,
};

/// What every try of one proxied request sends.
struct Exchange<'a> {
    method: &'a Method,
    /// Origin-form: the path and query.
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

/// How long an origin stays out after [`EJECT_AFTER`] failures in a row.
pub const EJECTION: Duration = Duration::from_secs(5);
/// Failures in a row that eject an origin.
const EJECT_AFTER: u32 = 3;
/// Failed health checks in a row that mark an origin down.
const DOWN_AFTER: u32 = 2;
/// A tunnel (WebSocket) with no byte either way for this long is closed.
pub const TUNNEL_IDLE: Duration = Duration::from_secs(600);
/// Tunnels open at once on a node (each holds two connections): well under the edge's
/// connection cap, so tunnels cannot take every connection.
pub const MAX_TUNNELS: usize = 4096;
/// Tunnels open at once per function.
pub const MAX_TUNNELS_PER_FUNCTION: usize = 1024;

static TUNNELS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_TUNNELS);

/// One origin server and what the node knows of it.
struct Target {
    base: String,
    /// `base` as a URI, to connect to.
    connect_uri: Uri,
    /// `host[:port]` (the port when not the scheme's default): the Host of a request that
    /// names none.
    authority: HeaderValue,
    /// Keep-alive connections not in use.
    idle: Arc<IdleConnections>,
    /// The active check's verdict (true until a check says otherwise).
    healthy: AtomicBool,
    check_failures: AtomicU32,
    failures: AtomicU32,
    /// Ejected until this many ms after the pool's start (0: not ejected).
    ejected_until_ms: AtomicU64,
    /// An address literal the node's guard refuses: never tried.
    refused: bool,
}

// `OriginPool::pick` keeps the origins a request tried as bits of a `u32`.
const _: () = assert!(atoll_core::origin::MAX_ORIGINS <= 32);

/// Requests in flight at each of a function's origins, from one connection worker.
type InFlightCounts = Arc<CachePadded<[AtomicU32; atoll_core::origin::MAX_ORIGINS]>>;

/// A function's origins. Dropping it stops the health checks.
pub struct OriginPool {
    function: String,
    targets: Arc<Vec<Target>>,
    connector: Connector,
    timeout: Duration,
    retries: u32,
    started: Instant,
    /// The health checks' and the idle sweep's tasks.
    checks: Vec<tokio::task::AbortHandle>,
    tunnels: Arc<tokio::sync::Semaphore>,
    /// What [`Self::pick`] balances by, kept per connection worker as Envoy's workers
    /// each balance on their own: a request's count is written by its core alone.
    in_flight: PerWorker<InFlightCounts>,
}

impl Drop for OriginPool {
    fn drop(&mut self) {
        for task in &self.checks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for OriginPool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("OriginPool")
            .field("function", &self.function)
            .field(
                "origins",
                &self.targets.iter().map(|t| t.base.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never passed on. Names made at compile time: a
/// `&str` would be parsed again on every removal.
const HOP_BY_HOP: [HeaderName; 9] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
];
/// The forwarding headers the node sets.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = http::header::FORWARDED;

/// The node's own forwarding headers ([`crate::cluster::FORWARDING_HEADERS`]), which a
/// client must not set.
const NODE_FORWARDING: [HeaderName; 3] = [
    HeaderName::from_static(crate::cluster::FORWARDING_HEADERS[0]),
    HeaderName::from_static(crate::cluster::FORWARDING_HEADERS[1]),
    HeaderName::from_static(crate::cluster::FORWARDING_HEADERS[2]),
];

/// Removes hop-by-hop headers, those the `Connection` header names (a value that is not
/// text names nothing it could hide: it is dropped with the rest) and those in `also`.
///
/// One pass over the names present first: most messages carry none of them, and removing
/// each listed name would hash it against the map, a dozen lookups per request for nothing.
fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    let any = headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || also.contains(name));
    if !any {
        return;
    }
    if headers.contains_key(http::header::CONNECTION) {
        let named: Vec<String> = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|token| token.trim().to_ascii_lowercase())
            .filter(|token| !token.is_empty())
            .collect();
        for name in named {
            headers.remove(name.as_str());
        }
    }
    for name in HOP_BY_HOP.iter().chain(also) {
        headers.remove(name);
    }
}

/// Whether the request asks to switch protocols (WebSocket and the like), HTTP/1.1 style.
pub fn wants_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What a proxied request needs besides its method, target, headers and body.
pub struct ClientSide {
    /// The client's address, as the node saw it (or a trusted peer said).
    pub client: std::net::IpAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The Host the client asked for.
    pub host: String,
    /// The client connection's upgrade, when the request asked for one.
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Why no origin answered.
#[derive(Debug)]
pub enum OriginFailure {
    TimedOut(Duration),
    Failed(String),
    /// The request cannot be forwarded (400): no origin was tried.
    BadRequest(String),
}

/// A request target that may be forwarded: origin-form (`/…`), without dot segments,
/// encoded slashes or backslashes — the origin would resolve them, and a route's path
/// prefix (`example.com/public`) must not be left through `/public/../admin`.
fn check_target(target: &str) -> Result<(), OriginFailure> {
    if !target.starts_with('/') {
        return Err(OriginFailure::BadRequest(
            "only origin-form targets (/…) are forwarded".into(),
        ));
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let dotted = path.split('/').any(|segment| segment == "." || segment == "..");
    let encoded = path.as_bytes().windows(3).any(|window| {
        window[0] == b'%'
            && matches!(
                (window[1], window[2].to_ascii_lowercase()),
                (b'2', b'e') | (b'2', b'f') | (b'5', b'c')
            )
    });
    if dotted || encoded || path.contains('\\') {
        return Err(OriginFailure::BadRequest(
            "the path has dot segments, encoded slashes or backslashes".into(),
        ));
    }
    Ok(())
}

/// Whether `host` can go out as a Host header: a DNS name or an address, and a port.
fn is_host_like(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 260
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

impl OriginPool {
    /// The pool for `manifest`'s origins, with its health checks running. `reach`: whether
    /// origins may be internal addresses (the node's outbound policy).
    ///
    /// `own_ports`: the ports this node listens on; an origin there that could be the node
    /// itself (a loopback, unspecified or internal address, or any name) is refused, so no
    /// tenant reaches the node's admin listener through it.
    pub fn new(
        manifest: &Manifest,
        outbound: &OutboundClient,
        reach: Reach,
        own_ports: &[u16],
    ) -> Result<Arc<OriginPool>, String> {
        let connector = origin_connector(outbound, reach, manifest.origin.connect_timeout());
        let mut targets = Vec::new();
        let idle_in_function = Arc::new(PerWorker::default());
        for url in manifest.origin_urls() {
            let connect_uri = url
                .base()
                .parse::<Uri>()
                .map_err(|error| format!("origin {}: {error}", url.base()))?;
            let default_port = if url.https { 443 } else { 80 };
            let authority = if url.port == default_port {
                url.host.clone()
            } else {
                format!("{}:{}", url.host, url.port)
            };
            let authority = HeaderValue::from_str(&authority)
                .map_err(|error| format!("origin {}: {error}", url.base()))?;
            targets.push(Target {
                refused: {
                    let bare = url.host.trim_start_matches('[').trim_end_matches(']');
                    let literal = bare.parse::<std::net::IpAddr>().ok();
                    let may_be_self = own_ports.contains(&url.port)
                        && literal.is_none_or(|address| {
                            address.is_loopback()
                                || address.is_unspecified()
                                || atoll_core::outbound::is_internal(address)
                        });
                    may_be_self
                        || literal.is_some_and(|address| {
                            atoll_core::outbound::is_never_reachable(address)
                                || (reach == Reach::Public && atoll_core::outbound::is_internal(address))
                        })
                },
                base: url.base(),
                connect_uri,
                authority,
                idle: Arc::new(IdleConnections::new(
                    IdleLimits::default(),
                    Arc::clone(&idle_in_function),
                )),
                healthy: AtomicBool::new(true),
                check_failures: AtomicU32::new(0),
                failures: AtomicU32::new(0),
                ejected_until_ms: AtomicU64::new(0),
            });
        }
        let targets = Arc::new(targets);
        let health = check_health(
            manifest.name.clone(),
            Arc::clone(&targets),
            health_client(connector.clone()),
            manifest.origin.health_path().to_string(),
            manifest.origin.health_interval(),
        );
        let checks = tokio::spawn(health).abort_handle();
        let sweeps = tokio::spawn(sweep_idle(Arc::clone(&targets))).abort_handle();
        Ok(Arc::new(OriginPool {
            function: manifest.name.clone(),
            targets,
            connector,
            timeout: manifest.origin.timeout(),
            retries: manifest.origin.retries(),
            started: Instant::now(),
            checks: vec![checks, sweeps],
            tunnels: Arc::new(tokio::sync::Semaphore::new(MAX_TUNNELS_PER_FUNCTION)),
            in_flight: PerWorker::default(),
        }))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Whether origin `index` is healthy and not ejected. The clock is read only for an
    /// origin that was ejected, and an ejection that has run out is cleared, so the usual
    /// pick reads no clock at all.
    fn available(&self, index: usize, now_ms: &mut impl FnMut() -> u64) -> bool {
        let target = &self.targets[index];
        if !target.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = target.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if until > now_ms() {
            return false;
        }
        // A new ejection meanwhile stays.
        let _ = target
            .ejected_until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        true
    }

    /// The origin for the next try: power of two choices among those available and not
    /// tried yet (among all not tried, when none is available). `tried`: a bit per origin
    /// ([`atoll_core::origin::MAX_ORIGINS`] fit). No allocation: this runs per request.
    fn pick(&self, tried: u32) -> Option<usize> {
        let mut now = None;
        let mut now_ms = || *now.get_or_insert_with(|| self.now_ms());
        let (mut untried, mut available) = (0u32, 0u32);
        for (index, target) in self.targets.iter().enumerate() {
            if tried & (1 << index) == 0 && !target.refused {
                untried |= 1 << index;
                if self.available(index, &mut now_ms) {
                    available |= 1 << index;
                }
            }
        }
        let candidates = if available == 0 { untried } else { available };
        // The index of the `k`-th candidate (its `k`-th set bit).
        let nth = |k: u32| {
            let mut rest = candidates;
            for _ in 0..k {
                rest &= rest - 1;
            }
            rest.trailing_zeros() as usize
        };
        match candidates.count_ones() {
            0 => None,
            1 => Some(nth(0)),
            n => {
                let first = fastrand::u32(..n);
                let mut second = fastrand::u32(..n - 1);
                if second >= first {
                    second += 1;
                }
                let (first, second) = (nth(first), nth(second));
                let counts = self.in_flight.local();
                let load = |i: usize| counts[i].load(Ordering::Relaxed);
                Some(if load(second) < load(first) { second } else { first })
            }
        }
    }

    fn succeeded(&self, index: usize) {
        // Read first: a store on every request would pass the line between cores.
        let failures = &self.targets[index].failures;
        if failures.load(Ordering::Relaxed) != 0 {
            failures.store(0, Ordering::Relaxed);
        }
    }

    fn failed(&self, index: usize, reason: &str) {
        let target = &self.targets[index];
        let failures = target.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= EJECT_AFTER {
            target.failures.store(0, Ordering::Relaxed);
            target
                .ejected_until_ms
                .store(self.now_ms() + EJECTION.as_millis() as u64, Ordering::Relaxed);
            ::metrics::counter!("atoll_origin_ejections_total", "function" => self.function.clone())
                .increment(1);
            tracing::warn!(function = %self.function, origin = %target.base, reason, "origin ejected after {EJECT_AFTER} failures in a row");
        }
    }

    /// Sends one request to the origins: picks, retries, and answers with the origin's
    /// response head and a streamed body (or the 502/504 of the node). `forwarded`: the
    /// client side, for the forwarding headers and a protocol switch; `None` for a
    /// function's own call (its headers are its own).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        self: &Arc<Self>,
        method: Method,
        path_and_query: http::uri::PathAndQuery,
        mut headers: HeaderMap,
        body: Bytes,
        forwarded: Option<ClientSide>,
        hops: u32,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Response<ResponseBody>, OriginFailure> {
        if method == Method::CONNECT {
            return Err(OriginFailure::BadRequest(
                "CONNECT is not forwarded to origins".into(),
            ));
        }
        check_target(path_and_query.as_str())?;
        let upgrading =
            wants_upgrade(&method, &headers) && forwarded.as_ref().is_some_and(|f| f.upgrade.is_some());
        let upgrade_protocol = headers.get(http::header::UPGRADE).cloned();
        strip_hop_by_hop(&mut headers, &NODE_FORWARDING);
        // The chain's length travels on, so an origin that leads back to this route (a
        // loop through the edge) meets the same depth limit as function calls.
        headers.insert(HOPS, hops_value(hops.saturating_add(1)));
        let mut upgrade = None;
        if let Some(side) = forwarded {
            // The Host the client asked for, normalised (HTTP/2 carries it as :authority).
            if !is_host_like(&side.host) {
                return Err(OriginFailure::BadRequest("the Host is not a host name".into()));
            }
            set_forwarding(&mut headers, side.client, side.scheme, &side.host);
            upgrade = side.upgrade;
        }
        if upgrading && let Some(protocol) = upgrade_protocol {
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(http::header::UPGRADE, protocol);
        }
        let idempotent = is_idempotent(&method);
        let tries = 1 + self.retries as usize;
        // One time budget for every try together: retries never stretch a request past it.
        let give_up = tokio::time::Instant::now() + self.timeout;
        let give_up = deadline.map_or(give_up, |deadline| deadline.min(give_up));
        // HTTP/1.1 to an origin: the origin-form target, the Host in a header.
        let target_uri = Uri::from(path_and_query);
        let exchange = Exchange {
            method: &method,
            uri: &target_uri,
            headers: &headers,
            body: &body,
        };
        let (mut tried, mut tries_made) = (0u32, 0usize);
        let mut last = OriginFailure::Failed("every origin is an address this node may not reach".into());
        while tries_made < tries {
            let Some(index) = self.pick(tried) else { break };
            tried |= 1 << index;
            tries_made += 1;
            let target = &self.targets[index];
            let in_flight = InFlight::enter(self.in_flight.local(), index);
            // A retry, or a call whose caller's deadline may have passed, checks what is
            // left (an origin is not failed for a budget already spent); the first try of
            // a proxied request starts within its budget.
            if (tries_made > 1 || deadline.is_some()) && give_up <= tokio::time::Instant::now() {
                last = OriginFailure::TimedOut(self.timeout);
                break;
            }
            match tokio::time::timeout_at(give_up, self.exchange(index, &exchange, upgrading)).await {
                Ok(Ok((response, connection))) => {
                    // An answer, whatever its status, is an origin that works: a path that
                    // answers 5xx must not let clients eject origins at will.
                    let status = response.status();
                    self.succeeded(index);
                    if status == StatusCode::SWITCHING_PROTOCOLS && upgrading {
                        return Ok(self.join_upgrade(response, upgrade.take()));
                    }
                    return Ok(relay(response, connection, &target.idle, &method, in_flight).await);
                }
                Ok(Err(error)) => {
                    self.failed(index, "request failed");
                    tracing::debug!(function = %self.function, origin = %target.base, error = %error.reason, "origin request failed");
                    last = OriginFailure::Failed(format!("{}: {}", target.base, error.reason));
                    // A request that never left may go to another origin whatever its
                    // method; one that may have been received, only if idempotent.
                    if !error.never_sent && !idempotent {
                        break;
                    }
                }
                Err(_) => {
                    self.failed(index, "timed out");
                    last = OriginFailure::TimedOut(self.timeout);
                    if !idempotent {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// A new connection to origin `index` (the guarded resolver, the connect timeout, TLS
    /// for `https://`).
    async fn connect(&self, index: usize) -> Result<Box<OriginConnection>, ExchangeError> {
        use tower_service::Service;
        let never_sent = |reason: String| ExchangeError {
            reason,
            never_sent: true,
        };
        let mut connector = self.connector.clone();
        std::future::poll_fn(|context| connector.poll_ready(context))
            .await
            .map_err(|error| never_sent(atoll_isolate::wasi_http::error_chain(&*error)))?;
        let io = connector
            .call(self.targets[index].connect_uri.clone())
            .await
            .map_err(|error| {
                never_sent(format!(
                    "connecting: {}",
                    atoll_isolate::wasi_http::error_chain(&*error)
                ))
            })?;
        OriginConnection::new(io)
            .await
            .map_err(|error| never_sent(atoll_isolate::wasi_http::error_chain(&error)))
    }

    /// One try at origin `index`: its response head, and the connection that carries the
    /// body (`None` when a task of its own drives it: an upgrade).
    async fn exchange(
        &self,
        index: usize,
        exchange: &Exchange<'_>,
        upgrading: bool,
    ) -> Result<(Response<hyper::body::Incoming>, Option<Box<OriginConnection>>), ExchangeError> {
        let target = &self.targets[index];
        let request = || {
            let mut request = Request::new(Full::new(exchange.body.clone()));
            *request.method_mut() = exchange.method.clone();
            *request.uri_mut() = exchange.uri.clone();
            let mut headers = exchange.headers.clone();
            if !headers.contains_key(http::header::HOST) {
                headers.insert(http::header::HOST, target.authority.clone());
            }
            *request.headers_mut() = headers;
            request
        };
        if upgrading {
            // A connection of its own, driven by a task that can hand the socket over.
            let mut sender = Box::pin(self.connect(index)).await?.into_upgradable();
            return match sender.send_request(request()).await {
                Ok(response) => Ok((response, None)),
                Err(error) => Err(ExchangeError::from_hyper(&error)),
            };
        }
        let mut fresh = false;
        loop {
            let idle = if fresh { None } else { target.idle.take() };
            let reused = idle.is_some();
            let mut connection = match idle {
                Some(connection) => connection,
                // Boxed: a new connection is rare, its future large.
                None => Box::pin(self.connect(index)).await?,
            };
            match connection.request(request()).await {
                Ok(response) => return Ok((response, Some(connection))),
                // A kept-alive connection the origin closed before the request went out
                // (the race every keep-alive client meets): once more, on a new connection.
                // One that may have reached the origin is the caller's to retry or not.
                Err(error) if reused && error.never_sent => {
                    fresh = true;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The origin switched protocols: answer the client with its 101, then join the two
    /// connections once hyper hands the client's over.
    fn join_upgrade(
        &self,
        mut response: Response<hyper::body::Incoming>,
        client: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ResponseBody> {
        let (Ok(permit), Ok(mine)) = (
            TUNNELS.try_acquire(),
            Arc::clone(&self.tunnels).try_acquire_owned(),
        ) else {
            return node_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many open tunnels; try again later",
            );
        };
        let mut answer = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (name, value) in response.headers() {
            answer = answer.header(name, value);
        }
        let function = self.function.clone();
        let origin = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let _permits = (permit, mine);
            let Some(client) = client else { return };
            let (client, origin) = match tokio::join!(client, origin) {
                (Ok(client), Ok(origin)) => (client, origin),
                (Err(error), _) => {
                    tracing::debug!(%function, %error, "the client's upgrade failed");
                    return;
                }
                (_, Err(error)) => {
                    tracing::debug!(%function, %error, "the origin's upgrade failed");
                    return;
                }
            };
            ::metrics::gauge!("atoll_origin_tunnels", "function" => function.clone()).increment(1.0);
            tunnel(
                hyper_util::rt::TokioIo::new(client),
                hyper_util::rt::TokioIo::new(origin),
                TUNNEL_IDLE,
            )
            .await;
            ::metrics::gauge!("atoll_origin_tunnels", "function" => function).decrement(1.0);
        });
        answer
            .body(ResponseBody::empty())
            .expect("the origin's head is valid")
    }
}

/// Sets `Host`, `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded` for a request from
/// `client` over `scheme` for `host` (already checked by [`is_host_like`]). One buffer
/// holds `Forwarded`, and the others are slices of it (the address, the host): the buffer
/// and its shared count are all a request allocates here, and each try's copy of the
/// headers only counts references.
fn set_forwarding(headers: &mut HeaderMap, client: std::net::IpAddr, scheme: &'static str, host: &str) {
    // `for="[` 39 characters of address `]";proto=https;host="` … `"`.
    let mut text = bytes::BytesMut::with_capacity(80 + host.len());
    // `Forwarded` quotes an IPv6 address in brackets; `X-Forwarded-For` has it bare.
    let address = match client {
        std::net::IpAddr::V6(address) => {
            let _ = write!(text, "for=\"[{address}]\"");
            6..text.len() - 2
        }
        std::net::IpAddr::V4(address) => {
            let _ = write!(text, "for={address}");
            4..text.len()
        }
    };
    let _ = write!(text, ";proto={scheme};host=\"");
    let host_range = text.len()..text.len() + host.len();
    text.extend_from_slice(host.as_bytes());
    text.extend_from_slice(b"\"");
    let text = text.freeze();
    if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(address)) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if let Ok(host) = HeaderValue::from_maybe_shared(text.slice(host_range)) {
        headers.insert(http::header::HOST, host.clone());
        headers.insert(X_FORWARDED_HOST, host);
        if let Ok(value) = HeaderValue::from_maybe_shared(text) {
            headers.insert(FORWARDED, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
}

/// [`atoll_isolate::wasi_http::HOPS_HEADER`], made at compile time.
const HOPS: HeaderName = HeaderName::from_static(atoll_isolate::wasi_http::HOPS_HEADER);

/// The `atoll-hops` value for `hops`: static for every depth below the limit.
fn hops_value(hops: u32) -> HeaderValue {
    const DEPTHS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match DEPTHS.get(hops as usize) {
        Some(depth) => HeaderValue::from_static(depth),
        None => HeaderValue::from(hops),
    }
}

fn node_answer(status: StatusCode, text: &str) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(ResponseBody::whole(format!("{text}\n")))
        .expect("static response parts are valid")
}

/// The node's answer when no origin answered.
pub fn failure_response(failure: &OriginFailure) -> Response<ResponseBody> {
    match failure {
        OriginFailure::TimedOut(limit) => node_answer(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the origin did not answer within {}",
                humantime::format_duration(*limit)
            ),
        ),
        OriginFailure::Failed(_) => node_answer(StatusCode::BAD_GATEWAY, "no origin answered"),
        OriginFailure::BadRequest(reason) => node_answer(StatusCode::BAD_REQUEST, reason),
    }
}

/// Counts a request in flight at an origin until dropped (with the response body), in the
/// counts of the worker it started on.
struct InFlight(InFlightCounts, usize);

impl InFlight {
    fn enter(counts: &InFlightCounts, index: usize) -> Self {
        counts[index].fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(counts), index)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// An origin body that sends nothing for this long is cut off.
pub const BODY_IDLE: Duration = Duration::from_secs(60);

/// Largest origin body read whole before the response goes out: head and body then leave
/// in one write, and the origin's connection is free at once.
const WHOLE_BODY_BYTES: u64 = 64 << 10;

/// The origin's response: a small body (its length known) read whole, a larger one relayed
/// as it arrives. `connection`, when the body comes over it, is driven meanwhile and goes
/// back to `idle` when the response is done.
async fn relay(
    response: Response<hyper::body::Incoming>,
    connection: Option<Box<OriginConnection>>,
    idle: &Arc<IdleConnections>,
    method: &Method,
    in_flight: InFlight,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, &[]);
    let small = hyper::body::Body::size_hint(&body)
        .exact()
        .is_some_and(|length| length <= WHOLE_BODY_BYTES);
    let body = if *method == Method::HEAD || hyper::body::Body::is_end_stream(&body) {
        drop(body);
        if let Some(connection) = connection {
            idle.release(connection);
        }
        ResponseBody::empty()
    } else if small {
        let read = tokio::time::timeout(BODY_IDLE, read_whole(body));
        let read = match connection {
            Some(mut connection) => match connection.drive(read).await {
                Driven::Done(read) => {
                    if matches!(read, Ok(Ok(_))) {
                        idle.release(connection);
                    }
                    Some(read)
                }
                Driven::Ended(_) => None,
            },
            None => Some(read.await),
        };
        match read {
            Some(Ok(Ok(whole))) => ResponseBody::whole(whole),
            failed => {
                tracing::debug!(?failed, "the origin's body broke off or stalled");
                drop(in_flight);
                return node_answer(StatusCode::BAD_GATEWAY, "the origin's response broke off");
            }
        }
    } else {
        // The body drives its connection while it streams, and puts it back at its end.
        let lent = connection.map(|connection| LentConnection::new(connection, Arc::clone(idle)));
        ResponseBody::Origin(crate::body::OriginBody::new(body, BODY_IDLE, lent)).holding(in_flight)
    };
    Response::from_parts(parts, body)
}

/// A small body read whole: a body in one frame (the usual case) as it came, without a
/// copy; several frames joined. Trailers are dropped.
async fn read_whole(mut body: hyper::body::Incoming) -> Result<Bytes, hyper::Error> {
    use http_body_util::BodyExt;

    let mut whole = Bytes::new();
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if whole.is_empty() => whole = data,
            None => {
                let mut both = Vec::with_capacity(whole.len() + data.len());
                both.extend_from_slice(&whole);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(joined.map_or(whole, Bytes::from))
}

/// Copies bytes both ways until both sides close, one fails, or nothing moves for `idle`.
async fn tunnel<A, B>(client: A, origin: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut origin_read, mut origin_write) = tokio::io::split(origin);
    let mut up = vec![0u8; 16 << 10];
    let mut down = vec![0u8; 16 << 10];
    let (mut client_open, mut origin_open) = (true, true);
    while client_open || origin_open {
        tokio::select! {
            read = client_read.read(&mut up), if client_open => match read {
                Ok(0) | Err(_) => {
                    client_open = false;
                    let _ = origin_write.shutdown().await;
                }
                Ok(n) => if !matches!(tokio::time::timeout(idle, origin_write.write_all(&up[..n])).await, Ok(Ok(()))) { break },
            },
            read = origin_read.read(&mut down), if origin_open => match read {
                Ok(0) | Err(_) => {
                    origin_open = false;
                    let _ = client_write.shutdown().await;
                }
                Ok(n) => if !matches!(tokio::time::timeout(idle, client_write.write_all(&down[..n])).await, Ok(Ok(()))) { break },
            },
            () = tokio::time::sleep(idle) => break,
        }
    }
}

/// Closes the pool's idle connections that timed out or that their origin closed, every
/// [`SWEEP_INTERVAL`](crate::origin_conn::SWEEP_INTERVAL), until the pool is dropped.
async fn sweep_idle(targets: Arc<Vec<Target>>) {
    loop {
        tokio::time::sleep(crate::origin_conn::SWEEP_INTERVAL).await;
        for target in targets.iter() {
            target.idle.sweep();
        }
    }
}

/// The active health checks of one pool, until it is dropped.
async fn check_health(
    function: String,
    targets: Arc<Vec<Target>>,
    client: OriginClient,
    path: String,
    interval: Duration,
) {
    let timeout = interval.min(Duration::from_secs(2));
    loop {
        tokio::time::sleep(interval).await;
        let checks = targets.iter().filter(|target| !target.refused).map(|target| {
            let uri = format!("{}{path}", target.base).parse::<Uri>();
            let client = client.clone();
            async move {
                let Ok(uri) = uri else { return (target, false) };
                let mut request = Request::new(Full::new(Bytes::new()));
                *request.uri_mut() = uri;
                let healthy = matches!(
                    tokio::time::timeout(timeout, client.request(request)).await,
                    Ok(Ok(response)) if response.status().as_u16() < 500
                );
                (target, healthy)
            }
        });
        for (target, healthy) in futures_util::future::join_all(checks).await {
            if healthy {
                target.check_failures.store(0, Ordering::Relaxed);
                if !target.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(%function, origin = %target.base, "origin is healthy again");
                }
            } else if target.check_failures.fetch_add(1, Ordering::Relaxed) + 1 >= DOWN_AFTER
                && target.healthy.swap(false, Ordering::Relaxed)
            {
                tracing::warn!(%function, origin = %target.base, "origin failed its health check; taken out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, &[]);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
        // Without `Connection`: a hop-by-hop header alone, the node's own headers, none.
        let mut headers = HeaderMap::new();
        headers.insert("x-kept", HeaderValue::from_static("1"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers, &NODE_FORWARDING);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
        for name in crate::cluster::FORWARDING_HEADERS {
            headers.insert(name, HeaderValue::from_static("forged"));
        }
        strip_hop_by_hop(&mut headers, &[]);
        assert_eq!(headers.len(), 4, "only what `also` names goes besides hop-by-hop");
        strip_hop_by_hop(&mut headers, &NODE_FORWARDING);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    fn text_of(headers: &HeaderMap, name: &str) -> String {
        headers.get(name).unwrap().to_str().unwrap().to_string()
    }

    #[test]
    fn forwarding_headers_name_the_client_scheme_and_host() {
        let mut headers = HeaderMap::new();
        set_forwarding(
            &mut headers,
            "203.0.113.7".parse().unwrap(),
            "https",
            "shop.example:8443",
        );
        let text = |name: &str| text_of(&headers, name);
        assert_eq!(text("x-forwarded-for"), "203.0.113.7");
        assert_eq!(text("x-forwarded-proto"), "https");
        assert_eq!(text("x-forwarded-host"), "shop.example:8443");
        assert_eq!(text("host"), "shop.example:8443");
        assert_eq!(
            text("forwarded"),
            "for=203.0.113.7;proto=https;host=\"shop.example:8443\""
        );
        let mut headers = HeaderMap::new();
        set_forwarding(
            &mut headers,
            "2001:db8::1".parse().unwrap(),
            "http",
            "[2001:db8::2]",
        );
        let text = |name: &str| text_of(&headers, name);
        assert_eq!(text("x-forwarded-for"), "2001:db8::1");
        assert_eq!(text("host"), "[2001:db8::2]");
        assert_eq!(text("x-forwarded-host"), "[2001:db8::2]");
        assert_eq!(
            text("forwarded"),
            "for=\"[2001:db8::1]\";proto=http;host=\"[2001:db8::2]\""
        );
        let mut headers = HeaderMap::new();
        set_forwarding(
            &mut headers,
            "203.0.113.7".parse().unwrap(),
            "http",
            &"a".repeat(600),
        );
        assert_eq!(
            text_of(&headers, "forwarded"),
            format!("for=203.0.113.7;proto=http;host=\"{}\"", "a".repeat(600)),
            "never a cut-off value"
        );
        assert_eq!(headers.get("x-forwarded-for").unwrap(), "203.0.113.7");
        assert_eq!(hops_value(3), "3");
        assert_eq!(hops_value(12), "12");
    }

    #[test]
    fn an_upgrade_is_a_get_with_upgrade_and_connection_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert("upgrade", HeaderValue::from_static("websocket"));
        headers.insert("connection", HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(wants_upgrade(&Method::GET, &headers));
        assert!(!wants_upgrade(&Method::POST, &headers));
        headers.insert("connection", HeaderValue::from_static("keep-alive"));
        assert!(!wants_upgrade(&Method::GET, &headers));
    }
}
