//! HTTP/3 over QUIC (quinn + h3) on the same routes and functions as TCP.
//!
//! Browsers learn of HTTP/3 from the `Alt-Svc` header the TLS listener adds, then open a QUIC
//! connection to the same port over UDP. This module serves those connections with the very
//! handler the TCP listeners use: the request body is streamed to it (the service enforces
//! its body limit and answers 413) and the same 421 check applies (the `:authority` must be
//! covered by the certificate the connection's SNI selected).
//!
//! ```text
//! UdpSocket ─ quinn Endpoint ─ Incoming ─┬─ retry (address not validated, too many handshakes)
//!                                        ├─ refuse (max_connections open)
//!                                        └─ accept ─ handshake (timeout) ─ h3 Connection
//!                                              └─ one task per request stream ─ Handler
//! ```
//!
//! What protects the node, and where:
//!
//! - **Amplification**: before a client's address is validated quinn never sends more than
//!   three times the bytes it received (RFC 9000 §8). Beyond `retry_threshold` handshakes in
//!   progress, a client whose address is not validated gets a Retry and must echo its token
//!   (one round trip) before the server keeps any state for it, so spoofed Initials cost one
//!   small packet each. Retries are counted in [`QUIC_RETRIES_TOTAL`].
//! - **Stateless reset**: quinn's default — a per-endpoint random key, resets always smaller
//!   than the packet that triggered them (no amplification, no reset loops) and rate limited.
//! - **0-RTT replay**: off. The rustls configuration has `max_early_data_size = 0`, so no
//!   request ever runs from replayable early data.
//! - **Stream floods and rapid reset**: at most `max_concurrent_streams` request streams per
//!   connection (QUIC flow control on stream ids). A stream's credit is only returned to the
//!   client once *both* directions are closed, and the server's direction stays open until
//!   the response is sent, so a client that opens and resets streams still has at most
//!   `max_concurrent_streams` requests in the handler per connection: resets free nothing
//!   early. Unidirectional streams are capped at a handful (h3 needs three).
//! - **QPACK bombs**: h3 decodes QPACK statelessly — it advertises no dynamic table, so a
//!   small header block cannot reference (and multiply) earlier large entries; the decoded
//!   header section is capped at `max_header_bytes` (431 beyond). Caveat: h3 0.0.8 buffers
//!   a HEADERS frame whole before that check; the time a client may spend sending one is
//!   bounded by `header_read_timeout`, its concurrency by the stream limit.
//! - **Memory per connection**: receive windows of [`STREAM_RECEIVE_WINDOW`] per stream and
//!   [`CONNECTION_RECEIVE_WINDOW`] per connection, and at most `max_connections` connections.
//! - **Idle and slow clients**: `idle_timeout` is QUIC's idle timeout (no packet in either
//!   direction); a handshake must finish within `tls_handshake_timeout` and a request head
//!   arrive within `header_read_timeout`.
//!
//! Shutdown: the endpoint stops accepting, every connection sends GOAWAY (h3 `shutdown`),
//! requests already accepted finish within `shutdown_grace`, then the endpoint closes and
//! waits (bounded) for the close to reach the peers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::server::{ConnectionInfo, Handler, ServerLimits, Transport, request_host, text_response};
use crate::tls::{Certificates, QUIC_ALPN};

/// Counter: client addresses asked to validate themselves with a Retry packet.
pub const QUIC_RETRIES_TOTAL: &str = "atoll_quic_retries_total";
/// Counter: QUIC connections whose handshake completed.
pub const QUIC_CONNECTIONS_TOTAL: &str = "atoll_quic_connections_total";

/// Flow-control window per request stream: bounds what one upload buffers before the
/// handler reads it.
pub const STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;
/// Flow-control window per connection, over all its streams.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Unidirectional streams a client may open: h3's control stream and the two QPACK
/// streams, plus room for the reserved (grease) streams clients send.
const MAX_UNI_STREAMS: u32 = 8;
/// The longest the endpoint waits, after closing, for its peers to learn of the close.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// HTTP/3 `H3_NO_ERROR`: the application close code of a graceful close.
const H3_NO_ERROR: u32 = 0x100;

/// QUIC-specific settings.
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// Handshakes in progress beyond which new clients must validate their address with a
    /// Retry first (0: always).
    pub retry_threshold: usize,
    pub limits: Arc<ServerLimits>,
}

/// What every connection of one endpoint shares.
struct Shared<H> {
    handler: Arc<H>,
    certificates: Arc<Certificates>,
    limits: Arc<ServerLimits>,
    /// The address the socket is bound to (maybe a wildcard; connections refine the IP).
    local: SocketAddr,
    /// Flips to `true` once: stop taking requests and drain.
    stop: watch::Receiver<bool>,
}

/// Serves `handler` over HTTP/3 on `socket` until `shutdown` resolves.
pub async fn serve_quic<H: Handler>(
    socket: std::net::UdpSocket,
    certificates: Arc<Certificates>,
    handler: Arc<H>,
    settings: QuicSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let local = socket.local_addr()?;
    let limits = Arc::clone(&settings.limits);
    let server_config = server_config(Arc::clone(&certificates), &limits)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let retries = metrics::counter!(QUIC_RETRIES_TOTAL);
    let accepted = metrics::counter!(QUIC_CONNECTIONS_TOTAL);
    let (stop_sender, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        handler,
        certificates,
        limits: Arc::clone(&limits),
        local,
        stop,
    });
    let handshakes = Arc::new(AtomicUsize::new(0));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        if !incoming.remote_address_validated()
            && handshakes.load(Ordering::Relaxed) >= settings.retry_threshold
        {
            match incoming.retry() {
                Ok(()) => retries.increment(1),
                Err(error) => error.into_incoming().ignore(),
            }
            continue;
        }
        if connections.len() >= limits.max_connections {
            tracing::debug!(remote = %incoming.remote_address(), "QUIC connection refused: at max_connections");
            incoming.refuse();
            continue;
        }
        let remote = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(error) => {
                tracing::debug!(%remote, %error, "QUIC connection not accepted");
                continue;
            }
        };
        let handshake = Handshake::begin(&handshakes);
        let shared = Arc::clone(&shared);
        let accepted = accepted.clone();
        connections.spawn(async move {
            if let Some(connection) = shared.handshake(connecting, handshake).await {
                accepted.increment(1);
                shared.serve_connection(connection).await;
            }
        });
    }

    // No new connections from here on; the open ones send GOAWAY and drain.
    endpoint.set_server_config(None);
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "HTTP/3 grace period over; dropping remaining connections"
        );
        connections.shutdown().await;
    }
    endpoint.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"shutting down");
    let _ = tokio::time::timeout(CLOSE_WAIT.min(limits.shutdown_grace), endpoint.wait_idle()).await;
    Ok(())
}

/// The endpoint's configuration: the hardened rustls setup for ALPN `h3` and the limits.
fn server_config(certificates: Arc<Certificates>, limits: &ServerLimits) -> io::Result<quinn::ServerConfig> {
    let tls = crate::tls::server_config(certificates, &[QUIC_ALPN]).map_err(io::Error::other)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(limits)?));
    Ok(config)
}

fn transport_config(limits: &ServerLimits) -> io::Result<quinn::TransportConfig> {
    let idle_timeout = quinn::IdleTimeout::try_from(limits.idle_timeout).map_err(io::Error::other)?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.max_concurrent_streams.into())
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        .max_idle_timeout(Some(idle_timeout))
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .keep_alive_interval(None);
    Ok(transport)
}

/// Resolves once shutdown has been requested (or the endpoint is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// One handshake in progress, counted until it ends (or its task is dropped).
struct Handshake(Arc<AtomicUsize>);

impl Handshake {
    fn begin(counter: &Arc<AtomicUsize>) -> Handshake {
        counter.fetch_add(1, Ordering::Relaxed);
        Handshake(Arc::clone(counter))
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<H: Handler> Shared<H> {
    /// Finishes the handshake within the limit, unless shutdown comes first.
    async fn handshake(
        &self,
        connecting: quinn::Connecting,
        handshake: Handshake,
    ) -> Option<quinn::Connection> {
        let remote = connecting.remote_address();
        let mut stop = self.stop.clone();
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.limits.tls_handshake_timeout, connecting) => outcome,
            () = stopping(&mut stop) => return None,
        };
        drop(handshake);
        match outcome {
            Ok(Ok(connection)) => Some(connection),
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "QUIC handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%remote, "QUIC handshake timed out");
                None
            }
        }
    }

    /// Serves the requests of one connection until the client closes it or shutdown drains it.
    async fn serve_connection(self: Arc<Self>, connection: quinn::Connection) {
        let remote = connection.remote_address();
        let server_name: Option<Arc<str>> = connection
            .handshake_data()
            .and_then(|data| data.downcast::<HandshakeData>().ok())
            .and_then(|data| data.server_name)
            .map(Arc::from);
        let info = ConnectionInfo {
            local: SocketAddr::new(
                connection.local_ip().unwrap_or(self.local.ip()),
                self.local.port(),
            ),
            remote,
            transport: Transport::Quic { server_name },
        };
        let built = h3::server::builder()
            .max_field_section_size(self.limits.max_header_bytes as u64)
            .build::<_, Bytes>(h3_quinn::Connection::new(connection.clone()))
            .await;
        let mut h3 = match built {
            Ok(h3) => h3,
            Err(error) => {
                tracing::debug!(%remote, %error, "HTTP/3 connection setup failed");
                return;
            }
        };
        let mut requests = JoinSet::new();
        let mut stop = self.stop.clone();
        let mut draining = *stop.borrow();
        let mut accepting = true;
        if draining {
            let _ = h3.shutdown(0).await;
        }
        loop {
            if draining && requests.is_empty() {
                break;
            }
            tokio::select! {
                accepted = h3.accept(), if accepting => match accepted {
                    Ok(Some(resolver)) => {
                        let this = Arc::clone(&self);
                        let info = info.clone();
                        requests.spawn(async move { this.serve_request(resolver, info).await });
                    }
                    // The client sent GOAWAY and its requests are done.
                    Ok(None) => break,
                    Err(error) => {
                        if !error.is_h3_no_error() {
                            tracing::debug!(%remote, %error, "HTTP/3 connection ended");
                        }
                        // The connection is gone: what still runs cannot answer anyway.
                        return;
                    }
                },
                () = stopping(&mut stop), if !draining => {
                    draining = true;
                    if let Err(error) = h3.shutdown(0).await {
                        tracing::debug!(%remote, %error, "HTTP/3 GOAWAY failed");
                        accepting = false;
                    }
                }
                Some(_) = requests.join_next(), if !requests.is_empty() => {}
            }
        }
        while requests.join_next().await.is_some() {}
        // Closing discards unacknowledged stream data: give the last responses a few round
        // trips to be acknowledged, unless the client closes first.
        let linger = connection.rtt() * 3 + Duration::from_millis(50);
        tokio::select! {
            _ = connection.closed() => {}
            () = tokio::time::sleep(linger) => {}
        }
        drop(h3);
    }

    /// Reads one request head, runs the handler and sends its response.
    async fn serve_request(
        &self,
        resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
        info: ConnectionInfo,
    ) {
        let remote = info.remote;
        let resolved =
            tokio::time::timeout(self.limits.header_read_timeout, resolver.resolve_request()).await;
        let (request, stream) = match resolved {
            Ok(Ok(resolved)) => resolved,
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "HTTP/3 request head refused");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "HTTP/3 request head timed out");
                return;
            }
        };
        let (mut sender, receiver) = stream.split();
        let head_only = request.method() == Method::HEAD;
        let request = request.map(|()| RequestBody { stream: receiver });
        let response = match self.misdirected(&request, &info) {
            Some(response) => response,
            None => Arc::clone(&self.handler).handle(request, info).await,
        };
        let (head, body) = into_h3_parts(response, head_only).await;
        let sent = async {
            sender.send_response(head).await?;
            if !body.is_empty() {
                sender.send_data(body).await?;
            }
            sender.finish().await
        }
        .await;
        if let Err(error) = sent {
            tracing::debug!(%remote, %error, "HTTP/3 response not sent");
        }
    }

    /// The 421 for a request whose host the connection's certificate does not cover.
    fn misdirected<B>(&self, request: &Request<B>, info: &ConnectionInfo) -> Option<Response<Full<Bytes>>> {
        let host = request_host(request)?;
        let host = crate::route_table::normalize_host(&host);
        if self.certificates.host_allowed(info.server_name(), &host) {
            return None;
        }
        Some(text_response(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "host `{host}` is not served by the certificate for `{}` on this connection",
                info.server_name().unwrap_or("-")
            ),
        ))
    }
}

/// Header fields that are specific to an HTTP/1.1 connection and malformed in HTTP/3
/// (RFC 9114 §4.2).
const CONNECTION_SPECIFIC_HEADERS: [http::header::HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
];

/// The response head for h3 (no connection-specific fields, a `content-length`) and its body
/// (empty for HEAD).
async fn into_h3_parts(response: Response<Full<Bytes>>, head_only: bool) -> (Response<()>, Bytes) {
    let (mut parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    for name in &CONNECTION_SPECIFIC_HEADERS {
        parts.headers.remove(name);
    }
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if !bodiless && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let body = if head_only || bodiless { Bytes::new() } else { body };
    (Response::from_parts(parts, ()), body)
}

/// A request body streamed from the receive side of an h3 request stream.
struct RequestBody {
    stream: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut().stream.poll_recv_data(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut data))) => {
                let bytes = data.copy_to_bytes(data.remaining());
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn h3_responses_drop_connection_specific_fields_and_carry_a_length() {
        let mut response = text_response(StatusCode::OK, "hi");
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        let (head, body) = into_h3_parts(response, false).await;
        assert!(head.headers().get(http::header::CONNECTION).is_none());
        assert_eq!(head.headers()[http::header::CONTENT_LENGTH], "3");
        assert_eq!(body, "hi\n");

        let (head, body) = into_h3_parts(text_response(StatusCode::OK, "hi"), true).await;
        assert_eq!(
            head.headers()[http::header::CONTENT_LENGTH],
            "3",
            "HEAD keeps the length"
        );
        assert!(body.is_empty(), "HEAD has no body");
    }

    #[test]
    fn the_transport_takes_the_edge_limits() {
        let limits = ServerLimits {
            idle_timeout: Duration::from_secs(7),
            ..ServerLimits::default()
        };
        assert!(transport_config(&limits).is_ok());
        let absurd = ServerLimits {
            idle_timeout: Duration::from_secs(u64::MAX / 1000),
            ..ServerLimits::default()
        };
        assert!(
            transport_config(&absurd).is_err(),
            "an idle timeout QUIC cannot carry is refused"
        );
    }
}
