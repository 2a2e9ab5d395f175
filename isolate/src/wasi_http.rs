//! `wasi_experimental_http`: outbound HTTP for guests, the host import WAGI and early Spin
//! gave modules (deislabs/wasi-experimental-http, final version 0.10.0), so WAGI modules
//! that call out run here unchanged.
//!
//! The ABI, as that crate's guest side uses it — five functions, every parameter an `i32`,
//! every result an error code:
//!
//! ```text
//! req(url, url_len, method, method_len, headers, headers_len, body, body_len,
//!     status_out /*u16*/, handle_out /*u32*/)       the whole response is read here
//! header_get(handle, name, name_len, value, value_len, written_out)   first value
//! headers_get_all(handle, buf, buf_len, written_out)                  "name:value\n"…
//! body_read(handle, buf, buf_len, read_out)         0 bytes read = the end of the body
//! close(handle)                                     always 0
//! ```
//!
//! Handles are numbered per request from 0 as the original host numbers them (a cursor
//! that moves on past handles still open, so a closed one is reused only while the cursor
//! has not passed it). Where
//! the original host panicked (an unknown handle in `body_read`, a header line without `:`)
//! this one answers `INVALID_HANDLE` and `INVALID_ENCODING`.
//!
//! What Atoll adds, for a platform shared by tenants who may be hostile:
//! - Deny by default: `[outbound] allowed_hosts` (Spin's syntax) and the SSRF guard decide
//!   before anything connects (see [`crate::outbound`]); a refusal is `DESTINATION_NOT_ALLOWED`
//!   and a line in the function's log that says why.
//! - Limits per request: calls made (`max_requests`), responses open at once
//!   (`max_concurrent`), their bodies together (`max_response`), and a deadline that is the
//!   run's own: a guest waiting on the network is woken when the run is stopped.
//! - Redirects are not followed: the guest sees the 3xx, and each hop it follows passes the
//!   allow-list again.
//! - Framing and hop-by-hop headers from the guest are dropped: the connection is pooled
//!   and may carry another function's next request, so no guest may choose its framing.
//! - Service bindings: `http://NAME.atoll.internal/…` never leaves the node. It runs
//!   function NAME in-process, if the manifest binds it (`[services]`), through a
//!   [`ServiceCaller`] the node provides; the chain of calls is at most
//!   [`MAX_SERVICE_DEPTH`] deep, and the callee's run ends by the caller's deadline.
//! - While a guest waits, its worker thread counts as stalled ([`crate::executor::waiting`]),
//!   so other requests go around it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_core::outbound::{AllowedHosts, Scheme};
use bytes::Bytes;
use wasmer::{FunctionEnvMut, MemoryView};

use crate::outbound::{OutboundClient, Refusal, check_destination, refusal_in};
use crate::wasi::{CallError, HostCall, HostCallInterrupted, WasiContext};

/// The import module name.
pub const HTTP_MODULE: &str = "wasi_experimental_http";

/// The module's functions and how many `i32` parameters each takes (each returns one).
pub const HTTP_IMPORTS: [(&str, usize); 5] = [
    ("req", 10),
    ("close", 1),
    ("header_get", 6),
    ("headers_get_all", 4),
    ("body_read", 4),
];

/// The ABI's error codes (its `witx` enum, in order).
pub mod code {
    pub const SUCCESS: i32 = 0;
    pub const INVALID_HANDLE: i32 = 1;
    pub const MEMORY_NOT_FOUND: i32 = 2;
    pub const MEMORY_ACCESS_ERROR: i32 = 3;
    pub const BUFFER_TOO_SMALL: i32 = 4;
    pub const HEADER_NOT_FOUND: i32 = 5;
    pub const UTF8_ERROR: i32 = 6;
    pub const DESTINATION_NOT_ALLOWED: i32 = 7;
    pub const INVALID_METHOD: i32 = 8;
    pub const INVALID_ENCODING: i32 = 9;
    pub const INVALID_URL: i32 = 10;
    pub const REQUEST_ERROR: i32 = 11;
    pub const RUNTIME_ERROR: i32 = 12;
    pub const TOO_MANY_SESSIONS: i32 = 13;
}
use code::*;

/// Longest URL a guest may call.
pub const MAX_URL_BYTES: u32 = 8 << 10;
/// Largest request head (the `name:value\n` header text) a guest may send.
pub const MAX_REQUEST_HEADER_BYTES: u32 = 64 << 10;
/// Longest method name, and longest header name `header_get` looks up.
pub const MAX_METHOD_BYTES: u32 = 64;
pub const MAX_HEADER_NAME_BYTES: u32 = 1024;
/// Largest request body a guest may send.
pub const MAX_REQUEST_BODY_BYTES: u32 = 16 << 20;

/// How deep a chain of service calls may go (A calls B calls C … counts each call).
pub const MAX_SERVICE_DEPTH: u32 = 8;
/// On every outbound network call: its place in the chain of calls. A node reads it on
/// requests it receives, so a chain that leaves the node and comes back keeps counting.
pub const HOPS_HEADER: &str = "atoll-hops";

/// A call from one function to another on this node (a service binding).
#[derive(Debug)]
pub struct ServiceCall {
    /// The calling function.
    pub caller: String,
    /// The function called.
    pub function: String,
    pub method: http::Method,
    /// The path and query the guest asked for, e.g. `/items?done=1`.
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The callee's place in the chain: 1 for a call from a request's own function.
    pub depth: u32,
    /// The caller's deadline: the callee's run ends by then.
    pub deadline: Instant,
    /// Largest response body the caller can hold.
    pub max_response_bytes: u64,
    /// A call to the caller's own origins (`http://origin.atoll.internal/…`), not to a
    /// function: `function` is then the caller.
    pub origin: bool,
}

/// What a service call answered: the callee's response, whatever its status.
#[derive(Debug)]
pub struct ServiceResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Why a service call produced no response.
#[derive(Debug, thiserror::Error)]
pub enum ServiceFailure {
    #[error("function {0} is not served on this node")]
    NotServed(String),
    #[error("the response is over the {0} bytes left of [outbound] max_response")]
    TooLarge(u64),
    #[error("{0}")]
    Failed(String),
}

pub type ServiceFuture = Pin<Box<dyn Future<Output = Result<ServiceResponse, ServiceFailure>> + Send>>;

/// Runs functions by name on this node: the node's side of service bindings.
pub trait ServiceCaller: Send + Sync {
    fn call(&self, call: ServiceCall) -> ServiceFuture;
}

/// The function a service-binding host names: `NAME.atoll.internal` → `NAME`. Any host
/// under the domain is a service call, never a network one (an invalid name is refused).
pub fn service_target(host: &str) -> Option<&str> {
    let domain = atoll_core::manifest::SERVICE_DOMAIN;
    if host == domain {
        return Some("");
    }
    host.strip_suffix(domain)?.strip_suffix('.')
}

/// What one function may do outbound, with the node's client. Shared by all its runs.
pub struct OutboundAccess {
    pub client: Arc<OutboundClient>,
    /// The function's name (the caller in service calls).
    pub function: String,
    /// Functions it may call through service bindings.
    pub services: Vec<String>,
    /// Whether the manifest lists origins, which `http://origin.atoll.internal` reaches.
    pub origins: bool,
    /// The node's side of service calls; `None` refuses them.
    pub service_caller: Option<Arc<dyn ServiceCaller>>,
    pub allowed: AllowedHosts,
    /// Calls per request.
    pub max_requests: u32,
    /// Responses open at once.
    pub max_concurrent: u32,
    /// Response bodies held open at once, together.
    pub max_response_bytes: u64,
}

impl std::fmt::Debug for OutboundAccess {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("OutboundAccess")
            .field("function", &self.function)
            .field("services", &self.services)
            .field("allowed", &self.allowed)
            .field("max_requests", &self.max_requests)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}

/// One response the guest holds, read whole.
struct HeldResponse {
    headers: http::HeaderMap,
    body: Bytes,
    position: usize,
}

/// Per-run outbound state: the guest's open responses and what it has used.
#[derive(Default)]
pub struct HttpState {
    /// `None` where no call may be made (initialisation, a push check).
    access: Option<Arc<OutboundAccess>>,
    responses: Vec<Option<HeldResponse>>,
    /// The next handle to try, as the original host's `current_handle`.
    cursor: usize,
    requests: u32,
    held_bytes: u64,
    /// When the run must end; calls never wait past it.
    deadline: Option<Instant>,
    /// This run's place in a chain of service calls (0: a request from outside).
    depth: u32,
}

impl HttpState {
    pub fn new(access: Option<Arc<OutboundAccess>>) -> Self {
        HttpState {
            access,
            ..HttpState::default()
        }
    }

    /// Calls made so far in this run.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// Sets when the run must end (its start plus the function's timeout).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// When the run must end, once it runs.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets the run's place in a chain of service calls.
    pub fn set_depth(&mut self, depth: u32) {
        self.depth = depth;
    }

    fn open(&self) -> usize {
        self.responses.iter().filter(|slot| slot.is_some()).count()
    }

    fn response(&mut self, handle: u32) -> Option<&mut HeldResponse> {
        self.responses.get_mut(handle as usize).and_then(Option::as_mut)
    }

    /// Stores a response under the next handle: the cursor, moved past open handles. (At
    /// most `max_requests` handles are ever made in a run, so the table stays small.)
    fn hold(&mut self, response: HeldResponse) -> u32 {
        self.held_bytes += response.body.len() as u64;
        while self.responses.get(self.cursor).is_some_and(Option::is_some) {
            self.cursor += 1;
        }
        if self.cursor >= self.responses.len() {
            self.responses.resize_with(self.cursor + 1, || None);
        }
        self.responses[self.cursor] = Some(response);
        self.cursor as u32
    }

    fn release(&mut self, handle: u32) {
        if let Some(slot) = self.responses.get_mut(handle as usize)
            && let Some(response) = slot.take()
        {
            self.held_bytes -= response.body.len() as u64;
        }
    }
}

/// How a host call's wait on the node's runtime ended.
pub(crate) enum Waited<T> {
    Done(T),
    /// The run was asked to stop.
    Stopped,
    /// The time left ran out.
    TimedOut,
    /// The runtime is shutting down.
    ShuttingDown,
}

/// Blocks the guest's thread on `future` (run on the node's `runtime`) for at most
/// `time_left`, waking when the run is stopped; the worker counts as stalled meanwhile
/// ([`crate::executor::waiting`]). Every host call that waits on I/O goes through here.
pub(crate) fn wait_on<T>(
    runtime: &tokio::runtime::Handle,
    signals: &crate::wasi::RunSignals,
    time_left: Duration,
    future: impl Future<Output = T>,
) -> Waited<T> {
    crate::executor::waiting(|| {
        // A runtime shutting down under a waiting guest panics in tokio; that must not
        // unwind through the guest's frames.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(async {
                tokio::select! {
                    biased;
                    () = signals.stopped() => Waited::Stopped,
                    done = tokio::time::timeout(time_left, future) => match done {
                        Ok(value) => Waited::Done(value),
                        Err(_) => Waited::TimedOut,
                    },
                }
            })
        }))
        .unwrap_or(Waited::ShuttingDown)
    })
}

/// Runs an outbound host call with the guest's memory: `MEMORY_NOT_FOUND` without one, and
/// a trap once the run was asked to stop.
fn with_http(
    env: &mut FunctionEnvMut<WasiContext>,
    call: impl FnOnce(&mut WasiContext, &MemoryView) -> Result<i32, CallError>,
) -> Result<i32, HostCallInterrupted> {
    crate::wasi::with_guest_memory(env, MEMORY_NOT_FOUND, call)
}

/// Copies a guest input range; one outside memory is `BUFFER_TOO_SMALL`, as in the
/// original host.
fn read_bytes(view: &MemoryView, address: u32, length: u32) -> Result<Vec<u8>, i32> {
    match u64::from(address).checked_add(u64::from(length)) {
        Some(end) if end <= view.data_size() => {}
        _ => return Err(BUFFER_TOO_SMALL),
    }
    let mut bytes = vec![0u8; length as usize];
    view.read(u64::from(address), &mut bytes)
        .map_err(|_| BUFFER_TOO_SMALL)?;
    Ok(bytes)
}

fn read_text(view: &MemoryView, address: u32, length: u32) -> Result<String, i32> {
    String::from_utf8(read_bytes(view, address, length)?).map_err(|_| UTF8_ERROR)
}

fn write_out(view: &MemoryView, address: u32, bytes: &[u8]) -> Result<(), i32> {
    view.write(u64::from(address), bytes)
        .map_err(|_| MEMORY_ACCESS_ERROR)
}

/// A call's target, checked for shape: an absolute http(s) URL with a host.
#[derive(Debug)]
struct Target {
    url: reqwest::Url,
    scheme: Scheme,
    /// Without brackets for an IPv6 address.
    host: String,
    port: u16,
}

/// Checks a call's URL; a refusal carries the original host's code: `INVALID_URL`, or
/// `REQUEST_ERROR` for a scheme other than http(s) (where the original's client failed).
fn parse_target(text: &str) -> Result<Target, (i32, String)> {
    let url = reqwest::Url::parse(text)
        .map_err(|error| (INVALID_URL, format!("{text:?} is not a URL: {error}")))?;
    let scheme = match url.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => {
            return Err((
                REQUEST_ERROR,
                format!("the scheme {other:?} is not http or https"),
            ));
        }
    };
    let host = match url.host() {
        // A fully qualified name (trailing dot) is the same host: it must meet the same
        // allow-list entries and service bindings.
        Some(url::Host::Domain(name)) => name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase(),
        Some(url::Host::Ipv4(address)) => address.to_string(),
        Some(url::Host::Ipv6(address)) => address.to_string(),
        None => return Err((INVALID_URL, format!("{text:?} names no host"))),
    };
    let port = url.port_or_known_default().unwrap_or(scheme.default_port());
    Ok(Target {
        url,
        scheme,
        host,
        port,
    })
}

/// Request headers the guest may not set: framing and hop-by-hop fields belong to the
/// node's pooled connection.
fn is_connection_header(name: &http::HeaderName) -> bool {
    use http::header::*;
    [
        CONNECTION,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        TE,
        TRAILER,
        UPGRADE,
        HOST,
        PROXY_AUTHORIZATION,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Parses the ABI's `name:value\n` header text; a repeated name keeps its last value, as
/// in the original host.
fn parse_headers(text: &str) -> Result<http::HeaderMap, ()> {
    let mut headers = http::HeaderMap::new();
    for line in text.lines() {
        let (name, value) = line.split_once(':').ok_or(())?;
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| ())?;
        let value = http::HeaderValue::from_str(value).map_err(|_| ())?;
        if !is_connection_header(&name) {
            headers.insert(name, value);
        }
    }
    Ok(headers)
}

/// A call under way: its status and response, read whole.
type Exchange = Pin<Box<dyn Future<Output = Result<(u16, HeldResponse), Failure>> + Send>>;

/// Where an allowed call goes.
enum Destination {
    Network(crate::outbound::Reach),
    /// A function on this node; `true`: the caller's origins instead.
    Service(Arc<dyn ServiceCaller>, String, bool),
}

/// Why a call that was sent produced no response.
enum Failure {
    Refused(Refusal),
    TimedOut(Duration),
    TooLarge(u64),
    Request(String),
    /// The run was stopped while the call waited.
    Stopped,
}

/// A client error with its causes, on one line (a cause already in the text once is not
/// repeated). The node's origin proxy words its failures the same way.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Sends the request and reads the whole response, its body within `budget` bytes.
async fn send(request: reqwest::RequestBuilder, budget: u64) -> Result<(u16, HeldResponse), Failure> {
    let failed = |error: reqwest::Error| match refusal_in(&error) {
        Some(refusal) => Failure::Refused(refusal.clone()),
        None => Failure::Request(error_chain(&error)),
    };
    let mut response = request.send().await.map_err(failed)?;
    if response.content_length().is_some_and(|length| length > budget) {
        return Err(Failure::TooLarge(budget));
    }
    let status = response.status().as_u16();
    let headers = std::mem::take(response.headers_mut());
    // Sized by what the origin announced, within the budget; the rest grows as it comes.
    let announced = response.content_length().unwrap_or(0).min(budget).min(1 << 20);
    let mut body = Vec::with_capacity(announced as usize);
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if (body.len() + chunk.len()) as u64 > budget {
            return Err(Failure::TooLarge(budget));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((
        status,
        HeldResponse {
            headers,
            body: Bytes::from(body),
            position: 0,
        },
    ))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn req(
    mut env: FunctionEnvMut<WasiContext>,
    url_address: u32,
    url_length: u32,
    method_address: u32,
    method_length: u32,
    headers_address: u32,
    headers_length: u32,
    body_address: u32,
    body_length: u32,
    status_out: u32,
    handle_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_http(&mut env, |context, view| {
        let Some(access) = context.http.access.clone() else {
            context.log_host_line("outbound HTTP is not available while a function initialises");
            return Ok(DESTINATION_NOT_ALLOWED);
        };
        if context.http.open() >= access.max_concurrent as usize {
            context.log_host_line(&format!(
                "outbound call refused: {} responses are open, the limit ([outbound] max_concurrent); close one first",
                access.max_concurrent
            ));
            return Ok(TOO_MANY_SESSIONS);
        }
        if url_length > MAX_URL_BYTES {
            context.log_host_line(&format!(
                "outbound call refused: the URL is over {MAX_URL_BYTES} bytes"
            ));
            return Ok(INVALID_URL);
        }
        let url = read_text(view, url_address, url_length)?;
        let target = match parse_target(&url) {
            Ok(target) => target,
            Err((code, reason)) => {
                context.log_host_line(&format!("outbound call refused: {reason}"));
                return Ok(code);
            }
        };
        if context.http.requests >= access.max_requests {
            context.log_host_line(&format!(
                "outbound call to {} refused: this request made {} calls, the limit ([outbound] max_requests)",
                target.url, access.max_requests
            ));
            return Ok(TOO_MANY_SESSIONS);
        }
        let destination = match service_target(&target.host) {
            _ if target.host == atoll_core::origin::ORIGIN_HOST => {
                if !access.origins {
                    context.log_host_line(&format!(
                        "outbound call to {} refused: the manifest lists no origins",
                        target.url
                    ));
                    return Ok(DESTINATION_NOT_ALLOWED);
                }
                let Some(caller) = access.service_caller.clone() else {
                    context.log_host_line("origin calls are not available here");
                    return Ok(DESTINATION_NOT_ALLOWED);
                };
                Destination::Service(caller, access.function.clone(), true)
            }
            Some(function) => {
                if !access.services.iter().any(|bound| bound == function) {
                    context.log_host_line(&format!(
                        "outbound call to {} refused: no [services] binding names function {function:?}",
                        target.url
                    ));
                    return Ok(DESTINATION_NOT_ALLOWED);
                }
                if context.http.depth >= MAX_SERVICE_DEPTH {
                    context.log_host_line(&format!(
                        "service call to {function} refused: the chain of service calls is {MAX_SERVICE_DEPTH} deep, the limit (a loop?)"
                    ));
                    return Ok(REQUEST_ERROR);
                }
                let Some(caller) = access.service_caller.clone() else {
                    context.log_host_line("service calls are not available here");
                    return Ok(DESTINATION_NOT_ALLOWED);
                };
                Destination::Service(caller, function.to_string(), false)
            }
            None => match check_destination(
                &access.allowed,
                target.scheme,
                &target.host,
                target.port,
                access.client.listed_internal(),
            ) {
                Ok(reach) => Destination::Network(reach),
                Err(refusal) => {
                    context.log_host_line(&format!("outbound call refused: {refusal}"));
                    return Ok(DESTINATION_NOT_ALLOWED);
                }
            },
        };
        if method_length > MAX_METHOD_BYTES {
            return Ok(INVALID_METHOD);
        }
        let method = read_text(view, method_address, method_length)?;
        let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| INVALID_METHOD)?;
        if body_length > MAX_REQUEST_BODY_BYTES {
            context.log_host_line(&format!(
                "outbound call to {} refused: the body is over {} MiB",
                target.url,
                MAX_REQUEST_BODY_BYTES >> 20
            ));
            return Ok(REQUEST_ERROR);
        }
        let body = read_bytes(view, body_address, body_length)?;
        if headers_length > MAX_REQUEST_HEADER_BYTES {
            return Ok(INVALID_ENCODING);
        }
        let headers = read_text(view, headers_address, headers_length)?;
        let headers = parse_headers(&headers).map_err(|()| INVALID_ENCODING)?;

        let deadline = context
            .http
            .deadline
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
        let Some(time_left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
        else {
            return Err(CallError::Interrupted);
        };
        context.http.requests += 1;
        let budget = access.max_response_bytes.saturating_sub(context.http.held_bytes);
        let exchange: Exchange = match destination {
            Destination::Network(reach) => {
                // The chain's length travels with the call, so a loop through a public
                // route (a function calling its own URL) meets the same depth limit.
                let mut headers = headers;
                headers.insert(HOPS_HEADER, http::HeaderValue::from(context.http.depth + 1));
                let request = access
                    .client
                    .client(reach)
                    .request(method.clone(), target.url.clone())
                    .headers(headers)
                    .body(body);
                Box::pin(send(request, budget))
            }
            Destination::Service(caller, function, origin) => {
                let call = ServiceCall {
                    origin,
                    caller: access.function.clone(),
                    function,
                    method: method.clone(),
                    path_and_query: match target.url.query() {
                        Some(query) => format!("{}?{query}", target.url.path()),
                        None => target.url.path().to_string(),
                    },
                    headers,
                    body: Bytes::from(body),
                    depth: context.http.depth + 1,
                    deadline,
                    max_response_bytes: budget,
                };
                Box::pin(async move {
                    match caller.call(call).await {
                        Ok(response) => Ok((
                            response.status,
                            HeldResponse {
                                headers: response.headers,
                                body: response.body,
                                position: 0,
                            },
                        )),
                        Err(ServiceFailure::TooLarge(budget)) => Err(Failure::TooLarge(budget)),
                        Err(failure) => Err(Failure::Request(failure.to_string())),
                    }
                })
            }
        };
        let Some(_waiting) = access.client.try_wait() else {
            context.log_host_line(&format!(
                "outbound call to {} refused: {} calls are waiting on this node, its limit",
                target.url,
                access.client.max_waits()
            ));
            return Ok(TOO_MANY_SESSIONS);
        };
        let signals = Arc::clone(context.signals());
        let started = Instant::now();
        let outcome = match wait_on(access.client.runtime(), &signals, time_left, exchange) {
            Waited::Done(outcome) => outcome,
            Waited::Stopped => Err(Failure::Stopped),
            Waited::TimedOut => Err(Failure::TimedOut(time_left)),
            Waited::ShuttingDown => Err(Failure::Request("the node is shutting down".into())),
        };
        let (status, response) = match outcome {
            Ok(done) => done,
            Err(Failure::Stopped) => return Err(CallError::Interrupted),
            Err(Failure::TimedOut(after)) => {
                // The time left was the run's: the run is over, as a timeout.
                context.log_host_line(&format!(
                    "outbound {method} {} got no response within {after:?}, the time left of the function's timeout",
                    target.url
                ));
                signals.raise();
                return Err(CallError::Interrupted);
            }
            Err(failure) => {
                let (code, reason) = match failure {
                    Failure::Refused(refusal @ Refusal::Unresolved { .. }) => {
                        (REQUEST_ERROR, format!("failed: {refusal}"))
                    }
                    Failure::Refused(refusal) => {
                        if let Refusal::Internal { addresses, .. } = &refusal {
                            tracing::info!(function = %access.function, url = %target.url, %addresses, "outbound call to internal addresses refused");
                        }
                        (DESTINATION_NOT_ALLOWED, format!("refused: {refusal}"))
                    }
                    Failure::TooLarge(budget) => (
                        REQUEST_ERROR,
                        format!(
                            "failed: the response is over the {budget} bytes left of [outbound] max_response \
                             (responses held open count against it)"
                        ),
                    ),
                    Failure::Request(error) => (REQUEST_ERROR, format!("failed: {error}")),
                    Failure::Stopped | Failure::TimedOut(_) => unreachable!("handled above"),
                };
                context.log_host_line(&format!("outbound {method} {} {reason}", target.url));
                tracing::debug!(url = %target.url, %reason, took = ?started.elapsed(), "outbound call failed");
                return Ok(code);
            }
        };
        write_out(view, status_out, &status.to_le_bytes())?;
        let handle = context.http.hold(response);
        if let Err(code) = write_out(view, handle_out, &handle.to_le_bytes()) {
            context.http.release(handle);
            return Ok(code);
        }
        Ok(SUCCESS)
    })
}

pub(crate) fn close(mut env: FunctionEnvMut<WasiContext>, handle: u32) -> Result<i32, HostCallInterrupted> {
    let context = env.data_mut();
    let _host = HostCall::enter(context.signals())?;
    context.http.release(handle);
    Ok(SUCCESS)
}

pub(crate) fn header_get(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    name_address: u32,
    name_length: u32,
    value_address: u32,
    value_capacity: u32,
    written_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_http(&mut env, |context, view| {
        if context.http.response(handle).is_none() {
            return Ok(INVALID_HANDLE);
        }
        if name_length > MAX_HEADER_NAME_BYTES {
            return Ok(HEADER_NOT_FOUND);
        }
        let name = read_text(view, name_address, name_length)?;
        let response = context.http.response(handle).ok_or(INVALID_HANDLE)?;
        // `HeaderName` lowercases as it parses.
        let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) else {
            return Ok(HEADER_NOT_FOUND);
        };
        let value = response.headers.get(&name).ok_or(HEADER_NOT_FOUND)?.as_bytes();
        if value.len() > value_capacity as usize {
            return Ok(BUFFER_TOO_SMALL);
        }
        write_out(view, value_address, value)?;
        write_out(view, written_out, &(value.len() as u32).to_le_bytes())?;
        Ok(SUCCESS)
    })
}

pub(crate) fn headers_get_all(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    buffer: u32,
    capacity: u32,
    written_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_http(&mut env, |context, view| {
        let response = context.http.response(handle).ok_or(INVALID_HANDLE)?;
        let mut text = Vec::new();
        for (name, value) in &response.headers {
            let value = value.to_str().map_err(|_| RUNTIME_ERROR)?;
            text.extend_from_slice(name.as_str().as_bytes());
            text.push(b':');
            text.extend_from_slice(value.as_bytes());
            text.push(b'\n');
        }
        if text.len() > capacity as usize {
            return Ok(BUFFER_TOO_SMALL);
        }
        write_out(view, buffer, &text)?;
        write_out(view, written_out, &(text.len() as u32).to_le_bytes())?;
        Ok(SUCCESS)
    })
}

pub(crate) fn body_read(
    mut env: FunctionEnvMut<WasiContext>,
    handle: u32,
    buffer: u32,
    capacity: u32,
    read_out: u32,
) -> Result<i32, HostCallInterrupted> {
    with_http(&mut env, |context, view| {
        let response = context.http.response(handle).ok_or(INVALID_HANDLE)?;
        let rest = &response.body[response.position..];
        let count = rest.len().min(capacity as usize);
        write_out(view, buffer, &rest[..count])?;
        write_out(view, read_out, &(count as u32).to_le_bytes())?;
        // Advanced only once written: a failed write consumes nothing.
        response.position += count;
        Ok(SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_like_the_original_host_and_framing_is_dropped() {
        let headers = parse_headers("custom-header:custom-value\ncustom-header2:custom-value2\n").unwrap();
        assert_eq!(headers["custom-header"], "custom-value");
        assert_eq!(headers["custom-header2"], "custom-value2");
        assert!(parse_headers("").unwrap().is_empty());
        let repeated = parse_headers("a:1\na:2\n").unwrap();
        assert_eq!(repeated.get_all("a").iter().collect::<Vec<_>>(), ["2"]);
        // The original host panicked on a line without ':'.
        assert!(parse_headers("a:b\n\nc:d").is_err());
        assert!(parse_headers("bad name:x").is_err());
        let framing =
            parse_headers("content-length:5\ntransfer-encoding:chunked\nconnection:close\nx:y\n").unwrap();
        assert_eq!(framing.len(), 1, "{framing:?}");
    }

    #[test]
    fn service_hosts_never_reach_the_network() {
        assert_eq!(service_target("auth.atoll.internal"), Some("auth"));
        assert_eq!(service_target("atoll.internal"), Some(""));
        assert_eq!(service_target("a.b.atoll.internal"), Some("a.b"));
        assert_eq!(service_target("evilatoll.internal"), None);
        assert_eq!(service_target("auth.example.com"), None);
    }

    #[test]
    fn targets_must_be_http_urls_with_a_host() {
        let target = parse_target("https://API.example.com/x?y=1").unwrap();
        assert_eq!(
            (target.host.as_str(), target.port, target.scheme),
            ("api.example.com", 443, Scheme::Https)
        );
        let target = parse_target("http://[::1]:8080/").unwrap();
        assert_eq!((target.host.as_str(), target.port), ("::1", 8080));
        assert_eq!(parse_target("ftp://example.com/").unwrap_err().0, REQUEST_ERROR);
        assert_eq!(
            parse_target("http://Auth.Atoll.Internal./x").unwrap().host,
            "auth.atoll.internal"
        );
        assert_eq!(parse_target("/relative").unwrap_err().0, INVALID_URL);
        assert!(parse_target("http://").is_err());
    }

    #[test]
    fn handles_are_numbered_as_the_original_host_numbers_them() {
        let mut state = HttpState::default();
        let held = || HeldResponse {
            headers: http::HeaderMap::new(),
            body: Bytes::from_static(b"abc"),
            position: 0,
        };
        // open 0, close 0, open → 0; open 0, open 1, close 0, open → 2.
        assert_eq!(state.hold(held()), 0);
        state.release(0);
        assert_eq!(state.hold(held()), 0);
        assert_eq!(state.hold(held()), 1);
        state.release(0);
        assert_eq!(state.hold(held()), 2);
        assert_eq!((state.open(), state.held_bytes), (2, 6));
        state.release(7);
        state.release(1);
        assert_eq!((state.open(), state.held_bytes), (1, 3));
    }
}
