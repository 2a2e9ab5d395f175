//! The edge's HTTP service: route a request to a function and run it.
//!
//! Per request: find the host (the URI authority for HTTP/2, the `Host` header for HTTP/1.1),
//! look it up in the current route table (lock-free), read the body up to a limit, get
//! admitted by the function's pool (or 503 + `Retry-After` when its queue is full), and run
//! the function on the guest executor so a slow guest never holds an I/O thread; past the
//! function's timeout the guest is interrupted and the client gets 504. Other failures are
//! answered with short, clear statuses: 404 naming an unknown host, 413 for a body over the
//! limit, 502 when the function fails (the reason and the function's stderr go to the node
//! log, not to the client).
//!
//! In a cluster, [`Cluster::place`] may send the request to a peer instead (the function's
//! home node, or any taker while this node drains); when that peer cannot be reached, fails
//! before it could have run the request, or answers that it did not run it (it serves
//! another version, is full or starting: [`NOT_SERVED_HEADER`]), the request is served here
//! after all. A forwarded request is answered here or refused, never forwarded again; its
//! client address and scheme are taken from the hop header only when the header's signature
//! verifies.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use atoll_ingress::acme::Http01Challenges;
use atoll_ingress::server::{BoxError, ConnectionInfo, Handler, request_host, text_response};
use atoll_ingress::workers::PerWorker;
use atoll_isolate::wasi_http::{HOPS_HEADER, MAX_SERVICE_DEPTH};
use atoll_isolate::{
    CgiRequest, GuestExecutor, GuestPanicked, InvokeError, Run, RunObserver, RunOptions, RunOutcome,
    StartKind, StreamedResponse,
};
use bytes::Bytes;
use crossbeam_utils::CachePadded;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;

use crate::body::ResponseBody;
use crate::cluster::{
    Cluster, FORWARDING_HEADERS, HOP_HEADER, NOT_SERVED_HEADER, NotServed, SERVED_BY_HEADER, not_served,
};
use crate::hop::Bound;
use crate::metrics;
use crate::served::{Routing, ServedFunction};

/// Largest request body a function accepts.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Longest a client may go without sending any of the request body it announced (nginx's
/// `client_body_timeout`, Envoy's stream idle timeout): past it the request gets 408 and an
/// HTTP/1.1 connection is closed, so a trickling client cannot hold a connection slot or a
/// stream forever.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where ACME HTTP-01 challenges are fetched (RFC 8555 §8.3).
pub const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// Routes requests to functions.
pub struct EdgeService {
    routing: Arc<Routing>,
    executor: Arc<GuestExecutor>,
    max_body_bytes: usize,
    body_timeout: Duration,
    /// ACME HTTP-01 tokens, answered before routing.
    http01: Option<Arc<Http01Challenges>>,
    /// Requests being answered now, counted per connection worker: the heartbeat and
    /// `atoll_requests_in_flight` (set when metrics are read) take the sum.
    in_flight: PerWorker<Arc<CachePadded<AtomicI64>>>,
    /// Peers to forward to; `None` for a node on its own.
    cluster: Option<Arc<Cluster>>,
    /// This node's name for [`SERVED_BY_HEADER`].
    served_by: http::HeaderValue,
}

impl EdgeService {
    pub fn new(routing: Arc<Routing>, executor: Arc<GuestExecutor>) -> Arc<Self> {
        Self::with_options(
            routing,
            executor,
            DEFAULT_MAX_BODY_BYTES,
            DEFAULT_BODY_TIMEOUT,
            None,
            None,
        )
    }

    pub fn with_options(
        routing: Arc<Routing>,
        executor: Arc<GuestExecutor>,
        max_body_bytes: usize,
        body_timeout: Duration,
        http01: Option<Arc<Http01Challenges>>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Self> {
        let served_by = cluster
            .as_ref()
            .and_then(|cluster| http::HeaderValue::from_str(cluster.name()).ok())
            .unwrap_or(http::HeaderValue::from_static("node"));
        Arc::new(EdgeService {
            routing,
            executor,
            max_body_bytes,
            body_timeout,
            http01,
            in_flight: PerWorker::default(),
            cluster,
            served_by,
        })
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> u64 {
        let sum: i64 = self
            .in_flight
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum();
        sum.max(0) as u64
    }

    /// Sets the gauges kept outside the metrics registry (`atoll_requests_in_flight`), so
    /// a scrape that follows reads them as they are now.
    pub fn refresh_metrics(&self) {
        ::metrics::gauge!(metrics::REQUESTS_IN_FLIGHT).set(self.in_flight() as f64);
        self.routing.flush_metrics();
    }
}

impl Handler for EdgeService {
    type Body = ResponseBody;

    async fn handle<B>(&self, request: Request<B>, connection: ConnectionInfo) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let in_flight = InFlight::enter(self);
        let (mut response, function) = self.route(request, connection).await;
        let status = response.status().as_u16();
        match function {
            Accounting::Function(function) => {
                function.metrics.request(status, started.elapsed());
                response
                    .headers_mut()
                    .insert(VERSION_HEADER_NAME, function.version_header.clone());
            }
            // Counted where it ran; here only in `atoll_forwards_total`, so that summing
            // `atoll_requests_total` over the cluster counts each request once.
            Accounting::Forwarded => {}
            Accounting::Unrouted => {
                ::metrics::histogram!(metrics::REQUEST_DURATION, "function" => "-")
                    .record(started.elapsed().as_secs_f64());
                ::metrics::counter!(metrics::REQUESTS_TOTAL, "function" => "-", "status" => status.to_string())
                    .increment(1);
            }
        }
        // A streamed response is in flight until its body ends.
        response.map(|body| body.holding(in_flight))
    }
}

impl EdgeService {
    async fn route<B>(
        &self,
        request: Request<B>,
        connection: ConnectionInfo,
    ) -> (Response<ResponseBody>, Accounting)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if let Some(http01) = &self.http01
            && let Some(token) = request.uri().path().strip_prefix(ACME_CHALLENGE_PATH)
        {
            return match http01.key_authorization(token) {
                Some(key_authorization) => (
                    Response::builder()
                        .header(http::header::CONTENT_TYPE, "application/octet-stream")
                        .body(ResponseBody::whole(key_authorization))
                        .expect("static response parts are valid"),
                    Accounting::Unrouted,
                ),
                None => (
                    text_response(StatusCode::NOT_FOUND, "no such ACME challenge token"),
                    Accounting::Unrouted,
                ),
            };
        }
        let Some(host) = request_host(&request) else {
            return (
                text_response(StatusCode::BAD_REQUEST, "request has no Host"),
                Accounting::Unrouted,
            );
        };
        // A forwarded request: what the forwarding node says (the version it expects is
        // honoured whether or not the signature verifies: it picks one of the versions any
        // client may pin, or makes this node refuse).
        let hop = request.headers().get(HOP_HEADER).map(|value| {
            let value = value.to_str().unwrap_or_default();
            let target = request.uri().path_and_query().map_or("/", |path| path.as_str());
            match &self.cluster {
                Some(cluster) => cluster.read_hop(
                    value,
                    Bound {
                        method: request.method().as_str(),
                        host: &host,
                        target,
                    },
                ),
                None => crate::hop::Reading {
                    claims: None,
                    verified: Err(crate::hop::HopError::NoKey),
                },
            }
        });
        // A guard, not a clone: the table's count is not written by every request.
        let current = self.routing.current_guard();
        let Some(table) = current.as_ref() else {
            if hop.is_some() {
                return (
                    refusal(NotServed::Starting, "node is starting: no route table yet"),
                    Accounting::Unrouted,
                );
            }
            return (
                text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node is starting: no route table yet",
                ),
                Accounting::Unrouted,
            );
        };
        let Some(found) = table.lookup(&host, request.uri().path()) else {
            let host = atoll_core::host::normalize_host(&host).into_owned();
            if hop.is_some() {
                // The forwarding node serves a function here; this node does not (yet).
                return (
                    refusal(
                        NotServed::Version,
                        format!("no function is routed for host `{host}` on this node"),
                    ),
                    Accounting::Unrouted,
                );
            }
            return (
                text_response(
                    StatusCode::NOT_FOUND,
                    format!("no function is routed for host `{host}`"),
                ),
                Accounting::Unrouted,
            );
        };
        // The version that serves it: a forwarded request names the one the forwarding
        // node chose; a client may pin one for testing; else the function's split decides.
        let claimed = hop.as_ref().and_then(|hop| hop.claims.as_ref());
        let pinned = match claimed {
            Some(claims) => Some(claims.version),
            None => match request.headers().get(VERSION_HEADER_NAME) {
                None => None,
                Some(value) => match parse_version(value.as_bytes()) {
                    Some(version) => Some(version),
                    None => {
                        return (
                            text_response(
                                StatusCode::BAD_REQUEST,
                                format!("{VERSION_HEADER} is a version number such as `7` or `v7`"),
                            ),
                            Accounting::Unrouted,
                        );
                    }
                },
            },
        };
        let picked = found.target.pick(
            pinned,
            |key| {
                sticky_point(
                    found.target.name(),
                    key,
                    request.headers(),
                    connection.remote.ip(),
                )
            },
            || fastrand::u16(..10_000),
        );
        let served = match (picked, pinned) {
            (Some(served), _) => Arc::clone(served),
            // A peer's version this node does not serve: refused below, as any other.
            (None, _) if claimed.is_some() => Arc::clone(found.target),
            (None, version) => {
                return (
                    text_response(
                        StatusCode::NOT_FOUND,
                        format!(
                            "function `{}` serves no v{} here (a pinned version must be active or \
                             in its traffic split)",
                            found.target.name(),
                            version.unwrap_or_default()
                        ),
                    ),
                    Accounting::Unrouted,
                );
            }
        };
        if let Some(claims) = claimed {
            let deployment = &served.deployment;
            if claims.function != deployment.name
                || claims.version != deployment.version
                || claims.sha256 != deployment.sha256
            {
                tracing::debug!(
                    peer = %claims.node,
                    expected = %format!("{}@v{}", claims.function, claims.version),
                    serving = %format!("{}@v{}", deployment.name, deployment.version),
                    "forwarded request for another version; not running it"
                );
                return (
                    refusal(
                        NotServed::Version,
                        format!(
                            "this node serves {} v{}, not {} v{}",
                            deployment.name, deployment.version, claims.function, claims.version
                        ),
                    ),
                    Accounting::Unrouted,
                );
            }
        }
        // What a function's CGI environment names (an origin route needs neither).
        let (matched_route, route_prefix) = if served.pool.is_some() {
            (
                found.pattern.to_string(),
                found.pattern.path_prefix.clone().unwrap_or_default(),
            )
        } else {
            (String::new(), String::new())
        };
        drop(current);

        let (mut parts, body) = request.into_parts();
        let body = match read_body(body, self.max_body_bytes, self.body_timeout).await {
            Ok(body) => body,
            Err(BodyError::Stalled) => {
                let mut response = text_response(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("no request body received for {:?}; closing", self.body_timeout),
                );
                // HTTP/1.1: the rest of the body will never be read; free the connection.
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                return (response, Accounting::Function(served));
            }
            Err(BodyError::Read(error)) if error.is::<http_body_util::LengthLimitError>() => {
                return (
                    text_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("request body is over the {} byte limit", self.max_body_bytes),
                    ),
                    Accounting::Function(served),
                );
            }
            Err(BodyError::Read(error)) => {
                tracing::debug!(%error, "reading request body failed");
                return (
                    text_response(StatusCode::BAD_REQUEST, "could not read the request body"),
                    Accounting::Function(served),
                );
            }
        };
        let mut scheme = if connection.is_secure() { "https" } else { "http" };
        let mut client = connection.remote;
        if let Some(hop) = &hop {
            // Only a node holding the cluster key is believed about the client.
            match (hop.trusted(), &hop.verified) {
                (Some(claims), _) => {
                    client = claims.client;
                    if claims.https {
                        scheme = "https";
                    }
                }
                (None, Err(error)) => {
                    tracing::debug!(from = %connection.remote, %error, "hop header not believed");
                }
                (None, Ok(())) => {}
            }
        } else if let Some(cluster) = &self.cluster
            && let Some(pool) = &served.pool
            && let Some(peer) = cluster.place(served.name(), pool.saturated())
        {
            let timeout = pool.function().config().timeout + FORWARD_SLACK;
            // Boxed: forwarding is the rare path, and its future would make every request's
            // future larger.
            let forwarded = Box::pin(cluster.forward(
                (&peer.0, peer.1),
                parts.method.clone(),
                &parts.uri,
                parts.headers.clone(),
                body.clone(),
                &host,
                connection.remote,
                scheme == "https",
                &served.deployment,
                timeout,
            ))
            .await;
            match forwarded {
                Ok(response) => match not_served(&response) {
                    None => return (response, Accounting::Forwarded),
                    // The peer ran nothing (another version, full, starting): serve it here.
                    Some(reason) => {
                        tracing::debug!(peer = %peer.0, reason = reason.as_str(), "peer did not serve it; serving here");
                    }
                },
                Err(error) if error.maybe_sent && !is_idempotent(&parts.method) => {
                    tracing::warn!(peer = %peer.0, reason = %error.reason, "forwarded request lost");
                    return (
                        text_response(StatusCode::BAD_GATEWAY, "the peer serving this request failed"),
                        Accounting::Function(served),
                    );
                }
                Err(error) => {
                    tracing::debug!(peer = %peer.0, reason = %error.reason, "forward failed; serving here");
                }
            }
        }
        // A request made by a function's outbound call says how long its chain is.
        let service_depth = match parts.headers.get(HOPS_HEADER) {
            None => 0,
            Some(value) => match value.to_str().ok().and_then(|text| text.parse::<u32>().ok()) {
                Some(hops) if hops <= MAX_SERVICE_DEPTH => hops,
                _ => {
                    return (
                        text_response(
                            StatusCode::LOOP_DETECTED,
                            format!("the chain of calls between functions is over {MAX_SERVICE_DEPTH}"),
                        ),
                        Accounting::Function(served),
                    );
                }
            },
        };
        // A route to origins: the node is a reverse proxy.
        if served.pool.is_none()
            && let Some(origins) = &served.origins
        {
            let side = crate::origin::ClientSide {
                client: client.ip(),
                scheme,
                host: atoll_core::host::normalize_host(&host).into_owned(),
                upgrade: parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
            };
            let target = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            // Boxed, as the function's run below: each is kilobytes, which every request's
            // future would otherwise carry (and copy as it is made) whichever path it takes.
            let mut response = match Box::pin(origins.send(
                parts.method,
                target,
                parts.headers,
                body,
                Some(side),
                service_depth,
                None,
            ))
            .await
            {
                Ok(response) => response,
                Err(failure) => {
                    tracing::debug!(function = %served.name(), ?failure, "no origin answered");
                    crate::origin::failure_response(&failure)
                }
            };
            if self.cluster.is_some() {
                response
                    .headers_mut()
                    .insert(SERVED_BY_HEADER, self.served_by.clone());
            }
            return (response, Accounting::Function(served));
        }
        for name in FORWARDING_HEADERS {
            parts.headers.remove(name);
        }
        let server_name = atoll_core::host::normalize_host(&host).into_owned();
        let cgi_request = CgiRequest {
            method: parts.method.as_str().to_string(),
            raw_path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            protocol: protocol_name(parts.version).to_string(),
            scheme: scheme.to_string(),
            server_name,
            server_port: connection.local.port(),
            remote_addr: client.ip().to_string(),
            remote_port: client.port(),
            matched_route,
            route_prefix,
            headers: parts.headers,
            body,
            service_depth,
            deadline: None,
            cron_tick: None,
        };
        let mut response = Box::pin(invoke(&self.executor, &served, cgi_request, None)).await;
        if self.cluster.is_some() {
            response
                .headers_mut()
                .insert(SERVED_BY_HEADER, self.served_by.clone());
        }
        (response, Accounting::Function(served))
    }
}

/// Why a request body could not be read.
enum BodyError {
    /// No frame arrived within the progress timeout.
    Stalled,
    Read(BoxError),
}

/// Reads a request body up to `max_bytes`, giving the client at most `progress_timeout`
/// between two frames.
async fn read_body<B>(body: B, max_bytes: usize, progress_timeout: Duration) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // No body (a GET, most often): nothing to wait for, and no timer to arm.
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let mut body = std::pin::pin!(Limited::new(body, max_bytes));
    let mut chunks: Vec<Bytes> = Vec::new();
    loop {
        match tokio::time::timeout(progress_timeout, body.frame()).await {
            Err(_) => return Err(BodyError::Stalled),
            Ok(None) => break,
            Ok(Some(Err(error))) => return Err(BodyError::Read(error)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    chunks.push(data);
                }
            }
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().expect("one chunk"),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Runs `request` on `served` and makes its response: the function's own, or the node's
/// for a failure. `deadline`, when earlier than the function's timeout, ends the run.
pub(crate) async fn invoke(
    executor: &GuestExecutor,
    served: &Arc<ServedFunction>,
    request: CgiRequest,
    deadline: Option<tokio::time::Instant>,
) -> Response<ResponseBody> {
    let name = served.name();
    let options = RunOptions {
        // An HTTP/1.0 body without a length ends when the connection closes, which a body
        // that broke off does too: such clients get whole responses, as before streaming.
        streamable: request.protocol != "HTTP/1.0",
        // HEAD: the head goes out, the rest of the output is counted and dropped.
        discard_body: request.method == "HEAD",
        deadline,
    };
    let Some(pool) = served.pool.clone() else {
        return text_response(StatusCode::BAD_GATEWAY, format!("`{name}` has no module to run"));
    };
    let observer: Arc<dyn RunObserver> = Arc::clone(served) as Arc<dyn RunObserver>;
    let outcome = match atoll_isolate::invoke(executor, pool, request, options, observer).await {
        Ok(Run::Streaming(head)) => return streamed_response(head),
        Ok(Run::Finished(outcome)) => outcome,
        Err(overloaded) => {
            served.metrics.overloaded();
            tracing::debug!(function = %name, %overloaded, "queue full");
            let mut response = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("function `{name}` is at capacity; retry shortly"),
            );
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(overloaded.retry_after.as_secs().max(1)),
            );
            response.headers_mut().insert(
                NOT_SERVED_HEADER,
                http::HeaderValue::from_static(NotServed::Capacity.as_str()),
            );
            return response;
        }
    };
    match outcome {
        Ok(Ok((invocation, _))) => {
            let mut response = Response::new(ResponseBody::whole(invocation.response.body));
            *response.status_mut() = invocation.response.status;
            *response.headers_mut() = invocation.response.headers;
            response.headers_mut().remove(NOT_SERVED_HEADER);
            response
        }
        Ok(Err(error)) => {
            let status = match error {
                InvokeError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            text_response(
                status,
                format!("function `{name}` failed: {}", public_reason(&error)),
            )
        }
        Err(GuestPanicked) => text_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

/// The response for a streamed head: its body is read from the guest as it writes.
fn streamed_response(head: StreamedResponse) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Function(head.body));
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    // Only the node says it ran nothing: a function that did run cannot.
    response.headers_mut().remove(NOT_SERVED_HEADER);
    response
}

impl RunObserver for ServedFunction {
    fn instance_started(&self, start_time: Duration, ahead: bool) {
        self.metrics.instance_started(start_time, ahead);
    }

    fn finished(&self, outcome: &RunOutcome) {
        record(self, outcome);
    }
}

/// Counts a run's outcome in the function's metrics and logs what the guest logged (and
/// why it failed).
fn record(served: &ServedFunction, outcome: &RunOutcome) {
    let name = served.name();
    let version = served.deployment.version;
    match outcome {
        Ok(Ok((invocation, start_kind))) => {
            if *start_kind == StartKind::OnDemand {
                served.metrics.instance_started(invocation.start_time, false);
            }
            served.metrics.invocation_ok(invocation.run_time);
            if !invocation.log.is_empty() {
                tracing::info!(
                    target: "atoll::function",
                    function = %name,
                    version,
                    "{}",
                    atoll_isolate::function::printable_log(&invocation.log)
                );
            }
        }
        Ok(Err(error @ InvokeError::ClientGone { .. })) => {
            // Clients leave mid-download all the time: counted, not worth a warning.
            served.metrics.invocation_failed(error.outcome());
            tracing::debug!(function = %name, version, "client went away during a streamed response");
        }
        Ok(Err(error)) => {
            served.metrics.invocation_failed(error.outcome());
            tracing::warn!(
                function = %name,
                version,
                error = %error,
                stderr = %atoll_isolate::function::printable_log(error.log()),
                "invocation failed"
            );
        }
        Err(GuestPanicked) => tracing::error!(function = %name, "invocation panicked"),
    }
}

/// Counts a request in `atoll_requests_in_flight` (and the heartbeat's count) until
/// dropped: when it is answered, when the client goes away and the request's future is
/// dropped, or when its streamed body ends. It holds its worker's count (dropped on
/// another thread, it still takes back what it added).
struct InFlight(Arc<CachePadded<AtomicI64>>);

impl InFlight {
    fn enter(service: &EdgeService) -> Self {
        let count = Arc::clone(service.in_flight.local());
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a request's metrics go.
enum Accounting {
    /// The function's own series.
    Function(Arc<ServedFunction>),
    /// `function="-"`: no function was found (or a challenge was answered).
    Unrouted,
    /// A peer ran it and counted it.
    Forwarded,
}

/// Time a forwarded request gets beyond the function's own timeout (the hop, a cold start).
const FORWARD_SLACK: Duration = Duration::from_secs(5);

/// On answers, the version of the function that made them; on requests, the version a
/// client pins (any version in the function's traffic split, one at 0% too).
pub const VERSION_HEADER: &str = "x-atoll-version";
const VERSION_HEADER_NAME: http::HeaderName = http::HeaderName::from_static(VERSION_HEADER);

/// `7` or `v7`.
fn parse_version(value: &[u8]) -> Option<u64> {
    let digits = value.strip_prefix(b"v").unwrap_or(value);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where a request's sticky key puts it (`None`: the request has no such key, and draws).
fn sticky_point(
    function: &str,
    key: &atoll_core::traffic::StickyKey,
    headers: &http::HeaderMap,
    client: std::net::IpAddr,
) -> Option<u16> {
    use atoll_core::traffic::{StickyKey, point_of};
    match key {
        StickyKey::Header(name) => headers
            .get(name.as_str())
            .map(|value| point_of(function, value.as_bytes())),
        StickyKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (key, value) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
                (key == name.as_bytes()).then(|| point_of(function, &value[1..]))
            }),
        // An IPv4 client seen by a dual-stack listener (`::ffff:a.b.c.d`) is the same
        // client on every node.
        StickyKey::Ip => Some(match client.to_canonical() {
            std::net::IpAddr::V4(address) => point_of(function, &address.octets()),
            std::net::IpAddr::V6(address) => point_of(function, &address.octets()),
        }),
    }
}

/// Methods a client may repeat (RFC 9110 §9.2.2): safe to run here after a forward broke
/// off with the request possibly run at the peer.
fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// A node's answer to a forwarded request it did not run, marked so the forwarding node
/// serves it instead.
fn refusal(reason: NotServed, text: impl Into<String>) -> Response<ResponseBody> {
    let mut response = text_response(reason.status(), text);
    response
        .headers_mut()
        .insert(NOT_SERVED_HEADER, http::HeaderValue::from_static(reason.as_str()));
    response
}

/// What the client is told: the kind of failure, not the guest's internals.
fn public_reason(error: &InvokeError) -> &'static str {
    match error {
        InvokeError::Instantiate { .. } => "it could not be started",
        InvokeError::Trap { .. } => "it trapped",
        InvokeError::Exit { .. } => "it exited with an error",
        InvokeError::MalformedOutput { .. } => "its output is not a valid CGI response",
        InvokeError::ResponseTooLarge { .. } => "its response is too large",
        InvokeError::Timeout { .. } => "it ran past its timeout",
        InvokeError::ClientGone { .. } => "the client went away",
    }
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}
