//! Accept loops: a bound listener in, a shutdown future to stop.
//!
//! Following mini-redis, servers take an already-bound `TcpListener` (tests bind port 0) and a
//! shutdown future. A cleartext connection speaks HTTP/1.1 or HTTP/2 (prior knowledge, h2c),
//! detected from its first bytes; a TLS connection speaks what ALPN chose. Every connection
//! gets the edge's hardened limits ([`ServerLimits`]): a connection cap, a TLS handshake
//! timeout, a header read timeout and an idle timeout (slowloris), strict HTTP/1.1 framing
//! ([`crate::h1_guard`]), HTTP/2 stream and reset limits. On shutdown the loop stops
//! accepting, in-flight requests finish within the grace period, then the function returns.
//!
//! HTTP/1.1 upgrades (WebSocket) pass through: a handler answers an upgrade request with
//! `101 Switching Protocols` and takes the connection with `hyper::upgrade::on(&mut request)`.
//! Only a request the guard saw as one (`GET`, `Connection: upgrade`, `Upgrade`, no body)
//! carries hyper's `OnUpgrade`; the guard checks nothing after its head, so any answer but
//! 101 gets `Connection: close`. An upgraded connection still counts against the
//! connection cap until the handler drops it; the idle timeout and graceful shutdown end
//! with hyper's part, at the upgrade.
//!
//! What answers is a [`Handler`], which this crate knows only by that trait: its responses
//! carry its own body type ([`HandlerBody`]), served as it is, without boxing. A request on
//! a TLS connection for a host the connection's certificate does not cover gets a 421
//! ([`misdirected`], HTTP/3's check too) before the handler sees it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::activity::Activity;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::h1_guard::{GuardState, GuardedIo, H1Limits, Rejection};
use crate::tls::Certificates;
use crate::workers::ConnectionWorkers;

/// A boxed error, as bodies report them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counter: TCP connections accepted, by `listener` (its local address).
pub const CONNECTIONS_ACCEPTED_TOTAL: &str = "atoll_connections_accepted_total";

/// How a connection reached us.
#[derive(Debug, Clone)]
pub enum Transport {
    Plain,
    /// TLS over TCP; the SNI the client sent, if any.
    Tls {
        server_name: Option<Arc<str>>,
    },
    /// QUIC (HTTP/3); the SNI the client sent, if any.
    Quic {
        server_name: Option<Arc<str>>,
    },
}

/// Where a connection came from and arrived at.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub transport: Transport,
}

impl ConnectionInfo {
    pub fn plain(local: SocketAddr, remote: SocketAddr) -> Self {
        ConnectionInfo {
            local,
            remote,
            transport: Transport::Plain,
        }
    }

    /// Whether the connection is encrypted (TLS or QUIC): the CGI `HTTPS`/scheme.
    pub fn is_secure(&self) -> bool {
        !matches!(self.transport, Transport::Plain)
    }

    pub fn server_name(&self) -> Option<&str> {
        match &self.transport {
            Transport::Plain => None,
            Transport::Tls { server_name } | Transport::Quic { server_name } => server_name.as_deref(),
        }
    }
}

/// Something that answers requests, whatever the body type of the protocol they came in.
pub trait Handler: Send + Sync + 'static {
    /// The body of its responses, whole or streamed: the listeners send it as it comes
    /// (hyper over TCP, frame by frame over HTTP/3) without boxing it.
    type Body: HandlerBody;

    /// Borrows the handler: the connection holds it, so a request writes no count that
    /// every core shares (an `Arc` clone per request would).
    fn handle<B>(
        &self,
        request: Request<B>,
        connection: ConnectionInfo,
    ) -> impl Future<Output = Response<Self::Body>> + Send
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>;
}

/// What a [`Handler`]'s response body must offer besides its frames. The listeners make a
/// few answers of their own in the handler's body type (a refused request, the 421), empty
/// it (HTTP/3 HEAD), and keep the connection's in-flight mark alive while a streamed body is
/// sent, so its idle timeout does not cut a long download.
pub trait HandlerBody: Body<Data = Bytes, Error = BoxError> + Send + Sized + 'static {
    /// All of `bytes`, with its exact length.
    fn whole(bytes: Bytes) -> Self;

    /// No body at all.
    fn empty() -> Self;

    /// Keeps `guard` alive until a streamed body ends (a whole one ends at once: the guard
    /// is dropped now).
    fn holding(self, guard: impl Send + Sync + 'static) -> Self;
}

/// How long in-flight requests get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A client must send its request head within this time (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = crate::activity::DEFAULT_HEADER_READ_TIMEOUT;

/// The edge's limits on clients, each with its default. The README lists them.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Open connections per listener; beyond it the listener stops accepting.
    pub max_connections: usize,
    /// Time to finish a TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time to send a whole HTTP/1.1 request head (slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Request line plus headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Number of header fields (431 beyond).
    pub max_headers: usize,
    /// Request target length in bytes (414 beyond).
    pub max_uri_bytes: usize,
    /// Concurrent streams per HTTP/2 or HTTP/3 connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before the server saw them (rapid reset); the
    /// connection is closed with ENHANCE_YOUR_CALM beyond.
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2 streams the server had to reset for protocol errors before it closes.
    pub h2_max_local_error_reset_streams: usize,
    /// How long in-flight requests get after shutdown.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: crate::activity::DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_concurrent_streams: 100,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

impl ServerLimits {
    pub fn h1(&self) -> H1Limits {
        H1Limits {
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            max_uri_bytes: self.max_uri_bytes,
        }
    }
}

/// TLS on a TCP listener: the rustls configuration and the certificates behind it.
#[derive(Clone)]
pub struct TlsIngress {
    pub config: Arc<rustls::ServerConfig>,
    pub certificates: Arc<Certificates>,
}

/// What a listener adds around the handler.
#[derive(Clone, Default)]
pub struct Ingress {
    pub tls: Option<TlsIngress>,
    /// `Alt-Svc` value announcing HTTP/3, added to every response.
    pub alt_svc: Option<HeaderValue>,
    pub limits: Arc<ServerLimits>,
    /// Threads the connections are served on, each connection on one of them for its
    /// whole life ([`ConnectionWorkers`]); `None`: tasks of the runtime that accepts them.
    pub workers: Option<Arc<ConnectionWorkers>>,
}

/// Serves `handler` on `listener` (cleartext, default limits) until `shutdown` resolves.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, handler, Ingress::default(), shutdown).await
}

/// Serves `handler` on `listener` with `ingress` (TLS, limits, Alt-Svc) until `shutdown`.
pub async fn serve_with<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut ingress: Ingress,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Held here, not by the connections: what still runs on a worker must not keep the
    // workers alive once their owner lets go of them.
    let workers = ingress.workers.take();
    let local = listener.local_addr()?;
    let limits = Arc::clone(&ingress.limits);
    let builder = Arc::new(http_builder(&limits));
    let acceptor = ingress
        .tls
        .as_ref()
        .map(|tls| tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config)));
    let ingress = Arc::new(ingress);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let accepted_total = ::metrics::counter!(CONNECTIONS_ACCEPTED_TOTAL, "listener" => local.to_string());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => permit.expect("semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        accepted_total.increment(1);
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            handler: Arc::clone(&handler),
            ingress: Arc::clone(&ingress),
            builder: Arc::clone(&builder),
            local,
            remote,
        };
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        // The permit lives as long as the socket: after hyper is done with it, an upgraded
        // connection the handler took still counts.
        match &workers {
            None => {
                let stream = Capped {
                    io: stream,
                    _permit: permit,
                };
                tokio::spawn(connection.run(stream, acceptor, watcher));
            }
            Some(workers) => {
                // Registered again with the worker's own reactor.
                let stream = match stream.into_std() {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::debug!(%remote, %error, "could not hand the connection to a worker");
                        continue;
                    }
                };
                workers.spawn(async move {
                    match TcpStream::from_std(stream) {
                        Ok(io) => {
                            let stream = Capped { io, _permit: permit };
                            connection.run(stream, acceptor, watcher).await;
                        }
                        Err(error) => {
                            tracing::debug!(%remote, %error, "a worker could not take the connection")
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("grace period over; dropping remaining connections");
        }
    }
    Ok(())
}

fn http_builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper header timer: the guard times each head (the first from the connection's
    // start, later ones from their first byte) and `Activity` the idle time between them.
    // hyper's would also run while a kept-alive connection waits, closing it at the header
    // timeout instead of the idle timeout, and cost a timer per request.
    builder
        .http1()
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .max_header_list_size(limits.max_header_bytes as u32);
    builder
}

/// One accepted connection and what it needs to be served.
struct Connection<H> {
    handler: Arc<H>,
    ingress: Arc<Ingress>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    local: SocketAddr,
    remote: SocketAddr,
}

/// A socket and its place under the listener's connection cap, given back when the socket
/// is dropped.
struct Capped<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Per-connection bookkeeping shared by its requests: for the idle timeout ([`Activity`],
/// one implementation for the edge and the registry) and the guard; and the handler and
/// the listener's settings, reached through it so that a request clones only what its
/// connection alone holds (the handler's own count is shared by every core).
struct ConnectionState<H> {
    handler: Arc<H>,
    ingress: Arc<Ingress>,
    activity: Arc<Activity>,
    /// Requests seen, refused ones too: the index the guard's verdicts refer to.
    requests: AtomicU64,
    guard: Arc<GuardState>,
}

impl<H: Handler> Connection<H> {
    async fn run(
        self,
        stream: Capped<TcpStream>,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let limits = Arc::clone(&self.ingress.limits);
        let Some(acceptor) = acceptor else {
            let info = ConnectionInfo::plain(self.local, self.remote);
            self.serve(stream, info, None, watcher).await;
            return;
        };
        let tls = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(remote = %self.remote, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(remote = %self.remote, "TLS handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        if alpn.as_deref() == Some(crate::tls::ACME_TLS_ALPN) {
            // A TLS-ALPN-01 validation: the handshake was the whole exchange.
            return;
        }
        let server_name: Option<Arc<str>> = session.server_name().map(Arc::from);
        let info = ConnectionInfo {
            local: self.local,
            remote: self.remote,
            transport: Transport::Tls { server_name },
        };
        let h2_only = alpn.as_deref() == Some(b"h2".as_slice());
        self.serve(tls, info, Some(h2_only), watcher).await;
    }

    /// Serves HTTP on `io`. `h2_only`: `None` for cleartext (detect h1/h2c), `Some(true)`
    /// when ALPN chose h2, `Some(false)` for HTTP/1.1 over TLS.
    async fn serve<S>(
        self,
        io: S,
        info: ConnectionInfo,
        h2_only: Option<bool>,
        watcher: hyper_util::server::graceful::Watcher,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = Arc::clone(&self.ingress.limits);
        let state = Arc::new(ConnectionState {
            handler: Arc::clone(&self.handler),
            ingress: Arc::clone(&self.ingress),
            activity: Activity::new(),
            requests: AtomicU64::new(0),
            guard: GuardState::new(),
        });
        let remote = info.remote;
        let service = {
            let state = Arc::clone(&state);
            hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let state = Arc::clone(&state);
                let info = info.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&state, request, info).await) }
            })
        };
        let builder = match h2_only {
            Some(true) => {
                let mut builder = (*self.builder).clone();
                builder = builder.http2_only();
                std::borrow::Cow::Owned(builder)
            }
            Some(false) => {
                let mut builder = (*self.builder).clone();
                builder = builder.http1_only();
                std::borrow::Cow::Owned(builder)
            }
            None => std::borrow::Cow::Borrowed(&*self.builder),
        };
        let served = if h2_only == Some(true) {
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::select! {
                result = watcher.watch(connection.into_owned()) => result,
                () = state.activity.idle(limits.idle_timeout) => Ok(()),
            }
        } else {
            let io = GuardedIo::new(io, limits.h1(), Arc::clone(&state.guard))
                .with_header_timeout(limits.header_read_timeout);
            // With upgrades: after a 101 hyper hands the connection (and what it read ahead)
            // to the handler's `hyper::upgrade::on`, and this future ends.
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::select! {
                result = watcher.watch(connection.into_owned()) => result,
                () = state.activity.idle(limits.idle_timeout) => Ok(()),
            }
        };
        if let Err(error) = served {
            tracing::debug!(%remote, %error, "connection ended with an error");
        }
    }
}

/// One request through the connection's checks, then the handler.
///
/// The request reaches the handler as hyper made it, extensions and all, so an HTTP/1.1
/// upgrade request carries hyper's `OnUpgrade` — but only one the guard saw as an upgrade
/// request: on HTTP/1 anything else hyper would hand over (`Upgrade` without
/// `Connection: upgrade`, with a body, CONNECT) was validated as HTTP/1 and must stay so,
/// and without `OnUpgrade` a 101 or a CONNECT 2xx only ends the connection. An upgrade
/// request answered with anything but 101 closes the connection: the guard checks nothing
/// after its head. HTTP/2 (no guard) is left as hyper serves it.
async fn respond<H: Handler>(
    state: &ConnectionState<H>,
    mut request: Request<hyper::body::Incoming>,
    info: ConnectionInfo,
) -> Response<H::Body> {
    let index = state.requests.fetch_add(1, Ordering::Relaxed);
    let upgrade = state.guard.upgrade_requested(index);
    if !upgrade && request.version() < http::Version::HTTP_2 {
        request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    }
    let mut response = answer(state, index, request, info).await;
    if upgrade && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The answer to the `index`-th request: a refusal, the 421, or the handler's.
async fn answer<H: Handler>(
    state: &ConnectionState<H>,
    index: u64,
    request: Request<hyper::body::Incoming>,
    info: ConnectionInfo,
) -> Response<H::Body> {
    if let Some(rejection) = state.guard.rejection_for(index) {
        return rejection_response(&rejection);
    }
    let ingress = &*state.ingress;
    if let Some(tls) = &ingress.tls
        && let Some(mut response) = misdirected(&tls.certificates, &request, &info)
    {
        add_alt_svc(&mut response, ingress);
        return response;
    }
    let in_flight = state.activity.enter();
    // A streamed body keeps the connection busy until it ends, so the idle timeout does
    // not cut a long download.
    let mut response = state
        .handler
        .handle(request, info)
        .await
        .map(|body| body.holding(in_flight));
    if let Some(rejection) = state.guard.rejection_for(index) {
        return rejection_response(&rejection);
    }
    add_alt_svc(&mut response, ingress);
    response
}

fn add_alt_svc<T>(response: &mut Response<T>, ingress: &Ingress) {
    if let Some(alt_svc) = &ingress.alt_svc {
        response
            .headers_mut()
            .insert(http::header::ALT_SVC, alt_svc.clone());
    }
}

/// The 421 Misdirected Request for a request whose host the certificate its connection was
/// served does not cover: the client reused a connection for a name this one never proved
/// (RFC 9110 §15.5.20). `None` when the host is covered, or the request names none. The one
/// check of the TLS listeners and of HTTP/3.
pub fn misdirected<B, T: HandlerBody>(
    certificates: &Certificates,
    request: &Request<B>,
    connection: &ConnectionInfo,
) -> Option<Response<T>> {
    let host = request_host(request)?;
    let host = atoll_core::host::normalize_host(&host);
    if certificates.host_allowed(connection.server_name(), &host) {
        return None;
    }
    Some(text_response(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "host `{host}` is not served by the certificate for `{}` on this connection",
            connection.server_name().unwrap_or("-")
        ),
    ))
}

/// The response to a refused request; the connection closes after it.
pub fn rejection_response<T: HandlerBody>(rejection: &Rejection) -> Response<T> {
    let mut response = text_response(rejection.status, rejection.reason);
    response
        .headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The host a request is for: the URI authority (HTTP/2, HTTP/3, absolute-form) or `Host`.
pub fn request_host<B>(request: &Request<B>) -> Option<String> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str().to_string());
    }
    request
        .headers()
        .get(http::header::HOST)
        .and_then(|value| value.to_str().ok())
        .filter(|host| !host.is_empty())
        .map(str::to_string)
}

/// A small plain-text response.
pub fn text_response<T: HandlerBody>(status: http::StatusCode, body: impl Into<String>) -> Response<T> {
    let mut body: String = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(T::whole(Bytes::from(body)))
        .expect("static response parts are valid")
}
